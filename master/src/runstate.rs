//! Files in the run directory (`.pomelo/` beside servers.yaml) that outlive one master.
//!
//! - `master.json`: the running master's pid and its real control and admin addresses (ports may be 0 in
//!   the file), read by the CLI to find the API and by orphaned workers to find a new master.
//! - `workers.json`: the pid of every worker, so a master started after a crash adopts live workers.
//! - `admin-token`, `cluster-token`: secrets created on first start, mode 0600.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use pomelo_proto::config::Topology;
use pomelo_proto::files::{self, Mode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterFile {
    pub pid: u32,
    pub control_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The servers.yaml this master runs.
    pub config: PathBuf,
    /// When the master's process started (clock ticks since boot), so the CLI can tell it from a process
    /// that took its pid.
    #[serde(default)]
    pub start: Option<u64>,
}

pub fn master_file(run_dir: &Path) -> PathBuf {
    run_dir.join("master.json")
}

pub fn read_master(run_dir: &Path) -> Option<MasterFile> {
    let text = std::fs::read_to_string(master_file(run_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `value` as JSON atomically (temp file + rename), so a reader never sees half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    files::open(&tmp, Mode::Truncate)?.write_all(&json)?;
    std::fs::rename(&tmp, path)
}

pub fn workers_file(run_dir: &Path) -> PathBuf {
    run_dir.join("workers.json")
}

/// One worker in `workers.json`: its pid and when that process started (clock ticks since boot), so a
/// pid reused by another process after a reboot or a long time is not mistaken for the worker. A bare pid
/// (the older format) has no start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WorkerEntry {
    Pid(u32),
    Started { pid: u32, start: Option<u64> },
}

impl WorkerEntry {
    pub fn pid(&self) -> u32 {
        match *self {
            WorkerEntry::Pid(pid) | WorkerEntry::Started { pid, .. } => pid,
        }
    }

    pub fn start(&self) -> Option<u64> {
        match *self {
            WorkerEntry::Pid(_) => None,
            WorkerEntry::Started { start, .. } => start,
        }
    }
}

/// id → the workers the last master knew.
pub fn read_workers(run_dir: &Path) -> BTreeMap<String, WorkerEntry> {
    files::read_to_string(&workers_file(run_dir), 1 << 20)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Reads the secret in `name`, creating it (0600) with a random value if it does not exist.
pub fn secret(run_dir: &Path, name: &str) -> std::io::Result<String> {
    let path = run_dir.join(name);
    match files::read_to_string(&path, 4096) {
        Ok(text) => {
            let t = text.trim();
            if t.len() >= MIN_TOKEN {
                return Ok(t.to_string());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    files::private_dir(run_dir)?;
    let token = random_token()?;
    files::open(&path, Mode::Truncate)?.write_all(token.as_bytes())?;
    Ok(token)
}

/// 32 hex characters from the kernel's random source.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The run directory of `config`, even when the file does not validate.
pub fn run_dir(config: &Path, env: &str) -> PathBuf {
    match Topology::load(config, env) {
        Ok(t) => t.run_dir(),
        Err(_) => config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join(".pomelo"),
    }
}

/// Shortest admin token accepted from any source.
pub const MIN_TOKEN: usize = 16;

/// The admin token: servers.yaml, then `POMELO_ADMIN_TOKEN`, then the generated file. A token shorter
/// than [`MIN_TOKEN`] from any of them is an error, never used.
pub fn admin_token(topology: Option<&Topology>, run_dir: &Path, create: bool) -> anyhow::Result<String> {
    if let Some(t) = topology.and_then(|t| t.master.admin_token.clone()) {
        return long_enough(t.trim().to_string(), "adminToken in servers.yaml");
    }
    if let Ok(t) = std::env::var("POMELO_ADMIN_TOKEN") {
        if !t.trim().is_empty() {
            return long_enough(t.trim().to_string(), "POMELO_ADMIN_TOKEN");
        }
    }
    let path = run_dir.join("admin-token");
    if create {
        return secret(run_dir, "admin-token").with_context(|| format!("cannot create {}", path.display()));
    }
    let t = files::read_to_string(&path, 4096)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("cannot read the admin token from {}; set POMELO_ADMIN_TOKEN", path.display()))?;
    long_enough(t, &path.display().to_string())
}

fn long_enough(token: String, source: &str) -> anyhow::Result<String> {
    if token.chars().count() < MIN_TOKEN {
        anyhow::bail!("the admin token from {source} is shorter than {MIN_TOKEN} characters; use a longer one");
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = secret(dir.path(), "admin-token").expect("create");
        let b = secret(dir.path(), "admin-token").expect("read");
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        let mode = std::fs::metadata(dir.path().join("admin-token")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
