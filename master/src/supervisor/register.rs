//! Registration, adoption and membership rules of the [`Core`]: who may join on the control port, and
//! when a membership is announced. Pure, like the rest of the core: the one liveness fact a rule needs
//! (is the pid we hold for this id still alive?) comes in with the event.
//!
//! Only workers that proved their id's key reach the core (`crate::control` checks the handshake).
//! A registration is refused, in this order, for: a master shutting down; an id not
//! in servers.yaml; the wrong server type; another live pid already serving the id; a local server this
//! master holds no process for (it is stopped, failed or backing off here). Otherwise the worker gets a
//! `Welcome` and the link replaces any earlier one; a worker running an older spec is restarted.
//!
//! Adoption: a master started beside live workers of an earlier one announces nothing until every adopted
//! worker has registered or is gone, or until the adoption deadline (the heartbeat timeout, at least 3 s).
//! So no worker ever sees a membership that lacks a live server only because it has not re-registered
//! yet. At the deadline the missing ones are treated as a crash would be: the start deadline kills them,
//! their exit restarts them, and the membership is announced without them.

use std::time::Instant;

use pomelo_proto::auth;
use pomelo_proto::config::Launch;
use pomelo_proto::control::{ServerInfo, ServerType, ToWorker};

use super::core::{Core, Effect, Out, Registration};
use super::server::Phase;

impl Core {
    pub(super) fn on_registered(&mut self, reg: Registration, holder_alive: bool, now: Instant, out: &mut Out) {
        let Registration { conn, id, server_type, pid, spec_hash, addrs, peer, peer_local, host_addrs } = reg;
        let reject = |why: String, out: &mut Out| {
            // Logged before the token is known good: the id is the peer's text.
            tracing::warn!(server = %pomelo_proto::link::printable(&id), "refused registration of pid {pid} from {peer}: {why}");
            out.push(Effect::Send { conn, msg: ToWorker::Rejected { reason: why } });
            out.push(Effect::Close { conn });
        };
        if self.shutting_down() {
            return reject("the master is shutting down".into(), out);
        }
        let Some(i) = self.index(&id) else {
            return reject(format!("`{id}` is not in {}", self.topo.file.display()), out);
        };
        let slot = &mut self.slots[i];
        if slot.server.spec.server_type != server_type {
            return reject(format!("`{id}` is a {} server in servers.yaml", slot.server.spec.server_type), out);
        }
        if let Err(why) = pomelo_proto::peer::fits(&slot.server.spec.host, peer.ip(), peer_local, &host_addrs) {
            return reject(why, out);
        }
        let local = slot.server.spec.launch() == Launch::Local;
        if !local {
            // Another host: the first worker linked keeps the id; a worker we lost may come back.
            let host = slot.server.spec.host.clone();
            if let Some(p) = slot.remote_pid.filter(|p| *p != pid && slot.link.is_some()) {
                return reject(format!("pid {p} on {host} already serves `{id}`"), out);
            }
            let phase = slot.server.phase();
            let ours = slot.remote_pid == Some(pid);
            if slot.server.pid.is_none() {
                match phase {
                    Phase::Backoff | Phase::Starting => {}
                    // Its platform, not this master, decides whether an external server comes back.
                    Phase::Failed if ours || slot.server.spec.launch() == Launch::External => {}
                    _ => return reject(format!("`{id}` is {} here", phase.as_str()), out),
                }
                let deadline = now + self.topo.master.start_timeout;
                slot.server.adopt(pid, now, deadline);
                if phase == Phase::Failed {
                    tracing::info!(server = %id, "pid {pid} on {host} came back: it serves again");
                }
            }
            slot.remote_pid = Some(pid);
        } else {
            match slot.server.pid {
                Some(p) if p != pid && holder_alive => return reject(format!("pid {p} already serves `{id}`"), out),
                // A local server's pid is the one this master spawned or adopted after checking it: a
                // registration never names another process for the master to signal later.
                Some(p) if p != pid => {
                    return reject(
                        format!("pid {pid} is not the process this master started for `{id}` (pid {p})"),
                        out,
                    );
                }
                None => return reject(format!("`{id}` is {} here", slot.server.phase().as_str()), out),
                _ => {}
            }
            if slot.server.pid != Some(pid) {
                slot.server.on_spawned(pid, now);
            }
        }
        let welcome = ToWorker::Welcome {
            master_pid: self.setup.master_pid,
            heartbeat_interval_ms: self.topo.master.heartbeat_interval.as_millis() as u64,
        };
        out.push(Effect::Send { conn, msg: welcome });
        // While adopted workers are awaited, a worker keeps the membership it has.
        if self.adopting.is_none() && self.announced {
            out.push(Effect::Send { conn, msg: ToWorker::Membership(self.membership.clone()) });
        }
        let slot = &mut self.slots[i];
        if let Some(old) = slot.link.replace(conn) {
            out.push(Effect::Close { conn: old });
        }
        slot.addrs = addrs;
        slot.awaiting = false;
        slot.rooms_moved = false;
        let changed = slot.spec_hash.as_deref() != Some(spec_hash.as_str()) && slot.adopted;
        let stale = spec_hash != slot.server.spec.fingerprint();
        slot.spec_hash = Some(spec_hash);
        let actions = slot.server.on_registered(now);
        self.apply(i, actions, out);
        if self.slots[i].adopted && changed {
            self.event(i, format!("adopted pid {pid} from an earlier master"), out);
        }
        if stale {
            let msg = "runs an older servers.yaml entry: restarting it".to_string();
            tracing::info!(server = %id, "{msg}");
            self.event(i, msg, out);
            let actions = self.slots[i].server.restart(now, &self.topo.master);
            self.apply(i, actions, out);
        }
        out.push(self.workers());
    }

