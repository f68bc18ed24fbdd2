//! Measuring a steering method on prompts with a detector and the GenEval rule: the harness behind
//! the shapes benchmark. Every method — the plain model included — runs through the same loop.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use l2s_eval::{judge, Detector, Triplet};
use l2s_generate::GenerateRequest;
use l2s_models::Pipeline;

use crate::relations::RelationTriplet;
use crate::steering::{generate_steered, SteerConfig, SteerLoss, SteerTriplet};
use crate::workers::run_ordered;

/// One prompt with the triplet it asks for.
#[derive(Clone, Debug)]
pub struct EvalPrompt {
    pub prompt: String,
    pub triplet: RelationTriplet,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRecord {
    pub prompt: String,
    pub seed: u64,
    pub method: String,
    pub correct: bool,
    pub both_found: bool,
    pub relations: Vec<String>,
    pub seconds: f64,
    /// Steering loss at the last steered iteration (None for the plain model).
    pub final_loss: Option<f64>,
    pub first_loss: Option<f64>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvalSummary {
    pub method: String,
    pub images: usize,
    pub spatial_accuracy: f64,
    pub object_accuracy: f64,
    pub seconds_per_image: f64,
    pub mean_final_loss: Option<f64>,
}

pub fn summarize(method: &str, records: &[EvalRecord]) -> EvalSummary {
    let n = records.len().max(1) as f64;
    let losses: Vec<f64> = records
        .iter()
        .filter_map(|r| r.final_loss)
        .filter(|l| l.is_finite())
        .collect();
    EvalSummary {
        method: method.to_string(),
        images: records.len(),
        spatial_accuracy: records.iter().filter(|r| r.correct).count() as f64 / n,
        object_accuracy: records.iter().filter(|r| r.both_found).count() as f64 / n,
        seconds_per_image: records.iter().map(|r| r.seconds).sum::<f64>() / n,
        mean_final_loss: (!losses.is_empty())
            .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
    }
}

/// How to generate each image.
pub struct EvalSettings<'a> {
    pub steps: usize,
    pub guidance: f64,
    pub seeds: Vec<u64>,
    /// `None`: the plain model.
    pub loss: Option<&'a dyn SteerLoss>,
    pub steer: SteerConfig,
    /// Label of a relation in the loss's class space.
    pub label: &'a (dyn Fn(l2s_eval::Relation) -> Result<usize> + Sync),
    /// Where to save the images (`{prompt index:05}/{seed}.png`), if anywhere.
    pub save_dir: Option<&'a Path>,
    /// Images generated at once, each on its own thread (the model is shared, read-only).
    pub workers: usize,
}

/// Generates every prompt × seed with `method`, detects, and judges. Records come back in
/// prompt-then-seed order whatever the number of workers; the first error stops the rest.
pub fn evaluate(
    model: &Pipeline,
    prompts: &[EvalPrompt],
    method: &str,
    settings: &EvalSettings,
    detector: &(dyn Detector + Sync),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<EvalRecord>> {
    let triplets = prompts
        .iter()
        .map(|p| {
            SteerTriplet::for_prompt(
                std::slice::from_ref(&p.triplet),
                &|word| Ok(model.word_positions(&p.prompt, word)?),
                settings.label,
            )
            .with_context(|| format!("prompt {:?}", p.prompt))
        })
        .collect::<Result<Vec<_>>>()?;
    let jobs: Vec<(usize, u64)> = (0..prompts.len())
        .flat_map(|pi| settings.seeds.iter().map(move |&s| (pi, s)))
        .collect();
    let one = |(pi, seed): (usize, u64)| -> Result<EvalRecord> {
        let p = &prompts[pi];
        let mut req = GenerateRequest::new(p.prompt.clone());
        req.seed = seed;
        req.steps = settings.steps;
        req.guidance = settings.guidance;
        let start = Instant::now();
        let (image, first, last) = match settings.loss {
            Some(loss) => {
                let s = generate_steered(
                    model,
                    &req,
                    &triplets[pi],
                    loss,
                    &settings.steer,
                    &mut |_| {},
                )?;
                (
                    s.generated.image,
                    s.report.first_losses.first().copied(),
                    s.report.final_loss(),
                )
            }
            None => (
                l2s_generate::generate(model, &req, &mut l2s_diffusion::NoHook, &mut |_| {})?.image,
                None,
                None,
            ),
        };
        let seconds = start.elapsed().as_secs_f64();
        let detections = detector.detect(&image)?;
        let wanted = Triplet::new(
            p.triplet.subject.clone(),
            p.triplet.relation,
            p.triplet.object.clone(),
        );
        let j = judge(&wanted, &detections);
        if let Some(dir) = settings.save_dir {
            let folder = dir.join(format!("{pi:05}"));
            std::fs::create_dir_all(&folder)
                .with_context(|| format!("creating {}", folder.display()))?;
            let path = folder.join(format!("{seed}.png"));
            let meta = vec![
                ("prompt".to_string(), p.prompt.clone()),
                ("seed".to_string(), seed.to_string()),
                ("method".to_string(), method.to_string()),
                ("correct".to_string(), j.correct.to_string()),
            ];
            l2s_generate::write_png(&path, &image, &meta)?;
        }
        Ok(EvalRecord {
            prompt: p.prompt.clone(),
            seed,
            method: method.to_string(),
            correct: j.correct,
            both_found: j.a.is_some() && j.b.is_some(),
            relations: j.relations.iter().map(|r| r.name().to_string()).collect(),
            seconds,
            final_loss: last,
            first_loss: first,
        })
    };
    let total = jobs.len();
    let mut records = Vec::with_capacity(total);
    run_ordered(
        &jobs,
        settings.workers,
        |&(pi, seed)| {
            one((pi, seed)).with_context(|| format!("prompt {:?}, seed {seed}", prompts[pi].prompt))
        },
        |_, r| {
            records.push(r);
            progress(records.len(), total);
            Ok(())
        },
    )?;
    Ok(records)
}
