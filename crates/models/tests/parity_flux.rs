//! Agreement with diffusers/transformers on the tiny FLUX.1-dev- and schnell-style fixtures
//! (`tools/fixtures/make_flux_fixtures.py`): T5 and CLIP embeddings, the transformer's velocity,
//! the text-only attention maps, the latent gradient of an attention loss, BFL single-file
//! loading, full sampling, and the errors of bad input.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{expected, fixtures, meta, rel_err};
use l2s_diffusion::flow_match::euler_step;
use l2s_models::flux::bfl::load_single_file;
use l2s_models::flux::{pack_latents, unpack_latents};
use l2s_models::{
    AttentionSite, AttentionStore, FluxInputs, FluxPipeline, LoadOptions, ModelError, NoObserver,
};

const TOL: f64 = 1e-5;

fn check(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) -> f64 {
    let err = rel_err(actual, expected);
    eprintln!("parity {what:<60} rel. max err {err:.2e}");
    assert!(
        err <= tol,
        "{what}: relative max error {err:.3e} > {tol:.0e}"
    );
    err
}

fn load(name: &str, dtype: DType) -> FluxPipeline {
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let mut p = FluxPipeline::load(&fixtures().join(name).join("model"), &opts).unwrap();
    p.set_max_sequence_length(meta(name)["t5_len"].as_u64().unwrap() as usize);
    p
}

fn grid(name: &str) -> (usize, usize) {
    let g = meta(name)["grid"].as_array().unwrap().clone();
    (
        g[0].as_u64().unwrap() as usize,
        g[1].as_u64().unwrap() as usize,
    )
}

fn inputs<'a>(
    exp: &'a HashMap<String, Tensor>,
    latents: &'a Tensor,
    grid: (usize, usize),
) -> FluxInputs<'a> {
    FluxInputs {
        latents,
        grid,
        text: &exp["transformer.encoder_hidden_states"],
        pooled: &exp["transformer.pooled_projections"],
        timestep: &exp["transformer.timestep"],
        guidance: exp.get("transformer.guidance"),
    }
}

