//! End-to-end tests of the real `pomelo-rs` binary. One test binary, a module per area.

mod harness;
mod reload;
mod supervision;
