//! The one client of the admin API, shared by the CLI, the bench and the end-to-end tests: find the
//! running master of a servers.yaml (its address and pid in `master.json`, its token as
//! [`runstate::admin_token`] finds it), call it with the bearer token, read the answer.
//!
//! A deliberately small HTTP/1.1 client over a blocking socket (one request, `Connection: close`, a
//! chunked body decoded), so none of its users pulls in an HTTP stack. Every call is bounded: a connect,
//! read and write timeout, and a cap on the bytes read. No tasks, nothing to shut down.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use pomelo_proto::config::{Topology, DEFAULT_ENV};

use crate::{procstat, runstate};

/// Exit code when no master runs for the file.
pub const NO_MASTER: i32 = 3;

/// Connect, read and write timeout of one call.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from one answer.
const MAX_RESPONSE: u64 = 64 << 20;

/// No master runs (or answers) for the file: the CLI says so and exits with [`NO_MASTER`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoMaster(pub String);

/// The running master of a servers.yaml.
#[derive(Debug, Clone)]
pub struct Master {
    pub addr: SocketAddr,
    pub token: String,
    pub pid: u32,
}

/// The master running for `config` (its run directory found from the file), checked to be that cluster's
/// master before its token is read or sent ([`verify`]).
pub fn find(config: &Path) -> anyhow::Result<Master> {
    let run_dir = runstate::run_dir(config, DEFAULT_ENV);
    let file = runstate::read_master(&run_dir).ok_or_else(|| no_master(config))?;
    if !procstat::alive(file.pid) {
        return Err(no_master(config).into());
    }
    verify(&file).map_err(|why| {
        anyhow::anyhow!(
            "{} names pid {} at {}, but {why}; not sending it the admin token",
            runstate::master_file(&run_dir).display(),
            file.pid,
            file.admin_addr
        )
    })?;
    in_run_dir(config, &run_dir)
}

/// Whether the process `master.json` names is a pomelo-rs master (this program, run as `start`), the one
/// that wrote the file (same start time), and is the one listening on the admin address the file gives.
pub fn verify(file: &runstate::MasterFile) -> Result<(), String> {
    let pid = file.pid;
    if procstat::cmdline(pid).get(1).map(String::as_str) != Some("start") {
        return Err("that process is not a `pomelo-rs start`".into());
    }
    let me = std::env::current_exe().map_err(|e| format!("this program's path cannot be read: {e}"))?;
    procstat::runs(pid, &me)?;
    if file.start.is_none() || procstat::start_ticks(pid) != file.start {
        return Err("it is not the process that wrote the file (another start time)".into());
    }
    if !procstat::listens_on(pid, file.admin_addr) {
        return Err(format!("it does not listen on {}", file.admin_addr));
    }
    Ok(())
}

/// The master that `master.json` in `run_dir` names for `config`, without checking that its pid lives
/// (a caller on another pid namespace still reaches it by address).
pub fn in_run_dir(config: &Path, run_dir: &Path) -> anyhow::Result<Master> {
    let m = runstate::read_master(run_dir).ok_or_else(|| no_master(config))?;
    let topology = Topology::load(config, DEFAULT_ENV).ok();
    let token = runstate::admin_token(topology.as_ref(), run_dir, false)?;
    Ok(Master { addr: m.admin_addr, token, pid: m.pid })
}

fn no_master(config: &Path) -> NoMaster {
    NoMaster(format!("no master is running for {} (start one with `pomelo-rs start`)", config.display()))
}

/// One answer: the status, the head as sent, and the body (de-chunked when it was chunked).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Master {
    /// `method path` with the bearer token.
    pub fn call(&self, method: &str, path: &str) -> anyhow::Result<HttpResponse> {
        let auth = format!("Bearer {}", self.token);
        request(self.addr, method, path, &[("Authorization", &auth)], "").map_err(|e| match e {
            RequestError::Connect(e) => {
                NoMaster(format!("the master (pid {}) does not answer at {}: {e}", self.pid, self.addr)).into()
            }
            other => anyhow::Error::from(other),
        })
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

    /// `GET path` → the JSON body of a 200.
    pub fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let r = self.call("GET", path)?;
        if r.status != 200 {
            bail!("GET {path}: {} {}", r.status, r.head.lines().next().unwrap_or_default());
        }
        serde_json::from_str(&r.body).with_context(|| format!("GET {path}: the body is not JSON"))
    }
}

/// Why [`request`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent a malformed response")]
    Malformed,
}

/// One request with arbitrary headers and body to `addr`, read to the end (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse, RequestError> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(RequestError::Connect)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    parse(&raw).ok_or(RequestError::Malformed)
}

/// Splits a whole HTTP/1.1 answer into status, head and (de-chunked) body.
fn parse(raw: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Some(HttpResponse { status, head: head.to_string(), body })
}

/// The body of a chunked transfer encoding, up to the last complete chunk.
pub fn dechunk(body: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_and_dechunked() {
        let plain = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").expect("parse");
        assert_eq!((plain.status, plain.body.as_str()), (200, "ok"));
        let chunked =
            parse(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .expect("parse");
        assert_eq!((chunked.status, chunked.body.as_str()), (404, "abcde"));
        assert!(chunked.head.starts_with("HTTP/1.1 404"));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_none(), "no end of head");
        assert!(parse(b"garbage\r\n\r\n").is_none(), "no status");
        assert_eq!(dechunk("5\r\nab"), "", "a cut chunk is dropped");
    }

    #[test]
    fn no_master_file_is_no_master() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("servers.yaml");
        let err = find(&config).expect_err("nothing runs");
        assert!(err.downcast_ref::<NoMaster>().is_some(), "{err:#}");
    }

    #[test]
    fn a_request_to_a_closed_port_is_a_connect_error() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        assert!(matches!(request(addr, "GET", "/", &[], ""), Err(RequestError::Connect(_))));
        let m = Master { addr, token: "t".into(), pid: 1 };
        let err = m.call("GET", "/").expect_err("closed");
        assert!(err.downcast_ref::<NoMaster>().is_some(), "{err:#}");
    }
}
