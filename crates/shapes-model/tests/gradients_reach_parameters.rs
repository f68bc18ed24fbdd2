//! Every trainable parameter of the shapes model receives a gradient from the training loss
//! (a silently detached op would leave part of the model untrained).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use l2s_models::clip::{ClipTextConfig, ClipTextModel};
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::NoObserver;
use l2s_shapes_model::{architecture, folder};

#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let te_cfg: ClipTextConfig =
        serde_json::from_value(architecture::text_encoder_config(folder::vocab_size())).unwrap();
    let unet_cfg: UNetConfig = serde_json::from_value(architecture::unet_config()).unwrap();
    let te = ClipTextModel::new(&te_cfg, vb.pp("text_encoder")).unwrap();
    let unet = UNet2DConditionModel::new(&unet_cfg, vb.pp("unet")).unwrap();
    const N: usize = architecture::MAX_TOKENS;
    let ids = Tensor::new(&[[5u32; N], [7u32; N]], &dev).unwrap();
    let ctx = te.forward(&ids).unwrap().last_hidden_state;
    let x = Tensor::randn(0f32, 1f32, (2, 12, 16, 16), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1f32, (2, 12, 16, 16), &dev).unwrap();
    let out = unet
        .forward_timesteps(&x, &[10.0, 900.0], &ctx, &mut NoObserver)
        .unwrap();
    let loss = (out - noise).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    let mut zero = Vec::new();
    for (name, var) in data.iter() {
        match grads.get(var.as_tensor()) {
            None => missing.push(name.clone()),
            Some(g) => {
                let n = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                if n == 0.0 {
                    zero.push(name.clone());
                }
            }
        }
    }
    missing.sort();
    zero.sort();
    // Token embeddings of ids not in the batch legitimately get zero rows, but the tensor as a whole
    // does get a gradient.
    assert!(
        missing.is_empty(),
        "{} parameters without gradient: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        zero.is_empty(),
        "{} parameters with an all-zero gradient: {:?}",
        zero.len(),
        &zero[..zero.len().min(10)]
    );
}
