//! A static, self-contained HTML report of one or more scored runs: a summary table, then per
//! prompt the runs side by side, each image framed green (correct) or red (wrong) with the
//! detected boxes drawn over it; filters (all / wrong / right / runs disagree) and a text
//! search. Images are embedded as PNG data URIs; styles and script are inline; nothing is
//! fetched from anywhere.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::score::{read_results, ImageResult, ImageStatus, Summary};

/// One scored run.
#[derive(Debug, Clone)]
pub struct ReportRun {
    /// Column title (the method, else the folder name).
    pub name: String,
    /// Folder the results' file names are relative to.
    pub root: PathBuf,
    pub summary: Option<Summary>,
    pub results: Vec<ImageResult>,
}

/// Results file a scored run folder holds.
pub const RESULTS_FILE: &str = "results.jsonl";
/// Summary file a scored run folder holds.
pub const SUMMARY_FILE: &str = "summary.json";

/// Reads `dir/results.jsonl` and (when present) `dir/summary.json`.
pub fn load_run(dir: &Path) -> Result<ReportRun, String> {
    if !dir.is_dir() {
        return Err(format!("{}: not a folder", dir.display()));
    }
    let rpath = dir.join(RESULTS_FILE);
    if !rpath.exists() {
        return Err(format!(
            "{}: no {RESULTS_FILE}; score the folder first (l2s score {})",
            dir.display(),
            dir.display()
        ));
    }
    let results = read_results(&rpath)?;
    let spath = dir.join(SUMMARY_FILE);
    let summary = if spath.exists() {
        let text = l2s_files::read_text_capped(&spath, crate::score::MAX_RESULTS_BYTES)
            .map_err(|e| e.to_string())?;
        Some(
            serde_json::from_str::<Summary>(&text)
                .map_err(|e| format!("{}: not a summary file: {e}", spath.display()))?,
        )
    } else {
        None
    };
    let folder = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let name = summary
        .as_ref()
        .and_then(|s| s.method.clone())
        .unwrap_or_else(|| folder.clone());
    Ok(ReportRun {
        name,
        root: dir.to_path_buf(),
        summary,
        results,
    })
}

/// Report settings.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub title: String,
    /// Embedded images are scaled down to at most this many pixels a side.
    pub max_side: u32,
    /// Displayed image size in CSS pixels.
    pub display_px: u32,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            title: "Spatial evaluation".into(),
            max_side: 256,
            display_px: 140,
        }
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The largest image file embedded.
pub const MAX_IMAGE_BYTES: u64 = l2s_files::MAX_IMAGE_BYTES;

/// An image as an embeddable PNG (scaled down when larger than `max_side`), with its size.
fn embed_image(path: &Path, max_side: u32) -> Result<(String, u32, u32), String> {
    let bytes = l2s_files::read_capped(path, MAX_IMAGE_BYTES).map_err(|e| e.reason())?;
    let img = image::load_from_memory(&bytes).map_err(|e| e.to_string())?;
    let (w, h) = (img.width(), img.height());
    let is_png = bytes.starts_with(&[0x89, b'P', b'N', b'G']);
    let png = if w.max(h) <= max_side && is_png {
        bytes
    } else {
        let k = max_side as f32 / w.max(h) as f32;
        let small = if k < 1.0 {
            img.resize(
                ((w as f32 * k).round() as u32).max(1),
                ((h as f32 * k).round() as u32).max(1),
                image::imageops::FilterType::Triangle,
            )
        } else {
            img
        };
        let mut out = std::io::Cursor::new(Vec::new());
        small
            .to_rgb8()
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| e.to_string())?;
        out.into_inner()
    };
    Ok((base64(&png), w, h))
}

