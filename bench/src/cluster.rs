//! The cluster under test, seen from outside: its master's admin API (address in `.pomelo/master.json`,
//! bearer token in `.pomelo/admin-token`) for the gate's address and every server's pid, state and stats,
//! and CPU time and RSS of any pid through `pomelo_master::procstat`. Blocking std I/O with timeouts; no tasks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail};
use pomelo_master::{procstat, runstate};
use pomelo_proto::config::{Topology, DEFAULT_ENV};
use serde::Serialize;
use serde_json::Value;

/// A running cluster's admin endpoint.
#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: String,
}

impl Admin {
    /// The master running for `config`: its address from `master.json` in `run_dir`, its token found as
    /// the CLI finds it (`adminToken` in servers.yaml, `POMELO_ADMIN_TOKEN`, then the run directory's file).
    pub fn of(config: &Path, run_dir: &Path) -> anyhow::Result<Admin> {
        let master = runstate::read_master(run_dir).ok_or_else(|| {
            anyhow!("no master.json in {}: is a cluster running for {}?", run_dir.display(), config.display())
        })?;
        let topology = Topology::load(config, DEFAULT_ENV).ok();
        let token = runstate::admin_token(topology.as_ref(), run_dir, false)?;
        Ok(Admin { addr: master.admin_addr, token })
    }

    /// `GET path` → JSON body (HTTP/1.0, so the body is never chunked).
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n", self.addr, self.token);
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.take(64 << 20).read_to_end(&mut raw)?;
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no HTTP head"))?;
        let head = String::from_utf8_lossy(&raw[..head_end]);
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(serde_json::from_slice(&raw[head_end + 4..])?)
    }

    pub fn servers(&self) -> anyhow::Result<Value> {
        self.get("/api/servers")
    }
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
