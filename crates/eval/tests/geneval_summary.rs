//! GenEval's `summary_scores.py` reads our results files: a restatement of what that script
//! computes (from its documented behaviour: pandas reads the JSONL, prompts are the distinct
//! `metadata` strings, tasks are grouped by `tag` in order of first appearance, the overall
//! score is the mean of the task means) gives the same numbers as our summary, and both equal
//! the hand count.

use std::collections::HashMap;

use l2s_eval::score::{results_jsonl, ScoreOptions};
use l2s_eval::sources::score_detections;
use serde_json::{json, Value};

/// What GenEval's summary prints, computed from the results file's text alone.
struct GenevalPrintout {
    images: usize,
    prompts: usize,
    correct_images: f64,
    correct_prompts: f64,
    tasks: Vec<(String, f64, usize, usize)>,
    overall: f64,
}

fn genevals_summary(jsonl: &str) -> GenevalPrintout {
    let rows: Vec<Value> = jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("every line is one JSON record"))
        .collect();
    let field = |r: &Value, k: &str| -> Value {
        r.get(k)
            .unwrap_or_else(|| panic!("a record without {k:?}: {r}"))
            .clone()
    };
    let correct: Vec<bool> = rows
        .iter()
        .map(|r| field(r, "correct").as_bool().expect("correct is a boolean"))
        .collect();
    let mean = |xs: &[bool]| xs.iter().filter(|&&x| x).count() as f64 / xs.len() as f64;
    let mut by_prompt: HashMap<String, bool> = HashMap::new();
    let mut by_task: Vec<(String, Vec<bool>)> = Vec::new();
    for (r, &ok) in rows.iter().zip(&correct) {
        let meta = field(r, "metadata");
        let meta = meta.as_str().expect("metadata is a string").to_string();
        *by_prompt.entry(meta).or_default() |= ok;
        let tag = field(r, "tag")
            .as_str()
            .expect("tag is a string")
            .to_string();
        match by_task.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, v)) => v.push(ok),
            None => by_task.push((tag, vec![ok])),
        }
    }
    let tasks: Vec<(String, f64, usize, usize)> = by_task
        .iter()
        .map(|(t, v)| {
            (
                t.clone(),
                mean(v),
                v.iter().filter(|&&x| x).count(),
                v.len(),
            )
        })
        .collect();
    let prompt_flags: Vec<bool> = by_prompt.values().copied().collect();
    GenevalPrintout {
        images: rows.len(),
        prompts: by_prompt.len(),
        correct_images: mean(&correct),
        correct_prompts: mean(&prompt_flags),
        overall: tasks.iter().map(|t| t.1).sum::<f64>() / tasks.len() as f64,
        tasks,
    }
}

fn det(class: &str, x: f64, score: f64, color: Option<&str>) -> Value {
    let mut d = json!({"class": class, "bbox": [x, 10.0, x + 20.0, 30.0], "score": score});
    if let Some(c) = color {
        d["color"] = c.into();
    }
    d
}

