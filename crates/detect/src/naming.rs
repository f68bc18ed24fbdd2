//! One set of modules, two checkpoint namings.
//!
//! Every parameter the model loads has a path of our own (`backbone.stages.0.blocks.1.attn.qkv.weight`).
//! [`translate`] maps it to where a checkpoint keeps it: one tensor, or several concatenated along
//! the first axis (HF stores Swin's query/key/value apart where we, like mmdet, pack them), with
//! alternative names for older exports, and a reordering where a layout differs (mmdet's patch
//! merging flattens 2×2 neighbourhoods with `nn.Unfold`, channel-major).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointNaming {
    /// transformers' `Mask2FormerForUniversalSegmentation` (current names first, 4.x names as
    /// alternatives).
    HuggingFace,
    /// mmdet 2.x `Mask2Former` (`backbone.*`, `panoptic_head.*`).
    Mmdet,
}

impl CheckpointNaming {
    pub fn label(self) -> &'static str {
        match self {
            CheckpointNaming::HuggingFace => "Hugging Face",
            CheckpointNaming::Mmdet => "mmdet",
        }
    }

    /// Guesses the naming from the tensor names of a file.
    pub fn detect<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<Self> {
        names.find_map(|n| {
            if n.starts_with("model.pixel_level_module.")
                || n.starts_with("model.transformer_module.")
            {
                Some(CheckpointNaming::HuggingFace)
            } else if n.starts_with("panoptic_head.") || n.starts_with("backbone.stages.") {
                Some(CheckpointNaming::Mmdet)
            } else {
                None
            }
        })
    }
}

/// How a tensor is laid out differently in the checkpoint than in our modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reorder {
    None,
    /// Along `axis` (of length 4·C) the checkpoint orders `c·4 + row·2 + col`; we order
    /// `(col·2 + row)·C + c`.
    UnfoldToConcat {
        axis: usize,
    },
}

/// Where one of our parameters lives in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Concatenated along axis 0; within a part, the first name present is used.
    pub parts: Vec<Vec<String>>,
    pub reorder: Reorder,
}

impl Source {
    fn one(name: String) -> Self {
        Self {
            parts: vec![vec![name]],
            reorder: Reorder::None,
        }
    }
    fn alt(names: Vec<String>) -> Self {
        Self {
            parts: vec![names],
            reorder: Reorder::None,
        }
    }
}

/// Maps one of our parameter paths to its place in a checkpoint; `None` for a path the model
/// never asks for.
pub fn translate(naming: CheckpointNaming, path: &str) -> Option<Source> {
    let segs: Vec<&str> = path.split('.').collect();
    match naming {
        CheckpointNaming::HuggingFace => hf(&segs),
        CheckpointNaming::Mmdet => mmdet(&segs),
    }
}

const HF_BACKBONE: [&str; 2] = [
    "model.pixel_level_module.encoder.swin.",
    "model.pixel_level_module.encoder.",
];
const HF_PIXEL: &str = "model.pixel_level_module.decoder.";
const HF_TRANSFORMER: &str = "model.transformer_module.";

fn hf_backbone(rest: &[String]) -> Vec<String> {
    // Current transformers nests the Swin model under `swin.`; 4.x exports do not.
    let mut out = Vec::new();
    for r in rest {
        for p in HF_BACKBONE {
            out.push(format!("{p}{r}"));
        }
    }
    out
}

