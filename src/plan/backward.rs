//! The backward of attention: dQ, dK, dV (and dBias) from Q, K, V, O, the LSE and dO, as
//! FlashAttention-2 computes them, without storing anything M×N and without atomics:
//! `grad_rowdot` (D = rowsum(dO ∘ O), dO in f32), `grad_kv` (one pass over query rows per
//! key block, summing the query heads of each K/V head), `grad_q` (one pass over keys per row
//! block) and, when asked, `grad_bias` (dS summed to the bias's own dims). Scratch grows with
//! (M + N)·d: D, dO in f32 and, for half gradients, their f32 sums.

use std::fmt;

use crate::dtype::{DType, Storage};
use crate::error::{Error, Result};
use crate::kernels::grad_bias::GradBias;
use crate::kernels::grad_kv::GradKv;
use crate::kernels::grad_q::GradQ;
use crate::kernels::grad_rowdot::GradRowdot;
use crate::kernels::KernelSpec;
use crate::mask::MaskSpec;
use crate::params::{flags, AttnParams};
use crate::plan::attention::base_params;
use crate::plan::check::{bytes, check_binding, check_grid, fold_grid, tile_rows};
use crate::plan::device::DeviceCaps;
use crate::plan::layer::pack;
use crate::plan::request::{declare_mask_inputs, Request};
use crate::program::{BufferId, Program};
use crate::shape::{human_bytes, AttnShape};

/// The largest head dim the backward kernels take (their rows live in registers).
pub const GRAD_MAX_HEAD_DIM: usize = 256;

/// Invocations per workgroup of the backward kernels.
const GRAD_WG: usize = 64;

/// The buffers of one attention backward in a [`Program`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradIo {
    /// Queries `[batch, M, q_heads, d_k]`.
    pub q: BufferId,
    /// Keys `[batch, N, kv_heads, d_k]`.
    pub k: BufferId,
    /// Values `[batch, N, kv_heads, d_v]`.
    pub v: BufferId,
    /// Lengths (see [`crate::plan::AttnIo`]).
    pub lens: BufferId,
    /// Mask bits (absent when unused).
    pub mask: BufferId,
    /// Bias (absent when unused).
    pub bias: BufferId,
    /// The forward's O `[batch, M, q_heads, d_v]`.
    pub o: BufferId,
    /// The forward's LSE `[batch, q_heads, M]`.
    pub lse: BufferId,
    /// dO, like O.
    pub d_o: BufferId,
    /// dQ, like Q.
    pub dq: BufferId,
    /// dK, like K.
    pub dk: BufferId,
    /// dV, like V.
    pub dv: BufferId,
    /// dBias in the bias's own dims, where asked for.
    pub dbias: Option<BufferId>,
}

impl GradIo {
    /// Declares the buffers of a backward call of its own: inputs in `dtype` (O and dO in
    /// `o_dtype`), gradients in `grad_dtype`.
    pub fn declare(
        program: &mut Program,
        req: &Request,
        o_dtype: DType,
        grad_dtype: DType,
        bias_grad: bool,
    ) -> GradIo {
        let s = &req.shape;
        let elems = |d: [usize; 4]| d.iter().product::<usize>();
        let q = program.input("q", req.dtype.bytes(elems(s.q_dims())));
        let k = program.input("k", req.dtype.bytes(elems(s.k_dims())));
        let v = program.input("v", req.dtype.bytes(elems(s.v_dims())));
        let [lens, mask, bias] = declare_mask_inputs(program, "", s, &req.masks);
        let o = program.input("o", o_dtype.bytes(elems(s.o_dims())));
        let lse = program.input("lse", bytes(elems3(s.lse_dims())));
        let d_o = program.input("d_o", o_dtype.bytes(elems(s.o_dims())));
        let dq = program.output("dq", grad_dtype.bytes(elems(s.q_dims())));
        let dk = program.output("dk", grad_dtype.bytes(elems(s.k_dims())));
        let dv = program.output("dv", grad_dtype.bytes(elems(s.v_dims())));
        let dbias = req
            .masks
            .bias_dims
            .filter(|_| bias_grad)
            .map(|d| program.output("dbias", bytes(elems(d))));
        GradIo {
            q,
            k,
            v,
            lens,
            mask,
            bias,
            o,
            lse,
            d_o,
            dq,
            dk,
            dv,
            dbias,
        }
    }
}

fn elems3(d: [usize; 3]) -> usize {
    d.iter().product()
}

/// A planned backward: its program, buffers and what it does.
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    program: Program,
    io: GradIo,
    shape: AttnShape,
    masks: MaskSpec,
    tiling: String,
}

