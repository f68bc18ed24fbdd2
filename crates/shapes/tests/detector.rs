//! Measured accuracy of the shapes detector on clean and perturbed renders.

use image::{Rgb, RgbImage};
use l2s_eval::{judge, Detector, Relation, Tally, Triplet};
use l2s_shapes::render::draw_shape;
use l2s_shapes::{render_with, DetectorConfig, RenderConfig, Scene, ShapeClass, ShapeDetector};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[derive(Default, Debug)]
struct Score {
    objects: usize,
    found: usize,       // right class with IoU >= 0.8
    wrong_class: usize, // detections of a class absent from the image
    low_iou: usize,     // right class, IoU < 0.8
    duplicates: usize,
}

impl Score {
    fn recall(&self) -> f64 {
        self.found as f64 / self.objects as f64
    }
}

fn score(det: &ShapeDetector, scenes: &[Scene], images: &[RgbImage]) -> Score {
    let mut s = Score::default();
    for (scene, img) in scenes.iter().zip(images) {
        let a = det.analyze(img);
        s.duplicates += a.total_duplicates();
        s.objects += scene.objects.len();
        for d in &a.detections {
            match scene.objects.iter().find(|o| o.class.name() == d.class) {
                None => s.wrong_class += 1,
                Some(o) if o.bbox.iou(&d.bbox) >= 0.8 => s.found += 1,
                Some(_) => s.low_iou += 1,
            }
        }
    }
    s
}

#[test]
fn clean_renders_are_found_exactly() {
    for size in [32u32, 64] {
        let cfg = RenderConfig::with_size(size);
        let n = if size == 32 { 2000 } else { 1000 };
        let scenes = render_with(&cfg, n, 2024).unwrap();
        let images: Vec<RgbImage> = scenes.iter().map(|s| s.image.clone()).collect();
        let det = ShapeDetector::new(DetectorConfig::for_render(&cfg));
        let s = score(&det, &scenes, &images);
        eprintln!(
            "clean {size}x{size}, {n} images: {} objects, recall@IoU0.8 {:.4}, wrong class {}, low IoU {}, duplicates {}",
            s.objects,
            s.recall(),
            s.wrong_class,
            s.low_iou,
            s.duplicates
        );
        assert!(s.recall() >= 0.99, "{s:?}");
        assert_eq!(s.wrong_class, 0, "{s:?}");
        assert_eq!(s.duplicates, 0, "{s:?}");
    }
}

/// Judged with GenEval's rule, the detector's boxes give the relations that the
/// ground-truth boxes give.
#[test]
fn judged_relations_match_ground_truth() {
    let det = ShapeDetector::default();
    let mut tally = Tally::default();
    let mut pairs = 0;
    for s in l2s_shapes::render(600, 99)
        .iter()
        .filter(|s| s.objects.len() >= 2)
    {
        let dets = det.detect(&s.image).unwrap();
        let (a, b) = (&s.objects[0], &s.objects[1]);
        for r in l2s_eval::relations(&a.bbox, &b.bbox).iter() {
            pairs += 1;
            let j = judge(&Triplet::new(a.class.name(), r, b.class.name()), &dets);
            tally.add(&j);
        }
    }
    eprintln!(
        "GenEval judgement on true relations: {pairs} cases, accuracy {:.4}",
        tally.accuracy()
    );
    assert!(tally.accuracy() >= 0.99);
}

