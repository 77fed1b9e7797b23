//! Text in the picture: the 8×8 glyphs of `font8x8` (public domain), drawn left to right or
//! rotated to read bottom to top.

use super::canvas::{Canvas, Rgb};

/// Glyph cell size in pixels, both ways.
pub(super) const GLYPH: u32 = 8;

/// One glyph: eight rows top to bottom, bit 0 of a row is its leftmost pixel.
pub(super) type Glyph = [u8; 8];

/// The glyph of `c`: printable ASCII (U+0020–U+007E) and printable Latin-1 (U+00A0–U+00FF,
/// so `é`, `ü`, `×`, `°`) are drawn; every other character (control characters, other
/// scripts, emoji) becomes `?`.
pub(super) fn glyph(c: char) -> Glyph {
    let code = c as u32;
    match code {
        0x20..=0x7E => font8x8::legacy::BASIC_LEGACY[code as usize],
        0xA0..=0xFF => font8x8::legacy::LATIN_LEGACY[(code - 0xA0) as usize],
        _ => font8x8::legacy::BASIC_LEGACY[b'?' as usize],
    }
}

/// The glyphs of `s`, at most `max_chars` of them (the rest of the text is dropped).
pub(super) fn glyphs(s: &str, max_chars: usize) -> Vec<Glyph> {
    s.chars().take(max_chars).map(glyph).collect()
}

/// Draws `text` left to right with its top-left corner at `(x, y)`.
pub(super) fn draw(canvas: &mut Canvas, x: u32, y: u32, text: &[Glyph], colour: Rgb) {
    for (k, g) in text.iter().enumerate() {
        let x0 = x + k as u32 * GLYPH;
        for (gy, row) in g.iter().enumerate() {
            for gx in 0..GLYPH {
                if row >> gx & 1 == 1 {
                    canvas.set(x0 + gx, y + gy as u32, colour);
                }
            }
        }
    }
}

/// Draws `text` turned a quarter left (reading bottom to top), the first character's cell
/// with its bottom-left corner at `(x, bottom)`: the text occupies columns `x .. x + 8` and
/// rows `bottom − 8·len .. bottom`.
pub(super) fn draw_up(canvas: &mut Canvas, x: u32, bottom: u32, text: &[Glyph], colour: Rgb) {
    for (k, g) in text.iter().enumerate() {
        let along = k as u32 * GLYPH;
        for (gy, row) in g.iter().enumerate() {
            for gx in 0..GLYPH {
                if row >> gx & 1 == 1 {
                    // Glyph right → up the picture, glyph down → right.
                    canvas.set(x + gy as u32, bottom - 1 - along - gx, colour);
                }
            }
        }
    }
}

/// Width in pixels of the longest of `texts` drawn left to right.
pub(super) fn width(texts: &[Vec<Glyph>]) -> u32 {
    texts.iter().map(Vec::len).max().unwrap_or(0) as u32 * GLYPH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_and_latin1_are_drawn_everything_else_is_a_question_mark() {
        let q = glyph('?');
        assert_ne!(glyph('A'), q);
        assert_ne!(glyph('é'), q);
        assert_ne!(glyph('×'), q);
        assert_ne!(glyph('é'), glyph('e'));
        for c in ['中', 'α', '😀', '\n', '\t', '\u{7f}', '\u{85}'] {
            assert_eq!(glyph(c), q, "{c:?}");
        }
        assert_eq!(glyph(' '), [0; 8]);
    }

    #[test]
    fn glyphs_truncate_and_rotated_text_turns_a_quarter_left() {
        assert_eq!(glyphs("abcdef", 4).len(), 4);
        let ink = |c: &Canvas, x: u32, y: u32| c.get(x, y) != [255; 3];
        // An upright `L` (stem in glyph columns 1-2, foot in glyph row 6, row 7 empty):
        // turned left, the foot is the vertical line at x = 6 over the glyph's 7 columns,
        // glyph column 0 at the bottom.
        let mut c = Canvas::new(8, 8);
        draw_up(&mut c, 0, 8, &glyphs("L", 8), [0, 0, 0]);
        assert!((1..8).all(|y| ink(&c, 6, y)) && !ink(&c, 6, 0));
        assert!((0..8).all(|y| !ink(&c, 7, y)));
        // Upright, the foot is the horizontal line at y = 6.
        let mut c = Canvas::new(8, 8);
        draw(&mut c, 0, 0, &glyphs("L", 8), [0, 0, 0]);
        assert!((0..7).all(|x| ink(&c, x, 6)) && !ink(&c, 7, 6));
        // The second character sits above the first.
        let mut c = Canvas::new(8, 24);
        draw_up(&mut c, 0, 24, &glyphs("LL", 8), [0, 0, 0]);
        assert!(ink(&c, 6, 17) && ink(&c, 6, 9) && (0..8).all(|y| !ink(&c, 6, y)));
    }
}
