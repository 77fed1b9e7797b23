//! Layer weights on the host, from slices or from safetensors files.
//!
//! Names read (after `prefix`), in this order of preference:
//! - PyTorch `nn.MultiheadAttention`, packed: `in_proj_weight` `[3E, E]` (rows: W^Q, W^K, W^V;
//!   only when `kdim = vdim = E`), `in_proj_bias` `[3E]`;
//! - PyTorch, separate: `q_proj_weight` `[E, E]`, `k_proj_weight` `[E, kdim]`,
//!   `v_proj_weight` `[E, vdim]`, `in_proj_bias` `[3E]`;
//! - Hugging Face: `q_proj.weight`, `k_proj.weight`, `v_proj.weight` with `.bias` each.
//!
//! and `out_proj.weight` `[E, E]`, `out_proj.bias` `[E]` in every case. With `bias = true`
//! PyTorch names must carry their biases; Hugging Face names may leave a projection without
//! one (Whisper's `k_proj` has none), which then adds nothing. With `bias = false` a bias in the
//! file is an error rather than silently dropped. Tensors may be f32, f16 or bf16 (widened to
//! f32). K and V projections output `kv_heads · head_dim` features.

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};
use crate::mha::MhaConfig;
use crate::plan::Proj;

/// The four projections in PyTorch `Linear` layout (`[out, in]`, row-major f32).
#[derive(Clone, Debug, PartialEq)]
pub struct MhaWeights {
    /// W^Q `[embed_dim, embed_dim]`.
    pub q: Vec<f32>,
    /// W^K `[kv_heads·head_dim, kdim]`.
    pub k: Vec<f32>,
    /// W^V `[kv_heads·head_dim, vdim]`.
    pub v: Vec<f32>,
    /// W^O `[embed_dim, embed_dim]`.
    pub o: Vec<f32>,
    /// b_q `[embed_dim]`.
    pub q_bias: Option<Vec<f32>>,
    /// b_k `[kv_heads·head_dim]`.
    pub k_bias: Option<Vec<f32>>,
    /// b_v `[kv_heads·head_dim]`.
    pub v_bias: Option<Vec<f32>>,
    /// b_o `[embed_dim]`.
    pub o_bias: Option<Vec<f32>>,
}

fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// One tensor of the file as f32, checked against `want`.
fn load(st: &SafeTensors, name: &str, want: &[usize]) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::Weights(format!("tensor `{name}` {} is missing", shape_text(want))))?;
    if t.shape() != want {
        return Err(Error::Weights(format!(
            "tensor `{name}` has shape {} but the layer needs {}",
            shape_text(t.shape()),
            shape_text(want)
        )));
    }
    let data = t.data();
    let out: Vec<f32> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Weights(format!(
                "tensor `{name}` has dtype {other:?}; f32, f16 and bf16 are supported"
            )))
        }
    };
    Ok(out)
}

/// The error for `bytes` that do not deserialize: "truncated", with the sizes, when the file
/// ends before the header or the tensors it declares do.
fn parse_error(bytes: &[u8], e: SafeTensorError) -> Error {
    // An 8-byte little-endian header length, the JSON header, then the tensors' data.
    let header_end = bytes
        .get(..8)
        .map(|n| (u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize).saturating_add(8));
    let need = match e {
        SafeTensorError::HeaderTooSmall => Some(8),
        SafeTensorError::InvalidHeaderLength => header_end,
        SafeTensorError::MetadataIncompleteBuffer => header_end.and_then(|end| {
            let header: serde_json::Value = serde_json::from_slice(bytes.get(8..end)?).ok()?;
            let data_end = header
                .as_object()?
                .values()
                .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0);
            Some(end.saturating_add(data_end as usize))
        }),
        _ => None,
    };
    match need {
        Some(need) if need > bytes.len() => Error::Weights(format!(
            "the safetensors file is truncated: it ends after {} bytes but needs {need}",
            bytes.len()
        )),
        _ => Error::Weights(format!("not a safetensors file: {e}")),
    }
}

/// `name` if the file has it (any shape), for telling naming schemes apart.
fn has(st: &SafeTensors, name: &str) -> bool {
    st.tensor(name).is_ok()
}

impl MhaWeights {
    /// Weight and bias of one projection.
    pub(crate) fn get(&self, proj: Proj) -> (&[f32], Option<&[f32]>) {
        let (w, b) = match proj {
            Proj::Q => (&self.q, &self.q_bias),
            Proj::K => (&self.k, &self.k_bias),
            Proj::V => (&self.v, &self.v_bias),
            Proj::O => (&self.o, &self.o_bias),
        };
        (w, b.as_deref())
    }

