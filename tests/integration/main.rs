//! Integration tests: the real pipeline with real parts (see util.rs).

mod broker;
mod broker_security;
mod cli;
mod contracts;
mod crash;
mod damage;
mod disk;
mod downlink;
mod durability;
mod faults;
mod frontdoor;
mod interop;
mod metrics;
mod offline;
mod pipeline;
mod pki;
mod rules;
mod systemd;
mod tls;
mod util;
