//! CPU twin of `shaders/graph_stats.wgsl`: each (segment, head)'s lanes walked one after
//! another, then the same tree over them.

use crate::cpu::graph_attention::edge_logit;
use crate::cpu::mask::REMOVED_BELOW;
use crate::cpu::widen;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::graph_stats::GraphStats;
use crate::params::GraphParams;

/// Runs the twin on the kernel's bindings 1.. as words: q, k, col_idx, dst, perm, ptr, bias,
/// edge_attr, lse → out_a, out_b.
pub fn run(p: &GraphParams, spec: GraphStats, buffers: &mut [Vec<u32>]) {
    let [q, k, col_idx, dst, perm, ptr, bias, edge_attr, lse, out_a, out_b] = buffers else {
        crate::cpu::arity("graph_stats", buffers.len())
    };
    let (q, k) = (widen(spec.storage, q), widen(spec.storage, k));
    let bias: &[f32] = bytemuck::cast_slice(bias);
    let features: &[f32] = bytemuck::cast_slice(edge_attr);
    let lse: &[f32] = bytemuck::cast_slice(lse);
    let out_a: &mut [f32] = bytemuck::cast_slice_mut(out_a);
    let out_b: &mut [f32] = bytemuck::cast_slice_mut(out_b);
    let (heads, kv_heads, dk) = (p.heads as usize, p.kv_heads as usize, p.d_k as usize);
    let weight = |e: usize, j: usize, i: usize, h: usize| -> f32 {
        let l = lse[h * p.m as usize + i];
        if l <= REMOVED_BELOW {
            return 0.0;
        }
        let kvh = h / (heads / kv_heads);
        let rows = ((i * heads + h) * dk, (j * kv_heads + kvh) * dk);
        let s = edge_logit(p, [&q, &k, features, bias], rows, e, h);
        if s <= REMOVED_BELOW {
            return 0.0;
        }
        (s - l).exp().min(1.0)
    };
    let wg = GRAPH_WG as usize;
    let segments = p.items as usize;
    for seg in 0..segments {
        for h in 0..heads {
            let (mut sh_a, mut sh_b) = (vec![0.0f32; wg], vec![0.0f32; wg]);
            for li in 0..wg {
                let (mut a, mut b) = (0.0f32, 0.0f32);
                let mut t = ptr[seg] as usize + li;
                while t < ptr[seg + 1] as usize {
                    if spec.by_source {
                        let e = perm[t] as usize;
                        a += weight(e, seg, dst[e] as usize, h);
                    } else {
                        let w = weight(t, col_idx[t] as usize, seg, h);
                        if w > 0.0 {
                            a -= w * w.ln();
                        }
                        b = b.max(w);
                    }
                    t += wg;
                }
                sh_a[li] = a;
                sh_b[li] = b;
            }
            let mut half = wg / 2;
            while half > 0 {
                for li in 0..half {
                    sh_a[li] += sh_a[li + half];
                    sh_b[li] = sh_b[li].max(sh_b[li + half]);
                }
                half /= 2;
            }
            out_a[h * segments + seg] = sh_a[0];
            if !spec.by_source {
                out_b[h * segments + seg] = sh_b[0];
            }
        }
    }
}
