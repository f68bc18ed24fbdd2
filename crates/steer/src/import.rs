//! The published Learn-to-Steer training samples (their per-sample JSON and `.pth` map files)
//! converted into a dataset `l2s train` reads. The published files hold one map pair per
//! denoising step; the steps of one prompt on one image follow each other, and become one
//! sample (steps, 2, C, S, S) here. Read through the safe pickle reader: no file runs code.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::Tensor;
use l2s_eval::Relation;
use l2s_sources::phase2::{read_phase2, Phase2Files, Phase2Options, Phase2Sample, PromptType};
use l2s_sources::{ProblemKind, Problems};

use crate::build::relation_names;
use crate::dataset::{DatasetInfo, DatasetWriter, SampleKind, SampleMeta};
use crate::error::{Context, Result};

/// What an import read and wrote.
#[derive(Debug, serde::Serialize)]
pub struct ImportReport {
    /// Published rows (one map pair at one step) looked at.
    pub rows_seen: usize,
    /// Samples written (all steps of one prompt on one image).
    pub samples: usize,
    /// Rows left out, by reason.
    pub left_out: Problems,
    pub step_indices: Vec<usize>,
    pub num_maps: usize,
    pub map_size: usize,
}

/// The rows of one prompt on one image, by step.
struct Group {
    key: (String, String, String),
    first: Phase2Sample,
    by_step: BTreeMap<usize, Tensor>,
}

/// Converts the published split at `path` (its folder or `result_metadata.json`) into a
/// dataset in `out` (refused if it already holds one). Groups whose steps differ from the
/// first group's are left out and counted.
pub fn import_published(path: &Path, out: &Path, shard_size: usize) -> Result<ImportReport> {
    if crate::dataset::Dataset::open(out).is_ok() {
        crate::error::bail!(
            "{} already holds a dataset: import into a new folder",
            out.display()
        );
    }
    let files = Phase2Files::open(path)?;
    let mut problems = Problems::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut writer: Option<DatasetWriter> = None;
    let mut report = ImportReport {
        rows_seen: 0,
        samples: 0,
        left_out: Problems::new(),
        step_indices: Vec::new(),
        num_maps: 0,
        map_size: 0,
    };
    let mut failure: Option<crate::SteerError> = None;
    // Grouping problems, added to the reader's once it is done.
    let mut grouping = Vec::new();
    let mut image_index: BTreeMap<String, u64> = BTreeMap::new();
    // Writes finished groups; the newest stays open while its steps arrive.
    let mut flush = |g: Group,
                     writer: &mut Option<DatasetWriter>,
                     report: &mut ImportReport,
                     problems: &mut Vec<(String, ProblemKind, String)>|
     -> Result<()> {
        let steps: Vec<usize> = g.by_step.keys().copied().collect();
        let first = &g.first;
        if report.step_indices.is_empty() {
            let (_, c, s, _) = first.maps.dims4()?;
            report.step_indices = steps.clone();
            report.num_maps = c;
            report.map_size = s;
        }
        if steps != report.step_indices {
            problems.push((
                first.img_id.clone(),
                ProblemKind::StepsDiffer,
                format!(
                    "steps {steps:?} where the first sample has {:?}",
                    report.step_indices
                ),
            ));
            return Ok(());
        }
        if writer.is_none() {
            let mut extra = serde_json::Map::new();
            extra.insert(
                "source".into(),
                format!("published samples {}", files.metadata.display()).into(),
            );
            if let Some(o) = files.orig_map_size {
                extra.insert("orig_map_size".into(), o.into());
            }
            let mut info = DatasetInfo {
                // No model named: a classifier trained here is tied to one by map count and
                // attention resolution, as the published checkpoints are.
                model: crate::dataset::UNNAMED_MODEL.into(),
                num_maps: report.num_maps,
                map_size: report.map_size,
                step_indices: report.step_indices.clone(),
                relations: relation_names(),
                layers: Vec::new(),
                dual_inversion: true,
                extra,
            };
            // The published maps are in the published classifiers' layout.
            info.set_map_layout(crate::maps::MapLayout::Published);
            *writer = Some(DatasetWriter::open(out, info, shard_size)?);
        }
        let w = writer.as_mut().expect("opened above");
        let next = image_index.len() as u64;
        let image = *image_index.entry(first.img_id.clone()).or_insert(next);
        let kind = match first.prompt_type {
            PromptType::Negative => SampleKind::Negative,
            _ => SampleKind::Positive,
        };
        let sample = 2 * image + u64::from(kind == SampleKind::Negative);
        if w.contains(sample) {
            problems.push((
                first.img_id.clone(),
                ProblemKind::DuplicateId,
                format!("a second {kind:?} prompt for this image"),
            ));
            return Ok(());
        }
        let prompt = first.prompt.clone().unwrap_or_default();
        let prompt_relation = match kind {
            SampleKind::Positive => first.relation,
            // The published rows name only the true relation; the prompt names the other.
            SampleKind::Negative => Relation::ALL
                .into_iter()
                .find(|r| *r != first.relation && prompt.contains(r.phrase()))
                .unwrap_or(first.relation),
        };
        let [subject, object] = first
            .objects
            .clone()
            .unwrap_or_else(|| [String::new(), String::new()]);
        let maps: Vec<Tensor> = g.by_step.into_values().collect();
        let maps = Tensor::stack(&maps, 0)?;
        w.append(
            SampleMeta {
                sample,
                image_id: first.img_id.clone(),
                subject,
                object,
                relation: first.relation.name().to_string(),
                label: first.relation.index(),
                prompt,
                prompt_relation: prompt_relation.name().to_string(),
                kind,
                // The published rows keep no reconstruction PSNR (their filter ran already).
                psnr: 0.0,
            },
            &maps,
        )?;
        report.samples += 1;
        Ok(())
    };
    let summary = read_phase2(path, &Phase2Options::default(), &mut problems, |row| {
        let key = (
            row.img_id.clone(),
            format!("{:?}", row.prompt_type),
            row.prompt.clone().unwrap_or_default(),
        );
        let step = usize::try_from(row.timestep).unwrap_or(usize::MAX);
        match groups.last_mut() {
            Some(g) if g.key == key && !g.by_step.contains_key(&step) => {
                g.by_step.insert(step, row.maps.clone());
            }
            _ => {
                if let Some(done) = groups.pop() {
                    if let Err(e) = flush(done, &mut writer, &mut report, &mut grouping) {
                        failure = Some(e);
                        return ControlFlow::Break(());
                    }
                }
                let mut by_step = BTreeMap::new();
                by_step.insert(step, row.maps.clone());
                groups.push(Group {
                    key,
                    first: row,
                    by_step,
                });
            }
        }
        ControlFlow::Continue(())
    })
    .with_context(|| format!("reading the published samples {}", path.display()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(done) = groups.pop() {
        flush(done, &mut writer, &mut report, &mut grouping)?;
    }
    for (id, kind, detail) in grouping {
        problems.push(&files.result_data, id, kind, detail);
    }
    let Some(w) = writer else {
        crate::error::bail!(
            "{}: no usable sample ({} rows looked at; left out:\n{})",
            path.display(),
            summary.seen,
            problems.summary()
        );
    };
    w.finish()?;
    report.rows_seen = summary.seen;
    report.left_out = problems;
    Ok(report)
}
