//! CPU twin of `shaders/graph_attention.wgsl`: each (work item, head)'s online softmax over
//! tiles of 64 edges, the lanes of a workgroup walked one after another.

use crate::cpu::mask::{MASKED, MIN_WEIGHT, REMOVED_BELOW};
use crate::cpu::widen;
use crate::kernels::graph_attention::{GraphAttention, GRAPH_WG};
use crate::mask::BIAS_REMOVES;
use crate::params::{graph_flags, GraphParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, row_ptr, col_idx, chunks,
/// bias, edge_attr → o, lse.
pub fn run(p: &GraphParams, spec: GraphAttention, buffers: &mut [Vec<u32>]) {
    let [q, k, v, row_ptr, col_idx, chunks, bias, edge_attr, o, lse] = buffers else {
        crate::cpu::arity("graph_attention", buffers.len())
    };
    let (q, k, v) = (
        widen(spec.storage, q),
        widen(spec.storage, k),
        widen(spec.storage, v),
    );
    let bias: &[f32] = bytemuck::cast_slice(bias);
    let features: &[f32] = bytemuck::cast_slice(edge_attr);
    let o: &mut [f32] = bytemuck::cast_slice_mut(o);
    let lse: &mut [f32] = bytemuck::cast_slice_mut(lse);
    let (heads, kv_heads) = (p.heads as usize, p.kv_heads as usize);
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let has_features = p.flags & graph_flags::EDGE_FEATURES != 0;
    let wg = GRAPH_WG as usize;
    for item in 0..p.items as usize {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let (dst, e0, e1) = if spec.split {
                let (dst, e0) = (chunks[2 * item] as usize, chunks[2 * item + 1] as usize);
                let end = (e0 + p.max_len as usize).min(row_ptr[dst + 1] as usize);
                (dst, e0, end)
            } else {
                (item, row_ptr[item] as usize, row_ptr[item + 1] as usize)
            };
            let q_base = (dst * heads + h) * dk;
            let (mut m, mut l) = (MASKED, 0.0f32);
            let mut acc = vec![0.0f32; dv];
            let mut t0 = e0;
            while t0 < e1 {
                let len = wg.min(e1 - t0);
                // Each lane's score and source.
                let mut sh_s = vec![MASKED; wg];
                let mut sh_j = vec![0usize; wg];
                for li in 0..len {
                    let e = t0 + li;
                    let j = col_idx[e] as usize;
                    let rows = (q_base, (j * kv_heads + kvh) * dk);
                    let s = edge_logit(p, [&q, &k, features, bias], rows, e, h);
                    sh_s[li] = s;
                    sh_j[li] = j;
                }
                let tmax = sh_s[..len].iter().fold(m, |a, &s| a.max(s));
                let sh_w: Vec<f32> = sh_s
                    .iter()
                    .map(|&s| {
                        if s > REMOVED_BELOW {
                            (s - tmax).exp().max(MIN_WEIGHT)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let alpha = (m - tmax).exp().max(MIN_WEIGHT);
                l *= alpha;
                acc.iter_mut().for_each(|a| *a *= alpha);
                for t in 0..len {
                    let w = sh_w[t];
                    if w > 0.0 {
                        l += w;
                        let row = (sh_j[t] * kv_heads + kvh) * dv;
                        let frow = ((t0 + t) * heads + h) * dv;
                        for (d, a) in acc.iter_mut().enumerate() {
                            let mut x = v[row + d];
                            if has_features {
                                x += features[frow + d];
                            }
                            *a = w.mul_add(x, *a);
                        }
                    }
                }
                m = tmax;
                t0 += wg;
            }
            let (inv, row_max, log_sum) = if l > 0.0 {
                (1.0 / l, m, l.ln())
            } else {
                (0.0, f32::NEG_INFINITY, 0.0)
            };
            let row = (item * heads + h) * dv;
            for (d, a) in acc.iter().enumerate() {
                o[row + d] = a * inv;
            }
            if spec.split {
                lse[2 * (item * heads + h)] = row_max;
                lse[2 * (item * heads + h) + 1] = log_sum;
            } else {
                lse[h * p.m as usize + dst] = row_max + log_sum;
            }
        }
    }
}

/// The twin of `edge_logit` (`shaders/common/graph_logit.wgsl`): scale·q·(k + f[e, h])
/// (+ bias[e, h]) for the Q row at `q_base` and the K row at `k_base` of edge e, head h, as
/// f32 over vec4 steps; MASKED where the bias removes the edge.
pub fn edge_logit(
    p: &GraphParams,
    [q, k, features, bias]: [&[f32]; 4],
    (q_base, k_base): (usize, usize),
    e: usize,
    h: usize,
) -> f32 {
    let (heads, dk) = (p.heads as usize, p.d_k as usize);
    // load4 of a row at `base`: zero past the row's end.
    let load4 = |x: &[f32], base: usize, d: usize| -> [f32; 4] {
        std::array::from_fn(|u| if d + u < dk { x[base + d + u] } else { 0.0 })
    };
    let f_base = (e * heads + h) * dk;
    let mut x = 0.0f32;
    for d in (0..dk).step_by(4) {
        let mut key = load4(k, k_base, d);
        if p.flags & graph_flags::EDGE_FEATURES != 0 {
            let f = load4(features, f_base, d);
            key = std::array::from_fn(|u| key[u] + f[u]);
        }
        let a = load4(q, q_base, d);
        x += a[0] * key[0] + a[1] * key[1] + a[2] * key[2] + a[3] * key[3];
    }
    let s = x * p.scale;
    if p.flags & graph_flags::BIAS == 0 {
        return s;
    }
    let b = bias[e * heads + h];
    if b <= BIAS_REMOVES {
        MASKED
    } else {
        s + b
    }
}
