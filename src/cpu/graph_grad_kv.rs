//! CPU twin of `shaders/graph_grad_kv.wgsl`: each (source, K/V head)'s out-edges in tiles of
//! 64 per query head of the group, summed by each lane's dims.

use crate::cpu::widen;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::graph_grad_kv::GraphGradKv;
use crate::params::{graph_flags, GraphParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, d_o, src_ptr, out_edges, p_edge,
/// ds_edge → dk, dv.
pub fn run(p: &GraphParams, spec: GraphGradKv, buffers: &mut [Vec<u32>]) {
    let [q, d_o, src_ptr, out_edges, p_edge, ds_edge, dk_out, dv_out] = buffers else {
        crate::cpu::arity("graph_grad_kv", buffers.len())
    };
    let q = widen(spec.storage, q);
    let d_o: &[f32] = bytemuck::cast_slice(d_o);
    let p_edge: &[f32] = bytemuck::cast_slice(p_edge);
    let ds_edge: &[f32] = bytemuck::cast_slice(ds_edge);
    let dk_out: &mut [f32] = bytemuck::cast_slice_mut(dk_out);
    let dv_out: &mut [f32] = bytemuck::cast_slice_mut(dv_out);
    let (heads, kv_heads) = (p.heads as usize, p.kv_heads as usize);
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let group = heads / kv_heads;
    let mean = p.flags & graph_flags::MEAN_HEADS != 0;
    let accumulate = p.flags & graph_flags::ACCUMULATE != 0;
    let wg = GRAPH_WG as usize;
    let slots = spec.slots as usize;
    for j in 0..p.items as usize {
        for kvh in 0..kv_heads {
            let end = src_ptr[j + 1] as usize;
            let e0 = (src_ptr[j] as usize + p.offset as usize).min(end);
            let e1 = e0 + (p.max_len as usize).min(end - e0);
            let mut acc_k = vec![vec![0.0f32; slots]; wg];
            let mut acc_v = vec![vec![0.0f32; slots]; wg];
            for hh in 0..group {
                let h = kvh * group + hh;
                let mut t0 = e0;
                while t0 < e1 {
                    let len = wg.min(e1 - t0);
                    let (mut sh_p, mut sh_ds, mut sh_i) =
                        (vec![0.0f32; wg], vec![0.0f32; wg], vec![0usize; wg]);
                    for li in 0..len {
                        let slot = out_edges[2 * (t0 + li)] as usize;
                        sh_i[li] = out_edges[2 * (t0 + li) + 1] as usize;
                        sh_p[li] = p_edge[slot * heads + h];
                        sh_ds[li] = ds_edge[slot * heads + h];
                    }
                    for li in 0..wg {
                        for t in 0..len {
                            let q_base = (sh_i[t] * heads + h) * dk;
                            let do_base = if mean {
                                sh_i[t] * dv
                            } else {
                                (sh_i[t] * heads + h) * dv
                            };
                            for u in 0..slots {
                                let d = li + wg * u;
                                if d < dk {
                                    acc_k[li][u] = sh_ds[t].mul_add(q[q_base + d], acc_k[li][u]);
                                }
                                if d < dv {
                                    acc_v[li][u] = sh_p[t].mul_add(d_o[do_base + d], acc_v[li][u]);
                                }
                            }
                        }
                    }
                    t0 += wg;
                }
            }
            let gs = if mean { 1.0 / heads as f32 } else { 1.0 };
            for li in 0..wg {
                for u in 0..slots {
                    let d = li + wg * u;
                    if d < dk {
                        let at = (j * kv_heads + kvh) * dk + d;
                        let before = if accumulate { dk_out[at] } else { 0.0 };
                        dk_out[at] = before + p.scale * acc_k[li][u];
                    }
                    if d < dv {
                        let at = (j * kv_heads + kvh) * dv + d;
                        let before = if accumulate { dv_out[at] } else { 0.0 };
                        dv_out[at] = before + gs * acc_v[li][u];
                    }
                }
            }
        }
    }
}
