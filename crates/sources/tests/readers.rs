//! The readers on the committed samples in tests/data; every expected record worked out by
//! hand from the files.

use std::path::{Path, PathBuf};

use l2s_sources::authors::{read_triplets, TripletOptions};
use l2s_sources::coco::{read_coco, CocoOptions};
use l2s_sources::gqa::{read_gqa, GqaOptions};
use l2s_sources::jsonl::{read_jsonl, JsonlOptions};
use l2s_sources::{
    BBox, ControlFlow, Frame, ProblemKind, Problems, Relation, SourceError, SourceImage, Split,
    SplitWeights, Triplet,
};

use ProblemKind::*;
use Relation::*;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn t(a: &str, r: Relation, b: &str) -> Triplet {
    Triplet::new(a, r, b)
}

fn names(rec: &SourceImage) -> Vec<&str> {
    rec.objects.iter().map(|o| o.name.as_str()).collect()
}

/// Every kind recorded, with its count, for comparing in one assertion.
fn counts(p: &Problems) -> Vec<(ProblemKind, usize)> {
    p.counts().iter().map(|(k, n)| (*k, *n)).collect()
}

fn collect<E>(
    read: impl FnOnce(
        &mut Problems,
        &mut dyn FnMut(SourceImage) -> ControlFlow<()>,
    ) -> Result<l2s_sources::ReadSummary, E>,
) -> (Vec<SourceImage>, Problems, l2s_sources::ReadSummary)
where
    E: std::fmt::Debug,
{
    let mut problems = Problems::new();
    let mut out = Vec::new();
    let summary = read(&mut problems, &mut |r| {
        out.push(r);
        ControlFlow::Continue(())
    })
    .unwrap();
    (out, problems, summary)
}

fn gqa(opts: &GqaOptions) -> (Vec<SourceImage>, Problems, l2s_sources::ReadSummary) {
    collect(|p, f| read_gqa(data("gqa/scenes.json"), opts, p, f))
}

#[test]
fn gqa_default_selection() {
    let opts = GqaOptions::new(data("gqa/images"));
    let (recs, problems, summary) = gqa(&opts);
    // Image 1: dog → cat "to the left of" is the first candidate; "near" is not kept; cat → dog
    // "to the right of" mirrors it; tree "above" dog is a second triplet, beyond the limit of 1.
    // Image 2: two "man" objects, both out; horse → man(20) is out with them; horse "below" sky.
    // Image 3: dog and animal form an is-a pair (both out; car → dog with them); car "to the
    // left of" bus. Image 4: cup "above" plate, but 4.jpg is missing. Image 5: "wearing" and
    // "on top of" are not kept, man → 999 names no object: no triplet. The second "1" repeats
    // an id.
    assert_eq!(recs.len(), 3);
    let r1 = &recs[0];
    assert_eq!(r1.id, "1");
    assert_eq!(r1.triplets, vec![t("dog", LeftOf, "cat")]);
    assert_eq!(names(r1), ["dog", "cat", "tree"]);
    assert_eq!(
        r1.object("dog").unwrap().bbox,
        BBox::new(10.0, 100.0, 90.0, 160.0)
    );
    assert_eq!(r1.size, Some((400, 300)));
    assert_eq!(r1.frame, Frame::Stored);
    assert_eq!(r1.path, data("gqa/images/1.jpg"));
    assert!(!r1.derived_from_boxes);
    assert_eq!(r1.split, Split::of("1", &SplitWeights::default()));
    assert_eq!(recs[1].id, "2");
    assert_eq!(recs[1].triplets, vec![t("horse", Below, "sky")]);
    assert_eq!(names(&recs[1]), ["horse", "sky"]);
    assert_eq!(recs[2].id, "3");
    assert_eq!(recs[2].triplets, vec![t("car", LeftOf, "bus")]);
    assert_eq!(names(&recs[2]), ["car", "bus"]);
    assert_eq!(summary.seen, 6);
    assert_eq!(summary.yielded, 3);
    assert!(!summary.stopped);
    assert_eq!(
        counts(&problems),
        vec![
            (MissingImage, 1),
            (DuplicateId, 1),
            (UnknownObject, 1),
            (RelationNotKept, 3),
            (RepeatedName, 3),
            (HypernymPair, 3),
            (RepeatedRelation, 1),
            (BeyondPerImageLimit, 1),
            (NoTriplet, 1),
        ]
    );
    let missing = problems
        .listed()
        .iter()
        .find(|p| p.kind == MissingImage)
        .unwrap();
    assert_eq!(
        (missing.id.as_str(), missing.file.as_path()),
        ("4", data("gqa/scenes.json").as_path())
    );
}

