//! Label-preserving symmetries of attention-map examples, for training the relation classifier
//! on more layouts than the dataset holds.
//!
//! A pair of maps `(subject, object)` of shape `(2, C, H, W)` with relation `r` can be mirrored,
//! transposed or have its two words swapped; the relation that then holds is known exactly
//! (mirroring left–right turns "left of" into "right of", swapping the words inverts the
//! relation, a transpose exchanges the horizontal and vertical relations). GenEval's rule is the
//! same along both axes of a square image, so every such copy is labelled correctly.

use candle_core::{Device, Tensor};
use l2s_eval::Relation;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which symmetries training draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// Train on the maps as stored.
    #[default]
    None,
    /// Left–right mirror and subject/object swap: 4 variants, each as natural as the original
    /// for photographs.
    Mirror,
    /// Every mirror, rotation and transpose of the square, times the swap: 16 variants. Right
    /// for worlds without a preferred up (the shapes world).
    Dihedral,
}

impl std::str::FromStr for Augment {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "none" => Ok(Self::None),
            "mirror" => Ok(Self::Mirror),
            "dihedral" => Ok(Self::Dihedral),
            _ => Err(format!("{name:?}: expected none, mirror or dihedral")),
        }
    }
}

impl Augment {
    /// The symmetries this setting draws from, the identity first.
    pub fn symmetries(self) -> Vec<Symmetry> {
        let mut out = Vec::new();
        for swap in [false, true] {
            for transpose in [false, true] {
                for flip_y in [false, true] {
                    for flip_x in [false, true] {
                        let s = Symmetry {
                            flip_x,
                            flip_y,
                            transpose,
                            swap,
                        };
                        let allowed = match self {
                            Self::None => s == Symmetry::IDENTITY,
                            Self::Mirror => !flip_y && !transpose,
                            Self::Dihedral => true,
                        };
                        if allowed {
                            out.push(s);
                        }
                    }
                }
            }
        }
        out
    }
}

/// One symmetry: transpose first (if set), then the mirrors, then the word swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Symmetry {
    /// Exchange rows and columns.
    pub transpose: bool,
    /// Mirror left–right (reverse the columns).
    pub flip_x: bool,
    /// Mirror top–bottom (reverse the rows).
    pub flip_y: bool,
    /// Exchange the subject's and the object's maps.
    pub swap: bool,
}

impl Symmetry {
    pub const IDENTITY: Symmetry = Symmetry {
        transpose: false,
        flip_x: false,
        flip_y: false,
        swap: false,
    };

    /// The relation of the transformed pair, given the relation of the original one.
    pub fn relation(self, r: Relation) -> Relation {
        use Relation::*;
        let mut r = r;
        if self.transpose {
            r = match r {
                LeftOf => Above,
                RightOf => Below,
                Above => LeftOf,
                Below => RightOf,
            };
        }
        if self.flip_x && r.is_horizontal() {
            r = r.inverse();
        }
        if self.flip_y && !r.is_horizontal() {
            r = r.inverse();
        }
        if self.swap {
            r = r.inverse();
        }
        r
    }

    /// Applies the symmetry to maps of shape `(B, 2, C, H, W)` (H rows, W columns; square when
    /// transposing).
    pub fn apply(self, maps: &Tensor) -> candle_core::Result<Tensor> {
        let mut m = maps.clone();
        if self.transpose {
            m = m.transpose(3, 4)?.contiguous()?;
        }
        if self.flip_y {
            m = reverse(&m, 3)?;
        }
        if self.flip_x {
            m = reverse(&m, 4)?;
        }
        if self.swap {
            m = reverse(&m, 1)?;
        }
        Ok(m)
    }
}

fn reverse(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    t.index_select(&Tensor::from_vec(idx, n, t.device())?, dim)
}

/// Relation-label remapping for one dataset: the class index of each transformed relation.
#[derive(Debug, Clone)]
pub struct Augmenter {
    symmetries: Vec<Symmetry>,
    /// `class_map[s][label]`: the label after symmetry `s`.
    class_map: Vec<Vec<u32>>,
}

