//! Where [`render_png`](super::render_png) puts the map, the legend, the labels and the caption.

use super::text::{self, GLYPH};
use super::HeatmapStyle;
use crate::error::{Error, Result};

/// The most values a side [`render_png`](super::render_png) takes; pool larger maps first.
pub const MAX_SIDE: usize = 2048;
/// Cells are magnified until a side reaches about this many pixels.
pub const TARGET_SIDE: usize = 512;
/// The smallest cell a short side is magnified to while it stays within [`TARGET_SIDE`], and
/// the cell size from which token labels fit (one 8 px glyph).
pub const MIN_CELL: u32 = 8;
/// Token labels longer than this many characters are cut to it.
pub const MAX_LABEL_CHARS: usize = 16;
/// A caption longer than this many characters is cut to it.
pub const MAX_CAPTION_CHARS: usize = 160;

/// Blank border around everything.
const MARGIN: u32 = 8;
/// Space between a label and the map, between the caption and what is below it, between the
/// legend bar and its numbers.
const GAP: u32 = 4;
/// Space between the map and the legend bar.
const LEGEND_GAP: u32 = 12;
const LEGEND_WIDTH: u32 = 16;
/// The legend bar is as tall as the map but never shorter than this.
const LEGEND_MIN_HEIGHT: u32 = 64;
/// The legend's numbers column holds this many characters (`-1.234e-10` is ten).
const NUMBER_CHARS: u32 = 10;

/// A rectangle of the picture in pixels, origin top-left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// The geometry of the picture [`render_png`](super::render_png) draws for a `rows × cols`
/// map and a style; it depends on the sizes and the style, never on the values.
///
/// From the top: the margin, the caption line (if any), the key labels (if drawn), then the
/// query labels (if drawn), the map, the legend bar and the legend's numbers side by side,
/// then the margin. The picture is widened if the caption needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Picture width in pixels.
    pub width: u32,
    /// Picture height in pixels.
    pub height: u32,
    /// Pixels per value across (key axis).
    pub cell_width: u32,
    /// Pixels per value down (query axis).
    pub cell_height: u32,
    /// The map: value `(i, j)` fills the cell at `map.x + j·cell_width`,
    /// `map.y + i·cell_height`.
    pub map: Rect,
    /// The colour ramp: the top pixel row is the range's maximum, the bottom row its minimum.
    pub legend: Rect,
    /// Whether query labels are drawn (given, and `cell_height ≥ MIN_CELL`).
    pub q_labels: bool,
    /// Whether key labels are drawn (given, and `cell_width ≥ MIN_CELL`).
    pub k_labels: bool,
}

/// Pixels per value along a side of `n` values, given the uniform factor of the map.
fn cell(n: usize, uniform: usize) -> u32 {
    uniform.max((MIN_CELL as usize).min(TARGET_SIDE / n)) as u32
}

impl Layout {
    /// The layout for a `rows × cols` map drawn with `style`.
    ///
    /// Magnification: both sides get the integer factor `max(1, TARGET_SIDE / max(rows,
    /// cols))` (512 px on the long side, square cells); a short side then grows to cells of
    /// [`MIN_CELL`] (8) px as long as it stays within [`TARGET_SIDE`], so a 1 × 2048 map is
    /// 8 px tall rather than 1. Above 512 values a side is one pixel per value.
    ///
    /// # Errors
    /// [`Error::Argument`] if a side is 0 or above [`MAX_SIDE`]; [`Error::Length`] if a label
    /// list does not have one label per row (queries) or per column (keys).
    pub fn new(rows: usize, cols: usize, style: &HeatmapStyle) -> Result<Layout> {
        check_sides(rows, cols)?;
        check_labels("q_labels", style.q_labels.as_deref(), rows)?;
        check_labels("k_labels", style.k_labels.as_deref(), cols)?;
        Ok(Geometry::new(rows, cols, style).layout)
    }
}

/// The layout plus what drawing needs beyond it.
pub(super) struct Geometry {
    pub(super) layout: Layout,
    /// Where the caption's first glyph goes (top-left).
    pub(super) caption_at: (u32, u32),
    /// Right edge of the query labels (they are right-aligned to it).
    pub(super) q_label_right: u32,
    /// Bottom edge of the key labels (they read upwards from it).
    pub(super) k_label_bottom: u32,
    /// Left edge of the legend's numbers.
    pub(super) numbers_x: u32,
}