fn tokens_and_embeddings(name: &str) {
    let flux = load(name, DType::F32);
    let exp = expected(name);
    let m = meta(name);
    let prompts: Vec<String> = serde_json::from_value(m["t5_prompts"].clone()).unwrap();
    let ids = exp["t5.prompt_ids"].to_vec2::<i64>().unwrap();
    for (p, want) in prompts.iter().zip(&ids) {
        let got: Vec<i64> = flux
            .tokenizer_2
            .encode(p)
            .unwrap()
            .ids
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(&got, want, "{name}: T5 ids of {p:?}");
    }
    let clip_ids = exp["clip.input_ids"].to_vec2::<i64>().unwrap();
    for (p, want) in m["prompts"].as_array().unwrap().iter().zip(&clip_ids) {
        let got: Vec<i64> = flux
            .tokenizer
            .encode(p.as_str().unwrap())
            .unwrap()
            .ids
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(&got, want, "{name}: CLIP ids of {p}");
    }
    let t5 = flux
        .text_encoder_2
        .forward(
            &exp["t5.prompt_ids"]
                .i(..2)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap(),
        )
        .unwrap();
    check(
        &format!("{name} t5.last_hidden_state"),
        &t5,
        &exp["t5.last_hidden_state"],
        TOL,
    );
    let pooled = flux
        .text_encoder
        .forward(&exp["clip.input_ids"].to_dtype(DType::U32).unwrap())
        .unwrap()
        .pooled;
    check(
        &format!("{name} clip.pooled"),
        &pooled,
        &exp["clip.pooled"],
        TOL,
    );
    let prompts: Vec<&str> = m["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let cond = flux.encode_prompts(&prompts).unwrap();
    check(
        &format!("{name} encode_prompts text"),
        &cond.text,
        &exp["t5.last_hidden_state"],
        TOL,
    );
    check(
        &format!("{name} encode_prompts pooled"),
        &cond.pooled,
        &exp["clip.pooled"],
        TOL,
    );
}

#[test]
fn dev_tokens_and_text_embeddings() {
    tokens_and_embeddings("flux-dev-tiny");
}

#[test]
fn schnell_tokens_and_text_embeddings() {
    tokens_and_embeddings("flux-schnell-tiny");
}

fn transformer_and_maps(name: &str) {
    let flux = load(name, DType::F32);
    let exp = expected(name);
    let g = grid(name);
    let ids = l2s_models::flux::rope::image_ids(g.0, g.1, &Device::Cpu).unwrap();
    assert_eq!(
        ids.to_vec2::<f32>().unwrap(),
        exp["transformer.img_ids"].to_vec2::<f32>().unwrap()
    );

    let latents = &exp["transformer.hidden_states"];
    let plain = flux
        .transformer
        .forward(&inputs(&exp, latents, g), &mut NoObserver)
        .unwrap();
    check(
        &format!("{name} transformer.out"),
        &plain,
        &exp["transformer.out"],
        TOL,
    );

    let mut store = AttentionStore::new();
    let observed = flux
        .transformer
        .forward(&inputs(&exp, latents, g), &mut store)
        .unwrap();
    assert_eq!(
        rel_err(&observed, &plain),
        0.0,
        "observing must not change the output"
    );
    let layers = meta(name)["attention_layers"].as_array().unwrap().clone();
    assert_eq!(
        store.records().len(),
        layers.len(),
        "one report per double and single block"
    );
    for ((site, probs), layer) in store.records().iter().zip(&layers) {
        assert_eq!(site.layer, layer["name"].as_str().unwrap());
        assert_eq!(
            (site.height, site.width, site.heads, site.tokens),
            (g.0, g.1, 2, 32)
        );
        check(
            &format!("{name} attn.{}", site.layer),
            probs,
            &exp[&format!("attn.{}", site.layer)],
            TOL,
        );
    }
}

#[test]
fn dev_transformer_and_text_only_maps() {
    transformer_and_maps("flux-dev-tiny");
}

#[test]
fn schnell_transformer_and_text_only_maps() {
    transformer_and_maps("flux-schnell-tiny");
}

/// Σ_blocks Σ_{b,h,q} (P[..,ia]²·cx(q) + P[..,ib]²·cy(q)) + 0.1·mean(out²), as the fixture script.
fn attention_loss(
    records: &[(AttentionSite, Tensor)],
    out: &Tensor,
    ia: usize,
    ib: usize,
) -> Tensor {
    let mut total = (out.sqr().unwrap().mean_all().unwrap() * 0.1).unwrap();
    for (site, p) in records {
        let (h, w) = (site.height, site.width);
        let cx: Vec<f32> = (0..h * w)
            .map(|q| ((q % w) as f32 + 0.5) / w as f32)
            .collect();
        let cy: Vec<f32> = (0..h * w)
            .map(|q| ((q / w) as f32 + 0.5) / h as f32)
            .collect();
        let cx = Tensor::new(cx, out.device()).unwrap();
        let cy = Tensor::new(cy, out.device()).unwrap();
        let term = |k: usize, c: &Tensor| {
            p.i((.., .., .., k))
                .unwrap()
                .sqr()
                .unwrap()
                .broadcast_mul(c)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        total = (total + term(ia, &cx) + term(ib, &cy)).unwrap();
    }
    total
}

fn gradient(name: &str) {
    let flux = load(name, DType::F32);
    let exp = expected(name);
    let m = meta(name);
    let (ia, ib) = (
        m["ia"].as_u64().unwrap() as usize,
        m["ib"].as_u64().unwrap() as usize,
    );
    let x = Var::from_tensor(&exp["transformer.hidden_states"]).unwrap();
    let mut store = AttentionStore::new();
    let out = flux
        .transformer
        .forward(&inputs(&exp, x.as_tensor(), grid(name)), &mut store)
        .unwrap();
    let loss = attention_loss(store.records(), &out, ia, ib);
    check(
        &format!("{name} grad.loss"),
        &loss.reshape(1).unwrap(),
        &exp["grad.loss"],
        TOL,
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .expect("gradient reaches the latent");
    check(&format!("{name} grad.latent"), g, &exp["grad.latent"], TOL);
}

#[test]
fn dev_latent_gradient_matches_torch_autograd() {
    gradient("flux-dev-tiny");
}

#[test]
fn schnell_latent_gradient_matches_torch_autograd() {
    gradient("flux-schnell-tiny");
}

fn sampling(name: &str) {
    let flux = load(name, DType::F32);
    let exp = expected(name);
    let m = &meta(name)["sample"];
    let cond = flux.encode_prompt(m["prompt"].as_str().unwrap()).unwrap();
    check(
        &format!("{name} sample.prompt_embeds"),
        &cond.text,
        &exp["sample.prompt_embeds"],
        TOL,
    );
    check(
        &format!("{name} sample.pooled"),
        &cond.pooled,
        &exp["sample.pooled_prompt_embeds"],
        TOL,
    );
    let sigmas: Vec<f64> = exp["sample.sigmas"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let size = m["height"].as_u64().unwrap() as usize;
    let grid = flux.grid_for(size, size);
    let guidance = m["guidance_scale"].as_f64();
    let latents = exp["sample.latents"].clone();
    let steps = exp["sample.step_latents"].clone();
    // The sampling loop (the generate crate's), checked step by step.
    let mut x = latents;
    for (step, pair) in sigmas.windows(2).enumerate() {
        if step > 0 {
            check(
                &format!("{name} sample.step_latents[{}]", step - 1),
                &x,
                &steps.i(step - 1).unwrap(),
                TOL,
            );
        }
        let v = flux
            .velocity(&x, grid, &cond, pair[0], guidance, &mut NoObserver)
            .unwrap();
        x = euler_step(&x, &v, pair[0], pair[1]).unwrap();
    }
    let final_latents = x;
    check(
        &format!("{name} sample.final_latents"),
        &final_latents,
        &exp["sample.final_latents"],
        TOL,
    );
    let decoded = flux.decode_packed(&final_latents, grid).unwrap();
    check(
        &format!("{name} sample.decoded"),
        &decoded,
        &exp["sample.decoded"],
        TOL,
    );
    let image = ((decoded / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    check(
        &format!("{name} sample.image"),
        &image,
        &exp["sample.image"],
        TOL,
    );
}

#[test]
fn dev_full_sampling() {
    sampling("flux-dev-tiny");
}

#[test]
fn schnell_full_sampling() {
    sampling("flux-schnell-tiny");
}

#[test]
fn packing_round_trips() {
    let x = Tensor::arange(0f32, 2.0 * 16.0 * 8.0 * 12.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 16, 8, 12))
        .unwrap();
    let packed = pack_latents(&x).unwrap();
    assert_eq!(packed.dims(), &[2, 24, 64]);
    // Patch (row 1, col 2), channel 3, offset (dy 1, dx 0) = latent pixel (3, 4).
    let want = x.i((0, 3, 3, 4)).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(
        packed
            .i((0, 6 + 2, 3 * 4 + 2))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        want
    );
    assert_eq!(rel_err(&unpack_latents(&packed, (4, 6)).unwrap(), &x), 0.0);
}

#[test]
fn bfl_single_file_matches_diffusers_folder() {
    let name = "flux-dev-tiny";
    let flux = load(name, DType::F32);
    let exp = expected(name);
    let path = fixtures().join(name).join("transformer-bfl.safetensors");
    let bfl = load_single_file(&path, flux.transformer.config(), DType::F32, &Device::Cpu).unwrap();
    let latents = &exp["transformer.hidden_states"];
    let a = bfl
        .forward(&inputs(&exp, latents, grid(name)), &mut NoObserver)
        .unwrap();
    let b = flux
        .transformer
        .forward(&inputs(&exp, latents, grid(name)), &mut NoObserver)
        .unwrap();
    let err = rel_err(&a, &b);
    eprintln!("parity BFL single file vs diffusers folder: rel. max err {err:.2e}");
    assert_eq!(err, 0.0, "the same weights must give the same output");
    check(
        "flux-dev-tiny BFL transformer.out",
        &a,
        &exp["transformer.out"],
        TOL,
    );

    // The schnell config (no guidance embedder) does not fit a dev file.
    let mut schnell = flux.transformer.config().clone();
    schnell.guidance_embeds = false;
    let err = load_single_file(&path, &schnell, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("guidance_in"), "{err}");
}

#[test]
fn unknown_single_file_naming_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("encoder.foo.weight".to_string(), t.clone()),
        ("decoder.bar.weight".to_string(), t),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let cfg = l2s_models::FluxConfig::flux1_dev();
    let err = load_single_file(&path, &cfg, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{msg}");
    assert!(
        msg.contains("odd.safetensors")
            && msg.contains("tensor naming")
            && msg.contains("foo.weight"),
        "{msg}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path, skip: &str) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() == skip {
            continue;
        }
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()), skip);
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn missing_t5_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &fixtures().join("flux-schnell-tiny/model"),
        dir.path(),
        "text_encoder_2",
    );
    let err = FluxPipeline::load(dir.path(), &LoadOptions::default())
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, ModelError::MissingComponent { .. }), "{msg}");
    assert!(
        msg.contains("text_encoder_2") && msg.contains("T5"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &fixtures().join("flux-schnell-tiny/model"),
        dir.path(),
        "tokenizer.json",
    );
    let err = FluxPipeline::load(dir.path(), &LoadOptions::default())
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// Collects the messages of WARN events.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

struct MessageVisitor<'a>(&'a mut String);

impl tracing::field::Visit for MessageVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut msg = String::new();
        e.record(&mut MessageVisitor(&mut msg));
        self.0.lock().unwrap().push(msg);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn over_long_prompt_is_truncated_with_a_warning() {
    let flux = load("flux-schnell-tiny", DType::F32);
    let exp = expected("flux-schnell-tiny");
    let long = ["a dog"; 20].join(" ");
    let warnings = Warnings::default();
    let enc = tracing::subscriber::with_default(warnings.clone(), || {
        flux.tokenizer_2.encode(&long).unwrap()
    });
    assert_eq!(enc.ids.len(), 32);
    assert_eq!((enc.text_tokens, enc.truncated), (31, 40 - 31));
    assert_eq!(enc.ids[31], flux.tokenizer_2.eos_id());
    // transformers truncates the same way.
    let want = exp["t5.prompt_ids"].i(5).unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(enc.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want);
    let seen = warnings.0.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|w| w.contains("truncated") && w.contains("9 of 40")),
        "{seen:?}"
    );

    let short = tracing::subscriber::with_default(warnings.clone(), || {
        flux.tokenizer_2.encode("a dog").unwrap()
    });
    assert_eq!(short.truncated, 0);
    assert_eq!(
        warnings.0.lock().unwrap().len(),
        seen.len(),
        "no warning for a prompt that fits"
    );
}

