//! Starting and signalling worker processes.
//!
//! A worker is this same binary run as `pomelo-rs worker --id ID --type TYPE [args]`, in its own process
//! group (so Ctrl-C in the master's terminal reaches only the master, and a stop reaches the worker and
//! anything it started). Its spec travels as JSON in `POMELO_WORKER_SPEC`. tokio reaps the child: one task
//! per child waits for it and reports the exit to the supervisor; nothing else calls `waitpid`. That task and
//! the two output pumps run on the master's task tracker and end when the child exits.

use std::path::Path;
use std::process::Stdio;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use pomelo_proto::config::WorkerSpec;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::logs::LogSink;
use crate::view::ExitStatus;

/// The environment variable a worker reads its spec from.
pub const SPEC_ENV: &str = "POMELO_WORKER_SPEC";
/// The environment variable a worker reads its server key from (`pomelo_proto::auth::server_key`, hex):
/// never the cluster secret.
pub const KEY_ENV: &str = "POMELO_SERVER_KEY";

/// Reported when a child exits.
#[derive(Debug)]
pub struct Exited {
    pub id: String,
    pub pid: u32,
    pub status: ExitStatus,
}

/// Spawns a worker; its exit is sent on `exits`, its output drained into `sink`.
pub fn spawn(
    exe: &Path,
    spec: &WorkerSpec,
    server_key: &str,
    tls: Option<&str>,
    sink: LogSink,
    exits: mpsc::Sender<Exited>,
    tasks: &TaskTracker,
) -> std::io::Result<u32> {
    let s = &spec.server;
    let json = serde_json::to_string(spec).map_err(std::io::Error::other)?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--id")
        .arg(&s.id)
        .arg("--type")
        .arg(s.server_type.as_str())
        .args(&s.args)
        .envs(&s.env)
        // The admin token is the master's alone: a worker (or anything it runs) never sees it.
        .env_remove("POMELO_ADMIN_TOKEN")
        .env(SPEC_ENV, json)
        .env(KEY_ENV, server_key)
        .env_remove(pomelo_proto::tls::TLS_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(material) = tls {
        cmd.env(pomelo_proto::tls::TLS_ENV, material);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("the child exited before its pid was read"))?;
    if let Some(out) = child.stdout.take() {
        tasks.spawn(sink.clone().pump(out));
    }
    if let Some(err) = child.stderr.take() {
        tasks.spawn(sink.pump(err));
    }
    let id = s.id.clone();
    tasks.spawn(async move {
        let status = match child.wait().await {
            Ok(st) => exit_status(st),
            Err(e) => {
                tracing::error!(server = %id, "waiting for pid {pid} failed: {e}");
                ExitStatus::Unknown
            }
        };
        // The supervisor may be gone at shutdown; nothing to report to then.
        let _ = exits.send(Exited { id, pid, status }).await;
    });
    Ok(pid)
}

fn exit_status(st: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = st.code() {
        ExitStatus::Code { code }
    } else if let Some(sig) = st.signal() {
        let name = Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"));
        ExitStatus::Signal { signal: sig, name }
    } else {
        ExitStatus::Unknown
    }
}

/// Sends `sig` to the process group led by `pid` (workers lead their own group).
pub fn signal_group(pid: u32, sig: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if raw <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(raw), sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!("cannot send {sig} to process group {pid}: {e}");
        }
    }
}

// The /proc readers live in `procstat`; these names stay for the callers that know them from here.
pub use crate::procstat::{alive, cmdline};

/// Whether `pid` is a pomelo-rs worker for server `id`.
pub fn is_worker(pid: u32, id: &str) -> bool {
    let args = cmdline(pid);
    alive(pid) && args.get(1).is_some_and(|a| a == "worker") && args.windows(2).any(|w| w[0] == "--id" && w[1] == id)
}

/// Whether `pid` is this cluster's worker for `id`, so a new master may adopt (and later signal) it: a
/// worker for `id` by its command line, running `exe` (this binary), started at `start` (clock ticks since
/// boot, as `workers.json` recorded it; a reused pid started later), whose spec names `run_dir` (not a
/// worker of another cluster with the same ids).
pub fn is_our_worker(pid: u32, id: &str, start: Option<u64>, exe: &Path, run_dir: &Path) -> Result<(), String> {
    if !is_worker(pid, id) {
        return Err("it is not a pomelo-rs worker for this id".into());
    }
    crate::procstat::runs(pid, exe)?;
    match (start, crate::procstat::start_ticks(pid)) {
        (Some(want), Some(got)) if want != got => {
            return Err("it started at another time than the worker recorded".into())
        }
        (Some(_), None) => return Err("its start time cannot be read".into()),
        _ => {}
    }
    let spec = crate::procstat::environ(pid)
        .and_then(|env| env.get(std::ffi::OsStr::new(SPEC_ENV)).cloned())
        .and_then(|json| serde_json::from_str::<WorkerSpec>(&json.to_string_lossy()).ok());
    match spec {
        Some(s) if crate::procstat::same_path(&s.run_dir, run_dir) => Ok(()),
        Some(s) => Err(format!("it belongs to the cluster in {}", s.run_dir.display())),
        None => Err("its spec cannot be read".into()),
    }
}
