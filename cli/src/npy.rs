//! Reading and writing `.npy` arrays: float32 and float16 tensors, bool masks, integer lengths.
//!
//! An array comes from a [`Source`]: a `.npy` file, or a tensor of another container (a
//! safetensors file) given as a `.npy` header and its data, so both pass the same checks.
//!
//! Only C-ordered arrays of the expected dtype are accepted: converting dtypes or transposing
//! silently would hide mistakes (a float64 array saved by accident, a transposed layout), and
//! the fix on the numpy side is one call, which the error names. The exceptions are lossless
//! and unambiguous: lengths may be any 32- or 64-bit integer type. Bool masks must be bool: an
//! integer 0/1 array does not say whether 1 keeps a key (Hugging Face) or removes it (PyTorch's
//! byte masks), so it is refused with both conversions; `--attention-mask` reads Hugging
//! Face's integer attention_mask, whose convention its name fixes.

use std::fmt::{self, Display};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use npyz::{
    AutoSerialize, DType as NpyDType, Deserialize, NpyFile, NpyHeader, Order, TypeChar, TypeStr,
    WriterBuilder,
};
use xattn::DType;

use crate::{open_file, CliError, CliResult};

/// An array read from a `.npy` file, row-major.
#[derive(Debug)]
pub struct Array<T = f32> {
    /// Elements in C order.
    pub data: Vec<T>,
    /// Dimensions, slowest first.
    pub shape: Vec<usize>,
}

/// An opened array: its header and a reader at its data.
type Npy<'a> = NpyFile<Box<dyn Read + 'a>>;

/// Where an array is read from.
#[derive(Clone)]
pub enum Source<'a> {
    /// A `.npy` file.
    File(&'a Path),
    /// A tensor of a container: `shown` names it in messages, `header` describes `data`.
    /// `bf16`: the data are bfloat16, which numpy has no type for; `header` then says uint16
    /// (`<u2`), of the same size.
    Tensor {
        shown: String,
        header: NpyHeader,
        data: &'a [u8],
        bf16: bool,
    },
}

impl<'a> From<&'a Path> for Source<'a> {
    fn from(path: &'a Path) -> Self {
        Self::File(path)
    }
}

impl<'a> From<&'a PathBuf> for Source<'a> {
    fn from(path: &'a PathBuf) -> Self {
        Self::File(path)
    }
}

impl Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => path.display().fmt(f),
            Self::Tensor { shown, .. } => f.write_str(shown),
        }
    }
}

impl Source<'_> {
    /// Whether the data are bfloat16 (a tensor; numpy has no such type).
    fn is_bf16(&self) -> bool {
        matches!(self, Self::Tensor { bf16: true, .. })
    }

    /// How to give this array as the input `flag` (a file) or `name` (a tensor) instead.
    fn give_as(&self, flag: &str, name: &str) -> String {
        match self {
            Self::File(_) => format!("pass it as {flag}"),
            Self::Tensor { .. } => format!("save it as the tensor `{name}`"),
        }
    }
}

/// The header of a C-ordered array of numpy dtype `descr` and `shape`, for [`Source::Tensor`].
pub fn header(descr: &str, shape: &[usize]) -> std::io::Result<NpyHeader> {
    let dims: String = shape.iter().map(|d| format!("{d}, ")).collect();
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}\n");
    let len = u16::try_from(dict.len()).map_err(std::io::Error::other)?;
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend(len.to_le_bytes());
    bytes.extend(dict.as_bytes());
    NpyHeader::from_reader(&bytes[..])
}

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

