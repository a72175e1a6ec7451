//! End-to-end tests of the real `pomelo-rs` binary. One test binary, a module per area.

mod adoption;
mod chat;
mod check_client;
mod client_tls;
mod cluster_tls;
mod conformance;
mod crypto;
mod dashboard;
mod durability;
mod failover;
mod fuzz;
mod fuzz_cluster;
mod fuzz_frames;
mod hardening;
mod harness;
mod history;
mod hostile;
mod join;
mod limits;
mod multihost;
mod pomelo_client;
mod protobuf;
mod reload;
mod supervision;
mod trust;
