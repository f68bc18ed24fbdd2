//! `l2s eval`: generate every prompt's images into GenEval's folder layout, plain or steered.
//! Resumable (images already on disk are kept) and splittable across machines (`--shard`).

use anyhow::Result;
use l2s_steer::evaluate::run_eval;

use crate::common::{image_bar, say, warn_all, EvalArgs, Global};

#[derive(clap::Args)]
#[command(
    after_help = "Output (GenEval's layout): DIR/NNNNN/metadata.jsonl and DIR/NNNNN/samples/SSSS.png, plus \
DIR/prompts.jsonl (every prompt of the run) and DIR/run.json (the settings). Image SSSS of prompt NNNNN uses seed \
--seed + NNNNN × --images-per-prompt + SSSS, the same for every method, so runs compare image by image. Images \
already on disk are kept, so an interrupted run continues where it stopped; rerunning into a folder made with \
other settings is refused. --shard i/n (1-based) takes prompts i-1, i-1+n, i-1+2n, …: run the n shards \
anywhere into folders of the same name, then copy them together, or run them all into one folder on shared \
storage. --shard auto reads i and n from a Slurm job array or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX \
with L2S_SHARD_COUNT, or --shard auto/N). One process per shard and folder: a second one is refused (lock file \
DIR/.l2s.lock, or DIR/.l2s.shard-I-of-N.lock for a shard). Score with `l2s score DIR`."
)]
pub struct Args {
    #[command(flatten)]
    pub eval: EvalArgs,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let args = args.eval;
    let out = args.lock_out()?;
    let prepared = args.prepare()?;
    let (run, prompts, source) = (prepared.run(&args), &prepared.prompts, &prepared.source);
    let shard = run.shard;
    let bar = image_bar(global, &run.label());
    let outcome = run_eval(
        &run,
        prompts,
        source,
        &args.out,
        &mut |done, total, prompt| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(prompt.to_string());
        },
    )?;
    bar.finish_and_clear();
    warn_all(&outcome.warnings);
    if outcome.unsteered > 0 {
        eprintln!(
            "note: {} of {} prompts name no relation (GenEval's other tasks): sampled without steering",
            outcome.unsteered, outcome.prompts
        );
    }
    let (made, present, ipp) = (outcome.made, outcome.present, args.images_per_prompt);
    let mine_len = outcome.prompts;
    let shard_note = if !shard.is_all() {
        format!(
            " (shard {shard}: {} of {} prompts)",
            mine_len,
            prompts.len()
        )
    } else {
        String::new()
    };
    say(&format!(
        "{}: {made} images generated, {present} already present, {} prompts × {ipp}{shard_note}; score with: l2s score {}\n",
        args.out.display(),
        mine_len,
        args.out.display()
    ));
    out.finish();
    Ok(())
}
