//! The rules of the [`Core`] for servers the master does not run as local children: those started over
//! ssh on another host, and those a platform starts (`supervise: external`). Pure, like the rest.
//!
//! For an ssh server, `server.pid` is the local ssh process while its session lives (`ssh_pid`), which the
//! master started and may signal; the pid the worker registers with (`remote_pid`) is a number on another
//! host and is only ever named to that host's own `kill`, after a check there (`Effect::RemoteKill`).
//! - The session ends while the worker is still linked (it outlived a dropped ssh connection, or a worker
//!   from an earlier session rejoined): the server stays up, now known by its remote pid.
//! - The link closes with no session: the worker is gone as far as the master can tell: handled as an exit
//!   (restart with backoff and the intensity limit, as for a local child).
//! - Killing (hung, stop grace over): the link is closed, the session's ssh is killed, and the remote pid
//!   is killed over ssh if it is still that worker; with no session, the exit is taken as done at once.
//!
//! External servers are never spawned or signalled: a stop asks over the link (`Stop`) and their platform
//! restarts them; `worker --join` fetches their spec from the master (see `Core::join_spec`), then they
//! register like any worker.

use std::time::Instant;

use nix::sys::signal::Signal;
use pomelo_proto::config::Launch;
use pomelo_proto::control::Stats;

use super::core::{Core, Effect, Out};
use super::server::ExitStatus;
use crate::procstat::ProcSample;

/// The figures a worker reports about its own process (`/proc/self` on its host).
pub(super) fn reported_proc(stats: &Stats, rates: &crate::view::Rates) -> ProcSample {
    let get = |k: &str| stats.get(k).copied().unwrap_or(0.0);
    ProcSample {
        cpu_seconds: get("process_cpu_seconds_total"),
        cpu_percent: rates.current.get("process_cpu_seconds_total").copied().unwrap_or(0.0) * 100.0,
        rss_bytes: get("process_resident_memory_bytes") as u64,
        open_fds: get("process_open_fds") as u64,
    }
}

impl Core {
    /// An ssh session ended while its worker is still linked: keep the server, known by its remote pid.
    /// Returns whether the exit was handled so.
    pub(super) fn ssh_session_ended(&mut self, i: usize, pid: u32, out: &mut Out) -> bool {
        let slot = &mut self.slots[i];
        if slot.ssh_pid != Some(pid) || slot.link.is_none() || slot.remote_pid.is_none() {
            return false;
        }
        slot.ssh_pid = None;
        slot.server.pid = slot.remote_pid;
        let msg = format!("ssh session ended; the worker (pid {} there) is still linked", slot.remote_pid.unwrap_or(0));
        tracing::info!(server = %slot.server.spec.id, "{msg}");
        self.event(i, msg, out);
        true
    }

    /// A non-local server's link closed: with no ssh session left, that is its exit.
    pub(super) fn remote_closed(&mut self, id: &str, now: Instant, out: &mut Out) {
        let Some(i) = self.index(id) else { return };
        let slot = &self.slots[i];
        if slot.server.spec.launch() == Launch::Local || slot.ssh_pid.is_some() {
            return;
        }
        if let Some(pid) = slot.server.pid {
            self.on_exited(id, pid, ExitStatus::Unknown, now, out);
        }
    }

    /// `Action::Kill` for a non-local server.
    pub(super) fn remote_kill(&mut self, i: usize, out: &mut Out) {
        let slot = &mut self.slots[i];
        let spec = slot.server.spec.clone();
        if let Some(conn) = slot.link.take() {
            out.push(Effect::Close { conn });
            slot.server.on_unregistered();
        }
        if spec.launch() == Launch::Ssh {
            if let Some(pid) = slot.remote_pid {
                out.push(Effect::RemoteKill {
                    host: spec.host.clone(),
                    ssh: self.topo.master.ssh.for_host(&spec.host),
                    id: spec.id.clone(),
                    pid,
                });
            }
        }
        match (slot.ssh_pid, slot.server.pid) {
            // The session's exit comes back as the server's exit.
            (Some(ssh), _) => out.push(Effect::Signal { pid: ssh, signal: Signal::SIGKILL }),
            (None, Some(pid)) => {
                let id = spec.id.clone();
                let status = ExitStatus::Signal { signal: Signal::SIGKILL as i32, name: "SIGKILL".into() };
                self.on_exited(&id, pid, status, self.now, out);
            }
            (None, None) => {}
        }
    }
}
