//! Broken model folders give errors that name the file, tensor or field and what was expected.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_models::{LoadOptions, StableDiffusion};

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// A private copy of the tiny SD1 model to break.
fn scratch_model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&common::fixtures().join("sd1-tiny/model"), &dir);
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn unet_file(dir: &Path) -> PathBuf {
    dir.join("unet/diffusion_pytorch_model.safetensors")
}

fn rewrite_unet(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = unet_file(dir);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_component_is_named() {
    let (_tmp, dir) = scratch_model();
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("missing component `vae`"), "{msg}");
}

#[test]
fn missing_model_index_is_named() {
    let (_tmp, dir) = scratch_model();
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model_index.json"), "{msg}");
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let (_tmp, dir) = scratch_model();
    rewrite_unet(&dir, |t| {
        t.remove("conv_in.weight");
    });
    let msg = load_err(&dir);
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(msg.contains("no tensor `conv_in.weight`"), "{msg}");
    eprintln!("{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let (_tmp, dir) = scratch_model();
    rewrite_unet(&dir, |t| {
        t.insert(
            "conv_out.bias".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let msg = load_err(&dir);
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(
        msg.contains("`conv_out.bias` has shape [7], expected [4]"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype_names_tensor() {
    let (_tmp, dir) = scratch_model();
    rewrite_unet(&dir, |t| {
        t.insert(
            "conv_out.bias".into(),
            Tensor::zeros(4, DType::I64, &Device::Cpu).unwrap(),
        );
    });
    let msg = load_err(&dir);
    assert!(
        msg.contains("`conv_out.bias` has dtype I64, expected a floating-point dtype"),
        "{msg}"
    );
}

#[test]
fn unsupported_block_type_names_config_field() {
    let (_tmp, dir) = scratch_model();
    let cfg_path = dir.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"DownBlock2D\"", "\"AttnDownBlock2D\"");
    std::fs::write(&cfg_path, text).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("unet/config.json"), "{msg}");
    assert!(
        msg.contains("unsupported down_block_types `AttnDownBlock2D`"),
        "{msg}"
    );
}

#[test]
fn corrupt_header_names_file() {
    let (_tmp, dir) = scratch_model();
    let path = unet_file(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]); // garble the JSON header
    std::fs::write(&path, bytes).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("corrupt or unreadable safetensors file"),
        "{msg}"
    );
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");

    std::fs::write(&path, b"tiny").unwrap(); // truncated below the 8-byte length prefix
    let msg = load_err(&dir);
    assert!(
        msg.contains("corrupt or unreadable safetensors file"),
        "{msg}"
    );
}

#[test]
fn invalid_config_json_names_file() {
    let (_tmp, dir) = scratch_model();
    std::fs::write(dir.join("vae/config.json"), "{ not json").unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("vae/config.json: not valid JSON for an autoencoder config"),
        "{msg}"
    );
}

#[test]
fn fp16_variant_is_found_and_loaded_as_f32() {
    let (_tmp, dir) = scratch_model();
    // Replace the UNet weights with an fp16 variant file only, as some hub repos ship them.
    let tensors = candle_core::safetensors::load(unet_file(&dir), &Device::Cpu).unwrap();
    let half: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    std::fs::remove_file(unet_file(&dir)).unwrap();
    candle_core::safetensors::save(
        &half,
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(sd.dtype, DType::F32);
    let exp = common::expected("sd1-tiny");
    let out = sd
        .unet
        .forward(
            &exp["unet.sample"],
            501.0,
            &exp["unet.encoder_hidden_states"],
        )
        .unwrap();
    assert!(common::rel_err(&out, &exp["unet.out"]) < 1e-2);
}

#[test]
fn hub_id_outside_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", tmp.path());
    let msg = l2s_models::resolve_model("stabilityai/stable-diffusion-2-1-base")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("not") && msg.contains("Hugging Face cache"),
        "{msg}"
    );
    // A populated cache snapshot resolves.
    let snap = tmp.path().join("models--org--tiny/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(tmp.path().join("models--org--tiny/refs")).unwrap();
    std::fs::write(tmp.path().join("models--org--tiny/refs/main"), "abc123").unwrap();
    assert_eq!(l2s_models::resolve_model("org/tiny").unwrap(), snap);
}

#[test]
fn space_to_depth_round_trips_exactly() {
    use l2s_models::space_to_depth::{SpaceToDepth, SpaceToDepthConfig};
    let s2d = SpaceToDepth::new(SpaceToDepthConfig {
        factor: 2,
        in_channels: 3,
        scaling_factor: 1.0,
    });
    let img = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4, 6))
        .unwrap();
    let z = s2d.encode_latents(&img).unwrap();
    assert_eq!(z.dims(), &[2, 12, 2, 3]);
    // Channel k = c·4 + dy·2 + dx holds pixel (2y+dy, 2x+dx) of colour c, as torch's pixel_unshuffle.
    use candle_core::IndexOp;
    let at =
        |t: &Tensor, i: (usize, usize, usize, usize)| t.i(i).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(at(&z, (1, 2 * 4 + 2, 1, 2)), at(&img, (1, 2, 3, 4)));
    let back = s2d.decode_latents(&z).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&back), flat(&img));
    assert!(s2d.encode_latents(&img.narrow(3, 0, 5).unwrap()).is_err());
}

