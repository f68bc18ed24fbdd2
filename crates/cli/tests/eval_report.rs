//! `l2s report`: the HTML page's structure (every image present and embedded, frames matching
//! correctness, boxes drawn, filters and search present, nothing fetched from outside), without
//! a browser.
//!
//! With `L2S_REPORT_DEMO_DIR` set, `demo_report` also leaves a demonstration (two scored runs of
//! drawn shapes-world scenes and their report) in that folder; `tools/report/screenshot.sh`
//! uses it.

mod eval_support;

use std::path::Path;

use eval_support::*;
use l2s_eval::prompts::PromptRng;
use l2s_eval::report::escape;
use l2s_eval::score::{read_results, ImageResult, ImageStatus};
use l2s_eval::Relation;
use l2s_shapes::ShapeClass;

/// Splits the page into its image cards.
fn cards(html: &str) -> Vec<&str> {
    html.split("<figure class=\"card ")
        .skip(1)
        .map(|c| &c[..c.find("</figure>").unwrap()])
        .collect()
}

fn attr<'a>(card: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = card
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {card}"))
        + key.len();
    &card[at..at + card[at..].find('"').unwrap()]
}

/// Checks the page against the runs' results.
fn check_page(html: &str, runs: &[(&Path, Vec<ImageResult>)]) {
    let all: Vec<&ImageResult> = runs.iter().flat_map(|(_, r)| r.iter()).collect();
    let cs = cards(html);
    assert_eq!(cs.len(), all.len(), "one card per image");
    // Every card's frame matches its verdict, and every result has its card.
    for c in &cs {
        let ok = attr(c, "data-correct") == "1";
        assert_eq!(
            c.starts_with("ok\""),
            ok,
            "frame colour vs data-correct: {}",
            &c[..80.min(c.len())]
        );
    }
    for (ri, (root, results)) in runs.iter().enumerate() {
        for r in results {
            let file = escape(&r.filename);
            let card = cs
                .iter()
                .find(|c| attr(c, "data-file") == file && attr(c, "data-run") == ri.to_string())
                .unwrap_or_else(|| panic!("no card for {} in {}", r.filename, root.display()));
            assert_eq!(
                attr(card, "data-correct"),
                if r.correct { "1" } else { "0" }
            );
            let drawn = card.matches("<rect class=\"used\"").count();
            assert_eq!(
                drawn,
                r.detections.iter().filter(|b| b.used).count(),
                "{}",
                r.filename
            );
            assert_eq!(card.matches("<rect ").count(), r.detections.len());
            for b in &r.detections {
                assert!(card.contains(&format!("data-class=\"{}\"", escape(&b.class))));
            }
            let embedded = card.contains("src=\"data:image/png;base64,");
            match r.status {
                ImageStatus::Scored => {
                    assert!(embedded, "{} should be embedded", r.filename);
                    // The embedded bytes are the image itself.
                    let data = &card[card.find("base64,").unwrap() + 7..];
                    let data = &data[..data.find('"').unwrap()];
                    let shown = image::load_from_memory(&unbase64(data)).unwrap().to_rgb8();
                    let orig = image::open(root.join(&r.filename)).unwrap().to_rgb8();
                    assert_eq!(shown, orig, "{}", r.filename);
                }
                ImageStatus::Missing => assert!(!embedded && card.contains(">missing<")),
                _ => assert!(!embedded && card.contains(">unreadable<")),
            }
        }
    }
    // Filters, search and the summary table.
    for needle in [
        "name=\"show\" value=\"all\" checked",
        "name=\"show\" value=\"wrong\"",
        "name=\"show\" value=\"right\"",
        "name=\"show\" value=\"differ\"",
        "id=\"search\"",
        "<table class=\"summary\"",
        "<script>",
    ] {
        assert!(html.contains(needle), "missing {needle}");
    }
    // Self-contained: no link, script or image from elsewhere.
    for bad in [
        "http://",
        "https://",
        "src=\"/",
        "src=\"file",
        "<link",
        "@import",
        "url(",
    ] {
        assert!(
            !html.contains(bad),
            "page refers to something outside: {bad}"
        );
    }
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
}

