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

/// A tensor under a layer's prefix that the layer does not read ([`LayerFile::unread`]): it
/// changes what the model computes, so a file holding one is refused unless it is ignored by
/// name ([`LayerFile::ignore`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unread {
    /// The tensor's name after the prefix.
    pub name: String,
    /// What it is in the model that saved it, where xattn knows.
    pub what: Option<&'static str>,
}

const ADD_BIAS_KV: &str = "nn.MultiheadAttention(add_bias_kv=True)'s learned key and value, \
     appended to the source after the projections; xattn does not implement add_bias_kv";
const PACKED_AND_SEPARATE: &str = "PyTorch's separate q_proj_weight/k_proj_weight/v_proj_weight \
     beside the packed in_proj_weight this layer reads: nn.MultiheadAttention saves one or the \
     other, so which the model used is unknown";
const DIFFUSERS_QK_NORM: &str = "diffusers qk_norm (RMSNorm/LayerNorm over each head's query and \
     key); xattn does not implement it";
const CROSS_NORM: &str = "diffusers cross_attention_norm (LayerNorm or GroupNorm of the source \
     before the key and value projections); xattn does not implement it";
const ADDED_KV: &str = "diffusers added_kv_proj_dim (a second, added sequence projected and \
     attended jointly, as in SD3 and Flux); xattn does not implement it";
const SPATIAL_NORM: &str = "diffusers spatial_norm (SpatialNorm of the query input); xattn does \
     not implement it";
const GROUP_NORM: &str = "diffusers group_norm (GroupNorm of the query input); xattn does not \
     implement it";
const PROCESSOR: &str = "an attention processor's own weights (e.g. IP-Adapter's to_k_ip and \
     to_v_ip: a second cross-attention); xattn does not implement it";
const HF_QK_NORM: &str = "a norm over each head's query and key (q_norm, k_norm, as in Qwen3 and \
     OLMo 2); xattn does not implement it";
const ROPE: &str = "rotary position embedding (RoPE) of the query and key; xattn does not \
     implement it";
const T5_RELATIVE_BIAS: &str = "T5's relative position bias (pass it as --bias, computed by the \
     model: T5Attention.compute_bias gives the [1, heads, M, N] logit bias; in the library \
     Attention::with_bias)";
const LORA: &str = "LoRA adapter weights (a low-rank update of a projection): merge them into \
     the projection's weight before saving";

/// Tensors that models keep beside a family's projections: (family, name after the prefix, or
/// a module when it ends in `.`, what it is).
const KNOWN: &[(Names, &str, &str)] = &[
    (Names::PyTorch, "bias_k", ADD_BIAS_KV),
    (Names::PyTorch, "bias_v", ADD_BIAS_KV),
    (Names::PyTorch, "q_proj_weight", PACKED_AND_SEPARATE),
    (Names::PyTorch, "k_proj_weight", PACKED_AND_SEPARATE),
    (Names::PyTorch, "v_proj_weight", PACKED_AND_SEPARATE),
    (Names::HuggingFace, "q_norm.", HF_QK_NORM),
    (Names::HuggingFace, "k_norm.", HF_QK_NORM),
    (Names::HuggingFace, "rotary_emb.", ROPE),
    (Names::Diffusers, "norm_q.", DIFFUSERS_QK_NORM),
    (Names::Diffusers, "norm_k.", DIFFUSERS_QK_NORM),
    (Names::Diffusers, "norm_cross.", CROSS_NORM),
    (Names::Diffusers, "norm_added_q.", ADDED_KV),
    (Names::Diffusers, "norm_added_k.", ADDED_KV),
    (Names::Diffusers, "add_q_proj.", ADDED_KV),
    (Names::Diffusers, "add_k_proj.", ADDED_KV),
    (Names::Diffusers, "add_v_proj.", ADDED_KV),
    (Names::Diffusers, "to_add_out.", ADDED_KV),
    (Names::Diffusers, "spatial_norm.", SPATIAL_NORM),
    (Names::Diffusers, "group_norm.", GROUP_NORM),
    (Names::Diffusers, "processor.", PROCESSOR),
    (Names::T5, "relative_attention_bias.", T5_RELATIVE_BIAS),
];