fn hf(segs: &[&str]) -> Option<Source> {
    Some(match segs {
        ["backbone", "patch_embed", "proj", p] => Source::alt(hf_backbone(&[format!(
            "embeddings.patch_embeddings.projection.{p}"
        )])),
        ["backbone", "patch_embed", "norm", p] => {
            Source::alt(hf_backbone(&[format!("embeddings.norm.{p}")]))
        }
        ["backbone", "stages", s, "blocks", b, rest @ ..] => {
            let base = format!("encoder.layers.{s}.blocks.{b}.");
            let names = |new: &str, old: &str| {
                hf_backbone(&[format!("{base}{new}"), format!("{base}{old}")])
            };
            match rest {
                ["norm1", p] => Source::alt(hf_backbone(&[format!("{base}layernorm_before.{p}")])),
                ["norm2", p] => Source::alt(hf_backbone(&[format!("{base}layernorm_after.{p}")])),
                ["attn", "qkv", p] => Source {
                    parts: [
                        ("q_proj", "self.query"),
                        ("k_proj", "self.key"),
                        ("v_proj", "self.value"),
                    ]
                    .iter()
                    .map(|(new, old)| {
                        names(
                            &format!("attention.{new}.{p}"),
                            &format!("attention.{old}.{p}"),
                        )
                    })
                    .collect(),
                    reorder: Reorder::None,
                },
                ["attn", "proj", p] => Source::alt(names(
                    &format!("attention.o_proj.{p}"),
                    &format!("attention.output.dense.{p}"),
                )),
                ["attn", "rel_bias_table"] => Source::alt(names(
                    "attention.relative_position_bias.relative_position_bias_table",
                    "attention.self.relative_position_bias_table",
                )),
                // Stored by transformers 4.x only; checked, never loaded.
                ["attn", "rel_index"] => Source::alt(hf_backbone(&[format!(
                    "{base}attention.self.relative_position_index"
                )])),
                ["mlp", "fc1", p] => Source::alt(names(
                    &format!("mlp.fc1.{p}"),
                    &format!("intermediate.dense.{p}"),
                )),
                ["mlp", "fc2", p] => {
                    Source::alt(names(&format!("mlp.fc2.{p}"), &format!("output.dense.{p}")))
                }
                _ => return None,
            }
        }
        ["backbone", "stages", s, "merge", m, p] => Source::alt(hf_backbone(&[format!(
            "encoder.layers.{s}.downsample.{m}.{p}"
        )])),
        ["backbone", "out_norms", s, p] => {
            let s: usize = s.parse().ok()?;
            Source::one(format!(
                "model.pixel_level_module.encoder.hidden_states_norms.stage{}.{p}",
                s + 1
            ))
        }
        ["pixel_decoder", "input_proj", i, layer, p] => {
            let k = if *layer == "conv" { 0 } else { 1 };
            Source::one(format!("{HF_PIXEL}input_projections.{i}.{k}.{p}"))
        }
        ["pixel_decoder", "level_embed"] => Source::one(format!("{HF_PIXEL}level_embed")),
        ["pixel_decoder", "layers", l, rest @ ..] => {
            let base = format!("{HF_PIXEL}encoder.layers.{l}.");
            Source::one(match rest {
                ["attn", m, p] => format!("{base}self_attn.{m}.{p}"),
                ["norm1", p] => format!("{base}self_attn_layer_norm.{p}"),
                ["norm2", p] => format!("{base}final_layer_norm.{p}"),
                ["ffn", fc, p] => format!("{base}{fc}.{p}"),
                _ => return None,
            })
        }
        ["pixel_decoder", kind @ ("lateral" | "output"), i, layer, p] => {
            let i: usize = i.parse().ok()?;
            let module = if *kind == "lateral" {
                "adapter"
            } else {
                "layer"
            };
            let k = if *layer == "conv" { 0 } else { 1 };
            Source::one(format!("{HF_PIXEL}{module}_{}.{k}.{p}", i + 1))
        }
        ["pixel_decoder", "mask_proj", p] => Source::one(format!("{HF_PIXEL}mask_projection.{p}")),
        ["decoder", "query_feat"] => {
            Source::one(format!("{HF_TRANSFORMER}queries_features.weight"))
        }
        ["decoder", "query_pos"] => Source::one(format!("{HF_TRANSFORMER}queries_embedder.weight")),
        ["decoder", "level_embed"] => Source::one(format!("{HF_TRANSFORMER}level_embed.weight")),
        ["decoder", "final_norm", p] => {
            Source::one(format!("{HF_TRANSFORMER}decoder.layernorm.{p}"))
        }
        ["decoder", "layers", l, rest @ ..] => {
            let base = format!("{HF_TRANSFORMER}decoder.layers.{l}.");
            match rest {
                ["cross_attn", "in_proj", p] => {
                    Source::one(format!("{base}cross_attn.in_proj_{p}"))
                }
                ["self_attn", "in_proj", p] => Source {
                    parts: ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .map(|m| vec![format!("{base}self_attn.{m}.{p}")])
                        .collect(),
                    reorder: Reorder::None,
                },
                [attn @ ("cross_attn" | "self_attn"), "out_proj", p] => {
                    Source::one(format!("{base}{attn}.out_proj.{p}"))
                }
                ["norm_cross", p] => Source::one(format!("{base}cross_attn_layer_norm.{p}")),
                ["norm_self", p] => Source::one(format!("{base}self_attn_layer_norm.{p}")),
                ["norm_ffn", p] => Source::one(format!("{base}final_layer_norm.{p}")),
                ["ffn", fc, p] => Source::one(format!("{base}{fc}.{p}")),
                _ => return None,
            }
        }
        ["head", "class", p] => Source::one(format!("class_predictor.{p}")),
        ["head", "mask_embed", i, p] => Source::one(format!(
            "{HF_TRANSFORMER}decoder.mask_predictor.mask_embedder.{i}.0.{p}"
        )),
        _ => return None,
    })
}

