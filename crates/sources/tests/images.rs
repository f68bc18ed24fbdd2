//! Loading images as people have them: committed JPEG/PNG samples (written by
//! tools/fixtures/make_source_image_fixtures.py; its docstring describes each).

use std::path::{Path, PathBuf};

use l2s_sources::jsonl::{read_jsonl, JsonlOptions};
use l2s_sources::{
    load_image, load_image_in, load_source_image, probe_source_image, BBox, BoxTransform,
    ControlFlow, Fit, Frame, NamedBox, ProblemKind, Problems, Relation, SourceImage, Split,
    Triplet, DEFAULT_MIN_VISIBLE,
};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn close(got: [u8; 3], want: [u8; 3], tol: i32) -> bool {
    got.iter()
        .zip(want)
        .all(|(&g, w)| (g as i32 - w as i32).abs() <= tol)
}

#[test]
fn exif_orientation_is_applied_when_displayed() {
    // Stored 40×20, red left, blue right, orientation 6 (90° clockwise): displayed 20×40 with
    // red on top. Resize keeps the whole image: 20×40 → 16×16.
    let img = load_image(data("images/exif6.jpg"), 16, Fit::Resize).unwrap();
    assert_eq!(img.stored_size, (40, 20));
    assert_eq!(img.transform.source_size, (20, 40));
    assert!(
        close(img.image.get_pixel(8, 2).0, [255, 0, 0], 40),
        "{:?}",
        img.image.get_pixel(8, 2)
    );
    assert!(
        close(img.image.get_pixel(8, 13).0, [0, 0, 255], 40),
        "{:?}",
        img.image.get_pixel(8, 13)
    );
    // Stored: no rotation, red on the left.
    let img = load_image_in(data("images/exif6.jpg"), 16, Fit::Resize, Frame::Stored).unwrap();
    assert_eq!(img.transform.source_size, (40, 20));
    assert!(close(img.image.get_pixel(2, 8).0, [255, 0, 0], 40));
    assert!(close(img.image.get_pixel(13, 8).0, [0, 0, 255], 40));
}

#[test]
fn grey_cmyk_and_rgba_become_rgb() {
    let grey = load_image(data("images/gray.jpg"), 8, Fit::CenterCrop).unwrap();
    assert_eq!(grey.image.dimensions(), (8, 8));
    assert!(close(grey.image.get_pixel(4, 4).0, [128, 128, 128], 2));
    // PIL reads the CMYK sample as (255, 0, 0).
    let cmyk = load_image(data("images/cmyk.jpg"), 8, Fit::CenterCrop).unwrap();
    assert!(
        close(cmyk.image.get_pixel(4, 4).0, [255, 0, 0], 12),
        "{:?}",
        cmyk.image.get_pixel(4, 4)
    );
    // Alpha dropped, not blended: the colour under a transparent pixel stays.
    let rgba = load_image(data("images/rgba.png"), 8, Fit::Resize).unwrap();
    assert_eq!(rgba.image.get_pixel(3, 3).0, [10, 20, 30]);
}

