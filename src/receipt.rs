//! Receipts: how the front door learns that an event it has not yet
//! acknowledged to its sensor is safe.
//!
//! A QoS 1 or 2 publish gets one receipt when the front door reads it. The
//! receipt travels with the event into the router, which gives a copy to
//! every queue row made from the event and settles its own once the event
//! is routed. The queue writer settles a row's copy when the row is
//! committed, acknowledged by its upstream from RAM, or disposed of by a
//! policy the operator chose (a full queue's overflow rule, a TTL). When
//! the last copy is gone the connection hears about it, once.
//!
//! A copy dropped without being settled (a row lost to a failed final
//! commit, an append to a queue that stopped, a path nobody thought of)
//! marks the receipt failed: the sensor then gets no acknowledgement and
//! its connection is closed, so its session sends the event again. The
//! default is "not safe", so a forgotten path costs a duplicate, never a
//! lost event that a sensor was told was received.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

/// What the connection hears: the receipt's number and whether the event
/// is safe.
pub type Outcome = (u64, bool);

/// One copy of a receipt.
pub struct Receipt {
    /// Shared by every copy; its drop reports the outcome.
    inner: Arc<Inner>,
    /// Set by [`Receipt::settle`]; an unsettled copy fails the receipt.
    settled: bool,
}

struct Inner {
    /// The number the connection gave the publish (its position in the
    /// connection's acknowledgement order).
    seq: u64,
    /// Some copy was dropped unsettled.
    failed: AtomicBool,
    /// The connection's outcomes. Unbounded, but never more than the
    /// connection's in-flight window of receipts exists at once.
    to: mpsc::UnboundedSender<Outcome>,
}

impl Receipt {
    /// A receipt whose outcome is sent to `to` as `(seq, safe)`.
    pub fn new(seq: u64, to: mpsc::UnboundedSender<Outcome>) -> Receipt {
        Receipt {
            inner: Arc::new(Inner {
                seq,
                failed: AtomicBool::new(false),
                to,
            }),
            settled: false,
        }
    }

    /// This copy's part is done: the event (or the row) is safe as far as
    /// its holder is concerned.
    pub fn settle(mut self) {
        self.settled = true;
    }
}

impl Clone for Receipt {
    /// Another holder's copy (a queue row); it too must be settled.
    fn clone(&self) -> Receipt {
        Receipt {
            inner: self.inner.clone(),
            settled: false,
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        if !self.settled {
            self.inner.failed.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The connection may be gone (its sensor disconnected): nobody to tell.
        let _ = self
            .to
            .send((self.seq, !self.failed.load(Ordering::Relaxed)));
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receipt({})", self.inner.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_is_sent_once_when_the_last_copy_is_settled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = Receipt::new(7, tx);
        let a = r.clone();
        let b = r.clone();
        r.settle();
        a.settle();
        assert!(rx.try_recv().is_err(), "a copy is still out");
        b.settle();
        assert_eq!(rx.try_recv().unwrap(), (7, true));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_copy_dropped_unsettled_fails_the_receipt() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = Receipt::new(3, tx);
        let lost = r.clone();
        r.settle();
        drop(lost);
        assert_eq!(rx.try_recv().unwrap(), (3, false));
    }
}
