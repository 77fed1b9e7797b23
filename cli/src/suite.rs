//! The benchmark shapes: the quick suite (the default), the standard suite and the long shape.
//!
//! Shared by `xattn bench` and the criterion bench (`benches/attention.rs` includes this file
//! with `#[path]`), so both measure the same problems. Depends on nothing but `xattn`.

use xattn::{AttnShape, Path};

/// One named benchmark problem.
#[derive(Clone, Debug)]
pub struct SuiteShape {
    /// Short name for tables and JSON (`diffusion`, `decode`, …).
    pub name: String,
    /// The problem.
    pub shape: AttnShape,
    /// Where set, the only path this shape is run on, and why.
    pub only: Option<(Path, &'static str)>,
}

/// A shape with `d_k = d_v = d` and as many K/V heads as query heads.
pub fn shape(batch: usize, heads: usize, m: usize, n: usize, d: usize) -> AttnShape {
    AttnShape::from_qkv(
        [batch, m, heads, d],
        [batch, n, heads, d],
        [batch, n, heads, d],
    )
    .expect("the standard shapes are valid")
}

fn named(name: &str, shape: AttnShape) -> SuiteShape {
    SuiteShape {
        name: name.to_string(),
        shape,
        only: None,
    }
}

/// The patterns of the standard suite at a quarter of their size or less: the whole suite, on
/// every path, takes seconds on a fast software device and about a minute on a slow one.
pub fn quick() -> Vec<SuiteShape> {
    vec![
        named("diffusion", shape(1, 8, 1024, 77, 40)),
        named("decode", shape(1, 8, 1, 1500, 64)),
        named("square", shape(1, 8, 256, 256, 64)),
        named("perceiver", shape(1, 1, 64, 4096, 64)),
    ]
}

/// The standard suite: the cross-attention patterns xattn is built for, at their real sizes.
pub fn standard() -> Vec<SuiteShape> {
    vec![
        // Stable Diffusion UNet cross-attention: latent pixels attend to 77 text tokens.
        named("diffusion", shape(1, 8, 4096, 77, 40)),
        // Whisper-style decoding: one new token attends to 1500 encoder frames.
        named("decode", shape(1, 8, 1, 1500, 64)),
        named("square", shape(1, 8, 1024, 1024, 64)),
        // Perceiver: a small latent array reads a long input.
        named("perceiver", shape(1, 1, 256, 16384, 64)),
    ]
}

/// The standard suite and a 16384×16384 self-attention-sized problem (minutes on a software
/// device).
pub fn full() -> Vec<SuiteShape> {
    let mut shapes = standard();
    shapes.push(SuiteShape {
        name: "long".to_string(),
        shape: shape(1, 1, 16384, 16384, 64),
        only: Some((
            Path::Fused,
            "`long` is timed on the fused path only (its 16384×16384 scores are 1 GiB for \
             three-pass)",
        )),
    });
    shapes
}
