//! The master against a local attacker, with the real binary (issue 14; the findings of
//! `reviews/security-2026-12.md` each test names): the admin port answers only to its own names and
//! throttles wrong tokens; idle sockets there cost the master nothing; workers never see the admin token
//! and every token is at least 16 characters; the CLI sends its token only to this cluster's master; the
//! run directory and logs are private and symlinks are refused; a new master adopts only its own workers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pomelo_master::procstat;
use serde_json::Value;

use crate::harness::{alive, bin, signal, wait_until, yaml, Cluster};

const ONE_EACH: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";

/// One raw request with exactly the `Host` given (or none); the status, or 0 if the server closed.
fn status_with_host(addr: SocketAddr, path: &str, host: Option<&str>) -> u16 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn pid_of(c: &Cluster, id: &str) -> u32 {
    c.server(id)["pid"].as_u64().expect("pid") as u32
}

/// M5 (DNS rebinding) and M4 (no limit on guessing the token).
#[test]
fn the_admin_port_answers_only_to_its_own_names_and_throttles_wrong_tokens() {
    let c = Cluster::start(&yaml(ONE_EACH, "  adminHosts: [chat-admin.example.com]\n"));
    c.wait_running();
    let addr = c.admin_addr();
    let port = addr.port();
    // A page on evil.example that rebinds its name to 127.0.0.1 sends its own name: refused, even /healthz
    // and the login form (or it could guess tokens from the victim's browser).
    for path in ["/healthz", "/", "/api/servers"] {
        assert_eq!(status_with_host(addr, path, Some(&format!("evil.example:{port}"))), 421, "{path}");
    }
    assert_eq!(status_with_host(addr, "/healthz", Some(&format!("127.0.0.1:{}", port.wrapping_add(1)))), 421);
    assert_eq!(status_with_host(addr, "/healthz", None), 421, "no Host at all");
    for ok in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("chat-admin.example.com:{port}")] {
        assert_eq!(status_with_host(addr, "/healthz", Some(&ok)), 200, "{ok}");
    }

    // 20 wrong tokens at once are answered one at a time, 100 ms apart: guessing runs at ~10 a second
    // however many sockets try.
    let started = Instant::now();
    let tries: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                crate::harness::http(addr, "GET", "/api/servers", Some(&format!("wrong-{i:020}"))).0
            })
        })
        .collect();
    let statuses: Vec<u16> = tries.into_iter().map(|t| t.join().expect("join")).collect();
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "20 wrong tokens answered in {took:?}");
    // The right token is not slowed by the wrong ones.
    assert_eq!(c.http("GET", "/api/servers", Some(&c.token())).0, 200);
}

/// M8 (no header-read timeout, no connection cap on the admin port): 1,100 idle sockets hold no more
/// than the cap of the master's files, are closed after the header timeout, and the master respawns a
/// worker killed meanwhile.
#[test]
fn idle_sockets_on_the_admin_port_leave_the_master_able_to_respawn_a_killed_worker() {
    let c = Cluster::start(&yaml(ONE_EACH, ""));
    c.wait_running();
    let addr = c.admin_addr();
    let master = c.master_pid().expect("master pid");
    let chat = pid_of(&c, "chat-1");
    let restarts = c.server("chat-1")["restarts"].as_u64().expect("restarts");
    let fds_before = procstat::sample(master).expect("sample").open_fds;

    let mut idle: Vec<TcpStream> = (0..1100)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("socket {i}: {e}"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let fds_during = procstat::sample(master).expect("sample").open_fds;
    assert!(
        fds_during <= fds_before + pomelo_dashboard::MAX_CONNECTIONS as u64 + 16,
        "the master holds {fds_during} files with 1,100 idle sockets (was {fds_before})"
    );

    signal(chat, 9);
    // The worker comes back while the idle sockets are still open.
    let respawned = wait_until(Duration::from_secs(15), "chat-1 respawned", || {
        procstat::pids().into_iter().find(|&p| {
            p != chat
                && alive(p)
                && procstat::cmdline(p).windows(2).any(|w| w[0] == "--id" && w[1] == "chat-1")
                && procstat::environ(p)
                    .is_some_and(|e| e.values().any(|v| v.to_string_lossy().contains(&*c.dir.path().to_string_lossy())))
        })
    });

    // Every idle socket is closed by the server once the header timeout has passed.
    let deadline = Instant::now() + pomelo_dashboard::HEADER_READ_TIMEOUT + Duration::from_secs(10);
    for (i, s) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).ok();
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                // A signal to the test process (another test's child exiting) is not an answer.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => panic!("idle socket {i} still open past the header timeout: {other:?}"),
            }
        }
    }
    drop(idle);
    let s = wait_until(Duration::from_secs(15), "chat-1 running again", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"].as_u64() == Some(u64::from(respawned))).then_some(s)
    });
    assert_eq!(s["restarts"].as_u64(), Some(restarts + 1));
    assert!(c.api("/api/servers")["master"]["max_fds"].as_u64().is_some_and(|n| n > 0), "limit shown");
}

