//! The text chunks of a PNG file: `tEXt` and `zTXt` (Latin-1) and `iTXt` (UTF-8, compressed or
//! not), in file order, wherever they are (before or after the image data).
//!
//! The chunk walk checks every length against the bytes there are and every chunk's CRC, and
//! inflates compressed text with a size limit, so damaged or hostile bytes give an error (from
//! [`read_png_text`]) or what could be read before the damage (from [`png_text_chunks`]), never a
//! panic or a huge allocation. The image data itself is not decoded.

use std::path::{Path, PathBuf};

/// The PNG file signature.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// The most text one compressed chunk may inflate to.
pub const MAX_INFLATED_TEXT: usize = 16 << 20;

/// A PNG file whose text chunks could not be read; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PngTextError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// `(keyword, text)` pairs in file order; bytes that are not a well-formed PNG give what could be
/// read before the damage (possibly nothing), and a malformed text chunk is skipped.
pub fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    walk(bytes).0
}

/// The text chunks of the PNG file at `path`, in file order. A file that is not a PNG, is cut
/// short, fails a CRC or holds a malformed text chunk is an error.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, PngTextError> {
    let bytes = crate::read_capped(path, crate::MAX_IMAGE_BYTES).map_err(|e| PngTextError::Io {
        path: path.to_path_buf(),
        error: match e {
            crate::ReadError::Io { error, .. } => error,
            other => std::io::Error::other(other.reason()),
        },
    })?;
    parse_png_text(&bytes, path)
}

