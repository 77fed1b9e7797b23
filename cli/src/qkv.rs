//! `xattn run --qkv`: the inputs from one safetensors file, by tensor name, as
//! `safetensors.torch.save_file({"q": q, "k": k, "v": v}, path)` writes them.
//!
//! Each tensor passes the checks of the `.npy` file it replaces (dtype, shape): it is handed
//! to [`crate::npy`] as a `.npy` header over its little-endian data. q, k and v may be F32,
//! F16 or BF16 (a BF16 tensor goes as uint16 words marked bfloat16: numpy has no such type). `.npz` archives are
//! refused with the way to write safetensors instead: reading them needs a zip reader, a
//! dependency this tool does not take for one input format.

use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::npy::{header, Source};
use crate::{open_file, CliError, CliResult};

/// The tensor names `--qkv` reads: q, k, v required, the rest optional.
pub const NAMES: [&str; 7] = ["q", "k", "v", "mask", "bias", "q_lens", "kv_lens"];

/// How to write a `--qkv` file, for messages.
const HOW: &str = "safetensors.torch.save_file({'q': q, 'k': k, 'v': v}, 'qkv.safetensors') \
                   (or safetensors.numpy.save_file)";

/// A safetensors file of `xattn run` inputs, checked to hold q, k, v and no unknown name.
pub struct Bundle {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// numpy's type string for a safetensors dtype (safetensors is little-endian), if numpy has one.
fn descr(dtype: Dtype) -> Option<&'static str> {
    Some(match dtype {
        Dtype::BOOL => "|b1",
        Dtype::U8 => "|u1",
        Dtype::I8 => "|i1",
        Dtype::I16 => "<i2",
        Dtype::U16 => "<u2",
        Dtype::F16 => "<f2",
        Dtype::I32 => "<i4",
        Dtype::U32 => "<u4",
        Dtype::F32 => "<f4",
        Dtype::F64 => "<f8",
        Dtype::I64 => "<i8",
        Dtype::U64 => "<u8",
        Dtype::C64 => "<c8",
        _ => return None,
    })
}

impl Bundle {
    /// Reads `path` and checks its tensor names.
    pub fn read(path: &Path) -> CliResult<Self> {
        let shown = path.display();
        let (mut file, len) = open_file(path)?;
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.read_to_end(&mut bytes)
            .map_err(|e| CliError::new(format!("cannot read --qkv {shown}: {e}")))?;
        if bytes.starts_with(b"PK\x03\x04") {
            return Err(CliError::new(format!(
                "--qkv {shown} is a zip archive (.npz), which xattn does not read; write a \
                 safetensors file with {HOW}, or pass --q, --k, --v as .npy files"
            )));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            CliError::new(format!(
                "--qkv {shown} is not a safetensors file ({e}); write one with {HOW}"
            ))
        })?;
        let mut names = st.names();
        names.sort_unstable();
        if let Some(other) = names.iter().find(|n| !NAMES.contains(n)) {
            return Err(CliError::new(format!(
                "--qkv {shown} holds a tensor `{other}`, which xattn does not read; it reads {} \
                 (the file holds {})",
                NAMES.join(", "),
                names.join(", ")
            )));
        }
        if let Some(missing) = NAMES[..3].iter().find(|n| !names.contains(n)) {
            return Err(CliError::new(format!(
                "--qkv {shown} has no tensor `{missing}`; it needs q, k and v (it holds {}); \
                 write it with {HOW}",
                names.join(", ")
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// The tensor `name` (one of [`NAMES`]), if the file holds it.
    pub fn get(&self, name: &str) -> CliResult<Option<Source<'_>>> {
        let st = SafeTensors::deserialize(&self.bytes).expect("parsed in Bundle::read");
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        let shown = format!("tensor `{name}` of --qkv {}", self.path.display());
        // numpy has no bfloat16: its data are read as the uint16 words they are.
        let bf16 = view.dtype() == Dtype::BF16;
        let header = if bf16 {
            Some("<u2")
        } else {
            descr(view.dtype())
        }
        .and_then(|d| header(d, view.shape()).ok())
        .ok_or_else(|| {
            CliError::new(format!(
                "{shown} has dtype {}, which xattn does not read; save it as float32 \
                     (t.float()), float16 or bfloat16 (q, k, v), bool (t.bool()) or int64 \
                     lengths",
                view.dtype()
            ))
        })?;
        Ok(Some(Source::Tensor {
            shown,
            header,
            data: view.data(),
            bf16,
        }))
    }

    /// The tensor `name` of q, k, v, which [`Bundle::read`] checked is there.
    pub fn required(&self, name: &str) -> CliResult<Source<'_>> {
        Ok(self.get(name)?.expect("q, k and v checked in Bundle::read"))
    }
}