/// L-level finding: the admin token was inherited by every worker; and short tokens were accepted.
#[test]
fn workers_never_see_the_admin_token_and_short_tokens_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("servers.yaml");
    std::fs::write(&file, yaml(ONE_EACH, "")).expect("write");
    let short = Command::new(bin()).args(["start", "-c"]).arg(&file).env("POMELO_ADMIN_TOKEN", "short").output();
    let short = short.expect("run");
    assert!(!short.status.success());
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(err.contains("shorter than 16 characters") && err.contains("POMELO_ADMIN_TOKEN"), "{err}");

    let token = "env-token-0123456789-abcdef";
    let out = std::fs::File::create(dir.path().join("master.out")).expect("out");
    let child = Command::new(bin())
        .args(["start", "-c"])
        .arg(&file)
        .env("POMELO_ADMIN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("spawn master");
    let c = Cluster { dir, master: Some(child) };
    wait_until(Duration::from_secs(20), "master.json", || c.master_json());
    let addr = c.admin_addr();
    wait_until(Duration::from_secs(20), "every server running", || {
        let (status, body) = crate::harness::http(addr, "GET", "/api/servers", Some(token));
        let v: Value = serde_json::from_str(&body).ok()?;
        let all = v["servers"].as_array()?.iter().all(|s| s["state"] == "running");
        (status == 200 && all).then_some(())
    });
    let workers = c.worker_pids();
    assert_eq!(workers.len(), 3, "{workers:?}");
    for pid in workers {
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let text = String::from_utf8_lossy(&env);
        assert!(!text.contains(token) && !text.contains("POMELO_ADMIN_TOKEN"), "worker {pid} has the admin token");
    }
}

