//! FLUX through the generation API on the tiny fixtures: defaults, seeded generation, T5 word
//! positions, relation maps, and RF-inversion (also against the paper-based PyTorch reference of
//! `tools/fixtures/make_rf_inversion_fixture.py`).

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use l2s_diffusion::{
    sample, Denoiser, FlowMatchConfig, FlowMatchEulerScheduler, Guidance, NoHook,
    RfInversionConfig, RfInversionFlow, RfReconstructionFlow,
};
use l2s_generate::{
    generate, generate_with_attention, invert, reconstruct, word_tokens, AttentionRequest,
    GenerateRequest, InvertRequest,
};
use l2s_models::flux::{pack_latents, unpack_latents, FluxConditioning, FluxPipeline};
use l2s_models::{LoadOptions, NoObserver, Pipeline};

const PROMPT: &str = "a dog to the right of a teddy bear";

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model")
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&dir(name), &LoadOptions::default(), None).unwrap()
}

fn load_flux(name: &str) -> FluxPipeline {
    FluxPipeline::load(&dir(name), &LoadOptions::default()).unwrap()
}

fn defaults(p: &Pipeline) -> (usize, f64) {
    let d = p.sampling_defaults();
    (d.steps, d.guidance)
}

/// The model's flow-matching sigmas for `steps` steps at this packed grid.
fn flux_sigmas(flux: &FluxPipeline, steps: usize, grid: (usize, usize)) -> Vec<f64> {
    let mut s =
        FlowMatchEulerScheduler::new(FlowMatchConfig::from_file(&flux.scheduler_config).unwrap());
    s.set_timesteps(steps, grid.0 * grid.1).unwrap();
    s.sigmas().to_vec()
}

/// FLUX's velocity on packed latents, as a denoiser (its time is σ).
struct Packed<'a> {
    flux: &'a FluxPipeline,
    grid: (usize, usize),
    cond: &'a FluxConditioning,
}

impl Denoiser for Packed<'_> {
    type Cond = ();
    fn predict(&mut self, x: &Tensor, sigma: f64, _: &()) -> l2s_diffusion::Result<Tensor> {
        Ok(self
            .flux
            .velocity(x, self.grid, self.cond, sigma, Some(3.5), &mut NoObserver)?)
    }
}

