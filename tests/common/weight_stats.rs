//! The f64 reference of the statistics and pooled maps of P, and their error budget.

use xattn::{AttnShape, HostOutput, Pool, PoolOp};

/// The reference statistics of `weights [bh, M, N]` (f64): entropy and focus per row,
/// coverage per key, and the pooled map of `pool`.
pub struct Want {
    pub entropy: Vec<f64>,
    pub focus: Vec<f64>,
    pub coverage: Vec<f64>,
    pub pooled: Vec<f64>,
}

pub fn want(s: &AttnShape, w: &[f64], pool: Pool) -> Want {
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
    let (br, bc) = pool.block(m, n);
    let (gr, gc) = pool.grid(m, n);
    let mut pooled = Vec::with_capacity(s.bh() * gr * gc);
    for head in w.chunks(m * n) {
        for r in 0..gr {
            for c in 0..gc {
                let block = (r * br..((r + 1) * br).min(m))
                    .flat_map(|i| (c * bc..((c + 1) * bc).min(n)).map(move |j| head[i * n + j]));
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
    Want {
        entropy,
        focus,
        coverage,
        pooled,
    }
}

/// Checks each value against `want` within `rel · tol_scale(want)`: removed keys and empty
/// rows must come out exactly 0.
pub fn check(what: &str, got: &[f32], want: &[f64], tol: impl Fn(f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol(w),
            "{what}[{i}]: got {g}, want {w} (error {err:e} over {:e})",
            tol(w)
        );
    }
}

/// Every statistic of `got` against the reference weights `w`. Error budget: P is rebuilt
/// from a logit recomputed in f32 (off by ≤ `base`, the attention budget's logit term) and the
/// path's LSE (off by ≤ 10·base, what the masking tests allow it), so each P is off by a
/// relative `rel` = 11·base; a sum over K terms adds K·ε relative; an entropy term
/// p·(LSE − s) is off by p·rel·(1 + |LSE − s|), which sums to rel·(1 + H).
pub fn check_stats(what: &str, s: &AttnShape, got: &HostOutput, w: &[f64], pool: Pool, base: f64) {
    let want = want(s, w, pool);
    let rel = 11.0 * base;
    let eps = f64::from(f32::EPSILON);
    let st = &got.stats;
    let part = |name: &str, t: &Option<Vec<f32>>| -> Vec<f32> {
        t.clone()
            .unwrap_or_else(|| panic!("{what}: no {name} in the output"))
    };
    // Rows that see no key (focus 0) must have entropy exactly 0.
    let entropy_tol: Vec<f64> = want
        .entropy
        .iter()
        .zip(&want.focus)
        .map(|(&h, &f)| {
            if f > 0.0 {
                (rel + s.n as f64 * eps) * (1.0 + h)
            } else {
                0.0
            }
        })
        .collect();
    let entropy = part("entropy", &st.entropy);
    assert_eq!(entropy.len(), want.entropy.len(), "{what}: entropy length");
    for (i, (&g, (&w, &tol))) in entropy
        .iter()
        .zip(want.entropy.iter().zip(&entropy_tol))
        .enumerate()
    {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol,
            "{what} entropy[{i}]: got {g}, want {w} (error {err:e} over {tol:e})"
        );
    }
    check(
        &format!("{what} focus"),
        &part("focus", &st.focus),
        &want.focus,
        |f| rel * f,
    );
    check(
        &format!("{what} coverage"),
        &part("coverage", &st.coverage),
        &want.coverage,
        |c| (rel + s.m as f64 * eps) * c,
    );
    let (br, bc) = pool.block(s.m, s.n);
    check(
        &format!("{what} {}-pooled", pool.op.name()),
        &part("pooled", &st.pooled),
        &want.pooled,
        |p| (rel + (br * bc) as f64 * eps) * p,
    );
}
