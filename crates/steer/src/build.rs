//! Building the classifier's training data by dual inversion (DESIGN §2): each annotated image is
//! inverted with its true prompt and with a wrong-relation prompt, reconstructed from each
//! inversion while the relation maps are recorded at the chosen steps, and both samples are
//! labelled with the TRUE relation, so the classifier cannot learn to read the relation word.
//! Stable Diffusion inverts by fixed-point DDIM, FLUX by RF-inversion (the model's own choice).

use crate::error::{Context, Result};
use candle_core::Tensor;
use l2s_diffusion::RfInversionConfig;
use l2s_eval::{relations as relation_rule, top1_per_class, Detector, Relation, Triplet};
use l2s_generate::{invert, reconstruct, InvertRequest, StepObserver};
use l2s_models::{AttentionObserver, AttentionSite, InversionSettings, Pipeline};
use std::path::PathBuf;

use l2s_sources::{Fit, Problems};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use crate::annotated::{read_images, AnnotatedImage, BuildSource, ImageData, ReadImages};
use crate::dataset::{DatasetInfo, DatasetWriter, LayerInfo, SampleKind, SampleMeta, ShardSpec};
use crate::maps::{MapLayout, MapRecorder, WordPair};

#[derive(Clone, Debug)]
pub struct BuildConfig {
    pub steps: usize,
    pub fixed_point_iterations: usize,
    /// Denoising steps (0-based) at which maps are recorded.
    pub step_indices: Vec<usize>,
    pub psnr_threshold: f64,
    /// Also invert with a wrong-relation prompt (the method); `false` is the ablation.
    pub dual_inversion: bool,
    /// Picks each image's pair and wrong relation; on FLUX, mixed with the sample's number
    /// ([`inversion_seed`]), seeds its RF-inversion noise.
    pub seed: u64,
    pub shard: ShardSpec,
    /// RF-inversion's controllers (flow-matching models).
    pub rf: RfInversionConfig,
    /// Which samples a failed one takes with it.
    pub drop_rule: DropRule,
    /// How the maps become classifier channels (the published classifiers' layout by default).
    pub map_layout: MapLayout,
}

/// What happens to an image's wrong-prompt sample when its true-prompt sample is dropped (low
/// PSNR, or the relation check failed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropRule {
    /// The twin goes too and is never inverted (Learn-to-Steer's data building): every image in
    /// the dataset then has its true-prompt sample.
    #[default]
    Twins,
    /// Each sample is judged on its own.
    PerSample,
}

impl BuildConfig {
    /// The model's own data-building settings at `steps` sampling steps, as the paper builds
    /// its data: the map steps ([`Pipeline::map_steps`]), the PSNR floor
    /// ([`Pipeline::min_reconstruction_psnr`]), five fixed-point iterations per DDIM inversion
    /// step, RF-inversion held to the image at every step (γ = η = 1), dual inversion, twins
    /// dropped together, maps in the published classifiers' layout.
    pub fn for_model(model: &Pipeline, steps: usize) -> Self {
        Self {
            steps,
            fixed_point_iterations: 5,
            step_indices: model.map_steps(steps),
            psnr_threshold: model.min_reconstruction_psnr(),
            dual_inversion: true,
            seed: 0,
            shard: ShardSpec::all(),
            rf: RfInversionConfig::held_to_image(),
            drop_rule: DropRule::Twins,
            map_layout: MapLayout::Published,
        }
    }
}

/// The four relations, in label order.
pub fn relation_names() -> Vec<String> {
    Relation::ALL.iter().map(|r| r.name().to_string()).collect()
}

/// The prompt a triplet is inverted with, worded as the paper's data: "A {subject} {relation}
/// a {object}" with the relation as the published classifiers name it ("to the left of",
/// "to the right of", "above", "below") and "A"/"a" whatever the noun.
pub fn triplet_prompt(subject: &str, relation: Relation, object: &str) -> String {
    format!("A {subject} {} a {object}", relation.phrase())
}

