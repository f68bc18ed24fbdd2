//! How well a shapes model recovers rendered scenes from each noise level: noise a batch of
//! held-out scenes to timestep t, predict once, and report the PSNR of the implied clean image.
//! A model that samples well recovers fine detail at low t and layout at high t.
//!
//! `cargo run --release -p l2s-shapes-model --example denoise_probe [MODEL_DIR]`
//! (default: the built-in model).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use l2s_diffusion::config::PredictionType;
use l2s_diffusion::DdimConfig;
use l2s_models::pipeline::{LoadOptions, StableDiffusion};
use l2s_models::vae::LatentDraw;
use l2s_shapes::{caption, render_scene, RenderConfig};
use rand::SeedableRng;

fn main() -> Result<()> {
    let dir = match std::env::args().nth(1) {
        Some(d) => d.into(),
        None => l2s_shapes_model::embedded::model_dir()?,
    };
    let device = Device::Cpu;
    let sd = StableDiffusion::load(
        &dir,
        &LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            ..Default::default()
        },
    )?;
    let sched = DdimConfig::from_file(&sd.scheduler_config)?.config;
    let alphas_cumprod = l2s_diffusion::schedule::alphas_cumprod(&sched)?;
    let size = l2s_shapes_model::architecture::IMAGE_SIZE;
    let render = RenderConfig::with_size(size as u32);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let n = 32;
    let (mut pixels, mut ids) = (Vec::new(), Vec::new());
    for i in 0..n {
        // A seed the trainer never draws scenes from.
        let scene = render_scene(&render, u64::MAX / 3, i as u64)?;
        ids.extend(sd.tokenizer.encode(&caption(&scene, &mut rng))?.ids);
        for c in 0..3 {
            for y in 0..size as u32 {
                for x in 0..size as u32 {
                    pixels.push(scene.image.get_pixel(x, y)[c] as f32 / 127.5 - 1.0);
                }
            }
        }
    }
    let images = Tensor::from_vec(pixels, (n, 3, size, size), &device)?;
    let x0 = sd.vae.encode_latents(&images, LatentDraw::Mean)?;
    let tokens = sd.tokenizer.max_len();
    let ids = Tensor::from_vec(ids, (n, tokens), &device)?;
    let context = sd.text_encoder.forward(&ids)?.last_hidden_state;
    // The same captions shifted by one scene (wrong objects) and the empty caption: if the model
    // reads the text, the right captions must recover the scenes better at high noise.
    let shifted = Tensor::cat(&[context.narrow(0, 1, n - 1)?, context.narrow(0, 0, 1)?], 0)?;
    let empty_ids = Tensor::from_vec(sd.tokenizer.encode("")?.ids.repeat(n), (n, tokens), &device)?;
    let empty = sd.text_encoder.forward(&empty_ids)?.last_hidden_state;
    let noise = Tensor::randn(0f32, 1f32, x0.shape(), &device)?;
    println!(
        "{} ({:?}), {n} held-out scenes",
        dir.display(),
        sched.prediction_type
    );
    let psnr = |t: usize, context: &Tensor| -> Result<f32> {
        let (a, s) = (alphas_cumprod[t].sqrt(), (1.0 - alphas_cumprod[t]).sqrt());
        let noisy = ((&x0 * a)? + (&noise * s)?)?;
        let out = sd.unet.forward(&noisy, t as f64, context)?;
        let x0_hat = match sched.prediction_type {
            PredictionType::Epsilon => ((&noisy - (&out * s)?)? / a)?,
            PredictionType::VPrediction => ((&noisy * a)? - (&out * s)?)?,
            PredictionType::Sample => out,
        }
        .clamp(-1f32, 1f32)?;
        let mse = (&x0_hat - &x0)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        Ok(10.0 * (4.0 / mse).log10())
    };
    println!(
        "clean-image PSNR (dB) with the scene's caption / another scene's caption / no caption"
    );
    for t in [5usize, 20, 50, 100, 200, 300, 500, 700, 900, 999] {
        println!(
            "t = {t:4}  {:5.1} / {:5.1} / {:5.1}",
            psnr(t, &context)?,
            psnr(t, &shifted)?,
            psnr(t, &empty)?
        );
    }
    Ok(())
}