const STYLE: &str = r#"
:root { --ok: #1a9641; --bad: #d7191c; --ink: #222; --muted: #777; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0; background: #fafafa; }
header { background: #fff; padding: 10px 18px 4px 18px; }
.bar { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid #ddd; padding: 6px 18px; }
h1 { font-size: 18px; margin: 0 0 6px 0; }
main { padding: 12px 18px; }
table.summary { border-collapse: collapse; background: #fff; margin-bottom: 6px; font-size: 13px; font-variant-numeric: tabular-nums; }
table.summary small { color: var(--muted); }
.tablewrap { overflow-x: auto; }
.note { color: var(--muted); font-size: 12px; margin: 0 0 4px 0; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary th { background: #f0f0f0; font-weight: 600; }
.controls { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; }
.controls label { cursor: pointer; }
.controls input[type=search] { padding: 4px 8px; min-width: 260px; border: 1px solid #bbb; border-radius: 4px; }
#count { color: var(--muted); }
section.prompt { background: #fff; border: 1px solid #e2e2e2; border-radius: 6px; padding: 8px 12px; margin-bottom: 12px; }
section.prompt h2 { font-size: 15px; margin: 0 0 6px 0; font-weight: 600; }
section.prompt h2 .idx { color: var(--muted); font-weight: 400; margin-right: 6px; }
section.prompt h2 .tally { color: var(--muted); font-weight: 400; margin-left: 8px; font-size: 13px; }
.runs { display: flex; gap: 16px; flex-wrap: wrap; }
.run + .run { border-left: 1px solid #e6e6e6; padding-left: 16px; }
.run h3 { font-size: 13px; margin: 0 0 4px 0; color: #444; }
.cards { display: grid; gap: 6px; }
figure.card { margin: 0; width: var(--px); }
figure.card .frame { position: relative; width: var(--px); height: var(--px); border: 4px solid; border-radius: 3px; background: #eee; }
figure.card.ok .frame { border-color: var(--ok); }
figure.card.bad .frame { border-color: var(--bad); }
figure.card img { display: block; width: 100%; height: 100%; image-rendering: pixelated; }
figure.card svg.boxes { position: absolute; inset: 0; width: 100%; height: 100%; overflow: visible; pointer-events: none; }
svg.boxes rect { fill: none; stroke-width: 2; }
svg.boxes rect.used { stroke: #ffd400; }
svg.boxes rect.other { stroke: #00e5ff; stroke-dasharray: 4 3; }
svg.boxes text { font: 600 11px system-ui, sans-serif; fill: #000; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
figure.card .missing { display: flex; align-items: center; justify-content: center; height: 100%; color: var(--bad); font-weight: 600; }
figure.card figcaption { font-size: 11px; color: var(--muted); margin-top: 2px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figure.card.dim { opacity: 0.18; }
.hidden { display: none !important; }
.pct { font-weight: 600; }
"#;

const SCRIPT: &str = r#"
(function () {
  var search = document.getElementById('search');
  var count = document.getElementById('count');
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.prompt'));
  function apply() {
    var mode = document.querySelector('input[name=show]:checked').value;
    var text = search.value.trim().toLowerCase();
    var shown = 0;
    sections.forEach(function (sec) {
      var visible = !text || sec.getAttribute('data-text').indexOf(text) >= 0;
      if (mode === 'differ' && sec.getAttribute('data-differ') !== '1') visible = false;
      var matching = 0;
      sec.querySelectorAll('figure.card').forEach(function (card) {
        var ok = card.getAttribute('data-correct') === '1';
        var hit = mode === 'wrong' ? !ok : mode === 'right' ? ok : true;
        card.classList.toggle('dim', !hit);
        if (hit) matching++;
      });
      if (matching === 0) visible = false;
      sec.classList.toggle('hidden', !visible);
      if (visible) shown++;
    });
    count.textContent = shown + ' of ' + sections.length + ' prompts shown';
  }
  // Filters can be preset in the address: report.html#show=wrong&q=dog
  var params = {};
  location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
    var i = kv.indexOf('=');
    if (i > 0) params[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
  });
  if (params.show) {
    var r = document.querySelector('input[name=show][value="' + params.show + '"]');
    if (r) r.checked = true;
  }
  if (params.q) search.value = params.q;
  document.querySelectorAll('input[name=show]').forEach(function (r) { r.addEventListener('change', apply); });
  search.addEventListener('input', apply);
  apply();
})();
"#;

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn summary_table(runs: &[ReportRun], html: &mut String) {
    html.push_str("<div class=\"tablewrap\"><table class=\"summary\" id=\"summary\"><thead><tr><th>run</th><th>images</th><th>prompts</th><th>accuracy</th>");
    for r in crate::Relation::ALL {
        let _ = write!(html, "<th>{}</th>", escape(r.name()));
    }
    html.push_str("<th>≥1 right</th><th>OA</th><th>cond</th><th>uncond</th><th>V1</th><th>V2</th><th>V3</th><th>V4</th><th>missing</th><th>problems</th></tr></thead><tbody>");
    for run in runs {
        let _ = write!(html, "<tr><td>{}</td>", escape(&run.name));
        match &run.summary {
            Some(s) => {
                let _ = write!(
                    html,
                    "<td>{}</td><td>{}</td><td class=\"pct\">{}</td>",
                    s.images,
                    s.prompts,
                    pct(s.position_accuracy)
                );
                for r in crate::Relation::ALL {
                    match s.per_relation.get(r.name()) {
                        Some(x) => {
                            let _ = write!(
                                html,
                                "<td>{} <small>({}/{})</small></td>",
                                pct(x.accuracy),
                                x.correct,
                                x.total
                            );
                        }
                        None => html.push_str("<td>–</td>"),
                    }
                }
                let v = &s.visor;
                for x in [
                    s.correct_prompts,
                    v.oa,
                    v.cond,
                    v.uncond,
                    v.visor_1,
                    v.visor_2,
                    v.visor_3,
                    v.visor_4,
                ] {
                    let _ = write!(html, "<td>{}</td>", pct(x));
                }
                let _ = write!(
                    html,
                    "<td>{}</td><td>{}</td></tr>",
                    s.missing_images,
                    s.errors.len()
                );
            }
            None => {
                let n = run.results.len();
                let c = run.results.iter().filter(|r| r.correct).count();
                let acc = if n == 0 { 0.0 } else { c as f64 / n as f64 };
                let _ = write!(html, "<td>{n}</td><td>–</td><td class=\"pct\">{}</td><td colspan=\"14\">(no summary.json)</td></tr>", pct(acc));
            }
        }
    }
    html.push_str("</tbody></table></div><p class=\"note\">accuracy: GenEval position score (correct images / images); \
≥1 right: prompts with at least one correct image; OA: images with every object found; cond: accuracy among those; \
uncond = cond × OA; Vn: prompts with at least n correct images (VISOR); missing images count as wrong.</p>");
}

/// GenEval's table per run: each task's accuracy and the overall score (mean over tasks).
fn geneval_table(runs: &[ReportRun], html: &mut String) {
    let mut tags: Vec<&str> = Vec::new();
    for t in runs
        .iter()
        .filter_map(|r| r.summary.as_ref())
        .flat_map(|s| &s.geneval.tasks)
    {
        if !tags.contains(&t.tag.as_str()) {
            tags.push(&t.tag);
        }
    }
    if tags.is_empty() {
        return;
    }
    html.push_str("<div class=\"tablewrap\"><table class=\"summary\" id=\"geneval\"><thead><tr><th>run</th><th>overall</th>");
    for t in &tags {
        let _ = write!(html, "<th>{}</th>", escape(t));
    }
    html.push_str("<th>correct images</th><th>correct prompts</th></tr></thead><tbody>");
    for run in runs {
        let Some(g) = run.summary.as_ref().map(|s| &s.geneval) else {
            continue;
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"pct\">{:.4}</td>",
            escape(&run.name),
            g.overall
        );
        for t in &tags {
            match g.tasks.iter().find(|x| x.tag == *t) {
                Some(x) => {
                    let _ = write!(
                        html,
                        "<td>{} <small>({}/{})</small></td>",
                        pct(x.accuracy),
                        x.correct,
                        x.total
                    );
                }
                None => html.push_str("<td>–</td>"),
            }
        }
        let _ = write!(
            html,
            "<td>{}</td><td>{}</td></tr>",
            pct(g.correct_images),
            pct(g.correct_prompts)
        );
    }
    html.push_str("</tbody></table></div><p class=\"note\">GenEval's summary: overall = mean of the task accuracies; \
prompts are the distinct metadata lines.</p>");
}

fn boxes_svg(r: &ImageResult, w: u32, h: u32, html: &mut String) {
    let (w, h) = (
        r.width.unwrap_or(w).max(1) as f32,
        r.height.unwrap_or(h).max(1) as f32,
    );
    html.push_str("<svg class=\"boxes\">");
    for b in &r.detections {
        let [x0, y0, x1, y1] = b.bbox;
        let (px, py) = (100.0 * x0 / w, 100.0 * y0 / h);
        let (pw, ph) = (100.0 * (x1 - x0) / w, 100.0 * (y1 - y0) / h);
        let class = if b.used { "used" } else { "other" };
        let _ = write!(
            html,
            "<rect class=\"{class}\" data-class=\"{}\" x=\"{px:.2}%\" y=\"{py:.2}%\" width=\"{pw:.2}%\" height=\"{ph:.2}%\"/>",
            escape(&b.class)
        );
        // Label above the box; for a box at the top edge, below it (short box) or inside its
        // bottom edge (tall box).
        let ty = match (py < 8.0, ph < 20.0) {
            (false, _) => (py, -3),
            (true, true) => (py + ph, 12),
            (true, false) => (py + ph, -3),
        };
        let _ = write!(
            html,
            "<text x=\"{px:.2}%\" y=\"{:.2}%\" dy=\"{}\">{} {:.2}</text>",
            ty.0,
            ty.1,
            escape(&b.class),
            b.score
        );
    }
    html.push_str("</svg>");
}

/// Renders the report; returns the HTML and warnings about images that could not be embedded.
pub fn render_html(runs: &[ReportRun], opts: &ReportOptions) -> (String, Vec<String>) {
    let mut warnings = Vec::new();
    // Prompts in the order of the first run that has them.
    let mut order: Vec<(String, String, Option<usize>)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut cells: Vec<HashMap<usize, Vec<&ImageResult>>> = Vec::new();
    for (ri, run) in runs.iter().enumerate() {
        for r in &run.results {
            let i = *at.entry(r.metadata.clone()).or_insert_with(|| {
                order.push((r.metadata.clone(), r.prompt.clone(), r.prompt_index));
                cells.push(HashMap::new());
                order.len() - 1
            });
            cells[i].entry(ri).or_default().push(r);
        }
    }
    let total_images: usize = runs.iter().map(|r| r.results.len()).sum();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body style=\"--px:{}px\">",
        escape(&opts.title),
        opts.display_px
    );
    let _ = write!(html, "<header><h1>{}</h1>", escape(&opts.title));
    summary_table(runs, &mut html);
    geneval_table(runs, &mut html);
    let _ = write!(
        html,
        "</header><div class=\"bar\"><div class=\"controls\" id=\"controls\"><strong>show</strong>\
<label><input type=\"radio\" name=\"show\" value=\"all\" checked> all</label>\
<label><input type=\"radio\" name=\"show\" value=\"wrong\"> wrong</label>\
<label><input type=\"radio\" name=\"show\" value=\"right\"> right</label>\
<label><input type=\"radio\" name=\"show\" value=\"differ\"> runs disagree</label>\
<input type=\"search\" id=\"search\" placeholder=\"search prompts…\" aria-label=\"search prompts\">\
<span id=\"count\">{} prompts, {total_images} images</span>\
<span class=\"legend\"><span style=\"color:var(--ok)\">■</span> correct <span style=\"color:var(--bad)\">■</span> wrong; \
solid boxes: used by the judgement, dashed: other detections</span></div></div><main>",
        order.len()
    );
    for (i, (_, prompt, index)) in order.iter().enumerate() {
        let tallies: Vec<(usize, usize)> = (0..runs.len())
            .map(|ri| {
                let v = cells[i].get(&ri).map(|v| v.as_slice()).unwrap_or(&[]);
                (v.iter().filter(|r| r.correct).count(), v.len())
            })
            .collect();
        let present: Vec<(usize, usize)> = tallies.iter().copied().filter(|t| t.1 > 0).collect();
        let differ = present
            .windows(2)
            .any(|w| w[0].0 * w[1].1 != w[1].0 * w[0].1);
        let idx = index.map(|i| format!("#{i:05}")).unwrap_or_default();
        let _ = write!(
            html,
            "<section class=\"prompt\" data-text=\"{}\" data-differ=\"{}\"><h2><span class=\"idx\">{}</span>{}<span class=\"tally\">{}</span></h2><div class=\"runs\">",
            escape(&prompt.to_lowercase()),
            differ as u8,
            escape(&idx),
            escape(prompt),
            tallies.iter().map(|(c, n)| format!("{c}/{n}")).collect::<Vec<_>>().join(" · ")
        );
        for (ri, run) in runs.iter().enumerate() {
            let Some(list) = cells[i].get(&ri) else {
                continue;
            };
            // A near-square grid per run (2×2 for GenEval's four images) keeps runs side by side.
            let cols = (list.len() as f64).sqrt().ceil().max(1.0) as usize;
            let _ = write!(
                html,
                "<div class=\"run\" data-run=\"{ri}\"><h3>{} — {}/{}</h3><div class=\"cards\" style=\"grid-template-columns: repeat({cols}, var(--px))\">",
                escape(&run.name),
                tallies[ri].0,
                tallies[ri].1
            );
            for r in list {
                let ok = r.correct;
                let _ = write!(html, "<figure class=\"card {}\" data-correct=\"{}\" data-run=\"{ri}\" data-file=\"{}\"><div class=\"frame\">", if ok { "ok" } else { "bad" }, ok as u8, escape(&r.filename));
                let shown = if r.status == ImageStatus::Missing {
                    None
                } else {
                    let path = run.root.join(&r.filename);
                    match embed_image(&path, opts.max_side) {
                        Ok(x) => Some(x),
                        Err(e) => {
                            warnings.push(format!("{}: {e}", path.display()));
                            None
                        }
                    }
                };
                match shown {
                    Some((data, w, h)) => {
                        let _ = write!(
                            html,
                            "<img alt=\"{}\" src=\"data:image/png;base64,{data}\">",
                            escape(&r.prompt)
                        );
                        boxes_svg(r, w, h, &mut html);
                    }
                    None => {
                        let what = match r.status {
                            ImageStatus::Missing => "missing",
                            ImageStatus::Undecodable => "unreadable",
                            ImageStatus::DetectorFailed => "detector failed",
                            ImageStatus::Scored => "not embedded",
                        };
                        let _ = write!(html, "<div class=\"missing\">{what}</div>");
                    }
                }
                let rels: Vec<String> = r
                    .relations
                    .iter()
                    .map(|c| {
                        if !c.found {
                            "not found".to_string()
                        } else if c.holds.is_empty() {
                            "no relation".to_string()
                        } else {
                            c.holds.to_string()
                        }
                    })
                    .collect();
                let title = if r.reason.is_empty() {
                    "correct".to_string()
                } else {
                    r.reason.replace('\n', "; ")
                };
                let label = r.sample.map(|s| format!("#{s}")).unwrap_or_default();
                let seed = r.seed.map(|s| format!(" seed {s}")).unwrap_or_default();
                let _ = write!(
                    html,
                    "</div><figcaption title=\"{}\">{}{} · {}</figcaption></figure>",
                    escape(&title),
                    escape(&label),
                    escape(&seed),
                    escape(&rels.join("; "))
                );
            }
            html.push_str("</div></div>");
        }
        html.push_str("</div></section>");
    }
    let _ = writeln!(html, "</main><script>{SCRIPT}</script></body></html>");
    (html, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
