//! The wait between connection attempts.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": each delay is drawn from
/// the upper half of the current step, so a fleet that lost the same cloud
/// does not reconnect in lockstep.
#[derive(Debug)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    pub(super) fn reset(&mut self) {
        self.step = self.min;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps = [100u64, 200, 400, 800, 1000, 1000];
        for ms in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(ms);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} not within [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
