use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use l2s_models::clip::{ClipTextConfig, ClipTextModel};
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::NoObserver;
use l2s_shapes_model::{architecture, folder, optim::AdamW};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let te_cfg: ClipTextConfig = serde_json::from_value(architecture::text_encoder_config(folder::vocab_size()))?;
    let unet_cfg: UNetConfig = serde_json::from_value(architecture::unet_config())?;
    let te = ClipTextModel::new(&te_cfg, vb.pp("text_encoder"))?;
    let unet = UNet2DConditionModel::new(&unet_cfg, vb.pp("unet"))?;
    let vars: Vec<(String, candle_core::Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut opt = AdamW::new(&vars, 1e-3, 0.0)?;
    let ids = Tensor::new(&[[5u32; 77], [7u32; 77], [9u32; 77], [11u32; 77]], &dev)?;
    let noise = Tensor::randn(0f32, 1f32, (4, 12, 16, 16), &dev)?;
    let x = (&noise * 0.99)?;
    for step in 0..200 {
        let ctx = te.forward(&ids)?.last_hidden_state;
        let out = unet.forward_timesteps(&x, &[990.0, 990.0, 990.0, 990.0], &ctx, &mut NoObserver)?;
        let loss = (out - &noise)?.sqr()?.mean_all()?;
        println!("{step} {:.4}", loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    Ok(())
}
