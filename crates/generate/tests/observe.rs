//! What observers see: only the text-conditioned rows, at the chosen steps; and how words map to
//! token positions.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use l2s_diffusion::{guided_prediction, Guidance};
use l2s_generate::generate::seeded_latents;
use l2s_generate::sample::scheduler;
use l2s_generate::{
    encode_prompt, generate, generate_with_attention, word_tokens, AttentionRequest, GenerateError,
    GenerateRequest, ObservedRows, SdDenoiser,
};
use l2s_models::{AttentionStore, LoadOptions, StableDiffusion};

const PROMPT: &str = "a dog to the right of a teddy bear";

fn load(name: &str) -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model");
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn observer_sees_only_the_conditional_rows_under_every_guidance() {
    let sd = load("sd1-tiny");
    let cond = encode_prompt(&sd, PROMPT).unwrap().embedding;
    let uncond = encode_prompt(&sd, "").unwrap().embedding;
    let z = seeded_latents(&sd, 32, 32, 3).unwrap();
    // Reference: the conditional prompt alone.
    let mut alone = AttentionStore::new();
    sd.unet
        .forward_observed(&z, 501.0, &cond, &mut alone)
        .unwrap();
    let guidances = [
        Guidance::batched_tensors(&uncond, &cond, 7.5).unwrap(),
        Guidance::TwoPass {
            uncond: uncond.clone(),
            cond: cond.clone(),
            scale: 7.5,
        },
        Guidance::Unguided(cond.clone()),
    ];
    for g in &guidances {
        let mut store = AttentionStore::new();
        let mut den = SdDenoiser::for_guidance(&sd.unet, &mut store, g);
        guided_prediction(&mut den, &z, 501.0, g).unwrap();
        let records = store.into_records();
        assert_eq!(
            records.len(),
            alone.records().len(),
            "one record per layer, once"
        );
        for ((site, p), (site_ref, p_ref)) in records.iter().zip(alone.records()) {
            assert_eq!(site, site_ref);
            assert_eq!(p.dim(0).unwrap(), 1);
            assert!(
                max_abs(p, p_ref) < 1e-5,
                "{}: {}",
                site.layer,
                max_abs(p, p_ref)
            );
        }
    }
    // ObservedRows::All with Batched shows both halves, unconditional first.
    let g = &guidances[0];
    let mut store = AttentionStore::new();
    let mut den = SdDenoiser::observed(&sd.unet, &mut store, ObservedRows::All);
    guided_prediction(&mut den, &z, 501.0, g).unwrap();
    let (_, p) = &store.records()[0];
    assert_eq!(p.dim(0).unwrap(), 2);
    assert!(max_abs(&p.narrow(0, 1, 1).unwrap(), &alone.records()[0].1) < 1e-5);
}

