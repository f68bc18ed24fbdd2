//! Finding files the published data names by the paths of the machine that wrote it.

use std::path::{Component, Path, PathBuf};

/// Where `recorded` (a path written into a data file) lies now, the data having moved to
/// `base` (the folder of the file that names it).
///
/// In order: `recorded` itself when it exists; a relative `recorded` under `base`; else the
/// longest tail of `recorded`'s components that exists under `base` (so
/// `/old/root/run/chunk_0/maps.pth` is found as `base/chunk_0/maps.pth`, and only then as
/// `base/maps.pth`: the longest tail is tried first because many files share a name). `None`
/// when nothing exists.
pub fn resolve_moved(recorded: &Path, base: &Path) -> Option<PathBuf> {
    if recorded.exists() {
        return Some(recorded.to_path_buf());
    }
    if recorded.is_relative() {
        let p = base.join(recorded);
        if p.exists() {
            return Some(p);
        }
    }
    let parts: Vec<&std::ffi::OsStr> = recorded
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    for start in 0..parts.len() {
        let mut p = base.to_path_buf();
        p.extend(&parts[start..]);
        if p.exists() {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_existing_tail_wins() {
        let dir = std::env::temp_dir().join(format!("l2s-sources-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("chunk_0/run")).unwrap();
        std::fs::write(dir.join("chunk_0/run/m.pth"), b"x").unwrap();
        std::fs::write(dir.join("m.pth"), b"y").unwrap();
        let recorded = Path::new("/gone/data/chunk_0/run/m.pth");
        assert_eq!(
            resolve_moved(recorded, &dir),
            Some(dir.join("chunk_0/run/m.pth"))
        );
        assert_eq!(
            resolve_moved(Path::new("/gone/other/m.pth"), &dir),
            Some(dir.join("m.pth"))
        );
        assert_eq!(
            resolve_moved(Path::new("run/m.pth"), &dir.join("chunk_0")),
            Some(dir.join("chunk_0/run/m.pth"))
        );
        assert_eq!(resolve_moved(Path::new("/gone/nothing.pth"), &dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
