//! The [`Core`]'s commands (start, stop, restart, shutdown), its reload apply and the [`ClusterView`] it
//! publishes; pure like the rest of the core.
//!
//! A reload gets the file's content, read by the shell. Unless it is forced (SIGHUP, `pomelo-rs reload`,
//! `POST /api/reload`), content whose hash matches the last content read changes nothing, so reading the
//! file or a second event for one save never reloads. An invalid file changes nothing and is shown until a
//! valid one arrives. Otherwise the [`Diff`](crate::reload::Diff) is applied: removed servers stop and are
//! forgotten, changed ones restart with their new spec, added ones start (one removed a moment ago and
//! still stopping comes back with its new spec once it has exited), and the master settings that can change
//! live do, [`MasterChanges`] keeping the others.

use std::time::Instant;

use pomelo_proto::config::{ConfigError, ConfigErrors, Topology};
use pomelo_proto::control::ServerType;

use super::core::{text_hash, Core, Out, Slot, SHUTDOWN_SLACK};
use super::server::{AfterStop, Phase};
use crate::command::{Command, CommandError, UNCHANGED};
use crate::reload::{diff, MasterChanges};
use crate::view::{ClusterView, MasterView, ServerView};

impl Core {
    pub(super) fn on_command(&mut self, cmd: Command, now: Instant, out: &mut Out) -> Result<String, CommandError> {
        if self.shutting_down() {
            return Err(CommandError::ShuttingDown);
        }
        let cfg = self.topo.master.clone();
        let find = |core: &Core, id: &str| core.index(id).ok_or_else(|| CommandError::UnknownServer(id.to_string()));
        let (i, actions, done) = match cmd {
            Command::Shutdown => {
                self.begin_shutdown(now, out);
                return Ok("stopping every server, then the master".into());
            }
            Command::Reload | Command::ReloadIfChanged => {
                // The shell turns these into `Event::Reload` with the file's content.
                return Err(CommandError::InvalidConfig("a reload needs the file's content".into()));
            }
            Command::Start(id) => {
                let i = find(self, &id)?;
                match self.slots[i].server.phase() {
                    Phase::Running | Phase::Starting => return Err(CommandError::AlreadyThere(id, "running")),
                    _ => (i, self.slots[i].server.start(now, &cfg), "starting"),
                }
            }
            Command::Stop(id) => {
                let i = find(self, &id)?;
                match self.slots[i].server.phase() {
                    Phase::Stopping => return Err(CommandError::AlreadyStopping(id)),
                    Phase::Stopped => return Err(CommandError::AlreadyThere(id, "stopped")),
                    _ => (i, self.slots[i].server.stop(now, &cfg, AfterStop::Stay), "stopping"),
                }
            }
            Command::Restart(id) => {
                let i = find(self, &id)?;
                match self.slots[i].server.phase() {
                    Phase::Stopping => return Err(CommandError::AlreadyStopping(id)),
                    _ => (i, self.slots[i].server.restart(now, &cfg), "restarting"),
                }
            }
        };
        self.event(i, format!("{done} (asked through the admin API)"), out);
        self.apply(i, actions, out);
        Ok(format!("{} is {done}", self.slots[i].server.spec.id))
    }

