//! The layer's building blocks (projections, the mean over heads, packing half outputs) and
//! the forward program of a multi-head layer.

use crate::dtype::{DType, Storage};
use crate::error::Result;
use crate::kernels::add::Add;
use crate::kernels::linear::Linear;
use crate::kernels::linear_grad::LinearGrad;
use crate::kernels::mean_heads::MeanHeads;
use crate::kernels::pack::Pack;
use crate::kernels::KernelSpec;
use crate::mask::MaskSpec;
use crate::mha::{MhaConfig, NeedWeights};
use crate::params::{linear_grad, AddParams, LinearGradParams, LinearParams, PackParams};
use crate::plan::attention::{append, base_params, Planned};
use crate::plan::check::{bytes, check_binding, check_grid, check_loops, fold_grid, limit_err};
use crate::plan::device::DeviceCaps;
use crate::plan::request::{declare_mask_inputs, AttnIo, Path, Request, StatsIo};
use crate::program::{BufferId, Program};
use crate::shape::{AttnShape, F32};

/// `elems` as the u32 an element-wise kernel's params hold, or the limit error.
fn elems_u32(elems: usize, kernel: &str) -> Result<u32> {
    u32::try_from(elems).map_err(|_| {
        limit_err(
            format!("{elems} elements to {kernel}"),
            elems as u64,
            "elements per dispatch",
            u64::from(u32::MAX),
        )
    })
}

/// Appends `acc += x` over `elems` f32 elements (a sum of gradients).
pub fn add(
    program: &mut Program,
    elems: usize,
    [x, acc]: [BufferId; 2],
    caps: &DeviceCaps,
) -> Result<()> {
    let params = AddParams {
        elems: elems_u32(elems, "add")?,
        ..Default::default()
    };
    program.dispatch(Add, &params, fold_grid("add", elems, caps)?, &[x, acc]);
    Ok(())
}

/// Appends packing `elems` f32 values of `from` into `to` as `dtype` pairs.
pub fn pack(
    program: &mut Program,
    elems: usize,
    dtype: DType,
    [from, to]: [BufferId; 2],
    caps: &DeviceCaps,
) -> Result<()> {
    let elems32 = elems_u32(elems, "pack")?;
    program.dispatch(
        Pack { to: dtype },
        &(PackParams {
            elems: elems32,
            ..Default::default()
        }),
        fold_grid("pack", elems.div_ceil(2), caps)?,
        &[from, to],
    );
    Ok(())
}

/// Output features per workgroup tile of `linear` (and rows per tile).
pub(super) const LINEAR_TILE: usize = 64;

/// Appends `y [rows, out_dim] = x [rows, in_dim]·w [out_dim, in_dim]ᵀ (+ b)` to `program`:
/// one dispatch per chunk of rows that fits the grid (one, for any realistic layer).
pub fn linear(
    program: &mut Program,
    (rows, in_dim, out_dim): (usize, usize, usize),
    [x, w, b, y]: [BufferId; 4],
    (x_type, w_type): (DType, DType),
    has_bias: bool,
    caps: &DeviceCaps,
) -> Result<()> {
    let kernel = Linear {
        x: Storage::of(x_type, caps.native_f16),
        w: Storage::of(w_type, caps.native_f16),
    };
    check_binding(
        &format!("linear input [{rows}, {in_dim}] {x_type}"),
        x_type.bytes(rows * in_dim),
        caps,
    )?;
    check_binding(
        &format!("linear weight [{out_dim}, {in_dim}] {w_type}"),
        w_type.bytes(out_dim * in_dim),
        caps,
    )?;
    check_binding(
        &format!("linear output [{rows}, {out_dim}]"),
        bytes(rows * out_dim),
        caps,
    )?;
    let col_tiles = check_grid(
        "linear output-feature tile",
        out_dim.div_ceil(LINEAR_TILE),
        caps,
    )?;
    let rows_max = caps.max_workgroups as usize * LINEAR_TILE;
    let mut r0 = 0;
    while r0 < rows {
        let nr = rows_max.min(rows - r0);
        program.dispatch(
            kernel,
            &(LinearParams {
                row_offset: r0 as u32,
                rows: nr as u32,
                in_dim: in_dim as u32,
                out_dim: out_dim as u32,
                has_bias: u32::from(has_bias),
                ..Default::default()
            }),
            [col_tiles, nr.div_ceil(LINEAR_TILE) as u32, 1],
            &[x, w, b, y],
        );
        r0 += nr;
    }
    Ok(())
}

