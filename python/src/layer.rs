//! `xattn._xattn.Layer`: the library's multi-head attention layer ([`MultiHeadAttention`]) with
//! its weights on the device. The package's `xattn.MultiheadAttention` builds it from a torch
//! module, a Hugging Face or diffusers attention module, or a safetensors file, and mirrors
//! `nn.MultiheadAttention.forward` on top of it.

use std::sync::RwLock;

use numpy::PyReadonlyArrayDyn;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use xattn::mha::weights::{LayerFile, Names};
use xattn::mha::MhaWeights;
use xattn::{DType, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights};

use crate::{
    contiguous, detached, download, download_some, dtype_name, f32_numpy, numpy_or_none, options,
    read_input, to_numpy, Engine,
};

/// W^Q, W^K, W^V, W^O as the package passes them (float32, PyTorch `Linear` layout).
type FourWeights<'py> = [PyReadonlyArrayDyn<'py, f32>; 4];
/// Their biases, where the layer has them.
type FourBiases<'py> = [Option<PyReadonlyArrayDyn<'py, f32>>; 4];

fn host_weights(weights: FourWeights<'_>, biases: FourBiases<'_>) -> PyResult<MhaWeights> {
    let names = ["q", "k", "v", "o"];
    let mut w = Vec::with_capacity(4);
    for (a, name) in weights.iter().zip(names) {
        w.push(contiguous(a, &format!("W_{name}"))?);
    }
    let mut b = Vec::with_capacity(4);
    for (a, name) in biases.iter().zip(names) {
        b.push(
            a.as_ref()
                .map(|a| contiguous(a, &format!("b_{name}")))
                .transpose()?,
        );
    }
    let [q, k, v, o]: [Vec<f32>; 4] = w.try_into().expect("four weights");
    let [q_bias, k_bias, v_bias, o_bias]: [Option<Vec<f32>>; 4] =
        b.try_into().expect("four biases");
    Ok(MhaWeights {
        q,
        k,
        v,
        o,
        q_bias,
        k_bias,
        v_bias,
        o_bias,
    })
}

fn weight_dtype(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::Bf16),
        other => Err(PyValueError::new_err(format!(
            "dtype must be 'float32', 'float16' or 'bfloat16', got {other:?}"
        ))),
    }
}

fn need_weights(need: &str) -> PyResult<NeedWeights> {
    match need {
        "none" => Ok(NeedWeights::None),
        "averaged" => Ok(NeedWeights::Averaged),
        "per_head" => Ok(NeedWeights::PerHead),
        other => Err(PyValueError::new_err(format!(
            "need_weights must be 'none', 'averaged' or 'per_head', got {other:?}"
        ))),
    }
}

/// A multi-head attention layer on one engine's device.
#[pyclass(frozen, module = "xattn._xattn")]
pub(crate) struct Layer {
    /// Written by `set_weights` (a training step's update), read by every call.
    inner: RwLock<MultiHeadAttention>,
    /// The engine the layer's weights live on (its calls upload their inputs there).
    engine: xattn::Engine,
    /// The name family its weights were read in, for a layer from a file.
    names: Option<Names>,
}

impl Layer {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, MultiHeadAttention> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn config(
    embed_dim: usize,
    num_heads: usize,
    kv_heads: Option<usize>,
    kdim: Option<usize>,
    vdim: Option<usize>,
    inner_dim: Option<usize>,
    bias: bool,
) -> MhaConfig {
    MhaConfig::new(embed_dim, num_heads)
        .with_kv_heads(kv_heads.unwrap_or(num_heads))
        .with_kdim(kdim.unwrap_or(embed_dim))
        .with_vdim(vdim.unwrap_or(embed_dim))
        .with_inner_dim(inner_dim.unwrap_or(embed_dim))
        .with_bias(bias)
}

/// The attention options of a layer call, as the package passes them: a dict with `scale`
/// (1/√head_dim when None), `causal` (None, 'top-left' or 'bottom-right'), bool `mask`
/// (True = may attend) and float `bias`, both `[B|1, H|1, M|1, N]`, and `dropout`
/// ((p, seed, offset) or None).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct CallOptions<'py> {
    scale: Option<f64>,
    causal: Option<String>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    dropout: Option<(f64, u64, u64)>,
}

