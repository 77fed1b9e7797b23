//! `linear`'s backward in tests: its program on declared buffers, the f32 error bound of each
//! gradient element and a per-element comparison.

use xattn::plan::layer::linear_backward;
use xattn::plan::DeviceCaps;
use xattn::program::{BufferId, Program};
use xattn::DType;

/// The backward program of `x [rows, in] → y [rows, out]` with its buffers
/// `[x, w, dy, dx, dw, db]` (`db` absent without a bias), as a layer would declare them.
pub fn backward_program(
    (rows, in_dim, out_dim): (usize, usize, usize),
    (x_type, w_type): (DType, DType),
    bias: bool,
    caps: &DeviceCaps,
) -> (Program, [BufferId; 6]) {
    let mut p = Program::new();
    let f32s = |n: usize| n as u64 * 4;
    let x = p.input("x", x_type.bytes(rows * in_dim));
    let w = p.input("w", w_type.bytes(out_dim * in_dim));
    let dy = p.input("dy", f32s(rows * out_dim));
    let dx = p.output("dx", f32s(rows * in_dim));
    let dw = p.output("dw", f32s(out_dim * in_dim));
    let db = if bias {
        p.output("db", f32s(out_dim))
    } else {
        p.absent("db")
    };
    let ids = [x, w, dy, dx, dw, db];
    linear_backward(
        &mut p,
        (rows, in_dim, out_dim),
        ids,
        (x_type, w_type),
        bias,
        caps,
    )
    .unwrap();
    xattn::plan::check_loops(&p, caps).unwrap();
    (p, ids)
}

/// The error bound of each element of `(dx, dw, db)` against the f64 reference on the same
/// (already rounded) `x`, `w` and `dy`: each element is an f32 sum of K products, each product
/// exact inside an fma and each of the K roundings off by at most ε/2 of the running sum, so
/// |error| ≤ K·(ε/2)·Σ_k |a_k·b_k| / (1 − K·ε/2) ≤ K·ε·Σ_k |a_k·b_k| (K·ε < 1). K is out for dx,
/// rows for dw and db; splitting the sum over dispatches does not change it (the later ranges
/// continue the same chain). The reference's own f64 error is ~2⁻²⁹ of this.
pub fn grad_tolerances(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (rows, in_dim, out_dim): (usize, usize, usize),
) -> [Vec<f64>; 3] {
    let eps = f64::from(f32::EPSILON);
    let abs = |a: f32, b: f32| f64::from(a).abs() * f64::from(b).abs();
    let dx = (0..rows * in_dim)
        .map(|e| {
            let (r, i) = (e / in_dim, e % in_dim);
            let sum: f64 = (0..out_dim)
                .map(|o| abs(dy[r * out_dim + o], w[o * in_dim + i]))
                .sum();
            out_dim as f64 * eps * sum
        })
        .collect();
    let dw = (0..out_dim * in_dim)
        .map(|e| {
            let (o, i) = (e / in_dim, e % in_dim);
            let sum: f64 = (0..rows)
                .map(|r| abs(dy[r * out_dim + o], x[r * in_dim + i]))
                .sum();
            rows as f64 * eps * sum
        })
        .collect();
    let db = (0..out_dim)
        .map(|o| {
            let sum: f64 = (0..rows).map(|r| abs(dy[r * out_dim + o], 1.0)).sum();
            rows as f64 * eps * sum
        })
        .collect();
    [dx, dw, db]
}

/// Asserts |got − want| ≤ tol elementwise (NaN, an unwritten poisoned element, fails);
/// reports the worst element on failure. Returns the largest error relative to its bound.
pub fn assert_close_each(what: &str, got: &[f32], want: &[f64], tol: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = (f64::from(g) - w).abs();
        if err.is_nan() || err > t {
            panic!("{what}: element {i} is {g}, reference {w} (error {err:e} > tolerance {t:e})");
        }
        if t > 0.0 {
            worst = worst.max(err / t);
        }
    }
    worst
}

/// `data` rounded to `dtype` (what a kernel reading it as `dtype` sees).
pub fn rounded(data: &[f32], dtype: DType) -> Vec<f32> {
    data.iter().map(|&v| dtype.round(v)).collect()
}