impl Geometry {
    /// Assumes the sides and labels were checked.
    pub(super) fn new(rows: usize, cols: usize, style: &HeatmapStyle) -> Geometry {
        let uniform = (TARGET_SIDE / rows.max(cols)).max(1);
        let (cell_width, cell_height) = (cell(cols, uniform), cell(rows, uniform));
        let q_labels = style.q_labels.is_some() && cell_height >= MIN_CELL;
        let k_labels = style.k_labels.is_some() && cell_width >= MIN_CELL;
        let label_len = |labels: &Option<Vec<String>>| {
            let texts: Vec<_> = labels
                .iter()
                .flatten()
                .map(|l| text::glyphs(l, MAX_LABEL_CHARS))
                .collect();
            text::width(&texts)
        };
        let caption_width = style
            .caption
            .as_deref()
            .map_or(0, |c| text::width(&[text::glyphs(c, MAX_CAPTION_CHARS)]));

        let mut y = MARGIN;
        let caption_at = (MARGIN, y);
        if style.caption.is_some() {
            y += GLYPH + GAP;
        }
        if k_labels {
            y += label_len(&style.k_labels) + GAP;
        }
        let k_label_bottom = y - GAP;
        let mut x = MARGIN;
        if q_labels {
            x += label_len(&style.q_labels) + GAP;
        }
        let map = Rect {
            x,
            y,
            width: cols as u32 * cell_width,
            height: rows as u32 * cell_height,
        };
        let legend = Rect {
            x: map.x + map.width + LEGEND_GAP,
            y,
            width: LEGEND_WIDTH,
            height: map.height.max(LEGEND_MIN_HEIGHT),
        };
        let numbers_x = legend.x + legend.width + GAP;
        let right = (numbers_x + NUMBER_CHARS * GLYPH).max(MARGIN + caption_width);
        Geometry {
            layout: Layout {
                width: right + MARGIN,
                height: y + map.height.max(legend.height) + MARGIN,
                cell_width,
                cell_height,
                map,
                legend,
                q_labels,
                k_labels,
            },
            caption_at,
            q_label_right: x - GAP,
            k_label_bottom,
            numbers_x,
        }
    }
}

fn check_sides(rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || rows > MAX_SIDE || cols > MAX_SIDE {
        return Err(Error::Argument(format!(
            "heatmap of {rows} × {cols} values: each side must be 1 to {MAX_SIDE}; pool \
             larger maps first (heatmap::pool_host, or blocks of P on the GPU)"
        )));
    }
    Ok(())
}

fn check_labels(name: &'static str, labels: Option<&[String]>, n: usize) -> Result<()> {
    match labels {
        Some(l) if l.len() != n => Err(Error::Length {
            name,
            shape: vec![n],
            expected: n,
            got: l.len(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(rows: usize, cols: usize) -> (u32, u32) {
        let l = Layout::new(rows, cols, &HeatmapStyle::default()).unwrap();
        assert_eq!(
            (l.map.width, l.map.height),
            (cols as u32 * l.cell_width, rows as u32 * l.cell_height)
        );
        (l.cell_height, l.cell_width)
    }

    #[test]
    fn small_maps_are_magnified_big_maps_are_one_pixel_per_value() {
        assert_eq!(cells(1, 1), (512, 512));
        assert_eq!(cells(24, 40), (12, 12));
        assert_eq!(cells(64, 64), (8, 8));
        assert_eq!(cells(100, 100), (5, 5));
        assert_eq!(cells(512, 512), (1, 1));
        assert_eq!(cells(2048, 2048), (1, 1));
        // The short side keeps cells of 8 px while it fits in 512 px.
        assert_eq!(cells(1, 2048), (8, 1));
        assert_eq!(cells(50, 1500), (8, 1));
        assert_eq!(cells(100, 3), (5, 8));
        assert_eq!(cells(600, 2000), (1, 1));
    }

    #[test]
    fn the_legend_sits_right_of_the_map_and_everything_fits() {
        for (rows, cols) in [(1, 1), (3, 2048), (2048, 3), (24, 40), (2048, 2048)] {
            let l = Layout::new(rows, cols, &HeatmapStyle::default()).unwrap();
            assert!(l.legend.x > l.map.x + l.map.width);
            assert!(l.legend.y == l.map.y && l.legend.height >= l.map.height);
            assert!(l.legend.x + l.legend.width + NUMBER_CHARS * GLYPH < l.width);
            assert!(l.map.y + l.legend.height < l.height);
        }
    }
}