/// Objects at random places (a model that ignores the relation) or placed as asked.
fn scene(
    rng: &mut PromptRng,
    a: ShapeClass,
    rel: Relation,
    b: ShapeClass,
    obey: bool,
    size: u32,
) -> Vec<Placed> {
    let side = size * 5 / 16 + rng.below((size / 8) as usize) as u32;
    let free = size - side;
    let mut pos = || {
        (
            rng.below(free as usize + 1) as u32,
            rng.below(free as usize + 1) as u32,
        )
    };
    if !obey {
        loop {
            let (p, q) = (pos(), pos());
            let apart = p.0.abs_diff(q.0) > side + 1 || p.1.abs_diff(q.1) > side + 1;
            if apart {
                return vec![(a, p.0, p.1, side), (b, q.0, q.1, side)];
            }
        }
    }
    let (near, far) = (rng.below(3) as u32, free - rng.below(3) as u32);
    let mid = free / 2 + rng.below(5) as u32 - 2;
    let ((ax, ay), (bx, by)) = match rel {
        Relation::LeftOf => ((near, mid), (far, mid)),
        Relation::RightOf => ((far, mid), (near, mid)),
        Relation::Above => ((mid, near), (mid, far)),
        Relation::Below => ((mid, far), (mid, near)),
    };
    vec![(a, ax, ay, side), (b, bx, by, side)]
}

/// Two runs over the same prompts: "base" (random placement) and "placed" (as asked, with a
/// few objects left out and one missing image).
fn demo_runs(root: &Path, prompts: usize, size: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut rng = PromptRng::new(7);
    let set = l2s_eval::prompts::position_prompts(prompts, &l2s_eval::prompts::SHAPES_CLASSES, 3)
        .unwrap();
    let mut base = Vec::new();
    let mut placed = Vec::new();
    for (i, p) in set.iter().enumerate() {
        let t = &p.triplets()[0];
        let a = ShapeClass::from_word(&t.subject).unwrap();
        let b = ShapeClass::from_word(&t.object).unwrap();
        let mut bs = Vec::new();
        let mut ps = Vec::new();
        for j in 0..4 {
            let mut s = scene(&mut rng, a, t.relation, b, false, size);
            if (i + j) % 5 == 0 {
                s.pop(); // the model forgot B
            }
            bs.push(Sample::Image(s));
            let mut s = scene(&mut rng, a, t.relation, b, (i * 4 + j) % 7 != 3, size);
            if (i + j) % 9 == 4 {
                s.remove(0);
            }
            ps.push(if i == 1 && j == 2 {
                Sample::Missing
            } else {
                Sample::Image(s)
            });
        }
        base.push((p.clone(), bs));
        placed.push((p.clone(), ps));
    }
    let (a, b) = (root.join("base"), root.join("placed"));
    write_folder(&a, size, &base);
    write_folder(&b, size, &placed);
    (a, b)
}