impl BackwardPlan {
    /// Plans the backward of `req` (O and dO in `o_dtype`, gradients in `grad_dtype`, dBias
    /// where `bias_grad` and the call has a bias).
    pub fn new(
        req: &Request,
        (o_dtype, grad_dtype): (DType, DType),
        bias_grad: bool,
        caps: &DeviceCaps,
    ) -> Result<BackwardPlan> {
        let mut program = Program::new();
        let io = GradIo::declare(&mut program, req, o_dtype, grad_dtype, bias_grad);
        let tiling = append(req, (o_dtype, grad_dtype), caps, &mut program, &io)?;
        crate::plan::check_loops(&program, caps)?;
        Ok(BackwardPlan {
            program,
            io,
            shape: req.shape,
            masks: req.masks,
            tiling,
        })
    }

    /// The program.
    #[doc(hidden)]
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Its buffers.
    #[doc(hidden)]
    pub fn io(&self) -> &GradIo {
        &self.io
    }

    /// The shape.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }
}

impl fmt::Display for BackwardPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backward of {}", self.shape)?;
        writeln!(f, "  tiling: {}", self.tiling)?;
        if !self.masks.is_empty() {
            writeln!(f, "  masks: {}", self.masks)?;
        }
        write!(f, "{}", self.program)
    }
}

/// A gradient written in f32 by its kernel: the output itself, or an f32 scratch packed into
/// it at the end.
fn f32_target(
    program: &mut Program,
    name: &str,
    elems: usize,
    grad_dtype: DType,
    out: BufferId,
    packs: &mut Vec<(BufferId, BufferId, usize)>,
) -> BufferId {
    if grad_dtype == DType::F32 {
        return out;
    }
    let scratch = program.scratch(&format!("{name}_f32"), bytes(elems));
    packs.push((scratch, out, elems));
    scratch
}

