//! What a new `servers.yaml` changes, computed without touching anything (no tasks, no I/O).
//!
//! The supervisor's core applies the [`Diff`]: added servers start, removed ones drain and stop, changed
//! ones restart (a connector kicks its clients with a reason first, so they reconnect through the gate).
//! [`MasterChanges`] applies the master settings that can change live and keeps the others.

use pomelo_proto::config::{MasterConfig, ServerSpec};

/// Server ids by what happens to them, in file order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
}

pub fn diff(old: &[ServerSpec], new: &[ServerSpec]) -> Diff {
    let mut d = Diff::default();
    for s in new {
        match old.iter().find(|o| o.id == s.id) {
            None => d.added.push(s.id.clone()),
            Some(o) if o != s => d.changed.push(s.id.clone()),
            Some(_) => d.unchanged += 1,
        }
    }
    d.removed = old.iter().filter(|o| !new.iter().any(|s| s.id == o.id)).map(|o| o.id.clone()).collect();
    d
}

impl Diff {
    pub fn summary(&self) -> String {
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        format!(
            "added: {}; removed: {}; restarted: {}; unchanged: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            self.unchanged
        )
    }
}

/// A master setting that only takes effect when the master restarts: its name, and a function that keeps
/// the running value in the new settings and says whether the file asked for another.
type RestartOnly = (&'static str, fn(&mut MasterConfig, &MasterConfig) -> bool);

/// The one list of restart-only master settings.
const RESTART_ONLY: &[RestartOnly] = &[
    ("host/controlPort", |new, old| {
        let differs = new.host != old.host || new.control_port != old.control_port;
        new.host.clone_from(&old.host);
        new.control_port = old.control_port;
        differs
    }),
    ("admin", |new, old| std::mem::replace(&mut new.admin, old.admin) != old.admin),
    ("adminToken", |new, old| std::mem::replace(&mut new.admin_token, old.admin_token.clone()) != old.admin_token),
    ("adminHosts", |new, old| std::mem::replace(&mut new.admin_hosts, old.admin_hosts.clone()) != old.admin_hosts),
    ("clusterTls", |new, old| {
        let files = std::mem::replace(&mut new.cluster_tls_files, old.cluster_tls_files.clone());
        std::mem::replace(&mut new.cluster_tls, old.cluster_tls) != old.cluster_tls || files != old.cluster_tls_files
    }),
    ("runDir", |new, old| std::mem::replace(&mut new.run_dir, old.run_dir.clone()) != old.run_dir),
    ("heartbeatInterval (running workers keep the old one until restarted)", |new, old| {
        std::mem::replace(&mut new.heartbeat_interval, old.heartbeat_interval) != old.heartbeat_interval
    }),
];

/// The restart-only master settings a new file changed (and that were kept at their running value).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MasterChanges(pub Vec<&'static str>);

impl MasterChanges {
    /// The settings to run with after a reload: `new`, except the restart-only fields, which keep `old`'s
    /// values; and which of those the file changed.
    pub fn apply(old: &MasterConfig, new: &MasterConfig) -> (MasterConfig, MasterChanges) {
        let mut master = new.clone();
        let kept = RESTART_ONLY.iter().filter(|(_, keep)| keep(&mut master, old)).map(|(name, _)| *name).collect();
        (master, MasterChanges(kept))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> String {
        self.0.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pomelo_proto::config::{Topology, DEFAULT_ENV};
    use std::path::Path;

    fn parse(text: &str) -> Topology {
        Topology::parse(Path::new("s.yaml"), text, DEFAULT_ENV).expect("valid")
    }

    #[test]
    fn diff_sorts_servers_into_added_removed_changed() {
        let old = parse("servers:\n  chat:\n    - {id: a, port: 0}\n    - {id: b, port: 0}\n    - {id: c, port: 0}\n")
            .servers;
        let new = parse(
            "servers:\n  chat:\n    - {id: a, port: 0}\n    - {id: c, port: 0, env: {X: '1'}}\n    - {id: d, port: 0}\n",
        )
        .servers;
        let d = diff(&old, &new);
        assert_eq!(d.added, ["d"]);
        assert_eq!(d.removed, ["b"]);
        assert_eq!(d.changed, ["c"]);
        assert_eq!(d.unchanged, 1);
        assert_eq!(d.summary(), "added: d; removed: b; restarted: c; unchanged: 1");
    }

    #[test]
    fn master_changes_keep_restart_only_fields_and_apply_the_rest() {
        let old = parse("master: {admin: '127.0.0.1:1', stopGrace: 1s}\nservers: {}\n").master;
        let new = parse("master: {admin: '127.0.0.1:2', stopGrace: 2s, heartbeatInterval: 3s}\nservers: {}\n").master;
        let (run, changes) = MasterChanges::apply(&old, &new);
        assert_eq!(run.admin, old.admin, "kept");
        assert_eq!(run.heartbeat_interval, old.heartbeat_interval, "kept");
        assert_eq!(run.stop_grace, new.stop_grace, "applied live");
        assert_eq!(changes.0, ["admin", "heartbeatInterval (running workers keep the old one until restarted)"]);
        let (same, none) = MasterChanges::apply(&old, &old);
        assert_eq!(same, old);
        assert!(none.is_empty());
    }
}
