//! The rules of `servers.yaml` that span several keys: master settings that depend on each other
//! ([`check_master`]) and ids and ports that must be unique across the servers and the master's own
//! listeners ([`check_unique`]). They add to the same [`Ctx`], so their problems are listed with every
//! other one, each at its line. Pure; no I/O.

use std::collections::HashMap;

use super::locate::Seg;
use super::walk::{child, Ctx};
use super::{MasterConfig, ServerSpec};

/// Checks the master settings that depend on each other.
pub(super) fn check_master(ctx: &mut Ctx, m: &MasterConfig, path: &[Seg]) {
    let r = &m.restart;
    if r.backoff_max < r.backoff_initial {
        ctx.err(&child(&child(path, "restart"), "backoffMax"), "must not be shorter than backoffInitial");
    }
    if r.max_restarts == 0 {
        ctx.err(&child(&child(path, "restart"), "maxRestarts"), "must be at least 1");
    }
    if m.heartbeat_interval.is_zero() {
        ctx.err(&child(path, "heartbeatInterval"), "must be longer than 0s");
    }
    if m.heartbeat_timeout <= m.heartbeat_interval {
        ctx.err(&child(path, "heartbeatTimeout"), "must be longer than heartbeatInterval");
    }
    if m.orphan_timeout < m.heartbeat_timeout {
        ctx.err(&child(path, "orphanTimeout"), "must not be shorter than heartbeatTimeout");
    }
}

/// Duplicate ids and ports across the servers and the master's own listeners.
pub(super) fn check_unique(ctx: &mut Ctx, master: &MasterConfig, servers: &[(ServerSpec, Vec<Seg>)], mpath: &[Seg]) {
    let mut ids: HashMap<&str, &[Seg]> = HashMap::new();
    let norm = |h: &str| if super::is_local_host(h) { "local".to_string() } else { h.to_string() };
    let mut ports: HashMap<(String, u16), String> = HashMap::new();
    if master.control_port != 0 {
        ports.insert((norm(&master.host), master.control_port), "the master's controlPort".into());
    }
    if master.admin.port() != 0 {
        let host = master.admin.ip().to_string();
        ports.entry((norm(&host), master.admin.port())).or_insert_with(|| "the master's admin address".into());
        if master.admin.port() == master.control_port && super::is_local_host(&master.host) {
            ctx.err(&child(mpath, "admin"), "uses the same port as controlPort");
        }
    }
    for (s, path) in servers {
        if let Some(first) = ids.get(s.id.as_str()) {
            let line = ctx.index.line_of(first).map(|l| format!(" at line {l}")).unwrap_or_default();
            ctx.err(&child(path, "id"), format!("duplicate id `{}` (first used{line})", s.id));
        } else {
            ids.insert(&s.id, path);
        }
        for (field, port) in [("port", s.port), ("clientPort", s.client_port)] {
            let Some(port) = port.filter(|p| *p != 0) else { continue };
            let owner = format!("{} `{}`", field, s.id);
            if let Some(first) = ports.get(&(norm(&s.host), port)) {
                ctx.err(&child(path, field), format!("port {port} is already used by {first}"));
            } else {
                ports.insert((norm(&s.host), port), owner);
            }
        }
    }
}
