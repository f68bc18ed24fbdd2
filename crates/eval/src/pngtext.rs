//! Reading the uncompressed text chunks (`tEXt`, and `iTXt` without compression) of PNG bytes,
//! where generated images keep their prompt, seed and steering settings.

/// `(keyword, text)` pairs in file order. Compressed chunks are skipped; bytes that are not a
/// well-formed PNG give what could be read before the damage (possibly nothing).
pub fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut out = Vec::new();
    if bytes.len() < 8 || bytes[..8] != SIGNATURE {
        return out;
    }
    let mut at = 8usize;
    while at + 8 <= bytes.len() {
        let len =
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let kind = &bytes[at + 4..at + 8];
        let start = at + 8;
        let Some(end) = start.checked_add(len).filter(|&e| e + 4 <= bytes.len()) else {
            break;
        };
        let data = &bytes[start..end];
        match kind {
            b"tEXt" => {
                if let Some(z) = data.iter().position(|&b| b == 0) {
                    // Latin-1 → UTF-8.
                    let key: String = data[..z].iter().map(|&b| b as char).collect();
                    let text: String = data[z + 1..].iter().map(|&b| b as char).collect();
                    out.push((key, text));
                }
            }
            b"iTXt" => {
                if let Some(entry) = read_itxt(data) {
                    out.push(entry);
                }
            }
            b"IEND" => break,
            _ => {}
        }
        at = end + 4; // skip the CRC
    }
    out
}

// keyword \0 compression-flag compression-method language \0 translated-keyword \0 text
fn read_itxt(data: &[u8]) -> Option<(String, String)> {
    let z = data.iter().position(|&b| b == 0)?;
    let key: String = data[..z].iter().map(|&b| b as char).collect();
    let rest = data.get(z + 1..)?;
    let (&flag, rest) = rest.split_first()?;
    if flag != 0 {
        return None;
    }
    let rest = rest.get(1..)?; // compression method
    let lang_end = rest.iter().position(|&b| b == 0)?;
    let rest = rest.get(lang_end + 1..)?;
    let tk_end = rest.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(rest.get(tk_end + 1..)?).ok()?;
    Some((key, text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(data);
        v.extend_from_slice(&[0, 0, 0, 0]); // CRC is not checked
        v
    }

    #[test]
    fn reads_text_chunks() {
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"tEXt", b"prompt\0a dog left of a cat"));
        png.extend(chunk(
            b"iTXt",
            "note\0\0\0\0\0caf\u{e9} \u{2192}".as_bytes(),
        ));
        png.extend(chunk(b"iTXt", b"packed\0\x01\0\0\0xyz"));
        png.extend(chunk(b"IEND", &[]));
        png.extend(chunk(b"tEXt", b"after\0end"));
        let t = png_text_chunks(&png);
        assert_eq!(
            t,
            vec![
                ("prompt".to_string(), "a dog left of a cat".to_string()),
                ("note".to_string(), "caf\u{e9} \u{2192}".to_string()),
            ]
        );
        // Truncated or foreign bytes never panic.
        for cut in 0..png.len() {
            let _ = png_text_chunks(&png[..cut]);
        }
        assert!(png_text_chunks(b"GIF89a").is_empty());
    }
}
