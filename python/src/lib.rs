//! `xattn._xattn`: the extension module of the `xattn` Python package (python/xattn/ holds the
//! pure-Python part: PyTorch's call, layouts, masks, torch tensors).
//!
//! This layer is thin on purpose: it takes arrays in the library's own layout
//! (`[batch, seq, heads, d]`, C-contiguous) and the library's options, releases the GIL while the
//! device works, and turns every [`xattn::Error`] into a Python exception (`ValueError` for what
//! the caller got wrong, [`DeviceError`] for the device). A panic inside xattn comes back as a
//! `RuntimeError` naming it a bug, never an abort of the interpreter.
//!
//! Threads: [`xattn::Engine`] and [`xattn::Tensor`] are `Send + Sync` (the library's README and
//! the `assert_send_sync` below), so one engine serves any number of Python threads without a
//! lock of ours; the GIL is released around all device work.

use std::panic::AssertUnwindSafe;

use numpy::{PyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use xattn::{Alignment, Attention, DType, Stats};

mod layer;

create_exception!(
    _xattn,
    DeviceError,
    PyRuntimeError,
    "A device error from xattn: no adapter, a device that could not be opened or was lost, \
     a GPU validation or out-of-memory error, an invalid shader."
);

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<xattn::Engine>();
    assert_send_sync::<xattn::Tensor>();
};

/// The Python exception for an xattn error: `ValueError` for bad shapes, lengths, arguments,
/// unsupported options, limits and weights; [`DeviceError`] for the device.
fn to_py(e: xattn::Error) -> PyErr {
    use xattn::Error as E;
    let msg = e.to_string();
    match e {
        E::Shape(_)
        | E::Length { .. }
        | E::Argument(_)
        | E::Unsupported(_)
        | E::Limit { .. }
        | E::Weights(_) => PyValueError::new_err(msg),
        E::NoAdapter { .. }
        | E::RequestDevice { .. }
        | E::Gpu(_)
        | E::DeviceLost(_)
        | E::Shader { .. } => DeviceError::new_err(msg),
        // A variant added after this binding was written.
        _ => PyRuntimeError::new_err(msg),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs `work` without the GIL; its error becomes a Python exception and a panic a
/// `RuntimeError`.
fn detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> xattn::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(AssertUnwindSafe(work))) {
        Ok(result) => result.map_err(to_py),
        Err(payload) => Err(PyRuntimeError::new_err(format!(
            "xattn panicked (a bug in xattn, please report it): {}",
            panic_message(payload.as_ref())
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::Bf16 => "bfloat16",
    }
}

/// A tensor read back from the device.
enum Host {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    /// bfloat16 as its bits (NumPy has no bfloat16; the package passes torch's as uint16).
    Bf16(Vec<half::bf16>),
}

/// The elements of a C-contiguous array.
fn as_slice<'a, T: numpy::Element>(
    a: &'a PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

fn contiguous<T: numpy::Element + Clone>(
    a: &PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<Vec<T>> {
    as_slice(a, name).map(<[T]>::to_vec)
}

/// A float32 or float16 array, or (with `bf16`) uint16 bfloat16 bits, uploaded to `ctx`'s
/// device straight from the array's buffer: no host copy (NumPy views of torch tensors
/// included), bfloat16 bits converted once. The GIL stays held meanwhile, so no Python thread
/// changes the array while it is read.
fn upload_host(
    ctx: &xattn::Context,
    obj: &Bound<'_, PyAny>,
    bf16: bool,
    name: &str,
) -> PyResult<xattn::Tensor> {
    let uploaded = if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        let a = a.readonly();
        xattn::Tensor::upload(ctx, "input", as_slice(&a, name)?, a.shape())
    } else if let Ok(a) = obj.cast::<PyArrayDyn<half::f16>>() {
        let a = a.readonly();
        xattn::Tensor::upload_f16(ctx, "input", as_slice(&a, name)?, a.shape())
    } else if let (true, Ok(a)) = (bf16, obj.cast::<PyArrayDyn<u16>>()) {
        let a = a.readonly();
        let data: Vec<half::bf16> = as_slice(&a, name)?
            .iter()
            .map(|&bits| half::bf16::from_bits(bits))
            .collect();
        xattn::Tensor::upload_bf16(ctx, "input", &data, a.shape())
    } else {
        let what = match obj.getattr("dtype") {
            Ok(d) => format!("an array of dtype {d}"),
            Err(_) => format!("a {}", obj.get_type().name()?),
        };
        let bits = if bf16 {
            " (or uint16 bfloat16 bits)"
        } else {
            ""
        };
        return Err(PyValueError::new_err(format!(
            "{name} must be a float32 or float16 numpy array{bits} or an xattn device tensor; \
             got {what}"
        )));
    };
    uploaded.map_err(to_py)
}

fn download(t: &xattn::Tensor) -> xattn::Result<Host> {
    Ok(match t.dtype() {
        DType::F32 => Host::F32(t.to_host()?),
        DType::F16 => Host::F16(t.to_host_f16()?),
        DType::Bf16 => Host::Bf16(t.to_host_bf16()?),
    })
}

/// A NumPy array of `host` with `dims`; bfloat16 as uint16 bits.
fn to_numpy<'py>(py: Python<'py>, host: Host, dims: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(match host {
        Host::F32(d) => PyArray::from_vec(py, d).reshape(dims)?.into_any(),
        Host::F16(d) => PyArray::from_vec(py, d).reshape(dims)?.into_any(),
        Host::Bf16(d) => {
            let bits: Vec<u16> = d.into_iter().map(half::bf16::to_bits).collect();
            PyArray::from_vec(py, bits).reshape(dims)?.into_any()
        }
    })
}

/// A tensor read back with its dims, where there is one.
fn download_some(t: Option<&xattn::Tensor>) -> xattn::Result<Option<(Host, Vec<usize>)>> {
    t.map(|t| Ok((download(t)?, t.dims().to_vec()))).transpose()
}

/// [`to_numpy`] of a tensor read back, or None.
fn numpy_or_none<'py>(
    py: Python<'py>,
    t: Option<(Host, Vec<usize>)>,
) -> PyResult<Bound<'py, PyAny>> {
    match t {
        Some((host, dims)) => to_numpy(py, host, &dims),
        None => Ok(py.None().into_bound(py)),
    }
}

