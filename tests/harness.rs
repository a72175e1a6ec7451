//! A real cluster for a test: the `pomelo-rs` binary started from a temp dir with its own servers.yaml.
//!
//! Everything a test starts is killed when its [`Cluster`] drops: the master by pid, and every worker
//! whose environment names this cluster's temp dir (found through `pomelo_master::procstat`), so nothing outlives a test,
//! and nothing another test (or a person) started is touched.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pomelo_master::admin_client::{self, RequestError};
use pomelo_master::procstat;
use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pomelo-rs"))
}

/// servers.yaml with every port 0 and short timeouts, so tests run in parallel and fast.
pub fn yaml(servers: &str, master_extra: &str) -> String {
    format!(
        "master:\n  host: 127.0.0.1\n  controlPort: 0\n  admin: 127.0.0.1:0\n  stopGrace: 3s\n  heartbeatInterval: 200ms\n  heartbeatTimeout: 2s\n  startTimeout: 10s\n  orphanTimeout: 30s\n  restart:\n    backoffInitial: 100ms\n    backoffMax: 1s\n    maxRestarts: 3\n    window: 30s\n{master_extra}servers:\n{servers}"
    )
}

pub const SMALL: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n    - {id: connector-2, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-2, port: 0}\n";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub master: Option<Child>,
}

pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// Copies the servers' logs and the master's output to `target/<what>` (the temp dir goes with the
    /// cluster): for whoever reads a failure. The directory.
    pub fn keep_logs(&self, what: &str) -> PathBuf {
        let keep = repo().join("target").join(what);
        std::fs::create_dir_all(&keep).ok();
        let logs = std::fs::read_dir(self.dir.path().join("logs")).into_iter().flatten().flatten().map(|e| e.path());
        for f in logs.chain([self.dir.path().join("master.out")]) {
            if let Some(name) = f.file_name() {
                std::fs::copy(&f, keep.join(name)).ok();
            }
        }
        keep
    }

    /// Writes the file and starts the master in the foreground (as a child of the test).
    pub fn start(yaml: &str) -> Cluster {
        Cluster::start_in(tempfile::tempdir().expect("tempdir"), yaml)
    }

    /// [`Cluster::start`] in `dir`, which may hold files servers.yaml names (protos, certificates).
    pub fn start_in(dir: tempfile::TempDir, yaml: &str) -> Cluster {
        std::fs::write(dir.path().join("servers.yaml"), yaml).expect("write servers.yaml");
        let mut c = Cluster { dir, master: None };
        c.spawn_master();
        c
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("servers.yaml")
    }

    pub fn spawn_master(&mut self) {
        let out = std::fs::File::create(self.dir.path().join("master.out")).expect("out");
        let child = Command::new(bin())
            .args(["start", "-c"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .spawn()
            .expect("spawn master");
        self.master = Some(child);
        // Wait until this master has written its addresses.
        let pid = self.master.as_ref().map(|c| c.id()).unwrap_or(0);
        wait_until(Duration::from_secs(20), "master.json", || {
            self.master_json().filter(|m| m["pid"].as_u64() == Some(pid as u64))
        });
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin()).args(args).arg("-c").arg(self.config()).output().expect("run pomelo-rs")
    }

    pub fn master_output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.out")).unwrap_or_default()
    }

    pub fn master_json(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.path().join(".pomelo/master.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.master_json().and_then(|m| m["admin_addr"].as_str()?.parse().ok()).expect("admin address")
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(".pomelo/admin-token")).expect("token").trim().to_string()
    }

    /// One HTTP request to the admin API; (status, body).
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.admin_addr(), method, path, token)
    }

    /// GET with the token, parsed.
    pub fn api(&self, path: &str) -> Value {
        let (status, body) = self.http("GET", path, Some(&self.token()));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("json")
    }

    pub fn post(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.http("POST", path, Some(&self.token()));
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub fn servers(&self) -> Vec<Value> {
        self.api("/api/servers")["servers"].as_array().cloned().unwrap_or_default()
    }

    pub fn server(&self, id: &str) -> Value {
        self.api(&format!("/api/servers/{id}"))
    }

    /// Waits until every server is running; returns id → pid.
    pub fn wait_running(&self) -> Vec<(String, u32)> {
        wait_until(Duration::from_secs(30), "every server running", || {
            let servers = self.servers();
            let all = !servers.is_empty() && servers.iter().all(|s| s["state"] == "running");
            all.then(|| {
                servers
                    .iter()
                    .map(|s| (s["id"].as_str().unwrap_or("").to_string(), s["pid"].as_u64().unwrap_or(0) as u32))
                    .collect()
            })
        })
    }

    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        wait_until(timeout, &format!("{id} {state}"), || {
            let (status, body) = self.http("GET", &format!("/api/servers/{id}"), Some(&self.token()));
            let s: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && s["state"] == state).then_some(s)
        })
    }

    /// Worker processes of this cluster (found by the temp dir in their environment).
    pub fn worker_pids(&self) -> Vec<u32> {
        let needle = self.dir.path().to_string_lossy().to_string();
        let mut out = Vec::new();
        for pid in procstat::pids() {
            if !alive(pid) {
                continue;
            }
            let Some(env) = procstat::environ(pid) else { continue };
            if env.values().any(|v| v.to_string_lossy().contains(&needle)) {
                out.push(pid);
            }
        }
        out
    }

    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(|c| c.id())
    }

    /// Waits for the master child to exit and returns its status.
    pub fn wait_master_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.master.as_mut().expect("master");
        wait_until(timeout, "the master to exit", || child.try_wait().ok().flatten())
    }
}

