//! Part `i` of `n` of a job split across processes or machines, given as `"i/n"` or read from
//! a cluster scheduler's environment (`"auto"`: a Slurm job array or a Kubernetes Indexed Job).

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

/// Slurm's job-array variables (sbatch(1), "OUTPUT ENVIRONMENT VARIABLES").
pub const SLURM_ARRAY_TASK_ID: &str = "SLURM_ARRAY_TASK_ID";
pub const SLURM_ARRAY_TASK_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
pub const SLURM_ARRAY_TASK_MIN: &str = "SLURM_ARRAY_TASK_MIN";
pub const SLURM_ARRAY_TASK_MAX: &str = "SLURM_ARRAY_TASK_MAX";
pub const SLURM_ARRAY_TASK_STEP: &str = "SLURM_ARRAY_TASK_STEP";
/// The 0-based index of a pod of a Kubernetes Indexed Job (`completionMode: Indexed`).
pub const JOB_COMPLETION_INDEX: &str = "JOB_COMPLETION_INDEX";
/// The number of parts where the scheduler does not say it (Kubernetes: the Job's
/// `completions`).
pub const L2S_SHARD_COUNT: &str = "L2S_SHARD_COUNT";

impl ShardSpec {
    /// The part this process is, read from the scheduler's environment through `var` (a
    /// lookup such as `|name| std::env::var(name).ok()`); `count` is a number of parts given
    /// on the command line (`auto/N`), checked against the environment's.
    ///
    /// - Slurm job array: index `SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` (divided by
    ///   `SLURM_ARRAY_TASK_STEP` when the array has a step), of `SLURM_ARRAY_TASK_COUNT` parts
    ///   or, without it, `(MAX − MIN) / STEP + 1`. An array whose ids are not one evenly
    ///   stepped range (`--array=0,4,9`) is refused: its ids cannot be numbered 1…n.
    /// - Kubernetes Indexed Job: index `JOB_COMPLETION_INDEX` (0-based), of `L2S_SHARD_COUNT`
    ///   parts or of `count`.
    ///
    /// Both present is accepted only when they name the same part; neither is refused. Every
    /// error names the variables.
    pub fn from_env_with(
        count: Option<usize>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ParseShardError> {
        let text = match count {
            Some(n) => format!("auto/{n}"),
            None => "auto".to_string(),
        };
        let err = |reason: String| ParseShardError {
            text: text.clone(),
            reason,
        };
        let number = |name: &str| -> Result<Option<u64>, ParseShardError> {
            match var(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| err(format!("{name}={v:?} is not a whole number ≥ 0"))),
            }
        };
        let env_count = number(L2S_SHARD_COUNT)?;
        let slurm = match number(SLURM_ARRAY_TASK_ID)? {
            None => None,
            Some(id) => {
                let min = number(SLURM_ARRAY_TASK_MIN)?.ok_or_else(|| {
                    err(format!(
                        "{SLURM_ARRAY_TASK_ID} is set but {SLURM_ARRAY_TASK_MIN} is not"
                    ))
                })?;
                let step = number(SLURM_ARRAY_TASK_STEP)?.unwrap_or(1);
                if step == 0 {
                    return Err(err(format!("{SLURM_ARRAY_TASK_STEP}=0")));
                }
                let max = number(SLURM_ARRAY_TASK_MAX)?;
                let tasks = number(SLURM_ARRAY_TASK_COUNT)?;
                if id < min || (id - min) % step != 0 || max.is_some_and(|m| id > m) {
                    return Err(err(format!(
                        "{SLURM_ARRAY_TASK_ID}={id} is not in the array \
                         {SLURM_ARRAY_TASK_MIN}={min} … {SLURM_ARRAY_TASK_MAX}={} step {step}",
                        max.map_or("?".to_string(), |m| m.to_string())
                    )));
                }
                let range = max.map(|m| (m - min) / step + 1);
                let parts = match (tasks, range) {
                    (Some(c), Some(r)) if c != r => {
                        return Err(err(format!(
                            "the job array is not one evenly stepped range: \
                             {SLURM_ARRAY_TASK_COUNT}={c} tasks but \
                             {SLURM_ARRAY_TASK_MIN}={min} … {SLURM_ARRAY_TASK_MAX}={} \
                             step {step} spans {r}; submit --array=0-{} or give --shard i/n",
                            max.unwrap_or(0),
                            c.saturating_sub(1)
                        )))
                    }
                    (Some(c), _) => c,
                    (None, Some(r)) => r,
                    (None, None) => {
                        return Err(err(format!(
                            "{SLURM_ARRAY_TASK_ID} is set but neither \
                             {SLURM_ARRAY_TASK_COUNT} nor {SLURM_ARRAY_TASK_MAX} is"
                        )))
                    }
                };
                Some(((id - min) / step, parts))
            }
        };
        let kube = number(JOB_COMPLETION_INDEX)?;
        let (index, parts, source) = match (slurm, kube) {
            (None, None) => {
                return Err(err(format!(
                    "no scheduler environment found: expected {SLURM_ARRAY_TASK_ID} with \
                     {SLURM_ARRAY_TASK_COUNT} (or {SLURM_ARRAY_TASK_MIN}/{SLURM_ARRAY_TASK_MAX}) \
                     from a Slurm job array, or {JOB_COMPLETION_INDEX} with {L2S_SHARD_COUNT} \
                     (or --shard auto/N) from a Kubernetes Indexed Job; give --shard i/n otherwise"
                )))
            }
            (Some((i, n)), None) => (i, n, "the Slurm job array"),
            (None, Some(i)) => {
                let n = match (env_count, count) {
                    (Some(e), Some(c)) if e != c as u64 => {
                        return Err(err(format!(
                            "{L2S_SHARD_COUNT}={e} disagrees with auto/{c}"
                        )))
                    }
                    (Some(e), _) => e,
                    (None, Some(c)) => c as u64,
                    (None, None) => {
                        return Err(err(format!(
                            "{JOB_COMPLETION_INDEX}={i} is set but the number of parts is not: \
                             set {L2S_SHARD_COUNT} to the Job's completions or give --shard auto/N"
                        )))
                    }
                };
                (i, n, "the Kubernetes Indexed Job")
            }
            (Some((si, sn)), Some(ki)) => {
                if si != ki || env_count.is_some_and(|e| e != sn) {
                    return Err(err(format!(
                        "both a Slurm job array ({SLURM_ARRAY_TASK_ID}: part {} of {sn}) and a \
                         Kubernetes Indexed Job ({JOB_COMPLETION_INDEX}={ki}{}) are in the \
                         environment and disagree; unset one or give --shard i/n",
                        si + 1,
                        env_count.map_or(String::new(), |e| format!(", {L2S_SHARD_COUNT}={e}"))
                    )));
                }
                (si, sn, "Slurm and Kubernetes")
            }
        };
        if let Some(c) = count {
            if c as u64 != parts {
                return Err(err(format!(
                    "{source} has {parts} parts, not the {c} asked for"
                )));
            }
        }
        let parts_usize = usize::try_from(parts).map_err(|_| err(format!("{parts} parts")))?;
        let index_usize = usize::try_from(index).map_err(|_| err(format!("index {index}")))?;
        Self::new(index_usize.saturating_add(1), parts_usize).map_err(|e| {
            err(format!(
                "{source} gives part {} of {parts}: {}",
                index.saturating_add(1),
                e.reason
            ))
        })
    }