/// Picks the triplet an image's samples are built from: one the source asserts, else a pair of
/// distinct objects whose boxes stand in exactly one of the four relations.
fn pick_triplet(img: &AnnotatedImage, rng: &mut ChaCha8Rng) -> Option<Triplet> {
    if !img.triplets.is_empty() {
        return img.triplets.choose(rng).cloned();
    }
    let mut candidates = Vec::new();
    for (i, (na, a)) in img.objects.iter().enumerate() {
        for (j, (nb, b)) in img.objects.iter().enumerate() {
            if i == j || na == nb {
                continue;
            }
            let set: Vec<Relation> = relation_rule(a, b).iter().collect();
            if set.len() == 1 {
                candidates.push((i, j, set[0]));
            }
        }
    }
    let &(i, j, relation) = candidates.choose(rng)?;
    Some(Triplet::new(
        img.objects[i].0.clone(),
        relation,
        img.objects[j].0.clone(),
    ))
}

/// Records one word pair's classifier input at chosen steps of a run (a reconstruction while
/// building data, or a plain generation for `l2s attention --classifier-maps`).
pub struct StepMaps {
    recorder: MapRecorder,
    at_steps: Vec<usize>,
    current: Option<usize>,
    per_step: Vec<Tensor>,
    sites: Vec<AttentionSite>,
}

impl StepMaps {
    /// Records `pair` at `at_steps` (0-based) in `layout`, without autograd.
    pub fn with_layout(pair: WordPair, at_steps: &[usize], layout: MapLayout) -> Self {
        let mut recorder =
            MapRecorder::with_layout(vec![pair], crate::steering::MAP_SIZE, true, layout);
        recorder.set_active(false);
        Self {
            recorder,
            at_steps: at_steps.to_vec(),
            current: None,
            per_step: Vec::new(),
            sites: Vec::new(),
        }
    }

    fn harvest(&mut self) -> candle_core::Result<()> {
        if self.current.take().is_some() {
            // (1, 1, 2, C, S, S) → (2, C, S, S)
            self.per_step
                .push(self.recorder.maps()?.squeeze(0)?.squeeze(0)?);
            if self.sites.is_empty() {
                self.sites = self.recorder.sites().to_vec();
            }
            self.recorder.clear();
        }
        Ok(())
    }

    /// (steps, 2, C, size, size) and the layers in channel order.
    pub fn finish(mut self) -> Result<(Tensor, Vec<AttentionSite>)> {
        self.harvest()?;
        if self.per_step.len() != self.at_steps.len() {
            crate::error::bail!(
                "recorded {} of {} steps",
                self.per_step.len(),
                self.at_steps.len()
            );
        }
        Ok((Tensor::stack(&self.per_step, 0)?, self.sites))
    }
}

impl AttentionObserver for StepMaps {
    fn wants(&self, site: &AttentionSite) -> bool {
        self.recorder.wants(site)
    }
    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<()> {
        self.recorder.observe(site, probs)
    }
}

impl StepObserver for StepMaps {
    fn begin_step(&mut self, index: usize, _timestep: usize) -> bool {
        if self.harvest().is_err() {
            return false;
        }
        let watch = self.at_steps.contains(&index);
        self.current = watch.then_some(index);
        self.recorder.set_active(watch);
        watch
    }
}