#[test]
fn gqa_more_per_image_and_repeated_names() {
    // All triplets: image 1 also gets tree "above" dog.
    let mut opts = GqaOptions::new(data("gqa/images"));
    opts.max_per_image = usize::MAX;
    let (recs, problems, _) = gqa(&opts);
    assert_eq!(
        recs[0].triplets,
        vec![t("dog", LeftOf, "cat"), t("tree", Above, "dog")]
    );
    assert_eq!(problems.count(BeyondPerImageLimit), 0);

    // Repeated names allowed (one triplet): in image 2, man(20) → man(21) has the same name;
    // man(20) "to the left of" horse is taken; horse → man(20) mirrors it; horse "below" sky
    // is beyond the limit. The record keeps man(20), the instance its triplet names.
    let mut opts = GqaOptions::new(data("gqa/images"));
    opts.unique_names = false;
    let (recs, problems, _) = gqa(&opts);
    let r2 = recs.iter().find(|r| r.id == "2").unwrap();
    assert_eq!(r2.triplets, vec![t("man", LeftOf, "horse")]);
    assert_eq!(names(r2), ["man", "horse", "sky"]);
    assert_eq!(r2.object("man").unwrap().bbox.x0, 20.0);
    assert_eq!(problems.count(SameName), 1);
    assert_eq!(problems.count(RepeatedName), 0);
}