    /// [`from_env_with`](Self::from_env_with) over the process's environment.
    pub fn from_env(count: Option<usize>) -> Result<Self, ParseShardError> {
        Self::from_env_with(count, |name| std::env::var(name).ok())
    }
}

impl FromStr for ShardSpec {
    type Err = ParseShardError;

    /// `"i/n"`, or `"auto"` / `"auto/n"`: read from the scheduler's environment
    /// ([`ShardSpec::from_env`]).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseShardError {
            text: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        if trimmed == "auto" {
            return Self::from_env(None);
        }
        if let Some(n) = trimmed.strip_prefix("auto/") {
            let n = n
                .trim()
                .parse::<usize>()
                .map_err(|_| err(format!("{:?} is not a whole number", n.trim())))?;
            return Self::from_env(Some(n));
        }
        let (i, n) = text.split_once('/').ok_or_else(|| {
            err("expected i/n, e.g. 2/4 for the second of four parts, or auto".into())
        })?;
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

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn auto(count: Option<usize>, pairs: &[(&str, &str)]) -> Result<ShardSpec, ParseShardError> {
        ShardSpec::from_env_with(count, env(pairs))
    }

    #[test]
    fn auto_reads_a_slurm_job_array() {
        // sbatch --array=0-2: ids 0, 1, 2.
        for id in 0..3 {
            let id = id.to_string();
            let s = auto(
                None,
                &[
                    ("SLURM_ARRAY_TASK_ID", &id),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "2"),
                    ("SLURM_ARRAY_TASK_STEP", "1"),
                ],
            )
            .unwrap();
            assert_eq!(
                s.to_string(),
                format!("{}/3", id.parse::<usize>().unwrap() + 1)
            );
        }
        // sbatch --array=1-4 without COUNT: index = ID − MIN, count = MAX − MIN + 1.
        let s = auto(
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "4"),
            ],
        )
        .unwrap();
        assert_eq!(s, ShardSpec::new(4, 4).unwrap());
        // sbatch --array=1-7:2: ids 1, 3, 5, 7 are parts 1…4.
        let s = auto(
            Some(4),
            &[
                ("SLURM_ARRAY_TASK_ID", "5"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "7"),
                ("SLURM_ARRAY_TASK_STEP", "2"),
            ],
        )
        .unwrap();
        assert_eq!(s.to_string(), "3/4");
    }

    #[test]
    fn auto_reads_a_kubernetes_indexed_job() {
        let s = auto(
            None,
            &[("JOB_COMPLETION_INDEX", "0"), ("L2S_SHARD_COUNT", "2")],
        )
        .unwrap();
        assert_eq!(s.to_string(), "1/2");
        let s = auto(Some(5), &[("JOB_COMPLETION_INDEX", "4")]).unwrap();
        assert_eq!(s.to_string(), "5/5");
        let e = auto(None, &[("JOB_COMPLETION_INDEX", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("L2S_SHARD_COUNT") && e.contains("auto/N"), "{e}");
        let e = auto(
            Some(3),
            &[("JOB_COMPLETION_INDEX", "1"), ("L2S_SHARD_COUNT", "2")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("L2S_SHARD_COUNT=2 disagrees with auto/3"), "{e}");
        let e = auto(
            None,
            &[("JOB_COMPLETION_INDEX", "2"), ("L2S_SHARD_COUNT", "2")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("part 3 of 2"), "{e}");
        let e = auto(
            None,
            &[("JOB_COMPLETION_INDEX", "x"), ("L2S_SHARD_COUNT", "2")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("JOB_COMPLETION_INDEX=\"x\" is not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn auto_refuses_an_ambiguous_environment() {
        let e = auto(None, &[]).unwrap_err();
        assert_eq!(e.text, "auto");
        let e = e.to_string();
        for name in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "JOB_COMPLETION_INDEX",
            "L2S_SHARD_COUNT",
        ] {
            assert!(e.contains(name), "{e}");
        }
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "2"),
        ];
        // Both, agreeing: accepted.
        let both: Vec<_> = slurm
            .iter()
            .copied()
            .chain([("JOB_COMPLETION_INDEX", "1"), ("L2S_SHARD_COUNT", "3")])
            .collect();
        assert_eq!(auto(None, &both).unwrap().to_string(), "2/3");
        // Both, disagreeing on the index or the count: refused, naming both.
        for k in [
            [("JOB_COMPLETION_INDEX", "0"), ("L2S_SHARD_COUNT", "3")],
            [("JOB_COMPLETION_INDEX", "1"), ("L2S_SHARD_COUNT", "4")],
        ] {
            let both: Vec<_> = slurm.iter().copied().chain(k).collect();
            let e = auto(None, &both).unwrap_err().to_string();
            assert!(
                e.contains("SLURM_ARRAY_TASK_ID")
                    && e.contains("JOB_COMPLETION_INDEX")
                    && e.contains("disagree"),
                "{e}"
            );
        }
        // A count on the command line that the array does not have.
        let e = auto(Some(2), &slurm).unwrap_err().to_string();
        assert!(e.contains("has 3 parts, not the 2 asked for"), "{e}");
        // A list array (--array=0,4,9): three tasks over a range of ten ids.
        let e = auto(
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "9"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not one evenly stepped range"), "{e}");
        // Pieces missing.
        let e = auto(
            None,
            &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "0")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX"),
            "{e}"
        );
        let e = auto(
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "2"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_MIN is not"), "{e}");
    }

    #[test]
    fn auto_parses_its_count() {
        let e = "auto/x".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(e.contains("\"x\" is not a whole number"), "{e}");
    }
}