/// The RF-inversion noise seed of dataset sample `sample` (`l2s data build` numbers image i's
/// true-prompt sample 2i and its wrong-prompt sample 2i + 1): `seed` and the number mixed by
/// SplitMix64's finaliser, so every sample draws its own noise, the same in any shard or resumed
/// run, and nearby seeds share none.
pub fn inversion_seed(seed: u64, sample: u64) -> u64 {
    let mut z = seed ^ sample.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One inverted-and-reconstructed sample.
pub struct RecordedSample {
    /// (S, 2, C, size, size)
    pub maps: Tensor,
    pub sites: Vec<AttentionSite>,
    /// Reconstruction PSNR against the image in dB.
    pub psnr: f64,
    pub reconstruction: image::RgbImage,
}

/// Inverts `image` with `prompt`, reconstructs it while recording the pair's maps.
pub fn record_sample(
    model: &Pipeline,
    image: &image::RgbImage,
    prompt: &str,
    subject: &str,
    object: &str,
    cfg: &BuildConfig,
) -> Result<RecordedSample> {
    let pair = WordPair {
        subject: model.word_positions(prompt, subject)?,
        object: model.word_positions(prompt, object)?,
    };
    let mut req = InvertRequest::new(prompt);
    req.steps = cfg.steps;
    req.fixed_point_iterations = cfg.fixed_point_iterations;
    req.width = Some(image.width() as usize);
    req.height = Some(image.height() as usize);
    req.guidance = model.inversion_guidance();
    req.rf = cfg.rf;
    req.noise_seed = cfg.seed;
    let mut observer = StepMaps::with_layout(pair, &cfg.step_indices, cfg.map_layout);
    let inversion = invert(model, image, &req, &mut |_| {})?;
    let recon = reconstruct(model, &inversion, Some(&mut observer), &mut |_| {})?;
    let (maps, sites) = observer.finish()?;
    Ok(RecordedSample {
        maps,
        sites,
        psnr: recon.psnr.unwrap_or(f64::NAN),
        reconstruction: recon.image,
    })
}

/// Keeps a sample only when a detector finds both objects in the reconstruction with the true
/// relation between them. PSNR says how close the reconstruction is in pixels; this says whether
/// the maps recorded while drawing it show the layout the label names — a reconstruction that
/// moved an object would teach the classifier a wrong label.
pub struct ReconstructionCheck<'d> {
    pub detector: &'d (dyn Detector + Sync),
    /// Detections at or below this score are ignored (GenEval's rule).
    pub min_score: f32,
}

impl ReconstructionCheck<'_> {
    /// Whether the reconstruction still shows `subject relation object`.
    pub fn holds(
        &self,
        reconstruction: &image::RgbImage,
        subject: &str,
        relation: Relation,
        object: &str,
    ) -> Result<bool> {
        let found = top1_per_class(&self.detector.detect(reconstruction)?, self.min_score);
        Ok(match (found.get(subject), found.get(object)) {
            (Some(a), Some(b)) => relation_rule(&a.bbox, &b.bbox).contains(relation),
            _ => false,
        })
    }
}

/// Layer list of the dataset info from the recorded sites.
pub fn layer_infos(sites: &[AttentionSite]) -> Vec<LayerInfo> {
    sites
        .iter()
        .map(|s| LayerInfo {
            name: s.layer.clone(),
            heads: s.heads,
            height: s.height,
            width: s.width,
        })
        .collect()
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BuildSummary {
    pub images: usize,
    /// Samples the dataset holds from this build, those an interrupted earlier run of it wrote
    /// included: the summary of a resumed build equals an uninterrupted one's.
    pub written: usize,
    /// Of `written`, the samples found on disk from an earlier run (not in the summary file).
    #[serde(skip)]
    pub skipped_existing: usize,
    pub dropped_low_psnr: usize,
    /// Dropped by the [`ReconstructionCheck`]: the reconstruction lost an object or the relation.
    pub dropped_relation_lost: usize,
    /// Wrong-prompt samples not inverted because their true-prompt twin was dropped
    /// ([`DropRule::Twins`]).
    pub dropped_twin: usize,
    pub no_unambiguous_pair: usize,
    /// Samples not inverted because their image's pixels could not be decoded (its header
    /// read when the source was read; each such image is also named in a warning).
    pub dropped_unreadable: usize,
    pub mean_psnr: f64,
}

/// One inversion to run: an image's true-prompt or wrong-prompt sample.
struct SampleJob {
    sample: u64,
    kind: SampleKind,
    prompt_relation: Relation,
    prompt: String,
}

/// An image's samples, run in order on one worker so that a dropped true-prompt sample can
/// take its twin with it ([`DropRule::Twins`]) before the twin is inverted.
struct ImageJob {
    image: usize,
    subject: String,
    object: String,
    relation: Relation,
    samples: Vec<SampleJob>,
    /// PSNRs of this image's samples already on disk, in sample order.
    existing_psnr: Vec<f64>,
}

/// What became of one sample of an [`ImageJob`].
enum SampleOutcome {
    Recorded {
        recorded: RecordedSample,
        /// The relation check passed (or none was asked for).
        holds: bool,
    },
    /// Not inverted: its true-prompt twin was dropped.
    TwinDropped,
    /// Not inverted: the image's pixels could not be decoded.
    Unreadable,
}

/// Whether a recorded sample is kept, and if not why.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Kept,
    LowPsnr,
    RelationLost,
}

