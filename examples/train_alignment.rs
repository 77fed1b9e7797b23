//! A cross-attention layer learns an alignment: trained with Adam, written here on the host,
//! from random weights until its text tokens read the audio frames they belong to.
//!
//! The data follow `examples/alignment.rs`: M text tokens (queries) and N audio frames (one
//! source for keys and values, as a decoder reads its encoder), with a known monotonic
//! alignment — token i belongs around frame c(i), the centres advancing evenly through the
//! audio and skipping a silent stretch that no token reads. A frame carries a sinusoidal
//! encoding of its position and random content (different in every sequence of the batch); a
//! token carries the encoding of its centre and random features of its own. The target output
//! of token i is what the true alignment reads: the frames around c(i) weighted by a Gaussian
//! of one frame, `Y_i = Σ_j A_ij·x_j`. Only attention that reads the right frames can produce
//! the content part of Y (the layer has no path from query to output but through the
//! attention), so the loss can only fall far if the layer finds the alignment.
//!
//! Each step runs the layer's forward and backward on the GPU (both prepared once), computes
//! the loss `L = mean (out − Y)²` and its gradient `dL/dout = 2·(out − Y)/count` on the host,
//! downloads the gradients of W^Q, W^K, W^V, W^O and their biases, takes an Adam step and
//! writes the weights back in place (`MultiHeadAttention::set_weights`). It prints the loss
//! as it falls, then the learned alignment: each token's most-read frame against c(i), and a
//! heatmap of the head-averaged attention weights of the first sequence.
//!
//! `cargo run --release --example train_alignment [-- --small]` (`--small`: a smaller problem
//! and fewer steps, for CI). The heatmap goes to train_alignment.png in the system temp folder.
//! Exits with an error unless the loss falls at least 10× and the alignment is recovered.

use std::f32::consts::PI;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use xattn::heatmap::{render_png, HeatmapStyle};
use xattn::{Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights};

mod common;

use common::*;

/// Model width, heads, and the features of E given to the position encoding.
const E: usize = 32;
const HEADS: usize = 2;
const POS: usize = 16;
/// Width of the true alignment (a Gaussian over frames), in frames.
const SIGMA: f32 = 1.0;
/// Adam's step size.
const LR: f32 = 0.02;

struct Problem {
    batch: usize,
    tokens: usize,
    frames: usize,
    silence: std::ops::Range<usize>,
    steps: usize,
}

impl Problem {
    /// The frame token `i` is centred on: evenly through the audio with the silence left out.
    fn centre(&self, i: usize) -> f32 {
        let spoken = (self.frames - self.silence.len()) as f32;
        let t = (i as f32 + 0.5) / self.tokens as f32 * spoken;
        if t < self.silence.start as f32 {
            t
        } else {
            t + self.silence.len() as f32
        }
    }
}

/// A sinusoidal encoding of position `x` (in frames) in POS features, periods from 5 to 67
/// frames (1.45× apart): q·k of two encodings is Σ cos(ω (x − y)), largest where x = y.
fn encode(x: f32) -> Vec<f32> {
    (0..POS / 2)
        .flat_map(|f| {
            let w = 2.0 * PI / (5.0 * 1.45f32.powi(f as i32));
            [(w * x).cos(), (w * x).sin()]
        })
        .collect()
}

/// The loss `mean (out − y)²` and its gradient `2·(out − y)/count`.
fn mse(out: &[f32], y: &[f32]) -> (f64, Vec<f32>) {
    let count = out.len() as f32;
    let loss = out
        .iter()
        .zip(y)
        .map(|(&o, &y)| f64::from(o - y).powi(2))
        .sum::<f64>();
    let grad = out
        .iter()
        .zip(y)
        .map(|(&o, &y)| 2.0 * (o - y) / count)
        .collect();
    (loss / f64::from(count), grad)
}

/// Each token's most-read frame in `map [tokens, frames]`, and the mean and largest distance
/// of those frames from the token's centre.
fn argmax_error(p: &Problem, map: &[f32]) -> (f32, f32) {
    let (mut total, mut worst) = (0.0f32, 0.0f32);
    for (i, row) in map.chunks(p.frames).enumerate() {
        let best = (0..p.frames).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        let off = (best as f32 - p.centre(i)).abs();
        total += off;
        worst = worst.max(off);
    }
    (total / p.tokens as f32, worst)
}

fn main() {
    exit_on_error("train_alignment", run);
}

