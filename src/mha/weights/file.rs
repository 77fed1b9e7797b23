//! Reading a layer's weights from a safetensors file (the `safetensors` feature).

use std::fmt;

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::{MhaWeights, Names};
use crate::error::{Error, Result};
use crate::mha::MhaConfig;

/// Where one weight or bias lives in the file: tensor `name`, or block `i` of Q, K, V stacked
/// in its rows (PyTorch's `in_proj_weight` and `in_proj_bias`).
#[derive(Clone, Debug)]
struct Part {
    name: String,
    block: Option<usize>,
}

/// `[weight, bias]` of Q, K, V and O.
type Parts = [[Part; 2]; 4];

impl Names {
    /// The modules of Q, K, V, O for the families with one `Linear` each.
    fn modules(self) -> Option<[&'static str; 4]> {
        match self {
            Names::PyTorch => None,
            Names::HuggingFace => Some(["q_proj", "k_proj", "v_proj", "out_proj"]),
            Names::Diffusers => Some(["to_q", "to_k", "to_v", "to_out.0"]),
            Names::T5 => Some(["q", "k", "v", "o"]),
        }
    }

    /// Weight and bias of Q, K, V and O under `prefix`; `packed`: PyTorch's W^Q, W^K and W^V
    /// are blocks of `in_proj_weight` (its biases always are blocks of `in_proj_bias`).
    fn parts(self, prefix: &str, packed: bool) -> Parts {
        let one = |name: &str| Part {
            name: format!("{prefix}{name}"),
            block: None,
        };
        let block = |name: &str, i| Part {
            block: Some(i),
            ..one(name)
        };
        std::array::from_fn(|i| match (self.modules(), i) {
            (Some(m), _) => [
                one(&format!("{}.weight", m[i])),
                one(&format!("{}.bias", m[i])),
            ],
            (None, 3) => [one("out_proj.weight"), one("out_proj.bias")],
            (None, _) if packed => [block("in_proj_weight", i), block("in_proj_bias", i)],
            (None, _) => [
                one(&format!("{}_proj_weight", ["q", "k", "v"][i])),
                block("in_proj_bias", i),
            ],
        })
    }
}

/// The family's parts under `prefix` if the file holds its W^Q there.
fn present(names: Names, st: &SafeTensors, prefix: &str) -> Option<Parts> {
    [true, false]
        .map(|packed| names.parts(prefix, packed))
        .into_iter()
        .find(|parts| has(st, &parts[0][0].name))
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

/// Whether the file holds all four weights of `parts`.
fn complete(st: &SafeTensors, parts: &Parts) -> bool {
    parts.iter().all(|[w, _]| has(st, &w.name))
}

/// The first `max` of `items`, and how many more.
fn listed(items: &[String], max: usize) -> String {
    let shown = items[..max.min(items.len())].join(", ");
    match items.len().saturating_sub(max) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Where names with `prefix` lie, for messages.
fn at(prefix: &str) -> String {
    if prefix.is_empty() {
        "at the top level (no prefix)".into()
    } else {
        format!("under prefix `{prefix}`")
    }
}

/// `name` in backquotes.
fn quoted(name: &str) -> String {
    format!("`{name}`")
}

/// Edit distance between `a` and `b` (characters inserted, removed or replaced).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = std::mem::replace(&mut row[j + 1], next);
        }
    }
    row[b.len()]
}