/// [`read_png_text`] on a file's bytes; `path` names it in errors.
pub fn parse_png_text(bytes: &[u8], path: &Path) -> Result<Vec<(String, String)>, PngTextError> {
    match walk(bytes) {
        (chunks, None) => Ok(chunks),
        (_, Some(reason)) => Err(PngTextError::Invalid {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

/// The text chunks read, and the first damage found (after which nothing more is read, except
/// past a malformed text chunk).
fn walk(bytes: &[u8]) -> (Vec<(String, String)>, Option<String>) {
    let mut out = Vec::new();
    if bytes.len() < SIGNATURE.len() || bytes[..SIGNATURE.len()] != SIGNATURE {
        return (out, Some("not a PNG file (no PNG signature)".into()));
    }
    let mut damage = None;
    let mut at = SIGNATURE.len();
    loop {
        let Some(header) = bytes.get(at..at + 8) else {
            return (out, Some("cut short: no IEND chunk".into()));
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind: [u8; 4] = [header[4], header[5], header[6], header[7]];
        let name = String::from_utf8_lossy(&kind).into_owned();
        let start = at + 8;
        let end = start.saturating_add(len);
        if len > i32::MAX as usize || end.saturating_add(4) > bytes.len() {
            return (out, Some(format!("cut short in the {name} chunk")));
        }
        let data = &bytes[start..end];
        let stored =
            u32::from_be_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&kind);
        crc.update(data);
        if crc.finalize() != stored {
            return (out, Some(format!("the {name} chunk fails its CRC check")));
        }
        let parsed = match &kind {
            b"tEXt" => Some(read_text(data)),
            b"zTXt" => Some(read_ztxt(data)),
            b"iTXt" => Some(read_itxt(data)),
            b"IEND" => return (out, damage),
            _ => None,
        };
        match parsed {
            Some(Ok(entry)) => out.push(entry),
            Some(Err(reason)) => {
                damage.get_or_insert(format!("malformed {name} chunk: {reason}"));
            }
            None => {}
        }
        at = end + 4;
    }
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// The keyword before the first NUL (1–79 bytes), and the rest after it.
fn keyword(data: &[u8]) -> Result<(String, &[u8]), String> {
    let z = data
        .iter()
        .position(|&b| b == 0)
        .ok_or("no NUL after the keyword")?;
    if z == 0 || z > 79 {
        return Err(format!("keyword of {z} bytes (expected 1–79)"));
    }
    Ok((latin1(&data[..z]), &data[z + 1..]))
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, MAX_INFLATED_TEXT)
        .map_err(|e| format!("cannot inflate the text ({:?})", e.status))
}

// keyword \0 text
fn read_text(data: &[u8]) -> Result<(String, String), String> {
    let (key, text) = keyword(data)?;
    Ok((key, latin1(text)))
}

// keyword \0 compression-method zlib-text
fn read_ztxt(data: &[u8]) -> Result<(String, String), String> {
    let (key, rest) = keyword(data)?;
    let (&method, packed) = rest.split_first().ok_or("no compression method")?;
    if method != 0 {
        return Err(format!("unknown compression method {method}"));
    }
    Ok((key, latin1(&inflate(packed)?)))
}

// keyword \0 compression-flag compression-method language \0 translated-keyword \0 text
fn read_itxt(data: &[u8]) -> Result<(String, String), String> {
    let (key, rest) = keyword(data)?;
    let [flag, method, rest @ ..] = rest else {
        return Err("no compression flag and method".into());
    };
    let lang_end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or("no NUL after the language tag")?;
    let rest = &rest[lang_end + 1..];
    let tk_end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or("no NUL after the translated keyword")?;
    let raw = &rest[tk_end + 1..];
    let text = match (flag, method) {
        (0, _) => raw.to_vec(),
        (1, 0) => inflate(raw)?,
        (1, m) => return Err(format!("unknown compression method {m}")),
        (f, _) => return Err(format!("compression flag {f} (expected 0 or 1)")),
    };
    let text = String::from_utf8(text).map_err(|_| "the text is not UTF-8".to_string())?;
    Ok((key, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        v.extend_from_slice(&crc.finalize().to_be_bytes());
        v
    }

    fn zlib(text: &[u8]) -> Vec<u8> {
        miniz_oxide::deflate::compress_to_vec_zlib(text, 6)
    }

    /// A PNG with every kind of text chunk, one after the image data and one after IEND.
    fn sample() -> Vec<u8> {
        let mut png = SIGNATURE.to_vec();
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"tEXt", b"prompt\0a dog left of a cat"));
        png.extend(chunk(b"tEXt", b"caf\xe9\0na\xefve"));
        png.extend(chunk(
            b"iTXt",
            "note\0\0\0\0\0caf\u{e9} \u{2192}".as_bytes(),
        ));
        let mut packed = b"packed\0\x01\0en\0\0".to_vec();
        packed.extend(zlib("日本の猫".as_bytes()));
        png.extend(chunk(b"iTXt", &packed));
        let mut z = b"zipped\0\0".to_vec();
        z.extend(zlib(b"steer=l2s"));
        png.extend(chunk(b"zTXt", &z));
        png.extend(chunk(b"IDAT", &[1, 2, 3]));
        png.extend(chunk(b"tEXt", b"after\0the image"));
        png.extend(chunk(b"IEND", &[]));
        png.extend(chunk(b"tEXt", b"beyond\0the end"));
        png
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, t)| (k.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn reads_every_text_chunk_in_file_order() {
        let want = pairs(&[
            ("prompt", "a dog left of a cat"),
            ("caf\u{e9}", "na\u{ef}ve"),
            ("note", "caf\u{e9} \u{2192}"),
            ("packed", "日本の猫"),
            ("zipped", "steer=l2s"),
            ("after", "the image"),
        ]);
        let png = sample();
        assert_eq!(walk(&png), (want.clone(), None));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        std::fs::write(&path, &png).unwrap();
        assert_eq!(read_png_text(&path).unwrap(), want);
    }

    #[test]
    fn damaged_bytes_give_what_came_before_or_an_error() {
        let png = sample();
        // Truncated anywhere: never a panic; a prefix of the full list; an error when strict.
        let full = png_text_chunks(&png);
        let iend = png.len() - 12 - 26;
        for cut in 0..iend {
            let (got, damage) = walk(&png[..cut]);
            assert!(full.starts_with(&got), "cut {cut}");
            assert!(damage.is_some(), "cut {cut}");
        }
        // A flipped bit fails the CRC; what came before is kept.
        let mut bad = png.clone();
        let at = 8 + 25 + 12 + 3; // inside the first tEXt chunk's data
        bad[at] ^= 1;
        let (got, damage) = walk(&bad);
        assert!(got.is_empty());
        assert!(damage.unwrap().contains("tEXt chunk fails its CRC"));
        // A huge length is refused, not allocated.
        let mut huge = SIGNATURE.to_vec();
        huge.extend([0xff, 0xff, 0xff, 0xf0]);
        huge.extend(b"tEXt");
        assert!(walk(&huge).1.unwrap().contains("cut short"));
        // Not a PNG.
        assert!(png_text_chunks(b"GIF89a").is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gif");
        std::fs::write(&path, b"GIF89a").unwrap();
        let e = read_png_text(&path).unwrap_err().to_string();
        assert!(e.contains("x.gif") && e.contains("not a PNG"), "{e}");
        let e = read_png_text(&dir.path().join("none.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.png"), "{e}");
    }

    #[test]
    fn a_malformed_text_chunk_is_skipped_or_refused() {
        let mut png = SIGNATURE.to_vec();
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"tEXt", b"no separator"));
        png.extend(chunk(b"iTXt", b"k\0\x01\0\0\0not zlib"));
        png.extend(chunk(b"iTXt", b"k\0\0\0\0\0\xff\xfe"));
        png.extend(chunk(b"tEXt", b"good\0one"));
        png.extend(chunk(b"IEND", &[]));
        let (got, damage) = walk(&png);
        assert_eq!(got, pairs(&[("good", "one")]));
        assert!(damage.unwrap().contains("no NUL after the keyword"));
    }

    #[test]
    fn reads_what_the_png_crate_writes() {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 3, 2);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("prompt".into(), "a star above a heart".into())
                .unwrap();
            enc.add_ztxt_chunk("seed".into(), "42".into()).unwrap();
            enc.add_itxt_chunk("negative_prompt".into(), "café, 日本の猫".into())
                .unwrap();
            let mut w = enc.write_header().unwrap();
            let mut packed = png::text_metadata::ITXtChunk::new("packed", "→ compressed ←");
            packed.compressed = true;
            w.write_text_chunk(&packed).unwrap();
            w.write_image_data(&[7; 18]).unwrap();
            w.write_text_chunk(&png::text_metadata::TEXtChunk::new("late", "after IDAT"))
                .unwrap();
            w.finish().unwrap();
        }
        let mut got = png_text_chunks(&bytes);
        got.sort();
        let mut want = pairs(&[
            ("prompt", "a star above a heart"),
            ("seed", "42"),
            ("negative_prompt", "café, 日本の猫"),
            ("packed", "→ compressed ←"),
            ("late", "after IDAT"),
        ]);
        want.sort();
        assert_eq!(got, want);
        assert!(walk(&bytes).1.is_none());
    }
}
