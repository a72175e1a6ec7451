//! What every pomelo-rs process shares.
//!
//! - [`config`]: the `servers.yaml` schema, its validation (every problem at once, with lines) and the
//!   validated [`config::Topology`] the master runs.
//! - [`control`]: the messages between the master and its workers on the control port.
//! - [`framing`]: length-delimited, size-capped JSON frames used by the control link and cluster RPC.
//! - [`wire`]: Pomelo's client protocol (package and message layers), byte for byte.

pub mod cluster;
pub mod config;
pub mod control;
pub mod framing;
pub mod route;
pub mod wire;
