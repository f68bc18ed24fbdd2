//! Digit-for-digit agreement with diffusers/transformers on the tiny SD1.x- and SD2.x-style
//! fixtures (`tools/fixtures/make_sd_fixtures.py`).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check, expected, fixtures, meta};
use l2s_models::tokenizer::ClipTokenizer;
use l2s_models::{AttentionStore, LoadOptions, StableDiffusion};

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(
        &fixtures().join(name).join("model"),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn tokens(name: &str) {
    let sd = load(name);
    let exp = expected(name);
    let prompts: Vec<String> = serde_json::from_value(meta(name)["prompts"].clone()).unwrap();
    let ids = exp["tokens.ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert!(prompts.len() >= 20);
    for (prompt, want) in prompts.iter().zip(&ids) {
        let got: Vec<i64> = sd
            .tokenizer
            .encode(prompt)
            .unwrap()
            .ids
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(&got, want, "{name}: token ids of {prompt:?}");
    }
}

#[test]
fn sd1_tokens() {
    tokens("sd1-tiny");
}

#[test]
fn sd2_tokens_pad_with_exclamation_mark() {
    tokens("sd2-tiny");
    let sd = load("sd2-tiny");
    assert_eq!(
        sd.tokenizer.id_to_token(sd.tokenizer.pad_id()).as_deref(),
        Some("!")
    );
}

#[test]
fn tokenizer_json_matches_vocab_and_merges() {
    let from_json = ClipTokenizer::from_folder(&fixtures().join("clip-vocab")).unwrap();
    let from_files =
        ClipTokenizer::from_folder(&fixtures().join("sd1-tiny/model/tokenizer")).unwrap();
    let prompts: Vec<String> = serde_json::from_value(meta("sd1-tiny")["prompts"].clone()).unwrap();
    for p in &prompts {
        assert_eq!(
            from_json.encode(p).unwrap(),
            from_files.encode(p).unwrap(),
            "{p:?}"
        );
    }
    let long = "a dog ".repeat(60);
    let enc = from_files.encode(&long).unwrap();
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.text_tokens, 75);
    assert_eq!(enc.truncated, 120 - 75);
    assert_eq!(enc.ids[76], from_files.eos_id());
}

fn text_embeddings(name: &str) {
    let sd = load(name);
    let exp = expected(name);
    let ids = exp["text.input_ids"].to_dtype(DType::U32).unwrap();
    let out = sd.text_encoder.forward(&ids).unwrap();
    check(
        &format!("{name} text.last_hidden_state"),
        &out.last_hidden_state,
        &exp["text.last_hidden_state"],
    );
}

#[test]
fn sd1_text_embeddings() {
    text_embeddings("sd1-tiny");
}

#[test]
fn sd2_text_embeddings() {
    text_embeddings("sd2-tiny");
}

fn timestep(exp: &std::collections::HashMap<String, Tensor>) -> f64 {
    exp["unet.timestep"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn unet_and_attention(name: &str) {
    let sd = load(name);
    let exp = expected(name);
    let mut store = AttentionStore::new();
    let out = sd
        .unet
        .forward_observed(
            &exp["unet.sample"],
            timestep(&exp),
            &exp["unet.encoder_hidden_states"],
            &mut store,
        )
        .unwrap();
    check(&format!("{name} unet.out"), &out, &exp["unet.out"]);

    let layers = meta(name)["attention_layers"].as_array().unwrap().clone();
    let records = store.records();
    assert_eq!(
        records.len(),
        layers.len(),
        "one report per cross-attention layer"
    );
    let mut resolutions = std::collections::BTreeSet::new();
    for ((site, probs), layer) in records.iter().zip(&layers) {
        assert_eq!(site.layer, layer["name"].as_str().unwrap());
        assert_eq!(site.heads as u64, layer["heads"].as_u64().unwrap());
        assert_eq!(site.height as u64, layer["height"].as_u64().unwrap());
        assert_eq!(site.width as u64, layer["width"].as_u64().unwrap());
        resolutions.insert(site.height);
        check(
            &format!("{name} attn.{}", site.layer),
            probs,
            &exp[&format!("attn.{}", site.layer)],
        );
    }
    assert!(
        resolutions.len() >= 3,
        "cross-attention at every resolution: {resolutions:?}"
    );
}

#[test]
fn sd1_unet_and_attention() {
    unet_and_attention("sd1-tiny");
}

#[test]
fn sd2_unet_and_attention() {
    unet_and_attention("sd2-tiny");
}

fn vae(name: &str) {
    let sd = load(name);
    let exp = expected(name);
    let kl = sd.vae.kl().expect("the fixtures use an AutoencoderKL");
    let dist = kl.encode(&exp["vae.image"]).unwrap();
    check(
        &format!("{name} vae.latent_mean"),
        &dist.mean,
        &exp["vae.latent_mean"],
    );
    check(
        &format!("{name} vae.latent_logvar"),
        &dist.logvar,
        &exp["vae.latent_logvar"],
    );
    let decoded = kl.decode(&exp["vae.z"]).unwrap();
    check(
        &format!("{name} vae.decoded"),
        &decoded,
        &exp["vae.decoded"],
    );

    // Seeded sampling is reproducible and centred on the mean with the encoder's spread.
    let a = dist.sample(7).unwrap();
    let b = dist.sample(7).unwrap();
    let c = dist.sample(8).unwrap();
    assert_eq!(a.to_vec3::<f32>().ok(), None.or(a.to_vec3::<f32>().ok()));
    assert_eq!(common::rel_err(&a, &b), 0.0);
    assert!(common::rel_err(&a, &c) > 0.0);
    let scaled = sd
        .vae
        .encode_latents(&exp["vae.image"], l2s_models::vae::LatentDraw::Mean)
        .unwrap();
    check(
        &format!("{name} scaled latent"),
        &scaled,
        &(&exp["vae.latent_mean"] * 0.18215).unwrap(),
    );
}

#[test]
fn sd1_vae() {
    vae("sd1-tiny");
}

#[test]
fn sd2_vae() {
    vae("sd2-tiny");
}

fn gradient(name: &str) {
    let sd = load(name);
    let exp = expected(name);
    let m = meta(name);
    let (ia, ib) = (
        m["ia"].as_u64().unwrap() as usize,
        m["ib"].as_u64().unwrap() as usize,
    );
    let latent = Var::from_tensor(&exp["unet.sample"]).unwrap();
    let mut store = AttentionStore::new();
    let out = sd
        .unet
        .forward_observed(
            latent.as_tensor(),
            timestep(&exp),
            &exp["unet.encoder_hidden_states"],
            &mut store,
        )
        .unwrap();
    let loss = common::fixture_loss(store.records(), &out, ia, ib);
    check(
        &format!("{name} grad.loss"),
        &loss.reshape(1).unwrap(),
        &exp["grad.loss"],
    );
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(latent.as_tensor())
        .expect("gradient reaches the latent");
    check(&format!("{name} grad.latent"), grad, &exp["grad.latent"]);
}

#[test]
fn sd1_latent_gradient_matches_torch_autograd() {
    gradient("sd1-tiny");
}

#[test]
fn sd2_latent_gradient_matches_torch_autograd() {
    gradient("sd2-tiny");
}

#[test]
fn bf16_loads() {
    // candle's CPU matmul has no bf16 kernel, so only loading is checked here; CUDA runs it.
    let opts = LoadOptions {
        dtype: DType::BF16,
        device: Device::Cpu,
        ..Default::default()
    };
    let sd = StableDiffusion::load(&fixtures().join("sd1-tiny/model"), &opts).unwrap();
    assert_eq!(sd.dtype, DType::BF16);
}

#[test]
fn f16_loads_and_runs_close_to_f32() {
    let dtype = DType::F16;
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        ..Default::default()
    };
    let sd = StableDiffusion::load(&fixtures().join("sd2-tiny/model"), &opts).unwrap();
    let exp = expected("sd2-tiny");
    let sample = exp["unet.sample"].to_dtype(dtype).unwrap();
    let ctx = exp["unet.encoder_hidden_states"].to_dtype(dtype).unwrap();
    let out = sd
        .unet
        .forward(&sample, timestep(&exp), &ctx)
        .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
    assert_eq!(out.dtype(), dtype);
    let err = common::rel_err(&out, &exp["unet.out"]);
    eprintln!("{dtype:?} unet.out rel. max err {err:.2e}");
    assert!(err < 5e-2, "{dtype:?}: {err}");
}
