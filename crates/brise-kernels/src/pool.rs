//! A thread pool for the hundreds of short parallel kernels of each forward pass.
//!
//! `run` hands a closure to every worker and runs share 0 on the calling thread. Idle
//! workers spin for a short while (a token's kernels arrive microseconds apart), then
//! park, so an idle engine costs no CPU.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

type Job = &'static (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    remaining: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: Vec<AtomicBool>,
    spin: Duration,
}

// SAFETY: `job` is written only by the dispatching thread while it holds the dispatch
// lock and no worker is reading it (every worker has finished the previous epoch), and
// read by workers only after they observe the new epoch (Acquire/Release on `epoch`).
unsafe impl Sync for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
    dispatch: Mutex<()>,
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        Self::with_spin(n_threads, Duration::from_micros(500))
    }

    pub fn with_spin(n_threads: usize, spin: Duration) -> ThreadPool {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: (1..n).map(|_| AtomicBool::new(false)).collect(),
            spin,
        });
        let mut handles = Vec::new();
        for i in 1..n {
            let sh = shared.clone();
            let h = thread::Builder::new()
                .name(format!("brise-worker-{i}"))
                .spawn(move || worker(sh, i))
                .expect("spawn worker thread");
            handles.push(h);
        }
        let threads = handles.iter().map(|h| h.thread().clone()).collect();
        ThreadPool {
            shared,
            threads,
            handles,
            dispatch: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `f(i)` for every thread index `i` in `0..n_threads()` and returns when all
    /// are done. Panics (after all threads finished) if any share panicked.
    pub fn run<F: Fn(usize) + Sync>(&self, f: F) {
        if self.handles.is_empty() {
            f(0);
            return;
        }
        let _guard = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let sh = &*self.shared;
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the reference is erased to 'static only for the duration of this call:
        // we do not return before every worker has decremented `remaining`, after which
        // no worker touches the job again until the next epoch.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        // SAFETY: see `impl Sync for Shared`.
        unsafe { *sh.job.get() = Some(job) };
        sh.remaining.store(self.handles.len(), Ordering::Relaxed);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, t) in self.threads.iter().enumerate() {
            if sh.sleeping[i].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while sh.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        // SAFETY: all workers are done with the job.
        unsafe { *sh.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, Ordering::SeqCst) {
            panic!("a worker thread panicked in a parallel kernel");
        }
    }
}

fn worker(sh: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = sh.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if sh.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || start.elapsed() < sh.spin {
                std::hint::spin_loop();
                continue;
            }
            sh.sleeping[idx - 1].store(true, Ordering::SeqCst);
            // Re-check after announcing sleep: the dispatcher bumps the epoch before it
            // looks at `sleeping` (both SeqCst), so one of us sees the other.
            if sh.epoch.load(Ordering::SeqCst) == seen && !sh.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            sh.sleeping[idx - 1].store(false, Ordering::SeqCst);
        }
        // SAFETY: the job was published before the epoch we just observed.
        let job = unsafe { *sh.job.get() };
        if let Some(job) = job
            && catch_unwind(AssertUnwindSafe(|| job(idx))).is_err()
        {
            sh.panicked.store(true, Ordering::SeqCst);
        }
        sh.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The `i`-th of `parts` nearly equal contiguous ranges of `0..n`, each a multiple of
/// `align` except the last.
pub fn split_range(n: usize, parts: usize, i: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let per = units / parts;
    let extra = units % parts;
    let start = i * per + i.min(extra);
    let len = per + usize::from(i < extra);
    (start * align).min(n)..((start + len) * align).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_share_once() {
        for n in 1..5 {
            let pool = ThreadPool::new(n);
            // More threads than this 2-core machine has only get a few rounds.
            let rounds = if n <= 2 { 1000 } else { 20 };
            for _ in 0..rounds {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn wakes_parked_workers() {
        let pool = ThreadPool::with_spin(3, Duration::from_micros(10));
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            let c = AtomicUsize::new(0);
            pool.run(|_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 3);
        }
    }

    #[test]
    fn worker_panic_is_reported_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(|i| assert!(i != 1, "boom"))));
        assert!(r.is_err());
        let c = AtomicUsize::new(0);
        pool.run(|_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(c.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_covers_range() {
        for n in [0usize, 1, 7, 64, 100, 1000] {
            for parts in 1..5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split_range(n, parts, i, 8);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