impl CallOptions<'_> {
    /// The layer's options: these attention options and which weights.
    fn layer(self, need: NeedWeights) -> PyResult<MhaOptions> {
        let o = options(
            self.scale,
            self.causal.as_deref(),
            None,
            None,
            (None, None),
            (self.mask, self.bias),
            None,
            None,
            self.dropout,
            (false, false, false),
        )?;
        Ok(MhaOptions::default()
            .with_attention(o.opts)
            .with_need_weights(need))
    }
}

#[pymethods]
impl Layer {
    /// A layer of these sizes with these weights (float32 arrays in PyTorch `Linear` layout:
    /// W^Q `[inner, E]`, W^K `[kv, kdim]`, W^V `[kv, vdim]`, W^O `[E, inner]`), kept on the
    /// device in `dtype`.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (engine, embed_dim, num_heads, weights, biases, *, kv_heads=None,
        kdim=None, vdim=None, inner_dim=None, dtype="float32"))]
    fn new(
        py: Python<'_>,
        engine: &Engine,
        embed_dim: usize,
        num_heads: usize,
        weights: FourWeights<'_>,
        biases: FourBiases<'_>,
        kv_heads: Option<usize>,
        kdim: Option<usize>,
        vdim: Option<usize>,
        inner_dim: Option<usize>,
        dtype: &str,
    ) -> PyResult<Self> {
        let bias = biases.iter().any(Option::is_some);
        let c = config(embed_dim, num_heads, kv_heads, kdim, vdim, inner_dim, bias);
        let w = host_weights(weights, biases)?;
        let dtype = weight_dtype(dtype)?;
        let engine = engine.inner.clone();
        let inner = detached(py, || MultiHeadAttention::new_as(&engine, c, &w, dtype))?;
        Ok(Self {
            inner: RwLock::new(inner),
            engine,
            names: None,
        })
    }

    /// A layer read from a safetensors file: the projections under `prefix` in the name family
    /// `names` (`pytorch`, `hf`, `diffusers`, `t5`; found when None), the inner width from
    /// W^Q, biases where the file holds them (none with `bias=False`); `ignore` lists tensors
    /// under the prefix the layer may leave unread.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (engine, path, prefix, embed_dim, num_heads, *, kv_heads=None,
        kdim=None, vdim=None, bias=true, names=None, ignore=None, dtype="float32"))]
    fn from_safetensors(
        py: Python<'_>,
        engine: &Engine,
        path: std::path::PathBuf,
        prefix: &str,
        embed_dim: usize,
        num_heads: usize,
        kv_heads: Option<usize>,
        kdim: Option<usize>,
        vdim: Option<usize>,
        bias: bool,
        names: Option<&str>,
        ignore: Option<Vec<String>>,
        dtype: &str,
    ) -> PyResult<Self> {
        let names = names
            .map(|n| n.parse::<Names>().map_err(PyValueError::new_err))
            .transpose()?;
        let dtype = weight_dtype(dtype)?;
        let engine = engine.inner.clone();
        let prefix = prefix.to_string();
        let (inner, found) = detached(py, || {
            let bytes = std::fs::read(&path).map_err(|e| {
                xattn::Error::Weights(format!("cannot read {}: {e}", path.display()))
            })?;
            let mut file = LayerFile::open(&bytes, &prefix, names)?;
            file.ignore(&ignore.unwrap_or_default())?;
            let c = config(
                embed_dim,
                num_heads,
                kv_heads,
                kdim,
                vdim,
                Some(file.inner_dim()),
                bias,
            );
            let w = file.weights(&c)?;
            Ok((
                MultiHeadAttention::new_as(&engine, c, &w, dtype)?,
                file.names(),
            ))
        })?;
        Ok(Self {
            inner: RwLock::new(inner),
            engine,
            names: Some(found),
        })
    }

    /// The sizes: embed_dim, inner_dim, num_heads, kv_heads, kdim, vdim, head_dim, bias, and
    /// the weights' dtype and (for a layer from a file) name family.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let layer = self.read();
        let c = layer.config();
        let d = PyDict::new(py);
        d.set_item("embed_dim", c.embed_dim)?;
        d.set_item("inner_dim", c.inner_dim)?;
        d.set_item("num_heads", c.num_heads)?;
        d.set_item("kv_heads", c.kv_heads)?;
        d.set_item("kdim", c.kdim)?;
        d.set_item("vdim", c.vdim)?;
        d.set_item("head_dim", c.head_dim())?;
        d.set_item("bias", c.bias)?;
        d.set_item("dtype", dtype_name(layer.dtype()))?;
        d.set_item("names", self.names.map(Names::as_str))?;
        Ok(d)
    }

    /// Overwrites the weights in place (the sizes and the set of biases must be the layer's).
    fn set_weights(
        &self,
        py: Python<'_>,
        weights: FourWeights<'_>,
        biases: FourBiases<'_>,
    ) -> PyResult<()> {
        let w = host_weights(weights, biases)?;
        detached(py, || {
            self.inner
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .set_weights(&w)
        })
    }

    /// `forward(query [B, M, E], key [B, N, kdim], value [B, N, vdim])` with the attention's
    /// options `opts` ([`CallOptions`]) and `need_weights` ('none', 'averaged' or 'per_head').
    /// Returns `(out [B, M, E] in the inputs' dtype (bfloat16 as uint16 bits), weights float32
    /// or None)`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (query, key, value, opts, *, bf16=false, need_weights="none"))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        query: &Bound<'py, PyAny>,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
        opts: CallOptions<'py>,
        bf16: bool,
        need_weights: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let ctx = self.engine.context();
        let t = [
            read_input(query, bf16, "query", ctx)?,
            read_input(key, bf16, "key", ctx)?,
            read_input(value, bf16, "value", ctx)?,
        ];
        let opts = opts.layer(crate::layer::need_weights(need_weights)?)?;
        let (out, weights) = detached(py, || {
            let layer = self.read();
            let out = layer.forward(&t[0], &t[1], &t[2], &opts)?;
            let weights = out
                .weights
                .as_ref()
                .map(|w| Ok::<_, xattn::Error>((w.to_host()?, w.dims().to_vec())))
                .transpose()?;
            Ok(((download(&out.out)?, out.out.dims().to_vec()), weights))
        })?;
        let weights = match weights {
            Some((data, dims)) => f32_numpy(py, data, &dims)?,
            None => py.None().into_bound(py),
        };
        PyTuple::new(py, [to_numpy(py, out.0, &out.1)?, weights])
    }

    /// The gradients of `forward(query, key, value, opts)` for the output's gradient `d_out`
    /// (float32 `[B, M, E]`): `(d_query, d_key, d_value, (dW_q, dW_k, dW_v, dW_o), (db_q,
    /// db_k, db_v, db_o))`, float32 arrays (None for a bias the layer lacks).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (query, key, value, d_out, opts, *, bf16=false))]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        query: &Bound<'py, PyAny>,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
        d_out: &Bound<'py, PyAny>,
        opts: CallOptions<'py>,
        bf16: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let ctx = self.engine.context();
        let t = [
            read_input(query, bf16, "query", ctx)?,
            read_input(key, bf16, "key", ctx)?,
            read_input(value, bf16, "value", ctx)?,
            read_input(d_out, false, "d_out", ctx)?,
        ];
        let opts = opts.layer(NeedWeights::None)?;
        let grads: Vec<_> = detached(py, || {
            let layer = self.read();
            let g = layer.backward(&t[0], &t[1], &t[2], &t[3], &opts)?;
            let all = [Some(&g.d_query), Some(&g.d_key), Some(&g.d_value)]
                .into_iter()
                .chain(g.d_weights.iter().map(Option::as_ref))
                .chain(g.d_biases.iter().map(Option::as_ref));
            all.map(download_some).collect()
        })?;
        let mut items = Vec::with_capacity(grads.len());
        for g in grads {
            items.push(numpy_or_none(py, g)?);
        }
        let rest = items.split_off(3);
        let (weights, biases) = rest.split_at(4);
        items.push(PyTuple::new(py, weights)?.into_any());
        items.push(PyTuple::new(py, biases)?.into_any());
        PyTuple::new(py, items)
    }

    fn __repr__(&self) -> String {
        let layer = self.read();
        let c = layer.config();
        format!(
            "Layer(embed_dim={}, num_heads={}, kv_heads={}, kdim={}, vdim={}, inner_dim={}, \
             bias={}, dtype={})",
            c.embed_dim,
            c.num_heads,
            c.kv_heads,
            c.kdim,
            c.vdim,
            c.inner_dim,
            c.bias,
            dtype_name(layer.dtype())
        )
    }
}