#[test]
fn genevals_summary_reads_ours_and_agrees() {
    let single_dog = json!({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"});
    let single_cat = json!({"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"});
    let two = json!({"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of a dog and a cat"});
    let counting = json!({"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"});
    let colors = json!({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"});
    let position = json!({"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a dog left of a cat"});
    let attr = json!({"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"}], "prompt": "a photo of a red car and a blue cup"});
    // (prompt, sample detections): 13 images, 7 correct.
    let images: Vec<(&Value, Vec<Value>, bool)> = vec![
        (&single_dog, vec![det("dog", 0.0, 0.9, None)], true),
        (&single_dog, vec![det("dog", 0.0, 0.3, None)], false),
        (&single_cat, vec![det("cat", 0.0, 0.9, None)], true),
        (
            &two,
            vec![det("dog", 0.0, 0.9, None), det("cat", 50.0, 0.5, None)],
            true,
        ),
        (
            &two,
            vec![det("dog", 0.0, 0.4, None), det("cat", 50.0, 0.4, None)],
            true,
        ),
        (
            &counting,
            vec![det("dog", 0.0, 0.95, None), det("dog", 40.0, 0.91, None)],
            true,
        ),
        (
            &counting,
            vec![det("dog", 0.0, 0.95, None), det("dog", 40.0, 0.8, None)],
            false,
        ),
        (&colors, vec![det("car", 0.0, 0.9, Some("red"))], true),
        (&colors, vec![det("car", 0.0, 0.9, Some("blue"))], false),
        (
            &position,
            vec![det("dog", 0.0, 0.9, None), det("cat", 60.0, 0.9, None)],
            true,
        ),
        (
            &position,
            vec![det("dog", 60.0, 0.9, None), det("cat", 0.0, 0.9, None)],
            false,
        ),
        (
            &attr,
            vec![
                det("car", 0.0, 0.9, Some("red")),
                det("cup", 60.0, 0.9, Some("red")),
            ],
            false,
        ),
        (&attr, vec![det("cup", 60.0, 0.9, Some("blue"))], false),
    ];
    let mut lines = String::new();
    let mut sample: HashMap<String, usize> = HashMap::new();
    let mut folder: HashMap<String, usize> = HashMap::new();
    for (meta, dets, _) in &images {
        let key = meta.to_string();
        let next = folder.len();
        let p = *folder.entry(key.clone()).or_insert(next);
        let s = sample.entry(key).or_default();
        let mut line = (*meta).clone();
        line["filename"] = format!("{p:05}/samples/{s:04}.png").into();
        line["width"] = 128.into();
        line["height"] = 128.into();
        line["detections"] = Value::Array(dets.clone());
        *s += 1;
        lines.push_str(&(line.to_string() + "\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detections.jsonl");
    std::fs::write(&path, lines).unwrap();
    let scored = score_detections(&path, None, &ScoreOptions::default()).unwrap();
    assert!(
        scored.summary.errors.is_empty(),
        "{:?}",
        scored.summary.errors
    );
    let got: Vec<bool> = scored.results.iter().map(|r| r.correct).collect();
    let want: Vec<bool> = images.iter().map(|i| i.2).collect();
    assert_eq!(got, want, "each image judged as worked out by hand");

    // GenEval's view of our results file.
    let printout = genevals_summary(&results_jsonl(&scored.results));
    // Our summary.json, as written and read back.
    let ours: Value = serde_json::to_value(&scored.summary).unwrap();
    let g = &ours["geneval"];
    assert_eq!(printout.images, 13);
    assert_eq!(g["images"], 13);
    assert_eq!(printout.prompts, 7);
    assert_eq!(g["prompts"], 7);
    let close = |a: f64, b: &Value| (a - b.as_f64().unwrap()).abs() < 1e-12;
    assert!(close(printout.correct_images, &g["correct_images"]));
    assert!((printout.correct_images - 7.0 / 13.0).abs() < 1e-12);
    assert!(close(printout.correct_prompts, &g["correct_prompts"]));
    assert!((printout.correct_prompts - 6.0 / 7.0).abs() < 1e-12);
    let hand = [
        ("single_object", 2, 3),
        ("two_object", 2, 2),
        ("counting", 1, 2),
        ("colors", 1, 2),
        ("position", 1, 2),
        ("color_attr", 0, 2),
    ];
    let tasks = g["tasks"].as_array().unwrap();
    assert_eq!(printout.tasks.len(), hand.len());
    assert_eq!(tasks.len(), hand.len());
    for (((tag, c, n), (ptag, pacc, pc, pn)), t) in hand.iter().zip(&printout.tasks).zip(tasks) {
        assert_eq!((ptag.as_str(), *pc, *pn), (*tag, *c, *n));
        assert_eq!(t["tag"], *tag);
        assert_eq!(
            (t["correct"].as_u64(), t["total"].as_u64()),
            (Some(*c as u64), Some(*n as u64))
        );
        assert!(close(*pacc, &t["accuracy"]));
    }
    let overall = (2.0 / 3.0 + 1.0 + 0.5 + 0.5 + 0.5 + 0.0) / 6.0;
    assert!((printout.overall - overall).abs() < 1e-12);
    assert!(close(printout.overall, &g["overall"]));
    // The position score and VISOR stay over the spatial task alone.
    assert_eq!(ours["position_accuracy"], 0.5);
}
