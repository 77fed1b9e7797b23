//! Pooling a small host map down to at most `max_side` values a side.

use crate::error::{Error, Result};

pub use crate::stats::PoolOp;

/// Pools a row-major `rows × cols` map on the host so that neither side exceeds `max_side`.
///
/// Returns `(pooled, out_rows, out_cols)`, `pooled` row-major `out_rows × out_cols`.
///
/// The block rule: block height `bh = ceil(rows / max_side)`, block width
/// `bw = ceil(cols / max_side)`; output cell `(r, c)` reduces input rows `r·bh .. (r+1)·bh`
/// and columns `c·bw .. (c+1)·bw`, clipped to the map, so `out_rows = ceil(rows / bh)` and
/// `out_cols = ceil(cols / bw)` (both ≤ `max_side`). The last block of a side may be partial;
/// [`PoolOp::Mean`] averages it over the values it really holds. A side that already fits has
/// blocks of 1 on that side, so a map that fits is returned unchanged.
///
/// This is for maps already on the host and small enough to hold there (tests, the CLI on
/// small inputs); large weights are pooled on the GPU from blocks of P.
///
/// # Errors
/// [`Error::Length`] if `values.len() != rows · cols`; [`Error::Argument`] if `rows`, `cols`
/// or `max_side` is 0 or `rows · cols` overflows.
///
/// ```
/// use xattn::heatmap::{pool_host, PoolOp};
/// let v: Vec<f32> = (0..15).map(|x| x as f32).collect(); // 3 × 5
/// let (p, r, c) = pool_host(&v, 3, 5, 2, PoolOp::Max)?;   // blocks of 2 × 3
/// assert_eq!((r, c), (2, 2));
/// assert_eq!(p, [7.0, 9.0, 12.0, 14.0]);
/// # Ok::<(), xattn::Error>(())
/// ```
pub fn pool_host(
    values: &[f32],
    rows: usize,
    cols: usize,
    max_side: usize,
    op: PoolOp,
) -> Result<(Vec<f32>, usize, usize)> {
    if rows == 0 || cols == 0 || max_side == 0 {
        return Err(Error::Argument(format!(
            "pool_host: rows, cols and max_side must be at least 1, got rows = {rows}, \
             cols = {cols}, max_side = {max_side}"
        )));
    }
    let expected = rows.checked_mul(cols).ok_or_else(|| {
        Error::Argument(format!("pool_host: {rows} × {cols} values overflow usize"))
    })?;
    if values.len() != expected {
        return Err(Error::Length {
            name: "values",
            shape: vec![rows, cols],
            expected,
            got: values.len(),
        });
    }
    let (bh, bw) = (rows.div_ceil(max_side), cols.div_ceil(max_side));
    let (out_rows, out_cols) = (rows.div_ceil(bh), cols.div_ceil(bw));
    let mut out = Vec::with_capacity(out_rows * out_cols);
    for r in 0..out_rows {
        let rs = r * bh..((r + 1) * bh).min(rows);
        for c in 0..out_cols {
            let cs = c * bw..((c + 1) * bw).min(cols);
            let block = rs.clone().flat_map(|i| {
                values[i * cols + cs.start..i * cols + cs.end]
                    .iter()
                    .copied()
            });
            out.push(match op {
                PoolOp::Max => {
                    block.fold(
                        f32::NEG_INFINITY,
                        |m, v| {
                            if v.is_nan() || v > m {
                                v
                            } else {
                                m
                            }
                        },
                    )
                }
                PoolOp::Mean => {
                    let count = (rs.len() * cs.len()) as f64;
                    (block.map(f64::from).sum::<f64>() / count) as f32
                }
            });
        }
    }
    Ok((out, out_rows, out_cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_that_fits_comes_back_unchanged() {
        let v: Vec<f32> = (0..12).map(|x| x as f32 * 0.5).collect();
        for op in [PoolOp::Max, PoolOp::Mean] {
            assert_eq!(pool_host(&v, 3, 4, 4, op).unwrap(), (v.clone(), 3, 4));
        }
    }

    #[test]
    fn partial_edge_blocks_average_over_their_real_count() {
        // 1 × 5 to at most 2 wide: blocks of 3, the last holds 2 values.
        let v = [1.0, 2.0, 3.0, 10.0, 20.0];
        assert_eq!(
            pool_host(&v, 1, 5, 2, PoolOp::Mean).unwrap(),
            (vec![2.0, 15.0], 1, 2)
        );
        assert_eq!(
            pool_host(&v, 1, 5, 2, PoolOp::Max).unwrap(),
            (vec![3.0, 20.0], 1, 2)
        );
        // Rows pooled, columns kept: 5 × 1 to at most 2 tall.
        assert_eq!(
            pool_host(&v, 5, 1, 2, PoolOp::Mean).unwrap(),
            (vec![2.0, 15.0], 2, 1)
        );
    }

    #[test]
    fn max_keeps_a_nan_so_the_renderer_can_report_it() {
        let v = [1.0, f32::NAN, 3.0, 4.0];
        let (p, _, _) = pool_host(&v, 2, 2, 1, PoolOp::Max).unwrap();
        assert!(p[0].is_nan());
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        assert!(matches!(
            pool_host(&[1.0; 5], 2, 3, 2, PoolOp::Max),
            Err(Error::Length {
                expected: 6,
                got: 5,
                ..
            })
        ));
        for (r, c, s) in [(0, 3, 2), (2, 0, 2), (2, 3, 0)] {
            assert!(matches!(
                pool_host(&[], r, c, s, PoolOp::Mean),
                Err(Error::Argument(_))
            ));
        }
        assert!(matches!(
            pool_host(&[], usize::MAX, 2, 2, PoolOp::Mean),
            Err(Error::Argument(_))
        ));
        assert!(matches!("sum".parse::<PoolOp>(), Err(Error::Argument(_))));
        assert_eq!("mean".parse::<PoolOp>().unwrap(), PoolOp::Mean);
    }
}