const MM_PIXEL: &str = "panoptic_head.pixel_decoder.";
const MM_DECODER: &str = "panoptic_head.transformer_decoder.";

fn mmdet(segs: &[&str]) -> Option<Source> {
    let ffn = |base: &str, fc: &str, p: &str| -> Option<String> {
        Some(match fc {
            "fc1" => format!("{base}layers.0.0.{p}"),
            "fc2" => format!("{base}layers.1.{p}"),
            _ => return None,
        })
    };
    Some(match segs {
        ["backbone", "patch_embed", "proj", p] => {
            Source::one(format!("backbone.patch_embed.projection.{p}"))
        }
        ["backbone", "patch_embed", "norm", p] => {
            Source::one(format!("backbone.patch_embed.norm.{p}"))
        }
        ["backbone", "stages", s, "blocks", b, rest @ ..] => {
            let base = format!("backbone.stages.{s}.blocks.{b}.");
            Source::one(match rest {
                [n @ ("norm1" | "norm2"), p] => format!("{base}{n}.{p}"),
                ["attn", m @ ("qkv" | "proj"), p] => format!("{base}attn.w_msa.{m}.{p}"),
                ["attn", "rel_bias_table"] => {
                    format!("{base}attn.w_msa.relative_position_bias_table")
                }
                ["attn", "rel_index"] => format!("{base}attn.w_msa.relative_position_index"),
                ["mlp", fc, p] => ffn(&format!("{base}ffn."), fc, p)?,
                _ => return None,
            })
        }
        ["backbone", "stages", s, "merge", m, p] => Source {
            parts: vec![vec![format!("backbone.stages.{s}.downsample.{m}.{p}")]],
            // The reduction's input features and the norm before it follow the unfold order.
            reorder: Reorder::UnfoldToConcat {
                axis: if *m == "reduction" { 1 } else { 0 },
            },
        },
        ["backbone", "out_norms", s, p] => Source::one(format!("backbone.norm{s}.{p}")),
        ["pixel_decoder", "input_proj", i, layer, p] => {
            Source::one(format!("{MM_PIXEL}input_convs.{i}.{layer}.{p}"))
        }
        ["pixel_decoder", "level_embed"] => Source::one(format!("{MM_PIXEL}level_encoding.weight")),
        ["pixel_decoder", "layers", l, rest @ ..] => {
            let base = format!("{MM_PIXEL}encoder.layers.{l}.");
            Source::one(match rest {
                ["attn", m, p] => format!("{base}attentions.0.{m}.{p}"),
                ["norm1", p] => format!("{base}norms.0.{p}"),
                ["norm2", p] => format!("{base}norms.1.{p}"),
                ["ffn", fc, p] => ffn(&format!("{base}ffns.0."), fc, p)?,
                _ => return None,
            })
        }
        ["pixel_decoder", kind @ ("lateral" | "output"), i, layer, p] => {
            Source::one(format!("{MM_PIXEL}{kind}_convs.{i}.{layer}.{p}"))
        }
        ["pixel_decoder", "mask_proj", p] => Source::one(format!("{MM_PIXEL}mask_feature.{p}")),
        ["decoder", "query_feat"] => Source::one("panoptic_head.query_feat.weight".into()),
        ["decoder", "query_pos"] => Source::one("panoptic_head.query_embed.weight".into()),
        ["decoder", "level_embed"] => Source::one("panoptic_head.level_embed.weight".into()),
        ["decoder", "final_norm", p] => Source::one(format!("{MM_DECODER}post_norm.{p}")),
        ["decoder", "layers", l, rest @ ..] => {
            let base = format!("{MM_DECODER}layers.{l}.");
            // mmcv numbers attentions and norms in operation order: cross, self, ffn.
            Source::one(match rest {
                ["cross_attn", "in_proj", p] => format!("{base}attentions.0.attn.in_proj_{p}"),
                ["self_attn", "in_proj", p] => format!("{base}attentions.1.attn.in_proj_{p}"),
                ["cross_attn", "out_proj", p] => format!("{base}attentions.0.attn.out_proj.{p}"),
                ["self_attn", "out_proj", p] => format!("{base}attentions.1.attn.out_proj.{p}"),
                ["norm_cross", p] => format!("{base}norms.0.{p}"),
                ["norm_self", p] => format!("{base}norms.1.{p}"),
                ["norm_ffn", p] => format!("{base}norms.2.{p}"),
                ["ffn", fc, p] => ffn(&format!("{base}ffns.0."), fc, p)?,
                _ => return None,
            })
        }
        ["head", "class", p] => Source::one(format!("panoptic_head.cls_embed.{p}")),
        ["head", "mask_embed", i, p] => {
            // nn.Sequential(Linear, ReLU, Linear, ReLU, Linear): the linears sit at 0, 2, 4.
            let i: usize = i.parse().ok()?;
            Source::one(format!("panoptic_head.mask_embed.{}.{p}", 2 * i))
        }
        _ => return None,
    })
}

