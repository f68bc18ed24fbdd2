//! Fixed train/val/test splits by image id.

use serde::Serialize;

/// Which part of the data an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

/// Relative sizes of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SplitWeights {
    pub train: u32,
    pub val: u32,
    pub test: u32,
}

impl Default for SplitWeights {
    /// 10 : 2 : 1, the proportions of the published GQA triplets (2000 / 400 / 200 per
    /// relation).
    fn default() -> Self {
        Self {
            train: 10,
            val: 2,
            test: 1,
        }
    }
}

impl Split {
    /// The split of image `id` under `weights`: the 64-bit FNV-1a hash of the id's UTF-8
    /// bytes, modulo the weights' sum, falls in train's share first, then val's, then test's.
    /// It depends on nothing but the id and the weights, so an image keeps its split whatever
    /// the file, its order, or which other images are read; GQA's train and val scene graphs
    /// can be read together without an image changing sides. All-zero weights put everything
    /// in train.
    pub fn of(id: &str, weights: &SplitWeights) -> Split {
        let total = weights.train as u64 + weights.val as u64 + weights.test as u64;
        if total == 0 {
            return Split::Train;
        }
        let slot = fnv1a64(id.as_bytes()) % total;
        if slot < weights.train as u64 {
            Split::Train
        } else if slot < weights.train as u64 + weights.val as u64 {
            Split::Val
        } else {
            Split::Test
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn splits_are_fixed_and_roughly_proportional() {
        let w = SplitWeights::default();
        let mut n = [0usize; 3];
        for i in 0..13_000 {
            let id = format!("{}", 2_300_000 + i);
            let s = Split::of(&id, &w);
            assert_eq!(s, Split::of(&id, &w));
            n[s as usize] += 1;
        }
        // 10/13, 2/13, 1/13 of 13 000 = 10 000, 2 000, 1 000, within a few percent.
        assert!((9_700..10_300).contains(&n[0]), "{n:?}");
        assert!((1_850..2_150).contains(&n[1]), "{n:?}");
        assert!((900..1_100).contains(&n[2]), "{n:?}");
        let all_val = SplitWeights {
            train: 0,
            val: 1,
            test: 0,
        };
        assert_eq!(Split::of("anything", &all_val), Split::Val);
        let none = SplitWeights {
            train: 0,
            val: 0,
            test: 0,
        };
        assert_eq!(Split::of("x", &none), Split::Train);
    }
}
