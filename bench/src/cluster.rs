//! The cluster under test, seen from outside: its master's admin API (through
//! `pomelo_master::admin_client`) for the gate's address and every server's pid, state and stats,
//! and CPU time and RSS of any pid through `pomelo_master::procstat`. Blocking std I/O with timeouts; no tasks.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, Context};
use pomelo_master::{admin_client, procstat};
use serde::Serialize;
use serde_json::Value;

/// A running cluster's admin endpoint: the admin client the CLI uses.
pub type Admin = admin_client::Master;

/// The master running for `config`: its address from `master.json` in `run_dir`, its token found as the
/// CLI finds it (`adminToken` in servers.yaml, `POMELO_ADMIN_TOKEN`, then the run directory's file).
pub fn admin(config: &Path, run_dir: &Path) -> anyhow::Result<Admin> {
    admin_client::in_run_dir(config, run_dir)
        .with_context(|| format!("cannot find the cluster's master (run directory {})", run_dir.display()))
}

/// `/api/servers`.
pub fn servers(admin: &Admin) -> anyhow::Result<Value> {
    admin.get("/api/servers")
}

/// One process of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Proc {
    pub id: String,
    pub kind: String,
    pub pid: u32,
}

/// The master and every server with a pid, from an `/api/servers` answer.
pub fn procs(view: &Value) -> Vec<Proc> {
    let mut out = Vec::new();
    if let Some(pid) = view["master"]["pid"].as_u64() {
        out.push(Proc { id: "master".into(), kind: "master".into(), pid: pid as u32 });
    }
    for s in view["servers"].as_array().into_iter().flatten() {
        if let (Some(id), Some(kind), Some(pid)) = (s["id"].as_str(), s["type"].as_str(), s["pid"].as_u64()) {
            out.push(Proc { id: id.into(), kind: kind.into(), pid: pid as u32 });
        }
    }
    out
}

/// Servers of the view that are not `running`.
pub fn not_running(view: &Value) -> Vec<String> {
    view["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["state"] != "running")
        .map(|s| format!("{}={}", s["id"].as_str().unwrap_or("?"), s["state"]))
        .collect()
}

/// The gate's client address.
pub fn gate_addr(view: &Value) -> anyhow::Result<SocketAddr> {
    let gate = view["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["type"] == "gate" && s["state"] == "running")
        .ok_or_else(|| anyhow!("no running gate"))?;
    let addr = gate["addrs"]["client"].as_str().ok_or_else(|| anyhow!("the gate reports no client address"))?;
    Ok(addr.parse()?)
}

/// CPU seconds (user + system) and RSS bytes of a pid; `None` once it is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

pub fn usage(pid: u32) -> Option<Usage> {
    procstat::sample(pid).map(|s| Usage { cpu_secs: s.cpu_seconds, rss_bytes: s.rss_bytes })
}

/// Summed usage of several pids (missing ones count zero).
pub fn total(pids: impl IntoIterator<Item = u32>) -> Usage {
    pids.into_iter().filter_map(usage).fold(Usage::default(), |a, u| Usage {
        cpu_secs: a.cpu_secs + u.cpu_secs,
        rss_bytes: a.rss_bytes + u.rss_bytes,
    })
}

/// Busy and total CPU seconds of the whole machine.
pub use pomelo_master::procstat::machine_cpu;

/// `nproc` and MemTotal, for the report.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| Some(c.lines().find(|l| l.starts_with("model name"))?.split(':').nth(1)?.trim().to_string()));
    serde_json::json!({"nproc": cpus, "mem_total_kib": mem_kib, "cpu_model": model})
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_readable() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.rss_bytes > 0);
        assert!(usage(u32::MAX).is_none());
    }

    #[test]
    fn view_parsing() {
        let v = serde_json::json!({"master": {"pid": 10}, "servers": [
            {"id": "gate-1", "type": "gate", "pid": 11, "state": "running", "addrs": {"client": "127.0.0.1:4000"}},
            {"id": "chat-1", "type": "chat", "pid": null, "state": "backoff"}]});
        assert_eq!(procs(&v).len(), 2);
        assert_eq!(gate_addr(&v).unwrap().port(), 4000);
        assert_eq!(not_running(&v), ["chat-1=\"backoff\""]);
    }
}
