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
    /// Set when any share of the current job panics, so shares waiting at a barrier
    /// give up instead of waiting forever.
    abort: AtomicBool,
    bar_count: AtomicUsize,
    bar_gen: AtomicU64,
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
            abort: AtomicBool::new(false),
            bar_count: AtomicUsize::new(0),
            bar_gen: AtomicU64::new(0),
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
        sh.abort.store(false, Ordering::Relaxed);
        sh.bar_count.store(0, Ordering::Relaxed);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, t) in self.threads.iter().enumerate() {
            if sh.sleeping[i].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        if mine.is_err() {
            sh.abort.store(true, Ordering::SeqCst);
        }
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
        let worker_panicked = sh.panicked.swap(false, Ordering::SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a worker thread panicked in a parallel kernel");
        }
    }
}

impl ThreadPool {
    /// Called by every share of a job the same number of times: returns once all have
    /// reached it, and what each wrote before is visible to all after (a job's phases,
    /// such as quantizing its own rows and then reading everyone's, in one section
    /// instead of two). Panics if another share panicked, which would never arrive.
    pub fn barrier(&self) {
        let n = self.n_threads();
        if n == 1 {
            return;
        }
        let sh = &*self.shared;
        let generation = sh.bar_gen.load(Ordering::Acquire);
        if sh.bar_count.fetch_add(1, Ordering::AcqRel) + 1 == n {
            // Reset before the release: a share leaving this barrier for the next one
            // sees the count at zero.
            sh.bar_count.store(0, Ordering::Relaxed);
            sh.bar_gen.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while sh.bar_gen.load(Ordering::Acquire) == generation {
            if sh.abort.load(Ordering::Relaxed) {
                panic!("another share of this parallel kernel panicked");
            }
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
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
            sh.abort.store(true, Ordering::SeqCst);
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
    fn barrier_orders_phases() {
        for n in 1..4 {
            let pool = ThreadPool::new(n);
            for _ in 0..200 {
                let slots: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let bad = AtomicUsize::new(0);
                pool.run(|i| {
                    for phase in 1..4 {
                        slots[i].store(phase, Ordering::Relaxed);
                        pool.barrier();
                        // Every share has written this phase, none the next one yet.
                        if slots.iter().any(|s| s.load(Ordering::Relaxed) != phase) {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        pool.barrier();
                    }
                });
                assert_eq!(bad.load(Ordering::Relaxed), 0);
            }
        }
    }

    #[test]
    fn barrier_after_a_panic_does_not_hang() {
        let pool = ThreadPool::new(2);
        for bad in 0..2 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(|i| {
                    assert!(i != bad, "boom");
                    pool.barrier();
                })
            }));
            assert!(r.is_err());
        }
        let c = AtomicUsize::new(0);
        pool.run(|_| {
            pool.barrier();
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