fn f32_numpy<'py>(py: Python<'py>, data: Vec<f32>, dims: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray::from_vec(py, data).reshape(dims)?.into_any())
}

/// A tensor kept on the device, in the library's layout (`[batch, seq, heads, d]` for attention
/// inputs), of float32, float16 or bfloat16.
#[pyclass(frozen, module = "xattn._xattn")]
struct DeviceTensor {
    inner: xattn::Tensor,
}

#[pymethods]
impl DeviceTensor {
    /// The dims, as uploaded.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.inner.dims().to_vec()
    }

    /// `float32`, `float16` or `bfloat16`.
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.inner.dtype())
    }

    /// Reads the tensor back: float32 or float16 arrays; bfloat16 as uint16 bits.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = self.inner.clone();
        let host = detached(py, move || download(&t))?;
        to_numpy(py, host, self.inner.dims())
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceTensor(shape={:?}, dtype={})",
            self.inner.dims(),
            dtype_name(self.inner.dtype())
        )
    }
}

/// An input on `ctx`'s device: a device tensor as it is, a host array uploaded
/// ([`upload_host`]).
fn read_input(
    obj: &Bound<'_, PyAny>,
    bf16: bool,
    name: &str,
    ctx: &xattn::Context,
) -> PyResult<xattn::Tensor> {
    match obj.cast::<DeviceTensor>() {
        Ok(t) => Ok(t.get().inner.clone()),
        Err(_) => upload_host(ctx, obj, bf16, name),
    }
}

fn alignment(name: &str, value: &str) -> PyResult<Alignment> {
    value.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be 'top-left' or 'bottom-right', got {value:?}"
        ))
    })
}

/// Options of one call as the package passes them.
struct Options {
    opts: Attention,
    want_lse: bool,
    want_weights: bool,
    want_stats: bool,
}