#[test]
fn report_structure() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = demo_runs(dir.path(), 6, 32);
    // A corrupt image in the first run.
    std::fs::write(a.join("00002/samples/0001.png"), b"not an image").unwrap();
    ok(&["score", s(&a), "-q"]);
    ok(&["score", s(&b), "-q"]);
    let out = dir.path().join("report.html");
    let stdout = ok(&[
        "report",
        s(&a),
        s(&b),
        "--out",
        s(&out),
        "--title",
        "Demo <runs>",
    ]);
    assert!(stdout.contains("2 runs, 48 images"), "{stdout}");
    let html = std::fs::read_to_string(&out).unwrap();
    let ra = read_results(&a.join("results.jsonl")).unwrap();
    let rb = read_results(&b.join("results.jsonl")).unwrap();
    assert!(ra.iter().any(|r| r.correct) && ra.iter().any(|r| !r.correct));
    assert!(rb.iter().any(|r| r.status == ImageStatus::Missing));
    assert!(ra.iter().any(|r| r.status == ImageStatus::Undecodable));
    check_page(&html, &[(&a, ra.clone()), (&b, rb.clone())]);
    // The title is escaped; both runs are in the table (named by their folder: no method recorded).
    assert!(html.contains("<title>Demo &lt;runs&gt;</title>"));
    assert!(html.contains("<td>base</td>") && html.contains("<td>placed</td>"));
    // One section per prompt, with both runs side by side; "runs disagree" marks.
    assert_eq!(html.matches("<section class=\"prompt\"").count(), 6);
    assert_eq!(html.matches("<div class=\"run\" data-run=\"0\"").count(), 6);
    assert_eq!(html.matches("<div class=\"run\" data-run=\"1\"").count(), 6);
    let differ = ra
        .chunks(4)
        .zip(rb.chunks(4))
        .filter(|(x, y)| {
            x.iter().filter(|r| r.correct).count() != y.iter().filter(|r| r.correct).count()
        })
        .count();
    assert_eq!(html.matches("data-differ=\"1\"").count(), differ);

    // Large images are scaled down to --max-side.
    let big = dir.path().join("big");
    write_folder(
        &big,
        64,
        &[(
            shapes_prompt(ShapeClass::Circle, Relation::LeftOf, ShapeClass::Square),
            vec![Sample::Image(vec![
                (ShapeClass::Circle, 4, 20, 20),
                (ShapeClass::Square, 40, 20, 20),
            ])],
        )],
    );
    ok(&["score", s(&big), "-q"]);
    let small = dir.path().join("small.html");
    ok(&["report", s(&big), "--out", s(&small), "--max-side", "32"]);
    let html = std::fs::read_to_string(&small).unwrap();
    let data = &html[html.find("base64,").unwrap() + 7..];
    let img = image::load_from_memory(&unbase64(&data[..data.find('"').unwrap()])).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    assert!(read_results(&big.join("results.jsonl")).unwrap()[0].correct);
}

#[test]
fn report_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let e = fails(&[
        "report",
        s(&dir.path().join("absent")),
        "--out",
        s(&dir.path().join("r.html")),
    ]);
    assert!(e.contains("absent") && e.contains("not a folder"), "{e}");
    let e = fails(&[
        "report",
        s(dir.path()),
        "--out",
        s(&dir.path().join("r.html")),
    ]);
    assert!(
        e.contains("results.jsonl") && e.contains("l2s score"),
        "{e}"
    );
    std::fs::write(dir.path().join("results.jsonl"), "{\"x\": 1}\n").unwrap();
    let e = fails(&[
        "report",
        s(dir.path()),
        "--out",
        s(&dir.path().join("r.html")),
    ]);
    assert!(e.contains("results.jsonl:1"), "{e}");
    let e = fails(&[
        "report",
        s(dir.path()),
        "--out",
        s(&dir.path().join("no/r.html")),
    ]);
    assert!(e.contains("does not exist"), "{e}");
    assert_eq!(l2s(&["report", "--out", "x.html"]).status.code(), Some(2));
    assert!(!dir.path().join("r.html").exists());
}

/// The demonstration report (kept in `$L2S_REPORT_DEMO_DIR` when set, for the screenshot
/// script; in a temporary folder otherwise).
#[test]
fn demo_report() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::env::var_os("L2S_REPORT_DEMO_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("demo"));
    let _ = std::fs::remove_dir_all(&root);
    let (a, b) = demo_runs(&root, 12, 64);
    ok(&["score", s(&a), "-q"]);
    ok(&["score", s(&b), "-q"]);
    let out = root.join("report.html");
    ok(&[
        "report",
        s(&a),
        s(&b),
        "--out",
        s(&out),
        "--title",
        "Shapes world: drawn scenes, random vs placed as asked",
    ]);
    let html = std::fs::read_to_string(&out).unwrap();
    check_page(
        &html,
        &[
            (&a, read_results(&a.join("results.jsonl")).unwrap()),
            (&b, read_results(&b.join("results.jsonl")).unwrap()),
        ],
    );
}
