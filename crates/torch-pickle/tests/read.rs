//! Reads the archives of `tools/fixtures/make_pickle_fixtures.py` and compares them with what
//! PyTorch saved; checks that hostile or damaged files are refused, and that refusing runs
//! nothing.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_torch_pickle::{pickle, ErrorKind, Limits, TorchFile, Value};
use serde_json::Value as Json;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch-pickle")
}

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

/// A pickled value against its JSON form (tuples as lists, dict keys as strings).
fn same(v: &Value, j: &Json) -> bool {
    match (v, j) {
        (Value::None, Json::Null) => true,
        (Value::Bool(a), Json::Bool(b)) => a == b,
        (Value::Int(a), Json::Number(b)) => b.as_i64() == Some(*a),
        (Value::Float(a), Json::Number(b)) => b.as_f64() == Some(*a),
        (Value::Str(a), Json::String(b)) => a == b,
        (Value::List(a) | Value::Tuple(a), Json::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        (Value::Dict(a), Json::Object(b)) => {
            a.len() == b.len()
                && a.iter().all(|(k, x)| {
                    k.as_str()
                        .and_then(|k| b.get(k))
                        .is_some_and(|y| same(x, y))
                })
        }
        _ => false,
    }
}

/// Row-major values as the fixture writes them: integers as such, floats as the bits of their
/// f64 value.
fn values(t: &Tensor) -> Vec<i128> {
    let float = !matches!(t.dtype(), DType::I64 | DType::I32 | DType::I16 | DType::U8);
    let t = match t.dtype() {
        DType::I64 | DType::I32 | DType::I16 | DType::U8 => t.to_dtype(DType::I64).unwrap(),
        _ => t.to_dtype(DType::F64).unwrap(),
    };
    let flat = t.flatten_all().unwrap();
    match flat.dtype() {
        DType::I64 if !float => flat
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(i128::from)
            .collect(),
        _ => flat
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| i128::from(v.to_bits()))
            .collect(),
    }
}

#[test]
fn reads_nested_dicts_config_values_and_state_dict() {
    let exp = expected();
    let mut f = TorchFile::open(dir().join("nested.pth")).unwrap();
    let root = f.root().clone();
    assert!(same(root.get("config").unwrap(), &exp["config"]));
    // Int keys stay ints.
    let idx = root.get("idx_to_rel_name").unwrap().as_dict().unwrap();
    assert_eq!(idx[0], (Value::Int(0), Value::Str("above".into())));
    assert_eq!(
        root.get("tuple").unwrap(),
        &Value::Tuple(vec![
            Value::Int(1),
            Value::Str("a".into()),
            Value::Float(2.5)
        ])
    );
    let Value::Set(set) = root.get("set").unwrap() else {
        panic!("not a set")
    };
    let mut set: Vec<i64> = set.iter().map(|v| v.as_i64().unwrap()).collect();
    set.sort();
    assert_eq!(set, vec![1, 2, 3]);
    assert_eq!(
        root.get("bytes").unwrap(),
        &Value::Bytes(vec![0, 255, b'a', b'b'])
    );

    // The module's state dict: an OrderedDict whose `_metadata` attribute is not an item.
    let sd = root.get("model_state_dict").unwrap();
    assert!(sd.is_state_dict());
    let tensors = f.state_dict(sd, &Device::Cpu).unwrap();
    let want = exp["state_dict"].as_object().unwrap();
    assert_eq!(tensors.len(), want.len());
    assert_eq!(tensors[0].0, "0.weight");
    for (name, t) in &tensors {
        let w = &want[name];
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(t.dims(), &shape[..], "{name}");
        let vals: Vec<i128> = serde_json::from_value(w["values"].clone()).unwrap();
        assert_eq!(values(t), vals, "{name}");
        assert_eq!(t.dtype(), DType::F32);
    }
}

