//! Files for the CLI tests: a temporary folder per test, .npy reading and writing, safetensors
//! writing, and editing an argument list.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use npyz::WriterBuilder;

/// A fresh folder for one test's files, removed when the test passes.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `xattn-<test binary>-<pid>-<name>` under the system's temp folder.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "xattn-{}-{}-{name}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp folder");
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A C-ordered .npy file: its values and shape.
pub fn read_npy<T: npyz::Deserialize>(path: &Path) -> (Vec<T>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(npy.order(), npyz::Order::C, "{}", path.display());
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    let data = npy
        .into_vec()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (data, shape)
}

/// Writes `data` with shape `shape` as a C-ordered .npy of `T`'s default dtype.
pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, data: &[T], shape: &[usize]) {
    assert_eq!(data.len(), shape.iter().product::<usize>());
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&dims)
        .writer(std::io::BufWriter::new(
            std::fs::File::create(path).expect("create .npy"),
        ))
        .begin_nd()
        .expect("npy header");
    w.extend(data.iter().copied()).expect("npy data");
    w.finish().expect("npy finish");
}

/// Writes a .npy file whose header dict is `dict` verbatim (padded as numpy pads it) followed
/// by the bytes `data`: for headers no writer here would produce (bad syntax, string dtypes).
pub fn write_npy_raw(path: &Path, dict: &str, data: &[u8]) {
    // Magic, version, a 2-byte length, the dict and a newline, in a multiple of 64 bytes.
    let pad = (64 - (11 + dict.len()) % 64) % 64;
    let text = format!("{dict}{}\n", " ".repeat(pad));
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend(
        u16::try_from(text.len())
            .expect("a short dict")
            .to_le_bytes(),
    );
    bytes.extend(text.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A named F32 tensor for a safetensors file: `(name, shape, values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// F32 tensors as the bytes of a safetensors file, laid out by hand (8-byte header length,
/// JSON header, little-endian data): no code shared with the crate's reader.
pub fn safetensors_bytes(tensors: &[NamedTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        let start = data.len();
        data.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON header");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    bytes
}

/// Writes F32 tensors as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) {
    std::fs::write(path, safetensors_bytes(tensors))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Cuts the file at `path` to its first `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `args` with the value after `flag` replaced by `value` (the flag added if absent).
pub fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

/// Writes `tensors` (name, dtype, shape, little-endian bytes) as a safetensors file, as
/// `safetensors.torch.save_file` does.
pub fn write_safetensors_raw(path: &Path, tensors: &[(&str, safetensors::Dtype, &[usize], &[u8])]) {
    let views = tensors.iter().map(|&(name, dtype, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), bytes)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        (name, view)
    });
    safetensors::tensor::serialize_to_file(views, None, path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The little-endian bytes of `data`.
pub fn le_bytes<T: Copy, const N: usize>(data: &[T], bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    data.iter().flat_map(|&x| bytes(x)).collect()
}

/// Runs `cmd` to completion like `Command::output`, but kills it and panics if it has not
/// finished within `secs` seconds: for inputs that would make a broken binary block forever
/// (a FIFO opened for reading).
pub fn output_within(mut cmd: std::process::Command, secs: u64) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    // Drained on threads, so that a chatty child cannot fill a pipe and stall.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            break status;
        }
        if start.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {secs} s (blocked?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().expect("stdout"),
        stderr: err.join().expect("stderr"),
    }
}

/// Makes a FIFO at `path`; false (after saying so) where `mkfifo` is missing or fails.
pub fn make_fifo(path: &Path) -> bool {
    let made = std::process::Command::new("mkfifo").arg(path).status();
    let ok = made.is_ok_and(|st| st.success());
    if !ok {
        eprintln!("no mkfifo: the FIFO case is skipped");
    }
    ok
}