#[test]
fn attention_maps_come_from_the_chosen_steps_conditional_pass() {
    let sd = load("sd2-tiny");
    let mut req = GenerateRequest::new(PROMPT);
    req.steps = 4;
    req.seed = 11;
    let att = AttentionRequest {
        words: vec!["dog".into(), "teddy bear".into()],
        at_steps: vec![0, 2],
        map_size: 8,
    };
    let (generated, maps) = generate_with_attention(&sd, &req, &att, &mut |_| {}).unwrap();
    // Observation does not change the image.
    let plain = generate(&sd, &req, &mut |_| {}).unwrap();
    assert_eq!(generated.image, plain.image);

    assert_eq!(maps.steps, vec![0, 2]);
    assert_eq!(maps.words[0].positions, vec![2]);
    assert_eq!(maps.words[1].positions, vec![8, 9]);
    // sd2-tiny: 7 layers with 2+4+4+4+4+2+2 = 22 heads.
    assert_eq!(maps.per_head.dims(), &[2, 2, 22, 8, 8]);
    assert_eq!(maps.per_word.dims(), &[2, 2, 8, 8]);
    assert_eq!(maps.layers.len(), 2 * 7);
    let sums = maps
        .per_head
        .sum((3, 4))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4));

    // Step 0's raw maps equal a direct conditional forward pass at the first timestep.
    let cond = encode_prompt(&sd, PROMPT).unwrap().embedding;
    let t0 = scheduler(&sd, 4).unwrap().timesteps()[0];
    let mut direct = AttentionStore::new();
    sd.unet
        .forward_observed(&generated.initial_latents, t0 as f64, &cond, &mut direct)
        .unwrap();
    for (layer, (site, probs)) in maps
        .layers
        .iter()
        .filter(|l| l.step == 0)
        .zip(direct.records())
    {
        assert_eq!(&layer.site, site);
        let (h, w) = (site.height, site.width);
        let dog = probs
            .get(0)
            .unwrap()
            .narrow(2, 2, 1)
            .unwrap()
            .reshape((site.heads, h, w))
            .unwrap();
        let teddy = probs
            .get(0)
            .unwrap()
            .narrow(2, 8, 2)
            .unwrap()
            .mean(2)
            .unwrap()
            .reshape((site.heads, h, w))
            .unwrap();
        assert!(max_abs(&layer.maps.get(0).unwrap(), &dog) < 1e-5);
        assert!(max_abs(&layer.maps.get(1).unwrap(), &teddy) < 1e-5);
    }
}

#[test]
fn words_map_to_token_positions() {
    let sd = load("sd1-tiny");
    let pos = |w: &str| word_tokens(&sd.tokenizer, PROMPT, w).unwrap().positions;
    assert_eq!(pos("dog"), vec![2]);
    assert_eq!(pos("Dog"), vec![2]);
    assert_eq!(pos("teddy bear"), vec![8, 9]);
    assert_eq!(pos("right of"), vec![5, 6]);
    // "hippopotamus" is several tokens.
    let many = word_tokens(&sd.tokenizer, "a hippopotamus on a bed", "hippopotamus")
        .unwrap()
        .positions;
    assert!(many.len() > 1 && many[0] == 2, "{many:?}");
    match word_tokens(&sd.tokenizer, PROMPT, "cat") {
        Err(e @ GenerateError::WordNotInPrompt { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("`cat`") && msg.contains("a, dog, to, the, right, of, teddy, bear"),
                "{msg}"
            );
        }
        other => panic!("expected WordNotInPrompt, got {other:?}"),
    }
    // A word cut off by truncation is not in what the model reads.
    let long = format!("{} zebra", "a dog ".repeat(40));
    assert!(word_tokens(&sd.tokenizer, &long, "zebra").is_err());
}

#[test]
fn truncated_prompt_warns_and_bad_requests_fail_clearly() {
    let sd = load("sd1-tiny");
    let enc = encode_prompt(&sd, &"a dog ".repeat(50)).unwrap();
    assert_eq!(
        enc.embedding.dims(),
        &[1, 77, sd.text_encoder.config().hidden_size]
    );
    assert_eq!(enc.warnings.len(), 1);
    assert!(
        enc.warnings[0].contains("100 tokens") && enc.warnings[0].contains("25"),
        "{:?}",
        enc.warnings
    );
    assert!(encode_prompt(&sd, PROMPT).unwrap().warnings.is_empty());

    let mut req = GenerateRequest::new("a dog");
    req.steps = 2;
    req.height = Some(20);
    let err = generate(&sd, &req, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("height") && err.contains("20") && err.contains("multiple of 8"),
        "{err}"
    );
    req.height = None;
    req.init_latents = Some(Tensor::zeros((1, 4, 16), DType::F32, &Device::Cpu).unwrap());
    let err = generate(&sd, &req, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("[1, 4, 16]") && err.contains("[1, 4, 16, 16]"),
        "{err}"
    );
    req.init_latents = None;
    req.steps = 0;
    assert!(generate(&sd, &req, &mut |_| {})
        .unwrap_err()
        .to_string()
        .contains("steps"));
}