impl Cluster {
    /// SIGKILL the master this cluster started, if it runs, and reap it; its workers keep running.
    pub fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_master();
        for pid in self.worker_pids() {
            signal(pid, 9);
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Alive and not a zombie.
pub use pomelo_master::procstat::alive;

/// One request to the admin API (or any HTTP port) through the CLI's admin client; (status, body), the
/// body de-chunked.
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let (status, _, body) = request(addr, method, path, &headers, "");
    (status, body)
}

/// One request with arbitrary headers: (status, head, body). The body is read to the end (Connection: close)
/// and de-chunked; an answer that is not HTTP gives status 0.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    match admin_client::request(addr, method, path, headers, body) {
        Ok(r) => (r.status, r.head, r.body),
        Err(RequestError::Malformed) => (0, String::new(), String::new()),
        Err(e) => panic!("{method} {path} to {addr}: {e}"),
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// Whether an external tool a test needs is here. Under CI (`CI` set) a missing tool fails the test;
/// on a developer's machine the test is skipped with the reason printed.
pub fn have(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing; .ci/run installs it");
    }
    eprintln!("SKIPPED: {what} is missing (run .ci/run, or install it, to run this test)");
    false
}

/// Whether chromium (`CHROMIUM`, default /usr/bin/chromium) and playwright-core (npm ci in browser/) are there
/// for a browser test; if not, the test is skipped, or fails under CI.
/// Runs `browser/<script>` with node and `args`, asserts that it succeeded, and returns the one JSON line it
/// printed (what it saw).
pub fn browser_script(script: &str, args: &[String]) -> serde_json::Value {
    browser_script_on(script, args, "", || {})
}

/// [`browser_script`], running `on` once the script writes the line `marker` to its stderr (so a test can
/// inject a fault at a point of the script's run rather than after a guessed delay).
pub fn browser_script_on(script: &str, args: &[String], marker: &str, on: impl FnOnce()) -> serde_json::Value {
    use std::io::BufRead;
    let mut child = Command::new("node")
        .arg(repo().join("browser").join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stderr = String::new();
    let mut on = Some(on);
    for line in std::io::BufReader::new(child.stderr.take().expect("stderr")).lines().map_while(Result::ok) {
        if line == marker {
            if let Some(f) = on.take() {
                f();
            }
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let out = child.wait_with_output().expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(marker.is_empty() || on.is_none(), "{script} never wrote {marker:?}:\n{stderr}");
    serde_json::from_str(stdout.trim()).expect("the script's JSON")
}

pub fn browser_ready() -> bool {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    have(std::path::Path::new(&chromium).exists(), "chromium")
        && have(
            repo().join("browser/node_modules/playwright-core").exists(),
            "browser/node_modules (npm ci in browser/)",
        )
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A redis-server of the test's own on a free loopback port (no persistence), killed by pid on drop.
pub struct Redis {
    pub port: u16,
    /// The address it listens on.
    pub ip: String,
    child: Child,
}

impl Redis {
    /// Whether redis-server is on the PATH.
    pub fn installed() -> bool {
        Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// Starts one and waits until it answers PING; panics (with how to get one) when there is none.
    pub fn start() -> Redis {
        Redis::start_on("127.0.0.1")
    }

    /// [`Redis::start`] listening on `ip` (in the network namespace of the calling thread).
    pub fn start_on(ip: &str) -> Redis {
        let port = std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("a free port").port();
        Redis::start_at(ip, port)
    }

    /// One on `ip:port` (a port a test had one on before, say), without persistence; once it answers PING.
    pub fn start_at(ip: &str, port: u16) -> Redis {
        let port_arg = port.to_string();
        let args = ["--port", &port_arg, "--bind", ip, "--protected-mode", "no", "--save", "", "--appendonly", "no"];
        let child = std::process::Command::new("redis-server")
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; .ci/run installs it)");
        let r = Redis { port, ip: ip.to_string(), child };
        wait_until(Duration::from_secs(10), "redis-server to answer", || r.ping().then_some(()));
        r
    }

    /// Whether it answers PING.
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect((self.ip.as_str(), self.port)) else { return false };
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.child.id(), 9);
        let _ = self.child.wait();
    }
}