/// Reads the header of a `.npy` file of `len` bytes (magic, version, dict length, dict text),
/// leaving `r` at the data. Returns the header's bytes and where its dict text starts. A file
/// that ends inside the header is reported as truncated, with the sizes.
fn read_header(r: &mut impl Read, shown: &dyn Display, len: u64) -> CliResult<(Vec<u8>, usize)> {
    let io = |e: std::io::Error| CliError::new(format!("cannot read {shown}: {e}"));
    let truncated = |need: usize| {
        CliError::new(format!(
            "{shown} has a truncated header: the file ends after {len} bytes, its .npy header \
             needs {need}; save the array again (np.save)"
        ))
    };
    let mut header = vec![0; len.min(10) as usize];
    r.read_exact(&mut header).map_err(io)?;
    let magic = b"\x93NUMPY";
    if !header.starts_with(&magic[..header.len().min(magic.len())]) {
        return Err(CliError::new(format!(
            "{shown} is not a .npy file: it does not start with \\x93NUMPY (np.save writes one)"
        )));
    }
    // Version 1 stores the dict's length in 2 bytes, versions 2 and 3 in 4.
    let text_start = if header.get(6).is_some_and(|&v| v >= 2) {
        12
    } else {
        10
    };
    if len < text_start as u64 {
        return Err(truncated(text_start));
    }
    header.resize(text_start, 0);
    r.read_exact(&mut header[10..]).map_err(io)?;
    let text_len = header[8..]
        .iter()
        .rev()
        .fold(0usize, |n, &b| n << 8 | usize::from(b));
    let need = text_start + text_len;
    if len < need as u64 {
        return Err(truncated(need));
    }
    header.resize(need, 0);
    r.read_exact(&mut header[text_start..]).map_err(io)?;
    Ok((header, text_start))
}

/// The 1-based line and column a syntax error of the header's Python literal points at (its
/// message carries them as `--> line:col`).
fn syntax_error_position(msg: &str) -> Option<(usize, usize)> {
    let pos = msg.split_once("--> ")?.1.split_whitespace().next()?;
    let (line, col) = pos.split_once(':')?;
    Some((line.parse().ok()?, col.parse().ok()?))
}

/// The word (or the single character) at `line`:`col` of `text`, quoted, for messages.
fn token_at(text: &str, (line, col): (usize, usize)) -> String {
    let rest: Vec<char> = text
        .lines()
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .chars()
        .skip(col.saturating_sub(1))
        .collect();
    let word = rest
        .iter()
        .take_while(|c| c.is_alphanumeric() || **c == '_')
        .count();
    match rest.get(..word.max(1)) {
        Some(token) => format!("`{}`", token.iter().collect::<String>()),
        None => "the end".to_string(),
    }
}

/// The `descr` of a header's dict text when it is a quoted string (a plain dtype).
fn descr(text: &str) -> Option<&str> {
    let value = text.split_once("'descr'")?.1.trim_start();
    let value = value.strip_prefix(':')?.trim_start();
    let quote = value.chars().next().filter(|&c| c == '\'' || c == '"')?;
    value[1..].split(quote).next()
}

/// Rewrites the byte-order character of a plain dtype in the header's dict text `text` where
/// numpy reads it as the machine's order but npyz does not: `=` (native), and `|` ("not
/// applicable") on a type whose size makes the order matter (`|f2`, `|f4`: numpy reads them
/// as native, `np.dtype('|f2') == np.dtype('=f2')`). Both become `<` or `>`, whichever this
/// machine is, in place (one byte for one, so the header's length stays). Other type strings
/// are left for the parser to accept or refuse.
fn native_byte_order(text: &mut [u8]) {
    let native = if cfg!(target_endian = "little") {
        b'<'
    } else {
        b'>'
    };
    let Some(key) = text
        .windows(7)
        .position(|w| w == b"'descr'" || w == b"\"descr\"")
    else {
        return;
    };
    let mut at = key + 7;
    let skip = |at: &mut usize, what: &[u8]| {
        while text.get(*at).is_some_and(|b| what.contains(b)) {
            *at += 1;
        }
    };
    skip(&mut at, b" \t");
    if text.get(at) != Some(&b':') {
        return;
    }
    at += 1;
    skip(&mut at, b" \t");
    if !matches!(text.get(at), Some(b'\'' | b'"')) {
        return; // a structured dtype: a list
    }
    let order = at + 1;
    let (Some(&first), Some(&kind)) = (text.get(order), text.get(order + 1)) else {
        return;
    };
    let size: u64 = text[order + 2..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0, |n, &d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        });
    // The numeric types, whose byte order matters above one byte.
    let ordered = b"biufcmM".contains(&kind) && size > 1;
    if first == b'=' || (first == b'|' && ordered) {
        text[order] = native;
    }
}

/// One line for a header that does not parse: the token a syntax error points at, or a dtype
/// that is not a numpy type string (`expected` says which one was wanted).
fn header_error(shown: &dyn Display, text: &str, e: &std::io::Error, expected: &str) -> CliError {
    let msg = e.to_string();
    if let Some(pos) = syntax_error_position(&msg) {
        return CliError::new(format!(
            "{shown}: the .npy header does not parse at {} (line {}, column {}) in {text}; \
             np.save writes a Python dict like {{'descr': '<f4', 'fortran_order': False, \
             'shape': (2, 3), }}",
            token_at(text, pos),
            pos.0,
            pos.1
        ));
    }
    if let Some(d) = descr(text).filter(|d| d.parse::<TypeStr>().is_err()) {
        return CliError::new(format!(
            "{shown} has dtype `{d}`, which is not a numpy type string; expected {expected}"
        ));
    }
    CliError::new(format!(
        "{shown} has an invalid .npy header ({msg}): {text}"
    ))
}

