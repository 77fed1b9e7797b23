//! Attention weights drawn as a picture: a heatmap PNG with a colour legend and token labels.
//!
//! [`render_png`] takes a map that is already small enough to look at (at most
//! [`MAX_SIDE`] = 2048 values a side; pool larger ones first, with [`pool_host`] for maps
//! already on the host) and returns the bytes of a PNG file:
//!
//! - **Layout.** Rows are queries, top to bottom; columns are keys, left to right. Row-major
//!   input, `values[i·cols + j]` is the weight query `i` gives key `j`, as one `[M, N]` slice
//!   of the weights P (`[batch, q_heads, M, N]`) is laid out.
//! - **Colour.** viridis (perceptual, dark purple → yellow, readable in grey and by most
//!   colour-blind readers), 256 levels, from `colorous` (d3-scale-chromatic's table). The low
//!   end of the range is purple, the high end yellow.
//! - **Scale.** Small maps are magnified by whole pixels so the picture is readable; maps of
//!   more than 512 values a side are one pixel per value (see [`Layout::new`]).
//! - **Legend.** A vertical colour ramp right of the map with the range's maximum at its top
//!   and minimum at its bottom, written as numbers (`0.873`, `0.000`; outside
//!   `[0.001, 10000)` in `1.23e-5` form).
//! - **Labels and caption.** Optional, see [`HeatmapStyle`]; an 8×8 bitmap font
//!   (`font8x8`). Characters outside printable ASCII and Latin-1 are drawn as `?`.

mod canvas;
mod layout;
mod pool;
mod text;

pub use layout::{
    Layout, Rect, MAX_CAPTION_CHARS, MAX_LABEL_CHARS, MAX_SIDE, MIN_CELL, TARGET_SIDE,
};
pub use pool::{pool_host, PoolOp};

use crate::error::{Error, Result};
use canvas::{Canvas, Rgb};
use layout::Geometry;
use text::GLYPH;

/// The colour of text.
const INK: Rgb = [0, 0, 0];
/// Levels of the colour map.
const LEVELS: usize = 256;

/// What [`render_png`] draws besides the map. `HeatmapStyle::default()` draws the map and
/// the legend only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeatmapStyle {
    /// One label per row (query token), drawn left of its row, right-aligned, when rows are at
    /// least [`MIN_CELL`] (8) px tall — that is, for maps of at most 64 rows, or of any map
    /// whose short side magnifies to 8 px (see [`Layout::new`]). Otherwise skipped without
    /// error, and no room is taken for them.
    pub q_labels: Option<Vec<String>>,
    /// One label per column (key token), drawn above its column turned a quarter left
    /// (reading upwards from the map), when columns are at least [`MIN_CELL`] px wide;
    /// otherwise skipped like `q_labels`.
    ///
    /// Labels of either axis are cut to [`MAX_LABEL_CHARS`] (16) characters.
    pub k_labels: Option<Vec<String>>,
    /// One line of text above everything, e.g. `max-pooled 8×8 blocks of P, batch 0 head 3`,
    /// cut to [`MAX_CAPTION_CHARS`] (160) characters; the picture widens to fit it.
    pub caption: Option<String>,
    /// The values drawn as the two ends of the colour map, `(low, high)`; values outside are
    /// clamped to the ends. `None` takes the data's minimum and maximum. When `low == high`
    /// (a constant map), every cell and the whole legend bar are drawn in the low colour.
    pub range: Option<(f32, f32)>,
}

/// Renders a `rows × cols` map of weights (row-major, rows = queries, columns = keys) to the
/// bytes of an 8-bit RGB PNG file. The picture's geometry is [`Layout::new`]`(rows, cols,
/// style)`; the module docs describe the colour map and the legend.
///
/// # Errors
/// - [`Error::Argument`]: a side is 0 or above [`MAX_SIDE`]; a value is NaN or infinite (the
///   first one is named); `style.range` is not finite or has `low > high`.
/// - [`Error::Length`]: `values.len() != rows · cols`, or a label list has not one label per
///   row (`q_labels`) or per column (`k_labels`).
///
/// ```
/// use xattn::heatmap::{pool_host, render_png, HeatmapStyle, PoolOp};
/// let (m, n) = (6, 9);
/// let weights: Vec<f32> = (0..m * n).map(|x| ((x % n) == (x / n)) as u8 as f32).collect();
/// let (pooled, rows, cols) = pool_host(&weights, m, n, 2048, PoolOp::Max)?; // fits: unchanged
/// let style = HeatmapStyle {
///     caption: Some("head 0".into()),
///     k_labels: Some((0..n).map(|j| format!("k{j}")).collect()),
///     ..HeatmapStyle::default()
/// };
/// let png = render_png(&pooled, rows, cols, &style)?;
/// assert_eq!(&png[1..4], b"PNG");
/// # Ok::<(), xattn::Error>(())
/// ```
pub fn render_png(
    values: &[f32],
    rows: usize,
    cols: usize,
    style: &HeatmapStyle,
) -> Result<Vec<u8>> {
    Layout::new(rows, cols, style)?;
    if values.len() != rows * cols {
        return Err(Error::Length {
            name: "values",
            shape: vec![rows, cols],
            expected: rows * cols,
            got: values.len(),
        });
    }
    if let Some(k) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Argument(format!(
            "heatmap value at row {}, column {} is {}; values must be finite",
            k / cols,
            k % cols,
            values[k]
        )));
    }
    let (low, high) = range(values, style.range)?;
    let geometry = Geometry::new(rows, cols, style);
    let l = geometry.layout;
    let lut: Vec<Rgb> = (0..LEVELS)
        .map(|i| {
            let c = colorous::VIRIDIS.eval_rational(i, LEVELS);
            [c.r, c.g, c.b]
        })
        .collect();
    let colour = |v: f64| lut[level(v, low, high)];

    let mut canvas = Canvas::new(l.width, l.height);
    for i in 0..rows {
        for j in 0..cols {
            let x = l.map.x + j as u32 * l.cell_width;
            let y = l.map.y + i as u32 * l.cell_height;
            let c = colour(f64::from(values[i * cols + j]));
            canvas.fill(x, y, l.cell_width, l.cell_height, c);
        }
    }
    draw_legend(&mut canvas, &geometry, low, high, &lut);
    draw_labels(&mut canvas, &geometry, style);
    Ok(canvas.into_png())
}