/// M1-level finding: the CLI sent its bearer token to whatever `master.json` named.
#[test]
fn the_cli_sends_its_token_only_to_this_clusters_master() {
    let c = Cluster::start(&yaml(ONE_EACH, ""));
    c.wait_running();
    let path = c.dir.path().join(".pomelo/master.json");
    let real = std::fs::read_to_string(&path).expect("master.json");
    let token = c.token();

    // A listener that records whatever it is sent, named in master.json with the real master's pid.
    let trap = TcpListener::bind("127.0.0.1:0").expect("bind");
    let trap_addr = trap.local_addr().expect("addr");
    trap.set_nonblocking(true).expect("nonblocking");
    let mut forged: Value = serde_json::from_str(&real).expect("json");
    forged["admin_addr"] = Value::String(trap_addr.to_string());
    std::fs::write(&path, serde_json::to_vec(&forged).expect("json")).expect("forge");
    let out = c.run(&["list"]);
    assert!(!out.status.success(), "list went ahead with a forged admin address");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not listen on") && err.contains("not sending it the admin token"), "{err}");

    // The real address, but the pid of a process that is not a master (started by this test).
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let mut forged: Value = serde_json::from_str(&real).expect("json");
    forged["pid"] = Value::from(sleeper.id());
    std::fs::write(&path, serde_json::to_vec(&forged).expect("json")).expect("forge");
    let out = c.run(&["stop"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a `pomelo-rs start`"), "{out:?}");
    assert!(alive(sleeper.id()), "nothing was signalled");
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    let mut got = Vec::new();
    while let Ok((mut s, _)) = trap.accept() {
        s.set_nonblocking(false).ok();
        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        let _ = s.read_to_end(&mut got);
    }
    assert!(!String::from_utf8_lossy(&got).contains(&token), "the token reached the trap");
    assert!(got.is_empty(), "the trap was sent {} bytes", got.len());

    // The real file again: the CLI works.
    std::fs::write(&path, real).expect("restore");
    let out = c.run(&["list"]);
    assert!(out.status.success(), "{out:?}");
}

/// L-level findings: run directory and logs world-readable, and a symlink followed.
#[test]
fn the_run_directory_and_logs_are_private_and_symlinks_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("servers.yaml"), yaml(ONE_EACH, "")).expect("write");
    // Another user's trick: logs/chat-1.log is a link to a file of the victim's.
    std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "untouched").expect("victim");
    std::os::unix::fs::symlink(&victim, dir.path().join("logs/chat-1.log")).expect("symlink");
    let mut c = Cluster { dir, master: None };
    c.spawn_master();
    wait_until(Duration::from_secs(20), "gate and connector running", || {
        let s = c.servers();
        let up = s.iter().filter(|s| s["state"] == "running").count();
        (up == 2).then_some(())
    });
    wait_until(Duration::from_secs(10), "the refusal logged", || c.master_output().contains("symlink").then_some(()));
    assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "untouched");
    assert_ne!(c.server("chat-1")["state"], "running", "chat-1 cannot start with its log a symlink");

    let mode = |p: &str| std::fs::metadata(c.dir.path().join(p)).expect(p).permissions().mode() & 0o777;
    assert_eq!(mode(".pomelo"), 0o700);
    for f in [".pomelo/master.json", ".pomelo/admin-token", ".pomelo/cluster-token", "logs/gate-1.log"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    wait_until(Duration::from_secs(5), "workers.json", || {
        c.dir.path().join(".pomelo/workers.json").exists().then_some(())
    });
    assert_eq!(mode(".pomelo/workers.json"), 0o600);
}

/// H4 (adoption): a new master adopts, and so may later signal, only its own workers: not a worker of
/// another cluster with the same id that `workers.json` names.
#[test]
fn a_new_master_adopts_only_its_own_workers() {
    let mut a = Cluster::start(&yaml(ONE_EACH, ""));
    a.wait_running();
    let b = Cluster::start(&yaml(ONE_EACH, ""));
    b.wait_running();
    let theirs = pid_of(&b, "chat-1");

    a.kill_master();
    let path = a.dir.path().join(".pomelo/workers.json");
    let mut workers: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("workers.json")).expect("json");
    assert!(workers["chat-1"]["start"].is_u64(), "workers.json records start times: {workers}");
    workers["chat-1"] = serde_json::json!({"pid": theirs, "start": procstat::start_ticks(theirs)});
    std::fs::write(&path, serde_json::to_vec(&workers).expect("json")).expect("tamper");

    a.spawn_master();
    a.wait_running();
    let out = a.master_output();
    assert!(out.contains(&format!("not adopting pid {theirs}")) && out.contains("belongs to the cluster in"), "{out}");
    assert_ne!(pid_of(&a, "chat-1"), theirs);
    let stop = a.run(&["stop"]);
    assert!(stop.status.success(), "{stop:?}");
    a.wait_master_exit(Duration::from_secs(20));
    assert!(alive(theirs), "the other cluster's chat-1 was signalled");
    assert_eq!(pid_of(&b, "chat-1"), theirs, "and it still serves its own cluster");
}
