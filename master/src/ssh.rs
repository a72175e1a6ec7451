//! Starting and stopping workers on other hosts with OpenSSH (the `ssh` binary, as Pomelo did).
//!
//! [`spawn`] runs `ssh -o BatchMode=yes [settings] -- HOST 'cd DIR && exec BIN worker --id ID --type T
//! --spec-stdin ARGS'` and writes one JSON line on ssh's stdin: the worker spec and the server's key. So
//! nothing secret is on a command line, in `ps` or in an environment on either host. The session lives as
//! long as the remote worker; its stdout and stderr are pumped into `logs/<id>.log` like a local child's,
//! and its exit (ssh exits with the remote status, 255 when the host cannot be reached) is reported on the
//! same channel as a local child's. The ssh process is a child of the master in its own process group,
//! so the master may signal it; the remote worker is never signalled by number from here.
//!
//! [`kill`] is the fallback for a worker that does not answer `Stop` on its control link: over ssh, it
//! checks that the remote pid is still `pomelo-rs worker ... --id ID` and only then sends it SIGKILL.
//! Its ssh runs on the task tracker, bounded by [`KILL_TIMEOUT`].

use std::process::Stdio;
use std::time::Duration;

use pomelo_proto::config::{SshTarget, WorkerSpec};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::child::Exited;
use crate::logs::LogSink;
use crate::view::ExitStatus;

/// How long the verified remote kill may take before it is abandoned.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The line a worker started with `--spec-stdin` reads first.
#[derive(Debug, Serialize, Deserialize)]
pub struct StdinSpec {
    pub spec: WorkerSpec,
    /// The server key (hex), never the cluster secret.
    pub key: String,
    /// This spawn's cluster TLS material (JSON, as in `POMELO_TLS` for a local worker), when TLS is on.
    #[serde(default)]
    pub tls: Option<String>,
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `ssh` with the settings for `host`, ready for the remote command.
fn ssh(t: &SshTarget, host: &str, remote: String) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-T"]);
    if let Some(user) = &t.user {
        cmd.arg("-l").arg(user);
    }
    if let Some(id) = &t.identity {
        cmd.arg("-i").arg(id);
    }
    for o in &t.options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg("--").arg(host).arg(remote);
    cmd
}

/// The remote command that starts the worker (everything quoted; values were checked by the config).
pub fn remote_command(t: &SshTarget, spec: &WorkerSpec) -> String {
    let s = &spec.server;
    let bin = t.bin.as_deref().unwrap_or("pomelo-rs");
    let mut line = String::new();
    if let Some(dir) = &t.dir {
        line.push_str(&format!("cd {} && ", quote(dir)));
    }
    line.push_str(&format!("exec {} worker --id {} --type {} --spec-stdin", quote(bin), quote(&s.id), s.server_type));
    for a in &s.args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    line
}

/// Starts the worker `given` describes on `host`, handing it `given` on stdin; returns the pid of the
/// local ssh process.
pub fn spawn(
    t: &SshTarget,
    host: &str,
    given: &StdinSpec,
    sink: LogSink,
    exits: mpsc::Sender<Exited>,
    tasks: &TaskTracker,
) -> std::io::Result<u32> {
    let spec = &given.spec;
    let mut line = serde_json::to_vec(given)?;
    line.push(b'\n');
    let mut cmd = ssh(t, host, remote_command(t, spec));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("ssh exited before its pid was read"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let id = spec.server.id.clone();
        tasks.spawn(async move {
            // Bounded: a host that never reads its stdin must not keep this task.
            match tokio::time::timeout(Duration::from_secs(30), stdin.write_all(&line)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(server = %id, "could not hand the spec to ssh: {e}"),
                Err(_) => tracing::warn!(server = %id, "ssh did not take the spec within 30s"),
            }
            // Dropping stdin closes it: the worker has read its one line.
        });
    }
    if let Some(out) = child.stdout.take() {
        tasks.spawn(sink.clone().pump(out));
    }
    if let Some(err) = child.stderr.take() {
        tasks.spawn(sink.pump(err));
    }
    let id = spec.server.id.clone();
    tasks.spawn(async move {
        let status = match child.wait().await {
            Ok(st) => match st.code() {
                Some(255) => {
                    tracing::warn!(server = %id, "ssh exited with 255: the host is unreachable or refused the login");
                    ExitStatus::Code { code: 255 }
                }
                Some(code) => ExitStatus::Code { code },
                None => ExitStatus::Unknown,
            },
            Err(e) => {
                tracing::error!(server = %id, "waiting for ssh (pid {pid}) failed: {e}");
                ExitStatus::Unknown
            }
        };
        let _ = exits.send(Exited { id, pid, status }).await;
    });
    Ok(pid)
}

/// The remote script of [`kill`]: SIGKILL `pid` only if it is still the worker of `id`.
pub fn kill_script(id: &str, pid: u32) -> String {
    format!(
        "c=$(tr '\\0' ' ' </proc/{pid}/cmdline 2>/dev/null) || exit 0; case \"$c\" in *' worker --id {id} '*) \
         kill -KILL {pid};; *) echo 'pid {pid} is no longer the worker of {id}; not signalled' >&2;; esac",
        id = id.replace(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)), "")
    )
}

/// Kills the worker of `id` (remote `pid`) on `host`, after checking over ssh that the pid is still it.
pub fn kill(t: &SshTarget, host: &str, id: &str, pid: u32, tasks: &TaskTracker) {
    let mut cmd = ssh(t, host, kill_script(id, pid));
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let (id, host) = (id.to_string(), host.to_string());
    tasks.spawn(async move {
        match tokio::time::timeout(KILL_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {
                let note = String::from_utf8_lossy(&out.stderr);
                tracing::info!(server = %id, "ssh {host}: kill of pid {pid} done {}", note.trim());
            }
            Ok(Ok(out)) => tracing::warn!(server = %id, "ssh {host}: kill of pid {pid} failed ({})", out.status),
            Ok(Err(e)) => tracing::warn!(server = %id, "cannot run ssh to kill pid {pid} on {host}: {e}"),
            Err(_) => tracing::warn!(server = %id, "ssh {host}: kill of pid {pid} timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_reaches_the_remote_shell() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        let s = kill_script("chat-1;rm", 42);
        assert!(s.contains("--id chat-1rm ") && s.contains("kill -KILL 42"));
    }
}