/// Appends the backward of [`linear`] (`y = x·wᵀ + b`, `x [rows, in_dim]`, `w [out_dim, in_dim]`)
/// to `program`: from `dy [rows, out_dim]` (f32), the f32 gradients `dx = dy·w [rows, in_dim]`,
/// `dw = dyᵀ·x [out_dim, in_dim]` and, where `has_bias`, `db = Σ_rows dy [out_dim]` (`db` may
/// be absent otherwise). `x` and `w` are read as `x_type` and `w_type`; sums run in f32.
///
/// Both are `linear_grad` dispatches: one per chunk of output rows that fits the grid and per
/// range of the reduction (output features for `dx`, rows for `dw` and `db`) that fits the
/// device's loop cap. Later ranges continue the sums of earlier ones, so the result does not
/// depend on the split, and nothing is summed with atomics.
pub fn linear_backward(
    program: &mut Program,
    (rows, in_dim, out_dim): (usize, usize, usize),
    [x, w, dy, dx, dw, db]: [BufferId; 6],
    (x_type, w_type): (DType, DType),
    has_bias: bool,
    caps: &DeviceCaps,
) -> Result<()> {
    let what = |name: &str, dims: String, dtype: DType, elems: usize| {
        check_binding(
            &format!("linear_backward {name} {dims} {dtype}"),
            dtype.bytes(elems),
            caps,
        )
    };
    what(
        "input",
        format!("[{rows}, {in_dim}]"),
        x_type,
        rows * in_dim,
    )?;
    what(
        "weight",
        format!("[{out_dim}, {in_dim}]"),
        w_type,
        out_dim * in_dim,
    )?;
    what(
        "output gradient",
        format!("[{rows}, {out_dim}]"),
        DType::F32,
        rows * out_dim,
    )?;
    what(
        "input gradient",
        format!("[{rows}, {in_dim}]"),
        DType::F32,
        rows * in_dim,
    )?;
    what(
        "weight gradient",
        format!("[{out_dim}, {in_dim}]"),
        DType::F32,
        out_dim * in_dim,
    )?;
    let u32_of = |n: usize, name: &str| {
        u32::try_from(n).map_err(|_| {
            limit_err(
                format!("linear_backward {name} {n}"),
                n as u64,
                "u32 indices",
                u64::from(u32::MAX),
            )
        })
    };
    let (in32, out32) = (u32_of(in_dim, "in_dim")?, u32_of(out_dim, "out_dim")?);
    u32_of(rows, "rows")?;
    let products = [
        // dx = dy·w: output rows are the rows, the sum runs over output features.
        (
            linear_grad::INPUT,
            w_type,
            rows,
            out_dim,
            [dy, w, dx, db],
            false,
        ),
        // dw = dyᵀ·x (db in the ones column): output rows are the output features, the sum
        // runs over rows.
        (
            linear_grad::WEIGHT,
            x_type,
            out_dim,
            rows,
            [dy, x, dw, db],
            has_bias,
        ),
    ];
    for (product, src_type, m_len, k_len, buffers, ones) in products {
        let kernel = LinearGrad {
            src: Storage::of(src_type, caps.native_f16),
        };
        let cols = in_dim + usize::from(ones);
        let col_tiles = check_grid(
            "linear_backward column tile",
            cols.div_ceil(LINEAR_TILE),
            caps,
        )?;
        if col_tiles == 0 || m_len == 0 {
            continue; // an empty gradient
        }
        let base = LinearGradParams {
            product,
            in_dim: in32,
            out_dim: out32,
            has_bias: u32::from(ones),
            ..Default::default()
        };
        let span = caps.loop_len(&kernel.loop_cost(&base).0);
        if span == 0 {
            return Err(limit_err(
                "linear_backward: even an empty reduction".to_string(),
                kernel.loop_cost(&base).0.trips(0),
                "loop iterations per invocation (Mesa llvmpipe ends loops past it)",
                caps.loop_cap.unwrap_or(0),
            ));
        }
        let span = usize::try_from(span).unwrap_or(usize::MAX);
        let m_max = caps.max_workgroups as usize * LINEAR_TILE;
        for m0 in (0..m_len).step_by(m_max) {
            let nm = m_max.min(m_len - m0);
            // At least one range: an empty sum (no rows, no output features) writes zeros.
            let mut k0 = 0usize;
            loop {
                let k1 = k_len.min(k0.saturating_add(span));
                program.dispatch(
                    kernel,
                    &LinearGradParams {
                        m_offset: m0 as u32,
                        m: nm as u32,
                        k_begin: k0 as u32,
                        k_end: k1 as u32,
                        ..base
                    },
                    [col_tiles, nm.div_ceil(LINEAR_TILE) as u32, 1],
                    &buffers,
                );
                if k1 >= k_len {
                    break;
                }
                k0 = k1;
            }
        }
    }
    Ok(())
}

