//! The process's heap: glibc's malloc tuned for a small board.
//!
//! - glibc gives each thread that allocates its own heap arena (up to eight
//!   per core), and memory freed into one is not reused by another: on a
//!   daemon with a dozen threads that is RSS for nothing. Two arenas are
//!   plenty for its contention.
//! - glibc keeps memory freed below the top of a heap for reuse, so after a
//!   burst (a backlog arriving, a drain) RSS would stay at its peak although
//!   the events are long on disk or upstream; on a gateway RSS is what the
//!   operator watches and what the OOM killer counts. `malloc_trim(0)`
//!   returns every whole free page of every arena to the kernel; run every
//!   few seconds it costs well under a millisecond.
//!
//! Elsewhere (musl, other systems) both are no-ops.

use std::time::Duration;

use tokio::sync::watch;

/// How often freed heap pages are given back.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Limits glibc to two malloc arenas. Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives freed heap pages back to the kernel every few seconds until shutdown.
pub async fn trim_periodically(mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // It walks the arenas' free lists under their locks: off the workers.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