    pub(super) fn begin_shutdown(&mut self, now: Instant, out: &mut Out) {
        if self.shutting_down() {
            return;
        }
        tracing::info!("stopping every server");
        self.shutdown_deadline = Some(now + self.topo.master.stop_grace + SHUTDOWN_SLACK);
        let cfg = self.topo.master.clone();
        for i in 0..self.slots.len() {
            let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Stay);
            self.apply(i, actions, out);
        }
    }

    pub(super) fn reload(
        &mut self,
        forced: bool,
        text: Result<String, String>,
        now: Instant,
        out: &mut Out,
    ) -> Result<String, CommandError> {
        let hash = text.as_deref().ok().map(text_hash);
        if !forced && hash == self.last_text {
            return Ok(UNCHANGED.into());
        }
        self.last_text = hash;
        self.reloads += 1;
        if !forced {
            tracing::info!("servers.yaml changed: reloading");
        }
        let file = self.topo.file.clone();
        let parsed = match text {
            Ok(text) => Topology::parse(&file, &text, &self.topo.env),
            Err(e) => Err(ConfigErrors {
                file,
                errors: vec![ConfigError { line: None, path: String::new(), message: format!("cannot read it: {e}") }],
            }),
        };
        let new = match parsed {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!("{msg}\nnothing was changed; the cluster runs as before");
                self.config_error = Some(msg.clone());
                return Err(CommandError::InvalidConfig(msg));
            }
        };
        self.config_error = None;
        let d = diff(&self.topo.servers, &new.servers);
        let (master, fixed) = MasterChanges::apply(&self.topo.master, &new.master);
        if !fixed.is_empty() {
            tracing::warn!("changed in servers.yaml but only applied when the master restarts: {}", fixed.summary());
        }
        self.topo.master = master;
        self.topo.servers.clone_from(&new.servers);
        let cfg = self.topo.master.clone();
        for id in &d.removed {
            if let Some(i) = self.index(id) {
                let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Remove);
                self.apply(i, actions, out);
            }
        }
        for id in &d.changed {
            let (Some(i), Some(spec)) = (self.index(id), new.server(id)) else { continue };
            let slot = &mut self.slots[i];
            if slot.server.spec.launch() != spec.launch() && !slot.server.is_down_for_good() {
                // Stopped as it was started (a signal only to a child of ours), started the new way.
                slot.pending = Some(spec.clone());
            } else {
                slot.server.spec = spec.clone();
                slot.pending = None;
            }
            // Any server: one on another host restarts over ssh, an external one is asked to exit
            // and fetches its new spec when its platform starts it again.
            if !self.slots[i].server.is_down_for_good() {
                self.event(i, "changed in servers.yaml: restarting".into(), out);
                let actions = self.slots[i].server.restart(now, &cfg);
                self.apply(i, actions, out);
            }
        }
        for id in &d.added {
            let Some(spec) = new.server(id) else { continue };
            // A server removed a moment ago and still stopping comes back with its new spec.
            if let Some(i) = self.index(id) {
                let slot = &mut self.slots[i];
                if slot.server.spec.launch() != spec.launch() && slot.server.pid.is_some() {
                    slot.pending = Some(spec.clone());
                } else {
                    slot.server.spec = spec.clone();
                }
                let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Restart);
                self.apply(i, actions, out);
                continue;
            }
            // Started wherever it lives: a child here, over ssh on its host, or awaited from its platform.
            self.slots.push(Slot::new(spec.clone()));
            let i = self.slots.len() - 1;
            // A disk chat server added while others run (or added back after a removal, its old file still
            // on its host) must not continue rooms they have owned meanwhile.
            let chats_live = self.membership.servers.iter().any(|s| s.server_type == ServerType::Chat);
            self.slots[i].rooms_moved = self.slots[i].keeps_disk_history() && chats_live;
            let actions = self.slots[i].server.start(now, &cfg);
            self.apply(i, actions, out);
        }
        // Membership follows file order; servers on their way out go last.
        let order = |id: &str| new.servers.iter().position(|s| s.id == id).unwrap_or(usize::MAX);
        self.slots.sort_by_key(|s| order(&s.server.spec.id));
        let mut summary = d.summary();
        if !fixed.is_empty() {
            summary.push_str(&format!("; not applied until the master restarts: {}", fixed.summary()));
        }
        tracing::info!("servers.yaml applied: {summary}");
        Ok(summary)
    }

    /// What the dashboard and API show, numbered `seq`.
    pub fn view(&self, now: Instant, seq: u64) -> ClusterView {
        ClusterView {
            seq,
            master: MasterView {
                pid: self.setup.master_pid,
                env: self.topo.env.clone(),
                config: self.topo.file.clone(),
                control_addr: self.setup.control_addr.to_string(),
                admin_addr: self.setup.admin_addr.to_string(),
                uptime_secs: now.duration_since(self.started).as_secs_f64(),
                config_error: self.config_error.clone(),
                cpu_seconds: self.master_proc.cpu_seconds,
                rss_bytes: self.master_proc.rss_bytes,
                open_fds: self.master_proc.open_fds,
                max_fds: crate::procstat::open_files_limit(),
            },
            servers: self.slots.iter().map(|s| server_view(s, now)).collect(),
        }
    }
}

fn server_view(s: &Slot, now: Instant) -> ServerView {
    let spec = &s.server.spec;
    ServerView {
        id: spec.id.clone(),
        server_type: spec.server_type,
        host: spec.host.clone(),
        supervisor: spec.launch().as_str().into(),
        port: spec.port,
        client_port: spec.client_port,
        addrs: s.addrs.clone(),
        state: s.server.phase(),
        pid: match spec.launch() {
            pomelo_proto::config::Launch::Local => s.server.pid,
            _ => s.server.pid.and(s.remote_pid),
        },
        ssh_pid: s.ssh_pid,
        adopted: s.adopted,
        uptime_secs: s.server.uptime(now).map(|d| d.as_secs_f64()),
        restarts: s.server.restarts.total,
        last_exit: s.server.last_exit.clone(),
        cpu_percent: s.proc.cpu_percent,
        cpu_seconds: s.proc.cpu_seconds,
        rss_bytes: s.proc.rss_bytes,
        open_fds: s.proc.open_fds,
        stats: s.stats.clone(),
        rates: s.rates.current.clone(),
    }
}
