//! An RGB8 picture in memory and its PNG encoding.

/// One pixel, red, green, blue.
pub(super) type Rgb = [u8; 3];

/// A white RGB8 picture, row-major, origin top-left.
pub(super) struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    pub(super) fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![255; width as usize * height as usize * 3],
        }
    }

    fn index(&self, x: u32, y: u32) -> usize {
        debug_assert!(
            x < self.width && y < self.height,
            "({x}, {y}) off the canvas"
        );
        (y as usize * self.width as usize + x as usize) * 3
    }

    pub(super) fn set(&mut self, x: u32, y: u32, colour: Rgb) {
        let i = self.index(x, y);
        self.pixels[i..i + 3].copy_from_slice(&colour);
    }

    #[cfg(test)]
    pub(super) fn get(&self, x: u32, y: u32) -> Rgb {
        let i = self.index(x, y);
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Fills the `w × h` rectangle whose top-left corner is `(x, y)`.
    pub(super) fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, colour: Rgb) {
        for yy in y..y + h {
            let start = self.index(x, yy);
            for px in self.pixels[start..start + 3 * w as usize].chunks_exact_mut(3) {
                px.copy_from_slice(&colour);
            }
        }
    }

    /// The picture as a PNG file (8-bit RGB, no alpha).
    pub(super) fn into_png(self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Writing into a Vec cannot fail for I/O; the sizes are non-zero and match the data.
        let mut writer = encoder
            .write_header()
            .expect("a PNG header for a non-empty RGB8 picture");
        writer
            .write_image_data(&self.pixels)
            .expect("pixel data sized width × height × 3");
        writer.finish().expect("finishing a PNG in memory");
        bytes
    }
}
