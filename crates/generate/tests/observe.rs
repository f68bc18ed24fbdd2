//! What observers see: only the text-conditioned rows, at the chosen steps; and how words map to
//! token positions.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use l2s_diffusion::{guided_prediction_observed, Guidance, NoHook};
use l2s_generate::{
    generate, generate_with_attention, word_tokens, AttentionRequest, GenerateError,
    GenerateRequest,
};
use l2s_models::{AttentionStore, LoadOptions, ModelError, Pipeline, StableDiffusion};

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

fn load_sd(name: &str) -> StableDiffusion {
    StableDiffusion::load(&dir(name), &LoadOptions::default()).unwrap()
}

fn text_embedding(sd: &StableDiffusion, prompt: &str) -> Tensor {
    let enc = sd.tokenizer.encode(prompt).unwrap();
    let ids = Tensor::new(enc.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    sd.text_encoder.forward(&ids).unwrap().last_hidden_state
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
    let sd = load_sd("sd1-tiny");
    let model = load("sd1-tiny");
    let cond = text_embedding(&sd, PROMPT);
    let z = model.seeded_latents(32, 32, 3).unwrap();
    // Reference: the conditional prompt alone, straight through the UNet.
    let mut alone = AttentionStore::new();
    sd.unet
        .forward_observed(&z, 501.0, &cond, &mut alone)
        .unwrap();
    let batched = model.encode(PROMPT, "", 7.5).unwrap().guidance;
    let uncond = model.encode("", "", 1.0).unwrap().guidance;
    let guidances = [
        Guidance::TwoPass {
            uncond: uncond.conditional().clone(),
            cond: batched.conditional().clone(),
            scale: 7.5,
        },
        model.encode(PROMPT, "", 1.0).unwrap().guidance,
        batched,
    ];
    assert!(matches!(guidances[2], Guidance::Batched { .. }));
    for g in &guidances {
        let mut store = AttentionStore::new();
        let mut den = model.denoiser();
        guided_prediction_observed(&mut den, &z, 501.0, g, Some(&mut store)).unwrap();
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
    let plain = generate(&sd, &req, &mut NoHook, &mut |_| {}).unwrap();
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
    let unet = load_sd("sd2-tiny");
    let cond = text_embedding(&unet, PROMPT);
    let t0 = sd.scheduler(4, 32, 32).unwrap().timestep(0);
    let mut direct = AttentionStore::new();
    unet.unet
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
    let pos = |w: &str| word_tokens(&sd, PROMPT, w).unwrap().positions;
    assert_eq!(pos("dog"), vec![2]);
    assert_eq!(pos("Dog"), vec![2]);
    assert_eq!(pos("teddy bear"), vec![8, 9]);
    assert_eq!(pos("right of"), vec![5, 6]);
    // "hippopotamus" is several tokens.
    let many = word_tokens(&sd, "a hippopotamus on a bed", "hippopotamus")
        .unwrap()
        .positions;
    assert!(many.len() > 1 && many[0] == 2, "{many:?}");
    match word_tokens(&sd, PROMPT, "cat") {
        Err(e @ GenerateError::Model(ModelError::WordNotInPrompt { .. })) => {
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
    assert!(word_tokens(&sd, &long, "zebra").is_err());
}

#[test]
fn truncated_prompt_warns_and_bad_requests_fail_clearly() {
    let sd = load("sd1-tiny");
    let enc = sd.encode(&"a dog ".repeat(50), "", 1.0).unwrap();
    assert_eq!(enc.warnings.len(), 1);
    assert!(
        enc.warnings[0].contains("100 tokens") && enc.warnings[0].contains("25"),
        "{:?}",
        enc.warnings
    );
    assert!(sd.encode(PROMPT, "", 1.0).unwrap().warnings.is_empty());

    let mut req = GenerateRequest::new("a dog");
    req.steps = 2;
    req.height = Some(20);
    let err = generate(&sd, &req, &mut NoHook, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("height") && err.contains("20") && err.contains("multiple of 8"),
        "{err}"
    );
    req.height = None;
    req.init_latents = Some(Tensor::zeros((1, 4, 16), DType::F32, &Device::Cpu).unwrap());
    let err = generate(&sd, &req, &mut NoHook, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 4, 16]") && err.contains("[1, 4, 16, 16]"),
        "{err}"
    );
    req.init_latents = None;
    req.steps = 0;
    assert!(generate(&sd, &req, &mut NoHook, &mut |_| {})
        .unwrap_err()
        .to_string()
        .contains("steps"));
}