impl Augmenter {
    /// Checks that every class is one of the four spatial relations (an augmentation is only
    /// defined for those) and that the maps are square when transposing.
    pub fn new(
        augment: Augment,
        relations: &[String],
        map_size: (usize, usize),
    ) -> Result<Self, String> {
        let symmetries = augment.symmetries();
        if augment == Augment::None {
            return Ok(Self {
                symmetries,
                class_map: vec![(0..relations.len() as u32).collect()],
            });
        }
        let parsed: Vec<Relation> = relations
            .iter()
            .map(|r| {
                Relation::parse(r).map_err(|_| {
                    format!("augmentation {augment:?} needs the four spatial relations, but the dataset has the class {r:?}")
                })
            })
            .collect::<Result<_, _>>()?;
        if augment == Augment::Dihedral && map_size.0 != map_size.1 {
            return Err(format!(
                "dihedral augmentation needs square maps, the dataset's are {}×{}",
                map_size.0, map_size.1
            ));
        }
        let class_map = symmetries
            .iter()
            .map(|s| {
                parsed
                    .iter()
                    .map(|&r| {
                        let to = s.relation(r);
                        parsed.iter().position(|&p| p == to).map(|i| i as u32).ok_or_else(|| {
                            format!(
                                "augmentation {augment:?} turns {:?} into {:?}, which is not a class of the dataset",
                                r.name(),
                                to.name()
                            )
                        })
                    })
                    .collect::<Result<Vec<u32>, String>>()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            symmetries,
            class_map,
        })
    }

    pub fn is_identity(&self) -> bool {
        self.symmetries.len() == 1
    }

