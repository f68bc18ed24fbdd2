//! Loading scheduler configs, and the errors for bad configs and bad calls. Nothing may panic.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use l2s_diffusion::{
    BetaSchedule, DdimConfig, DdimInverseScheduler, DdimScheduler, DiffusionError, PredictionType,
    TimestepSpacing,
};

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/schedulers/configs")
}

fn parse(json: &str) -> l2s_diffusion::Result<l2s_diffusion::LoadedConfig> {
    DdimConfig::from_json_str(json, "test.json")
}

#[test]
fn sd14_pndm_config_loads_as_ddim_with_a_note() {
    let loaded = DdimConfig::from_file(configs_dir().join("sd14_pndm.json")).unwrap();
    let c = &loaded.config;
    assert_eq!(loaded.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!((c.beta_start, c.beta_end), (0.00085, 0.012));
    assert!(!c.set_alpha_to_one && !c.clip_sample);
    assert_eq!(c.steps_offset, 1);
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    assert_eq!(c.timestep_spacing, TimestepSpacing::Leading);
    assert!(loaded.notes[0].contains("PNDMScheduler") && loaded.notes[0].contains("DDIM"));
    // prediction_type and timestep_spacing are absent from that file: their defaults are noted.
    assert!(
        loaded.notes[1].contains("prediction_type = epsilon"),
        "{:?}",
        loaded.notes
    );
    assert!(
        !loaded.notes[1].contains("clip_sample"),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn defaults_nulls_and_unknown_fields() {
    let c = parse(r#"{"trained_betas": null, "skip_prk_steps": true, "foo": [1, {"x": 2}]}"#)
        .unwrap()
        .config;
    assert_eq!(c, DdimConfig::default());
    let c = parse(r#"{"num_train_timesteps": 1000.0, "steps_offset": 1}"#)
        .unwrap()
        .config;
    assert_eq!((c.num_train_timesteps, c.steps_offset), (1000, 1));
}

#[test]
fn foreign_scheduler_without_defaults_is_noted() {
    let loaded = parse(
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012}"#,
    )
    .unwrap();
    let all = loaded.notes.join("\n");
    assert!(all.contains("EulerDiscreteScheduler"));
    assert!(all.contains("clip_sample = true"), "{all}");
    assert!(loaded.config.clip_sample);
}

#[test]
fn flow_matching_config_is_refused() {
    let err = parse(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0, "use_dynamic_shifting": true}"#,
    )
    .unwrap_err();
    assert!(
        matches!(err, DiffusionError::IncompatibleScheduler { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("test.json") && msg.contains("FlowMatchEulerDiscreteScheduler"),
        "{msg}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = DdimConfig::from_file("/nonexistent/scheduler/scheduler_config.json").unwrap_err();
    assert!(matches!(err, DiffusionError::ConfigIo { .. }));
    assert!(err
        .to_string()
        .contains("/nonexistent/scheduler/scheduler_config.json"));
}

#[test]
fn invalid_json_is_an_error() {
    let err = parse(r#"{"beta_start": 0.1,"#).unwrap_err();
    assert!(matches!(err, DiffusionError::ConfigJson { .. }));
    assert!(err.to_string().starts_with("test.json:"), "{err}");
    let err = parse("[1, 2]").unwrap_err();
    assert!(err.to_string().contains("expected a JSON object"), "{err}");
}

#[test]
fn unknown_enum_values_name_field_and_value() {
    for (field, value, listed) in [
        ("beta_schedule", "sigmoid", "\"squaredcos_cap_v2\""),
        ("prediction_type", "flow", "\"v_prediction\""),
        ("timestep_spacing", "karras", "\"linspace\""),
    ] {
        let err = parse(&format!(r#"{{"{field}": "{value}"}}"#)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DiffusionError::ConfigValue { .. }), "{err:?}");
        assert!(
            msg.contains(field) && msg.contains(value) && msg.contains(listed),
            "{msg}"
        );
    }
}

#[test]
fn wrong_types_and_values_name_the_field() {
    for (json, field) in [
        (r#"{"num_train_timesteps": "1000"}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": -3}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        (r#"{"clip_sample": "no"}"#, "clip_sample"),
        (r#"{"beta_start": -0.1}"#, "beta_start"),
        (r#"{"beta_schedule": 3}"#, "beta_schedule"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (
            r#"{"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}"#,
            "trained_betas",
        ),
        (r#"{"clip_sample_range": 0}"#, "clip_sample_range"),
        (r#"{"thresholding": true}"#, "thresholding"),
    ] {
        let err = parse(json).unwrap_err();
        assert!(
            matches!(err, DiffusionError::ConfigValue { .. }),
            "{json}: {err:?}"
        );
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{json}: {err}"
        );
    }
}

#[test]
fn schedulers_refuse_what_they_cannot_do() {
    let mut c = DdimConfig {
        thresholding: true,
        ..DdimConfig::default()
    };
    assert!(matches!(
        DdimScheduler::new(c.clone()),
        Err(DiffusionError::ConfigValue { .. })
    ));
    c.thresholding = false;
    c.timestep_spacing = TimestepSpacing::Linspace;
    let err = DdimInverseScheduler::new(c.clone()).unwrap_err();
    assert!(err.to_string().contains("linspace"), "{err}");

    let mut s = DdimScheduler::new(DdimConfig::default()).unwrap();
    let x = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        s.step(&x, 10, &x),
        Err(DiffusionError::TimestepsNotSet { .. })
    ));
    assert!(matches!(
        s.set_timesteps(0),
        Err(DiffusionError::InvalidStepCount { .. })
    ));
    let err = s.set_timesteps(1001).unwrap_err();
    assert!(
        err.to_string().contains("1001") && err.to_string().contains("1000"),
        "{err}"
    );
    s.set_timesteps(50).unwrap();
    assert!(matches!(
        s.step(&x, 1000, &x),
        Err(DiffusionError::TimestepOutOfRange { .. })
    ));
    let y = Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        s.step(&x, 10, &y),
        Err(DiffusionError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        s.add_noise(&x, &y, 10),
        Err(DiffusionError::ShapeMismatch { .. })
    ));

    let mut inv = DdimInverseScheduler::new(DdimConfig::default()).unwrap();
    assert!(matches!(
        inv.step(&x, 10, &x),
        Err(DiffusionError::TimestepsNotSet { .. })
    ));
    inv.set_timesteps(10).unwrap();
    assert!(matches!(
        inv.step(&x, 1000, &x),
        Err(DiffusionError::TimestepOutOfRange { .. })
    ));
}

#[test]
fn degenerate_steps_are_errors_not_nans() {
    let x = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    // Zero terminal SNR: epsilon prediction at ᾱ = 0 is undefined, v-prediction is fine.
    let zsnr = DdimConfig {
        beta_schedule: BetaSchedule::ScaledLinear,
        beta_start: 0.00085,
        beta_end: 0.012,
        rescale_betas_zero_snr: true,
        timestep_spacing: TimestepSpacing::Trailing,
        clip_sample: false,
        ..DdimConfig::default()
    };
    let mut s = DdimScheduler::new(zsnr.clone()).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.alphas_cumprod()[999], 0.0);
    let err = s.step(&x, 999, &x).unwrap_err();
    assert!(
        matches!(err, DiffusionError::DegenerateStep { timestep: 999, .. }),
        "{err:?}"
    );
    let mut v = DdimScheduler::new(DdimConfig {
        prediction_type: PredictionType::VPrediction,
        ..zsnr
    })
    .unwrap();
    v.set_timesteps(10).unwrap();
    v.step(&x, 999, &x).unwrap();
}

#[test]
fn error_messages_read_well() {
    for json in [
        r#"{"beta_schedule": "sigmoid"}"#,
        r#"{"num_train_timesteps": "1000"}"#,
        r#"{"thresholding": true}"#,
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#,
        r#"{"beta_start": 0.1,"#,
    ] {
        println!("{}", parse(json).unwrap_err());
    }
    println!(
        "{}",
        DdimConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err()
    );
    let mut s = DdimScheduler::new(DdimConfig::default()).unwrap();
    println!("{}", s.set_timesteps(0).unwrap_err());
}

#[test]
fn an_unknown_scheduler_class_is_refused_naming_it() {
    for class in [
        "MyOwnScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "DDIMSchedulr",
    ] {
        let json = format!(
            r#"{{"_class_name": "{class}", "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012}}"#
        );
        let e = DdimConfig::from_json_str(&json, "scheduler_config.json")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("`{class}`")) && e.contains("scheduler_config.json"),
            "{e}"
        );
    }
}