impl Verdict {
    fn of(psnr: f64, holds: bool, min_psnr: f64) -> Self {
        // NaN PSNR counts as too low.
        if psnr.is_nan() || psnr < min_psnr {
            Verdict::LowPsnr
        } else if !holds {
            Verdict::RelationLost
        } else {
            Verdict::Kept
        }
    }
}

/// One model loaded on one or more devices: worker `w` of a build runs on replica
/// `w mod n`, so with one replica per GPU each GPU inverts its own image.
#[derive(Clone, Copy)]
pub struct Replicas<'a>(&'a [Pipeline]);

impl<'a> Replicas<'a> {
    /// The replicas; `None` when `models` is empty.
    pub fn new(models: &'a [Pipeline]) -> Option<Self> {
        (!models.is_empty()).then_some(Self(models))
    }

    /// The first replica: the one that probes the maps' layout and hosts the relation check.
    pub fn first(&self) -> &'a Pipeline {
        &self.0[0]
    }

    /// The replica worker `worker` runs on.
    pub fn for_worker(&self, worker: usize) -> &'a Pipeline {
        &self.0[worker % self.0.len()]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> From<&'a Pipeline> for Replicas<'a> {
    fn from(model: &'a Pipeline) -> Self {
        Self(std::slice::from_ref(model))
    }
}

