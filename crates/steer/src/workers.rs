//! Running independent jobs (one image each) on several threads while their results are consumed
//! in job order, so output files and progress look exactly as in a one-thread run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::error::Result;

/// Runs `work(worker, job)` on every job with up to `workers` threads (`worker` in
/// `0..workers`: which thread runs the job, e.g. to pick that thread's device) and hands each
/// result to `sink` in job order (results that finish early wait in a buffer). The first
/// error — from a job or from the sink — stops the remaining jobs and is returned.
pub fn run_ordered<J, R>(
    jobs: &[J],
    workers: usize,
    work: impl Fn(usize, &J) -> Result<R> + Sync,
    mut sink: impl FnMut(usize, R) -> Result<()>,
) -> Result<()>
where
    J: Sync,
    R: Send,
{
    if workers <= 1 || jobs.len() <= 1 {
        for (k, job) in jobs.iter().enumerate() {
            sink(k, work(0, job)?)?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<R>)>();
        for worker in 0..workers.min(jobs.len()) {
            let tx = tx.clone();
            let (work, next, stop) = (&work, &next, &stop);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= jobs.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                if tx.send((k, work(worker, &jobs[k]))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, R> = BTreeMap::new();
        let mut expected = 0;
        let mut outcome = Ok(());
        for (k, result) in rx {
            if outcome.is_err() {
                continue; // drain until the workers notice the stop flag
            }
            match result {
                Ok(r) => {
                    waiting.insert(k, r);
                    while let Some(r) = waiting.remove(&expected) {
                        if let Err(e) = sink(expected, r) {
                            outcome = Err(e);
                            break;
                        }
                        expected += 1;
                    }
                }
                Err(e) => outcome = Err(e),
            }
            if outcome.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
        }
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Later jobs finish first (they sleep less), yet the sink sees every result in job order.
    #[test]
    fn results_arrive_in_job_order() {
        let jobs: Vec<u64> = (0..12).collect();
        for workers in [1, 3, 8] {
            let mut seen = Vec::new();
            run_ordered(
                &jobs,
                workers,
                |worker, &j| {
                    assert!(worker < workers);
                    std::thread::sleep(Duration::from_millis(2 * (12 - j)));
                    Ok(j * j)
                },
                |k, r| {
                    seen.push((k, r));
                    Ok(())
                },
            )
            .unwrap();
            let want: Vec<(usize, u64)> = jobs.iter().map(|&j| (j as usize, j * j)).collect();
            assert_eq!(seen, want, "{workers} workers");
        }
    }

    #[test]
    fn the_first_error_stops_the_run() {
        let jobs: Vec<u32> = (0..200).collect();
        let ran = AtomicUsize::new(0);
        let e = run_ordered(
            &jobs,
            2,
            |_, &j| {
                ran.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
                if j == 5 {
                    crate::error::bail!("job 5 broke")
                }
                Ok(j)
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "job 5 broke");
        assert!(
            ran.load(Ordering::Relaxed) < 200,
            "the remaining jobs were not stopped"
        );
        // A sink error stops it too.
        let e = run_ordered(
            &jobs,
            2,
            |_, &j| Ok(j),
            |k, _| {
                if k == 3 {
                    crate::error::bail!("disk full")
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }
}