fn rms(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn model_defaults() {
    let dev = load("flux-dev-tiny");
    assert_eq!(defaults(&dev), (50, 3.5));
    assert_eq!(dev.map_steps(50), vec![5, 10, 15, 20, 25, 49]);
    // The tiny VAE's sample_size (64) is below the paper's 512.
    assert_eq!(dev.native_size(), 64);
    let schnell = load("flux-schnell-tiny");
    assert_eq!(defaults(&schnell), (4, 0.0));
    assert_eq!(schnell.map_steps(4), vec![1, 3]);
    assert_eq!(schnell.steer_steps(4), 1);
}

#[test]
fn generation_is_seeded_and_sized() {
    let flux = load("flux-schnell-tiny");
    let mut req = GenerateRequest::new(PROMPT);
    (req.steps, req.guidance) = defaults(&flux);
    let a = generate(&flux, &req, &mut NoHook, &mut |_| {}).unwrap();
    let b = generate(&flux, &req, &mut NoHook, &mut |_| {}).unwrap();
    assert_eq!(a.image.as_raw(), b.image.as_raw());
    assert_eq!((a.width, a.height), (64, 64));
    assert_eq!(a.latents.dims(), &[1, 16, 8, 8]);
    req.seed = 1;
    let c = generate(&flux, &req, &mut NoHook, &mut |_| {}).unwrap();
    assert_ne!(a.image.as_raw(), c.image.as_raw());
    req.width = Some(40);
    let err = generate(&flux, &req, &mut NoHook, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of 16"), "{err}");
}

#[test]
fn words_map_to_t5_positions() {
    let flux = load_flux("flux-dev-tiny");
    let model = load("flux-dev-tiny");
    let ids = flux.tokenizer_2.encode(PROMPT).unwrap().ids;
    let dog = word_tokens(&model, PROMPT, "dog").unwrap();
    let bear = word_tokens(&model, PROMPT, "teddy bear").unwrap();
    assert_eq!(
        ids[dog.positions[0]],
        flux.tokenizer_2.encode_words("dog").unwrap()[0]
    );
    assert!(bear.positions.len() >= 2, "{bear:?}");
    assert!(bear.positions[0] > dog.positions[0]);
    assert!(word_tokens(&model, PROMPT, "zebra").is_err());
}

#[test]
fn attention_maps_have_one_channel_per_block_and_head() {
    let flux = load("flux-dev-tiny");
    let mut req = GenerateRequest::new(PROMPT);
    req.steps = 6;
    let att = AttentionRequest {
        words: vec!["dog".into(), "teddy bear".into()],
        at_steps: vec![1, 5],
        map_size: 16,
    };
    let (_, maps) = generate_with_attention(&flux, &req, &att, &mut |_| {}).unwrap();
    let raw = load_flux("flux-dev-tiny");
    let cfg = raw.transformer.config();
    let c = (cfg.num_layers + cfg.num_single_layers) * cfg.num_attention_heads;
    assert_eq!(maps.per_head.dims(), &[2, 2, c, 16, 16]);
    let sums = maps
        .per_head
        .sum(4)
        .unwrap()
        .sum(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
    assert!(maps
        .layers
        .iter()
        .any(|l| l.site.layer == "single_transformer_blocks.1.attn"));
}

#[test]
fn plain_rf_inversion_is_euler_inversion_and_control_improves_reconstruction() {
    let model = load("flux-dev-tiny");
    let flux = load_flux("flux-dev-tiny");
    let mut gen = GenerateRequest::new(PROMPT);
    gen.steps = 8;
    let image = generate(&model, &gen, &mut NoHook, &mut |_| {})
        .unwrap()
        .image;
    let mut req = InvertRequest::new(PROMPT);
    req.steps = 8;
    req.guidance = 3.5;

    // γ = η = 0 against a direct backward Euler run of the same model.
    let plain = RfInversionConfig::plain();
    let plain_req = InvertRequest {
        rf: plain,
        ..req.clone()
    };
    let inv = invert(&model, &image, &plain_req, &mut |_| {}).unwrap();
    let grid = flux.grid_for(64, 64);
    let cond = flux.encode_prompt(PROMPT).unwrap();
    let sigmas = flux_sigmas(&flux, 8, grid);
    let mut x = pack_latents(&inv.z0).unwrap();
    for k in (1..sigmas.len()).rev() {
        let v = flux
            .velocity(&x, grid, &cond, sigmas[k], Some(3.5), &mut NoObserver)
            .unwrap();
        x = (x + (v * (sigmas[k - 1] as f32 - sigmas[k] as f32) as f64).unwrap()).unwrap();
    }
    let direct = unpack_latents(&x, grid).unwrap();
    assert!(
        rms(&inv.latents, &direct) < 1e-5,
        "{}",
        rms(&inv.latents, &direct)
    );

    // Reconstruction: both inversions land closer to the clean latent than sampling from fresh
    // noise; the controlled pair gives the best image.
    let err = |latents: &Tensor| rms(latents, &inv.z0);
    let plain_rec = reconstruct(&model, &inv, None, &mut |_| {}).unwrap();
    let rf_req = InvertRequest {
        rf: RfInversionConfig::default(),
        ..req.clone()
    };
    let inv_rf = invert(&model, &image, &rf_req, &mut |_| {}).unwrap();
    let rf_rec = reconstruct(&model, &inv_rf, None, &mut |_| {}).unwrap();
    let mut naive = inv.clone();
    naive.latents = model.seeded_latents(64, 64, 99).unwrap();
    let naive_rec = reconstruct(&model, &naive, None, &mut |_| {}).unwrap();
    let (e_naive, e_plain, e_rf) = (
        err(&naive_rec.latents),
        err(&plain_rec.latents),
        err(&rf_rec.latents),
    );
    eprintln!(
        "latent RMS error: naive noise {e_naive:.4}, Euler inversion {e_plain:.4}, RF-inversion {e_rf:.4}; PSNR {:.2} / {:.2} / {:.2} dB",
        naive_rec.psnr.unwrap(),
        plain_rec.psnr.unwrap(),
        rf_rec.psnr.unwrap()
    );
    assert!(
        e_plain < e_naive && e_rf < e_naive,
        "{e_naive} {e_plain} {e_rf}"
    );
    assert!(
        rf_rec.psnr.unwrap() > plain_rec.psnr.unwrap()
            && rf_rec.psnr.unwrap() > naive_rec.psnr.unwrap()
    );
}

/// max |a − b| / max |b|.
fn rel_max_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let (a, e) = (
        actual.to_dtype(DType::F64).unwrap(),
        expected.to_dtype(DType::F64).unwrap(),
    );
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    max(&(a - &e).unwrap()) / max(&e).max(1e-12)
}

#[test]
fn rf_inversion_matches_the_pytorch_reference() {
    let model = load("flux-dev-tiny");
    let flux = load_flux("flux-dev-tiny");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/flux-dev-tiny/rf_inversion.safetensors");
    let fx = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let cond = FluxConditioning {
        text: fx["prompt_embeds"].clone(),
        pooled: fx["pooled_prompt_embeds"].clone(),
        t5_ids: Vec::new(),
        truncated: vec![0],
    };
    let (y0, y1) = (&fx["y0"], &fx["y1"]);
    let grid = flux.grid_for(64, 64);
    let mut den = Packed {
        flux: &flux,
        grid,
        cond: &cond,
    };
    let unguided = Guidance::Unguided(());
    for name in ["default", "gamma_only"] {
        let c = fx[&format!("{name}.config")].to_vec1::<f64>().unwrap();
        let cfg = RfInversionConfig {
            gamma: c[0],
            eta: c[1],
            start: c[2],
            stop: c[3],
        };
        let steps = c[4] as usize;
        assert_eq!(c[5], 3.5);
        if name == "default" {
            assert_eq!(
                (cfg, steps, c[5]),
                (
                    RfInversionConfig::default(),
                    defaults(&model).0,
                    defaults(&model).1
                )
            );
        }
        let sigmas = flux_sigmas(&flux, steps, grid);
        let want: Vec<f32> = fx[&format!("{name}.sigmas")].to_vec1().unwrap();
        assert_eq!(sigmas.len(), want.len());
        assert!(
            sigmas
                .iter()
                .zip(&want)
                .all(|(a, b)| (*a as f32 - b).abs() <= 1e-6),
            "{sigmas:?} vs {want:?}"
        );

        let forward = RfInversionFlow::new(&sigmas, y1, &cfg).unwrap();
        let inverted = sample(&mut den, &forward, y0.clone(), &unguided, &mut NoHook).unwrap();
        let e_inv = rel_max_err(&inverted, &fx[&format!("{name}.inverted")]);
        // Reverse from the reference's inverted latent, so each half is checked on its own.
        let reverse = RfReconstructionFlow::new(&sigmas, y0, &cfg).unwrap();
        let rec = sample(
            &mut den,
            &reverse,
            fx[&format!("{name}.inverted")].clone(),
            &unguided,
            &mut NoHook,
        )
        .unwrap();
        let e_rec = rel_max_err(&rec, &fx[&format!("{name}.reconstructed")]);
        // And the whole round trip from our own inversion.
        let chain = sample(&mut den, &reverse, inverted.clone(), &unguided, &mut NoHook).unwrap();
        let e_chain = rel_max_err(&chain, &fx[&format!("{name}.reconstructed")]);
        eprintln!(
            "RF-inversion parity {name} ({cfg:?}, {steps} steps): rel. max err inverted {e_inv:.2e}, \
             reconstructed {e_rec:.2e}, round trip {e_chain:.2e}"
        );
        for (what, e) in [
            ("inverted", e_inv),
            ("reconstructed", e_rec),
            ("round trip", e_chain),
        ] {
            assert!(
                e <= 1e-4,
                "{name} {what}: relative max error {e:.3e} > 1e-4"
            );
        }
    }
}
