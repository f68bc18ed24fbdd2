//! Relation maps from reported attention: the words' columns averaged, resized to S×S,
//! renormalised, layers concatenated along C — and differentiable.

use candle_core::{Device, Tensor, Var};
use l2s_models::{AttentionObserver, AttentionSite};
use l2s_steer::maps::{MapRecorder, WordPair};

fn site(name: &str, h: usize, heads: usize) -> AttentionSite {
    AttentionSite {
        layer: name.into(),
        height: h,
        width: h,
        heads,
        tokens: 5,
    }
}

#[test]
fn layers_concatenate_and_maps_sum_to_one() {
    let dev = Device::Cpu;
    // Subject = tokens 1 and 2 (a two-token word), object = token 3.
    let mut rec = MapRecorder::new(
        vec![WordPair {
            subject: vec![1, 2],
            object: vec![3],
        }],
        16,
        false,
    );
    let p8 = Tensor::rand(0f32, 1f32, (1, 2, 64, 5), &dev).unwrap();
    let p32 = Tensor::rand(0f32, 1f32, (1, 3, 1024, 5), &dev).unwrap();
    rec.observe(&site("a", 8, 2), &p8).unwrap();
    rec.observe(&site("b", 32, 3), &p32).unwrap();
    let maps = rec.maps().unwrap();
    assert_eq!(maps.dims(), &[1, 1, 2, 5, 16, 16]);
    assert_eq!(rec.num_maps(), 5);
    let sums = maps
        .sum(5)
        .unwrap()
        .sum(4)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
    // A 16×16 layer passes through unresized: its map is the (normalised) mean of the two columns.
    let mut rec = MapRecorder::new(
        vec![WordPair {
            subject: vec![1, 2],
            object: vec![3],
        }],
        16,
        false,
    );
    let p16 = Tensor::rand(0.1f32, 1f32, (1, 1, 256, 5), &dev).unwrap();
    rec.observe(&site("c", 16, 1), &p16).unwrap();
    let got = rec
        .maps()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let cols = p16
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mean: Vec<f32> = cols.iter().map(|r| (r[1] + r[2]) / 2.0).collect();
    let total: f32 = mean.iter().sum();
    for q in [0, 17, 255] {
        assert!((got[q] - mean[q] / total).abs() < 1e-5);
    }
}

#[test]
fn maps_are_differentiable() {
    let dev = Device::Cpu;
    let logits = Var::from_tensor(&Tensor::rand(0f32, 1f32, (1, 2, 64, 5), &dev).unwrap()).unwrap();
    let probs = candle_nn::ops::softmax(logits.as_tensor(), 3).unwrap();
    let mut rec = MapRecorder::new(
        vec![WordPair {
            subject: vec![1],
            object: vec![3],
        }],
        16,
        false,
    );
    rec.observe(&site("a", 8, 2), &probs).unwrap();
    let loss = rec.maps().unwrap().sqr().unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grad = g
        .get(logits.as_tensor())
        .expect("gradient reaches the attention logits");
    assert!(
        grad.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}
