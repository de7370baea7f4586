//! Operations: how the daemon talks to its service manager and to the
//! people and tools watching it.

pub mod health;
pub mod http;
pub mod logging;
pub mod memory;
pub mod process;
pub mod prometheus;
pub mod systemd;
pub mod trace;