/// Builds (or resumes) a dataset in `writer` from `images`. With `positives_only`, the
/// true-prompt samples also go there: the single-inversion ablation from the same inversions.
/// With a `check`, samples whose reconstruction no longer shows the relation are dropped too.
/// `workers` threads invert at once, one image each (each on its replica of the model); samples
/// are written in the same order as with one. `--shard` splits by image, so twins stay
/// together. `progress(done, total)` after each image.
#[allow(clippy::too_many_arguments)]
pub fn build<'m>(
    models: impl Into<Replicas<'m>>,
    images: &[AnnotatedImage],
    cfg: &BuildConfig,
    check: Option<&ReconstructionCheck>,
    workers: usize,
    writer: &mut DatasetWriter,
    mut positives_only: Option<&mut DatasetWriter>,
    progress: &mut dyn FnMut(usize, usize, &BuildSummary),
) -> Result<BuildSummary> {
    let models = models.into();
    let mut summary = BuildSummary {
        images: images.len(),
        ..BuildSummary::default()
    };
    let mut jobs = Vec::new();
    for (index, img) in images.iter().enumerate() {
        if !cfg.shard.owns(index as u64) {
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            cfg.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let Some(Triplet {
            subject,
            relation,
            object,
        }) = pick_triplet(img, &mut rng)
        else {
            summary.no_unambiguous_pair += 1;
            continue;
        };
        let wrong: Vec<Relation> = Relation::ALL
            .iter()
            .copied()
            .filter(|r| *r != relation)
            .collect();
        let negative = wrong[rng.gen_range(0..wrong.len())];
        let mut kinds = vec![(SampleKind::Positive, relation)];
        if cfg.dual_inversion {
            kinds.push((SampleKind::Negative, negative));
        }
        let mut samples = Vec::new();
        let mut existing_psnr = Vec::new();
        for (k, (kind, prompt_relation)) in kinds.into_iter().enumerate() {
            let sample = index as u64 * 2 + k as u64;
            let single_done = positives_only
                .as_ref()
                .is_none_or(|w| kind == SampleKind::Negative || w.contains(sample));
            if writer.contains(sample) && single_done {
                summary.skipped_existing += 1;
                existing_psnr.extend(writer.completed_psnr(sample));
                continue;
            }
            samples.push(SampleJob {
                sample,
                kind,
                prompt_relation,
                prompt: triplet_prompt(&subject, prompt_relation, &object),
            });
        }
        if !samples.is_empty() || !existing_psnr.is_empty() {
            jobs.push(ImageJob {
                image: index,
                subject,
                object,
                relation,
                samples,
                existing_psnr,
            });
        }
    }
    // Inversion, reconstruction and the detector's check run on the workers.
    let run_sample = |model: &Pipeline,
                      job: &ImageJob,
                      pixels: &image::RgbImage,
                      s: &SampleJob|
     -> Result<(RecordedSample, bool)> {
        let img = &images[job.image];
        let prompt = &s.prompt;
        // RF-inversion (FLUX) draws noise, each sample its own; DDIM inversion draws none.
        let sample_cfg = BuildConfig {
            seed: inversion_seed(cfg.seed, s.sample),
            ..cfg.clone()
        };
        let recorded = record_sample(
            model,
            pixels,
            prompt,
            &job.subject,
            &job.object,
            &sample_cfg,
        )
        .with_context(|| format!("image {} with prompt {prompt:?}", img.id))?;
        let holds = match check {
            Some(check) if recorded.psnr >= cfg.psnr_threshold => check
                .holds(
                    &recorded.reconstruction,
                    &job.subject,
                    job.relation,
                    &job.object,
                )
                .with_context(|| {
                    format!(
                        "detecting objects in the reconstruction of image {}",
                        img.id
                    )
                })?,
            _ => true,
        };
        Ok((recorded, holds))
    };
    let run = |worker: usize, job: &ImageJob| -> Result<Vec<SampleOutcome>> {
        let model = models.for_worker(worker);
        // One decode per image, shared by its samples; a photo that does not decode is
        // skipped and counted, never fatal.
        let pixels = match images[job.image].pixels() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("image {} skipped: {e}", images[job.image].id);
                return Ok(job
                    .samples
                    .iter()
                    .map(|_| SampleOutcome::Unreadable)
                    .collect());
            }
        };
        let mut outcomes = Vec::new();
        let mut positive_dropped = false;
        for s in &job.samples {
            if positive_dropped && s.kind == SampleKind::Negative {
                outcomes.push(SampleOutcome::TwinDropped);
                continue;
            }
            let (recorded, holds) = run_sample(model, job, &pixels, s)?;
            let kept = Verdict::of(recorded.psnr, holds, cfg.psnr_threshold) == Verdict::Kept;
            if s.kind == SampleKind::Positive && !kept && cfg.drop_rule == DropRule::Twins {
                positive_dropped = true;
            }
            outcomes.push(SampleOutcome::Recorded { recorded, holds });
        }
        Ok(outcomes)
    };
    let mut psnr_sum = 0.0;
    let total = images.len();
    crate::workers::run_ordered(&jobs, workers, run, |k, outcomes| {
        let job = &jobs[k];
        // Samples an earlier run wrote count as an uninterrupted build counts them, in the same
        // order (an image's samples on disk precede those still to write).
        for psnr in &job.existing_psnr {
            psnr_sum += psnr;
            summary.written += 1;
            summary.mean_psnr = psnr_sum / summary.written as f64;
        }
        for (s, outcome) in job.samples.iter().zip(outcomes) {
            let recorded = match outcome {
                SampleOutcome::TwinDropped => {
                    summary.dropped_twin += 1;
                    continue;
                }
                SampleOutcome::Unreadable => {
                    summary.dropped_unreadable += 1;
                    continue;
                }
                SampleOutcome::Recorded { recorded, holds } => {
                    match Verdict::of(recorded.psnr, holds, cfg.psnr_threshold) {
                        Verdict::Kept => recorded,
                        Verdict::LowPsnr => {
                            summary.dropped_low_psnr += 1;
                            continue;
                        }
                        Verdict::RelationLost => {
                            summary.dropped_relation_lost += 1;
                            continue;
                        }
                    }
                }
            };
            psnr_sum += recorded.psnr;
            let label = writer
                .info()
                .label_of(job.relation.name())
                .context("relation missing from the dataset's classes")?;
            let meta = SampleMeta {
                sample: s.sample,
                image_id: images[job.image].id.clone(),
                subject: job.subject.clone(),
                object: job.object.clone(),
                relation: job.relation.name().to_string(),
                label,
                prompt: s.prompt.clone(),
                prompt_relation: s.prompt_relation.name().to_string(),
                kind: s.kind,
                psnr: recorded.psnr,
            };
            if s.kind == SampleKind::Positive {
                if let Some(single) = positives_only.as_deref_mut() {
                    if !single.contains(s.sample) {
                        single.append(meta.clone(), &recorded.maps)?;
                    }
                }
            }
            if !writer.contains(s.sample) {
                writer.append(meta, &recorded.maps)?;
            }
            summary.written += 1;
            summary.mean_psnr = psnr_sum / summary.written as f64;
        }
        progress(job.image + 1, total, &summary);
        Ok(())
    })?;
    progress(total, total, &summary);
    writer.flush()?;
    if let Some(single) = positives_only {
        single.flush()?;
    }
    Ok(summary)
}

