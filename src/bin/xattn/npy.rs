//! Reading and writing `.npy` arrays: float32 tensors, bool masks, integer lengths.
//!
//! Only C-ordered arrays of the expected dtype are accepted: converting dtypes or transposing
//! silently would hide mistakes (a float64 array saved by accident, a transposed layout), and
//! the fix on the numpy side is one call, which the error names. The exceptions are lossless
//! and unambiguous: lengths may be any 32- or 64-bit integer type, masks bool or uint8
//! holding only 0 and 1.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use npyz::{DType, Deserialize, NpyFile, Order, TypeChar, TypeStr, WriterBuilder};

use crate::{CliError, CliResult};

/// An array read from a `.npy` file, row-major.
#[derive(Debug)]
pub struct Array<T = f32> {
    /// Elements in C order.
    pub data: Vec<T>,
    /// Dimensions, slowest first.
    pub shape: Vec<usize>,
}

/// An open `.npy` file and its name for messages.
type Npy = NpyFile<BufReader<File>>;

/// numpy's name of a plain dtype (`float64`, `int32`, `bool`), with its type string.
fn dtype_name(ts: &TypeStr) -> String {
    let bits = ts.size_field() * 8;
    let name = match ts.type_char() {
        TypeChar::Bool => "bool".to_string(),
        TypeChar::Int => format!("int{bits}"),
        TypeChar::Uint => format!("uint{bits}"),
        TypeChar::Float => format!("float{bits}"),
        TypeChar::Complex => format!("complex{bits}"),
        _ => return ts.to_string(),
    };
    format!("{name} ({ts})")
}

/// Opens `path` and reads its header; rejects Fortran order and structured dtypes.
/// Returns the file and its plain dtype.
fn open(path: &Path, expected: &str) -> CliResult<(Npy, TypeStr)> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| CliError::new(format!("cannot open {shown}: {e}")))?;
    let npy = NpyFile::new(BufReader::new(file))
        .map_err(|e| CliError::new(format!("{shown} is not a valid .npy file: {e}")))?;
    let ts = match npy.dtype() {
        DType::Plain(ts) => ts,
        other => {
            return Err(CliError::new(format!(
                "{shown} has a structured dtype {}, expected {expected}",
                other.descr().replace(", ]", "]")
            )))
        }
    };
    if npy.order() == Order::Fortran {
        return Err(CliError::new(format!(
            "{shown} is in Fortran order; save a C-ordered array (np.ascontiguousarray(a))"
        )));
    }
    Ok((npy, ts))
}

/// The shape and elements of an opened file, as `T` (which must match its dtype).
fn read_data<T: Deserialize>(path: &Path, npy: Npy) -> CliResult<Array<T>> {
    let shown = path.display();
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
    let data: Vec<T> = npy.into_vec().map_err(|e| {
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

fn is(ts: &TypeStr, c: TypeChar, size: u64) -> bool {
    ts.type_char() == c && ts.size_field() == size
}

/// Reads a C-ordered float32 `.npy` file (either endianness).
pub fn read_f32(path: &Path) -> CliResult<Array> {
    let (npy, ts) = open(path, "float32 (<f4)")?;
    if !is(&ts, TypeChar::Float, 4) {
        return Err(CliError::new(format!(
            "{} has dtype {}, expected float32 (<f4); convert with a.astype(np.float32)",
            path.display(),
            dtype_name(&ts)
        )));
    }
    read_data(path, npy)
}

/// Reads a C-ordered bool `.npy` file; uint8 holding only 0 and 1 is accepted as well
/// (PyTorch's old byte masks). True means "may attend".
pub fn read_bool(path: &Path) -> CliResult<Array<bool>> {
    read_bool_meaning(path, "true = attend")
}

/// [`read_bool`] for a mask whose `true` means what `meaning` says (named in the dtype hint).
pub fn read_bool_meaning(path: &Path, meaning: &str) -> CliResult<Array<bool>> {
    let shown = path.display();
    let (npy, ts) = open(path, "bool (|b1)")?;
    if is(&ts, TypeChar::Bool, 1) {
        return read_data(path, npy).map_err(|e| {
            CliError::new(format!(
                "{e} (a bool array holds only bytes 0 and 1; rewrite it with a.astype(bool))"
            ))
        });
    }
    if is(&ts, TypeChar::Uint, 1) {
        let a: Array<u8> = read_data(path, npy)?;
        if let Some((i, x)) = a.data.iter().enumerate().find(|(_, &x)| x > 1) {
            return Err(CliError::new(format!(
                "{shown} is uint8 with value {x} at flat index {i}; a uint8 mask must hold only \
                 0 and 1 (convert with (a != 0) or a.astype(bool))"
            )));
        }
        return Ok(Array {
            data: a.data.into_iter().map(|x| x == 1).collect(),
            shape: a.shape,
        });
    }
    Err(CliError::new(format!(
        "{shown} has dtype {}, expected bool (|b1), {meaning}; convert with a.astype(bool) \
         (or a != 0)",
        dtype_name(&ts)
    )))
}

/// `a` if it is 1-D (one length per batch entry).
fn check_1d<T>(path: &Path, a: Array<T>) -> CliResult<Array<T>> {
    if a.shape.len() != 1 {
        return Err(CliError::new(format!(
            "{} has shape {:?}; lengths must be 1-D, one per batch entry",
            path.display(),
            a.shape
        )));
    }
    Ok(a)
}

/// Reads a 1-D `.npy` file of non-negative int32 or int64 lengths (uint32 and uint64 too).
pub fn read_lens(path: &Path) -> CliResult<Array<u32>> {
    let shown = path.display();
    let (npy, ts) = open(path, "int32 (<i4)")?;
    let wide: Array<i64> = if is(&ts, TypeChar::Int, 4) {
        let a: Array<i32> = read_data(path, npy)?;
        Array {
            data: a.data.into_iter().map(i64::from).collect(),
            shape: a.shape,
        }
    } else if is(&ts, TypeChar::Int, 8) {
        read_data(path, npy)?
    } else if is(&ts, TypeChar::Uint, 4) {
        let a: Array<u32> = read_data(path, npy)?;
        return check_1d(path, a);
    } else if is(&ts, TypeChar::Uint, 8) {
        let a: Array<u64> = read_data(path, npy)?;
        // Above i64::MAX is above u32::MAX too: saturate and let the range check report it.
        Array {
            data: a
                .data
                .into_iter()
                .map(|x| i64::try_from(x).unwrap_or(i64::MAX))
                .collect(),
            shape: a.shape,
        }
    } else {
        return Err(CliError::new(format!(
            "{shown} has dtype {}, expected int32 (<i4) or int64 lengths; convert with \
             a.astype(np.int32)",
            dtype_name(&ts)
        )));
    };
    let wide = check_1d(path, wide)?;
    let data = wide
        .data
        .iter()
        .enumerate()
        .map(|(b, &x)| {
            u32::try_from(x).map_err(|_| {
                CliError::new(format!(
                    "{shown}[{b}] = {x}; lengths must be between 0 and {}",
                    u32::MAX
                ))
            })
        })
        .collect::<CliResult<Vec<u32>>>()?;
    Ok(Array {
        data,
        shape: wide.shape,
    })
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
