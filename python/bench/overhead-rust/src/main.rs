//! The Rust side of the binding's overhead: upload Q, K, V, attention, O back to the host
//! (what `engine.attention(q, k, v, layout="bshd")` does from Python), median of the runs.
use std::time::Instant;
fn main() -> xattn::Result<()> {
    let ctx = xattn::Context::new()?;
    let engine = xattn::Engine::new(&ctx);
    for (name, [b, m, n, h, d], runs) in [
        ("small", [1usize, 1, 77, 2, 40], 200),
        ("large", [1, 1024, 77, 8, 40], 30),
    ] {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        let (q, k, v) = (
            rand(b * m * h * d),
            rand(b * n * h * d),
            rand(b * n * h * d),
        );
        let opts = xattn::Attention::default();
        let mut times = Vec::new();
        for i in 0..runs + 5 {
            let t = Instant::now();
            let (qt, kt, vt) = (
                engine.upload(&q, &[b, m, h, d])?,
                engine.upload(&k, &[b, n, h, d])?,
                engine.upload(&v, &[b, n, h, d])?,
            );
            let out = engine.attention(&qt, &kt, &vt, &opts)?;
            let o = out.o.to_host()?;
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(o.len(), b * m * h * d);
            if i >= 5 {
                times.push(dt);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "rust {name} [b {b}, m {m}, n {n}, h {h}, d {d}]: median {:.3} ms over {runs}",
            times[runs / 2] * 1e3
        );
    }
    Ok(())
}