#[test]
fn reads_every_dtype_and_view_exactly() {
    let exp = expected();
    let mut f = TorchFile::open(dir().join("nested.pth")).unwrap();
    let root = f.root().clone();
    let want = exp["tensors"].as_object().unwrap();
    let mut seen = 0;
    for group in ["tensors", "views"] {
        for (k, v) in root.get(group).unwrap().as_dict().unwrap() {
            let name = k.as_str().unwrap();
            let t = f
                .tensor(name, v.as_tensor().unwrap(), &Device::Cpu)
                .unwrap();
            let w = &want[name];
            let dtype = match w["dtype"].as_str().unwrap() {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                "float64" => DType::F64,
                "int64" => DType::I64,
                "int32" => DType::I32,
                "int16" => DType::I16,
                "uint8" | "bool" => DType::U8,
                other => panic!("{other}"),
            };
            assert_eq!(t.dtype(), dtype, "{name}");
            let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
            assert_eq!(t.dims(), &shape[..], "{name}");
            let vals: Vec<i128> = serde_json::from_value(w["values"].clone()).unwrap();
            assert_eq!(values(&t), vals, "{name}");
            seen += 1;
        }
    }
    assert_eq!(seen, want.len());
    // Views keep their offsets and strides.
    let offset = root.get("views").unwrap().get("offset").unwrap();
    let t = offset.as_tensor().unwrap();
    assert_eq!((t.offset, t.stride.clone()), (6, vec![6, 1]));
    let tr = root.get("views").unwrap().get("transposed").unwrap();
    assert_eq!(tr.as_tensor().unwrap().stride, vec![1, 6]);
    let x = f.tensor_as("offset", t, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(x.dtype(), DType::F64);
}

fn marker(name: &str) -> PathBuf {
    PathBuf::from(expected()["markers"][name].as_str().unwrap())
}

#[test]
fn refuses_code_execution_and_runs_nothing() {
    for (file, module, name) in [
        ("malicious_system.pth", "posix", "system"),
        ("malicious_exec.pth", "builtins", "exec"),
    ] {
        let path = dir().join(file);
        let e = TorchFile::open(&path).unwrap_err();
        match &e.kind {
            ErrorKind::ForbiddenGlobal {
                module: m, name: n, ..
            } => assert_eq!((m.as_str(), n.as_str()), (module, name)),
            other => panic!("{file}: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(file), "{msg}");
        assert!(msg.contains(&format!("{module}.{name}")), "{msg}");
        assert!(!marker(file).exists(), "the payload of {file} ran");
    }
    let raw = std::fs::read(dir().join("malicious.pkl")).unwrap();
    let e = pickle::parse(&raw, &Limits::default()).unwrap_err();
    assert!(
        matches!(&e, ErrorKind::ForbiddenGlobal { module, name, .. } if module == "posix" && name == "system"),
        "{e}"
    );
    assert!(!marker("malicious.pkl").exists());
}

#[test]
fn refuses_pickled_modules() {
    let e = TorchFile::open(dir().join("module.pth")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("refusing to load the global torch.nn.modules.linear.Linear"),
        "{msg}"
    );
    assert!(
        matches!(e.kind, ErrorKind::ForbiddenGlobal { offset: 2, .. }),
        "{msg}"
    );
}

#[test]
fn checks_views_and_storages_against_their_records() {
    let path = dir().join("bad_tensors.pth");
    let mut f = TorchFile::open(&path).unwrap();
    let root = f.root().clone();
    let get = |n: &str| root.get(n).unwrap().as_tensor().unwrap().clone();
    let ok = f.tensor("ok", &get("ok"), &Device::Cpu).unwrap();
    assert_eq!(
        ok.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
    for (name, needle) in [
        ("past_end", "reaches element"),
        ("huge_storage", "more than the file holds"),
        ("short_record", "has 16 bytes"),
        ("missing_record", "bad_tensors/data/9"),
        ("broadcast", "larger than its storage"),
    ] {
        let e = f.tensor(name, &get(name), &Device::Cpu).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(needle), "{name}: {msg}");
        assert!(msg.contains("bad_tensors.pth"), "{name}: {msg}");
    }
}

#[test]
fn refuses_damaged_or_foreign_files() {
    for (file, kind) in [
        ("truncated.pth", "damaged or truncated"),
        ("not_zip.pth", "not a zip archive"),
        ("legacy.pth", "legacy"),
    ] {
        let e = TorchFile::open(dir().join(file)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(file) && msg.contains(kind), "{file}: {msg}");
    }
    let e = TorchFile::open(dir().join("does-not-exist.pth")).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Io(_)));
}

/// Hand-made pickles: protocol details and hostile structures.
#[test]
fn pickle_machine_edge_cases() {
    let lim = Limits::default();
    // Protocol 4 framing, SHORT_BINUNICODE, MEMOIZE, negative LONG1, EMPTY_SET/ADDITEMS.
    let p: &[u8] = &[
        0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, // PROTO 4, FRAME
        b'}', 0x94, // EMPTY_DICT MEMOIZE
        b'(', 0x8c, 1, b'k', 0x8a, 2, 0x00, 0xff, // 'k': LONG1 -256
        0x8c, 1, b's', 0x8f, b'(', b'K', 1, b'K', 2, 0x90, // 's': {1, 2}
        b'u', b'.',
    ];
    let v = pickle::parse(p, &lim).unwrap();
    assert_eq!(v.get("k"), Some(&Value::Int(-256)));
    assert_eq!(
        v.get("s"),
        Some(&Value::Set(vec![Value::Int(1), Value::Int(2)]))
    );
    // A container memoised before it is filled reads back filled.
    let p: &[u8] = &[0x80, 2, b']', b'q', 0, b'K', 7, b'a', b'0', b'h', 0, b'.'];
    assert_eq!(
        pickle::parse(p, &lim).unwrap(),
        Value::List(vec![Value::Int(7)])
    );
    // Exponential sharing (a list holding the previous one twice, 40 times) is bounded.
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for i in 0..40u8 {
        p.extend_from_slice(&[b']', b'(', b'h', i, b'h', i, b'e', b'q', i + 1]);
    }
    p.push(b'.');
    let e = pickle::parse(&p, &lim).unwrap_err();
    assert!(matches!(e, ErrorKind::Limit { .. }), "{e}");
    // A list that contains itself is a cycle, caught by the depth bound.
    let p: &[u8] = &[0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
    assert!(matches!(
        pickle::parse(p, &lim).unwrap_err(),
        ErrorKind::Limit { .. }
    ));
    // Declared lengths beyond the data allocate nothing and fail.
    let p: &[u8] = &[0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a'];
    let e = pickle::parse(p, &lim).unwrap_err();
    assert!(e.to_string().contains("ends early"), "{e}");
    // Truncated stream, unknown opcode, unhashable key, forbidden INST.
    assert!(pickle::parse(&[0x80, 2, b'K'], &lim).is_err());
    let e = pickle::parse(&[0x80, 2, 0xfe], &lim).unwrap_err();
    assert!(matches!(
        e,
        ErrorKind::UnsupportedOpcode { opcode: 0xfe, .. }
    ));
    let e = pickle::parse(b"}]Ns.", &lim).unwrap_err();
    assert!(e.to_string().contains("dict key"), "{e}");
    let e = pickle::parse(b"(ios\nsystem\n.", &lim).unwrap_err();
    assert!(
        matches!(&e, ErrorKind::ForbiddenGlobal { module, name, .. } if module == "os" && name == "system")
    );
    // A forbidden global is refused where it is named, even if never called.
    let e = pickle::parse(b"\x80\x02csubprocess\nPopen\n.", &lim).unwrap_err();
    assert!(e.to_string().contains("subprocess.Popen"), "{e}");
    // An allowed name used in an unexpected way is refused too.
    let e = pickle::parse(b"\x80\x02ctorch\nFloatStorage\n)R.", &lim).unwrap_err();
    assert!(e.to_string().contains("persistent ids"), "{e}");
}