/// The progress line of a build: samples kept and why others were dropped.
pub fn progress_message(s: &BuildSummary) -> String {
    format!(
        "{} samples, dropped {} under the PSNR threshold, {} relation lost, {} twins; PSNR {:.1} dB",
        s.written, s.dropped_low_psnr, s.dropped_relation_lost, s.dropped_twin, s.mean_psnr
    )
}

/// The detector that checks reconstructions, sized for the images' resolution. Refuses images
/// whose objects it cannot detect (every sample would be dropped).
pub fn shapes_relation_detector(images: &[AnnotatedImage]) -> Result<l2s_shapes::ShapeDetector> {
    let size = images.first().map_or(32, |i| i.side());
    let detector = l2s_shapes::ShapeDetector::new(l2s_shapes::DetectorConfig::for_render(
        &l2s_shapes::RenderConfig::with_size(size),
    ));
    let known = l2s_eval::Detector::classes(&detector);
    for img in images {
        if let Some((name, _)) = img.objects.iter().find(|(n, _)| !known.contains(n)) {
            crate::error::bail!(
                "the shapes relation check: image {} has an object {name:?}, which the shapes detector cannot find \
                 (it knows {}); use it only on shapes-world images",
                img.id,
                known.join(", ")
            );
        }
    }
    Ok(detector)
}

/// Which detector judges reconstructions (`--check-relation`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelationCheckKind {
    /// The shapes world's exact detector.
    Shapes,
    /// GenEval's Mask2Former, from this checkpoint (mmdet `.pth` or transformers weights).
    Mask2Former(PathBuf),
}

impl RelationCheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            RelationCheckKind::Shapes => "shapes",
            RelationCheckKind::Mask2Former(_) => "mask2former",
        }
    }
}

/// Everything `l2s data build` does, from a source to a dataset folder.
#[derive(Clone, Debug)]
pub struct BuildJob {
    pub source: BuildSource,
    /// How photos become the model's square (default: [`Pipeline::crops_training_images`]).
    pub fit: Option<Fit>,
    /// Use at most this many images of the source.
    pub limit: Option<usize>,
    pub config: BuildConfig,
    pub relation_check: Option<RelationCheckKind>,
    /// Where the relation check's Mask2Former runs (default: the first model's device).
    pub detector_device: Option<candle_core::Device>,
    /// The dataset folder (resumed if it holds this build).
    pub out: PathBuf,
    /// Samples per shard file.
    pub shard_size: usize,
    pub workers: usize,
}

/// What a build read and wrote; also saved as `build-summary.json` in the dataset folder.
#[derive(Debug, serde::Serialize)]
pub struct BuildReport {
    pub source: String,
    /// Records of the source looked at.
    pub records_seen: usize,
    /// Images the samples were built from.
    pub images_used: usize,
    /// Records and images left out, by reason (the first ones of each kind listed).
    pub left_out: Problems,
    pub samples: BuildSummary,
}

/// The file a build's [`BuildReport`] is written to.
pub const BUILD_SUMMARY_FILE: &str = "build-summary.json";

