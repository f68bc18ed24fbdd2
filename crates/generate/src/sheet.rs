//! A contact sheet of attention maps: the image, then one heat-map overlay per word, left to
//! right, each labelled with its word in a small built-in bitmap font.

use candle_core::Tensor;
use image::{Rgb, RgbImage};

use crate::attention::resize_maps;
use crate::error::{GenerateError, Result};

/// Smallest side of one sheet cell; smaller images are enlarged by an integer factor.
const MIN_CELL: u32 = 128;

/// Builds the sheet: `image`, then for each (label, map) the map (S×S, any scale) enlarged to the
/// image size, normalised to its maximum, coloured and blended over the image.
pub fn attention_sheet(image: &RgbImage, maps: &[(String, Tensor)]) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(GenerateError::invalid("sheet image", "empty image"));
    }
    let k = MIN_CELL.div_ceil(w.min(h)).max(1);
    let (cw, ch) = (w * k, h * k);
    let gap = 2 * k.max(2);
    let cells = 1 + maps.len() as u32;
    let mut sheet = RgbImage::from_pixel(cells * cw + (cells - 1) * gap, ch, Rgb([32, 32, 32]));
    let base = image::imageops::resize(image, cw, ch, image::imageops::FilterType::Nearest);
    image::imageops::replace(&mut sheet, &base, 0, 0);
    let scale = (ch / 64).clamp(1, 4);
    for (i, (label, map)) in maps.iter().enumerate() {
        if map.rank() != 2 {
            return Err(GenerateError::Shape {
                what: format!("attention map of `{label}`"),
                found: format!("{:?}", map.dims()),
                expected: "(height, width)".into(),
            });
        }
        let up = resize_maps(
            &map.to_dtype(candle_core::DType::F32)?,
            ch as usize,
            cw as usize,
        )?;
        let values = up.flatten_all()?.to_vec1::<f32>()?;
        let max = values.iter().copied().fold(0f32, f32::max);
        let mut cell = base.clone();
        for (p, v) in cell.pixels_mut().zip(&values) {
            let t = if max > 0.0 {
                (v / max).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let c = heat(t);
            for (dst, src) in p.0.iter_mut().zip(c) {
                *dst = (0.45 * *dst as f32 + 0.55 * src as f32).round() as u8;
            }
        }
        draw_label(&mut cell, label, scale);
        let x = (i as u32 + 1) * (cw + gap);
        image::imageops::replace(&mut sheet, &cell, x as i64, 0);
    }
    Ok(sheet)
}

/// Images side by side for comparison: each enlarged `scale`× (nearest neighbour, so pixels
/// stay exact), left to right with a gap, each under its label (white on the dark background).
/// Images may differ in size; they are top-aligned. A label wider than its image is cut.
pub fn side_by_side(images: &[(&str, &RgbImage)], scale: u32) -> RgbImage {
    let scale = scale.max(1);
    // Double-size text from 4× up, unless a label would then be cut.
    let fits = |t: u32| {
        images
            .iter()
            .all(|(l, im)| 2 * t + l.chars().count() as u32 * 6 * t <= im.width() * scale)
    };
    let text = if scale >= 4 && fits(2) { 2 } else { 1 };
    let pad = 2 * text;
    let band = if images.iter().any(|(label, _)| !label.is_empty()) {
        7 * text + 2 * pad
    } else {
        0
    };
    let gap = 2 * scale.max(2);
    let widths: Vec<u32> = images.iter().map(|(_, im)| im.width() * scale).collect();
    let height = images
        .iter()
        .map(|(_, im)| im.height() * scale)
        .max()
        .unwrap_or(0);
    let width = widths.iter().sum::<u32>() + gap * (images.len() as u32).saturating_sub(1);
    let mut out = RgbImage::from_pixel(width, band + height, Rgb([32, 32, 32]));
    let mut x = 0;
    for ((label, im), w) in images.iter().zip(&widths) {
        let big = image::imageops::resize(
            *im,
            *w,
            im.height() * scale,
            image::imageops::FilterType::Nearest,
        );
        image::imageops::replace(&mut out, &big, x as i64, band as i64);
        // Only whole glyphs that end inside the image's own column.
        let fit = (w.saturating_sub(pad) / (6 * text)) as usize;
        let chars: Vec<char> = label.chars().take(fit).collect();
        draw_text(&mut out, &chars, x + pad, pad, text);
        x += w + gap;
    }
    out
}

