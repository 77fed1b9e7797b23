//! CPU twin of `shaders/graph_grad_q.wgsl`: each (destination, head)'s tiles of 64 edges, the
//! lanes of a workgroup walked one after another (per-edge terms by the edge's lane, then dQ
//! and d edge features by each lane's dims).

use crate::cpu::graph_attention::edge_logit;
use crate::cpu::mask::REMOVED_BELOW;
use crate::cpu::widen;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::graph_grad_q::GraphGradQ;
use crate::params::{graph_flags, GraphParams};

/// P of a logit `s` under the destination's LSE `l` (the shader's `edge_weight`).
fn edge_weight(s: f32, l: f32) -> f32 {
    if l <= REMOVED_BELOW || s <= REMOVED_BELOW {
        return 0.0;
    }
    (s - l).exp().min(1.0)
}

/// dO·(v + f) over d_v in vec4 steps, dO scaled by `gs` (the shader's `edge_dp`).
fn edge_dp(
    p: &GraphParams,
    [v, features, d_o]: [&[f32]; 3],
    (do_base, v_base, f_base): (usize, usize, usize),
    gs: f32,
) -> f32 {
    let dv = p.d_v as usize;
    let load4 = |x: &[f32], base: usize, d: usize| -> [f32; 4] {
        std::array::from_fn(|u| if d + u < dv { x[base + d + u] } else { 0.0 })
    };
    let mut x = 0.0f32;
    for d in (0..dv).step_by(4) {
        let mut u = load4(v, v_base, d);
        if p.flags & graph_flags::EDGE_FEATURES != 0 {
            let f = load4(features, f_base, d);
            u = std::array::from_fn(|c| u[c] + f[c]);
        }
        let g = load4(d_o, do_base, d);
        x += g[0] * u[0] + g[1] * u[1] + g[2] * u[2] + g[3] * u[3];
    }
    x * gs
}

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, row_ptr, col_idx, edge_id,
/// bias, edge_attr, lse, d_o → delta, dq, p_edge, ds_edge, d_edge_attr.
pub fn run(p: &GraphParams, spec: GraphGradQ, buffers: &mut [Vec<u32>]) {
    let [q, k, v, row_ptr, col_idx, edge_id, bias, edge_attr, lse, d_o, delta, dq, p_edge, ds_edge, d_edge_attr] =
        buffers
    else {
        crate::cpu::arity("graph_grad_q", buffers.len())
    };
    let (q, k, v) = (
        widen(spec.storage, q),
        widen(spec.storage, k),
        widen(spec.storage, v),
    );
    let bias: &[f32] = bytemuck::cast_slice(bias);
    let features: &[f32] = bytemuck::cast_slice(edge_attr);
    let lse: &[f32] = bytemuck::cast_slice(lse);
    let d_o: &[f32] = bytemuck::cast_slice(d_o);
    let delta: &mut [f32] = bytemuck::cast_slice_mut(delta);
    let dq: &mut [f32] = bytemuck::cast_slice_mut(dq);
    let p_edge: &mut [f32] = bytemuck::cast_slice_mut(p_edge);
    let ds_edge: &mut [f32] = bytemuck::cast_slice_mut(ds_edge);
    let d_edge_attr: &mut [f32] = bytemuck::cast_slice_mut(d_edge_attr);
    let (heads, kv_heads) = (p.heads as usize, p.kv_heads as usize);
    let (dk, dv, m) = (p.d_k as usize, p.d_v as usize, p.m as usize);
    let features_on = p.flags & graph_flags::EDGE_FEATURES != 0;
    let mean = p.flags & graph_flags::MEAN_HEADS != 0;
    let accumulate = p.flags & graph_flags::ACCUMULATE != 0;
    let gs = if mean { 1.0 / heads as f32 } else { 1.0 };
    let wg = GRAPH_WG as usize;
    let slots = spec.slots as usize;
    for i in 0..p.items as usize {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let end = row_ptr[i + 1] as usize;
            let e0 = (row_ptr[i] as usize + p.offset as usize).min(end);
            let e1 = e0 + (p.max_len as usize).min(end - e0);
            let l = lse[h * m + i];
            let q_base = (i * heads + h) * dk;
            let do_base = if mean { i * dv } else { (i * heads + h) * dv };
            let logit = |e: usize, j: usize| {
                let rows = (q_base, (j * kv_heads + kvh) * dk);
                edge_logit(p, [&q, &k, features, bias], rows, e, h)
            };
            let dp = |e: usize, j: usize| {
                let bases = (do_base, (j * kv_heads + kvh) * dv, (e * heads + h) * dv);
                edge_dp(p, [&v, features, d_o], bases, gs)
            };
            // Each lane's dims of q and dO, and its dQ sums.
            let lane_dims = |li: usize| (0..slots).map(move |u| li + wg * u);
            let qd = |d: usize| if d < dk { q[q_base + d] } else { 0.0 };
            let gd = |d: usize| if d < dv { d_o[do_base + d] * gs } else { 0.0 };
            let mut acc = vec![vec![0.0f32; slots]; wg];
            if spec.delta_pass {
                let mut sh = vec![0.0f32; wg];
                for (li, part) in sh.iter_mut().enumerate() {
                    let mut e = e0 + li;
                    while e < e1 {
                        let j = col_idx[e] as usize;
                        let w = edge_weight(logit(e, j), l);
                        if w > 0.0 {
                            *part += w * dp(e, j);
                        }
                        e += wg;
                    }
                }
                let mut half = wg / 2;
                while half > 0 {
                    for li in 0..half {
                        sh[li] += sh[li + half];
                    }
                    half /= 2;
                }
                let at = h * m + i;
                delta[at] = if accumulate { delta[at] } else { 0.0 } + sh[0];
                continue;
            }
            let big_d = delta[h * m + i];
            let mut t0 = e0;
            while t0 < e1 {
                let len = wg.min(e1 - t0);
                let (mut sh_p, mut sh_ds, mut sh_j) =
                    (vec![0.0f32; wg], vec![0.0f32; wg], vec![0; wg]);
                for li in 0..len {
                    let e = t0 + li;
                    let j = col_idx[e] as usize;
                    let w = edge_weight(logit(e, j), l);
                    let ds = if w > 0.0 { w * (dp(e, j) - big_d) } else { 0.0 };
                    let at = edge_id[e] as usize * heads + h;
                    p_edge[at] = w;
                    ds_edge[at] = ds;
                    (sh_p[li], sh_ds[li], sh_j[li]) = (w, ds, j);
                }
                for (li, acc) in acc.iter_mut().enumerate() {
                    for t in 0..len {
                        let e = t0 + t;
                        let k_base = (sh_j[t] * kv_heads + kvh) * dk;
                        let f_base = (e * heads + h) * dk;
                        let df_base = (edge_id[e] as usize * heads + h) * dk;
                        for (u, d) in lane_dims(li).enumerate() {
                            if d < dk {
                                let mut key = k[k_base + d];
                                if features_on {
                                    key += features[f_base + d];
                                    d_edge_attr[df_base + d] =
                                        p.scale * sh_ds[t] * qd(d) + sh_p[t] * gd(d);
                                }
                                acc[u] = sh_ds[t].mul_add(key, acc[u]);
                            }
                        }
                    }
                }
                t0 += wg;
            }
            for (li, acc) in acc.iter().enumerate() {
                for (u, d) in lane_dims(li).enumerate() {
                    if d < dk {
                        let before = if accumulate { dq[q_base + d] } else { 0.0 };
                        dq[q_base + d] = before + p.scale * acc[u];
                    }
                }
            }
        }
    }
}
