//! CPU twin of `shaders/merge_partials.wgsl`: exact merge of partial (O, statistics), one
//! output element at a time; a slice with keys weighs at least [`MIN_WEIGHT`].

use crate::cpu::mask::{MASKED, MIN_WEIGHT, REMOVED_BELOW};
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: partial o, partial stats → o, lse
/// (and row parts → row out where split-K's row statistics are merged).
pub fn run(p: &AttnParams, buffers: &mut [Vec<u32>]) {
    use bytemuck::{cast_slice as f, cast_slice_mut as fm};
    match buffers {
        [part_o, part_stats, o, lse] => {
            merge_partials(p, (f(part_o), f(part_stats), None), (fm(o), fm(lse), None))
        }
        [part_o, part_stats, o, lse, row_parts, row_out] => merge_partials(
            p,
            (f(part_o), f(part_stats), Some(f(row_parts))),
            (fm(o), fm(lse), Some(fm(row_out))),
        ),
        _ => crate::cpu::arity("merge_partials", buffers.len()),
    }
}

/// Merges `o_parts [n_splits, batch, M, q_heads, d_v]` with `stats` (LSE `[n_splits, batch,
/// q_heads, M]`, or with `flags::SPLIT_STATS` max and ln(sum) `[n_splits, 2, batch, q_heads, M]`)
/// into `o [batch, M, q_heads, d_v]` and `lse [batch, q_heads, M]`; with `row_parts`
/// (each split's entropy and focus, `[n_splits, 2, rows]`), their merge into `row_out [2,
/// rows]`.
pub fn merge_partials(
    p: &AttnParams,
    (o_parts, stats, row_parts): (&[f32], &[f32], Option<&[f32]>),
    (o, lse, mut row_out): (&mut [f32], &mut [f32], Option<&mut [f32]>),
) {
    let rows = (p.batch * p.m * p.q_heads) as usize;
    let dv = p.d_v as usize;
    let splits = p.n_splits as usize;
    for at in 0..rows * dv {
        let (idx, d) = (at / dv, at % dv);
        let h = idx % p.q_heads as usize;
        let i = (idx / p.q_heads as usize) % p.m as usize;
        let b = idx / (p.q_heads * p.m) as usize;
        let lrow = (b * p.q_heads as usize + h) * p.m as usize + i;
        let slice = |s: usize| {
            if p.flags & flags::SPLIT_STATS != 0 {
                (stats[2 * s * rows + lrow], stats[(2 * s + 1) * rows + lrow])
            } else {
                (stats[s * rows + lrow], 0.0)
            }
        };
        let mx = (0..splits).map(|s| slice(s).0).fold(MASKED, f32::max);
        let (mut total, mut acc) = (0.0f32, 0.0f32);
        for s in 0..splits {
            let (max, log_sum) = slice(s);
            if max > REMOVED_BELOW {
                let w = ((max - mx) + log_sum).exp().max(MIN_WEIGHT);
                total += w;
                acc += w * o_parts[s * rows * dv + at];
            }
        }
        let (out, out_lse) = if total > 0.0 {
            (acc / total, mx + total.ln())
        } else {
            (0.0, f32::NEG_INFINITY)
        };
        o[at] = out;
        if d == 0 {
            lse[lrow] = out_lse;
            if let (Some(parts), Some(out)) = (row_parts, row_out.as_deref_mut()) {
                let (mut entropy, mut focus) = (0.0f32, 0.0f32);
                if total > 0.0 {
                    let ln_total = total.ln();
                    for s in 0..splits {
                        let (max, log_sum) = slice(s);
                        if max > REMOVED_BELOW {
                            let ln_w = (max - mx) + log_sum - ln_total;
                            let w = ln_w.exp();
                            entropy += w * (parts[2 * s * rows + lrow] - ln_w);
                            focus = focus.max(w * parts[(2 * s + 1) * rows + lrow]);
                        }
                    }
                }
                out[lrow] = entropy;
                out[rows + lrow] = focus;
            }
        }
    }
}
