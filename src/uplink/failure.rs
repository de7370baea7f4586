//! How an uplink session failed: the label of `edgeferry_uplink_failures_total`.

/// What kind of trouble an uplink had: the label of
/// `edgeferry_uplink_failures_total`, for alerts that tell a certificate
/// problem from a network one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TLS handshake or certificate verification.
    Tls,
    /// The broker refused the CONNECT (bad credentials, not authorised,
    /// client id rejected).
    Refused,
    /// TCP could not connect, or name resolution failed.
    Unreachable,
    /// The link went quiet (keep-alive) or was reset after connecting.
    Lost,
    /// Connected and answering pings, but no PUBACK for a few keep-alives
    /// while publishes were outstanding.
    Stalled,
}

// The counters are sized without knowing this type.
const _: () = assert!(FailureKind::ALL.len() == crate::metrics::FAILURE_KINDS);

impl FailureKind {
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Tls,
        FailureKind::Refused,
        FailureKind::Unreachable,
        FailureKind::Lost,
        FailureKind::Stalled,
    ];

    /// Its place in [`FailureKind::ALL`] (and in `failures`).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Tls => "tls",
            FailureKind::Refused => "refused",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Lost => "lost",
            FailureKind::Stalled => "stalled",
        }
    }
}