#[allow(clippy::too_many_arguments)]
fn options(
    scale: Option<f64>,
    causal: Option<&str>,
    window: Option<(usize, usize)>,
    window_align: Option<&str>,
    (q_lens, kv_lens): (Option<Vec<u32>>, Option<Vec<u32>>),
    (mask, bias): (
        Option<PyReadonlyArrayDyn<'_, bool>>,
        Option<PyReadonlyArrayDyn<'_, f32>>,
    ),
    softcap: Option<f64>,
    key_segments: Option<Vec<(usize, usize, f64)>>,
    dropout: Option<(f64, u64, u64)>,
    (want_lse, want_weights, want_stats): (bool, bool, bool),
) -> PyResult<Options> {
    let mut opts = Attention::default();
    if let Some(s) = scale {
        if !s.is_finite() {
            return Err(PyValueError::new_err(format!(
                "scale must be finite, got {s}"
            )));
        }
        opts = opts.with_scale(s as f32);
    }
    let causal = causal.map(|c| alignment("causal", c)).transpose()?;
    if let Some(a) = causal {
        opts = opts.with_causal(a);
    }
    if let Some((left, right)) = window {
        let align = match (
            window_align
                .map(|a| alignment("window_align", a))
                .transpose()?,
            causal,
        ) {
            (Some(w), Some(c)) if w != c => {
                return Err(PyValueError::new_err(format!(
                    "window_align {:?} differs from causal {:?}: a window and the causal mask \
                     share one diagonal",
                    w.name(),
                    c.name()
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(PyValueError::new_err(
                    "window needs an alignment of its diagonal: pass window_align='top-left' \
                     or 'bottom-right' (or causal=...)",
                ))
            }
        };
        opts = opts.with_window(align, left, right);
    } else if window_align.is_some() {
        return Err(PyValueError::new_err("window_align given without a window"));
    }
    if let Some(l) = q_lens {
        opts = opts.with_q_lens(l);
    }
    if let Some(l) = kv_lens {
        opts = opts.with_kv_lens(l);
    }
    if let Some(m) = mask {
        let dims = dims4_of(m.shape(), "mask")?;
        opts = opts.with_mask(dims, contiguous(&m, "mask")?);
    }
    if let Some(b) = bias {
        let dims = dims4_of(b.shape(), "bias")?;
        opts = opts.with_bias(dims, contiguous(&b, "bias")?);
    }
    if let Some(c) = softcap {
        opts = opts.with_softcap(c as f32);
    }
    for (start, end, factor) in key_segments.unwrap_or_default() {
        opts = opts.with_key_segment(start, end, factor as f32);
    }
    if let Some((p, seed, offset)) = dropout {
        opts = opts.with_dropout(p as f32, seed, offset);
    }
    if want_weights {
        opts = opts.with_weights();
    }
    if want_stats {
        opts = opts.with_stats(Stats::ALL);
    }
    Ok(Options {
        opts,
        want_lse,
        want_weights,
        want_stats,
    })
}

fn dims4_of(shape: &[usize], name: &str) -> PyResult<[usize; 4]> {
    shape.try_into().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must have 4 dims [batch|1, heads|1, M|1, N], got {shape:?}"
        ))
    })
}

/// One call's results on the host.
struct Results {
    o: (Host, Vec<usize>),
    lse: Option<(Vec<f32>, Vec<usize>)>,
    weights: Option<(Vec<f32>, Vec<usize>)>,
    stats: Option<[(Vec<f32>, Vec<usize>); 3]>,
}

fn f32_out(t: &xattn::Tensor) -> xattn::Result<(Vec<f32>, Vec<usize>)> {
    Ok((t.to_host()?, t.dims().to_vec()))
}

/// xattn on one device: the pipeline cache, the planner and a buffer pool.
#[pyclass(frozen, module = "xattn._xattn")]
struct Engine {
    inner: xattn::Engine,
}

