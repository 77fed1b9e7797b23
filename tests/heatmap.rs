//! `heatmap::render_png`: the PNG decodes, has the documented size, its pixels follow the
//! weights in viridis order, the legend and labels say what they should where they should,
//! and bad input is a typed error.

use rand::{rngs::StdRng, Rng, SeedableRng};
use xattn::heatmap::{pool_host, render_png, HeatmapStyle, Layout, PoolOp, MAX_SIDE};
use xattn::Error;

/// The two ends of viridis (matplotlib's and d3's `#440154` and `#fde725`).
const PURPLE: [u8; 3] = [0x44, 0x01, 0x54];
const YELLOW: [u8; 3] = [0xfd, 0xe7, 0x25];
const BLACK: [u8; 3] = [0, 0, 0];
const WHITE: [u8; 3] = [255, 255, 255];

struct Picture {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Picture {
    fn px(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Every pixel of cell `(i, j)` of the map, asserted to be one colour, which is returned.
    fn cell(&self, l: &Layout, i: usize, j: usize) -> [u8; 3] {
        let (x0, y0) = (
            l.map.x + j as u32 * l.cell_width,
            l.map.y + i as u32 * l.cell_height,
        );
        let c = self.px(x0, y0);
        for y in y0..y0 + l.cell_height {
            for x in x0..x0 + l.cell_width {
                assert_eq!(self.px(x, y), c, "cell ({i}, {j}) is not one colour");
            }
        }
        c
    }

    /// Whether `text` is drawn left to right with its top-left corner at `(x, y)`: every
    /// glyph pixel black where the font has ink and white where it has none.
    fn text_at(&self, x: u32, y: u32, text: &str) -> bool {
        text.chars().enumerate().all(|(k, ch)| {
            let g = glyph(ch);
            (0..8).all(|gy| {
                (0..8).all(|gx| {
                    let (px, py) = (x + 8 * k as u32 + gx, y + gy);
                    px < self.width && py < self.height && {
                        let want = if g[gy as usize] >> gx & 1 == 1 {
                            BLACK
                        } else {
                            WHITE
                        };
                        self.px(px, py) == want
                    }
                })
            })
        })
    }

    /// Whether `text` is drawn turned a quarter left, reading upwards, in columns
    /// `x .. x + 8` with its first character's bottom edge at `bottom`.
    fn text_up_at(&self, x: u32, bottom: u32, text: &str) -> bool {
        text.chars().enumerate().all(|(k, ch)| {
            let g = glyph(ch);
            (0..8).all(|gy| {
                (0..8u32).all(|gx| {
                    let along = 8 * k as u32 + gx + 1;
                    along <= bottom && {
                        let want = if g[gy as usize] >> gx & 1 == 1 {
                            BLACK
                        } else {
                            WHITE
                        };
                        self.px(x + gy, bottom - along) == want
                    }
                })
            })
        })
    }

    /// The first x in `xs` where `text` is drawn with its top at `y`.
    fn find_text(&self, xs: std::ops::Range<u32>, y: u32, text: &str) -> Option<u32> {
        xs.into_iter().find(|&x| self.text_at(x, y, text))
    }

    fn has_black(&self, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> bool {
        ys.into_iter()
            .any(|y| xs.clone().any(|x| self.px(x, y) == BLACK))
    }
}

/// The font's glyph for `c`, as the docs promise: ASCII and Latin-1 drawn, the rest `?`.
fn glyph(c: char) -> [u8; 8] {
    match c as u32 {
        code @ 0x20..=0x7E => font8x8::legacy::BASIC_LEGACY[code as usize],
        code @ 0xA0..=0xFF => font8x8::legacy::LATIN_LEGACY[(code - 0xA0) as usize],
        _ => font8x8::legacy::BASIC_LEGACY[b'?' as usize],
    }
}

fn decode(bytes: &[u8]) -> Picture {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut rgb = vec![0; reader.output_buffer_size().expect("a sane size")];
    let info = reader.next_frame(&mut rgb).expect("PNG image data");
    assert_eq!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight)
    );
    rgb.truncate(info.buffer_size());
    Picture {
        width: info.width,
        height: info.height,
        rgb,
    }
}

fn render(values: &[f32], rows: usize, cols: usize, style: &HeatmapStyle) -> (Picture, Layout) {
    let bytes = render_png(values, rows, cols, style).expect("render");
    let l = Layout::new(rows, cols, style).expect("layout");
    let pic = decode(&bytes);
    assert_eq!((pic.width, pic.height), (l.width, l.height));
    (pic, l)
}

/// `rows × cols` weights with a 1 in one seeded-random column per row; returns the columns.
fn one_hot(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let hot: Vec<usize> = (0..rows).map(|_| rng.random_range(0..cols)).collect();
    let mut w = vec![0.0; rows * cols];
    for (i, &j) in hot.iter().enumerate() {
        w[i * cols + j] = 1.0;
    }
    (w, hot)
}

fn labels(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// viridis as 256 levels, from the crate the library takes it from.
fn viridis() -> Vec<[u8; 3]> {
    (0..256)
        .map(|i| {
            let c = colorous::VIRIDIS.eval_rational(i, 256);
            [c.r, c.g, c.b]
        })
        .collect()
}

/// The level of `c` in viridis; the colour must be in the table exactly.
fn level_of(table: &[[u8; 3]], c: [u8; 3]) -> usize {
    table
        .iter()
        .position(|&t| t == c)
        .unwrap_or_else(|| panic!("{c:?} is not a viridis colour"))
}

#[test]
fn the_png_decodes_with_the_documented_size() {
    // (rows, cols, cell height, cell width) by the rule in `Layout::new`.
    let cases = [
        (1, 1, 512, 512),
        (24, 40, 12, 12),
        (64, 64, 8, 8),
        (100, 100, 5, 5),
        (50, 1500, 8, 1),
        (2048, 3, 1, 8),
        (2048, 2048, 1, 1),
    ];
    for (rows, cols, ch, cw) in cases {
        let mut rng = StdRng::seed_from_u64(rows as u64 * 7919 + cols as u64);
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random()).collect();
        let (pic, l) = render(&v, rows, cols, &HeatmapStyle::default());
        assert_eq!((l.cell_height, l.cell_width), (ch, cw), "{rows} × {cols}");
        assert_eq!(
            (l.map.width, l.map.height),
            (cols as u32 * cw, rows as u32 * ch)
        );
        // The map and the legend are inside the picture with white around them.
        assert!(l.map.x > 0 && l.map.y > 0);
        assert!(l.legend.x + l.legend.width < pic.width);
        assert!(l.map.y + l.map.height.max(l.legend.height) < pic.height);
        assert_eq!(pic.px(l.map.x - 1, l.map.y), WHITE);
        assert_eq!(pic.px(l.map.x, l.map.y - 1), WHITE);
        assert_eq!(pic.px(l.map.x + l.map.width, l.map.y), WHITE);
        assert_eq!(pic.px(l.map.x, l.map.y + l.map.height), WHITE);
    }
}

#[test]
fn a_one_hot_map_has_one_yellow_cell_per_row_at_its_column() {
    let (rows, cols) = (24, 40);
    let (w, hot) = one_hot(rows, cols, 12);
    let full = HeatmapStyle {
        q_labels: Some(labels("q", rows)),
        k_labels: Some(labels("k", cols)),
        caption: Some("one-hot".into()),
        range: None,
    };
    for style in [HeatmapStyle::default(), full] {
        let (pic, l) = render(&w, rows, cols, &style);
        for (i, &h) in hot.iter().enumerate() {
            for j in 0..cols {
                let want = if j == h { YELLOW } else { PURPLE };
                assert_eq!(pic.cell(&l, i, j), want, "cell ({i}, {j}), hot {h}");
            }
        }
    }
}

#[test]
fn a_linear_ramp_is_monotone_in_viridis_order() {
    let table = viridis();
    let (rows, cols) = (6, 37);
    let v: Vec<f32> = (0..rows * cols).map(|k| -3.0 + 0.25 * k as f32).collect();
    let (pic, l) = render(&v, rows, cols, &HeatmapStyle::default());
    let colours: Vec<[u8; 3]> = (0..rows * cols)
        .map(|k| pic.cell(&l, k / cols, k % cols))
        .collect();
    // Value k is drawn in level round(255 · k / 221) exactly, so each step moves at least one
    // level. (d3's table repeats one colour, at levels 112 and 113, so the colour alone does
    // not always name its level: `level_of` takes the first.)
    let mut previous = None;
    for (k, &c) in colours.iter().enumerate() {
        let want = (k as f64 / (rows * cols - 1) as f64 * 255.0).round() as usize;
        assert!(previous < Some(want));
        previous = Some(want);
        assert_eq!(c, table[want], "value {k} should be level {want}");
    }
    let levels: Vec<usize> = colours.iter().map(|&c| level_of(&table, c)).collect();
    assert_eq!((levels[0], levels[rows * cols - 1]), (0, 255));
    assert!(levels.windows(2).all(|p| p[0] <= p[1]), "{levels:?}");
    // The legend bar runs from the bottom (lowest) to the top (highest) in the same order.
    let bar = l.legend;
    let column: Vec<usize> = (0..bar.height)
        .rev()
        .map(|y| level_of(&table, pic.px(bar.x + bar.width / 2, bar.y + y)))
        .collect();
    assert_eq!((column[0], column[column.len() - 1]), (0, 255));
    assert!(column.windows(2).all(|p| p[0] <= p[1]), "{column:?}");
}

#[test]
fn a_given_range_clamps_and_a_constant_map_is_all_low() {
    let table = viridis();
    let v: Vec<f32> = (0..10).map(|k| k as f32 / 9.0).collect();
    let style = HeatmapStyle {
        range: Some((0.0, 0.5)),
        ..HeatmapStyle::default()
    };
    let (pic, l) = render(&v, 1, 10, &style);
    for (j, &x) in v.iter().enumerate() {
        let want = ((x.min(0.5) / 0.5) as f64 * 255.0).round() as usize;
        assert_eq!(level_of(&table, pic.cell(&l, 0, j)), want, "value {x}");
    }
    for value in [0.0, 0.25, -7.0] {
        let (pic, l) = render(&[value; 12], 3, 4, &HeatmapStyle::default());
        for k in 0..12 {
            assert_eq!(pic.cell(&l, k / 4, k % 4), PURPLE);
        }
        let bar = l.legend;
        for y in bar.y..bar.y + bar.height {
            assert_eq!(pic.px(bar.x + bar.width / 2, y), PURPLE, "legend row {y}");
        }
    }
}

#[test]
fn the_legend_writes_the_range_beside_the_bar() {
    let (w, _) = one_hot(5, 6, 3);
    let w: Vec<f32> = w.iter().map(|x| x * 0.8734).collect();
    let cases = [
        (None, "0.873", "0.000"),
        (Some((-2.5, 1.5e-5)), "1.50e-5", "-2.500"),
    ];
    for (range, top, bottom) in cases {
        let style = HeatmapStyle {
            range,
            ..HeatmapStyle::default()
        };
        let (pic, l) = render(&w, 5, 6, &style);
        let bar = l.legend;
        let xs = bar.x + bar.width..pic.width;
        assert!(pic.find_text(xs.clone(), bar.y, top).is_some(), "{top}");
        assert!(
            pic.find_text(xs, bar.y + bar.height - 8, bottom).is_some(),
            "{bottom}"
        );
    }
}

#[test]
fn labels_and_caption_are_drawn_where_cells_are_big_enough() {
    let (rows, cols) = (24, 40);
    let (w, _) = one_hot(rows, cols, 5);
    let style = HeatmapStyle {
        q_labels: Some(labels("tok", rows)),
        k_labels: Some(labels("src", cols)),
        caption: Some("max-pooled 8×8 blocks of P, batch 0 head 3".into()),
        range: None,
    };
    let (pic, l) = render(&w, rows, cols, &style);
    assert!(l.q_labels && l.k_labels);
    // The caption on the first text line, left of everything.
    assert!(pic
        .find_text(0..20, 8, "max-pooled 8×8 blocks of P, batch 0 head 3")
        .is_some());
    // Each query label in its row's band, right-aligned against the map.
    for i in 0..rows {
        let y = l.map.y + i as u32 * l.cell_height + (l.cell_height - 8) / 2;
        let text = format!("tok{i}");
        let x = pic.find_text(0..l.map.x, y, &text);
        let x = x.unwrap_or_else(|| panic!("{text} not left of row {i}"));
        let end = x + 8 * text.len() as u32;
        assert!(end < l.map.x && l.map.x - end <= 8, "{text} ends at {end}");
    }
    // Each key label above its column, reading upwards.
    for j in 0..cols {
        let x = l.map.x + j as u32 * l.cell_width + (l.cell_width - 8) / 2;
        let text = format!("src{j}");
        let found = (8..=l.map.y).any(|bottom| pic.text_up_at(x, bottom, &text));
        assert!(found, "{text} not above column {j}");
    }
}

#[test]
fn labels_change_nothing_where_cells_are_too_small() {
    let plain = HeatmapStyle::default();
    let with = |q: bool, k: bool, rows: usize, cols: usize| HeatmapStyle {
        q_labels: q.then(|| labels("q", rows)),
        k_labels: k.then(|| labels("k", cols)),
        ..HeatmapStyle::default()
    };
    // 100 × 100: 5 px cells, no labels either way: the same bytes as without.
    let (w, _) = one_hot(100, 100, 1);
    let none = render_png(&w, 100, 100, &plain).unwrap();
    assert_eq!(
        render_png(&w, 100, 100, &with(true, true, 100, 100)).unwrap(),
        none
    );
    // 8 × 100: rows 8 px tall take labels, columns 5 px wide do not.
    let (w, _) = one_hot(8, 100, 2);
    let none = render_png(&w, 8, 100, &plain).unwrap();
    assert_eq!(
        render_png(&w, 8, 100, &with(false, true, 8, 100)).unwrap(),
        none
    );
    let both = render_png(&w, 8, 100, &with(true, true, 8, 100)).unwrap();
    assert_eq!(
        render_png(&w, 8, 100, &with(true, false, 8, 100)).unwrap(),
        both
    );
    assert_ne!(both, none);
    let (pic, l) = render(&w, 8, 100, &with(true, true, 8, 100));
    assert!(l.q_labels && !l.k_labels);
    assert!(pic.has_black(0..l.map.x, l.map.y..l.map.y + l.map.height));
    // Nothing is drawn above the map: no key labels, no caption.
    assert!(!pic.has_black(0..pic.width, 0..l.map.y));
}

#[test]
fn characters_the_font_lacks_are_drawn_as_question_marks() {
    let (w, _) = one_hot(3, 4, 9);
    let style = |q: [&str; 3]| HeatmapStyle {
        q_labels: Some(q.iter().map(|s| s.to_string()).collect()),
        ..HeatmapStyle::default()
    };
    let wide = render_png(&w, 3, 4, &style(["中文", "a\tb", "😀"])).unwrap();
    let ascii = render_png(&w, 3, 4, &style(["??", "a?b", "?"])).unwrap();
    assert_eq!(wide, ascii);
    // Latin-1 has its own glyphs.
    let latin = render_png(&w, 3, 4, &style(["é", "ü", "×"])).unwrap();
    let plain = render_png(&w, 3, 4, &style(["e", "u", "x"])).unwrap();
    assert_ne!(latin, plain);
    // Labels are cut to 16 characters.
    let long = render_png(&w, 3, 4, &style(["abcdefghijklmnopXYZ", "", ""])).unwrap();
    let cut = render_png(&w, 3, 4, &style(["abcdefghijklmnop", "", ""])).unwrap();
    assert_eq!(long, cut);
}

#[test]
fn max_pooling_keeps_every_one_hot_peak() {
    let (rows, cols, side) = (300, 500, 64);
    let (w, hot) = one_hot(rows, cols, 77);
    let (p, pr, pc) = pool_host(&w, rows, cols, side, PoolOp::Max).unwrap();
    // Blocks of ceil(300/64) = 5 rows by ceil(500/64) = 8 columns.
    assert_eq!((pr, pc), (60, 63));
    let (pic, l) = render(&p, pr, pc, &HeatmapStyle::default());
    for r in 0..pr {
        let peaks: Vec<usize> = hot[r * 5..r * 5 + 5].iter().map(|j| j / 8).collect();
        for c in 0..pc {
            let want = if peaks.contains(&c) { YELLOW } else { PURPLE };
            assert_eq!(pic.cell(&l, r, c), want, "block ({r}, {c})");
        }
    }
    // Mean pooling keeps the mass: the pooled blocks times their real sizes sum to `rows`.
    let (m, _, _) = pool_host(&w, rows, cols, side, PoolOp::Mean).unwrap();
    let mass: f64 = m
        .iter()
        .enumerate()
        .map(|(k, &x)| {
            let width = if k % pc == pc - 1 {
                cols - 8 * (pc - 1)
            } else {
                8
            };
            f64::from(x) * 5.0 * width as f64
        })
        .sum();
    assert!((mass - rows as f64).abs() < 1e-3, "{mass}");
}

#[test]
fn every_bad_input_is_a_typed_error() {
    let style = HeatmapStyle::default();
    let arg = |r: xattn::Result<Vec<u8>>, needles: &[&str]| match r {
        Err(e @ Error::Argument(_)) => {
            let s = e.to_string();
            for n in needles {
                assert!(s.contains(n), "`{s}` should mention {n}");
            }
        }
        other => panic!("expected Error::Argument, got {other:?}"),
    };
    match render_png(&[0.0; 11], 3, 4, &style) {
        Err(Error::Length {
            name: "values",
            expected: 12,
            got: 11,
            ..
        }) => {}
        other => panic!("expected Error::Length for the values, got {other:?}"),
    }
    arg(render_png(&[], 0, 4, &style), &["0 × 4", "2048"]);
    arg(render_png(&[], 4, 0, &style), &["4 × 0", "2048"]);
    let big = vec![0.0; (MAX_SIDE + 1) * 2];
    arg(
        render_png(&big, MAX_SIDE + 1, 2, &style),
        &["2049 × 2", "2048", "pool"],
    );
    arg(
        render_png(&big, 2, MAX_SIDE + 1, &style),
        &["2 × 2049", "2048"],
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.5; 12];
        v[2 * 4 + 3] = bad;
        arg(
            render_png(&v, 3, 4, &style),
            &["row 2, column 3", &bad.to_string(), "finite"],
        );
    }
    for range in [(1.0, 0.0), (f32::NAN, 1.0), (0.0, f32::INFINITY)] {
        let style = HeatmapStyle {
            range: Some(range),
            ..HeatmapStyle::default()
        };
        arg(
            render_png(&[0.5; 12], 3, 4, &style),
            &["range", "low ≤ high"],
        );
    }
    let labelled = |q: usize, k: usize| HeatmapStyle {
        q_labels: Some(labels("q", q)),
        k_labels: Some(labels("k", k)),
        ..HeatmapStyle::default()
    };
    for (style, which, want, got) in [
        (labelled(2, 4), "q_labels", 3, 2),
        (labelled(3, 5), "k_labels", 4, 5),
    ] {
        match render_png(&[0.5; 12], 3, 4, &style) {
            Err(Error::Length {
                name,
                expected,
                got: g,
                ..
            }) => assert_eq!((name, expected, g), (which, want, got)),
            other => panic!("expected Error::Length for {which}, got {other:?}"),
        }
        assert!(matches!(
            Layout::new(3, 4, &style),
            Err(Error::Length { .. })
        ));
    }
    assert!(matches!(
        pool_host(&[0.0; 5], 2, 3, 2, PoolOp::Max),
        Err(Error::Length { .. })
    ));
}
