//! What every pomelo-rs process shares.
//!
//! - [`auth`]: the cluster's keys and the mutual challenge-response every control and RPC link opens with.
//! - [`cluster`]: the cluster RPC messages between connectors and chat servers, and their `J`/`D` frames.
//! - [`config`]: the `servers.yaml` schema, its validation (every problem at once, with lines) and the
//!   validated [`config::Topology`] the master runs.
//! - [`control`]: the messages between the master and its workers on the control port.
//! - [`link`]: the links between processes: one codec per link kind (size-capped length-delimited
//!   frames), the one [`link::FrameError`], JSON frames for the control link, and the accept loop.
//! - [`route`]: Pomelo's `crc32` uid routing and rendezvous hashing of a room over the chat servers.
//! - [`wire`]: Pomelo's client protocol (package and message layers), byte for byte.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod control;
pub mod files;
pub mod link;
pub mod peer;
pub mod route;
pub mod tls;
pub mod wire;