#[pymethods]
impl Engine {
    /// The default adapter (`None`: `WGPU_ADAPTER_NAME`/`WGPU_BACKEND` respected), the adapter
    /// at this index of `adapters()`, or the first whose name contains this string
    /// (case-insensitive).
    #[new]
    #[pyo3(signature = (adapter=None))]
    fn new(py: Python<'_>, adapter: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        enum Pick {
            Default,
            Index(usize),
            Name(String),
        }
        let pick = match adapter {
            None => Pick::Default,
            Some(a) => {
                if let Ok(i) = a.extract::<usize>() {
                    Pick::Index(i)
                } else if let Ok(s) = a.extract::<String>() {
                    Pick::Name(s)
                } else {
                    return Err(PyValueError::new_err(format!(
                        "adapter must be None, an index into xattn.adapters() or a name \
                         substring; got {}",
                        a.repr()?
                    )));
                }
            }
        };
        let ctx = detached(py, move || match pick {
            Pick::Default => xattn::Context::new(),
            Pick::Index(i) => {
                let list = xattn::device::adapters();
                let n = list.len();
                let a = list.get(i).ok_or_else(|| {
                    xattn::Error::Argument(format!(
                        "adapter index {i} is out of range: {n} adapter(s) (xattn.adapters())"
                    ))
                })?;
                xattn::Context::from_adapter(a)
            }
            Pick::Name(want) => {
                let lc = want.to_lowercase();
                let list = xattn::device::adapters();
                let a = list
                    .iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&lc))
                    .ok_or_else(|| xattn::Error::NoAdapter {
                        detail: format!(" whose name contains {want:?}"),
                    })?;
                xattn::Context::from_adapter(a)
            }
        })?;
        Ok(Self {
            inner: xattn::Engine::new(&ctx),
        })
    }

    /// The adapter this engine runs on (name, backend, device type, driver).
    #[getter]
    fn adapter<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        info_dict(py, &self.inner.context().info)
    }

    /// Uploads a float32/float16 array (uint16 bfloat16 bits with `bf16=True`) as it is.
    #[pyo3(signature = (array, bf16=false))]
    fn upload(&self, array: &Bound<'_, PyAny>, bf16: bool) -> PyResult<DeviceTensor> {
        let inner = upload_host(self.inner.context(), array, bf16, "array")?;
        Ok(DeviceTensor { inner })
    }

    /// Attention in the library's layout: q `[B, M, Hq, d_k]`, k `[B, N, Hkv, d_k]`, v
    /// `[B, N, Hkv, d_v]` (device tensors or C-contiguous arrays); returns
    /// `(o [B, M, Hq, d_v], lse [B, Hq, M] or None, weights [B, Hq, M, N] or None,
    /// (entropy, focus, coverage) or None)` as NumPy arrays.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (q, k, v, *, bf16=false, scale=None, causal=None, window=None,
        window_align=None, q_lens=None, kv_lens=None, mask=None, bias=None, softcap=None,
        key_segments=None, dropout=None, return_lse=false, return_weights=false,
        return_stats=false))]
    fn attention<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        bf16: bool,
        scale: Option<f64>,
        causal: Option<&str>,
        window: Option<(usize, usize)>,
        window_align: Option<&str>,
        q_lens: Option<Vec<u32>>,
        kv_lens: Option<Vec<u32>>,
        mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        bias: Option<PyReadonlyArrayDyn<'py, f32>>,
        softcap: Option<f64>,
        key_segments: Option<Vec<(usize, usize, f64)>>,
        dropout: Option<(f64, u64, u64)>,
        return_lse: bool,
        return_weights: bool,
        return_stats: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.inner.context();
        let tensors = [
            read_input(q, bf16, "q", ctx)?,
            read_input(k, bf16, "k", ctx)?,
            read_input(v, bf16, "v", ctx)?,
        ];
        let o = options(
            scale,
            causal,
            window,
            window_align,
            (q_lens, kv_lens),
            (mask, bias),
            softcap,
            key_segments,
            dropout,
            (return_lse, return_weights, return_stats),
        )?;
        let engine = self.inner.clone();
        let results = detached(py, move || {
            let out = engine.attention(&tensors[0], &tensors[1], &tensors[2], &o.opts)?;
            let stats = if o.want_stats {
                let s = &out.stats;
                let get = |t: &Option<xattn::Tensor>| {
                    f32_out(t.as_ref().expect("statistics were requested"))
                };
                Some([get(&s.entropy)?, get(&s.focus)?, get(&s.coverage)?])
            } else {
                None
            };
            Ok(Results {
                o: (download(&out.o)?, out.o.dims().to_vec()),
                lse: o.want_lse.then(|| f32_out(&out.lse)).transpose()?,
                weights: if o.want_weights {
                    Some(f32_out(
                        out.weights.as_ref().expect("weights were requested"),
                    )?)
                } else {
                    None
                },
                stats,
            })
        })?;
        let f32_opt = |x: Option<(Vec<f32>, Vec<usize>)>| -> PyResult<Bound<'py, PyAny>> {
            match x {
                Some((d, dims)) => f32_numpy(py, d, &dims),
                None => Ok(py.None().into_bound(py)),
            }
        };
        let stats = match results.stats {
            Some([e, f, c]) => {
                let items = [f32_opt(Some(e))?, f32_opt(Some(f))?, f32_opt(Some(c))?];
                pyo3::types::PyTuple::new(py, items)?.into_any()
            }
            None => py.None().into_bound(py),
        };
        let (host, dims) = results.o;
        let items = [
            to_numpy(py, host, &dims)?,
            f32_opt(results.lse)?,
            f32_opt(results.weights)?,
            stats,
        ];
        Ok(pyo3::types::PyTuple::new(py, items)?.into_any())
    }

    /// The gradients of one attention call, FlashAttention-2's backward: q, k, v, the
    /// forward's o (their dtype) and lse (float32 `[B, Hq, M]`), and d_o (o's dtype), in the
    /// library's layout, with the forward's options (a dropout's seed included). Returns
    /// `(dq, dk, dv, dbias)` as NumPy arrays in q's dtype (bfloat16 as uint16 bits); dbias
    /// (float32, the bias's dims) with `bias_grad`, else None.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (q, k, v, o, lse, d_o, *, bf16=false, scale=None, causal=None,
        window=None, window_align=None, q_lens=None, kv_lens=None, mask=None, bias=None,
        softcap=None, key_segments=None, dropout=None, bias_grad=false))]
    fn attention_backward<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        o: &Bound<'py, PyAny>,
        lse: &Bound<'py, PyAny>,
        d_o: &Bound<'py, PyAny>,
        bf16: bool,
        scale: Option<f64>,
        causal: Option<&str>,
        window: Option<(usize, usize)>,
        window_align: Option<&str>,
        q_lens: Option<Vec<u32>>,
        kv_lens: Option<Vec<u32>>,
        mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        bias: Option<PyReadonlyArrayDyn<'py, f32>>,
        softcap: Option<f64>,
        key_segments: Option<Vec<(usize, usize, f64)>>,
        dropout: Option<(f64, u64, u64)>,
        bias_grad: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.inner.context();
        let t = [
            read_input(q, bf16, "q", ctx)?,
            read_input(k, bf16, "k", ctx)?,
            read_input(v, bf16, "v", ctx)?,
            read_input(o, bf16, "o", ctx)?,
            read_input(lse, false, "lse", ctx)?,
            read_input(d_o, bf16, "d_o", ctx)?,
        ];
        let mut o = options(
            scale,
            causal,
            window,
            window_align,
            (q_lens, kv_lens),
            (mask, bias),
            softcap,
            key_segments,
            dropout,
            (false, false, false),
        )?;
        if bias_grad {
            o.opts = o.opts.with_bias_grad();
        }
        let engine = self.inner.clone();
        let grads = detached(py, move || {
            let g =
                engine.attention_backward((&t[0], &t[1], &t[2]), (&t[3], &t[4]), &t[5], &o.opts)?;
            [Some(&g.dq), Some(&g.dk), Some(&g.dv), g.dbias.as_ref()]
                .map(download_some)
                .into_iter()
                .collect::<xattn::Result<Vec<_>>>()
        })?;
        let mut items = Vec::with_capacity(4);
        for grad in grads {
            items.push(numpy_or_none(py, grad)?);
        }
        Ok(pyo3::types::PyTuple::new(py, items)?.into_any())
    }

    fn __repr__(&self) -> String {
        format!("Engine({})", self.inner.context().describe())
    }
}