    /// Ends the adoption wait once every adopted worker registered or is gone, or its deadline passed.
    pub(super) fn settle_adoption(&mut self, now: Instant) {
        let Some(deadline) = self.adopting else { return };
        let missing: Vec<&str> = self.slots.iter().filter(|s| s.awaiting).map(|s| s.server.spec.id.as_str()).collect();
        if missing.is_empty() {
            tracing::info!("every adopted worker has registered: announcing the membership");
        } else if now >= deadline {
            tracing::warn!(
                "adopted workers did not register in time: {}; announcing the membership without them",
                missing.join(", ")
            );
        } else {
            return;
        }
        for slot in &mut self.slots {
            slot.awaiting = false;
        }
        self.adopting = None;
    }

    /// Sends the membership to every link when it changed (never while adopted workers are awaited).
    pub(super) fn announce(&mut self, out: &mut Out) {
        if self.adopting.is_some() {
            return;
        }
        let servers = self.live_servers();
        let chats_in = servers.iter().filter(|s| s.server_type == ServerType::Chat).count();
        // (One that never registered with this master has no rooms to lose: the first start of a cluster.)
        for slot in self.slots.iter_mut().filter(|s| s.keeps_disk_history() && s.spec_hash.is_some()) {
            if chats_in > 0 && !servers.iter().any(|s| s.id == slot.server.spec.id) {
                slot.rooms_moved = true;
            }
        }
        if self.announced && servers == self.membership.servers {
            return;
        }
        self.announced = true;
        self.membership.version += 1;
        self.membership.servers = servers;
        for conn in self.slots.iter().filter_map(|s| s.link) {
            out.push(Effect::Send { conn, msg: ToWorker::Membership(self.membership.clone()) });
        }
    }

    fn live_servers(&self) -> Vec<ServerInfo> {
        let connectors: Vec<&str> = self
            .slots
            .iter()
            .filter(|s| s.server.spec.server_type == ServerType::Connector)
            .map(|s| s.server.spec.id.as_str())
            .collect();
        let listed = |id: &str| self.membership.servers.iter().any(|s| s.id == id);
        self.slots
            .iter()
            // A chat server whose history is on its disk keeps its rooms while it restarts: they wait for it
            // (sends fail, unacknowledged) instead of moving to a server that has none of their history.
            .filter(|s| {
                (s.server.phase() == Phase::Running && s.link.is_some())
                    || (s.keeps_disk_history()
                        && listed(&s.server.spec.id)
                        && (s.server.coming_back() || s.server.phase() == Phase::Running))
            })
            .map(|s| ServerInfo {
                id: s.server.spec.id.clone(),
                server_type: s.server.spec.server_type,
                host: s.server.spec.host.clone(),
                client_host: s.server.spec.client_host.clone(),
                pid: s.server.pid.unwrap_or(0),
                addrs: s.addrs.clone(),
                link_keys: match s.server.spec.server_type {
                    ServerType::Chat => auth::wrapped_link_keys(
                        &self.setup.cluster_token,
                        &s.server.spec.id,
                        connectors.iter().copied(),
                    ),
                    _ => Default::default(),
                },
            })
            .collect()
    }
}
