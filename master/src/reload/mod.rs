//! Reload, in one place: [`diff`] says what a new `servers.yaml` changes (pure), [`triggers`] turns file
//! saves and SIGHUP into reload commands. The supervisor's core applies a diff (`supervisor::core`).

pub mod diff;
pub mod triggers;

pub use diff::{diff, Diff, MasterChanges};