#[test]
fn half_precision_runs_close_to_f32() {
    // σ·1000 and guidance·1000 are rounded to the model dtype before the sinusoids (as in
    // diffusers), so pick values that bf16 and f16 hold exactly and compare with our f32 run.
    let name = "flux-dev-tiny";
    let mut exp = expected(name);
    exp.insert(
        "transformer.timestep".into(),
        Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap(),
    );
    exp.insert(
        "transformer.guidance".into(),
        Tensor::new(&[4.0f32, 4.0], &Device::Cpu).unwrap(),
    );
    let f32_model = load(name, DType::F32);
    let mut f32_store = AttentionStore::new();
    let reference = f32_model
        .transformer
        .forward(
            &inputs(&exp, &exp["transformer.hidden_states"], grid(name)),
            &mut f32_store,
        )
        .unwrap();
    let (_, reference_map) = &f32_store.records()[3];
    for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        let flux = load(name, dtype);
        let cast: HashMap<String, Tensor> = exp
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if v.dtype() == DType::F32 {
                        v.to_dtype(dtype).unwrap()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect();
        let latents = &cast["transformer.hidden_states"];
        let mut store = AttentionStore::new();
        let out = flux
            .transformer
            .forward(&inputs(&cast, latents, grid(name)), &mut store)
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        check(
            &format!("{name} {dtype:?} transformer.out vs f32"),
            &out,
            &reference,
            tol,
        );
        let (site, probs) = &store.records()[3];
        check(
            &format!("{name} {dtype:?} attn.{} vs f32", site.layer),
            probs,
            reference_map,
            tol,
        );
        let t5 = flux
            .text_encoder_2
            .forward(
                &exp["t5.prompt_ids"]
                    .i(..2)
                    .unwrap()
                    .to_dtype(DType::U32)
                    .unwrap(),
            )
            .unwrap();
        check(
            &format!("{name} {dtype:?} t5"),
            &t5,
            &exp["t5.last_hidden_state"],
            tol,
        );
    }
}