/// A blue → cyan → green → yellow → red colour ramp for t ∈ [0, 1].
fn heat(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [20., 20., 120.],
        [0., 160., 220.],
        [40., 200., 60.],
        [250., 220., 30.],
        [230., 30., 20.],
    ];
    let x = t * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f).round() as u8;
    }
    out
}

/// Writes `text` at the cell's top-left on a darkened strip; characters without a glyph show as
/// `?`, and text that does not fit is cut.
fn draw_label(img: &mut RgbImage, text: &str, scale: u32) {
    let (w, h) = img.dimensions();
    let adv = 6 * scale;
    let pad = scale.max(2);
    let fit = ((w.saturating_sub(2 * pad)) / adv) as usize;
    let chars: Vec<char> = text.chars().take(fit).collect();
    if chars.is_empty() {
        return;
    }
    let strip_w = (chars.len() as u32 * adv + 2 * pad).min(w);
    let strip_h = (7 * scale + 2 * pad).min(h);
    for y in 0..strip_h {
        for x in 0..strip_w {
            let p = img.get_pixel_mut(x, y);
            for c in 0..3 {
                p.0[c] = (p.0[c] as f32 * 0.35) as u8;
            }
        }
    }
    draw_text(img, &chars, pad, pad, scale);
}

/// Draws `chars` in white with their top-left corner at (x0, y0), each glyph pixel a
/// `scale`×`scale` square; whatever falls outside the image is cut.
fn draw_text(img: &mut RgbImage, chars: &[char], x0: u32, y0: u32, scale: u32) {
    let (w, h) = img.dimensions();
    let adv = 6 * scale;
    for (i, ch) in chars.iter().enumerate() {
        let rows = glyph(*ch);
        for (gy, row) in rows.iter().enumerate() {
            for (gx, bit) in row.bytes().enumerate() {
                if bit != b'#' {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = x0 + i as u32 * adv + gx as u32 * scale + dx;
                        let y = y0 + gy as u32 * scale + dy;
                        if x < w && y < h {
                            img.put_pixel(x, y, Rgb([255, 255, 255]));
                        }
                    }
                }
            }
        }
    }
}