    /// Checks every length against `config`.
    pub fn check(&self, c: &MhaConfig) -> Result<()> {
        let e = c.embed_dim;
        let kv = c.kv_dim();
        for (name, proj, w_len, b_len) in [
            ("q", Proj::Q, e * e, e),
            ("k", Proj::K, kv * c.kdim, kv),
            ("v", Proj::V, kv * c.vdim, kv),
            ("o", Proj::O, e * e, e),
        ] {
            let (w, b) = self.get(proj);
            if w.len() != w_len {
                return Err(Error::Weights(format!(
                    "W_{name} has {} elements; the layer needs {w_len}",
                    w.len()
                )));
            }
            match b {
                Some(b) if !c.bias => {
                    return Err(Error::Weights(format!(
                        "b_{name} is given ({} elements) but the layer has bias = false",
                        b.len()
                    )))
                }
                Some(b) if b.len() != b_len => {
                    return Err(Error::Weights(format!(
                        "b_{name} has {} elements; the layer needs {b_len}",
                        b.len()
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads the weights of `config` from safetensors `bytes` under `prefix` (see the module
    /// docs for the names).
    pub fn from_safetensors(bytes: &[u8], prefix: &str, c: &MhaConfig) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| parse_error(bytes, e))?;
        let name = |n: &str| format!("{prefix}{n}");
        let (e, kv) = (c.embed_dim, c.kv_dim());
        let optional_bias = |n: &str, len: usize| -> Result<Option<Vec<f32>>> {
            let full = name(n);
            if !has(&st, &full) {
                return Ok(None);
            }
            load(&st, &full, &[len]).map(Some)
        };
        let bias_names: Vec<String> = [
            "in_proj_bias",
            "q_proj.bias",
            "k_proj.bias",
            "v_proj.bias",
            "out_proj.bias",
        ]
        .iter()
        .map(|n| name(n))
        .filter(|n| has(&st, n))
        .collect();
        if !c.bias && !bias_names.is_empty() {
            return Err(Error::Weights(format!(
                "the file has bias tensors {bias_names:?} but the layer has bias = false"
            )));
        }
        let mut w = if has(&st, &name("in_proj_weight")) {
            if c.kdim != e || c.vdim != e || c.kv_heads != c.num_heads {
                return Err(Error::Weights(format!(
                    "`{}` packs W^Q, W^K, W^V as [3E, E], which needs kdim = vdim = E and no \
                     GQA; the layer has E {e}, kdim {}, vdim {}, {} kv heads of {}",
                    name("in_proj_weight"),
                    c.kdim,
                    c.vdim,
                    c.kv_heads,
                    c.num_heads
                )));
            }
            let packed = load(&st, &name("in_proj_weight"), &[3 * e, e])?;
            let part = |i: usize| packed[i * e * e..(i + 1) * e * e].to_vec();
            Self::torch_split(part(0), part(1), part(2))
        } else if has(&st, &name("q_proj_weight")) {
            Self::torch_split(
                load(&st, &name("q_proj_weight"), &[e, e])?,
                load(&st, &name("k_proj_weight"), &[kv, c.kdim])?,
                load(&st, &name("v_proj_weight"), &[kv, c.vdim])?,
            )
        } else if has(&st, &name("q_proj.weight")) {
            let mut w = Self::torch_split(
                load(&st, &name("q_proj.weight"), &[e, e])?,
                load(&st, &name("k_proj.weight"), &[kv, c.kdim])?,
                load(&st, &name("v_proj.weight"), &[kv, c.vdim])?,
            );
            w.q_bias = optional_bias("q_proj.bias", e)?;
            w.k_bias = optional_bias("k_proj.bias", kv)?;
            w.v_bias = optional_bias("v_proj.bias", kv)?;
            w
        } else {
            let mut names: Vec<&str> = st.names();
            names.sort_unstable();
            names.truncate(12);
            return Err(Error::Weights(format!(
                "no projection weights under prefix `{prefix}`: looked for `{}`, `{}` and \
                 `{}`; the file has {names:?}{}",
                name("in_proj_weight"),
                name("q_proj_weight"),
                name("q_proj.weight"),
                if st.len() > 12 { " …" } else { "" }
            )));
        };
        let packed_bias = name("in_proj_bias");
        if has(&st, &packed_bias) {
            let b = load(&st, &packed_bias, &[e + 2 * kv])?;
            w.q_bias = Some(b[..e].to_vec());
            w.k_bias = Some(b[e..e + kv].to_vec());
            w.v_bias = Some(b[e + kv..].to_vec());
        } else if c.bias && !has(&st, &name("q_proj.weight")) {
            return Err(Error::Weights(format!(
                "tensor `{packed_bias}` [{}] is missing (the layer has bias = true)",
                e + 2 * kv
            )));
        }
        w.o = load(&st, &name("out_proj.weight"), &[e, e])?;
        w.o_bias = optional_bias("out_proj.bias", e)?;
        if c.bias && w.o_bias.is_none() && !has(&st, &name("q_proj.weight")) {
            return Err(Error::Weights(format!(
                "tensor `{}` [{e}] is missing (the layer has bias = true)",
                name("out_proj.bias")
            )));
        }
        w.check(c)?;
        Ok(w)
    }

    fn torch_split(q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> Self {
        Self {
            q,
            k,
            v,
            o: Vec::new(),
            q_bias: None,
            k_bias: None,
            v_bias: None,
            o_bias: None,
        }
    }
}
