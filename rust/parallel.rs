//! The thread pool the kernels run in, safe across `fork()`.
//!
//! rayon's global pool cannot be rebuilt: after a process that used it forks, the child has the
//! pool's bookkeeping but none of its threads, and the first parallel call waits forever for
//! workers that do not exist (Python users fork all the time: multiprocessing, `DataLoader`
//! workers). So the bindings run every kernel through `run`, and a `pthread_atfork` child
//! handler (registered before the first kernel runs) bumps a generation counter. A process that
//! has not forked since runs the kernel directly, on rayon's global pool (no cost: a kernel
//! too small to split never wakes a pool). A forked child runs it inside `install` on a pool
//! owned here, built on first use in each generation (an older one is leaked, never touched
//! again: its locks may be held by threads that did not survive the fork). Inside `install`,
//! rayon's `par_iter`, `join` and faer's `Par::rayon` all use that pool, so the kernel modules
//! need no change. The price, in forked children only: each kernel call hands its work to the
//! pool's threads (a few microseconds), even one too small to split.
//!
//! The pool is found without a lock (one atomic load on the hot path), so a fork that happens
//! while another thread builds it cannot leave the child waiting on a mutex.
//! `RAYON_NUM_THREADS` sets its size as it would rayon's global pool's.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

use rayon::{ThreadPool, ThreadPoolBuilder};

struct Pool {
    generation: u64,
    pool: ThreadPool,
}

static POOL: AtomicPtr<Pool> = AtomicPtr::new(std::ptr::null_mut());
/// Bumped in every forked child (the pool of an older generation has no threads there).
static GENERATION: AtomicU64 = AtomicU64::new(0);
static AT_FORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add.
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

#[cfg(unix)]
fn register_at_fork() {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> i32;
    }
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic; it stays valid for the
        // life of the process (a static function).
        unsafe { pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
}

#[cfg(not(unix))]
fn register_at_fork() {}

/// The pool of this process, built on first use (and again after a fork).
fn pool() -> &'static ThreadPool {
    register_at_fork();
    let generation = GENERATION.load(Ordering::SeqCst);
    let current = POOL.load(Ordering::Acquire);
    // SAFETY: a published `Pool` is never freed (see `publish`), so the reference is 'static.
    if let Some(p) = unsafe { current.as_ref() } {
        if p.generation == generation {
            return &p.pool;
        }
    }
    publish(current, generation)
}

#[cold]
fn publish(current: *mut Pool, generation: u64) -> &'static ThreadPool {
    let built = ThreadPoolBuilder::new()
        .thread_name(|i| format!("forgetcore-{i}"))
        .build()
        .unwrap_or_else(|e| panic!("forgetcore: cannot start the kernel thread pool: {e}"));
    let fresh = Box::into_raw(Box::new(Pool {
        generation,
        pool: built,
    }));
    match POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // Leaked on purpose: a pool from before a fork must never be dropped (its threads are
        // gone), and one per process generation is all that is ever built.
        // SAFETY: `fresh` came from Box::into_raw and is now published, never freed.
        Ok(_) => &unsafe { &*fresh }.pool,
        Err(winner) => {
            // Another thread published first; keep its pool, drop ours (its threads exist).
            // SAFETY: `fresh` was never published; `winner` is published and never freed.
            drop(unsafe { Box::from_raw(fresh) });
            let w = unsafe { &*winner };
            if w.generation == generation {
                &w.pool
            } else {
                publish(winner, generation)
            }
        }
    }
}

/// Whether this process is a child forked after the handler was registered.
fn forked() -> bool {
    register_at_fork();
    GENERATION.load(Ordering::SeqCst) != 0
}

/// Run a kernel: directly (rayon's global pool) unless this process is a forked child, then on
/// this generation's owned pool. Every binding calls its kernels through this.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if forked() {
        install(f)
    } else {
        f()
    }
}

/// Run `f` on this generation's owned pool: every rayon call inside it uses that pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// The number of threads the kernels use.
pub fn num_threads() -> usize {
    if forked() {
        pool().current_num_threads()
    } else {
        rayon::current_num_threads()
    }
}

/// Case count of a property test: `PROPTEST_CASES` when set (the long run of `make test-slow`),
/// else `default`, sized so that `cargo test` stays within the CI budget.
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        cases,
        ..proptest::test_runner::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn runs_in_the_owned_pool() {
        let name = install(|| std::thread::current().name().map(str::to_owned));
        assert!(name.unwrap().starts_with("forgetcore-"));
        let s: u64 = install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 499_500);
        assert_eq!(run(|| 7), 7);
        assert!(num_threads() >= 1);
    }

    #[test]
    fn a_new_generation_gets_a_new_pool() {
        let a = pool() as *const ThreadPool;
        assert_eq!(a, pool() as *const ThreadPool);
        after_fork_in_child();
        let b = pool() as *const ThreadPool;
        assert_ne!(a, b);
        let s: u64 = install(|| (0..100u64).into_par_iter().sum());
        assert_eq!(s, 4950);
        // In a "forked" process every kernel runs on the owned pool.
        let name = run(|| std::thread::current().name().map(str::to_owned));
        assert!(name.unwrap().starts_with("forgetcore-"));
    }
}
