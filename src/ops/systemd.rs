//! systemd notifications (`Type=notify`): READY=1 once the broker listens
//! and the queue is open, STATUS= kept current, WATCHDOG=1 only while the
//! pipeline answers, STOPPING=1 on shutdown. Without `NOTIFY_SOCKET` (not
//! under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// The broker listens and the queue is open.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line state shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The pipeline answered a liveness probe.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Shutting down: systemd waits up to TimeoutStopSec.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog interval systemd expects pings within, if it set one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
