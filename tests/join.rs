//! Servers a platform starts (`supervise: external`, issue 15): the test plays systemd. It writes each
//! external server's credential with `pomelo-rs credential`, starts `pomelo-rs worker --join` itself (its
//! own children, in their own process groups), and checks that they take their spec from the master, run
//! in the cluster over cluster TLS, carry chat under load over WebSocket and TCP with every acknowledged
//! message delivered once, are asked (never signalled) to exit on restart and on `pomelo-rs stop`, and come
//! back when their platform starts them again. A credential is refused for a server the master starts,
//! used under another id, or by a server that is not external.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::failover::client::{login, Kind, User};
use crate::failover::{check, lock, log_in_all, missing, rooms, wait_until_or};
use crate::harness::{bin, wait_until, yaml, Cluster};

const CLIENTS: usize = 120;

/// The platform: the `worker --join` processes this test started, killed by process group on drop.
struct Platform {
    dir: PathBuf,
    control: String,
    running: Vec<(String, Child, PathBuf)>,
    started: usize,
}

impl Platform {
    fn start(&mut self, id: &str) -> u32 {
        self.started += 1;
        let path = self.dir.join(format!("{id}.{}.out", self.started));
        let out = std::fs::File::create(&path).expect("out");
        let cred = self.dir.join(format!("{id}.cred"));
        let line = unit_command(id, &self.control, &cred);
        let child = Command::new(&line[0])
            .args(&line[1..])
            .stdout(Stdio::null())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("spawn worker --join");
        let pid = child.id();
        self.running.push((id.to_string(), child, path));
        pid
    }