/// Opens `src` and reads its header; rejects Fortran order and structured dtypes.
/// Returns the array and its plain dtype.
fn open<'a>(src: &Source<'a>, expected: &str) -> CliResult<(Npy<'a>, TypeStr)> {
    let npy = match src {
        Source::File(path) => {
            let (mut file, len) = open_file(path)?;
            let (mut header, text_start) = read_header(&mut file, src, len)?;
            native_byte_order(&mut header[text_start..]);
            let header = NpyHeader::from_reader(&header[..]).map_err(|e| {
                let text = String::from_utf8_lossy(&header[text_start..]);
                header_error(src, text.trim_end(), &e, expected)
            })?;
            let data: Box<dyn Read> = Box::new(BufReader::new(file));
            NpyFile::with_header(header, data)
        }
        Source::Tensor { header, data, .. } => {
            let data: Box<dyn Read + 'a> = Box::new(*data);
            NpyFile::with_header(header.clone(), data)
        }
    };
    let ts = match npy.dtype() {
        NpyDType::Plain(ts) => ts,
        other => {
            return Err(CliError::new(format!(
                "{src} has a structured dtype {}, expected {expected}",
                other.descr().replace(", ]", "]")
            )))
        }
    };
    if npy.order() == Order::Fortran {
        return Err(CliError::new(format!(
            "{src} is in Fortran order; save a C-ordered array (np.ascontiguousarray(a))"
        )));
    }
    Ok((npy, ts))
}

/// The shape and elements of an opened file, as `T` (which must match its dtype). `invalid` is
/// appended to the error for an element the dtype does not allow (a bool byte other than 0, 1).
fn read_data<T: Deserialize>(shown: &Source, npy: Npy, invalid: &str) -> CliResult<Array<T>> {
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
    let data: Vec<T> = npy.into_vec().map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => CliError::new(format!(
            "{shown} is truncated: its header promises {expected} elements"
        )),
        std::io::ErrorKind::InvalidData => CliError::new(format!("{shown}: {e}{invalid}")),
        _ => CliError::new(format!("{shown}: reading the data failed: {e}")),
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

/// The error for `shown` of dtype `ts` where `expected` was wanted: `fix` says what to do with
/// a numeric array. Strings are not numbers, so they get no fix.
fn wrong_dtype(shown: &Source, ts: &TypeStr, expected: &str, fix: &str) -> CliError {
    if shown.is_bf16() {
        return CliError::new(format!(
            "{shown} has dtype bfloat16 (BF16), expected {expected}; {fix}"
        ));
    }
    if matches!(ts.type_char(), TypeChar::ByteStr | TypeChar::UnicodeStr) {
        return CliError::new(format!(
            "{shown} holds strings (dtype {ts}), and strings are not numbers; expected {expected}"
        ));
    }
    CliError::new(format!(
        "{shown} has dtype {}, expected {expected}; {fix}",
        dtype_name(ts)
    ))
}

const F32: &str = "float32 (<f4)";
const FLOATS: &str = "float32 (<f4) or float16 (<f2)";

/// Reads a C-ordered float32 or float16 array (either endianness), or a bfloat16 tensor:
/// its values widened to f32 (exactly) and the type they were stored in.
pub fn read_floats<'a>(src: impl Into<Source<'a>>) -> CliResult<(Array, DType)> {
    let src = src.into();
    let (npy, ts) = open(&src, FLOATS)?;
    if src.is_bf16() {
        let a: Array<u16> = read_data(&src, npy, "")?;
        let data = a
            .data
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32());
        return Ok((
            Array {
                data: data.collect(),
                shape: a.shape,
            },
            DType::Bf16,
        ));
    }
    if is(&ts, TypeChar::Float, 4) {
        return Ok((read_data(&src, npy, "")?, DType::F32));
    }
    if is(&ts, TypeChar::Float, 2) {
        let a: Array<half::f16> = read_data(&src, npy, "")?;
        let data = a.data.into_iter().map(half::f16::to_f32).collect();
        return Ok((
            Array {
                data,
                shape: a.shape,
            },
            DType::F16,
        ));
    }
    Err(wrong_dtype(
        &src,
        &ts,
        FLOATS,
        "convert with a.astype(np.float32)",
    ))
}