    /// Draws one symmetry per example and returns the transformed batch and its labels, in the
    /// order of the input.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        maps: &Tensor,
        labels: &[u32],
        rng: &mut R,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let device: &Device = maps.device();
        if self.is_identity() {
            return Ok((maps.clone(), Tensor::new(labels, device)?));
        }
        let picks: Vec<usize> = labels
            .iter()
            .map(|_| rng.gen_range(0..self.symmetries.len()))
            .collect();
        let mut parts: Vec<Tensor> = Vec::new();
        let mut order: Vec<u32> = Vec::new();
        for (s, sym) in self.symmetries.iter().enumerate() {
            let members: Vec<u32> = (0..labels.len() as u32)
                .filter(|&i| picks[i as usize] == s)
                .collect();
            if members.is_empty() {
                continue;
            }
            let idx = Tensor::new(members.as_slice(), device)?;
            parts.push(sym.apply(&maps.index_select(&idx, 0)?)?);
            order.extend(members);
        }
        let grouped = Tensor::cat(&parts, 0)?;
        // Put the examples back in input order.
        let mut inverse = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i as usize] = pos as u32;
        }
        let out = grouped.index_select(&Tensor::new(inverse.as_slice(), device)?, 0)?;
        let new_labels: Vec<u32> = labels
            .iter()
            .zip(&picks)
            .map(|(&l, &s)| self.class_map[s][l as usize])
            .collect();
        Ok((out, Tensor::new(new_labels.as_slice(), device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use l2s_eval::{relations, BBox};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A (1, 2, 1, n, n) pair of maps, each a filled rectangle (x0, y0, x1, y1) exclusive.
    fn pair(n: usize, a: [usize; 4], b: [usize; 4]) -> Tensor {
        let mut v = vec![0f32; 2 * n * n];
        for (k, r) in [a, b].iter().enumerate() {
            for y in r[1]..r[3] {
                for x in r[0]..r[2] {
                    v[k * n * n + y * n + x] = 1.0;
                }
            }
        }
        Tensor::from_vec(v, (1, 2, 1, n, n), &Device::Cpu).unwrap()
    }

    /// The box of the nonzero cells of one map, read back from the tensor.
    fn bbox(maps: &Tensor, word: usize) -> BBox {
        let m = maps
            .get(0)
            .unwrap()
            .get(word)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (y, row) in m.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                if v > 0.0 {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x + 1);
                    y1 = y1.max(y + 1);
                }
            }
        }
        BBox::new(x0 as f32, y0 as f32, x1 as f32, y1 as f32)
    }

    /// For random box pairs with one clear relation, the relation GenEval's rule reads from the
    /// transformed maps is the one the symmetry predicts.
    #[test]
    fn every_symmetry_predicts_the_relation_read_from_the_moved_maps() {
        let n = 16;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut checked = 0;
        while checked < 200 {
            let mut rect = || {
                let w = rng.gen_range(2..6);
                let h = rng.gen_range(2..6);
                let x = rng.gen_range(0..=n - w);
                let y = rng.gen_range(0..=n - h);
                [x, y, x + w, y + h]
            };
            let (a, b) = (rect(), rect());
            let maps = pair(n, a, b);
            let truth = relations(&bbox(&maps, 0), &bbox(&maps, 1));
            if truth.len() != 1 {
                continue;
            }
            let r = truth.iter().next().unwrap();
            for s in Augment::Dihedral.symmetries() {
                let moved = s.apply(&maps).unwrap();
                let seen = relations(&bbox(&moved, 0), &bbox(&moved, 1));
                assert_eq!(seen.len(), 1, "{s:?} on {a:?} {b:?}");
                assert_eq!(
                    seen.iter().next().unwrap(),
                    s.relation(r),
                    "{s:?} on {a:?} {b:?} ({r:?})"
                );
            }
            checked += 1;
        }
    }

    #[test]
    fn group_sizes() {
        assert_eq!(Augment::None.symmetries(), vec![Symmetry::IDENTITY]);
        assert_eq!(Augment::Mirror.symmetries().len(), 4);
        assert_eq!(Augment::Dihedral.symmetries().len(), 16);
        for a in [Augment::None, Augment::Mirror, Augment::Dihedral] {
            assert_eq!(a.symmetries()[0], Symmetry::IDENTITY);
        }
        // Mirror never moves anything vertically.
        for s in Augment::Mirror.symmetries() {
            assert_eq!(
                s.relation(Relation::Above),
                if s.swap {
                    Relation::Below
                } else {
                    Relation::Above
                }
            );
        }
    }

    #[test]
    fn batch_keeps_order_and_relabels() {
        let n = 8;
        // Example 0: subject left of object; example 1: subject above object.
        let left = pair(n, [0, 3, 2, 5], [6, 3, 8, 5]);
        let above = pair(n, [3, 0, 5, 2], [3, 6, 5, 8]);
        let maps = Tensor::cat(&[&left, &above], 0).unwrap();
        let names: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
        let aug = Augmenter::new(Augment::Dihedral, &names, (n, n)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..20 {
            let (out, labels) = aug
                .apply(
                    &maps,
                    &[
                        Relation::LeftOf.index() as u32,
                        Relation::Above.index() as u32,
                    ],
                    &mut rng,
                )
                .unwrap();
            let labels = labels.to_vec1::<u32>().unwrap();
            for (i, &l) in labels.iter().enumerate() {
                let ex = out.get(i).unwrap().unsqueeze(0).unwrap();
                let seen = relations(&bbox(&ex, 0), &bbox(&ex, 1));
                assert_eq!(seen.iter().next().unwrap(), Relation::ALL[l as usize]);
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_relabel() {
        let names = vec!["left of".to_string(), "next to".to_string()];
        let e = Augmenter::new(Augment::Mirror, &names, (16, 16)).unwrap_err();
        assert!(e.contains("next to"), "{e}");
        let two = vec!["left of".to_string(), "above".to_string()];
        let e = Augmenter::new(Augment::Mirror, &two, (16, 16)).unwrap_err();
        assert!(e.contains("right of"), "{e}");
        let four: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
        assert!(Augmenter::new(Augment::Dihedral, &four, (16, 8))
            .unwrap_err()
            .contains("square"));
        assert!(Augmenter::new(Augment::None, &names, (16, 8)).is_ok());
    }
}
