//! xattn from JavaScript: WebGPU cross-attention in the browser (wasm-bindgen).
//!
//! ```js
//! import init, * as xattn from "./pkg/xattn_web.js";
//! await init();                                   // loads the wasm module
//! const device = await xattn.open();              // adapter info: device.adapter
//! const dims = { batch: 1, m: 4, n: 77, heads: 8, dk: 64 };
//! const { o, lse, stats } = await device.attention(q, k, v, dims, { lse: true, stats: true });
//! ```
//!
//! Inputs are `Float32Array` (f32) or `Uint16Array` (f16 bits), in the library's layouts
//! (Q `[batch, M, heads, d_k]`, K `[batch, N, kv_heads, d_k]`, V `[batch, N, kv_heads, d_v]`).
//! Every call that reads the device returns a `Promise`; xattn's errors reject it with
//! xattn's message.

use std::rc::Rc;

use js_sys::{Array, Float32Array, Object, Promise, Reflect, Uint16Array, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;
use xattn::mha::weights::LayerFile;
use xattn::stats::Stats;
use xattn::{
    Alignment, Attention, AttnShape, Context, DType, Engine, MhaConfig, MhaOptions,
    MultiHeadAttention, NeedWeights, Path, Tensor,
};

/// An xattn error as the rejection JavaScript sees: an `Error` with xattn's message.
fn js_error(e: xattn::Error) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn argument(msg: String) -> JsValue {
    js_error(xattn::Error::Argument(msg))
}

/// `obj[name]`, `undefined` when `obj` is not an object.
fn field(obj: &JsValue, name: &str) -> JsValue {
    if !obj.is_object() {
        return JsValue::UNDEFINED;
    }
    Reflect::get(obj, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
}

fn present(v: &JsValue) -> bool {
    !v.is_undefined() && !v.is_null()
}

fn opt_f64(obj: &JsValue, name: &str) -> Result<Option<f64>, JsValue> {
    let v = field(obj, name);
    if !present(&v) {
        return Ok(None);
    }
    v.as_f64()
        .filter(|x| x.is_finite())
        .map(Some)
        .ok_or_else(|| argument(format!("`{name}` must be a finite number, got {v:?}")))
}

fn opt_usize(obj: &JsValue, name: &str) -> Result<Option<usize>, JsValue> {
    match opt_f64(obj, name)? {
        Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
        Some(x) => Err(argument(format!(
            "`{name}` must be a whole number ≥ 0, got {x}"
        ))),
        None => Ok(None),
    }
}

fn usize_of(obj: &JsValue, name: &str) -> Result<usize, JsValue> {
    opt_usize(obj, name)?.ok_or_else(|| argument(format!("`{name}` is required")))
}

fn flag(obj: &JsValue, name: &str) -> bool {
    field(obj, name).is_truthy()
}

fn opt_string(obj: &JsValue, name: &str) -> Result<Option<String>, JsValue> {
    let v = field(obj, name);
    if !present(&v) {
        return Ok(None);
    }
    v.as_string()
        .map(Some)
        .ok_or_else(|| argument(format!("`{name}` must be a string, got {v:?}")))
}

/// A list of whole numbers (an `Array` or typed array).
fn opt_u32s(obj: &JsValue, name: &str) -> Result<Option<Vec<u32>>, JsValue> {
    let v = field(obj, name);
    if !present(&v) {
        return Ok(None);
    }
    Array::from(&v)
        .iter()
        .map(|x| {
            x.as_f64()
                .filter(|x| *x >= 0.0 && x.fract() == 0.0 && *x <= f64::from(u32::MAX))
                .map(|x| x as u32)
                .ok_or_else(|| argument(format!("`{name}` must hold whole numbers ≥ 0")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Reads an optional field of a JavaScript object.
type Reader<X> = fn(&JsValue, &str) -> Result<Option<X>, JsValue>;
/// A builder method taking one field's value.
type Setter<T, X> = fn(T, X) -> T;

/// `value` passed through each `with` whose field `obj` has (read by `read`).
fn with_fields<T, X>(
    mut value: T,
    (obj, read): (&JsValue, Reader<X>),
    setters: &[(&str, Setter<T, X>)],
) -> Result<T, JsValue> {
    for (name, with) in setters {
        if let Some(x) = read(obj, name)? {
            value = with(value, x);
        }
    }
    Ok(value)
}

fn dims4(obj: &JsValue, name: &str) -> Result<[usize; 4], JsValue> {
    let dims = opt_u32s(obj, name)?.unwrap_or_default();
    <[u32; 4]>::try_from(dims.as_slice())
        .map(|d| d.map(|x| x as usize))
        .map_err(|_| argument(format!("`{name}` must be 4 dims [batch, heads, M, N]")))
}

/// Host data of one tensor as JavaScript passed it.
enum Host {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Host {
    fn read(v: &JsValue, name: &str) -> Result<Self, JsValue> {
        if let Some(a) = v.dyn_ref::<Float32Array>() {
            return Ok(Host::F32(a.to_vec()));
        }
        if let Some(a) = v.dyn_ref::<Uint16Array>() {
            return Ok(Host::F16(
                a.to_vec().into_iter().map(half::f16::from_bits).collect(),
            ));
        }
        Err(argument(format!(
            "{name} must be a Float32Array (f32) or a Uint16Array (f16 bits)"
        )))
    }

    fn upload(&self, ctx: &Context, dims: &[usize]) -> xattn::Result<Tensor> {
        match self {
            Host::F32(d) => Tensor::upload(ctx, "input", d, dims),
            Host::F16(d) => Tensor::upload_f16(ctx, "input", d, dims),
        }
    }

    fn as_f32(&self) -> Vec<f32> {
        match self {
            Host::F32(d) => d.clone(),
            Host::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// The shape of one call from `{batch, m, n, heads, kvHeads, dk, dv}` (kvHeads defaults to
/// heads, dv to dk).
fn shape_of(dims: &JsValue) -> Result<AttnShape, JsValue> {
    let heads = usize_of(dims, "heads")?;
    let dk = usize_of(dims, "dk")?;
    let (batch, m, n) = (
        usize_of(dims, "batch")?,
        usize_of(dims, "m")?,
        usize_of(dims, "n")?,
    );
    let kv = opt_usize(dims, "kvHeads")?.unwrap_or(heads);
    let dv = opt_usize(dims, "dv")?.unwrap_or(dk);
    AttnShape::from_qkv(
        [batch, m, heads, dk],
        [batch, n, kv, dk],
        [batch, n, kv, dv],
    )
    .map_err(js_error)
}

/// What one call asks for beside O.
#[derive(Clone, Copy)]
struct Want {
    lse: bool,
    weights: bool,
    stats: bool,
}

/// The attention options of `{scale, causal, window, windowAlign, qLens, kvLens, mask,
/// maskDims, bias, biasDims, softcap, path, lse, weights, stats}` (every one optional).
fn parse_options(o: &JsValue) -> Result<(Attention, Want), JsValue> {
    let mut opts = Attention::default();
    if let Some(s) = opt_f64(o, "scale")? {
        opts = opts.with_scale(s as f32);
    }
    let align = |name| -> Result<Option<Alignment>, JsValue> {
        opt_string(o, name)?
            .map(|a| a.parse::<Alignment>().map_err(js_error))
            .transpose()
    };
    let causal = align("causal")?;
    if let Some(a) = causal {
        opts = opts.with_causal(a);
    }
    if let Some(w) = opt_u32s(o, "window")? {
        let [left, right] = <[u32; 2]>::try_from(w.as_slice())
            .map_err(|_| argument("`window` must be [left, right]".into()))?;
        let a = align("windowAlign")?.or(causal).ok_or_else(|| {
            argument(
                "`window` needs `windowAlign` ('top-left' or 'bottom-right') or `causal`".into(),
            )
        })?;
        opts = opts.with_window(a, left as usize, right as usize);
    }
    opts = with_fields(
        opts,
        (o, opt_u32s),
        &[
            ("qLens", Attention::with_q_lens),
            ("kvLens", Attention::with_kv_lens),
        ],
    )?;
    let mask = field(o, "mask");
    if present(&mask) {
        let bits = mask
            .dyn_ref::<Uint8Array>()
            .ok_or_else(|| argument("`mask` must be a Uint8Array (1 = attend)".into()))?;
        opts = opts.with_mask(
            dims4(o, "maskDims")?,
            bits.to_vec().into_iter().map(|b| b != 0).collect(),
        );
    }
    let bias = field(o, "bias");
    if present(&bias) {
        let values = bias
            .dyn_ref::<Float32Array>()
            .ok_or_else(|| argument("`bias` must be a Float32Array".into()))?;
        opts = opts.with_bias(dims4(o, "biasDims")?, values.to_vec());
    }
    if let Some(c) = opt_f64(o, "softcap")? {
        opts = opts.with_softcap(c as f32);
    }
    if let Some(p) = opt_string(o, "path")? {
        opts = opts.with_path(p.parse::<Path>().map_err(js_error)?);
    }
    let want = Want {
        lse: flag(o, "lse"),
        weights: flag(o, "weights"),
        stats: flag(o, "stats"),
    };
    if want.weights {
        opts = opts.with_weights();
    }
    if want.stats {
        opts = opts.with_stats(Stats::ALL);
    }
    Ok((opts, want))
}

fn set(obj: &Object, name: &str, value: impl Into<JsValue>) {
    Reflect::set(obj, &JsValue::from_str(name), &value.into())
        .expect("setting a field of a plain object cannot fail");
}

fn f32s(data: &[f32]) -> Float32Array {
    Float32Array::from(data)
}

fn f64s_as_f32(data: &[f64]) -> Float32Array {
    f32s(&data.iter().map(|&x| x as f32).collect::<Vec<_>>())
}

async fn read(t: &Tensor) -> Result<Float32Array, JsValue> {
    Ok(f32s(&t.to_host_async().await.map_err(js_error)?))
}

/// `{entropy, focus, coverage}` of whichever statistics `stats` holds.
async fn read_stats(stats: &xattn::StatsOutput<Tensor>) -> Result<Object, JsValue> {
    let out = Object::new();
    for (name, t) in stats.named() {
        if let Some(t) = t {
            set(&out, name, read(t).await?);
        }
    }
    Ok(out)
}

/// Opens the browser's WebGPU adapter (`navigator.gpu`) with its own limits and the features
/// xattn uses; rejects with xattn's message where there is none.
#[wasm_bindgen]
pub async fn open() -> Result<Device, JsValue> {
    let ctx = Context::new_async().await.map_err(js_error)?;
    // The planner fills a CPU adapter with one workgroup per host thread; wasm's std cannot
    // count them (it would plan for 1: perceiver-like calls then ran fused, 4× slower than
    // split-K under SwiftShader), the browser can.
    let threads = Reflect::get(&js_sys::global(), &"navigator".into())
        .and_then(|nav| Reflect::get(&nav, &"hardwareConcurrency".into()))
        .ok()
        .and_then(|n| n.as_f64())
        .map_or(1, |n| n as usize);
    let caps = xattn::DeviceCaps {
        fill: xattn::device::fill_of(ctx.info.device_type, threads),
        ..ctx.caps()
    };
    Ok(Device {
        engine: Engine::with_caps(&ctx, caps),
    })
}

/// One WebGPU device with xattn's engine (pipeline cache, buffer pool, planner).
#[wasm_bindgen]
pub struct Device {
    engine: Engine,
}

#[wasm_bindgen]
impl Device {
    /// `{name, backend, deviceType, driver, describe, limits, features, degradations}`: the
    /// adapter and what the planner reads from it.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> Object {
        let ctx = self.engine.context();
        let info = &ctx.info;
        let out = Object::new();
        set(&out, "name", info.name.as_str());
        set(&out, "backend", format!("{:?}", info.backend));
        set(&out, "deviceType", format!("{:?}", info.device_type));
        set(&out, "driver", info.driver.as_str());
        set(&out, "describe", ctx.describe());
        let limits = Object::new();
        let l = &ctx.limits;
        set(
            &limits,
            "maxStorageBufferBindingSize",
            l.max_storage_buffer_binding_size as f64,
        );
        set(&limits, "maxBufferSize", l.max_buffer_size as f64);
        set(
            &limits,
            "maxComputeWorkgroupStorageSize",
            l.max_compute_workgroup_storage_size,
        );
        set(
            &limits,
            "maxComputeInvocationsPerWorkgroup",
            l.max_compute_invocations_per_workgroup,
        );
        set(&out, "limits", limits);
        let features = Object::new();
        let f = ctx.features;
        set(&features, "subgroups", f.contains(wgpu::Features::SUBGROUP));
        set(
            &features,
            "shaderF16",
            f.contains(wgpu::Features::SHADER_F16),
        );
        set(
            &features,
            "timestamps",
            f.contains(wgpu::Features::TIMESTAMP_QUERY),
        );
        set(&features, "subgroupMinSize", info.subgroup_min_size);
        set(&features, "subgroupMaxSize", info.subgroup_max_size);
        set(&out, "features", features);
        let lacks: Array = ctx.degradations().into_iter().map(JsValue::from).collect();
        set(&out, "degradations", lacks);
        out
    }

    /// Uploads a `Float32Array` or a `Uint16Array` (f16 bits) of shape `dims`; the tensor
    /// stays on the device for any number of calls.
    pub fn upload(&self, data: JsValue, dims: Vec<usize>) -> Result<DeviceTensor, JsValue> {
        let host = Host::read(&data, "data")?;
        let t = host
            .upload(self.engine.context(), &dims)
            .map_err(js_error)?;
        Ok(DeviceTensor { t })
    }

    /// What runs for this call: path, tiles, splits, bytes (the planner's description).
    pub fn plan(&self, dims: JsValue, options: JsValue, f16: bool) -> Result<String, JsValue> {
        let shape = shape_of(&dims)?;
        let (opts, _) = parse_options(&options)?;
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        let req = opts.request_typed(shape, dtype).map_err(js_error)?;
        xattn::Plan::new(&req, self.engine.caps())
            .map(|p| p.to_string())
            .map_err(js_error)
    }

    /// Attention of host arrays `q`, `k`, `v` of shape `dims` (`{batch, m, n, heads, kvHeads?,
    /// dk, dv?}`) with `options`; resolves to `{o, lse?, weights?, stats?, path}` (O in
    /// f32 whatever the inputs' type).
    pub fn attention(
        &self,
        q: JsValue,
        k: JsValue,
        v: JsValue,
        dims: JsValue,
        options: JsValue,
    ) -> Promise {
        rejecting((|| {
            let shape = shape_of(&dims)?;
            let host = [
                Host::read(&q, "q")?,
                Host::read(&k, "k")?,
                Host::read(&v, "v")?,
            ];
            let ctx = self.engine.context();
            let tensors = [
                host[0].upload(ctx, &shape.q_dims()),
                host[1].upload(ctx, &shape.k_dims()),
                host[2].upload(ctx, &shape.v_dims()),
            ];
            let [q, k, v] = tensors.map(|t| t.map(|t| DeviceTensor { t }));
            Ok(self.attention_on_device(
                &q.map_err(js_error)?,
                &k.map_err(js_error)?,
                &v.map_err(js_error)?,
                options,
            ))
        })())
    }

    /// [`Device::attention`] on tensors already on the device (their dims give the shape).
    #[wasm_bindgen(js_name = attentionOnDevice)]
    pub fn attention_on_device(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        options: JsValue,
    ) -> Promise {
        rejecting(self.prepare(q, k, v, options).map(|call| {
            future_to_promise(async move {
                call.run_async().await?;
                call.read_output().await
            })
        }))
    }

    /// One call on device tensors validated, planned and bound once, to run again and again
    /// (a decoder writes its next query into `q` and runs; the page's timings run this).
    pub fn prepare(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        options: JsValue,
    ) -> Result<Call, JsValue> {
        let (opts, want) = parse_options(&options)?;
        let call = self
            .engine
            .prepare(&q.t, &k.t, &v.t, &opts)
            .map_err(js_error)?;
        Ok(Call {
            call: Rc::new(call),
            want,
        })
    }

    /// A cross-attention layer from safetensors `bytes` (an `ArrayBuffer`'s `Uint8Array`):
    /// the tensors under `prefix` in any name family the CLI reads (pytorch, hf, diffusers,
    /// t5), with `config` `{embedDim, heads, kvHeads?, kdim?, vdim?, innerDim?, bias?}`.
    pub fn layer(&self, bytes: &[u8], prefix: &str, config: JsValue) -> Result<Layer, JsValue> {
        let config = config_of(&config)?;
        let weights = LayerFile::open(bytes, prefix, None)
            .and_then(|f| f.weights(&config))
            .map_err(js_error)?;
        let layer = MultiHeadAttention::new(&self.engine, config, &weights).map_err(js_error)?;
        Ok(Layer {
            engine: self.engine.clone(),
            layer: Rc::new(layer),
        })
    }
}

/// A promise of `result`'s promise, or one rejected with its error: a call that returns a
/// promise reports bad input by rejecting it, never by throwing.
fn rejecting(result: Result<Promise, JsValue>) -> Promise {
    result.unwrap_or_else(|e| Promise::reject(&e))
}

fn config_of(c: &JsValue) -> Result<MhaConfig, JsValue> {
    let embed = usize_of(c, "embedDim")?;
    let mut config = with_fields(
        MhaConfig::new(embed, usize_of(c, "heads")?),
        (c, opt_usize),
        &[
            ("innerDim", MhaConfig::with_inner_dim),
            ("kvHeads", MhaConfig::with_kv_heads),
            ("kdim", MhaConfig::with_kdim),
            ("vdim", MhaConfig::with_vdim),
        ],
    )?;
    let bias = field(c, "bias");
    if present(&bias) {
        config = config.with_bias(bias.is_truthy());
    }
    Ok(config)
}

/// A prepared attention call ([`Device::prepare`]).
#[wasm_bindgen]
pub struct Call {
    call: Rc<xattn::Prepared>,
    want: Want,
}

#[wasm_bindgen]
impl Call {
    /// Runs the call; resolves when the device has finished it (rejects with its device
    /// error, if any).
    pub fn run(&self) -> Promise {
        let call = self.clone_handle();
        future_to_promise(async move {
            call.run_async().await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The outputs of the last run: `{o, lse?, weights?, stats?, path}`.
    pub fn output(&self) -> Promise {
        let call = self.clone_handle();
        future_to_promise(async move { call.read_output().await })
    }

    /// What runs: path, tiles, splits, bytes (the planner's description).
    #[wasm_bindgen(getter)]
    pub fn plan(&self) -> String {
        self.call.plan().to_string()
    }
}

impl Call {
    fn clone_handle(&self) -> Call {
        Call {
            call: self.call.clone(),
            want: self.want,
        }
    }

    async fn run_async(&self) -> Result<(), JsValue> {
        self.call.run_async().await.map_err(js_error)
    }

    async fn read_output(&self) -> Result<JsValue, JsValue> {
        let out = self.call.output();
        let result = Object::new();
        set(&result, "o", read(&out.o).await?);
        if self.want.lse {
            set(&result, "lse", read(&out.lse).await?);
        }
        if let Some(w) = out.weights.as_ref().filter(|_| self.want.weights) {
            set(&result, "weights", read(w).await?);
        }
        if self.want.stats {
            set(&result, "stats", read_stats(&out.stats).await?);
        }
        set(&result, "path", self.call.plan().path().name());
        Ok(result.into())
    }
}

/// A tensor on the device, kept between calls.
#[wasm_bindgen]
pub struct DeviceTensor {
    t: Tensor,
}

#[wasm_bindgen]
impl DeviceTensor {
    /// The dims, row-major.
    #[wasm_bindgen(getter)]
    pub fn dims(&self) -> Vec<usize> {
        self.t.dims().to_vec()
    }

    /// `f32` or `f16`.
    #[wasm_bindgen(getter)]
    pub fn dtype(&self) -> String {
        self.t.dtype().to_string()
    }

    /// The contents as a `Float32Array` (f16 widened exactly).
    #[wasm_bindgen(js_name = toHost)]
    pub fn to_host(&self) -> Promise {
        let t = self.t.clone();
        future_to_promise(async move { Ok(read(&t).await?.into()) })
    }
}

/// A cross-attention layer with its weights on the device.
#[wasm_bindgen]
pub struct Layer {
    engine: Engine,
    layer: Rc<MultiHeadAttention>,
}

#[wasm_bindgen]
impl Layer {
    /// `forward(query, key, value)`: query `[batch, M, embedDim]`, key `[batch, N, kdim]`,
    /// value `[batch, N, vdim]` (`Float32Array`s, `dims` `{batch, m, n}`); `options` as
    /// [`Device::attention`]'s plus `weights: "per-head" | "average"`. Resolves to
    /// `{out, weights?, stats?}` (statistics per head).
    pub fn forward(
        &self,
        query: JsValue,
        key: JsValue,
        value: JsValue,
        dims: JsValue,
        options: JsValue,
    ) -> Promise {
        rejecting((|| {
            let c = *self.layer.config();
            let (batch, m, n) = (
                usize_of(&dims, "batch")?,
                usize_of(&dims, "m")?,
                usize_of(&dims, "n")?,
            );
            let need = match opt_string(&options, "weights")?.as_deref() {
                None => NeedWeights::None,
                Some("per-head") => NeedWeights::PerHead,
                Some("average") => NeedWeights::Averaged,
                Some(other) => {
                    return Err(argument(format!(
                        "`weights` must be \"per-head\" or \"average\", got {other:?}"
                    )))
                }
            };
            // A string `weights` sets the attention's flag too, which a layer ignores
            // (`need_weights` decides).
            let (attention, want) = parse_options(&options)?;
            let opts = MhaOptions::default()
                .with_attention(attention)
                .with_need_weights(need);
            let ctx = self.engine.context();
            let q = Host::read(&query, "query")?.upload(ctx, &[batch, m, c.embed_dim]);
            let k = Host::read(&key, "key")?.upload(ctx, &[batch, n, c.kdim]);
            let v = Host::read(&value, "value")?.upload(ctx, &[batch, n, c.vdim]);
            let (q, k, v) = (
                q.map_err(js_error)?,
                k.map_err(js_error)?,
                v.map_err(js_error)?,
            );
            let layer = self.layer.clone();
            Ok(future_to_promise(async move {
                let call = layer.prepare(&q, &k, &v, &opts).map_err(js_error)?;
                call.run_async().await.map_err(js_error)?;
                let out = call.output();
                let result = Object::new();
                set(&result, "out", read(&out.out).await?);
                if let Some(w) = &out.weights {
                    set(&result, "weights", read(w).await?);
                }
                if want.stats {
                    set(&result, "stats", read_stats(&out.stats).await?);
                }
                Ok(result.into())
            }))
        })())
    }
}

/// Entropy and focus of each row of `weights` (`rows` rows of `n`), and each head's coverage
/// of each key, straight from their definitions ([`xattn::Stats`]) in f64.
fn reference_stats(weights: &[f64], heads_rows: (usize, usize), n: usize) -> Object {
    let (heads, rows) = heads_rows;
    let mut entropy = Vec::with_capacity(heads * rows);
    let mut focus = Vec::with_capacity(heads * rows);
    let mut coverage = vec![0.0; heads * n];
    for (r, row) in weights.chunks(n).enumerate() {
        let h = r / rows;
        entropy.push(
            -row.iter()
                .filter(|&&p| p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>(),
        );
        focus.push(row.iter().fold(0.0f64, |a, &p| a.max(p)));
        for (c, p) in coverage[h * n..(h + 1) * n].iter_mut().zip(row) {
            *c += p;
        }
    }
    let out = Object::new();
    set(&out, "entropy", f64s_as_f32(&entropy));
    set(&out, "focus", f64s_as_f32(&focus));
    set(&out, "coverage", f64s_as_f32(&coverage));
    out
}

/// The f64 reference of [`Device::attention`] on the CPU (xattn's own, compiled to wasm):
/// `{o, lse, weights, stats, maxLogit}` for the same arguments (f16 inputs widened exactly).
/// `maxLogit` bounds the logits, for the tests' error budget.
#[wasm_bindgen]
pub fn reference(
    q: JsValue,
    k: JsValue,
    v: JsValue,
    dims: JsValue,
    options: JsValue,
) -> Result<Object, JsValue> {
    let s = shape_of(&dims)?;
    let (opts, _) = parse_options(&options)?;
    let [q, k, v] = [
        Host::read(&q, "q")?.as_f32(),
        Host::read(&k, "k")?.as_f32(),
        Host::read(&v, "v")?.as_f32(),
    ];
    for (data, want, name) in [
        (&q, s.q_dims(), "q"),
        (&k, s.k_dims(), "k"),
        (&v, s.v_dims(), "v"),
    ] {
        let len: usize = want.iter().product();
        if data.len() != len {
            return Err(js_error(xattn::Error::Length {
                name,
                expected: len,
                shape: want.to_vec(),
                got: data.len(),
            }));
        }
    }
    // Validates the masks against the shape as a call would.
    opts.request(s).map_err(js_error)?;
    let scale = opts.scale_for(s.d_k);
    let masking = opts.masking();
    let r = xattn::cpu::reference::attention_masked(&s, &q, &k, &v, f64::from(scale), masking);
    let out = Object::new();
    set(&out, "o", f64s_as_f32(&r.o));
    set(&out, "lse", f64s_as_f32(&r.lse));
    set(&out, "weights", f64s_as_f32(&r.weights));
    set(
        &out,
        "stats",
        reference_stats(&r.weights, (s.batch * s.q_heads, s.m), s.n),
    );
    set(
        &out,
        "maxLogit",
        xattn::cpu::budget::max_logit(&s, scale, &q, &k, masking),
    );
    Ok(out)
}

/// The f64 reference of [`Layer::forward`] for the layer in safetensors `bytes`:
/// `{out, weights}` (weights per head).
#[wasm_bindgen(js_name = layerReference)]
pub fn layer_reference(
    bytes: &[u8],
    prefix: &str,
    config: JsValue,
    query: Float32Array,
    key: Float32Array,
    value: Float32Array,
    batch: usize,
) -> Result<Object, JsValue> {
    let c = config_of(&config)?;
    let w = LayerFile::open(bytes, prefix, None)
        .and_then(|f| f.weights(&c))
        .map_err(js_error)?;
    let opts = Attention::default();
    let r = xattn::mha::reference::layer(
        &c,
        &w,
        (&query.to_vec(), &key.to_vec(), &value.to_vec()),
        batch,
        f64::from(opts.scale_for(c.head_dim())),
        opts.masking(),
    );
    let out = Object::new();
    set(&out, "out", f64s_as_f32(&r.o));
    set(&out, "weights", f64s_as_f32(&r.weights));
    Ok(out)
}
