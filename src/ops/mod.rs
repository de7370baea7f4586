//! Operations: how the daemon talks to its service manager.

pub mod systemd;