/// The colour range: `style.range` checked, or the data's minimum and maximum.
fn range(values: &[f32], given: Option<(f32, f32)>) -> Result<(f64, f64)> {
    match given {
        Some((lo, hi)) if !lo.is_finite() || !hi.is_finite() || lo > hi => Err(Error::Argument(
            format!("heatmap range ({lo}, {hi}): must be finite with low ≤ high"),
        )),
        Some((lo, hi)) => Ok((lo.into(), hi.into())),
        None => Ok(values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v.into()), hi.max(v.into()))
            })),
    }
}

/// The colour-map level of `v`: `round(255 · (v − low) / (high − low))`, clamped; level 0
/// when `high == low`.
fn level(v: f64, low: f64, high: f64) -> usize {
    if high <= low {
        return 0;
    }
    let t = ((v - low) / (high - low)).clamp(0.0, 1.0);
    (t * (LEVELS - 1) as f64).round() as usize
}

/// A legend number: three decimals in `[0.001, 10000)` (and for 0), else `1.23e-5` form; at
/// most ten characters for any f32.
fn format_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-3..1e4).contains(&a) {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn draw_legend(canvas: &mut Canvas, g: &Geometry, low: f64, high: f64, lut: &[Rgb]) {
    let bar = g.layout.legend;
    for y in 0..bar.height {
        // Top row the high end, bottom row the low end; one colour for a constant range,
        // as in the map.
        let t = 1.0 - f64::from(y) / f64::from(bar.height - 1);
        let c = lut[level(low + t * (high - low), low, high)];
        canvas.fill(bar.x, bar.y + y, bar.width, 1, c);
    }
    let max = text::glyphs(&format_value(high), usize::MAX);
    let min = text::glyphs(&format_value(low), usize::MAX);
    text::draw(canvas, g.numbers_x, bar.y, &max, INK);
    text::draw(canvas, g.numbers_x, bar.y + bar.height - GLYPH, &min, INK);
}

fn draw_labels(canvas: &mut Canvas, g: &Geometry, style: &HeatmapStyle) {
    let l = g.layout;
    if let Some(caption) = &style.caption {
        let (x, y) = g.caption_at;
        text::draw(canvas, x, y, &text::glyphs(caption, MAX_CAPTION_CHARS), INK);
    }
    if let (true, Some(labels)) = (l.q_labels, &style.q_labels) {
        for (i, label) in labels.iter().enumerate() {
            let glyphs = text::glyphs(label, MAX_LABEL_CHARS);
            let x = g.q_label_right - glyphs.len() as u32 * GLYPH;
            let y = l.map.y + i as u32 * l.cell_height + (l.cell_height - GLYPH) / 2;
            text::draw(canvas, x, y, &glyphs, INK);
        }
    }
    if let (true, Some(labels)) = (l.k_labels, &style.k_labels) {
        for (j, label) in labels.iter().enumerate() {
            let glyphs = text::glyphs(label, MAX_LABEL_CHARS);
            let x = l.map.x + j as u32 * l.cell_width + (l.cell_width - GLYPH) / 2;
            text::draw_up(canvas, x, g.k_label_bottom, &glyphs, INK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legend_numbers_fit_ten_characters() {
        assert_eq!(format_value(0.0), "0.000");
        assert_eq!(format_value(0.8734), "0.873");
        assert_eq!(format_value(-2.5), "-2.500");
        assert_eq!(format_value(1.5e-5), "1.50e-5");
        for v in [f32::MAX, f32::MIN, -f32::MIN_POSITIVE, -9999.999, -1e-38] {
            let s = format_value(v.into());
            assert!(s.len() <= 10, "{v}: {s}");
        }
    }

    #[test]
    fn levels_span_the_map_and_a_constant_range_does_not_divide_by_zero() {
        assert_eq!(level(0.0, 0.0, 1.0), 0);
        assert_eq!(level(1.0, 0.0, 1.0), 255);
        assert_eq!(level(2.0, 0.0, 1.0), 255);
        assert_eq!(level(-1.0, 0.0, 1.0), 0);
        assert_eq!(level(0.5, 0.5, 0.5), 0);
        assert_eq!(range(&[3.0, -1.0, 2.0], None).unwrap(), (-1.0, 3.0));
    }
}