/// Appends the weights `[batch, q_heads, M, N]` in `from` averaged over heads into `to`
/// `[batch, M, N]`.
pub fn mean_heads(
    program: &mut Program,
    s: &AttnShape,
    [from, to]: [BufferId; 2],
    caps: &DeviceCaps,
) -> Result<()> {
    program.dispatch(
        MeanHeads,
        &(base_params(s, 1.0, &MaskSpec::default())),
        fold_grid("mean_heads", s.batch * s.m * s.n, caps)?,
        &[from, to],
    );
    Ok(())
}

/// Declares each projection's weight and bias (absent where it has none).
pub(crate) fn declare_params(
    program: &mut Program,
    c: &MhaConfig,
    has_bias: [bool; 4],
    dtype: DType,
) -> [[BufferId; 2]; 4] {
    let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
    let sizes = [(inner, e), (kv, c.kdim), (kv, c.vdim), (e, inner)];
    let names = ["q", "k", "v", "o"];
    std::array::from_fn(|i| {
        let (out, inp) = sizes[i];
        [
            program.input(&format!("w_{}", names[i]), dtype.bytes(out * inp)),
            program.optional_input(&format!("b_{}", names[i]), dtype.bytes(out), has_bias[i]),
        ]
    })
}

/// A layer forward as one program (see [`layer_program`]) and its buffers.
#[derive(Clone, Debug)]
pub struct LayerProgram {
    /// Projections, attention and output projection.
    pub program: Program,
    /// Query input `[batch, M, embed_dim]`.
    pub query: BufferId,
    /// Key and value: the raw inputs `[batch, N, kdim]` and `[batch, N, vdim]`, or a
    /// cache's projected K and V `[batch, N, kv_heads, head_dim]`.
    pub source: [BufferId; 2],
    /// Weight and bias of W^Q, W^K, W^V, W^O.
    pub params: [[BufferId; 2]; 4],
    /// The attention's lengths, mask and bias inputs.
    pub masks: [BufferId; 3],
    /// Layer output `[batch, M, embed_dim]`.
    pub out: BufferId,
    /// Weights per head `[batch, heads, M, N]` or averaged `[batch, M, N]`, as asked.
    pub weights: Option<BufferId>,
    /// Statistics and pooled P per head, as `req` asks.
    pub stats: StatsIo,
    /// The same averaged over heads.
    pub mean_stats: StatsIo,
    /// The attention's path.
    pub path: Path,
    /// The attention's tiling (for people).
    pub tiling: String,
}