/// For a 4·C axis in our order, the checkpoint index of each position (see [`Reorder`]).
pub fn unfold_permutation(four_c: usize) -> Vec<u32> {
    let c = four_c / 4;
    (0..four_c)
        .map(|n| {
            let (k, ch) = (n / c, n % c);
            let (col, row) = (k / 2, k % 2);
            (ch * 4 + row * 2 + col) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfold_permutation_is_a_permutation() {
        let mut p = unfold_permutation(12);
        // Our slot 1 (neighbour (row 0, col 0), channel 1) is unfold slot 4.
        assert_eq!(p[1], 4);
        // Our slot 3 (neighbour (row 1, col 0), channel 0) is unfold slot 2.
        assert_eq!(p[3], 2);
        p.sort();
        assert_eq!(p, (0..12).collect::<Vec<u32>>());
    }

    #[test]
    fn paths_translate_in_both_namings() {
        let hf = translate(
            CheckpointNaming::HuggingFace,
            "backbone.stages.1.blocks.0.attn.qkv.bias",
        )
        .unwrap();
        assert_eq!(hf.parts.len(), 3);
        assert_eq!(
            hf.parts[1][0],
            "model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.attention.k_proj.bias"
        );
        let mm = translate(CheckpointNaming::Mmdet, "decoder.layers.3.ffn.fc1.weight").unwrap();
        assert_eq!(
            mm.parts[0][0],
            "panoptic_head.transformer_decoder.layers.3.ffns.0.layers.0.0.weight"
        );
        assert!(translate(CheckpointNaming::Mmdet, "nonsense.path").is_none());
    }
}