fn info_dict<'py>(py: Python<'py>, info: &wgpu::AdapterInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &info.name)?;
    d.set_item("backend", format!("{:?}", info.backend))?;
    d.set_item("device_type", format!("{:?}", info.device_type))?;
    d.set_item("driver", &info.driver)?;
    d.set_item("driver_info", &info.driver_info)?;
    d.set_item("vendor", info.vendor)?;
    d.set_item("device", info.device)?;
    Ok(d)
}

/// Every adapter wgpu can see (on the backends `WGPU_BACKEND` allows), in `xattn info`'s order:
/// a list of dicts with name, backend, device_type, driver, driver_info, vendor, device.
#[pyfunction]
fn adapters(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let infos = detached(py, || {
        Ok(xattn::device::adapters()
            .iter()
            .map(|a| a.get_info())
            .collect::<Vec<_>>())
    })?;
    let list = PyList::empty(py);
    for (i, info) in infos.iter().enumerate() {
        let d = info_dict(py, info)?;
        d.set_item("index", i)?;
        list.append(d)?;
    }
    Ok(list)
}

/// A PNG picture of a 2-D map of weights (rows = queries, columns = keys), pooled first to at
/// most `max_side` values a side (`pool`: "max" or "mean") where larger: xattn's heatmap
/// (viridis, a legend, optional labels and caption). Returns the PNG file's bytes.
#[pyfunction]
#[pyo3(signature = (values, *, q_labels=None, k_labels=None, caption=None, range=None,
    max_side=xattn::heatmap::MAX_SIDE, pool="max"))]