/// Appends the backward of `req` on `io`'s buffers to `program`; returns a line on the tiling.
pub fn append(
    req: &Request,
    (o_dtype, grad_dtype): (DType, DType),
    caps: &DeviceCaps,
    program: &mut Program,
    io: &GradIo,
) -> Result<String> {
    let s = req.shape;
    if s.d_k > GRAD_MAX_HEAD_DIM || s.d_v > GRAD_MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "the backward supports head dims up to {GRAD_MAX_HEAD_DIM}, got d_k {} d_v {}",
            s.d_k, s.d_v
        )));
    }
    let elems = |d: [usize; 4]| d.iter().product::<usize>();
    for (name, dims, dtype) in [
        ("q", s.q_dims(), req.dtype),
        ("k", s.k_dims(), req.dtype),
        ("v", s.v_dims(), req.dtype),
        ("o", s.o_dims(), DType::F32),
    ] {
        check_binding(
            &format!("{name} {dims:?} {dtype} (bound whole to the backward kernels)"),
            dtype.bytes(elems(dims)),
            caps,
        )?;
    }
    let masked = !req.masks.is_empty();
    let storage = Storage::of(req.dtype, caps.native_f16);
    let base = base_params(&s, req.scale, &req.masks);
    let rows = s.batch * s.q_heads * s.m;
    let delta = program.scratch("delta", bytes(rows));
    let d_o32 = program.scratch("d_o_f32", bytes(elems(s.o_dims())));
    let mut packs = Vec::new();
    let dq = f32_target(
        program,
        "dq",
        elems(s.q_dims()),
        grad_dtype,
        io.dq,
        &mut packs,
    );
    let dk = f32_target(
        program,
        "dk",
        elems(s.k_dims()),
        grad_dtype,
        io.dk,
        &mut packs,
    );
    let dv = f32_target(
        program,
        "dv",
        elems(s.v_dims()),
        grad_dtype,
        io.dv,
        &mut packs,
    );

    program.dispatch(
        GradRowdot {
            storage: Storage::of(o_dtype, caps.native_f16),
        },
        &base,
        fold_grid("grad_rowdot", rows, caps)?,
        &[io.o, io.d_o, delta, d_o32],
    );

    let (dk4, dv4) = (s.d_k.div_ceil(4) as u32, s.d_v.div_ceil(4) as u32);
    let inputs = [
        io.q, io.k, io.v, io.lens, io.mask, io.bias, io.lse, d_o32, delta,
    ];
    let max_wg = caps.max_workgroups as usize;

    // dK, dV: passes over (heads of the group, rows) under the loop cap.
    let br = tile_rows("grad_kv tiles of Q and dO rows", 4 * (dk4 + dv4) + 2, caps)?;
    let kv = GradKv {
        dk: 4 * dk4,
        dv: 4 * dv4,
        br,
        masked,
        storage,
    };
    let group = s.q_heads / s.kv_heads;
    let key_groups = check_grid("grad_kv key block", s.n.div_ceil(GRAD_WG), caps)?;
    let kv_passes = kv_passes(&kv, &base, group, s.m, caps);
    let bk_count = s.batch * s.kv_heads;
    for bk0 in (0..bk_count).step_by(max_wg) {
        let nbk = max_wg.min(bk_count - bk0);
        for (n, &(g0, g1, r0, nr)) in kv_passes.iter().enumerate() {
            let mut p = AttnParams {
                bh_offset: bk0 as u32,
                bh_count: nbk as u32,
                key_begin: g0,
                key_end: g1,
                row_offset: r0,
                rows: nr,
                ..base
            };
            if n > 0 {
                p.flags |= flags::ACCUMULATE;
            }
            let mut buffers = inputs.to_vec();
            buffers.extend([dk, dv]);
            program.dispatch(kv, &p, [key_groups, 1, nbk as u32], &buffers);
        }
    }

    // dQ: passes over keys under the loop cap, for chunks of rows and heads the grid holds.
    let bc = tile_rows("grad_q tiles of K and V rows", 4 * (dk4 + dv4), caps)?;
    let qk = GradQ {
        dk: 4 * dk4,
        dv: 4 * dv4,
        bc,
        masked,
        storage,
    };
    let per_pass = caps.loop_len(&qk.loop_cost(&base).0);
    let bc_keys = bc as usize;
    let keys_per_pass =
        (usize::try_from(per_pass).unwrap_or(usize::MAX) / bc_keys * bc_keys).max(bc_keys);
    let rows_per_chunk = max_wg * GRAD_WG;
    for bh0 in (0..s.bh()).step_by(max_wg) {
        let nbh = max_wg.min(s.bh() - bh0);
        for r0 in (0..s.m).step_by(rows_per_chunk) {
            let nr = rows_per_chunk.min(s.m - r0);
            for (n, k0) in (0..s.n).step_by(keys_per_pass).enumerate() {
                let mut p = AttnParams {
                    bh_offset: bh0 as u32,
                    bh_count: nbh as u32,
                    row_offset: r0 as u32,
                    rows: nr as u32,
                    key_begin: k0 as u32,
                    key_end: s.n.min(k0 + keys_per_pass) as u32,
                    ..base
                };
                if n > 0 {
                    p.flags |= flags::ACCUMULATE;
                }
                let mut buffers = inputs.to_vec();
                buffers.push(dq);
                let grid = [nr.div_ceil(GRAD_WG) as u32, 1, nbh as u32];
                program.dispatch(qk, &p, grid, &buffers);
            }
        }
    }

    let mut bias_note = String::new();
    if let (Some(out), Some(dims)) = (io.dbias, req.masks.bias_dims) {
        let kernel = GradBias { storage };
        let summed = (s.batch / dims[0]) * (s.q_heads / dims[1]) * (s.m / dims[2]);
        let per_pass = caps.loop_len(&kernel.loop_cost(&base).0);
        let per_pass = usize::try_from(per_pass).unwrap_or(usize::MAX).max(1);
        let grid = fold_grid("grad_bias", elems(dims), caps)?;
        for (n, t0) in (0..summed).step_by(per_pass).enumerate() {
            let mut p = AttnParams {
                key_begin: t0 as u32,
                key_end: summed.min(t0 + per_pass) as u32,
                ..base
            };
            if n > 0 {
                p.flags |= flags::ACCUMULATE;
            }
            let mut buffers = inputs.to_vec();
            buffers.push(out);
            program.dispatch(kernel, &p, grid, &buffers);
        }
        bias_note = format!("; dbias {dims:?} sums {summed} (batch, head, row) triples each");
    }

    for (from, to, n) in packs {
        pack(program, n, grad_dtype, [from, to], caps)?;
    }
    Ok(format!(
        "grad_kv: 64 keys a workgroup, {br}-row Q/dO tiles, {} pass(es); grad_q: 64 rows a \
         workgroup, {bc}-key K/V tiles, ≤{keys_per_pass} keys a pass; scratch D and dO {}{bias_note}",
        kv_passes.len(),
        human_bytes(bytes(rows + elems(s.o_dims()))),
    ))
}

/// The passes of `grad_kv` as (first head of the group, one past the last, first row, rows):
/// the whole group and all rows in one where the loop cap allows, else one head at a time
/// in row ranges of whole tiles (where not even one tile fits, check_loops refuses the plan
/// with the cap).
fn kv_passes(
    kernel: &GradKv,
    base: &AttnParams,
    group: usize,
    m: usize,
    caps: &DeviceCaps,
) -> Vec<(u32, u32, u32, u32)> {
    let with_heads = |heads: usize| AttnParams {
        key_begin: 0,
        key_end: heads as u32,
        rows: m as u32,
        ..*base
    };
    let whole = with_heads(group);
    let (cost, len) = kernel.loop_cost(&whole);
    if len <= caps.loop_len(&cost) {
        return vec![(0, group as u32, 0, m as u32)];
    }
    let one = kernel.loop_cost(&with_heads(1)).0;
    let br = kernel.br as usize;
    let rows = (usize::try_from(caps.loop_len(&one)).unwrap_or(usize::MAX) / br * br).max(br);
    let mut passes = Vec::new();
    for g in 0..group as u32 {
        for r0 in (0..m).step_by(rows) {
            passes.push((g, g + 1, r0 as u32, rows.min(m - r0) as u32));
        }
    }
    passes
}
