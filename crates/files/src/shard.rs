//! Part `i` of `n` of a job split across processes or machines.

use std::fmt;
use std::str::FromStr;

/// Part `index` of `count`, numbered from 1 and written `"i/n"` with 1 ≤ i ≤ n (`"2/4"` is the
/// second of four parts). Item `k` (0-based: a prompt's position, a sample's id) belongs to the
/// part with `k mod n = i − 1`, so the parts are disjoint and together cover everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    index: usize,
    count: usize,
}

/// A shard spec that is not `"i/n"` with 1 ≤ i ≤ n.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard {text:?}: {reason}")]
pub struct ParseShardError {
    pub text: String,
    pub reason: String,
}

impl ShardSpec {
    /// Everything in one part: `"1/1"`.
    pub const fn all() -> Self {
        Self { index: 1, count: 1 }
    }

    /// Part `index` (from 1) of `count`.
    pub fn new(index: usize, count: usize) -> Result<Self, ParseShardError> {
        let err = |reason: String| ParseShardError {
            text: format!("{index}/{count}"),
            reason,
        };
        if count == 0 {
            return Err(err("expected i/n with n ≥ 1 parts".into()));
        }
        if index == 0 || index > count {
            return Err(err(format!(
                "expected i/n with 1 ≤ i ≤ n; parts are numbered from 1, so {count} parts are 1/{count} … {count}/{count}"
            )));
        }
        Ok(Self { index, count })
    }

    /// The part's number, from 1.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The number of parts.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether this is the only part.
    pub fn is_all(&self) -> bool {
        self.count == 1
    }

    /// Whether item `i` (0-based position) belongs to this part.
    pub fn owns_index(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// Whether the sample with this id belongs to this part.
    pub fn owns(&self, sample_id: u64) -> bool {
        sample_id % self.count as u64 == (self.index - 1) as u64
    }
}

impl Default for ShardSpec {
    fn default() -> Self {
        Self::all()
    }
}

impl FromStr for ShardSpec {
    type Err = ParseShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseShardError {
            text: text.to_string(),
            reason,
        };
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| err("expected i/n, e.g. 2/4 for the second of four parts".into()))?;
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| err(format!("{:?} is not a whole number", s.trim())))
        };
        let (i, n) = (number(i)?, number(n)?);
        Self::new(i, n).map_err(|e| err(e.reason))
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_based_parts() {
        let s: ShardSpec = "2/4".parse().unwrap();
        assert_eq!((s.index(), s.count()), (2, 4));
        assert_eq!(s.to_string(), "2/4");
        assert_eq!(
            " 4 / 4 ".parse::<ShardSpec>().unwrap(),
            ShardSpec::new(4, 4).unwrap()
        );
        assert_eq!("1/1".parse::<ShardSpec>().unwrap(), ShardSpec::all());
        assert!(ShardSpec::all().is_all() && !s.is_all());
        assert_eq!(ShardSpec::default(), ShardSpec::all());
        for text in ["1/3", "3/3", "7/12"] {
            assert_eq!(text.parse::<ShardSpec>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn refuses_what_is_not_i_of_n() {
        for bad in [
            "0/4", "5/4", "1/0", "0/0", "1", "", "a/b", "-1/2", "1/-2", "1.5/2", "1/2/3",
        ] {
            let e = bad.parse::<ShardSpec>().unwrap_err();
            assert_eq!(e.text, bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let e = "0/4".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(
            e.contains("numbered from 1") && e.contains("1/4 … 4/4"),
            "{e}"
        );
        let e = "5/4".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(e.contains("1 ≤ i ≤ n"), "{e}");
        let e = "x/4".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(e.contains("\"x\" is not a whole number"), "{e}");
        let e = "3".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(e.contains("expected i/n"), "{e}");
        assert!(ShardSpec::new(0, 2).is_err() && ShardSpec::new(3, 2).is_err());
    }

    #[test]
    fn parts_are_disjoint_and_cover_everything() {
        for n in 1..6 {
            let parts: Vec<ShardSpec> = (1..=n).map(|i| ShardSpec::new(i, n).unwrap()).collect();
            for k in 0..50usize {
                assert_eq!(parts.iter().filter(|p| p.owns_index(k)).count(), 1);
                assert_eq!(parts.iter().filter(|p| p.owns(k as u64)).count(), 1);
                assert_eq!(parts[k % n].owns_index(k), parts[k % n].owns(k as u64));
            }
        }
        // Part 1 of n starts at item 0, as eval's prompts i−1, i−1+n, … do.
        let first = ShardSpec::new(1, 3).unwrap();
        assert!(first.owns_index(0) && first.owns_index(3) && !first.owns_index(1));
        assert!(ShardSpec::all().owns(u64::MAX));
    }
}