fn run() -> AnyResult<()> {
    let small = small_flag("train_alignment")?;
    let p = if small {
        Problem {
            batch: 4,
            tokens: 12,
            frames: 64,
            silence: 36..44,
            steps: 400,
        }
    } else {
        Problem {
            batch: 8,
            tokens: 32,
            frames: 240,
            silence: 130..160,
            steps: 500,
        }
    };
    let (b, m, n) = (p.batch, p.tokens, p.frames);
    let ctx = Context::new()?;
    println!("device: {}", ctx.describe());
    let engine = Engine::new(&ctx);

    let mut rng = StdRng::seed_from_u64(5);
    let align: Vec<f32> = (0..m)
        .flat_map(|i| {
            let row: Vec<f32> = (0..n)
                .map(|j| (-(j as f32 - p.centre(i)).powi(2) / (2.0 * SIGMA * SIGMA)).exp())
                .collect();
            let sum: f32 = row.iter().sum();
            row.into_iter().map(move |a| a / sum)
        })
        .collect();
    // A batch of fresh sequences: frames = [position encoding, content], tokens = [encoding
    // of the centre, features of their own], and the target Y = A·X of each sequence. Every
    // step draws new ones, so nothing can be learned by heart: only the alignment carries
    // over from one batch to the next.
    let draw = |rng: &mut StdRng| {
        let mut source = Vec::with_capacity(b * n * E);
        let mut query = Vec::with_capacity(b * m * E);
        for _ in 0..b {
            for j in 0..n {
                source.extend(encode(j as f32));
                source.extend(uniform(rng, E - POS, 1.0));
            }
            for i in 0..m {
                query.extend(encode(p.centre(i)));
                query.extend(uniform(rng, E - POS, 1.0));
            }
        }
        let mut target = vec![0.0f32; b * m * E];
        for bi in 0..b {
            for i in 0..m {
                for j in 0..n {
                    let a = align[i * n + j];
                    let x = &source[(bi * n + j) * E..][..E];
                    for (y, &x) in target[(bi * m + i) * E..][..E].iter_mut().zip(x) {
                        *y += a * x;
                    }
                }
            }
        }
        (query, source, target)
    };

    let config = MhaConfig::new(E, HEADS);
    let mut weights = random_weights(&config, &mut rng, true);
    let mut layer = MultiHeadAttention::new(&engine, config, &weights)?;
    let (query, source, mut target) = draw(&mut rng);
    let q = engine.upload(&query, &[b, m, E])?;
    let s = engine.upload(&source, &[b, n, E])?;
    let dy = engine.upload(&vec![0.0; b * m * E], &[b, m, E])?;
    let opts = MhaOptions::default();
    // Bound once: each run reads the weights and dy as they are.
    let forward = layer.prepare(&q, &s, &s, &opts)?;
    let backward = layer.prepare_backward(&q, &s, &s, &dy, &opts)?;
    let show = MhaOptions::default().with_need_weights(NeedWeights::Averaged);
    let attention_map = |layer: &MultiHeadAttention| -> AnyResult<Vec<f32>> {
        let w = layer
            .forward(&q, &s, &s, &show)?
            .weights
            .expect("asked for");
        Ok(w.to_host()?[..m * n].to_vec())
    };
    let (mean0, _) = argmax_error(&p, &attention_map(&layer)?);
    println!(
        "{b} sequences of {m} tokens reading {n} frames (silence {:?}), E = {E}, {HEADS} heads; \
         {} steps of Adam, lr {}",
        p.silence, p.steps, LR
    );
    println!("before training: most-read frames {mean0:.1} frames from the alignment on average");

    let mut adam: Vec<Adam> = params(&mut weights).map(|x| Adam::new(x.len())).into();
    let (mut first, mut last) = (0.0, 0.0);
    let every = p.steps / 15;
    let start = Instant::now();
    for step in 0..=p.steps {
        if step > 0 {
            let (query, source, y) = draw(&mut rng);
            q.write(&query)?;
            s.write(&source)?;
            target = y;
        }
        forward.run()?;
        let (loss, d_out) = mse(&forward.output().out.to_host()?, &target);
        if !loss.is_finite() {
            return Err(format!("the loss is {loss} at step {step}").into());
        }
        if step == 0 {
            first = loss;
        }
        last = loss;
        if step % every == 0 || step == p.steps {
            println!("  step {step:4}  loss {loss:.5}");
        }
        if step == p.steps {
            break;
        }
        dy.write(&d_out)?;
        backward.run()?;
        let g = backward.output();
        let grads = g.d_weights.iter().chain(&g.d_biases).map(|t| {
            t.as_ref()
                .expect("every weight and bias has a gradient")
                .to_host()
        });
        for ((x, grad), adam) in params(&mut weights).into_iter().zip(grads).zip(&mut adam) {
            adam.step(x, &grad?, LR, step as i32 + 1);
        }
        layer.set_weights(&weights)?;
    }
    let secs = start.elapsed().as_secs_f64();

    // A batch the layer has not seen.
    let (query, source, target) = draw(&mut rng);
    q.write(&query)?;
    s.write(&source)?;
    forward.run()?;
    let (held_out, _) = mse(&forward.output().out.to_host()?, &target);
    let map = attention_map(&layer)?;
    let (mean, worst) = argmax_error(&p, &map);
    println!(
        "loss {first:.5} → {last:.5} ({:.0}× lower) in {} steps, {secs:.1} s ({:.1} ms a step)",
        first / last,
        p.steps,
        1e3 * secs / p.steps as f64
    );
    println!("loss on a batch not trained on: {held_out:.5}");
    println!(
        "after training: most-read frames {mean:.1} frames from the alignment on average, \
         {worst:.1} at worst (σ of the target alignment: {SIGMA} frame)"
    );
    // The target reads a little of the silence too: the Gaussians of the tokens beside it.
    let silent = |map: &[f32]| {
        let per_token = map
            .chunks(n)
            .map(|row| row[p.silence.clone()].iter().sum::<f32>());
        100.0 * per_token.sum::<f32>() / m as f32
    };
    println!(
        "attention on the silence {:?}: {:.2}% of a token's weight on average (the target \
         alignment's: {:.2}%)",
        p.silence,
        silent(&map),
        silent(&align)
    );
    let png_path = std::env::temp_dir().join("train_alignment.png");
    let style = HeatmapStyle {
        caption: Some(format!(
            "learned P (mean of {HEADS} heads), {m} tokens over {n} frames, after {} steps",
            p.steps
        )),
        q_labels: Some((0..m).map(|i| format!("tok{i}")).collect()),
        ..HeatmapStyle::default()
    };
    std::fs::write(&png_path, render_png(&map, m, n, &style)?)?;
    println!("heatmap: {}", png_path.display());
    let fell = first / held_out;
    if fell.is_nan() || fell < 10.0 {
        return Err(format!(
            "the loss on unseen data fell only {fell:.1}× (at least 10× expected)"
        )
        .into());
    }
    if mean > 1.0 || worst > 3.0 {
        return Err("the alignment was not learned".into());
    }
    Ok(())
}
