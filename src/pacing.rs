//! Send pacing for an uplink: token buckets for events/s and bytes/s, so a
//! gateway returning from an outage drains its backlog at a rate the cloud
//! was sized for, instead of as fast as the link allows.

use std::time::Duration;

use tokio::time::Instant;

/// One token bucket. Refills at `rate` per second up to `burst`; may go
/// into debt (a large event is sent whole), which delays what follows.
/// Also the trace's rate cap (`ops::trace`).
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Bucket {
        // A tenth of a second of traffic, at least one event's worth.
        Bucket::with_burst(rate, (rate / 10.0).max(1.0), now)
    }

    /// Full, holding `burst` tokens.
    pub(crate) fn with_burst(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Take one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }

    /// When at least `need` tokens will be there.
    fn ready_at(&self, need: f64) -> Instant {
        if self.tokens >= need {
            self.at
        } else {
            self.at + Duration::from_secs_f64((need - self.tokens) / self.rate)
        }
    }
}

/// Pacing of one upstream; unlimited when neither rate is set.
#[derive(Debug, Clone)]
pub struct Pacer {
    events: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Pacer {
    /// `events_per_sec` and `bytes_per_sec`: 0 means no limit.
    pub fn new(events_per_sec: u64, bytes_per_sec: u64) -> Pacer {
        let now = Instant::now();
        let bucket = |r: u64| (r > 0).then(|| Bucket::new(r as f64, now));
        Pacer {
            events: bucket(events_per_sec),
            bytes: bucket(bytes_per_sec),
        }
    }

    pub fn is_limited(&self) -> bool {
        self.events.is_some() || self.bytes.is_some()
    }

    /// How many events may be sent now (up to `want`); 0 means wait until
    /// [`ready_at`](Self::ready_at).
    pub fn allowance(&mut self, want: usize) -> usize {
        let now = Instant::now();
        let mut allowed = want;
        if let Some(b) = &mut self.events {
            b.refill(now);
            allowed = allowed.min(b.tokens.max(0.0).floor() as usize);
        }
        if let Some(b) = &mut self.bytes {
            b.refill(now);
            if b.tokens < 1.0 {
                allowed = 0;
            }
        }
        allowed
    }

    /// When sending may resume (`None` if unlimited).
    pub fn ready_at(&self) -> Option<Instant> {
        let e = self.events.as_ref().map(|b| b.ready_at(1.0));
        let b = self.bytes.as_ref().map(|b| b.ready_at(1.0));
        e.into_iter().chain(b).max()
    }

    /// Account for one event of `size` bytes sent.
    pub fn spend(&mut self, size: usize) {
        if let Some(b) = &mut self.events {
            b.tokens -= 1.0;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= size as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn events_are_paced_to_the_rate_after_a_small_burst() {
        let mut p = Pacer::new(100, 0);
        // Burst: a tenth of a second's worth.
        assert_eq!(p.allowance(1000), 10);
        for _ in 0..10 {
            p.spend(50);
        }
        assert_eq!(p.allowance(1000), 0);
        let wait = p.ready_at().unwrap() - Instant::now();
        assert_eq!(wait, Duration::from_millis(10));
        // Over one second, 100 more.
        let mut sent = 0;
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            let n = p.allowance(1000);
            for _ in 0..n {
                p.spend(50);
            }
            sent += n;
            tokio::time::sleep_until(
                p.ready_at()
                    .unwrap()
                    .max(Instant::now() + Duration::from_millis(1)),
            )
            .await;
        }
        assert!((99..=101).contains(&sent), "{sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_rate_lets_a_large_event_through_and_then_waits() {
        let mut p = Pacer::new(0, 1000);
        // The byte bucket does not know sizes in advance: the uplink asks
        // again before each event after the first.
        assert_eq!(p.allowance(5), 5);
        p.spend(5000);
        assert_eq!(p.allowance(1), 0);
        assert_eq!(p.allowance(5), 0);
        // 100 bytes of burst minus 5000: 4.9 s until a token is back.
        let wait = p.ready_at().unwrap() - Instant::now();
        assert_eq!(wait.as_millis(), 4901);
        assert!(!Pacer::new(0, 0).is_limited());
    }
}