/// Element types of a layer's forward pass. Projections, attention and W^O compute in f32
/// and keep their intermediates (projected Q, K, V, O and a cache's K, V) in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerTypes {
    /// Query, key and value inputs.
    pub input: DType,
    /// Weights and biases.
    pub weights: DType,
    /// The output.
    pub out: DType,
}

/// The forward program of a layer with sizes `c` for the attention `req` (its shape from
/// [`MhaConfig::attn_shape`], `req.weights` iff `need` asks for weights, f32 in and out):
/// Q (and, unless `cached`, K and V) projections, the attention on their outputs, weights
/// averaged over heads where asked, and W^O, with inputs, weights and output of `types`.
pub fn layer_program(
    c: &MhaConfig,
    req: &Request,
    (cached, need, has_bias): (bool, NeedWeights, [bool; 4]),
    types: LayerTypes,
    caps: &DeviceCaps,
) -> Result<LayerProgram> {
    assert_eq!(
        (req.dtype, req.out_dtype),
        (DType::F32, DType::F32),
        "the layer's attention runs on its f32 projections"
    );
    let s = req.shape;
    let (batch, m, n) = (s.batch, s.m, s.n);
    let mut program = Program::new();
    let (query, source, params, masks) = declare_layer_inputs(
        &mut program,
        c,
        req,
        (cached, has_bias),
        (types.input, types.weights),
    );
    let out_elems = batch * m * c.embed_dim;
    let out = program.output("out", types.out.bytes(out_elems));
    let p_bytes = f32_bytes(s.weights_dims().iter().product());
    let (p, weights) = match need {
        NeedWeights::None => (None, None),
        NeedWeights::PerHead => {
            let w = program.output("weights", p_bytes);
            (Some(w), Some(w))
        }
        NeedWeights::Averaged => (
            Some(program.scratch("weights_per_head", p_bytes)),
            Some(program.output("mean_weights", f32_bytes(batch * m * n))),
        ),
    };
    let rows_q = batch * m;
    let mut io = projected_io(&mut program, c, &s, (cached, source, masks), p);
    io.stats = StatsIo::declare(&mut program, "", &s, req.stats, req.pool);
    // Averaged over heads: the sizes of one head.
    let one_head = AttnShape {
        q_heads: 1,
        kv_heads: 1,
        ..s
    };
    let mean_stats = StatsIo::declare(&mut program, "mean_", &one_head, req.stats, req.pool);
    let proj = |program: &mut Program, i: usize, dims, x, (y, x_type)| {
        let [w, b] = params[i];
        let dtypes = (x_type, types.weights);
        linear(program, dims, [x, w, b, y], dtypes, has_bias[i], caps)
    };
    let x_in = types.input;
    proj(
        &mut program,
        0,
        (rows_q, c.embed_dim, c.inner_dim),
        query,
        (io.q, x_in),
    )?;
    if !cached {
        proj(
            &mut program,
            1,
            (batch * n, c.kdim, c.kv_dim()),
            source[0],
            (io.k, x_in),
        )?;
        proj(
            &mut program,
            2,
            (batch * n, c.vdim, c.kv_dim()),
            source[1],
            (io.v, x_in),
        )?;
    }
    let Planned { path, tiling, .. } = append(req, caps, &mut program, &io)?;
    if let (NeedWeights::Averaged, Some(p), Some(mean)) = (need, p, weights) {
        mean_heads(&mut program, &s, [p, mean], caps)?;
    }
    // Each statistic [batch, heads, rows, cols] averaged over heads by the same kernel.
    let (gr, gc) = req.pool.map_or((0, 0), |p| p.grid(m, n));
    let stat_dims = [(m, 1), (m, 1), (1, n), (gr, gc)];
    let per_head = io.stats.named().into_iter().zip(mean_stats.named());
    for (((_, from), (_, to)), (rows, cols)) in per_head.zip(stat_dims) {
        if let (Some(from), Some(to)) = (from, to) {
            let grid = AttnShape {
                m: rows,
                n: cols,
                ..s
            };
            mean_heads(&mut program, &grid, [from, to], caps)?;
        }
    }
    // W^O writes f32; a half output is packed from scratch.
    let out32 = if types.out == DType::F32 {
        out
    } else {
        program.scratch("out_f32", f32_bytes(out_elems))
    };
    proj(
        &mut program,
        3,
        (rows_q, c.inner_dim, c.embed_dim),
        io.o,
        (out32, DType::F32),
    )?;
    if out32 != out {
        pack(&mut program, out_elems, types.out, [out32, out], caps)?;
    }
    check_loops(&program, caps)?;
    Ok(LayerProgram {
        program,
        query,
        source,
        params,
        masks,
        out,
        weights,
        stats: io.stats,
        mean_stats,
        path,
        tiling: format!("projections: 64×64 linear tiles; attention: {tiling}"),
    })
}