#[test]
fn gqa_hypernyms_can_be_turned_off_and_reading_stopped() {
    // Without the is-a table, image 3's dog "to the left of" car comes first.
    let mut opts = GqaOptions::new(data("gqa/images"));
    opts.hypernyms = l2s_sources::Hypernyms::empty();
    let (recs, problems, _) = gqa(&opts);
    assert_eq!(recs[2].triplets, vec![t("dog", LeftOf, "car")]);
    assert_eq!(problems.count(HypernymPair), 0);

    let opts = GqaOptions::new(data("gqa/images"));
    let mut problems = Problems::new();
    let mut got = Vec::new();
    let summary = read_gqa(data("gqa/scenes.json"), &opts, &mut problems, |r| {
        got.push(r.id);
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(got, ["1"]);
    assert!(summary.stopped);
    assert_eq!(summary.seen, 1);
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("l2s-sources-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn files_that_are_not_what_they_claim_fail_naming_the_file() {
    let opts = GqaOptions::new(data("gqa/images"));
    let check = |e: SourceError, path: &Path, needle: &str| {
        let msg = e.to_string();
        assert_eq!(e.path(), path);
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(needle), "{msg}");
    };
    let list = temp_file("list.json", "[1, 2]");
    let e = read_gqa(&list, &opts, &mut Problems::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    check(e, &list, "not a GQA scene-graph file");
    let no_name = temp_file(
        "no_name.json",
        r#"{"7": {"width": 1, "height": 1, "objects": {"1": {"x": 0, "y": 0, "w": 1, "h": 1}}}}"#,
    );
    let e = read_gqa(&no_name, &opts, &mut Problems::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    check(e, &no_name, "missing field `name`");
    let missing = data("gqa/absent.json");
    let e = read_gqa(&missing, &opts, &mut Problems::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, SourceError::Io { .. }));

    let coco_opts = CocoOptions::new(data("coco/images"));
    let no_cats = temp_file("no_cats.json", r#"{"images": [], "annotations": []}"#);
    let e = read_coco(&no_cats, &coco_opts, &mut Problems::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    check(e, &no_cats, "no \"categories\" section");
    let bad_ann = temp_file(
        "bad_ann.json",
        r#"{"images": [], "annotations": [{"image_id": 1, "category_id": 1}], "categories": []}"#,
    );
    let e = read_coco(&bad_ann, &coco_opts, &mut Problems::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    check(e, &bad_ann, "missing field `bbox`");

    let jsonl = temp_file("list.jsonl", "[{\"image\": \"x\"}]\n");
    let e = read_jsonl(
        &jsonl,
        &JsonlOptions::default(),
        &mut Problems::new(),
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    check(e, &jsonl, "opens a JSON list");
}

#[test]
fn coco_unique_categories_and_unambiguous_pairs() {
    let opts = CocoOptions::new(data("coco/images"));
    let (recs, problems, summary) =
        collect(|p, f| read_coco(data("coco/instances_tiny.json"), &opts, p, f));
    // Image 1: person ×2 (several instances), chair has a crowd annotation, bottle 10×30 is
    // under 32 px; cat (17) and dog (18) remain, ordered by category id. Cat centre (375, 255),
    // dog (100, 250): offset (275, 5); shrink x by 0.1·(150 + 100) = 25 → 250, y by 25 → 0;
    // / 275.05 → dx = 0.909: cat right of dog.
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].id, "1");
    assert_eq!(names(&recs[0]), ["cat", "dog"]);
    assert_eq!(recs[0].triplets, vec![t("cat", RightOf, "dog")]);
    assert!(recs[0].derived_from_boxes);
    assert_eq!(recs[0].path, data("coco/images/000000000001.jpg"));
    assert_eq!(
        recs[0].object("dog").unwrap().bbox,
        BBox::new(50.0, 200.0, 150.0, 300.0)
    );
    // Image 2: car (3) centre (550, 30), cat (17) centre (350, 350), dog (18) centre (50, 50).
    // car–cat: offset (200, −320) → shrunk (180, −304) / 377.4 → dx 0.48, dy −0.81: above.
    // car–dog: (500, −20) → (480, −4) / 500.4 → dx 0.96: right of.
    // cat–dog: (300, 300) → (280, 280) / 424.3 → 0.66 on both axes: two relations, left out.
    assert_eq!(recs[1].id, "2");
    assert_eq!(
        recs[1].triplets,
        vec![t("car", Above, "cat"), t("car", RightOf, "dog")]
    );
    // Image 3: dog and cat overlap (offset (10, 5), shrunk to 0): no relation, no triplet.
    // Image 4: cat right of dog, but its file is missing. Image 5 has no annotations. The
    // last image entry repeats id 1; annotation 108 names category 99, 701 image 77.
    assert_eq!(summary.seen, 6);
    assert_eq!(
        counts(&problems),
        vec![
            (MissingImage, 1),
            (DuplicateId, 1),
            (UnknownCategory, 1),
            (UnknownImage, 1),
            (CrowdCategory, 1),
            (MultipleInstances, 1),
            (SmallBox, 1),
            (NoRelation, 1),
            (TwoRelations, 1),
            (NoTriplet, 2),
        ]
    );

    // With a 5-px minimum the bottle (centre (605, 315)) stays: cat–bottle offset (−230, −60)
    // → shrunk (−214, −42) / 237.7 → dx −0.90: left of; dog–bottle (−505, −65) → (−494, −52)
    // / 509.2 → dx −0.97: left of.
    let mut opts = CocoOptions::new(data("coco/images"));
    opts.min_box_side = 5.0;
    let (recs, _, _) = collect(|p, f| read_coco(data("coco/instances_tiny.json"), &opts, p, f));
    assert_eq!(
        recs[0].triplets,
        vec![
            t("cat", RightOf, "dog"),
            t("cat", LeftOf, "bottle"),
            t("dog", LeftOf, "bottle"),
        ]
    );
    // An area rule instead: 1% of 640·480 = 3072 px² drops the bottle (300 px²) again.
    opts.min_box_area_fraction = 0.01;
    opts.max_per_image = 1;
    let (recs, problems, _) =
        collect(|p, f| read_coco(data("coco/instances_tiny.json"), &opts, p, f));
    assert_eq!(recs[0].triplets, vec![t("cat", RightOf, "dog")]);
    // Image 2's second triplet is beyond the limit.
    assert_eq!(recs[1].triplets, vec![t("car", Above, "cat")]);
    assert_eq!(problems.count(BeyondPerImageLimit), 1);
}

#[test]
fn published_triplets_grouped_by_image() {
    let opts = TripletOptions::new(data("gqa/images"));
    let (recs, problems, summary) =
        collect(|p, f| read_triplets(data("published/train__size_9"), &opts, p, f));
    // The metadata's paths are another machine's; the files are found next to it.
    // Image 1: dog left of cat, tree above dog; cat right of dog mirrors the first and the
    // last row repeats it. Image 2: the "is" row is an attribute; horse below sky. Image 3:
    // car above car names one object twice. Image 4 (a number in the file) has no 4.jpg.
    // Row 7 has two items.
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].id, "1");
    assert_eq!(
        recs[0].triplets,
        vec![t("dog", LeftOf, "cat"), t("tree", Above, "dog")]
    );
    assert!(recs[0].objects.is_empty());
    assert_eq!(recs[0].path, data("gqa/images/1.jpg"));
    assert_eq!(recs[1].triplets, vec![t("horse", Below, "sky")]);
    assert_eq!(summary.seen, 9);
    assert_eq!(
        counts(&problems),
        vec![
            (MissingImage, 1),
            (BadRecord, 1),
            (RelationNotKept, 1),
            (SameName, 1),
            (RepeatedRelation, 2),
        ]
    );
    let files = l2s_sources::authors::TripletFiles::open(data(
        "published/train__size_9/result_metadata.json",
    ))
    .unwrap();
    assert_eq!(files.mapping.index("to the left of"), Some(3));
    assert_eq!(
        files.flat_data,
        data("published/train__size_9/data__FLAT.json")
    );
}

#[test]
fn published_orm_triplets_use_the_id_as_a_path() {
    let dir = std::env::temp_dir().join(format!("l2s-sources-orm-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("images/sub")).unwrap();
    std::fs::write(dir.join("images/sub/0001.png"), b"png").unwrap();
    std::fs::write(
        dir.join("result_metadata.json"),
        r#"{"flat_data_path": "data__FLAT.json", "mapping_path": "/elsewhere/mapping.json", "data_source": "ORM"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("data__FLAT.json"),
        r#"[["sub/0001.png", "cup", "book", "to the right of"]]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("mapping.json"),
        r#"{"rel_name_to_idx": {"to the right of": 0}}"#,
    )
    .unwrap();
    let opts = TripletOptions::new(dir.join("images"));
    let (recs, problems, _) = collect(|p, f| read_triplets(&dir, &opts, p, f));
    assert!(problems.is_empty(), "{}", problems.summary());
    assert_eq!(recs[0].path, dir.join("images/sub/0001.png"));
    assert_eq!(recs[0].triplets, vec![t("cup", RightOf, "book")]);
}

#[test]
fn jsonl_lines() {
    let (recs, problems, summary) =
        collect(|p, f| read_jsonl(data("jsonl/pairs.jsonl"), &JsonlOptions::default(), p, f));
    // Line 1: red above blue, its boxes agree (centres (10, 10) and (10, 30): dy = −0.8).
    // Line 2 has an id. Line 3: "beside" is no relation. Line 4: no such image. Line 5: not
    // JSON. Line 6: cup and cup. Line 7 repeats the id g1. Line 8: the pen's box (centre
    // (2, 2)) is left of the book's ((12, 2)), not right of it. Line 9 is blank. Line 10:
    // "under" reads below; an unknown field is ignored. Line 11 has no object.
    assert_eq!(
        recs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["pairs.jsonl:1", "g1", "pairs.jsonl:10"]
    );
    assert_eq!(
        recs[0].triplets,
        vec![t("red square", Above, "blue square")]
    );
    assert_eq!(recs[0].frame, Frame::Displayed);
    assert_eq!(
        recs[0].object("blue square").unwrap().bbox,
        BBox::new(0.0, 20.0, 20.0, 40.0)
    );
    assert_eq!(recs[0].path, data("jsonl/../images/exif6.jpg"));
    assert_eq!(recs[1].triplets, vec![t("cup", LeftOf, "book")]);
    assert!(recs[1].objects.is_empty());
    assert_eq!(recs[2].triplets, vec![t("dog", Below, "table")]);
    assert_eq!(summary.seen, 10);
    assert_eq!(
        counts(&problems),
        vec![
            (MissingImage, 1),
            (DuplicateId, 1),
            (BadRecord, 2),
            (UnknownRelation, 1),
            (BoxesDisagree, 1),
            (SameName, 1),
        ]
    );
    // Without the box check line 8 is kept as written.
    let opts = JsonlOptions {
        check_boxes: false,
        ..JsonlOptions::default()
    };
    let (recs, _, _) = collect(|p, f| read_jsonl(data("jsonl/pairs.jsonl"), &opts, p, f));
    assert!(recs.iter().any(|r| r.id == "pairs.jsonl:8"));
}

#[test]
fn gqa_names_are_read_in_their_singular_form() {
    // "trees" and "tree" are one name once singular, so both are out as repeated; "leaves"
    // above "benches" becomes "leaf" above "bench".
    let mut opts = GqaOptions::new(data("gqa/images"));
    opts.check_images = false;
    let (recs, problems, _) = collect(|p, f| read_gqa(data("gqa/plurals.json"), &opts, p, f));
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].triplets, vec![t("leaf", Above, "bench")]);
    assert_eq!(names(&recs[0]), ["bench", "leaf"]);
    assert_eq!(problems.count(RepeatedName), 2);
    // As written, "trees" is its own name and its relation is the first candidate.
    opts.singular_names = false;
    let (recs, _, _) = collect(|p, f| read_gqa(data("gqa/plurals.json"), &opts, p, f));
    assert_eq!(recs[0].triplets, vec![t("trees", LeftOf, "benches")]);
}
