//! The master: start, supervise, restart, stop, adopt, validate.

use std::collections::HashSet;
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{alive, signal, wait_until, yaml, Cluster, SMALL};

#[test]
fn all_servers_reach_running_and_list_prints_the_table() {
    let c = Cluster::start(&yaml(SMALL, ""));
    let running = c.wait_running();
    assert_eq!(running.len(), 5);
    let pids: HashSet<u32> = running.iter().map(|(_, p)| *p).collect();
    assert_eq!(pids.len(), 5, "five distinct processes");
    assert!(pids.iter().all(|p| alive(*p)));
    // Every server registered the port it really bound, and clients can connect to it.
    for s in c.servers() {
        if s["type"] != "chat" {
            let addr: std::net::SocketAddr = s["addrs"]["client"].as_str().expect("client addr").parse().expect("addr");
            assert_ne!(addr.port(), 0);
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("client port accepts");
        }
    }
    let out = c.run(&["list"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("ID") && table.contains("STATE") && table.contains("RESTARTS"), "{table}");
    for (id, pid) in &running {
        let line = table.lines().find(|l| l.starts_with(id.as_str())).unwrap_or_else(|| panic!("{id} in {table}"));
        assert!(line.contains("running") && line.contains(&pid.to_string()), "{line}");
    }
    // Worker output reaches its log file.
    let log = std::fs::read_to_string(c.dir.path().join("logs/chat-1.log")).expect("chat-1.log");
    assert!(log.contains("registered with the master"), "{log}");
}

#[test]
fn a_killed_worker_comes_back_under_the_same_id_with_a_new_pid() {
    let c = Cluster::start(&yaml(SMALL, ""));
    let before = c.wait_running();
    let (_, old) = before.iter().find(|(id, _)| id == "chat-1").cloned().expect("chat-1");
    signal(old, 9);
    let s = wait_until(Duration::from_secs(10), "chat-1 back with a new pid", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)).then_some(s)
    });
    assert_eq!(s["restarts"], 1);
    assert_eq!(s["last_exit"]["kind"], "signal");
    assert_eq!(s["last_exit"]["name"], "SIGKILL");
    // Nothing else moved.
    for (id, pid) in before.iter().filter(|(id, _)| id != "chat-1") {
        assert_eq!(c.server(id)["pid"].as_u64(), Some(*pid as u64), "{id} untouched");
    }
}

#[test]
fn a_worker_that_exits_at_once_is_backed_off_then_marked_failed() {
    // An unknown flag makes the worker exit with a usage error straight away.
    let servers = "  chat:\n    - {id: ok-1, port: 0}\n    - {id: broken-1, port: 0, args: [--no-such-flag]}\n";
    let c = Cluster::start(&yaml(servers, ""));
    let mut seen_backoff = false;
    let failed = wait_until(Duration::from_secs(20), "broken-1 failed", || {
        let s = c.server("broken-1");
        seen_backoff |= s["state"] == "backoff";
        (s["state"] == "failed").then_some(s)
    });
    assert!(seen_backoff, "it went through backoff before failing");
    assert_eq!(failed["restarts"], 3, "maxRestarts is 3");
    assert_eq!(failed["last_exit"]["code"], 2);
    assert!(failed["pid"].is_null());
    // It stays failed: no more attempts.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.server("broken-1")["state"], "failed");
    assert_eq!(c.server("ok-1")["state"], "running");
    let log = c.master_output();
    assert!(log.contains("marked failed until restarted by hand"), "{log}");
    assert!(log.contains("exit code 2"), "{log}");
    // A person can start it again (and it fails again, through backoff).
    let (status, _) = c.post("/api/servers/broken-1/start");
    assert_eq!(status, 202);
    wait_until(Duration::from_secs(5), "broken-1 retried", || {
        (c.server("broken-1")["state"] != "failed").then_some(())
    });
}

