//! Parity with diffusers 0.42.1 `FlowMatchEulerDiscreteScheduler` as FluxPipeline drives it
//! (fixture `fixtures/schedulers/flow-match.json`, from `tools/fixtures/make_flux_fixtures.py`):
//! μ, timesteps and sigmas for dev-style dynamic shifting at 256/512/1024 px, schnell-style static
//! schedules, and the Euler steps.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use l2s_diffusion::{
    sample, AfterStep, Denoiser, DiffusionError, FlowMatchConfig, FlowMatchEulerScheduler,
    Guidance, StepControl,
};
use serde_json::{json, Value};

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/schedulers/flow-match.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    diff / b.iter().map(|x| x.abs()).fold(1e-30, f64::max)
}

fn scheduler_of(case: &Value) -> FlowMatchEulerScheduler {
    let cfg = FlowMatchConfig::from_json_value(&case["config"], "fixture").unwrap();
    let mut s = FlowMatchEulerScheduler::new(cfg);
    s.set_timesteps(
        case["num_inference_steps"].as_u64().unwrap() as usize,
        case["image_seq_len"].as_u64().unwrap() as usize,
    )
    .unwrap();
    s
}

#[test]
fn schedules_match_diffusers() {
    let doc = fixture();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let s = scheduler_of(case);
        let mu = s
            .config()
            .mu(case["image_seq_len"].as_u64().unwrap() as usize);
        assert!(
            (mu - case["mu"].as_f64().unwrap()).abs() < 1e-12,
            "{name}: mu {mu}"
        );
        let et = rel_err(s.timesteps(), &floats(&case["timesteps"]));
        let es = rel_err(s.sigmas(), &floats(&case["sigmas"]));
        eprintln!("flow-match {name:<20} timesteps rel. err {et:.1e}, sigmas rel. err {es:.1e}");
        assert!(
            et <= 1e-6 && es <= 1e-6,
            "{name}: timesteps {et:.2e}, sigmas {es:.2e}"
        );
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    }
}

/// Returns the same velocity whatever the input, like the fixture's loop.
struct Constant(Tensor);

impl Denoiser for Constant {
    type Cond = ();
    fn predict(&mut self, _: &Tensor, _: f64, _: &()) -> l2s_diffusion::Result<Tensor> {
        Ok(self.0.clone())
    }
}

#[test]
fn euler_steps_match_diffusers() -> Result<()> {
    let doc = fixture();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let s = scheduler_of(case);
        let x = Tensor::from_vec(
            floats(&case["sample"])
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            (2, 3),
            &Device::Cpu,
        )?;
        let v = Tensor::from_vec(
            floats(&case["model_output"])
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            (2, 3),
            &Device::Cpu,
        )?;
        let stepped = case["stepped"].as_array().unwrap();
        let mut z = x.clone();
        let mut worst: f64 = 0.0;
        for (i, want) in stepped.iter().enumerate() {
            z = s.step(&v, i, &z)?;
            let got: Vec<f64> = z
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&f| f as f64)
                .collect();
            worst = worst.max(rel_err(&got, &floats(want)));
        }
        // The same through the sampling loop.
        let mut seen = Vec::new();
        let looped = sample(
            &mut Constant(v.clone()),
            &s,
            x,
            &Guidance::Unguided(()),
            &mut AfterStep(
                |step: &l2s_diffusion::StepContext, _: &Tensor, _: &Tensor| {
                    seen.push(step.model_time);
                    Ok(StepControl::Continue)
                },
            ),
        )?;
        // The loop hands the model σ (what FLUX takes).
        assert_eq!(seen, &s.sigmas()[..s.sigmas().len() - 1]);
        assert_eq!((looped - &z)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        eprintln!("flow-match {name:<20} Euler steps rel. err {worst:.1e}");
        assert!(worst <= 1e-6, "{name}: {worst:.2e}");
    }
    Ok(())
}

#[test]
fn published_flux_configs() {
    let dev = json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true});
    assert_eq!(
        FlowMatchConfig::from_json_value(&dev, "dev").unwrap(),
        FlowMatchConfig::flux1_dev()
    );
    let schnell = json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": false});
    assert_eq!(
        FlowMatchConfig::from_json_value(&schnell, "schnell").unwrap(),
        FlowMatchConfig::flux1_schnell()
    );
}

#[test]
fn bad_configs_and_calls_are_named() {
    let err = FlowMatchConfig::from_json_value(&json!({"use_karras_sigmas": true}), "cfg.json")
        .unwrap_err();
    assert!(
        matches!(err, DiffusionError::ConfigValue { .. })
            && err.to_string().contains("use_karras_sigmas"),
        "{err}"
    );
    let err =
        FlowMatchConfig::from_json_value(&json!({"_class_name": "DDIMScheduler"}), "cfg.json")
            .unwrap_err();
    assert!(
        err.to_string().contains("FlowMatchEulerDiscreteScheduler"),
        "{err}"
    );
    let s = FlowMatchEulerScheduler::new(FlowMatchConfig::flux1_dev());
    let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        s.step(&t, 0, &t),
        Err(DiffusionError::TimestepsNotSet { .. })
    ));
    let mut s = s;
    assert!(
        s.set_sigmas(&[1.0, 0.5], None).is_err(),
        "dynamic shifting needs mu"
    );
    assert!(s.set_timesteps(0, 1024).is_err());
}

/// The tiny FLUX pipelines' schedules (4 steps, 64 px → 16 packed tokens) as their sampling
/// fixtures recorded them: the sigmas `FluxPipeline::sample` of the models crate is given.
#[test]
fn tiny_flux_pipeline_schedules() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for name in ["flux-dev-tiny", "flux-schnell-tiny"] {
        let cfg = FlowMatchConfig::from_file(
            root.join(name)
                .join("model/scheduler/scheduler_config.json"),
        )?;
        let mut s = FlowMatchEulerScheduler::new(cfg);
        s.set_timesteps(4, 16)?;
        let exp = candle_core::safetensors::load(
            root.join(name).join("expected.safetensors"),
            &Device::Cpu,
        )?;
        let want: Vec<f64> = exp["sample.sigmas"]
            .to_vec1::<f32>()?
            .iter()
            .map(|&f| f as f64)
            .collect();
        let err = rel_err(s.sigmas(), &want);
        eprintln!("flow-match {name:<20} pipeline sigmas rel. err {err:.1e}");
        assert!(err <= 1e-6, "{name}: {err:.2e}");
    }
    Ok(())
}
