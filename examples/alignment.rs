//! What a decoder reads: a speech-to-text style alignment seen through the statistics of the
//! cross-attention weights, computed on the GPU without storing them.
//!
//! 48 text tokens (queries) attend to 600 audio frames (keys). The inputs are built with a
//! known monotonic alignment: token i reads the frames around its centre, which advance
//! through the audio and skip a silent stretch (frames 330..390) that no token should read.
//! The fused path computes O with every statistic and a max-pooled map of P; the example
//! writes the map as a heatmap PNG and prints how far each row's argmax lies from the true
//! alignment, how sharp the rows are (entropy, focus), and which frames nobody read
//! (coverage).
//!
//! `cargo run --release --example alignment [-- PNG]` (default: alignment.png in the system
//! temp folder). Exits with an error if the alignment is not recovered.

use std::f32::consts::PI;

use rand::{Rng, SeedableRng};
use xattn::heatmap::{render_png, HeatmapStyle};
use xattn::{Attention, AttnShape, Context, Engine, Path, Pool, PoolOp, Stats};

const TOKENS: usize = 48;
const FRAMES: usize = 600;
const DIM: usize = 64;
/// The frames no token reads.
const SILENCE: std::ops::Range<usize> = 330..390;

/// The frame token `i` is centred on: evenly through the audio with the silence left out.
fn centre(i: usize) -> f32 {
    let spoken = (FRAMES - SILENCE.len()) as f32;
    let t = (i as f32 + 0.5) / TOKENS as f32 * spoken;
    if t < SILENCE.start as f32 {
        t
    } else {
        t + SILENCE.len() as f32
    }
}

/// A sinusoidal encoding of position `x` (in frames): q·k of two encodings is
/// Σ cos(ω (x − y)), largest where x = y and falling off within a few frames.
fn encode(x: f32) -> Vec<f32> {
    (0..DIM / 2)
        .flat_map(|f| {
            let w = 2.0 * PI / (8.0 * 1.12f32.powi(f as i32));
            [(w * x).cos(), (w * x).sin()]
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let png_path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("alignment.png"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut noisy = |x: Vec<f32>, amp: f32| -> Vec<f32> {
        x.into_iter()
            .map(|v| v + rng.random_range(-amp..amp))
            .collect()
    };
    // Queries sharpened by 2: a perfect match has logit 2·(DIM/2)/√DIM = 8, a distant frame
    // about 2·√(DIM/2)·0.7/√DIM ≈ 1.
    let q: Vec<f32> = (0..TOKENS)
        .flat_map(|i| encode(centre(i)).into_iter().map(|v| 2.0 * v))
        .collect();
    let q = noisy(q, 0.05);
    let k: Vec<f32> = (0..FRAMES).flat_map(|j| encode(j as f32)).collect();
    let k = noisy(k, 0.05);
    let v = noisy(vec![0.0; FRAMES * DIM], 1.0);

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let shape = AttnShape::from_qkv(
        [1, TOKENS, 1, DIM],
        [1, FRAMES, 1, DIM],
        [1, FRAMES, 1, DIM],
    )?;
    let upload = |data: &[f32], dims: [usize; 4]| engine.upload(data, &dims);
    let (qt, kt, vt) = (
        upload(&q, shape.q_dims())?,
        upload(&k, shape.k_dims())?,
        upload(&v, shape.v_dims())?,
    );
    let pool = Pool {
        max_side: xattn::Pool::HEATMAP_SIDE,
        op: PoolOp::Max,
    };
    let opts = Attention::default()
        .with_path(Path::Fused)
        .with_stats(Stats::ALL)
        .with_pooled_weights(pool);
    let out = engine.attention(&qt, &kt, &vt, &opts)?;
    let stats = out.stats.to_host()?;
    let (entropy, focus, coverage, map) = (
        stats.entropy.expect("asked for"),
        stats.focus.expect("asked for"),
        stats.coverage.expect("asked for"),
        stats.pooled.expect("asked for"),
    );
    let (rows, cols) = pool.grid(TOKENS, FRAMES);
    let (block_rows, block_cols) = pool.block(TOKENS, FRAMES);

    // The heatmap: rows are tokens, columns frames (at most 2048 a side: here one pixel each).
    let style = HeatmapStyle {
        caption: Some(if block_rows * block_cols == 1 {
            format!("P of {TOKENS} tokens over {FRAMES} frames")
        } else {
            format!(
                "P of {TOKENS} tokens over {FRAMES} frames, {}-pooled {block_rows}x{block_cols}",
                pool.op.name()
            )
        }),
        q_labels: Some((0..rows).map(|i| format!("tok{i}")).collect()),
        ..HeatmapStyle::default()
    };
    std::fs::write(&png_path, render_png(&map, rows, cols, &style)?)?;

    // Each row's argmax (block resolution: here each block is one frame) against its centre.
    let mut worst = 0.0f32;
    let mut total = 0.0f32;
    for (i, row) in map.chunks(cols).enumerate() {
        let best = (0..cols).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        let frame = (best * block_cols) as f32 + 0.5 * block_cols as f32;
        let off = (frame - centre(i)).abs();
        worst = worst.max(off);
        total += off;
    }
    let mean_entropy = entropy.iter().sum::<f32>() / TOKENS as f32;
    let min_focus = focus.iter().cloned().fold(f32::INFINITY, f32::min);
    println!(
        "alignment: {TOKENS} tokens × {FRAMES} frames on {}",
        ctx.describe()
    );
    println!(
        "  argmax path: {:.1} frames from the true alignment on average, {worst:.1} at worst",
        total / TOKENS as f32
    );
    println!(
        "  sharpness: mean entropy {mean_entropy:.2} nats (uniform over {FRAMES} frames: {:.2}), \
         smallest focus {min_focus:.3}",
        (FRAMES as f32).ln()
    );
    // Frames nobody read: coverage (Σ over tokens of P) below 1% of a token. Tokens are
    // ~11 frames apart and read ~5 frames each, so short gaps between them are expected; a
    // stretch longer than two tokens' spacing is audio no token covered.
    let unread: Vec<usize> = (0..FRAMES).filter(|&j| coverage[j] < 0.01).collect();
    let spacing = (FRAMES - SILENCE.len()) / TOKENS;
    let stretches: Vec<_> = spans(&unread)
        .into_iter()
        .filter(|r| r.len() > 2 * spacing)
        .collect();
    let silence_unread = SILENCE.filter(|j| coverage[*j] < 0.01).count();
    println!(
        "  coverage: {} frames read by nobody (< 0.01); stretches longer than {} frames: \
         {stretches:?}; {silence_unread} of the {} silent frames {SILENCE:?} are unread",
        unread.len(),
        2 * spacing,
        SILENCE.len()
    );
    println!("  heatmap: {}", png_path.display());
    let found_silence = stretches
        .iter()
        .any(|r| r.start <= SILENCE.start + spacing && r.end + spacing >= SILENCE.end);
    if worst > 8.0 || stretches.len() != 1 || !found_silence {
        return Err("the alignment was not recovered".into());
    }
    Ok(())
}

/// Runs of consecutive values as `start..end` ranges.
fn spans(sorted: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &j in sorted {
        match out.last_mut() {
            Some(r) if r.end == j => r.end = j + 1,
            _ => out.push(j..j + 1),
        }
    }
    out
}