#[test]
fn a_hung_worker_is_detected_by_missed_heartbeats_and_replaced() {
    let c = Cluster::start(&yaml(SMALL, ""));
    let before = c.wait_running();
    let (_, old) = before.iter().find(|(id, _)| id == "connector-1").cloned().expect("connector-1");
    signal(old, 19); // SIGSTOP: alive, connected, silent.
    let s = wait_until(Duration::from_secs(15), "connector-1 replaced", || {
        let s = c.server("connector-1");
        (s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)).then_some(s)
    });
    assert_eq!(s["restarts"], 1);
    wait_until(Duration::from_secs(5), "the hung process gone", || (!alive(old)).then_some(()));
    assert!(c.master_output().contains("no heartbeat for"), "{}", c.master_output());
}

#[test]
fn stop_leaves_no_process_of_the_cluster() {
    let mut c = Cluster::start(&yaml(SMALL, ""));
    let running = c.wait_running();
    assert_eq!(c.worker_pids().len(), 5);
    let out = c.run(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    let status = c.wait_master_exit(Duration::from_secs(20));
    assert!(status.success(), "master exit {status:?}");
    for (id, pid) in running {
        assert!(!alive(pid), "{id} pid {pid} still alive");
    }
    assert!(c.worker_pids().is_empty());
    // With no master, the CLI says so and fails.
    let out = c.run(&["list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no master is running"), "{out:?}");
}

#[test]
fn stop_with_ids_stops_only_those_and_they_stay_stopped() {
    let c = Cluster::start(&yaml(SMALL, ""));
    let running = c.wait_running();
    let out = c.run(&["stop", "chat-2"]);
    assert!(out.status.success(), "{out:?}");
    c.wait_state("chat-2", "stopped", Duration::from_secs(10));
    let old = running.iter().find(|(id, _)| id == "chat-2").map(|(_, p)| *p).expect("pid");
    assert!(!alive(old));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.server("chat-2")["state"], "stopped", "not restarted");
    let out = c.run(&["stop", "no-such-server"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server `no-such-server`"), "{out:?}");
    let out = c.run(&["start", "chat-2"]);
    assert!(out.status.success(), "{out:?}");
    c.wait_state("chat-2", "running", Duration::from_secs(10));
}

#[test]
fn ctrl_c_stops_the_whole_cluster() {
    let mut c = Cluster::start(&yaml(SMALL, ""));
    let running = c.wait_running();
    signal(c.master_pid().expect("pid"), 2);
    let status = c.wait_master_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(running.iter().all(|(_, p)| !alive(*p)));
    assert!(c.worker_pids().is_empty());
}

#[test]
fn a_killed_master_leaves_workers_serving_and_a_new_master_adopts_them() {
    let mut c = Cluster::start(&yaml(SMALL, ""));
    let before = c.wait_running();
    let gate = c.server("gate-1")["addrs"]["client"].as_str().expect("gate addr").parse().expect("addr");
    signal(c.master_pid().expect("pid"), 9);
    c.wait_master_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    for (id, pid) in &before {
        assert!(alive(*pid), "{id} survived its master");
    }
    TcpStream::connect_timeout(&gate, Duration::from_secs(2)).expect("the gate still serves");

    c.spawn_master();
    let after = c.wait_running();
    let mut a = after.clone();
    let mut b = before.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same processes, adopted");
    assert_eq!(c.worker_pids().len(), 5, "no duplicates");
    assert!(c.servers().iter().all(|s| s["adopted"] == true));
    // Adopted workers are still supervised: kill one and it comes back.
    let (_, old) = before.iter().find(|(id, _)| id == "chat-1").cloned().expect("chat-1");
    signal(old, 9);
    wait_until(Duration::from_secs(10), "chat-1 respawned", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)).then_some(())
    });
    // And the new master stops them all.
    assert!(c.run(&["stop"]).status.success());
    c.wait_master_exit(Duration::from_secs(20));
    wait_until(Duration::from_secs(5), "no workers left", || c.worker_pids().is_empty().then_some(()));
}

