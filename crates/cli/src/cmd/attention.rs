//! `l2s attention`: generate an image and draw its words' cross-attention maps.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use l2s_generate::{
    attention_sheet, generate_with_attention, generation_metadata, write_png, AttentionRequest,
    GenerateRequest,
};

use crate::common::{load_model, png_target, warn_all, Bars, Global, ModelArgs, SampleArgs};

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
    /// Side of the common grid every layer's map is resized to
    #[arg(long, default_value_t = 16)]
    pub map_size: usize,
    /// Where to write the sheet (.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the maps to this safetensors file
    #[arg(long, value_name = "FILE")]
    pub maps: Option<PathBuf>,
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
        model.map_steps(steps)
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
    let (generated, maps) = generate_with_attention(&model, &req, &att, &mut |p| bars.update(p))
        .context("generating with attention maps")?;
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
