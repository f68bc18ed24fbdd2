use candle_core::{Device, Tensor};
use l2s_models::{LoadOptions, StableDiffusion};
fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let sd = StableDiffusion::load(&dir, &LoadOptions::default())?;
    let scene = l2s_shapes::render_scene(&l2s_shapes::RenderConfig::with_size(32), 5, 1)?;
    let img = l2s_generate::image_to_tensor(&scene.image, candle_core::DType::F32, &Device::Cpu)?;
    let x0 = sd.vae.encode_latents(&img, l2s_models::vae::LatentDraw::Mean)?;
    println!("x0 mean {:?} std {:?}", x0.mean_all()?.to_scalar::<f32>()?, x0.sqr()?.mean_all()?.to_scalar::<f32>()?);
    let cfg = l2s_diffusion::DdimConfig::from_file(&sd.scheduler_config)?.config;
    let ac = l2s_diffusion::schedule::alphas_cumprod(&cfg)?;
    let ids = Tensor::new(sd.tokenizer.encode("a circle and a square")?.ids, &Device::Cpu)?.unsqueeze(0)?;
    let ctx = sd.text_encoder.forward(&ids)?.last_hidden_state;
    for t in [50usize, 200, 500, 900, 999] {
        let noise = Tensor::randn(0f32, 1f32, x0.shape(), &Device::Cpu)?;
        let xt = ((&x0 * ac[t].sqrt())? + (&noise * (1.0 - ac[t]).sqrt())?)?;
        let pred = sd.unet.forward(&xt, t as f64, &ctx)?;
        let mse = (pred - &noise)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        println!("t {t} mse {mse:.4}");
    }
    Ok(())
}
