//! The CLI's side of the admin API: find the running master, call it with the admin token.
//!
//! A deliberately small HTTP/1.1 client over a blocking socket (one request, `Connection: close`), so the
//! CLI pulls in no HTTP stack of its own. Every call is bounded by a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use pomelo_master::runstate::{self, admin_token, run_dir};
use pomelo_proto::config::{Topology, DEFAULT_ENV};

/// Exit code when no master runs for the file.
pub const NO_MASTER: i32 = 3;

/// No master runs (or answers) for the file: the CLI says so and exits with [`NO_MASTER`].
#[derive(Debug)]
pub struct NoMaster(pub String);

impl std::fmt::Display for NoMaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NoMaster {}

/// The running master of a servers.yaml.
pub struct Master {
    pub addr: SocketAddr,
    pub token: String,
    pub pid: u32,
}

pub fn find(config: &Path) -> anyhow::Result<Master> {
    let topo = Topology::load(config, DEFAULT_ENV).ok();
    let dir = run_dir(config, DEFAULT_ENV);
    let no_master =
        || NoMaster(format!("no master is running for {} (start one with `pomelo-rs start`)", config.display()));
    let m = runstate::read_master(&dir).ok_or_else(no_master)?;
    if !pomelo_master::child::alive(m.pid) {
        return Err(no_master().into());
    }
    let token = admin_token(topo.as_ref(), &dir, false)?;
    Ok(Master { addr: m.admin_addr, token, pid: m.pid })
}

pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl Master {
    pub fn call(&self, method: &str, path: &str) -> anyhow::Result<HttpResponse> {
        let timeout = Duration::from_secs(10);
        let mut s = TcpStream::connect_timeout(&self.addr, timeout)
            .map_err(|e| NoMaster(format!("the master (pid {}) does not answer at {}: {e}", self.pid, self.addr)))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr, self.token
        );
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("the master sent a malformed response") };
        let status =
            head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status in the response")?;
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        let body = if chunked { dechunk(body) } else { body.to_string() };
        Ok(HttpResponse { status, body })
    }

    /// Calls and returns the JSON body of a 2xx, or the API's error message.
    pub fn json(&self, method: &str, path: &str) -> anyhow::Result<serde_json::Value> {
        let r = self.call(method, path)?;
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
        if (200..300).contains(&r.status) {
            Ok(v)
        } else {
            let detail = v.get("detail").and_then(|d| d.as_str()).unwrap_or(&r.body).to_string();
            bail!("{} ({})", detail, r.status)
        }
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
