//! Element types: what a tensor stores, and how a kernel reads it.
//!
//! Tensors store f32, f16 or bf16 ([`DType`]); every kernel computes in f32. A kernel reads
//! half storage natively (`f16` in WGSL, where the device has `SHADER_F16`) or as two halves
//! packed in a `u32` (f16 by `unpack2x16float`, bf16 by shifts: no feature needed), chosen per
//! device ([`Storage`]). Half tensors are little-endian pairs: element `2j` is the low 16 bits
//! of word `j`. Kernels write f32; a half output is packed by the `cast` kernel.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`): f32's exponent, 8 bits of mantissa.
    Bf16,
}

impl DType {
    /// Every element type.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Bytes `elems` elements occupy in a buffer: whole 32-bit words (bindings are).
    pub fn bytes(self, elems: usize) -> u64 {
        (elems as u64 * self.size()).next_multiple_of(4)
    }

    /// `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// `x` rounded to this type (to nearest, ties to even) and widened back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// `data` stored in this type: the buffer's bytes, padded to whole words.
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        let mut bytes: Vec<u8> = match self {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            DType::Bf16 => data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        bytes.resize(self.bytes(data.len()) as usize, 0);
        bytes
    }

    /// The first `elems` elements of bytes in this type, widened to f32.
    pub fn decode(self, bytes: &[u8], elems: usize) -> Vec<f32> {
        let halves = |f: fn([u8; 2]) -> f32| -> Vec<f32> {
            bytes
                .chunks_exact(2)
                .take(elems)
                .map(|b| f([b[0], b[1]]))
                .collect()
        };
        match self {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[..elems * 4]),
            DType::F16 => halves(|b| half::f16::from_le_bytes(b).to_f32()),
            DType::Bf16 => halves(|b| half::bf16::from_le_bytes(b).to_f32()),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| Error::Argument(format!("unknown dtype `{s}` (f32, f16 or bf16)")))
    }
}

/// How a kernel reads the elements of a tensor: a pipeline specialization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Storage {
    /// `array<f32>`.
    #[default]
    F32,
    /// `array<f16>` (WGSL `enable f16`; devices with `SHADER_F16`).
    F16,
    /// f16 pairs in `array<u32>`, unpacked by `unpack2x16float` (any device).
    PackedF16,
    /// bf16 pairs in `array<u32>`, widened by shifts (any device).
    PackedBf16,
}

impl Storage {
    /// How kernels read `dtype` on a device with (`native_f16`) or without `SHADER_F16`.
    pub fn of(dtype: DType, native_f16: bool) -> Self {
        match dtype {
            DType::F32 => Storage::F32,
            DType::F16 if native_f16 => Storage::F16,
            DType::F16 => Storage::PackedF16,
            DType::Bf16 => Storage::PackedBf16,
        }
    }

    /// The element type read.
    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 | Storage::PackedF16 => DType::F16,
            Storage::PackedBf16 => DType::Bf16,
        }
    }

    /// `f32`, `f16`, `f16-packed` or `bf16-packed` (labels, plans).
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::PackedF16 => "f16-packed",
            Storage::PackedBf16 => "bf16-packed",
        }
    }

    /// WGSL for reading arrays stored this way: `alias <ty> = …` (the element type the
    /// shader declares the arrays with), and for each array `fn load_<array>(i: u32) -> f32`
    /// and `fn load4_<array>(base: u32, d: u32, len: u32) -> vec4<f32>`: elements d..d + 4 of
    /// a row of `len` at `base`, zero past `len`.
    ///
    /// `wide` declares the arrays in units of four elements (`vec4<f32>`, `vec4<f16>`, or two
    /// u32 words of packed pairs), so `load4_` is one aligned vector load: only for rows whose
    /// length and start are multiples of four (head dims divisible by 4). Otherwise `load4_`
    /// is four element loads, written out: llvmpipe's loop cap counts every loop iteration
    /// (`gpu::kernels::LoopCost`); an element past the row reads its last one, in bounds.
    pub fn wgsl(self, ty: &str, arrays: &[&str], wide: bool) -> String {
        let elem = match (self, wide) {
            (Storage::F32, false) => "f32",
            (Storage::F32, true) => "vec4<f32>",
            (Storage::F16, false) => "f16",
            (Storage::F16, true) => "vec4<f16>",
            (Storage::PackedF16 | Storage::PackedBf16, false) => "u32",
            (Storage::PackedF16 | Storage::PackedBf16, true) => "vec2<u32>",
        };
        // Two elements (x: the even one) from one u32 word of pairs.
        let pair = |w: &str| match self {
            Storage::PackedBf16 => {
                format!("bitcast<vec2<f32>>(vec2<u32>({w} << 16u, {w} & 0xffff0000u))")
            }
            _ => format!("unpack2x16float({w})"),
        };
        let mut out = format!("alias {ty} = {elem};\n");
        for a in arrays {
            let (load, load4) = if wide {
                let word = format!("{a}[i >> 2u][(i >> 1u) & 1u]");
                let load = match self {
                    Storage::F32 => format!("return {a}[i >> 2u][i & 3u];"),
                    Storage::F16 => format!("return f32({a}[i >> 2u][i & 3u]);"),
                    _ => format!(
                        "let pair = {};\n    return select(pair.x, pair.y, (i & 1u) != 0u);",
                        pair(&word)
                    ),
                };
                let load4 = match self {
                    Storage::F32 => format!("return {a}[(base + d) >> 2u];"),
                    Storage::F16 => format!("return vec4<f32>({a}[(base + d) >> 2u]);"),
                    _ => format!(
                        "let w = {a}[(base + d) >> 2u];\n    return vec4<f32>({}, {});",
                        pair("w.x"),
                        pair("w.y")
                    ),
                };
                (load, load4)
            } else {
                let load = match self {
                    Storage::F32 => format!("return {a}[i];"),
                    Storage::F16 => format!("return f32({a}[i]);"),
                    _ => format!(
                        "let pair = {};\n    return select(pair.x, pair.y, (i & 1u) != 0u);",
                        pair(&format!("{a}[i >> 1u]"))
                    ),
                };
                let load4 = format!(
                    "let last = base + len - 1u;\n    \
                     let x = vec4<f32>(load_{a}(min(base + d, last)), load_{a}(min(base + d + 1u, last)),\n        \
                     load_{a}(min(base + d + 2u, last)), load_{a}(min(base + d + 3u, last)));\n    \
                     return select(vec4<f32>(0.0), x, vec4<u32>(d) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(len));"
                );
                (load, load4)
            };
            out.push_str(&format!("fn load_{a}(i: u32) -> f32 {{\n    {load}\n}}\n"));
            out.push_str(&format!(
                "fn load4_{a}(base: u32, d: u32, len: u32) -> vec4<f32> {{\n    {load4}\n}}\n"
            ));
        }
        out
    }

    /// Whether the shader needs `enable f16;`.
    pub fn needs_f16(self) -> bool {
        self == Storage::F16
    }
}
