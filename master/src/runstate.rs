//! Files in the run directory (`.pomelo/` beside servers.yaml) that outlive one master.
//!
//! - `master.json`: the running master's pid and its real control and admin addresses (ports may be 0 in
//!   the file), read by the CLI to find the API and by orphaned workers to find a new master.
//! - `workers.json`: the pid of every worker, so a master started after a crash adopts live workers.
//! - `admin-token`, `cluster-token`: secrets created on first start, mode 0600.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use pomelo_proto::config::Topology;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterFile {
    pub pid: u32,
    pub control_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The servers.yaml this master runs.
    pub config: PathBuf,
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
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

pub fn workers_file(run_dir: &Path) -> PathBuf {
    run_dir.join("workers.json")
}

/// id → pid of the workers the last master knew.
pub fn read_workers(run_dir: &Path) -> BTreeMap<String, u32> {
    std::fs::read_to_string(workers_file(run_dir)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Reads the secret in `name`, creating it (0600) with a random value if it does not exist.
pub fn secret(run_dir: &Path, name: &str) -> std::io::Result<String> {
    let path = run_dir.join(name);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let t = text.trim();
        if t.len() >= 16 {
            return Ok(t.to_string());
        }
    }
    std::fs::create_dir_all(run_dir)?;
    let token = random_token()?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(token.as_bytes())?;
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

/// The admin token: servers.yaml, then `POMELO_ADMIN_TOKEN`, then the generated file.
pub fn admin_token(topology: Option<&Topology>, run_dir: &Path, create: bool) -> anyhow::Result<String> {
    if let Some(t) = topology.and_then(|t| t.master.admin_token.clone()) {
        return Ok(t);
    }
    if let Ok(t) = std::env::var("POMELO_ADMIN_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let path = run_dir.join("admin-token");
    if create {
        return secret(run_dir, "admin-token").with_context(|| format!("cannot create {}", path.display()));
    }
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("cannot read the admin token from {}; set POMELO_ADMIN_TOKEN", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