/// What the tensor `name` (after the prefix) is beside a layer of `family`, where known.
fn what_is(family: Names, name: &str) -> Option<&'static str> {
    if name.split('.').any(|part| part.starts_with("lora")) {
        return Some(LORA);
    }
    KNOWN
        .iter()
        .find(|(f, known, _)| {
            *f == family
                && match known.strip_suffix('.') {
                    Some(module) => name
                        .strip_prefix(module)
                        .is_some_and(|r| r.starts_with('.')),
                    None => name == *known,
                }
        })
        .map(|(_, _, what)| *what)
}

/// The tensors under `prefix` that the layer of `family` read through `parts` does not read.
/// Not counted: the tensors of other layers, as [`layers`] finds them — those under a deeper
/// prefix holding a layer, and the projections of another family complete at this prefix
/// (the caller named which to read).
fn unread(st: &SafeTensors, prefix: &str, family: Names, parts: &Parts) -> Vec<Unread> {
    let all = layers(st);
    let deeper: Vec<&str> = all
        .iter()
        .filter(|(p, _)| p.len() > prefix.len() && p.starts_with(prefix))
        .map(|(p, _)| p.as_str())
        .collect();
    let mut others: Vec<String> = all
        .iter()
        .filter(|(p, f)| p == prefix && *f != family)
        .filter_map(|(_, f)| present(*f, st, prefix))
        .flat_map(|parts| parts.into_iter().flatten().map(|part| part.name))
        .collect();
    others.extend(parts.iter().flatten().map(|part| part.name.clone()));
    let mut out: Vec<Unread> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .filter(|n| !others.iter().any(|o| o == *n))
        .filter(|n| !deeper.iter().any(|p| n.starts_with(p)))
        .map(|n| {
            let name = n[prefix.len()..].to_string();
            Unread {
                what: what_is(family, &name),
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The error for a layer whose prefix holds tensors it does not read: each named, grouped by
/// what it is, with how to load the layer without them.
fn unread_error(prefix: &str, family: Names, unread: &[Unread]) -> Error {
    let mut groups: Vec<(Option<&str>, Vec<String>)> = Vec::new();
    for u in unread {
        match groups.iter_mut().find(|(what, _)| *what == u.what) {
            Some((_, names)) => names.push(u.name.clone()),
            None => groups.push((u.what, vec![u.name.clone()])),
        }
    }
    // The known kinds first, in the file's order; the unknown ones last.
    groups.sort_by_key(|(what, _)| what.is_none());
    let described: Vec<String> = groups
        .iter()
        .map(|(what, names)| {
            let what = what.map_or_else(
                || format!("not part of a {family} layer as xattn knows it"),
                str::to_string,
            );
            format!("{}: {what}", listed(names, 16))
        })
        .collect();
    let names = match unread.len() {
        1..=16 => unread
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        _ => "NAME,...".to_string(),
    };
    Error::Weights(format!(
        "the {family} layer {} does not read {} of the tensors there, so its results would \
         differ from the model's wherever they take part: {}. To load the layer without them \
         anyway, name them to ignore (LayerFile::ignore; xattn mha --ignore-tensors {names})",
        at(prefix),
        unread.len(),
        described.join("; "),
    ))
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
///
/// Every other tensor under the prefix (not those of a layer deeper under it) must be read by
/// the layer or ignored by name: `bias_k`/`bias_v` (`add_bias_kv`), diffusers' `norm_q`,
/// `norm_k` (`qk_norm`) and `norm_cross` (`cross_attention_norm`), T5's
/// `relative_attention_bias` and any tensor xattn does not know change what the model
/// computes, so [`LayerFile::weights`] refuses a file holding them, naming each
/// ([`LayerFile::unread`]), until [`LayerFile::ignore`] names them:
///
/// ```no_run
/// # fn main() -> xattn::Result<()> {
/// use xattn::mha::weights::LayerFile;
/// let bytes = std::fs::read("model.safetensors").expect("read the file");
/// let mut file = LayerFile::open(&bytes, "encoder.block.0.layer.0.SelfAttention.", None)?;
/// file.ignore(&["relative_attention_bias.weight"])?; // given as the attention's bias instead
/// let config = xattn::MhaConfig::new(512, 8).with_bias(false);
/// let weights = file.weights(&config)?;
/// # Ok(()) }
/// ```
pub struct LayerFile<'a> {
    st: SafeTensors<'a>,
    prefix: String,
    names: Names,
    parts: Parts,
    /// Tensors under the prefix the layer does not read, not ignored.
    unread: Vec<Unread>,
    /// Those ignored by name.
    ignored: Vec<Unread>,
}

impl fmt::Debug for LayerFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerFile")
            .field("prefix", &self.prefix)
            .field("names", &self.names)
            .field("parts", &self.parts)
            .field("unread", &self.unread)
            .field("ignored", &self.ignored)
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
        let unread = unread(&st, prefix, names, &parts);
        Ok(Self {
            st,
            prefix: prefix.to_string(),
            names,
            parts,
            unread,
            ignored: Vec::new(),
        })
    }

    /// The tensors under the prefix that the layer does not read and that are not ignored
    /// (names after the prefix, with what each is where xattn knows): [`LayerFile::weights`]
    /// refuses the file while there are any. Tensors of layers deeper under the prefix, and
    /// the projections of another name family complete at the prefix, are not the layer's
    /// and not listed.
    pub fn unread(&self) -> &[Unread] {
        &self.unread
    }

    /// The error [`LayerFile::weights`] returns while the prefix holds tensors the layer does
    /// not read and that are not ignored: each named, with what it is, and how to ignore them.
    pub fn check_unread(&self) -> Result<()> {
        if self.unread.is_empty() {
            return Ok(());
        }
        Err(unread_error(&self.prefix, self.names, &self.unread))
    }

    /// The tensors [`LayerFile::ignore`] has set aside.
    pub fn ignored(&self) -> &[Unread] {
        &self.ignored
    }

    /// Loads the layer without the unread tensors `names` (each after the prefix, or in full),
    /// which then no longer stop [`LayerFile::weights`]: the layer computes without them, so
    /// its results differ from the model's wherever they took part. Each name must be one of
    /// [`LayerFile::unread`] (or already ignored); a name the file lacks, or a tensor the
    /// layer reads, is an error naming it, and nothing is ignored.
    pub fn ignore<S: AsRef<str>>(&mut self, names: &[S]) -> Result<()> {
        let mut take = Vec::new();
        for name in names.iter().map(AsRef::as_ref) {
            let rel = name.strip_prefix(self.prefix.as_str());
            let matches = |u: &Unread| u.name == name || Some(u.name.as_str()) == rel;
            if let Some(i) = self.unread.iter().position(matches) {
                take.push(i);
                continue;
            }
            if self.ignored.iter().any(matches) {
                continue;
            }
            return Err(self.ignore_error(name));
        }
        take.sort_unstable();
        take.dedup();
        for i in take.into_iter().rev() {
            let u = self.unread.remove(i);
            self.ignored.push(u);
        }
        self.ignored.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(())
    }

    /// Why `name` cannot be ignored.
    fn ignore_error(&self, name: &str) -> Error {
        let full = format!("{}{name}", self.prefix);
        let in_file = [name, full.as_str()].into_iter().find(|n| has(&self.st, n));
        let reads = self
            .parts
            .iter()
            .flatten()
            .any(|p| Some(p.name.as_str()) == in_file);
        let why = match in_file {
            None if self.prefix.is_empty() => format!("the file holds no tensor `{name}`"),
            None => format!("the file holds no tensor `{name}` nor `{full}`"),
            Some(n) if reads => format!("the layer reads `{n}`"),
            Some(n) => format!(
                "`{n}` is not one of the tensors the layer leaves unread {}",
                at(&self.prefix)
            ),
        };
        let left: Vec<String> = self.unread.iter().map(|u| quoted(&u.name)).collect();
        let left = if left.is_empty() {
            "none is left unread".to_string()
        } else {
            format!("those left unread are {}", listed(&left, 16))
        };
        Error::Weights(format!("cannot ignore `{name}`: {why}; {left}"))
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
    /// `c.bias` is false. Refused while the prefix holds tensors the layer does not read
    /// ([`LayerFile::unread`]), naming each and what it is.
    pub fn weights(&self, c: &MhaConfig) -> Result<MhaWeights> {
        self.check_unread()?;
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