/// Every prefix under which the file holds the four weights of a family, with the family.
fn layers(st: &SafeTensors) -> Vec<(String, Names)> {
    // The name of W^Q in each family, packed or not.
    let queries: Vec<(Names, bool, String)> = Names::ALL
        .into_iter()
        .flat_map(|n| {
            [true, false].map(|packed| (n, packed, n.parts("", packed)[0][0].name.clone()))
        })
        .collect();
    let mut found: Vec<(String, Names)> = Vec::new();
    for name in st.names() {
        for (family, packed, q) in &queries {
            let Some(prefix) = name.strip_suffix(q.as_str()) else {
                continue;
            };
            let layer = (prefix.is_empty() || prefix.ends_with('.'))
                && complete(st, &family.parts(prefix, *packed));
            if layer && !found.iter().any(|(p, f)| p == prefix && f == family) {
                found.push((prefix.to_string(), *family));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// What the file holds near `prefix`, for errors: the layers under it, else the tensors under
/// it, else the prefixes of the layers closest to it.
fn nearby(st: &SafeTensors, prefix: &str) -> String {
    let show = |layers: &[&(String, Names)]| {
        let items: Vec<String> = layers
            .iter()
            .map(|(p, f)| match p.as_str() {
                "" => format!("no prefix ({f})"),
                p => format!("`{p}` ({f})"),
            })
            .collect();
        listed(&items, 6)
    };
    let all = layers(st);
    let deeper: Vec<&(String, Names)> = all
        .iter()
        .filter(|(p, _)| p.len() > prefix.len() && p.starts_with(prefix))
        .collect();
    if !deeper.is_empty() {
        return format!("layers lie deeper, under prefix {}", show(&deeper));
    }
    let mut under: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(quoted)
        .collect();
    if !under.is_empty() {
        under.sort_unstable();
        return format!("the tensors {} are {}", at(prefix), listed(&under, 16));
    }
    let mut closest: Vec<&(String, Names)> = all.iter().collect();
    if closest.is_empty() {
        return format!(
            "the file's {} tensors hold no layer of any name family (pytorch, hf, diffusers, t5)",
            st.len()
        );
    }
    closest.sort_by_key(|(p, _)| distance(p, prefix));
    format!(
        "no tensor starts with `{prefix}`; the closest prefixes holding a layer are {}",
        show(&closest)
    )
}

/// The tensors of one layer in a safetensors file: its name family and where each projection's
/// weight and bias lie under the prefix.
pub struct LayerFile<'a> {
    st: SafeTensors<'a>,
    names: Names,
    parts: Parts,
}

impl fmt::Debug for LayerFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerFile")
            .field("names", &self.names)
            .field("parts", &self.parts)
            .finish()
    }
}

impl<'a> LayerFile<'a> {
    /// Finds the layer under `prefix` in safetensors `bytes`: in family `names`, or in the one
    /// family whose W^Q the file holds there (of several, the one whose four weights are all
    /// there). Errors when none or several are found, or when one of the four weights is
    /// missing; they list what the file holds near `prefix`.
    pub fn open(bytes: &'a [u8], prefix: &str, names: Option<Names>) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| parse_error(bytes, e))?;
        let mut found: Vec<(Names, Parts)> = Names::ALL
            .into_iter()
            .filter(|n| names.is_none_or(|x| x == *n))
            .filter_map(|n| Some((n, present(n, &st, prefix)?)))
            .collect();
        if found.len() > 1 && found.iter().filter(|(_, p)| complete(&st, p)).count() == 1 {
            found.retain(|(_, p)| complete(&st, p));
        }
        if found.len() > 1 {
            let which: Vec<String> = found
                .iter()
                .map(|(n, parts)| format!("{n} (`{}`)", parts[0][0].name))
                .collect();
            return Err(Error::Weights(format!(
                "the file holds the projections of {} {}: name the family to read",
                which.join(" and "),
                at(prefix)
            )));
        }
        let Some((names, parts)) = found.pop() else {
            let mut looked: Vec<String> = Names::ALL
                .into_iter()
                .filter(|n| names.is_none_or(|x| x == *n))
                .flat_map(|n| [true, false].map(|packed| quoted(&n.parts("", packed)[0][0].name)))
                .collect();
            looked.dedup();
            return Err(Error::Weights(format!(
                "no projection weights {}: none of {} is there; {}",
                at(prefix),
                listed(&looked, looked.len()),
                nearby(&st, prefix)
            )));
        };
        if let Some([w, _]) = parts.iter().find(|[w, _]| !has(&st, &w.name)) {
            return Err(Error::Weights(format!(
                "tensor `{}` is missing ({names} names); {}",
                w.name,
                nearby(&st, prefix)
            )));
        }
        let q = st.tensor(&parts[0][0].name).expect("present");
        if q.shape().len() != 2 {
            return Err(Error::Weights(format!(
                "tensor `{}` has shape {}; a projection weight is 2-D [out, in]",
                parts[0][0].name,
                shape_text(q.shape())
            )));
        }
        Ok(Self { st, names, parts })
    }

    /// The family the names belong to.
    pub fn names(&self) -> Names {
        self.names
    }

    /// The inner width (heads · head_dim) the file's W^Q gives: its rows, or its columns when
    /// it is PyTorch's packed `in_proj_weight` `[3E, E]`.
    pub fn inner_dim(&self) -> usize {
        let q = &self.parts[0][0];
        let t = self.st.tensor(&q.name).expect("checked in open");
        t.shape()[usize::from(q.block.is_some())]
    }

    /// Reads the four projections with the sizes of `c`, and each bias the file holds unless
    /// `c.bias` is false.
    pub fn weights(&self, c: &MhaConfig) -> Result<MhaWeights> {
        let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
        let wq = &self.parts[0][0];
        if wq.block.is_some() && (c.kdim != e || c.vdim != e || kv != inner) {
            return Err(Error::Weights(format!(
                "`{}` packs W^Q, W^K, W^V as [3E, E], which needs kdim = vdim = E and no GQA; \
                 the layer has E {e}, kdim {}, vdim {}, {} kv heads of {}",
                wq.name, c.kdim, c.vdim, c.kv_heads, c.num_heads
            )));
        }
        if self.inner_dim() != inner {
            return Err(Error::Weights(format!(
                "`{}` gives inner width {} (heads × head dim) but the layer has {inner}: set \
                 MhaConfig::with_inner_dim({})",
                wq.name,
                self.inner_dim(),
                self.inner_dim()
            )));
        }
        let rows = [inner, kv, kv, e];
        let cols = [e, c.kdim, c.vdim, inner];
        let read = |i: usize| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
            let [w, b] = &self.parts[i];
            let weight = self.read(w, &[rows[i], cols[i]], &rows)?;
            let bias = (c.bias && has(&self.st, &b.name))
                .then(|| self.read(b, &[rows[i]], &rows))
                .transpose()?;
            Ok((weight, bias))
        };
        let ((q, q_bias), (k, k_bias), (v, v_bias), (o, o_bias)) =
            (read(0)?, read(1)?, read(2)?, read(3)?);
        let w = MhaWeights {
            q,
            k,
            v,
            o,
            q_bias,
            k_bias,
            v_bias,
            o_bias,
        };
        w.check(c)?;
        Ok(w)
    }

    /// One part of shape `want`; a block of a packed tensor is rows of it, whose blocks have
    /// `rows[0..3]` rows.
    fn read(&self, part: &Part, want: &[usize], rows: &[usize; 4]) -> Result<Vec<f32>> {
        let Some(i) = part.block else {
            return load(&self.st, &part.name, want);
        };
        let mut whole = want.to_vec();
        whole[0] = rows[..3].iter().sum();
        let data = load(&self.st, &part.name, &whole)?;
        let row: usize = want[1..].iter().product();
        let start: usize = rows[..i].iter().sum();
        Ok(data[start * row..(start + rows[i]) * row].to_vec())
    }
}

impl MhaWeights {
    /// Reads the weights of `config` from safetensors `bytes` under `prefix`, in the name
    /// family found there ([`LayerFile`]).
    pub fn from_safetensors(bytes: &[u8], prefix: &str, c: &MhaConfig) -> Result<Self> {
        LayerFile::open(bytes, prefix, None)?.weights(c)
    }
}
