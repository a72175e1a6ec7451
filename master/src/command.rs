//! What the admin API, the CLI and the reload triggers ask of the supervisor, and what it answers.
//!
//! A [`Command`] travels with a [`Reply`] on the supervisor's bounded command channel (see
//! [`crate::MasterHandle::command`]); the supervisor answers every command exactly once. Nothing here owns
//! a task: this module exists so that the triggers and the dashboard need not import the supervisor.

use tokio::sync::oneshot;

/// What the API asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start(String),
    Stop(String),
    Restart(String),
    /// Re-read servers.yaml and apply it, whether or not its content changed (SIGHUP, `pomelo-rs reload`,
    /// `POST /api/reload`).
    Reload,
    /// The file watcher saw a write: re-read servers.yaml and apply it only if its content differs from the
    /// last content read, so reading the file (or a second event for one save) never reloads.
    ReloadIfChanged,
    /// Stop everything and end the master.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no server `{0}` in servers.yaml")]
    UnknownServer(String),
    #[error("`{0}` is already stopping")]
    AlreadyStopping(String),
    #[error("`{0}` is already {1}")]
    AlreadyThere(String, &'static str),
    #[error("the master is shutting down")]
    ShuttingDown,
    #[error("{0}\nnothing was changed; the cluster runs as before")]
    InvalidConfig(String),
}

/// Where the answer to one command goes.
pub type Reply = oneshot::Sender<Result<String, CommandError>>;

/// The answer to [`Command::ReloadIfChanged`] when the file's content is what was last read.
pub const UNCHANGED: &str = "servers.yaml unchanged: nothing to do";