/// Sets `field` of the JSON file `rel` in `dir` to `value`.
fn set_json(dir: &Path, rel: &str, field: &str, value: serde_json::Value) {
    let path = dir.join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v[field] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_pipeline_err(dir: &Path) -> String {
    match l2s_models::Pipeline::load(dir, &LoadOptions::default(), None) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configs_that_would_panic_or_mislead_are_refused_naming_the_field() {
    let cases: [(&str, &str, serde_json::Value, &str); 8] = [
        (
            "unet/config.json",
            "norm_num_groups",
            0.into(),
            "norm_num_groups `0`",
        ),
        (
            "unet/config.json",
            "norm_num_groups",
            7.into(),
            "norm_num_groups `7`",
        ),
        ("unet/config.json", "norm_eps", (-1).into(), "norm_eps `-1`"),
        (
            "vae/config.json",
            "norm_num_groups",
            0.into(),
            "norm_num_groups `0`",
        ),
        (
            "vae/config.json",
            "scaling_factor",
            0.into(),
            "scaling_factor `0`",
        ),
        (
            "vae/config.json",
            "scaling_factor",
            (-0.2).into(),
            "scaling_factor `-0.2`",
        ),
        (
            "text_encoder/config.json",
            "layer_norm_eps",
            0.into(),
            "layer_norm_eps `0`",
        ),
        (
            "text_encoder/config.json",
            "num_hidden_layers",
            0.into(),
            "num_hidden_layers `0`",
        ),
    ];
    for (file, field, value, expect) in cases {
        let (_tmp, dir) = scratch_model();
        set_json(&dir, file, field, value);
        let msg = load_err(&dir);
        assert!(
            msg.contains(file) && msg.contains(expect),
            "{file} {field}: {msg}"
        );
    }
}

#[test]
fn a_pipeline_or_scheduler_class_we_do_not_run_is_refused_by_name() {
    for class in [
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "KandinskyPipeline",
    ] {
        let (_tmp, dir) = scratch_model();
        set_json(&dir, "model_index.json", "_class_name", class.into());
        let msg = load_pipeline_err(&dir);
        assert!(
            msg.contains("model_index.json") && msg.contains(&format!("`{class}`")),
            "{msg}"
        );
        let msg = load_err(&dir);
        assert!(msg.contains(&format!("`{class}`")), "{msg}");
    }
    let (_tmp, dir) = scratch_model();
    set_json(
        &dir,
        "scheduler/scheduler_config.json",
        "_class_name",
        "MySampler".into(),
    );
    let msg = load_pipeline_err(&dir);
    assert!(
        msg.contains("scheduler_config.json") && msg.contains("`MySampler`"),
        "{msg}"
    );
}

#[test]
fn an_empty_merges_file_is_refused() {
    for text in ["", "#version: 0.2\n", "\n\n"] {
        let (_tmp, dir) = scratch_model();
        std::fs::write(dir.join("tokenizer/merges.txt"), text).unwrap();
        let msg = load_err(&dir);
        assert!(
            msg.contains("merges.txt") && msg.contains("no merges"),
            "{msg}"
        );
    }
}

#[test]
fn a_t5_config_with_no_layers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&common::fixtures().join("flux-schnell-tiny/model"), &dir);
    for (field, value, expect) in [
        ("num_layers", serde_json::Value::from(0), "num_layers `0`"),
        ("num_heads", 0.into(), "num_heads `0`"),
        ("layer_norm_epsilon", (-1).into(), "layer_norm_epsilon `-1`"),
    ] {
        let original = std::fs::read(dir.join("text_encoder_2/config.json")).unwrap();
        set_json(&dir, "text_encoder_2/config.json", field, value);
        let msg = load_pipeline_err(&dir);
        assert!(
            msg.contains("text_encoder_2/config.json") && msg.contains(expect),
            "{msg}"
        );
        std::fs::write(dir.join("text_encoder_2/config.json"), original).unwrap();
    }
}

#[test]
fn sizes_beyond_the_caps_are_refused_before_any_work() {
    let model = l2s_models::Pipeline::load(
        &common::fixtures().join("sd1-tiny/model"),
        &LoadOptions::default(),
        None,
    )
    .unwrap();
    for (w, h, expect) in [
        (Some(18446744073709551608), None, "largest side, 8192 px"),
        (Some(4294967296), Some(4294967296), "largest side"),
        (Some(100000), Some(100000), "largest side"),
        (Some(8192), Some(8192), "pixel budget of 16777216 px"),
        (None, Some(8200), "height"),
    ] {
        let e = model.resolve_size(w, h).unwrap_err().to_string();
        assert!(e.contains(expect), "{w:?}×{h:?}: {e}");
    }
    assert_eq!(
        model.resolve_size(Some(4096), Some(4096)).unwrap(),
        (4096, 4096)
    );
    assert_eq!(
        model.resolve_size(Some(8192), Some(64)).unwrap(),
        (8192, 64)
    );
}

#[test]
fn non_finite_initial_latents_are_refused() {
    let model = l2s_models::Pipeline::load(
        &common::fixtures().join("sd1-tiny/model"),
        &LoadOptions::default(),
        None,
    )
    .unwrap();
    let shape = model.latent_shape(32, 32);
    let good = Tensor::zeros(&shape, DType::F32, &Device::Cpu).unwrap();
    model
        .check_latents(&good, 32, 32, "initial latents")
        .unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let t = good.affine(1.0, bad as f64).unwrap();
        let e = model
            .check_latents(&t, 32, 32, "initial latents")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("initial latents") && e.contains("not finite"),
            "{e}"
        );
    }
}