/// 5×7 glyphs; letters are drawn upper-case.
fn glyph(c: char) -> [&'static str; 7] {
    match c.to_ascii_uppercase() {
        'A' => [
            ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'B' => [
            "####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.",
        ],
        'C' => [
            ".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.",
        ],
        'D' => [
            "####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####.",
        ],
        'E' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#####",
        ],
        'F' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#....",
        ],
        'G' => [
            ".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####",
        ],
        'H' => [
            "#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'I' => [
            ".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'J' => [
            "..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'K' => [
            "#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#",
        ],
        'L' => [
            "#....", "#....", "#....", "#....", "#....", "#....", "#####",
        ],
        'M' => [
            "#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#",
        ],
        'N' => [
            "#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#",
        ],
        'O' => [
            ".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'P' => [
            "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
        'Q' => [
            ".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#",
        ],
        'R' => [
            "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#",
        ],
        'S' => [
            ".####", "#....", "#....", ".###.", "....#", "....#", "####.",
        ],
        'T' => [
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..",
        ],
        'U' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'V' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'W' => [
            "#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'X' => [
            "#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#",
        ],
        'Y' => [
            "#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..",
        ],
        'Z' => [
            "#####", "....#", "...#.", "..#..", ".#...", "#....", "#####",
        ],
        '0' => [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => [
            "####.", "....#", "....#", ".###.", "....#", "....#", "####.",
        ],
        '4' => [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => [
            "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => [
            ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
        ],
        ' ' => [
            ".....", ".....", ".....", ".....", ".....", ".....", ".....",
        ],
        '-' => [
            ".....", ".....", ".....", "#####", ".....", ".....", ".....",
        ],
        '.' => [
            ".....", ".....", ".....", ".....", ".....", ".##..", ".##..",
        ],
        ',' => [
            ".....", ".....", ".....", ".....", ".##..", "..#..", ".#...",
        ],
        '\'' => [
            "..#..", "..#..", ".#...", ".....", ".....", ".....", ".....",
        ],
        '!' => [
            "..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#..",
        ],
        '_' => [
            ".....", ".....", ".....", ".....", ".....", ".....", "#####",
        ],
        '/' => [
            "....#", "....#", "...#.", "..#..", ".#...", "#....", "#....",
        ],
        '(' => [
            "...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.",
        ],
        ')' => [
            ".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...",
        ],
        ':' => [
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....",
        ],
        _ => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#..",
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sheet_has_one_cell_per_word_and_labels() {
        let img = RgbImage::from_pixel(32, 32, Rgb([100, 100, 100]));
        let map = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 4))
            .unwrap();
        let sheet = attention_sheet(
            &img,
            &[("dog".into(), map.clone()), ("teddy bear".into(), map)],
        )
        .unwrap();
        // 32 px images are enlarged 4× to 128 px cells, gaps of 8 px.
        assert_eq!(sheet.dimensions(), (3 * 128 + 2 * 8, 128));
        // The label strip has white text pixels; the heat map is red at the bottom right.
        let x0 = 128 + 8;
        let white = (0..20)
            .flat_map(|y| (x0..x0 + 60).map(move |x| (x, y)))
            .any(|(x, y)| sheet.get_pixel(x, y).0 == [255, 255, 255]);
        assert!(white);
        let p = sheet.get_pixel(x0 + 127, 127).0;
        assert!(p[0] > p[2], "{p:?}");
    }

    #[test]
    fn side_by_side_enlarges_each_image_exactly() {
        let a = RgbImage::from_fn(3, 2, |x, y| Rgb([x as u8 * 40, y as u8 * 90, 7]));
        let b = RgbImage::from_fn(2, 4, |x, y| Rgb([200, x as u8 * 50, y as u8 * 30]));
        let scale = 4;
        let out = side_by_side(&[("plain", &a), ("steered", &b)], scale);
        // The labels do not fit double-size: 7 px glyphs with 2 px padding above and below.
        let band = 7 + 2 * 2;
        let gap = 2 * scale;
        assert_eq!(
            out.dimensions(),
            (3 * scale + gap + 2 * scale, band + 4 * scale)
        );
        for (im, x0) in [(&a, 0), (&b, 3 * scale + gap)] {
            for y in 0..im.height() * scale {
                for x in 0..im.width() * scale {
                    assert_eq!(
                        out.get_pixel(x0 + x, band + y),
                        im.get_pixel(x / scale, y / scale),
                        "({x}, {y}) of the block at {x0}"
                    );
                }
            }
        }
        // The gap and the space under the shorter image stay background.
        assert_eq!(out.get_pixel(3 * scale, band).0, [32, 32, 32]);
        assert_eq!(out.get_pixel(0, band + 2 * scale).0, [32, 32, 32]);
        // Some text is drawn in the band.
        let white = (0..band)
            .flat_map(|y| (0..out.width()).map(move |x| (x, y)))
            .any(|(x, y)| out.get_pixel(x, y).0 == [255, 255, 255]);
        assert!(white);
    }

    #[test]
    fn side_by_side_labels_double_size_when_they_fit() {
        let a = RgbImage::from_pixel(32, 32, Rgb([250, 250, 250]));
        let out = side_by_side(&[("plain", &a), ("centroid", &a)], 4);
        let band = 7 * 2 + 2 * 4;
        assert_eq!(out.dimensions(), (2 * 128 + 8, band + 128));
        assert_eq!(out.get_pixel(5, band + 5).0, [250, 250, 250]);
    }

    #[test]
    fn side_by_side_without_labels_has_no_band() {
        let a = RgbImage::from_pixel(2, 2, Rgb([1, 2, 3]));
        let out = side_by_side(&[("", &a), ("", &a)], 1);
        assert_eq!(out.dimensions(), (2 + 4 + 2, 2));
        assert!(side_by_side(&[], 3).is_empty());
    }

    #[test]
    fn every_glyph_is_5_by_7() {
        for c in "abcdefghijklmnopqrstuvwxyz0123456789 -.,'!_/():?~".chars() {
            for row in glyph(c) {
                assert_eq!(row.len(), 5, "{c}");
            }
        }
    }
}