#[test]
fn centre_crop_matches_pil() {
    // Crop boxes PIL's Image.crop keeps for the published rule, measured by the fixture script.
    let text = std::fs::read_to_string(data("crop_edges.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let size: Vec<u32> = serde_json::from_value(c["size"].clone()).unwrap();
        let crop: [u32; 4] = serde_json::from_value(c["crop"].clone()).unwrap();
        let t = BoxTransform::for_fit(size[0], size[1], 512, Fit::CenterCrop);
        assert_eq!(t.crop, crop, "{size:?}");
    }
    // 7×4 columns (red = 30·x): the crop keeps columns 2..6; at size 4 nothing is resampled.
    let img = load_image(data("images/columns.png"), 4, Fit::CenterCrop).unwrap();
    assert_eq!(img.transform.crop, [2, 0, 6, 4]);
    let reds: Vec<u8> = (0..4).map(|x| img.image.get_pixel(x, 1).0[0]).collect();
    assert_eq!(reds, [60, 90, 120, 150]);
}

#[test]
fn unreadable_images_are_errors_to_list() {
    let mut problems = Problems::new();
    let e = load_image(data("images/broken.jpg"), 8, Fit::Resize).unwrap_err();
    assert!(!e.is_missing());
    assert!(e.to_string().contains("broken.jpg"), "{e}");
    problems.push_image_error("broken", &e);
    let e = load_image(data("images/absent.jpg"), 8, Fit::Resize).unwrap_err();
    assert!(e.is_missing());
    problems.push_image_error("absent", &e);
    assert_eq!(problems.count(ProblemKind::UnreadableImage), 1);
    assert_eq!(problems.count(ProblemKind::MissingImage), 1);
    assert_eq!(problems.listed()[0].file, data("images/broken.jpg"));
}

#[test]
fn a_jsonl_record_on_its_loaded_image() {
    let mut problems = Problems::new();
    let mut recs = Vec::new();
    read_jsonl(
        data("jsonl/pairs.jsonl"),
        &JsonlOptions::default(),
        &mut problems,
        |r| {
            recs.push(r);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    let rec = &recs[0];
    // Displayed 20×40; centre crop keeps (0, 10)-(20, 30), scale 16/20 = 0.8. Red (0,0)-(20,20)
    // → (0, −8)-(16, 8): half inside; blue (0,20)-(20,40) → (0, 8)-(16, 24): half inside.
    let img = load_source_image(rec, 16, Fit::CenterCrop).unwrap();
    assert_eq!(img.transform.crop, [0, 10, 20, 30]);
    assert!(close(img.image.get_pixel(8, 2).0, [255, 0, 0], 40));
    let m = rec.mapped(&img.transform, DEFAULT_MIN_VISIBLE);
    assert_eq!(m.objects[0].bbox, BBox::new(0.0, 0.0, 16.0, 8.0));
    assert_eq!(m.objects[1].bbox, BBox::new(0.0, 8.0, 16.0, 16.0));
    assert_eq!(m.triplets, rec.triplets);
    assert_eq!(
        m.object_list(),
        vec![
            ("red square".to_string(), BBox::new(0.0, 0.0, 16.0, 8.0)),
            ("blue square".to_string(), BBox::new(0.0, 8.0, 16.0, 16.0)),
        ]
    );
    // Asking for more of each object cuts both, and the triplet with them.
    let m = rec.mapped(&img.transform, 0.6);
    assert!(m.objects.is_empty() && m.triplets.is_empty());
    assert_eq!(m.cut.len(), 2);
    assert!((m.cut[0].visible - 0.5).abs() < 1e-6);
}

#[test]
fn derived_relations_are_checked_again_after_mapping() {
    // A 100×50 image, resized to 50×50 (x halved, y kept): a at (10..30, 10..20), b at
    // (40..60, 25..35). Before: centres (20, 15), (50, 30), offset (−30, −15); shrink x by
    // 0.1·40 = 4, y by 0.1·20 = 2 → (−26, −13) / 33.54 → dx −0.78, dy −0.39: left of only.
    // After: centres (10, 15), (25, 30), offset (−15, −15); shrink x by 0.1·20 = 2, y by 2 →
    // (−13, −13) / 21.21 → −0.61 on both: two relations, so the derived triplet is dropped.
    let rec = SourceImage {
        id: "x".into(),
        path: PathBuf::from("x.png"),
        size: Some((100, 50)),
        frame: Frame::Stored,
        objects: vec![
            NamedBox::new("a", BBox::new(10.0, 10.0, 30.0, 20.0)),
            NamedBox::new("b", BBox::new(40.0, 25.0, 60.0, 35.0)),
        ],
        triplets: vec![Triplet::new("a", Relation::LeftOf, "b")],
        derived_from_boxes: true,
        split: Split::Train,
    };
    let t = BoxTransform::for_fit(100, 50, 50, Fit::Resize);
    let m = rec.mapped(&t, DEFAULT_MIN_VISIBLE);
    assert!(m.triplets.is_empty());
    assert_eq!(m.changed, rec.triplets);
    // Asserted triplets are kept as the source asserts them.
    let asserted = SourceImage {
        derived_from_boxes: false,
        ..rec.clone()
    };
    assert_eq!(
        asserted.mapped(&t, DEFAULT_MIN_VISIBLE).triplets,
        rec.triplets
    );
}

#[test]
fn centre_crop_resize_is_close_to_pil() {
    // smooth.png (64×48) through the published rule at 32 by PIL (crop (8, 0, 56, 48), bicubic
    // resize) against our crop and Catmull-Rom resize: the same filter, so only rounding and
    // edge handling differ: within one level everywhere.
    let ours = load_image(data("images/smooth.png"), 32, Fit::CenterCrop).unwrap();
    assert_eq!(ours.transform.crop, [8, 0, 56, 48]);
    let pil = image::open(data("images/smooth_pil_crop32.png"))
        .unwrap()
        .into_rgb8();
    let diffs: Vec<i32> = ours
        .image
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
    assert!(max <= 1 && mean < 0.1, "max {max}, mean {mean}");
}

/// The header alone gives the transform and stored size that decoding the whole image gives,
/// EXIF quarter turns and both frames included; a file whose pixels are broken but whose
/// header reads is found only when loaded.
#[test]
fn probing_a_header_agrees_with_loading_the_image() {
    for file in [
        "exif6.jpg",
        "gray.jpg",
        "cmyk.jpg",
        "rgba.png",
        "columns.png",
        "smooth.png",
    ] {
        for frame in [Frame::Displayed, Frame::Stored] {
            for fit in [Fit::CenterCrop, Fit::Resize] {
                let record = SourceImage {
                    id: file.into(),
                    path: data(&format!("images/{file}")),
                    size: None,
                    frame,
                    objects: Vec::new(),
                    triplets: Vec::new(),
                    derived_from_boxes: false,
                    split: Split::Train,
                };
                let probe = probe_source_image(&record, 16, fit).unwrap();
                let loaded = load_source_image(&record, 16, fit).unwrap();
                assert_eq!(
                    probe.transform, loaded.transform,
                    "{file} {frame:?} {fit:?}"
                );
                assert_eq!(probe.stored_size, loaded.stored_size, "{file}");
            }
        }
    }
    let missing = SourceImage {
        id: "absent".into(),
        path: data("images/absent.jpg"),
        size: None,
        frame: Frame::Displayed,
        objects: Vec::new(),
        triplets: Vec::new(),
        derived_from_boxes: false,
        split: Split::Train,
    };
    assert!(probe_source_image(&missing, 16, Fit::Resize)
        .unwrap_err()
        .is_missing());
}