/// Reads the job's source, builds (or resumes) its dataset and writes the summary.
/// `progress(done, total, summary)` after each image.
pub fn run_build<'m>(
    models: impl Into<Replicas<'m>>,
    job: &BuildJob,
    progress: &mut dyn FnMut(usize, usize, &BuildSummary),
) -> Result<BuildReport> {
    let models = models.into();
    let model = models.first();
    let fit = job.fit.unwrap_or(if model.crops_training_images() {
        Fit::CenterCrop
    } else {
        Fit::Resize
    });
    let side = model.native_size() as u32;
    let read = read_images(&job.source, side, fit, job.limit)?;
    if read.images.is_empty() {
        crate::error::bail!(
            "{}: no usable image ({} records looked at; left out:\n{})",
            job.source.describe(),
            read.seen,
            read.problems.summary()
        );
    }
    let detector: Option<Box<dyn Detector + Sync>> = match &job.relation_check {
        Some(RelationCheckKind::Shapes) => Some(Box::new(shapes_relation_detector(&read.images)?)),
        Some(RelationCheckKind::Mask2Former(weights)) => Some(Box::new(
            l2s_detect::InstanceDetector::load_on(
                weights,
                job.detector_device.as_ref().unwrap_or(model.device()),
            )
            .with_context(|| format!("the relation check's detector {}", weights.display()))?,
        )),
        None => None,
    };
    let check = detector.as_deref().map(|d| ReconstructionCheck {
        detector: d,
        min_score: l2s_eval::SCORE_THRESHOLD,
    });
    let check_name = job.relation_check.as_ref().map(RelationCheckKind::name);
    let mut writer = open_dataset(
        model,
        &read.images,
        &job.config,
        check_name,
        &job.out,
        job.shard_size,
    )?;
    let samples = build(
        models,
        &read.images,
        &job.config,
        check.as_ref(),
        job.workers,
        &mut writer,
        None,
        progress,
    )?;
    writer.finish()?;
    let report = BuildReport {
        source: job.source.describe(),
        records_seen: read.seen,
        images_used: read.images.len(),
        left_out: read.problems,
        samples,
    };
    l2s_files::write_atomic(
        &job.out.join(BUILD_SUMMARY_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Opens (or resumes) a dataset for `model`, probing one sample for the map layout.
pub fn open_dataset(
    model: &Pipeline,
    images: &[AnnotatedImage],
    cfg: &BuildConfig,
    relation_check: Option<&str>,
    out: &std::path::Path,
    shard_size: usize,
) -> Result<DatasetWriter> {
    let (probe, a, b) = images
        .iter()
        .find_map(|i| match (i.triplets.first(), i.objects.as_slice()) {
            (Some(t), _) => Some((i, t.subject.clone(), t.object.clone())),
            (None, [a, b, ..]) => Some((i, a.0.clone(), b.0.clone())),
            _ => None,
        })
        .context("no image with a relation or two objects to record")?;
    let prompt = format!("a {a} and a {b}");
    let mut probe_cfg = cfg.clone();
    probe_cfg.fixed_point_iterations = 0;
    // The maps' shape depends on the model and the image size only: a grey square of the
    // images' size stands in for a photo, which would otherwise be decoded once more.
    let side = probe.side();
    let grey = image::RgbImage::from_pixel(side, side, image::Rgb([128, 128, 128]));
    let probe = record_sample(model, &grey, &prompt, &a, &b, &probe_cfg)?;
    let (maps, sites) = (probe.maps, probe.sites);
    let mut extra = serde_json::Map::new();
    if let Some(check) = relation_check {
        extra.insert("relation_check".into(), check.into());
    }
    extra.insert("num_inference_steps".into(), cfg.steps.into());
    extra.insert(
        "fixed_point_iterations".into(),
        cfg.fixed_point_iterations.into(),
    );
    extra.insert("min_psnr".into(), cfg.psnr_threshold.into());
    extra.insert("seed".into(), cfg.seed.into());
    let inversion = InversionSettings {
        fixed_point_iterations: cfg.fixed_point_iterations,
        rf: cfg.rf,
        noise_seed: cfg.seed,
    };
    extra.insert("inversion".into(), model.inversion_name(&inversion).into());
    extra.insert("drop_rule".into(), serde_json::to_value(cfg.drop_rule)?);
    if let Some(file) = model.transformer_file() {
        extra.insert("transformer_file".into(), file.display().to_string().into());
    }
    extra.insert(
        "model_folder".into(),
        model.folder().display().to_string().into(),
    );
    let mut info = DatasetInfo {
        model: model.fingerprint()?,
        num_maps: maps.dim(2)?,
        map_size: maps.dim(3)?,
        step_indices: cfg.step_indices.clone(),
        relations: relation_names(),
        layers: layer_infos(&sites),
        dual_inversion: cfg.dual_inversion,
        extra,
    };
    info.set_map_layout(cfg.map_layout);
    Ok(DatasetWriter::open(out, info, shard_size)?)
}

#[cfg(test)]
mod seed_tests {
    use super::inversion_seed;

    #[test]
    fn every_sample_and_seed_draws_its_own_noise() {
        let seeds: std::collections::HashSet<u64> = (0..4)
            .flat_map(|s| (0..64).map(move |n| inversion_seed(s, n)))
            .collect();
        assert_eq!(seeds.len(), 4 * 64);
        assert_eq!(inversion_seed(7, 3), inversion_seed(7, 3));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn relation_check_refuses_objects_its_detector_cannot_find() {
        let image = |names: &[&str]| super::AnnotatedImage {
            id: "7".into(),
            image: super::ImageData::Pixels(image::RgbImage::new(32, 32)),
            objects: names
                .iter()
                .map(|n| (n.to_string(), l2s_eval::BBox::new(0.0, 0.0, 4.0, 4.0)))
                .collect(),
            triplets: Vec::new(),
        };
        assert!(super::shapes_relation_detector(&[image(&["star", "heart"])]).is_ok());
        let err =
            super::shapes_relation_detector(&[image(&["star", "heart"]), image(&["dog", "star"])])
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("image 7") && err.contains("\"dog\"") && err.contains("circle"),
            "{err}"
        );
    }

    use super::*;
    use l2s_eval::Detection;

    #[test]
    fn prompts_are_worded_as_the_papers_data() {
        assert_eq!(
            triplet_prompt("star", Relation::LeftOf, "heart"),
            "A star to the left of a heart"
        );
        assert_eq!(
            triplet_prompt("umbrella", Relation::Above, "oven"),
            "A umbrella above a oven"
        );
        assert_eq!(
            triplet_prompt("teddy bear", Relation::RightOf, "dog"),
            "A teddy bear to the right of a dog"
        );
        assert_eq!(
            triplet_prompt("cat", Relation::Below, "car"),
            "A cat below a car"
        );
    }

    /// Reports fixed boxes, whatever the image.
    struct Fixed(Vec<Detection>, Vec<String>);

    impl Detector for Fixed {
        fn detect(&self, _: &image::RgbImage) -> Result<Vec<Detection>, l2s_eval::DetectError> {
            Ok(self.0.clone())
        }
        fn classes(&self) -> &[String] {
            &self.1
        }
    }

    fn det(class: &str, x: f32, y: f32, score: f32) -> Detection {
        Detection {
            class: class.into(),
            bbox: l2s_eval::BBox::new(x, y, x + 6.0, y + 6.0),
            score,
        }
    }

    #[test]
    fn relation_check_keeps_only_reconstructions_that_show_the_relation() {
        let image = image::RgbImage::new(32, 32);
        let check = |dets: Vec<Detection>, relation: Relation| {
            let d = Fixed(dets, vec!["star".into(), "heart".into()]);
            ReconstructionCheck {
                detector: &d,
                min_score: 0.3,
            }
            .holds(&image, "star", relation, "heart")
            .unwrap()
        };
        let layout = || vec![det("star", 2.0, 12.0, 0.9), det("heart", 22.0, 12.0, 0.9)];
        assert!(check(layout(), Relation::LeftOf));
        assert!(
            !check(layout(), Relation::RightOf),
            "the reconstruction swapped the objects"
        );
        assert!(!check(layout(), Relation::Above));
        // A lost object, or one found only under the score threshold, fails the check.
        assert!(!check(vec![det("star", 2.0, 12.0, 0.9)], Relation::LeftOf));
        assert!(!check(
            vec![det("star", 2.0, 12.0, 0.9), det("heart", 22.0, 12.0, 0.2)],
            Relation::LeftOf
        ));
        // The best-scoring detection of a class decides (GenEval's rule).
        let dets = vec![
            det("star", 2.0, 12.0, 0.5),
            det("star", 26.0, 12.0, 0.95),
            det("heart", 14.0, 12.0, 0.9),
        ];
        assert!(check(dets, Relation::RightOf));
    }
}
