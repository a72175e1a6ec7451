//! Carries out the core's [`Effect`]s: spawns (log sink + child process), signals, control-link sends and
//! closes, `workers.json`, and the [`ServerEvent`] feed.
//!
//! [`Effects`] holds the one piece of I/O state the core must not: the outbox of every open control link,
//! by connection number. Child tasks (output pumps, the exit wait) go on the master's [`TaskTracker`].
//! A spawn's outcome goes back to the core as an [`Event::Spawned`]. "Start a server" and "signal a
//! server" are performed only here, so another way to start one (ssh, an external platform) is a change
//! to this file, not to the rules.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use pomelo_proto::control::ToWorker;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc};
use tokio_util::task::TaskTracker;

use super::core::{Effect, Event, SpawnSpec};
use crate::child::{self, Exited};
use crate::logs::LogSink;
use crate::runstate;
use crate::view::ServerEvent;

pub(super) struct Effects {
    pub exe: PathBuf,
    pub cluster_token: String,
    /// The cluster CA when links run over TLS.
    pub tls: Option<std::sync::Arc<pomelo_proto::tls::Authority>>,
    /// Print worker output to the terminal too.
    pub echo: bool,
    pub exits: mpsc::Sender<Exited>,
    pub tasks: TaskTracker,
    pub events: broadcast::Sender<ServerEvent>,
    pub workers_file: PathBuf,
    /// The outbox of every open control link.
    pub outboxes: HashMap<u64, mpsc::Sender<ToWorker>>,
}

impl Effects {
    /// Performs `effect` (not `Reply` or `Finished`, which the loop handles); a spawn answers with an event.
    pub fn perform(&mut self, effect: Effect) -> Option<Event> {
        match effect {
            Effect::Spawn(spec) => return Some(self.spawn(*spec)),
            Effect::Signal { pid, signal } => child::signal_group(pid, signal),
            Effect::Send { conn, msg } => self.send(conn, msg),
            Effect::RemoteKill { host, ssh, id, pid } => crate::ssh::kill(&ssh, &host, &id, pid, &self.tasks),
            Effect::Close { conn } => {
                self.outboxes.remove(&conn);
            }
            Effect::Event { id, state, pid, message } => {
                let at_ms =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                // Nobody listening is fine.
                let _ = self.events.send(ServerEvent { at_ms, id, state, pid, message });
            }
            Effect::WriteWorkers(map) => self.write_workers(&map),
            Effect::Reply(_) | Effect::Finished => {}
        }
        None
    }

    fn spawn(&mut self, spec: SpawnSpec) -> Event {
        let id = spec.worker.server.id.clone();
        let result = LogSink::open(&spec.log_dir, &id, &spec.logs, self.echo)
            .and_then(|sink| {
                let key = pomelo_proto::auth::server_key(&self.cluster_token, &id).to_hex();
                let tls = match &self.tls {
                    Some(ca) => {
                        let m = ca.issue(&id, &spec.worker.server.host)?;
                        Some(serde_json::to_string(&m).map_err(std::io::Error::other)?)
                    }
                    None => None,
                };
                match &spec.ssh {
                    Some(ssh) => {
                        let host = &spec.worker.server.host;
                        let given = crate::ssh::StdinSpec { spec: spec.worker.clone(), key, tls };
                        crate::ssh::spawn(ssh, host, &given, sink, self.exits.clone(), &self.tasks)
                    }
                    None => child::spawn(
                        &self.exe,
                        &spec.worker,
                        &key,
                        tls.as_deref(),
                        sink,
                        self.exits.clone(),
                        &self.tasks,
                    ),
                }
            })
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()));
        Event::Spawned { id, result }
    }

    fn send(&mut self, conn: u64, msg: ToWorker) {
        let Some(tx) = self.outboxes.get(&conn) else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                tracing::warn!("control link {conn} is backed up; {} not sent", kind(&msg));
            }
            // The link task has ended; its `Closed` event is on the way.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    fn write_workers(&self, map: &BTreeMap<String, u32>) {
        let entries: BTreeMap<&String, runstate::WorkerEntry> = map
            .iter()
            .map(|(id, &pid)| (id, runstate::WorkerEntry::Started { pid, start: crate::procstat::start_ticks(pid) }))
            .collect();
        if let Err(e) = runstate::write_json(&self.workers_file, &entries) {
            tracing::warn!("cannot write {}: {e}", self.workers_file.display());
        }
    }
}

fn kind(msg: &ToWorker) -> &'static str {
    match msg {
        ToWorker::Challenge { .. } => "challenge",
        ToWorker::Welcome { .. } => "welcome",
        ToWorker::Rejected { .. } => "rejection",
        ToWorker::Membership(_) => "membership",
        ToWorker::Stop { .. } => "stop",
        ToWorker::Spec { .. } => "spec",
        ToWorker::HeartbeatAck => "heartbeat ack",
    }
}