/// Reads a C-ordered float32 array (either endianness): an additive bias. A bool (or uint8) array is a mask, and the error says to
/// give it as one: cast to float it would add 1 to the logits of the keys it keeps and remove
/// none.
pub fn read_bias<'a>(src: impl Into<Source<'a>>) -> CliResult<Array> {
    let src = src.into();
    let fix = format!(
        "a bool array is a mask (true = may attend): {} instead (a.astype(np.float32) would \
         make it a +1/0 bias that removes no key)",
        src.give_as("--mask", "mask")
    );
    read_float(&src, Some(&fix))
}

/// Reads a float32 array, with `mask_fix` as the fix for a bool or uint8 array when given.
fn read_float(src: &Source, mask_fix: Option<&str>) -> CliResult<Array> {
    let (npy, ts) = open(src, F32)?;
    if is(&ts, TypeChar::Float, 4) && !src.is_bf16() {
        return read_data(src, npy, "");
    }
    let fix = match mask_fix {
        Some(fix) if is(&ts, TypeChar::Bool, 1) || is(&ts, TypeChar::Uint, 1) => fix,
        _ => "convert with a.astype(np.float32)",
    };
    Err(wrong_dtype(src, &ts, F32, fix))
}

/// How to turn an integer 0/1 array (Hugging Face's int64 attention_mask, PyTorch's old
/// uint8 masks) into the bool mask `flag` wants, whose `true` means `meaning`. Such an array
/// does not say whether 1 keeps or removes a key, so it is never taken as it is: both
/// conversions are named, with the one that inverts it for the other convention.
pub enum Polarity {
    /// `--mask`: true = may attend (PyTorch SDPA's bool attn_mask, JAX).
    Attend,
    /// `--key-padding-mask`: true = ignore that key (PyTorch's key_padding_mask).
    IgnoreKey,
}

impl Polarity {
    fn meaning(&self) -> &'static str {
        match self {
            Self::Attend => "true = may attend (PyTorch SDPA's bool attn_mask)",
            Self::IgnoreKey => "true = ignore that key (PyTorch's key_padding_mask)",
        }
    }

    /// The conversions of an integer 0/1 array `src` to this polarity.
    fn int_fix(&self, src: &Source) -> String {
        let flag = match self {
            Self::Attend => "--mask",
            Self::IgnoreKey => "--key-padding-mask",
        };
        let (keep, ignore) = ("(a != 0)", "(a == 0)");
        let hf = "or give a Hugging Face attention_mask [batch, N] as it is to --attention-mask \
                  (1 = keep), or its lengths a.sum(1) to --kv-lens (right padding only)";
        let how = match self {
            Self::Attend => format!(
                "where 1 means attend (SDPA-style, or a Hugging Face attention_mask: 1 = keep) \
                 pass {keep}; where 1 means masked out (nn.MultiheadAttention's byte masks) \
                 pass {ignore}; {hf}"
            ),
            Self::IgnoreKey => format!(
                "from a PyTorch-style 0/1 padding mask (1 = ignore) pass {keep}; from a Hugging \
                 Face attention_mask (1 = keep) pass {ignore}, {hf}"
            ),
        };
        let as_ = match src {
            Source::File(_) => format!("as {flag}"),
            Source::Tensor { .. } => "as the tensor".to_string(),
        };
        format!(
            "an integer 0/1 mask does not say whether 1 keeps or removes a key, so it is not \
             read as it is; save a bool array {as_}: {how}"
        )
    }
}

/// Reads a C-ordered bool array for `--mask`: true means "may attend". A float array is
/// refused with a pointer to `--bias`: PyTorch's float attention masks are additive (0 keeps a
/// key, −inf removes it), and `a.astype(bool)` would invert one. An integer array (uint8
/// included) is refused with both conversions ([`Polarity`]).
pub fn read_bool<'a>(src: impl Into<Source<'a>>) -> CliResult<Array<bool>> {
    let src = src.into();
    let fix = format!(
        "a float mask is additive (PyTorch's float attn_mask: 0 keeps a key, −inf removes it), \
         so it is a bias: {} (as float32) instead; a.astype(bool) would invert it",
        src.give_as("--bias", "bias")
    );
    read_mask(&src, &Polarity::Attend, Some(&fix))
}