/// The inputs of a layer's forward or backward program, in this order: query `[batch, M, E]`,
/// key and value (the raw inputs of `x_type`, or a cache's f32 K and V where `cached`), the
/// weights and biases (of `w_type`, biases where `has_bias`) and the attention's masks.
pub(super) fn declare_layer_inputs(
    program: &mut Program,
    c: &MhaConfig,
    req: &Request,
    (cached, has_bias): (bool, [bool; 4]),
    (x_type, w_type): (DType, DType),
) -> (BufferId, [BufferId; 2], [[BufferId; 2]; 4], [BufferId; 3]) {
    let s = req.shape;
    let rows_s = s.batch * s.n;
    let query = program.input("query", x_type.bytes(s.batch * s.m * c.embed_dim));
    let source = if cached {
        let kv_bytes = f32_bytes(rows_s * c.kv_dim());
        [
            program.input("cached_k", kv_bytes),
            program.input("cached_v", kv_bytes),
        ]
    } else {
        [
            program.input("key", x_type.bytes(rows_s * c.kdim)),
            program.input("value", x_type.bytes(rows_s * c.vdim)),
        ]
    };
    let params = declare_params(program, c, has_bias, w_type);
    let masks = declare_mask_inputs(program, "", &s, &req.masks);
    (query, source, params, masks)
}

/// The attention's buffers on a layer's f32 projections: Q, O and LSE scratch, K and V scratch
/// (the cache's own `source` where `cached`), the layer's `masks` and the `weights` output
/// given; no statistics (the caller declares those it wants after these).
pub(super) fn projected_io(
    program: &mut Program,
    c: &MhaConfig,
    s: &AttnShape,
    (cached, source, masks): (bool, [BufferId; 2], [BufferId; 3]),
    weights: Option<BufferId>,
) -> AttnIo {
    let q_bytes = f32_bytes(s.batch * s.m * c.inner_dim);
    let kv_bytes = f32_bytes(s.batch * s.n * c.kv_dim());
    let q = program.scratch("q", q_bytes);
    let mut kv = |i: usize, name: &str| {
        if cached {
            source[i]
        } else {
            program.scratch(name, kv_bytes)
        }
    };
    let (k, v) = (kv(0, "k"), kv(1, "v"));
    AttnIo {
        q,
        k,
        v,
        lens: masks[0],
        mask: masks[1],
        bias: masks[2],
        o: program.scratch("o", q_bytes),
        lse: program.scratch("lse", f32_bytes(s.lse_dims().iter().product())),
        weights,
        stats: StatsIo::default(),
    }
}

pub(super) fn f32_bytes(elems: usize) -> u64 {
    elems as u64 * F32
}
