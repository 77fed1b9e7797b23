//! Reading and writing float32 `.npy` arrays.
//!
//! Only C-ordered float32 arrays are accepted: converting dtypes or transposing silently would
//! hide mistakes (a float64 array saved by accident, a transposed layout), and the fix on the
//! numpy side is one call, which the error names.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};

use crate::{CliError, CliResult};

/// A float32 array read from a `.npy` file, row-major.
#[derive(Debug)]
pub struct Array {
    /// Elements in C order.
    pub data: Vec<f32>,
    /// Dimensions, slowest first.
    pub shape: Vec<usize>,
}

/// Reads a C-ordered float32 `.npy` file (either endianness).
pub fn read_f32(path: &Path) -> CliResult<Array> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| CliError::new(format!("cannot open {shown}: {e}")))?;
    let npy = NpyFile::new(BufReader::new(file))
        .map_err(|e| CliError::new(format!("{shown} is not a valid .npy file: {e}")))?;
    match npy.dtype() {
        DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 4 => {}
        DType::Plain(ts) => {
            return Err(CliError::new(format!(
                "{shown} has dtype {ts}, expected float32 (<f4); convert with a.astype(np.float32)"
            )))
        }
        other => {
            return Err(CliError::new(format!(
                "{shown} has a structured dtype {}, expected float32 (<f4)",
                other.descr().replace(", ]", "]")
            )))
        }
    }
    if npy.order() == Order::Fortran {
        return Err(CliError::new(format!(
            "{shown} is in Fortran order; save a C-ordered array (np.ascontiguousarray(a))"
        )));
    }
    let shape = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            CliError::new(format!(
                "{shown}: shape {:?} does not fit in memory",
                npy.shape()
            ))
        })?;
    let expected = npy.len();
    let data: Vec<f32> = npy.into_vec().map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CliError::new(format!(
                "{shown} is truncated: its header promises {expected} elements"
            ))
        } else {
            CliError::new(format!("{shown}: reading the data failed: {e}"))
        }
    })?;
    if data.len() as u64 != expected {
        return Err(CliError::new(format!(
            "{shown}: header promises {expected} elements but the file holds {}",
            data.len()
        )));
    }
    Ok(Array { data, shape })
}

/// Writes `data` as a C-ordered little-endian float32 `.npy` array of shape `shape`.
pub fn write_f32(path: &Path, data: &[f32], shape: &[usize]) -> CliResult<()> {
    let shown = path.display();
    let fail = |e: std::io::Error| CliError::new(format!("writing {shown} failed: {e}"));
    debug_assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "shape matches the data"
    );
    let file = File::create(path).map_err(fail)?;
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&dims)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(fail)?;
    writer.extend(data.iter().copied()).map_err(fail)?;
    writer.finish().map_err(fail)
}