/// [`read_bool`] for a mask of `polarity`, where casting a float array is the fix.
pub fn read_bool_as<'a>(src: impl Into<Source<'a>>, polarity: Polarity) -> CliResult<Array<bool>> {
    read_mask(&src.into(), &polarity, None)
}

/// Reads a bool mask; `float_fix`, when given, is the fix for a float array. Integer arrays
/// are refused with the conversions for `polarity`.
fn read_mask(src: &Source, polarity: &Polarity, float_fix: Option<&str>) -> CliResult<Array<bool>> {
    let (npy, ts) = open(src, "bool (|b1)")?;
    if is(&ts, TypeChar::Bool, 1) {
        return read_data(
            src,
            npy,
            " (a bool array holds only bytes 0 and 1; rewrite it with a.astype(bool))",
        );
    }
    let int_fix;
    let fix = match float_fix {
        Some(fix) if ts.type_char() == TypeChar::Float => fix,
        _ if matches!(ts.type_char(), TypeChar::Int | TypeChar::Uint) => {
            int_fix = polarity.int_fix(src);
            &int_fix
        }
        _ => "convert with a.astype(bool)",
    };
    Err(wrong_dtype(
        src,
        &ts,
        &format!("bool (|b1), {}", polarity.meaning()),
        fix,
    ))
}

/// Reads a Hugging Face `attention_mask`: integer (any width, signed or not) or bool, holding
/// only 0 and 1, where 1 (true) keeps a key and 0 marks padding. Returns true = keep.
pub fn read_keep_mask<'a>(src: impl Into<Source<'a>>) -> CliResult<Array<bool>> {
    let src = src.into();
    let (npy, ts) = open(&src, "int64 (<i8) or bool (|b1)")?;
    if is(&ts, TypeChar::Bool, 1) {
        return read_data(&src, npy, "");
    }
    let wide: Array<i64> = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Int, 8) => read_data(&src, npy, "")?,
        (TypeChar::Int, 4) => widen::<i32>(&src, npy)?,
        (TypeChar::Int, 2) => widen::<i16>(&src, npy)?,
        (TypeChar::Int, 1) => widen::<i8>(&src, npy)?,
        (TypeChar::Uint, 4) => widen::<u32>(&src, npy)?,
        (TypeChar::Uint, 2) => widen::<u16>(&src, npy)?,
        (TypeChar::Uint, 1) => widen::<u8>(&src, npy)?,
        _ => {
            return Err(wrong_dtype(
                &src,
                &ts,
                "int64 (<i8) or bool (|b1), 1 = keep (a Hugging Face attention_mask)",
                "a float mask is additive: give it to --bias (as float32)",
            ))
        }
    };
    if let Some((i, x)) = wide
        .data
        .iter()
        .enumerate()
        .find(|(_, &x)| x != 0 && x != 1)
    {
        return Err(CliError::new(format!(
            "{src} holds {x} at flat index {i}; an attention_mask holds only 1 (keep) and 0 \
             (padding)"
        )));
    }
    Ok(Array {
        data: wide.data.into_iter().map(|x| x == 1).collect(),
        shape: wide.shape,
    })
}

/// An integer array of `T` read and widened to i64.
fn widen<T: Deserialize + Into<i64>>(src: &Source, npy: Npy) -> CliResult<Array<i64>> {
    let a: Array<T> = read_data(src, npy, "")?;
    Ok(Array {
        data: a.data.into_iter().map(Into::into).collect(),
        shape: a.shape,
    })
}

/// `a` if it is 1-D (one length per batch entry).
fn check_1d<T>(src: &Source, a: Array<T>) -> CliResult<Array<T>> {
    if a.shape.len() != 1 {
        return Err(CliError::new(format!(
            "{src} has shape {:?}; lengths must be 1-D, one per batch entry",
            a.shape
        )));
    }
    Ok(a)
}