#[allow(clippy::too_many_arguments)]
fn heatmap_png<'py>(
    py: Python<'py>,
    values: PyReadonlyArrayDyn<'py, f32>,
    q_labels: Option<Vec<String>>,
    k_labels: Option<Vec<String>>,
    caption: Option<String>,
    range: Option<(f32, f32)>,
    max_side: usize,
    pool: &str,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let [rows, cols]: [usize; 2] = values.shape().try_into().map_err(|_| {
        PyValueError::new_err(format!(
            "a heatmap takes a 2-D map [M, N], got shape {:?}",
            values.shape()
        ))
    })?;
    let op = match pool {
        "max" => xattn::heatmap::PoolOp::Max,
        "mean" => xattn::heatmap::PoolOp::Mean,
        other => {
            return Err(PyValueError::new_err(format!(
                "pool must be 'max' or 'mean', got {other:?}"
            )))
        }
    };
    let data = contiguous(&values, "values")?;
    let png = detached(py, move || {
        let (pooled, r, c) = xattn::heatmap::pool_host(&data, rows, cols, max_side, op)?;
        let pooled_labels = (r, c) != (rows, cols);
        let style = xattn::heatmap::HeatmapStyle {
            // Labels name single tokens: they are dropped where blocks were pooled.
            q_labels: q_labels.filter(|_| r == rows),
            k_labels: k_labels.filter(|_| c == cols),
            caption: caption.or_else(|| {
                pooled_labels
                    .then(|| format!("{}-pooled {rows}x{cols} map, {r}x{c} blocks", op.name()))
            }),
            range,
        };
        xattn::heatmap::render_png(&pooled, r, c, &style)
    })?;
    Ok(pyo3::types::PyBytes::new(py, &png))
}

/// For the tests: a panic inside the device section comes back as a RuntimeError.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> xattn::Result<()> {
        panic!("a test of the panic guard")
    })
}

#[pymodule]
fn _xattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DeviceError", m.py().get_type::<DeviceError>())?;
    m.add_class::<Engine>()?;
    m.add_class::<DeviceTensor>()?;
    m.add_class::<layer::Layer>()?;
    m.add_function(wrap_pyfunction!(adapters, m)?)?;
    m.add_function(wrap_pyfunction!(heatmap_png, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
