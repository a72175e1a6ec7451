//! What a new `servers.yaml` changes, computed without touching anything.
//!
//! The supervisor applies the [`Diff`]: added servers start, removed ones drain and stop, changed ones
//! restart (a connector kicks its clients with a reason first, so they reconnect through the gate), and the
//! master settings that can change live do. [`watch`] turns file saves into reload commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pomelo_proto::config::{MasterConfig, ServerSpec};
use tokio::sync::mpsc;

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

/// Master settings that differ and only take effect when the master restarts.
pub fn needs_master_restart(old: &MasterConfig, new: &MasterConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.host != new.host || old.control_port != new.control_port {
        out.push("host/controlPort");
    }
    if old.admin != new.admin {
        out.push("admin");
    }
    if old.admin_token != new.admin_token {
        out.push("adminToken");
    }
    if old.run_dir != new.run_dir {
        out.push("runDir");
    }
    if old.heartbeat_interval != new.heartbeat_interval {
        out.push("heartbeatInterval (running workers keep the old one until restarted)");
    }
    out
}

/// Sends a unit on `tx` whenever `file` is written, created, renamed into place or removed, debounced
/// so one save (editors write, rename and chmod) gives one message. Watches the directory, because an
/// editor that saves by rename replaces the file the watch was on. Returns the watcher; drop it to stop.
pub fn watch(file: &Path, tx: mpsc::Sender<()>) -> notify::Result<impl Drop> {
    use notify::RecursiveMode;
    use notify_debouncer_full::{new_debouncer, DebounceEventResult};
    let file: PathBuf = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = file.file_name().map(|n| n.to_os_string());
    let mut debouncer = new_debouncer(Duration::from_millis(300), None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let touched = events.iter().any(|e| e.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name));
        if touched {
            // A reload is already queued if this fails: one is enough.
            let _ = tx.try_send(());
        }
    })?;
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pomelo_proto::config::{Topology, DEFAULT_ENV};

    fn servers(text: &str) -> Vec<ServerSpec> {
        Topology::parse(Path::new("s.yaml"), text, DEFAULT_ENV).expect("valid").servers
    }

    #[test]
    fn diff_sorts_servers_into_added_removed_changed() {
        let old =
            servers("servers:\n  chat:\n    - {id: a, port: 0}\n    - {id: b, port: 0}\n    - {id: c, port: 0}\n");
        let new = servers(
            "servers:\n  chat:\n    - {id: a, port: 0}\n    - {id: c, port: 0, env: {X: '1'}}\n    - {id: d, port: 0}\n",
        );
        let d = diff(&old, &new);
        assert_eq!(d.added, ["d"]);
        assert_eq!(d.removed, ["b"]);
        assert_eq!(d.changed, ["c"]);
        assert_eq!(d.unchanged, 1);
        assert_eq!(d.summary(), "added: d; removed: b; restarted: c; unchanged: 1");
    }

    #[tokio::test]
    async fn a_save_by_rename_is_seen_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("servers.yaml");
        std::fs::write(&file, "a").expect("write");
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch(&file, tx).expect("watch");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tmp = dir.path().join(".servers.yaml.swp");
        std::fs::write(&tmp, "b").expect("write tmp");
        std::fs::rename(&tmp, &file).expect("rename");
        tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.expect("seen").expect("open");
        // Another file in the directory is not a reload.
        std::fs::write(dir.path().join("other.txt"), "x").expect("write");
        assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv()).await.is_err());
    }
}