/// Reads a 1-D array of non-negative int32 or int64 lengths (uint32 and uint64 too).
pub fn read_lens<'a>(src: impl Into<Source<'a>>) -> CliResult<Array<u32>> {
    let src = src.into();
    let (npy, ts) = open(&src, "int32 (<i4)")?;
    let wide: Array<i64> = if is(&ts, TypeChar::Int, 4) {
        let a: Array<i32> = read_data(&src, npy, "")?;
        Array {
            data: a.data.into_iter().map(i64::from).collect(),
            shape: a.shape,
        }
    } else if is(&ts, TypeChar::Int, 8) {
        read_data(&src, npy, "")?
    } else if is(&ts, TypeChar::Uint, 4) {
        let a: Array<u32> = read_data(&src, npy, "")?;
        return check_1d(&src, a);
    } else if is(&ts, TypeChar::Uint, 8) {
        let a: Array<u64> = read_data(&src, npy, "")?;
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
        return Err(wrong_dtype(
            &src,
            &ts,
            "int32 (<i4) or int64 lengths",
            "convert with a.astype(np.int32)",
        ));
    };
    let wide = check_1d(&src, wide)?;
    let data = wide
        .data
        .iter()
        .enumerate()
        .map(|(b, &x)| {
            u32::try_from(x).map_err(|_| {
                CliError::new(format!(
                    "{src}[{b}] = {x}; lengths must be between 0 and {}",
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

/// Reads a C-ordered integer array of any shape (int32, int64, uint32 or uint64): graph
/// indices, widened to i64 (uint64 above i64::MAX saturates; the caller checks the range).
pub fn read_indices<'a>(src: impl Into<Source<'a>>) -> CliResult<Array<i64>> {
    let src = src.into();
    let (npy, ts) = open(&src, "int32 (<i4) or int64 (<i8)")?;
    let widen_all = |data: Vec<i64>, shape| Array { data, shape };
    if is(&ts, TypeChar::Int, 4) {
        let a: Array<i32> = read_data(&src, npy, "")?;
        Ok(widen_all(
            a.data.into_iter().map(i64::from).collect(),
            a.shape,
        ))
    } else if is(&ts, TypeChar::Int, 8) {
        read_data(&src, npy, "")
    } else if is(&ts, TypeChar::Uint, 4) {
        let a: Array<u32> = read_data(&src, npy, "")?;
        Ok(widen_all(
            a.data.into_iter().map(i64::from).collect(),
            a.shape,
        ))
    } else if is(&ts, TypeChar::Uint, 8) {
        let a: Array<u64> = read_data(&src, npy, "")?;
        let data = a
            .data
            .into_iter()
            .map(|x| i64::try_from(x).unwrap_or(i64::MAX));
        Ok(widen_all(data.collect(), a.shape))
    } else {
        Err(wrong_dtype(
            &src,
            &ts,
            "int32 (<i4) or int64 (<i8) indices",
            "convert with a.astype(np.int64)",
        ))
    }
}

/// Writes `data` to `file` as a C-ordered little-endian `.npy` array of shape `shape`, float32
/// for `f32`, float16 for `half::f16`; `path` names the output in errors.
pub fn write_npy<T: AutoSerialize + Copy>(
    file: File,
    path: &Path,
    data: &[T],
    shape: &[usize],
) -> CliResult<()> {
    let shown = path.display();
    let fail = |e: std::io::Error| CliError::new(format!("writing {shown} failed: {e}"));
    debug_assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "shape matches the data"
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn native(text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        native_byte_order(&mut bytes);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn byte_orders_numpy_reads_as_native_become_native() {
        let n = if cfg!(target_endian = "little") {
            '<'
        } else {
            '>'
        };
        for (given, want) in [
            ("=f4", format!("{n}f4")),
            ("|f2", format!("{n}f2")),
            ("=u1", format!("{n}u1")),
            ("=i8", format!("{n}i8")),
            ("|u1", "|u1".to_string()),
            ("|b1", "|b1".to_string()),
            ("|S3", "|S3".to_string()),
            ("<f4", "<f4".to_string()),
            (">f4", ">f4".to_string()),
        ] {
            let text = format!("{{'descr': '{given}', 'fortran_order': False, 'shape': (2,), }}");
            let got = native(&text);
            assert_eq!(got, text.replace(given, &want), "{given}");
            let ts = descr(&got).unwrap().parse::<TypeStr>();
            assert!(ts.is_ok(), "{given} → {got}: {ts:?}");
        }
        // Double quotes and spaces; a structured dtype is left alone.
        assert_eq!(
            native("{\"descr\" : \"=f4\"}"),
            format!("{{\"descr\" : \"{n}f4\"}}")
        );
        let list = "{'descr': [('a', '=f4')], }";
        assert_eq!(native(list), list);
    }
}
