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
//!   returns every whole free page of every arena to the kernel. It holds
//!   each arena's lock while it walks it, so it runs only every few seconds;
//!   each call's duration is logged at debug level.
//!
//! Elsewhere (musl, other systems) neither exists and nothing runs.

use tokio::sync::watch;

/// Limits glibc to two malloc arenas. Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives freed heap pages back to the kernel every few seconds until
/// shutdown (on glibc; elsewhere it only waits for shutdown).
pub async fn trim_periodically(mut shutdown: watch::Receiver<bool>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// How often freed heap pages are given back.
        const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Not on a runtime worker: it can wait on an arena's lock.
            let _ = tokio::task::spawn_blocking(|| {
                let started = std::time::Instant::now();
                // SAFETY: malloc_trim only releases free memory; it is thread-safe.
                let released = unsafe { libc::malloc_trim(0) };
                tracing::debug!(elapsed = ?started.elapsed(), released, "heap trimmed");
            })
            .await;
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = shutdown.wait_for(|s| *s).await;
}
