//! The CUDA kernels (`kernels.cu`) run on the host under `host/emulate.hpp` — real threads per
//! block, a barrier for `__syncthreads`, shared statics — launched exactly as [`super::launch`]
//! describes, and checked against the CPU ops (themselves checked against the composed ops and
//! finite differences). So the kernels' indexing, reductions and half-precision conversions are
//! tested on machines without a GPU; `tests/cuda_ops.rs` runs them on one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var, D};

use super::launch::{self, KernelCall, Scalar};
use super::norm::{group_norm, layer_norm, rms_norm, Rows};
use super::softmax::softmax_scaled_last_dim;

/// The host build of the driver, compiled once per test run (a C++20 compiler is needed).
fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops/host/driver.cpp");
        let dir = std::env::temp_dir().join(format!("l2s-kernels-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("driver");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&compiler)
            .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{compiler}`: {e}"));
        assert!(
            status.success(),
            "{compiler} could not build {}",
            src.display()
        );
        exe
    })
}

/// A kernel buffer: input bytes, or an output of this many bytes.
enum Buf {
    In(Vec<u8>),
    Out(usize),
}

/// Runs `call` with `block` threads per block; returns the output buffers in order.
fn run(call: &KernelCall, block: u32, buffers: &[Buf]) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut job = format!("{} {} {}", call.name, call.grid, block);
    for s in &call.scalars {
        job += &match s {
            Scalar::U64(v) => format!(" u64 {v}"),
            Scalar::F64(v) => format!(" f64 {v:e}"),
            Scalar::I32(v) => format!(" i32 {v}"),
        };
    }
    let mut outputs = Vec::new();
    for (i, b) in buffers.iter().enumerate() {
        let path = dir.path().join(format!("b{i}"));
        match b {
            Buf::In(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                job += &format!(" in {} {}", path.display(), bytes.len());
            }
            Buf::Out(n) => {
                job += &format!(" out {} {n}", path.display());
                outputs.push(path);
            }
        }
    }
    let job_path = dir.path().join("job");
    std::fs::write(&job_path, job).unwrap();
    let out = Command::new(driver()).arg(&job_path).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        call.name,
        String::from_utf8_lossy(&out.stderr)
    );
    outputs.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A storage type as the kernels see it: its bytes, and back to f64.
#[derive(Clone, Copy, Debug)]
enum Kind {
    F32,
    F64,
    BF16,
    F16,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::F32, Kind::F64, Kind::BF16, Kind::F16];

    fn dtype(self) -> DType {
        match self {
            Kind::F32 => DType::F32,
            Kind::F64 => DType::F64,
            Kind::BF16 => DType::BF16,
            Kind::F16 => DType::F16,
        }
    }

    fn suffix(self) -> &'static str {
        launch::suffix(self.dtype()).unwrap()
    }

    fn size(self) -> usize {
        self.dtype().size_in_bytes()
    }

    /// The tensor's elements in this type (rounded by candle's conversion), as bytes.
    fn bytes(self, t: &Tensor) -> Vec<u8> {
        let t = t.flatten_all().unwrap().to_dtype(self.dtype()).unwrap();
        match self {
            Kind::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            Kind::F64 => t
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            Kind::BF16 => t
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            Kind::F16 => t
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        }
    }

    fn values(self, bytes: &[u8]) -> Vec<f64> {
        let n = self.size();
        bytes
            .chunks_exact(n)
            .map(|c| match self {
                Kind::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                Kind::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                Kind::BF16 => half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64(),
                Kind::F16 => half::f16::from_le_bytes(c.try_into().unwrap()).to_f64(),
            })
            .collect()
    }

    /// The tensor (computed in f64) rounded to this type and back.
    fn rounded(self, t: &Tensor) -> Vec<f64> {
        self.values(&self.bytes(t))
    }

    /// Allowed error relative to the largest magnitude: a few roundings of this type.
    fn tolerance(self) -> f64 {
        match self {
            Kind::F32 => 2e-6,
            Kind::F64 => 1e-13,
            Kind::BF16 => 8e-3,
            Kind::F16 => 1e-3,
        }
    }
}

fn assert_close(what: &str, kind: Kind, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what} ({kind:?}): lengths");
    let top = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / top;
        assert!(
            err <= kind.tolerance(),
            "{what} ({kind:?}) element {i}: kernel {g}, CPU {w} (error {err:e} of the largest)"
        );
    }
}

fn random(shape: &[usize], seed: u64, scale: f64, offset: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| rng.gen_range(-1.0..1.0) * scale + offset)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A normalisation's inputs in f64 after rounding to `kind`, so that the CPU reference sees
/// exactly the values the kernel reads.
fn through(kind: Kind, t: &Tensor) -> Tensor {
    Tensor::from_vec(kind.rounded(t), t.shape(), &Device::Cpu).unwrap()
}

struct NormCase {
    name: &'static str,
    shape: Vec<usize>,
    rows: Rows,
}

fn norm_cases() -> Vec<NormCase> {
    let rows = |groups, channels, spatial, centre| Rows {
        groups,
        channels,
        spatial,
        eps: 1e-5,
        centre,
    };
    vec![
        // Two images, 6 channels in 3 groups, 5×7 pixels: rows longer than some blocks.
        NormCase {
            name: "group norm",
            shape: vec![2, 6, 5, 7],
            rows: rows(3, 2, 35, true),
        },
        NormCase {
            name: "layer norm",
            shape: vec![3, 4, 37],
            rows: rows(1, 37, 1, true),
        },
        NormCase {
            name: "rms norm",
            shape: vec![5, 19],
            rows: rows(1, 19, 1, false),
        },
    ]
}

/// The CPU op of a case in f64, forward.
fn norm_cpu(case: &NormCase, x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let r = &case.rows;
    match case.name {
        "group norm" => group_norm(x, r.groups, w, b, r.eps),
        "layer norm" => layer_norm(x, w, b, r.eps),
        _ => rms_norm(x, w, r.eps),
    }
    .unwrap()
}

#[test]
fn normalisation_kernels_match_the_cpu_ops_forward_and_backward() {
    for case in norm_cases() {
        let channels = case.rows.groups * case.rows.channels;
        let n: usize = case.shape.iter().product();
        let n_rows = n / case.rows.len();
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            let seed = 10 * k as u64;
            let x = through(kind, &random(&case.shape, seed, 2.0, 0.5));
            let w = through(kind, &random(&[channels], seed + 1, 1.0, 1.0));
            let b = if case.rows.centre {
                through(kind, &random(&[channels], seed + 2, 0.5, 0.0))
            } else {
                Tensor::zeros(channels, DType::F64, &Device::Cpu).unwrap()
            };
            let g = through(kind, &random(&case.shape, seed + 3, 1.0, 0.0));
            // The CPU reference in f64, with gradients from its own backward pass.
            let (xv, wv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let y = norm_cpu(&case, xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            let (dx, dw) = (grad(&xv), grad(&wv));

            for block in [launch::BLOCK, 16, 1] {
                let what = |part: &str| format!("{} {part}, {block} threads", case.name);
                let s = kind.size();
                let call = launch::normalise_forward(&case.rows, n_rows, kind.suffix()).unwrap();
                let ins = [&x, &w, &b].map(|t| Buf::In(kind.bytes(t)));
                let [x_in, w_in, b_in] = ins;
                let out = run(&call, block, &[x_in, w_in, b_in, Buf::Out(n * s)]);
                assert_close(
                    &what("forward"),
                    kind,
                    &kind.values(&out[0]),
                    &kind.rounded(&y),
                );

                let call =
                    launch::normalise_backward_input(&case.rows, n_rows, kind.suffix()).unwrap();
                let ins = [&x, &w, &g].map(|t| Buf::In(kind.bytes(t)));
                let [x_in, w_in, g_in] = ins;
                let out = run(
                    &call,
                    block,
                    &[x_in, w_in, g_in, Buf::Out(n * s), Buf::Out(16 * n_rows)],
                );
                assert_close(&what("∂x"), kind, &kind.values(&out[0]), &kind.rounded(&dx));
                let stats = out[1].clone();

                let call =
                    launch::normalise_backward_affine(&case.rows, n_rows, kind.suffix()).unwrap();
                let out = run(
                    &call,
                    block,
                    &[
                        Buf::In(kind.bytes(&x)),
                        Buf::In(kind.bytes(&g)),
                        Buf::In(stats),
                        Buf::Out(channels * s),
                        Buf::Out(channels * s),
                    ],
                );
                assert_close(&what("∂w"), kind, &kind.values(&out[0]), &kind.rounded(&dw));
                if case.rows.centre {
                    let db = grad(&bv);
                    assert_close(&what("∂b"), kind, &kind.values(&out[1]), &kind.rounded(&db));
                }
            }
        }
    }
}

#[test]
fn softmax_kernels_match_the_cpu_op_forward_and_backward() {
    // Rows shorter and longer than a block; a scale as attention uses.
    for (shape, scale) in [(vec![3, 5], 1.0), (vec![2, 3, 300], 0.125)] {
        let n: usize = shape.iter().product();
        let len = *shape.last().unwrap();
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            let x = through(kind, &random(&shape, 100 + k as u64, 4.0, 1.0));
            let g = through(kind, &random(&shape, 200 + k as u64, 1.0, 0.0));
            let xv = Var::from_tensor(&x).unwrap();
            let y = softmax_scaled_last_dim(xv.as_tensor(), scale).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap();
            for block in [launch::BLOCK, 8, 1] {
                let what = |part: &str| format!("softmax {shape:?} {part}, {block} threads");
                let s = kind.size();
                let call = launch::softmax_forward(len, n / len, scale, kind.suffix()).unwrap();
                let out = run(&call, block, &[Buf::In(kind.bytes(&x)), Buf::Out(n * s)]);
                assert_close(
                    &what("forward"),
                    kind,
                    &kind.values(&out[0]),
                    &kind.rounded(&y),
                );

                // The backward kernel reads the output as stored (rounded to `kind`).
                let y_stored = through(kind, &y);
                let call = launch::softmax_backward(len, n / len, scale, kind.suffix()).unwrap();
                let out = run(
                    &call,
                    block,
                    &[
                        Buf::In(kind.bytes(&y_stored)),
                        Buf::In(kind.bytes(&g)),
                        Buf::Out(n * s),
                    ],
                );
                let want = {
                    // scale·y·(g − Σ g·y) of the stored y, in f64.
                    let dot = (&y_stored * &g).unwrap().sum_keepdim(D::Minus1).unwrap();
                    let dot = dot.broadcast_as(y_stored.shape()).unwrap();
                    ((&y_stored * (&g - dot).unwrap()).unwrap() * scale).unwrap()
                };
                assert_close(
                    &what("∂x"),
                    kind,
                    &kind.values(&out[0]),
                    &kind.rounded(&want),
                );
                if matches!(kind, Kind::F64) {
                    // And the stored-output formula is the CPU op's own gradient.
                    assert_close(
                        &what("∂x vs autograd"),
                        kind,
                        &kind.values(&out[0]),
                        &kind.rounded(dx),
                    );
                }
            }
        }
    }
}

#[test]
fn half_precision_stores_round_to_nearest_even_like_candle() {
    // Rows (−1, 1) normalise to ∓1 exactly, and y = ∓(w·rstd) in f32, rstd = 1/√(1 + eps): the
    // weights and three eps values (×0.5: ties; ×0.95…: ordinary rounding; ×2: overflow) walk
    // the stored values through subnormals, normals, ties and infinity of each half type.
    let weights: Vec<f64> = vec![
        2f64.powi(-24),
        3.0 * 2f64.powi(-24),
        1e-6,
        6.1e-5,
        0.1,
        1.0,
        1.0009765625,
        2.71,
        1000.0,
        32752.0,
        32760.0,
        40000.0,
        65504.0,
        2f64.powi(-133),
        3.0 * 2f64.powi(-133),
        1e-38,
        1e30,
        3e38,
    ];
    let c = weights.len();
    let x = Tensor::from_vec(
        (0..2 * c)
            .map(|i| if i % 2 == 0 { -1.0 } else { 1.0 })
            .collect::<Vec<f64>>(),
        (c, 2),
        &Device::Cpu,
    )
    .unwrap();
    let zeros = Tensor::zeros(c, DType::F64, &Device::Cpu).unwrap();
    for kind in [Kind::BF16, Kind::F16] {
        let w = through(
            kind,
            &Tensor::from_vec(weights.clone(), c, &Device::Cpu).unwrap(),
        );
        let w_values = w.to_vec1::<f64>().unwrap();
        for eps in [3.0, 0.1, -0.75] {
            // One row per weight: GroupNorm with one channel of two elements per group.
            let rows = Rows {
                groups: c,
                channels: 1,
                spatial: 2,
                eps,
                centre: true,
            };
            let call = launch::normalise_forward(&rows, c, kind.suffix()).unwrap();
            let out = run(
                &call,
                2,
                &[
                    Buf::In(kind.bytes(&x)),
                    Buf::In(kind.bytes(&w)),
                    Buf::In(kind.bytes(&zeros)),
                    Buf::Out(2 * c * kind.size()),
                ],
            );
            let rstd = 1.0 / (1.0f64 + eps).sqrt();
            let want: Vec<u8> = w_values
                .iter()
                .flat_map(|&wc| {
                    // The zero bias is added too: −0 + 0 is +0.
                    let y = (wc * rstd) as f32;
                    [-y + 0.0, y + 0.0]
                })
                .flat_map(|y| match kind {
                    Kind::BF16 => half::bf16::from_f32(y).to_le_bytes(),
                    _ => half::f16::from_f32(y).to_le_bytes(),
                })
                .collect();
            assert_eq!(out[0], want, "{kind:?} bits, eps {eps}");
        }
    }
}

#[test]
fn launches_cover_every_row_and_channel() {
    let rows = Rows {
        groups: 4,
        channels: 8,
        spatial: 9,
        eps: 1e-6,
        centre: true,
    };
    let forward = launch::normalise_forward(&rows, 10, "f32").unwrap();
    assert_eq!(forward.grid, 10);
    assert_eq!(
        forward.scalars,
        vec![
            Scalar::U64(72),
            Scalar::U64(4),
            Scalar::U64(8),
            Scalar::U64(9),
            Scalar::F64(1e-6),
            Scalar::I32(1)
        ]
    );
    let affine = launch::normalise_backward_affine(&rows, 10, "bf16").unwrap();
    assert_eq!(
        (affine.name.as_str(), affine.grid),
        ("normalise_backward_affine_bf16", 32)
    );
    let err = launch::softmax_forward(4, usize::MAX / 4, 1.0, "f32").unwrap_err();
    assert!(err.to_string().contains("CUDA grid"), "{err}");
    assert_eq!(launch::suffix(DType::U8), None);
}
