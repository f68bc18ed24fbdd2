//! Helpers shared by the evaluation command tests: running the binary, and writing GenEval-layout
//! folders of drawn shapes-world scenes whose correct answers are known.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use l2s_eval::layout::{prompt_dir, sample_path, METADATA_FILE, PROMPTS_FILE};
use l2s_eval::prompts::{position_prompt, to_jsonl, SpatialPrompt};
use l2s_eval::Relation;
use l2s_shapes::render::draw_shape;
use l2s_shapes::{RenderConfig, ShapeClass};

pub fn fixture_model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/sd1-tiny/model")
        .display()
        .to_string()
}

pub fn l2s(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .output()
        .expect("running l2s")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = l2s(args);
    assert!(
        out.status.success(),
        "l2s {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail cleanly (no panic); returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "l2s {args:?} should fail");
    assert_ne!(
        out.status.code(),
        Some(101),
        "l2s {args:?} panicked: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A drawn object: class and square frame (x, y, side) in pixels.
pub type Placed = (ShapeClass, u32, u32, u32);

/// Draws objects on the shapes world's background.
pub fn draw(size: u32, objects: &[Placed]) -> image::RgbImage {
    let cfg = RenderConfig::with_size(size);
    let mut img = image::RgbImage::from_pixel(size, size, image::Rgb(cfg.background));
    for &(class, x, y, side) in objects {
        draw_shape(
            &mut img,
            class,
            class.color(),
            x,
            y,
            side,
            side,
            cfg.antialias,
        );
    }
    img
}

/// What to put at one sample of a prompt folder.
pub enum Sample {
    Image(Vec<Placed>),
    Missing,
    Corrupt,
}

/// Writes a GenEval-layout folder: `prompts.jsonl`, and per prompt its metadata and samples.
pub fn write_folder(root: &Path, size: u32, prompts: &[(SpatialPrompt, Vec<Sample>)]) {
    std::fs::create_dir_all(root).unwrap();
    let all: Vec<SpatialPrompt> = prompts.iter().map(|(p, _)| p.clone()).collect();
    std::fs::write(
        root.join(PROMPTS_FILE),
        to_jsonl(all.iter().map(|p| p.task())),
    )
    .unwrap();
    for (i, (p, samples)) in prompts.iter().enumerate() {
        std::fs::create_dir_all(prompt_dir(root, i).join("samples")).unwrap();
        std::fs::write(
            prompt_dir(root, i).join(METADATA_FILE),
            p.metadata_line() + "\n",
        )
        .unwrap();
        for (j, smp) in samples.iter().enumerate() {
            let path = sample_path(root, i, j);
            match smp {
                Sample::Image(objs) => draw(size, objs).save(&path).unwrap(),
                Sample::Missing => {}
                Sample::Corrupt => std::fs::write(&path, b"\x89PNG but not really").unwrap(),
            }
        }
    }
}

/// "A rel B" over shapes classes.
pub fn shapes_prompt(a: ShapeClass, rel: Relation, b: ShapeClass) -> SpatialPrompt {
    position_prompt(a.name(), rel, b.name())
}

/// Decodes standard base64 (for checking embedded images).
pub fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (k, &c) in chunk.iter().enumerate() {
            n |= (val(c) as u32) << (18 - 6 * k);
        }
        for k in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * k)) as u8);
        }
    }
    out
}