#[test]
fn orphaned_workers_stop_by_themselves() {
    let extra = "";
    let text = yaml("  chat:\n    - {id: chat-1, port: 0}\n", extra).replace("orphanTimeout: 30s", "orphanTimeout: 3s");
    let mut c = Cluster::start(&text);
    let running = c.wait_running();
    signal(c.master_pid().expect("pid"), 9);
    c.wait_master_exit(Duration::from_secs(5));
    let pid = running[0].1;
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(pid), "still serving before the orphan timeout");
    wait_until(Duration::from_secs(10), "the orphan to stop", || (!alive(pid)).then_some(()));
    let log = std::fs::read_to_string(c.dir.path().join("logs/chat-1.log")).expect("log");
    assert!(log.contains("orphaned"), "the orphan wrote why it stopped to its log file: {log}");
}

#[test]
fn an_invalid_servers_yaml_lists_every_error_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("servers.yaml");
    let text = "master:\n  stopGrace: 10\n  controlPort: 0\nservers:\n  chat:\n    - {id: c1, port: 6100}\n    - id: c1\n      port: 6100\n      colour: red\n  lobby: []\n";
    std::fs::write(&file, text).expect("write");
    let check =
        std::process::Command::new(crate::harness::bin()).arg("check").arg("-c").arg(&file).output().expect("run");
    assert_eq!(check.status.code(), Some(2));
    let err = String::from_utf8_lossy(&check.stderr);
    for needle in [
        ":2: master.stopGrace: `10` has no unit",
        ":7: servers.chat[1].id: duplicate id `c1`",
        ":8: servers.chat[1].port: port 6100 is already used",
        ":9: servers.chat[1].colour: unknown key `colour`",
        ":10: servers.lobby: unknown server type `lobby`",
        "has 5 problems",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let start =
        std::process::Command::new(crate::harness::bin()).arg("start").arg("-c").arg(&file).output().expect("run");
    assert_eq!(start.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&start.stderr), err, "start refuses with the same list");
    assert!(!dir.path().join(".pomelo").exists(), "nothing was started or written");
}

#[test]
fn daemon_mode_runs_in_the_background_until_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("servers.yaml");
    // master.log is capped and rotated like a worker's log (security review: it grew without bound).
    let logs = "  logs:\n    maxSize: 4KiB\n    keep: 2\n";
    std::fs::write(&file, yaml("  chat:\n    - {id: chat-1, port: 0}\n", logs)).expect("write");
    let out =
        std::process::Command::new(crate::harness::bin()).args(["start", "-D", "-c"]).arg(&file).output().expect("run");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("running in the background") && said.contains("dashboard http://127.0.0.1:"), "{said}");
    let master: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(".pomelo/master.json")).expect("master.json"))
            .expect("json");
    let pid = master["pid"].as_u64().expect("pid") as u32;
    // Whatever happens below, the daemon must not outlive the test.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            if alive(self.0) {
                signal(self.0, 15);
            }
        }
    }
    let _reap = Reap(pid);
    assert!(alive(pid));
    wait_until(Duration::from_secs(10), "chat-1 running", || {
        let out = std::process::Command::new(crate::harness::bin()).arg("list").arg("-c").arg(&file).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("chat-1") && l.contains("running"))
            .then_some(())
    });
    // Each refused control connection is a warning line in master.log: 100 of them fill it past 4 KiB.
    let control: std::net::SocketAddr = master["control_addr"].as_str().and_then(|a| a.parse().ok()).expect("control");
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(control) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"\0\0\0\x02{}");
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let _ = s.read(&mut [0u8; 256]);
        }
    }
    let out =
        std::process::Command::new(crate::harness::bin()).arg("stop").arg("-c").arg(&file).output().expect("stop");
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(pid), "stop returns once the master is gone");
    let log = std::fs::read_to_string(dir.path().join("logs/master.log")).expect("master.log");
    assert!(log.contains("every server has stopped"), "{log}");
    assert!(log.len() <= 4096, "master.log is capped: {} bytes", log.len());
    let rotated = dir.path().join("logs/master.log.1");
    assert!(rotated.exists(), "master.log was rotated");
    assert!(!dir.path().join("logs/master.log.3").exists(), "keep: 2");
    use std::os::unix::fs::PermissionsExt;
    for f in ["logs/master.log", "logs/master.log.1", "logs/chat-1.log"] {
        let mode = std::fs::metadata(dir.path().join(f)).expect(f).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}
