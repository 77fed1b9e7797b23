//! The f64 reference of the statistics and pooled maps of P, and their error budget.

use xattn::{AttnShape, HostOutput, Pool, PoolOp, StatsOutput};

/// The reference statistics of `weights [bh, M, N]` (f64): entropy and focus per row,
/// coverage per key, and the pooled map of `pool` (empty without one).
pub struct Want {
    pub entropy: Vec<f64>,
    pub focus: Vec<f64>,
    pub coverage: Vec<f64>,
    pub pooled: Vec<f64>,
}

pub fn want(s: &AttnShape, w: &[f64], pool: Option<Pool>) -> Want {
    let (m, n) = (s.m, s.n);
    let rows = w.chunks(n);
    let entropy = rows
        .clone()
        .map(|r| r.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum())
        .collect();
    let focus = rows
        .map(|r| r.iter().cloned().fold(0.0, f64::max))
        .collect();
    let mut coverage = vec![0.0; s.bh() * n];
    for (bh, head) in w.chunks(m * n).enumerate() {
        for row in head.chunks(n) {
            for (c, p) in coverage[bh * n..][..n].iter_mut().zip(row) {
                *c += p;
            }
        }
    }
    let mut pooled = Vec::new();
    if let Some(pool) = pool {
        let (br, bc) = pool.block(m, n);
        let (gr, gc) = pool.grid(m, n);
        for head in w.chunks(m * n) {
            for r in 0..gr {
                for c in 0..gc {
                    let block = (r * br..((r + 1) * br).min(m)).flat_map(|i| {
                        (c * bc..((c + 1) * bc).min(n)).map(move |j| head[i * n + j])
                    });
                    pooled.push(match pool.op {
                        PoolOp::Max => block.fold(0.0, f64::max),
                        PoolOp::Mean => {
                            let (sum, count) = block.fold((0.0, 0), |(s, k), p| (s + p, k + 1));
                            sum / f64::from(count)
                        }
                    });
                }
            }
        }
    }
    Want {
        entropy,
        focus,
        coverage,
        pooled,
    }
}

/// Checks each value `i` against `want[i]` within `tol(i, want[i])`.
pub fn check(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize, f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        let tol = tol(i, w);
        assert!(
            err <= tol,
            "{what}[{i}]: got {g}, want {w} (error {err:e} over {tol:e})"
        );
    }
}

/// Every statistic of `got` against the reference weights `w`: all four must be there.
pub fn check_stats(what: &str, s: &AttnShape, got: &HostOutput, w: &[f64], pool: Pool, base: f64) {
    for (name, t) in got.stats.named() {
        assert!(t.is_some(), "{what}: no {name} in the output");
    }
    check_present_stats(what, s, &got.stats, w, Some(pool), base);
}

/// The statistics present in `got` against the reference weights `w` (the pooled map with
/// `pool`). Error budget: P is rebuilt from a logit recomputed in f32 (off by ≤ `base`, the
/// attention budget's logit term) and the path's LSE (off by ≤ 10·base, what the masking tests
/// allow it), so each P is off by a relative `rel` = 11·base; a sum over K terms adds K·ε
/// relative; an entropy term p·(LSE − s) is off by p·rel·(1 + |LSE − s|), which sums to
/// rel·(1 + H). Rows that see no key (focus 0) must have entropy exactly 0.
pub fn check_present_stats(
    what: &str,
    s: &AttnShape,
    got: &StatsOutput<Vec<f32>>,
    w: &[f64],
    pool: Option<Pool>,
    base: f64,
) {
    let want = want(s, w, pool);
    let rel = 11.0 * base;
    let eps = f64::from(f32::EPSILON);
    if let Some(entropy) = &got.entropy {
        check(
            &format!("{what} entropy"),
            entropy,
            &want.entropy,
            |i, h| {
                if want.focus[i] > 0.0 {
                    (rel + s.n as f64 * eps) * (1.0 + h)
                } else {
                    0.0
                }
            },
        );
    }
    if let Some(focus) = &got.focus {
        check(&format!("{what} focus"), focus, &want.focus, |_, f| rel * f);
    }
    if let Some(coverage) = &got.coverage {
        check(
            &format!("{what} coverage"),
            coverage,
            &want.coverage,
            |_, c| (rel + s.m as f64 * eps) * c,
        );
    }
    if let Some(pooled) = &got.pooled {
        let pool = pool.expect("a pooled map is checked against its pool");
        let (br, bc) = pool.block(s.m, s.n);
        check(
            &format!("{what} {}-pooled", pool.op.name()),
            pooled,
            &want.pooled,
            |_, p| (rel + (br * bc) as f64 * eps) * p,
        );
    }
}
