//! Quickstart: diffusion-style cross-attention (image latents reading a text prompt) on the
//! default adapter, checked against the CPU reference.
//!
//! `cargo run --release --example quickstart`

mod common;

use rand::{Rng, SeedableRng};

fn main() -> xattn::Result<()> {
    let ctx = xattn::Context::new()?;
    println!("adapter: {}", ctx.describe());
    let engine = xattn::Engine::new(&ctx);

    // 1024 latent queries read 77 prompt tokens; 8 heads of 40 dims.
    let (b, m, n, h, d) = (1, 1024, 77, 8, 40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut rand_vec =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (q, k, v) = (
        rand_vec(b * m * h * d),
        rand_vec(b * n * h * d),
        rand_vec(b * n * h * d),
    );

    // The prompt's K/V are uploaded once and serve every denoising step.
    let k_t = engine.upload(&k, &[b, n, h, d])?;
    let v_t = engine.upload(&v, &[b, n, h, d])?;
    let q_t = engine.upload(&q, &[b, m, h, d])?;
    let opts = xattn::Attention::default();
    println!("{}", engine.plan(&q_t, &k_t, &v_t, &opts)?);

    let start = std::time::Instant::now();
    let out = engine.attention(&q_t, &k_t, &v_t, &opts)?;
    let o = out.o.to_host()?;
    println!(
        "attention B{b} H{h} M{m} N{n} d{d}: {:.2} ms (first call, includes pipeline compile)",
        start.elapsed().as_secs_f64() * 1e3
    );

    let shape = xattn::AttnShape {
        batch: b,
        m,
        n,
        q_heads: h,
        kv_heads: h,
        d_k: d,
        d_v: d,
    };
    let reference =
        xattn::cpu::reference::attention(&shape, &q, &k, &v, f64::from(opts.scale_for(d)));
    let max_err = common::max_abs_err(&o, &reference.o);
    println!("max |O − reference| = {max_err:.2e}");
    if max_err.is_nan() || max_err > 1e-4 {
        eprintln!("quickstart: result differs from the CPU reference");
        std::process::exit(1);
    }
    Ok(())
}