    /// Waits for the process of `id` to end by itself; its exit status and what it wrote.
    fn wait_exit(&mut self, id: &str, within: Duration) -> (ExitStatus, String) {
        let i = self.running.iter().position(|(i, ..)| i == id).expect("started");
        let (_, mut child, path) = self.running.remove(i);
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return (st, std::fs::read_to_string(path).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "{id} (pid {}) did not exit within {within:?}", child.id());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.running {
            // Its own process group, started by this test.
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// The `ExecStart` of deploy/systemd/pomelo-worker@.service for server `id`, as systemd would run it
/// (the instance, the master's address from worker.env, the credential systemd hands over).
fn unit_command(id: &str, control: &str, cred: &Path) -> Vec<String> {
    let unit = std::fs::read_to_string(crate::harness::repo().join("deploy/systemd/pomelo-worker@.service"))
        .expect("the systemd unit");
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    line.split_whitespace()
        .map(|w| {
            w.replace("/usr/local/bin/pomelo-rs", &bin().to_string_lossy())
                .replace("%i", id)
                .replace("${POMELO_MASTER}", control)
                .replace("${CREDENTIALS_DIRECTORY}/join", &cred.to_string_lossy())
        })
        .collect()
}

#[test]
fn the_deploy_examples_are_valid() {
    // The Kubernetes example's servers.yaml passes `pomelo-rs check`.
    let k8s = crate::harness::repo().join("deploy/kubernetes/servers.yaml");
    let out = Command::new(bin()).arg("check").arg("-c").arg(&k8s).output().expect("check");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Its pods run the same command line as the systemd unit: `worker --join ... --id $(POD_NAME) --credential`.
    let manifest = std::fs::read_to_string(crate::harness::repo().join("deploy/kubernetes/pomelo.yaml")).expect("yaml");
    assert_eq!(
        manifest
            .matches("args: [worker, --join, \"pomelo-master.pomelo.svc.cluster.local:3005\", --id, \"$(POD_NAME)\"")
            .count(),
        3
    );
    // The systemd units pass `systemd-analyze verify` (with the binary where they expect it).
    if !crate::harness::have(Command::new("systemd-analyze").arg("--version").output().is_ok(), "systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in ["pomelo-master.service", "pomelo-worker@.service"] {
        let text = std::fs::read_to_string(crate::harness::repo().join("deploy/systemd").join(unit)).expect("unit");
        let text = text.replace("/usr/local/bin/pomelo-rs", &bin().to_string_lossy());
        let name = unit.replace("@.", "@chat-3.");
        std::fs::write(dir.path().join(&name), text).expect("write unit");
        let out = Command::new("systemd-analyze").arg("verify").arg(dir.path().join(&name)).output().expect("verify");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
}

fn servers() -> String {
    "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n    - {id: connector-2, port: 0, clientPort: 0, supervise: external}\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-2, port: 0, supervise: external}\n".to_string()
}

fn credential(c: &Cluster, id: &str, file: &Path) -> std::process::Output {
    Command::new(bin()).args(["credential", id, "-o"]).arg(file).arg("-c").arg(c.config()).output().expect("run")
}

fn run_join(control: &str, id: &str, cred: &Path) -> std::process::Output {
    Command::new(bin())
        .args(["worker", "--join", control, "--id", id, "--join-timeout", "5", "--credential"])
        .arg(cred)
        .output()
        .expect("run worker --join")
}

#[test]
fn external_servers_join_with_a_credential_carry_chat_and_are_asked_never_signalled() {
    let c = Cluster::start(&yaml(&servers(), "  clusterTls: true\n"));
    let dir = c.dir.path().to_path_buf();
    wait_until(Duration::from_secs(30), "the master's servers running", || {
        let s = c.servers();
        let ok = |id: &str, state: &str| s.iter().any(|v| v["id"] == id && v["state"] == state);
        (ok("gate-1", "running") && ok("connector-1", "running") && ok("chat-1", "running")).then_some(())
    });
    // Before their platform starts them, external servers wait: no pid, shown as external.
    for id in ["connector-2", "chat-2"] {
        let s = c.server(id);
        assert_eq!(s["supervisor"], "external", "{s}");
        assert_eq!(s["state"], "starting", "{s}");
        assert!(s["pid"].is_null(), "{s}");
    }
    let control = c.master_json().and_then(|m| m["control_addr"].as_str().map(String::from)).expect("control");

    // Credentials: 0600, the server's key and certificate only (not the cluster secret, not the CA's key).
    let secret = std::fs::read_to_string(dir.join(".pomelo/cluster-token")).expect("cluster token");
    let ca_key = std::fs::read_to_string(dir.join(".pomelo/tls/ca.key")).expect("ca key");
    let ca_body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    for id in ["connector-2", "chat-2"] {
        let file = dir.join(format!("{id}.cred"));
        let out = credential(&c, id, &file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(!text.contains(secret.trim()), "{id}'s credential holds the cluster secret");
        let v: Value = serde_json::from_str(&text).expect("json");
        let key_body: String =
            v["tls"]["key"].as_str().expect("tls key").lines().filter(|l| !l.starts_with("---")).collect();
        assert_ne!(key_body.replace("\\n", ""), ca_body, "{id}'s credential holds the CA's key");
        assert_eq!(v["id"], id);
    }
    // Refusals, each with a clear reason and at once.
    let out = credential(&c, "chat-1", &dir.join("chat-1.cred"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("supervise: external"));
    let out = run_join(&control, "chat-2", &dir.join("connector-2.cred"));
    assert!(!out.status.success(), "a credential of connector-2 joined as chat-2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("credential of `connector-2`"), "{out:?}");
    // A credential anyone may write is refused before it is used.
    let open = dir.join("open.cred");
    std::fs::copy(dir.join("chat-2.cred"), &open).expect("copy");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = run_join(&control, "chat-2", &open);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("can be written by any user"));
    // The right key of a server the master starts: the master proves itself, then refuses (exit 3).
    let forged = dir.join("chat-1.cred");
    let key = pomelo_proto::auth::server_key(secret.trim(), "chat-1").to_hex();
    let tls: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("chat-2.cred")).expect("cred"))
        .expect("forged credential");
    std::fs::write(&forged, serde_json::json!({"id": "chat-1", "key": key, "tls": tls["tls"]}).to_string())
        .expect("forged credential");
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o600)).expect("forged credential");
    let out = run_join(&control, "chat-1", &forged);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only servers with `supervise: external` join"));

    // The platform starts them: they run with the pids it started.
    let mut platform = Platform { dir: dir.clone(), control: control.clone(), running: Vec::new(), started: 0 };
    let conn_pid = platform.start("connector-2");
    let chat_pid = platform.start("chat-2");
    for (id, pid) in [("connector-2", conn_pid), ("chat-2", chat_pid)] {
        let s = c.wait_state(id, "running", Duration::from_secs(20));
        assert_eq!(s["pid"].as_u64(), Some(pid as u64), "{id}: {s}");
    }

    let (_, metrics) = c.http("GET", "/metrics", Some(&c.token()));
    let info = metrics.lines().find(|l| l.starts_with("pomelo_server_info{") && l.contains("server_id=\"chat-2\""));
    assert!(info.is_some_and(|l| l.contains("supervisor=\"external\"")), "{info:?}");

    // Chat under load over both connectors and both chat servers, half WebSocket and half TCP.
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let sending = Arc::new(AtomicBool::new(false));
    wait_until(Duration::from_secs(20), "a first login through the joined connector", || {
        let probe = rt.block_on(login(Kind::Tcp, gate, "probe".into(), "p".into(), Duration::ZERO, sending.clone()));
        let (u, reply) = probe.ok()?;
        u.task.abort();
        reply.get("users").map(|_| ())
    });
    let rooms = rooms();
    let users = log_in_all(&rt, gate, CLIENTS, &rooms, &sending);
    let n = |id: &str| c.server(id)["stats"]["connections"].as_f64().unwrap_or(0.0);
    wait_until(Duration::from_secs(10), "clients on both connectors", || {
        (n("connector-1") > 0.0 && n("connector-2") > 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let problems = chat_for(&users, &sending, Duration::from_secs(6));
    let acked: usize = users.iter().map(|u| lock(u).sent.len()).sum();
    assert!(acked > CLIENTS * 4, "only {acked} sends in 6 s of {CLIENTS} clients at 1/s");
    assert!(problems.is_empty(), "chat through the joined servers: {problems:#?}");
    for u in &users {
        u.task.abort();
    }

    // Restart: the master asks chat-2 to exit (status 0: asked, not signalled); its platform starts it
    // again and it takes its place.
    let out = c.run(&["restart", "chat-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (st, said) = platform.wait_exit("chat-2", Duration::from_secs(10));
    asked_not_signalled("chat-2", st, &said);
    c.wait_state("chat-2", "starting", Duration::from_secs(10));
    let again = platform.start("chat-2");
    let s = c.wait_state("chat-2", "running", Duration::from_secs(20));
    assert_eq!(s["pid"].as_u64(), Some(again as u64), "{s}");

    // After the restart, every room works again: a round in each room over both connectors.
    let room_users: Vec<User> = rt.block_on(async {
        let mut v = Vec::new();
        for (k, rid) in rooms.iter().enumerate() {
            for j in 0..4 {
                let kind = if j % 2 == 0 { Kind::Ws } else { Kind::Tcp };
                let name = format!("after{k}-{j}");
                let (u, reply) = wait_login(kind, gate, &name, rid, &sending).await;
                assert!(reply["users"].as_array().is_some(), "{name}: {reply}");
                v.push(u);
            }
        }
        v
    });
    // Let every onAdd of these logins arrive first.
    std::thread::sleep(Duration::from_secs(1));
    let problems = chat_for(&room_users, &sending, Duration::from_secs(3));
    assert!(problems.is_empty(), "chat after chat-2's restart: {problems:#?}");
    for u in &room_users {
        u.task.abort();
    }

    // `stop chat-2`: asked to exit; the master then refuses it (exit 3, which the unit does not restart)
    // until `start chat-2`.
    let out = c.run(&["stop", "chat-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (st, said) = platform.wait_exit("chat-2", Duration::from_secs(10));
    asked_not_signalled("chat-2", st, &said);
    c.wait_state("chat-2", "stopped", Duration::from_secs(10));
    platform.start("chat-2");
    let (st, said) = platform.wait_exit("chat-2", Duration::from_secs(20));
    assert_eq!(st.code(), Some(3), "a stopped external server came back: {said}");
    assert!(said.contains("stopped here"), "{said}");
    let out = c.run(&["start", "chat-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid = platform.start("chat-2");
    let s = c.wait_state("chat-2", "running", Duration::from_secs(20));
    assert_eq!(s["pid"].as_u64(), Some(pid as u64), "{s}");

    // `pomelo-rs stop` asks both external workers to exit and signals neither.
    let out = c.run(&["stop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for id in ["connector-2", "chat-2"] {
        let (st, said) = platform.wait_exit(id, Duration::from_secs(15));
        asked_not_signalled(id, st, &said);
    }
}

/// Every client sends once a second for `how_long`; once every send is answered and delivered (at most
/// 35 s), the problems `check` finds. No fault is injected, so no send may be refused (the window given
/// to `check` is empty).
fn chat_for(users: &[User], sending: &AtomicBool, how_long: Duration) -> Vec<String> {
    let counting = Instant::now();
    sending.store(true, Ordering::SeqCst);
    std::thread::sleep(how_long);
    sending.store(false, Ordering::SeqCst);
    let _ =
        wait_until_or(Duration::from_secs(20), || users.iter().all(|u| lock(u).sent.iter().all(|s| s.reply.is_some())));
    let _ = wait_until_or(Duration::from_secs(15), || missing(users).0 == 0);
    std::thread::sleep(Duration::from_millis(500));
    let end = Instant::now();
    check(users, counting, end, end - Duration::from_secs(2))
}

/// The worker exited because the master asked over its link: status 0, and no signal reached it (a
/// SIGTERM would also end it with 0, but it logs the signal).
fn asked_not_signalled(id: &str, st: ExitStatus, said: &str) {
    assert_eq!(st.code(), Some(0), "{id} ended with {st:?}:\n{said}");
    assert!(said.contains("the master asked to stop"), "{id} was not asked to stop:\n{said}");
    assert!(!said.contains("SIGTERM") && !said.contains("SIGINT"), "{id} was signalled:\n{said}");
}

/// Logs in, retrying while the membership settles after a restart.
async fn wait_login(kind: Kind, gate: SocketAddr, name: &str, rid: &str, sending: &Arc<AtomicBool>) -> (User, Value) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match login(kind, gate, name.into(), rid.into(), Duration::ZERO, sending.clone()).await {
            Ok((u, reply)) if reply.get("users").is_some() => return (u, reply),
            Ok((u, reply)) if Instant::now() > deadline => {
                u.task.abort();
                panic!("{name} could not enter {rid}: {reply}");
            }
            Ok((u, _)) => u.task.abort(),
            Err(e) if Instant::now() > deadline => panic!("{name}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
