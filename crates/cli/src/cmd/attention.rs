//! `l2s attention`: generate an image and draw its words' cross-attention maps.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use l2s_generate::attention::{check_request, words_in_prompt};
use l2s_generate::{
    attention_sheet, generate_observed, generate_with_attention, generation_metadata, write_png,
    write_tensors, AttentionCollector, AttentionRequest, GenerateRequest, Observers,
};
use l2s_steer::build::StepMaps;
use l2s_steer::maps::WordPair;

use crate::common::{
    load_model, png_target, warn_all, Bars, Global, MapLayoutArg, ModelArgs, SampleArgs,
};

#[derive(clap::Args)]
#[command(
    after_help = "The sheet shows, left to right, the generated image and then one heat map per word in the \
order of --words, each labelled with its word. A word's map is its cross-attention over the image (conditional \
prompt only), each layer's map resized to --map-size and normalised, averaged over layers, heads and the --at-steps. \
--maps writes `per_word` (steps, words, S, S), `per_head` (steps, words, layers·heads, S, S) and every raw layer \
map `layer.<step>.<layer>` (words, heads, h, w); the header metadata names the words, steps and layers."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    /// Comma-separated words or phrases of the prompt, e.g. "dog,teddy bear"
    #[arg(long)]
    pub words: String,
    /// Seed of the initial noise
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SampleArgs,
    /// 0-based steps whose maps are kept, comma-separated (default: 5,10,15,20,25,49 where they exist;
    /// FLUX.1-schnell: 1,3)
    #[arg(long, value_delimiter = ',')]
    pub at_steps: Vec<usize>,
    /// Side of the common grid every layer's map is resized to (1–1024)
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub map_size: usize,
    /// Where to write the sheet (.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the maps to this safetensors file
    #[arg(long, value_name = "FILE")]
    pub maps: Option<PathBuf>,
    /// Also write the two --words' maps exactly as a relation classifier receives them, to this
    /// safetensors file: `maps` (steps, 2, C, 16, 16) f32 at --at-steps and `steps` (steps) i64,
    /// the denoising step of each — what `l2s classify --maps` reads
    #[arg(long, value_name = "FILE")]
    pub classifier_maps: Option<PathBuf>,
    /// Channel layout of --classifier-maps: `published` (what the published Learn-to-Steer
    /// classifiers read: layers by resolution ascending, bilinear resize, renormalised only when
    /// resized; what `l2s data build` records by default) or `ours`
    #[arg(long, value_enum, default_value = "published")]
    pub map_layout: MapLayoutArg,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let out = png_target(&args.out, "--out")?;
    let words: Vec<String> = args
        .words
        .split(',')
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        bail!(
            "--words {:?}: expected one or more comma-separated words of the prompt",
            args.words
        );
    }
    let (model, model_name) = load_model(&args.model)?;
    let (steps, guidance) = args.sampling.resolve(&model, false);
    let at_steps = if args.at_steps.is_empty() {
        model.attention_steps(steps)
    } else {
        args.at_steps.clone()
    };
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.sampling.negative_prompt.clone(),
        seed: args.seed,
        steps,
        guidance,
        width: args.sampling.width,
        height: args.sampling.height,
        init_latents: None,
    };
    let att = AttentionRequest {
        words: words.clone(),
        at_steps: at_steps.clone(),
        map_size: args.map_size,
    };
    let mut bars = Bars::new(global, "image");
    let (generated, maps, classifier_input) = match &args.classifier_maps {
        None => {
            let (g, m) = generate_with_attention(&model, &req, &att, &mut |p| bars.update(p))
                .context("generating with attention maps")?;
            (g, m, None)
        }
        Some(path) => {
            let [a, b] = words.as_slice() else {
                bail!(
                    "--classifier-maps {}: a relation classifier reads two words; --words names {}",
                    path.display(),
                    words.len()
                );
            };
            let found = words_in_prompt(&model, &req.prompt, &words)?;
            check_request(&att, steps)?;
            let pair = WordPair {
                subject: found[0].positions.clone(),
                object: found[1].positions.clone(),
            };
            tracing::info!("classifier maps of `{a}` and `{b}`");
            let mut steps_sorted = at_steps.clone();
            steps_sorted.sort_unstable();
            steps_sorted.dedup();
            let mut collector = AttentionCollector::new(found, &at_steps)?;
            let mut recorder = StepMaps::with_layout(pair, &steps_sorted, args.map_layout.into());
            let g = generate_observed(
                &model,
                &req,
                &mut Observers(vec![&mut collector, &mut recorder]),
                &mut |p| bars.update(p),
            )
            .context("generating with attention maps")?;
            let (cmaps, _) = recorder.finish()?;
            let steps_t = Tensor::new(
                steps_sorted.iter().map(|&s| s as i64).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            (
                g,
                collector.finish(args.map_size)?,
                Some((path, cmaps, steps_t)),
            )
        }
    };
    bars.finish();
    warn_all(&generated.warnings);
    let averaged = maps.averaged()?;
    let labelled = words
        .iter()
        .enumerate()
        .map(|(i, w)| Ok((w.clone(), averaged.get(i)?)))
        .collect::<Result<Vec<_>>>()?;
    let sheet = attention_sheet(&generated.image, &labelled)?;
    let steps_text = maps
        .steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let extra = vec![
        ("words".to_string(), words.join(",")),
        ("at_steps".to_string(), steps_text.clone()),
        ("map_size".to_string(), args.map_size.to_string()),
        (
            "layout".to_string(),
            "image, then one heat map per word in the order of `words`".to_string(),
        ),
    ];
    let meta = generation_metadata(
        &req,
        &model_name,
        model.sampler_name(),
        generated.width,
        generated.height,
        &extra,
    );
    if let Some((path, cmaps, steps_t)) = classifier_input {
        let tensors = vec![("maps".to_string(), cmaps), ("steps".to_string(), steps_t)];
        let mut meta = meta.clone();
        meta.push((
            "map_layout".to_string(),
            format!("{:?}", args.map_layout).to_lowercase(),
        ));
        write_tensors(path, &tensors, &meta)
            .with_context(|| format!("--classifier-maps {}", path.display()))?;
        tracing::info!("wrote {}", path.display());
    }
    if let Some(path) = &args.maps {
        maps.save(path, &meta)
            .with_context(|| format!("--maps {}", path.display()))?;
        tracing::info!("wrote {}", path.display());
    }
    write_png(&out, &sheet, &meta).with_context(|| format!("writing {}", out.display()))?;
    for w in &maps.words {
        tracing::info!("word `{}` at token positions {:?}", w.word, w.positions);
    }
    println!("{}", out.display());
    Ok(())
}
