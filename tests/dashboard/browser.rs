//! The dashboard page in headless Chromium, driven by browser/dashboard.js: login, the live table, a restart
//! from the page, charts, logs, the config-error banner, and a master restarting (same token, then a new one).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{browser_ready, repo, yaml, Cluster, SMALL};

/// A port that was free a moment ago, for a master that must come back on the same admin address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Logged-in users sending a chat message every 120 ms, so the figures and charts have something to show.
/// Stops when `stop` is set, or after 90 s whatever happens.
fn chat_traffic(gate: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rooms = ["lobby", "tea", "ops"];
        let mut users: Vec<_> = (0..6)
            .map(|i| (crate::pomelo_client::login(gate, &format!("viewer{i}"), rooms[i % 3]).0, rooms[i % 3]))
            .collect();
        let until = Instant::now() + Duration::from_secs(90);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            let (client, rid) = &mut users[(n % 6) as usize];
            let msg = json!({"rid": rid, "content": format!("tick {n}"), "from": "viewer", "target": "*"});
            client.request("chat.chatHandler.send", msg);
            client.drain_pushes(Duration::from_millis(1));
            n += 1;
            std::thread::sleep(Duration::from_millis(120));
        }
    })
}

/// Kills the node script if the test fails half-way.
struct Script(std::process::Child);
impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_works_in_a_browser() {
    if !browser_ready() {
        return;
    }
    // A fixed admin port, so the page can find the master again after it restarts.
    let port = free_port();
    let good = yaml(SMALL, "").replace("admin: 127.0.0.1:0", &format!("admin: 127.0.0.1:{port}"));
    let mut c = Cluster::start(&good);
    c.wait_running();
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = chat_traffic(gate, stop.clone());
    let shot = c.dir.path().join("dashboard.png");
    let started = Instant::now();
    let mut script = Script(
        Command::new("node")
            .arg(repo().join("browser/dashboard.js"))
            .arg(format!("http://{}/", c.admin_addr()))
            .arg(c.token())
            .arg(&shot)
            .args(["chat-1", "--master-restarts"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(c.dir.path().join("node.err")).expect("node.err"))
            .spawn()
            .expect("run node"),
    );
    let mut input = script.0.stdin.take().expect("stdin");
    let output = std::io::BufReader::new(script.0.stdout.take().expect("stdout"));
    let mut last = String::new();
    for line in output.lines() {
        let line = line.expect("read the script's output");
        let asked: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let answer = match asked["await"].as_str() {
            Some("break-config") => {
                std::fs::write(c.config(), format!("{good}bogus: 1\n")).expect("write servers.yaml");
                let _ = c.post("/api/reload");
                "broken".to_string()
            }
            Some("fix-config") => {
                std::fs::write(c.config(), &good).expect("write servers.yaml");
                let _ = c.post("/api/reload");
                "fixed".to_string()
            }
            Some("kill-master") => {
                c.kill_master();
                "killed".to_string()
            }
            Some("start-master") => {
                c.spawn_master();
                format!("started {}", c.master_pid().unwrap_or(0))
            }
            Some("new-token") => {
                c.kill_master();
                std::fs::remove_file(c.dir.path().join(".pomelo/admin-token")).expect("remove the token");
                c.spawn_master();
                assert_eq!(c.admin_addr().port(), port);
                format!("token {} {}", c.token(), c.master_pid().unwrap_or(0))
            }
            _ => {
                last = line;
                continue;
            }
        };
        writeln!(input, "{answer}").expect("answer the script");
    }
    let status = script.0.wait().expect("node exit");
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.join();
    let err = std::fs::read_to_string(c.dir.path().join("node.err")).unwrap_or_default();
    assert!(status.success(), "browser test failed:\n{last}\n{err}");
    eprintln!("browser test passed in {:?}: {last}", started.elapsed());
    let seen: Value = serde_json::from_str(&last).expect("the script's JSON");
    assert_eq!(seen["ok"], true);
    assert_ne!(seen["pid_before"], seen["pid_after"]);
    assert_eq!(seen["restarts"], 1);
    assert_eq!(seen["relogged_in"], true);
    assert!(seen["config_banner"].as_str().is_some_and(|e| e.contains("bogus")), "{seen}");
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    let keep = repo().join("target/screenshots");
    std::fs::create_dir_all(&keep).ok();
    std::fs::write(keep.join("dashboard.png"), png).ok();
}