/// Blur with a small Gaussian kernel (σ = 0.6 px), clamping at the borders.
fn blur(img: &RgbImage) -> RgbImage {
    let k = [0.135f32, 0.73, 0.135]; // ≈ normalised exp(-x²/(2·0.6²)) at -1, 0, 1
    let (w, h) = img.dimensions();
    let get = |im: &RgbImage, x: i64, y: i64| {
        im.get_pixel(
            x.clamp(0, w as i64 - 1) as u32,
            y.clamp(0, h as i64 - 1) as u32,
        )
        .0
    };
    let pass = |src: &RgbImage, horizontal: bool| {
        let mut out = src.clone();
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut acc = [0f32; 3];
                for (i, kv) in k.iter().enumerate() {
                    let o = i as i64 - 1;
                    let p = if horizontal {
                        get(src, x + o, y)
                    } else {
                        get(src, x, y + o)
                    };
                    for c in 0..3 {
                        acc[c] += kv * p[c] as f32;
                    }
                }
                out.put_pixel(
                    x as u32,
                    y as u32,
                    Rgb(acc.map(|v| v.round().clamp(0.0, 255.0) as u8)),
                );
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

/// Redraws a scene the way an imperfect generator might: a tinted background,
/// each object's colour drifted by up to ±20 per channel, a slight blur, then
/// Gaussian noise of σ = 0.08 (of the 0–255 range).
fn perturb(scene: &Scene, cfg: &RenderConfig, rng: &mut ChaCha8Rng) -> RgbImage {
    let bg = cfg
        .background
        .map(|v| (v as i32 - rng.gen_range(0..=25)).clamp(0, 255) as u8);
    let mut img = RgbImage::from_pixel(cfg.size, cfg.size, Rgb(bg));
    for o in &scene.objects {
        let color = o
            .class
            .color()
            .map(|v| (v as i32 + rng.gen_range(-20..=20)).clamp(0, 255) as u8);
        let f = o.frame;
        draw_shape(
            &mut img,
            o.class,
            color,
            f.x0 as u32,
            f.y0 as u32,
            f.width() as u32,
            f.height() as u32,
            true,
        );
    }
    let mut img = blur(&img);
    let noise = Normal::new(0.0f32, 0.08 * 255.0).unwrap();
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] = (p.0[c] as f32 + noise.sample(rng))
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    img
}

#[test]
fn perturbed_renders_are_still_found() {
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    for size in [32u32, 64] {
        let cfg = RenderConfig::with_size(size);
        let scenes = render_with(&cfg, 1000, 31).unwrap();
        let images: Vec<RgbImage> = scenes.iter().map(|s| perturb(s, &cfg, &mut rng)).collect();
        let det = ShapeDetector::new(DetectorConfig::for_render(&cfg));
        let s = score(&det, &scenes, &images);
        eprintln!(
            "perturbed {size}x{size} (noise σ 0.08, blur σ 0.6 px, colour drift ±20, background tint ≤25), 1000 images: {} objects, recall@IoU0.8 {:.4}, wrong class {}, low IoU {}, duplicates {}",
            s.objects,
            s.recall(),
            s.wrong_class,
            s.low_iou,
            s.duplicates
        );
        assert!(s.recall() >= 0.98, "{s:?}");
        assert!(s.wrong_class as f64 <= 0.005 * s.objects as f64, "{s:?}");
    }
}

/// A bar in a class colour next to a genuine object is not counted, whatever its orientation,
/// and so cannot make a relation true.
#[test]
fn stretched_bars_are_rejected() {
    let det = ShapeDetector::default();
    let bg = Rgb([245, 245, 245]);
    let mut rejected = 0;
    let mut total = 0;
    for class in ShapeClass::ALL {
        for (w, h) in [(26u32, 4u32), (4, 26), (22, 6), (6, 22), (20, 9), (9, 20)] {
            let mut img = RgbImage::from_pixel(32, 32, bg);
            draw_shape(&mut img, class, class.color(), 1, 1, w, h, true);
            // A genuine other object far away from the bar.
            let other = if class == ShapeClass::Circle {
                ShapeClass::Square
            } else {
                ShapeClass::Circle
            };
            draw_shape(&mut img, other, other.color(), 20, 20, 10, 10, true);
            let dets = det.detect(&img).unwrap();
            total += 1;
            if dets.iter().all(|d| d.class != class.name()) {
                rejected += 1;
            } else {
                eprintln!("{class} {w}x{h} counted: {dets:?}");
            }
            assert!(dets.iter().any(|d| d.class == other.name()));
            let j = judge(
                &Triplet::new(class.name(), Relation::Above, other.name()),
                &dets,
            );
            assert!(!j.correct);
        }
    }
    eprintln!("stretched bars rejected: {rejected}/{total}");
    assert_eq!(rejected, total);
}
