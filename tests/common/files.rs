//! Files for the CLI tests: a temporary folder per test and .npy reading and writing.
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
