//! The admin server of a real cluster: JSON API, auth (bearer, login cookie, CSRF), the SSE live feed, and
//! `/metrics` checked by promtool; the page in a browser is in [`browser`].

mod browser;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{have, request, signal, wait_until, yaml, Cluster, SMALL};

fn pid_of(c: &Cluster, id: &str) -> u64 {
    c.server(id)["pid"].as_u64().unwrap_or(0)
}

#[test]
fn api_lists_restarts_stops_starts_and_refuses_what_it_should() {
    let c = Cluster::start(&yaml(SMALL, ""));
    let pids = c.wait_running();
    let token = c.token();
    let addr = c.admin_addr();

    // List: the master and every server, with live figures.
    let list = c.api("/api/servers");
    let ids: Vec<&str> = list["servers"].as_array().expect("servers").iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["gate-1", "connector-1", "connector-2", "chat-1", "chat-2"]);
    assert_eq!(list["master"]["pid"].as_u64(), c.master_pid().map(u64::from));
    assert!(list["servers"][0]["rss_bytes"].as_u64().is_some());

    // No token: 401 with a JSON error, for every route but /healthz and the login form.
    for path in ["/api/servers", "/api/servers/chat-1", "/api/events", "/metrics", "/assets/app.js"] {
        let (status, body) = c.http("GET", path, None);
        assert_eq!(status, 401, "GET {path} without a token: {body}");
        let err: Value = serde_json::from_str(&body).expect("a JSON error body");
        assert_eq!(err["error"], "unauthorized", "{body}");
    }
    assert_eq!(c.http("GET", "/api/servers", Some("wrong-token-wrong-token")).0, 401);
    assert_eq!(c.http("POST", "/api/servers/chat-1/restart", None).0, 401);
    assert_eq!(c.http("GET", "/healthz", None), (200, "ok".to_string()));

    // Unknown ids: 404 with a JSON error.
    let (status, body) = c.http("GET", "/api/servers/nope", Some(&token));
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["error"], "unknown server");
    assert_eq!(c.post("/api/servers/nope/restart").0, 404);
    // Mutations are POST-only.
    assert_eq!(c.http("GET", "/api/servers/chat-1/restart", Some(&token)).0, 405);

    // Restart: a new pid, one more restart.
    let before = c.server("chat-1");
    let (status, reply) = c.post("/api/servers/chat-1/restart");
    assert_eq!(status, 202, "{reply}");
    let after = wait_until(Duration::from_secs(20), "chat-1 restarted", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"] != before["pid"] && s["pid"].is_u64()).then_some(s)
    });
    assert_eq!(after["restarts"].as_u64(), before["restarts"].as_u64().map(|r| r + 1));

    // Stop, stop again (409), start.
    assert_eq!(c.post("/api/servers/chat-2/stop").0, 202);
    let stopped = c.wait_state("chat-2", "stopped", Duration::from_secs(10));
    assert!(stopped["pid"].is_null(), "{stopped}");
    let (status, reply) = c.post("/api/servers/chat-2/stop");
    assert_eq!(status, 409, "{reply}");
    assert!(reply["error"].is_string());
    assert_eq!(c.post("/api/servers/chat-2/start").0, 202);
    c.wait_state("chat-2", "running", Duration::from_secs(20));
    assert_ne!(pid_of(&c, "chat-2"), pids.iter().find(|(id, _)| id == "chat-2").map(|p| u64::from(p.1)).unwrap_or(0));

    // The login form: no token → form only; wrong → 401; right → cookie and redirect.
    let (status, _, page) = request(addr, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains("name=\"token\"") && !page.contains("chat-1") && !page.contains("app.js"), "{page}");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, page) = request(addr, "POST", "/login", &form, "token=wrong");
    assert_eq!(status, 401);
    assert!(page.contains("not the admin token"));
    let (status, head, _) = request(addr, "POST", "/login", &form, &format!("token={token}"));
    assert_eq!(status, 303, "{head}");
    let set = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l[11..].trim().to_string()))
        .expect("a Set-Cookie");
    assert!(set.ends_with("; HttpOnly; SameSite=Strict; Path=/"), "{set}");
    assert!(!set.contains(&token), "the cookie is a session id, never the token: {set}");
    assert!(head.to_ascii_lowercase().contains("location: /\r") || head.to_ascii_lowercase().ends_with("location: /"));
    // The token itself is no cookie (a stolen cookie must not be the token, and vice versa).
    let token_cookie = format!("pomelo_admin={token}");
    assert_eq!(request(addr, "GET", "/api/servers", &[("Cookie", &token_cookie)], "").0, 401);

    // The cookie authenticates reads and same-origin POSTs; a cross-origin POST is refused (CSRF).
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    let (status, _, page) = request(addr, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200);
    assert!(page.contains("/assets/app.js"));
    let pid = pid_of(&c, "gate-1");
    let evil = [("Cookie", cookie.as_str()), ("Origin", "http://evil.example")];
    let (status, _, body) = request(addr, "POST", "/api/servers/gate-1/restart", &evil, "");
    assert_eq!(status, 403, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pid_of(&c, "gate-1"), pid, "a refused request changed nothing");
    let origin = format!("http://{addr}");
    let own = [("Cookie", cookie.as_str()), ("Origin", origin.as_str())];
    assert_eq!(request(addr, "POST", "/api/servers/gate-1/restart", &own, "").0, 202);
    let (status, head, _) = request(addr, "POST", "/logout", &[("Cookie", &cookie)], "");
    assert_eq!(status, 303);
    assert!(head.contains("Max-Age=0"), "{head}");
    assert_eq!(request(addr, "GET", "/api/servers", &[("Cookie", &cookie)], "").0, 401, "logout ends the session");
    // The CLI still works over the bearer API.
    let out = c.run(&["list", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Reads SSE events from a raw socket: (event, data) pairs, chunk-size lines ignored.
struct Sse {
    stream: TcpStream,
    buf: String,
    event: String,
}

impl Sse {
    fn open(addr: SocketAddr, token: &str) -> Sse {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let req = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).expect("write");
        Sse { stream, buf: String::new(), event: String::new() }
    }

    /// The next event, waiting at most until `deadline`.
    fn next(&mut self, deadline: Instant) -> Option<(String, String)> {
        loop {
            while let Some(i) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=i).collect();
                let line = line.trim_end();
                if let Some(e) = line.strip_prefix("event:") {
                    self.event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    return Some((std::mem::take(&mut self.event), d.trim().to_string()));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok();
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) => return None,
            }
        }
    }
}

#[test]
fn the_live_feed_reports_a_killed_worker_within_a_second() {
    let c = Cluster::start(&yaml(SMALL, ""));
    c.wait_running();
    let mut sse = Sse::open(c.admin_addr(), &c.token());
    let (event, data) = sse.next(Instant::now() + Duration::from_secs(5)).expect("a first event");
    assert_eq!(event, "snapshot");
    let snapshot: Value = serde_json::from_str(&data).expect("snapshot JSON");
    assert_eq!(snapshot["servers"].as_array().map(Vec::len), Some(5));
    assert!(snapshot["at_ms"].as_u64().is_some());
    // A stats tick comes within about a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while sse.next(deadline).expect("a stats event").0 != "stats" {}

    let victim = pid_of(&c, "chat-1");
    let killed = Instant::now();
    signal(victim as u32, 9);
    let deadline = killed + Duration::from_secs(1);
    let (latency, ev) = loop {
        let (event, data) = sse.next(deadline).expect("a state event for chat-1 within a second of kill -9");
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if event == "state" && v["id"] == "chat-1" && v["state"] != "running" {
            break (killed.elapsed(), v);
        }
    };
    eprintln!("SSE: kill -9 of chat-1 seen after {latency:?}: {ev}");
    // ... and it comes back, with a new pid, on the same feed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (event, data) = sse.next(deadline).expect("chat-1 running again on the feed");
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if event == "state" && v["id"] == "chat-1" && v["state"] == "running" {
            assert!(v["pid"].as_u64().is_some_and(|p| p != victim), "{v}");
            break;
        }
    }

    // Feeds are bounded: 32 at once (this one included), then 503.
    let mut open: Vec<Sse> = (0..31).map(|_| Sse::open(c.admin_addr(), &c.token())).collect();
    for s in &mut open {
        assert_eq!(s.next(Instant::now() + Duration::from_secs(5)).map(|e| e.0).as_deref(), Some("snapshot"));
    }
    let (status, body) = c.http("GET", "/api/events", Some(&c.token()));
    assert_eq!(status, 503, "{body}");
    drop(open);
}

/// Per-server families that must have exactly one series per server.
const PER_SERVER: &[&str] = &[
    "pomelo_server_up",
    "pomelo_server_state",
    "pomelo_server_restarts_total",
    "pomelo_server_uptime_seconds",
    "pomelo_server_cpu_seconds_total",
    "pomelo_server_resident_memory_bytes",
    "pomelo_server_open_fds",
    "pomelo_server_connections",
    "pomelo_server_handshakes_total",
    "pomelo_server_rooms",
    "pomelo_server_members",
    "pomelo_server_messages_in_total",
    "pomelo_server_deliveries_out_total",
    "pomelo_server_protocol_errors_total",
];

/// server_id → number of series, for one family.
fn series(text: &str, family: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&format!("{family}{{"))) {
        let id = line.split("server_id=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        *out.entry(id.to_string()).or_insert(0) += 1;
    }
    out
}

fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

#[test]
fn metrics_pass_promtool_with_one_series_per_server() {
    if !have(Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()), "promtool") {
        return;
    }
    let c = Cluster::start(&yaml(SMALL, ""));
    c.wait_running();
    // Wait for every worker's first stats report, so their own series are in the scrape too.
    wait_until(Duration::from_secs(10), "stats from every worker", || {
        c.servers().iter().all(|s| s["stats"].as_object().is_some_and(|m| !m.is_empty())).then_some(())
    });
    let (status, text) = c.http("GET", "/metrics", Some(&c.token()));
    assert_eq!(status, 200);
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics failed:\n{said}\n--- /metrics ---\n{text}");
    eprintln!("promtool check metrics: ok ({} lines){}", text.lines().count(), said.trim());
    let ids = ["chat-1", "chat-2", "connector-1", "connector-2", "gate-1"];
    for family in PER_SERVER {
        let found = series(&text, family);
        let want: BTreeMap<String, usize> = ids.iter().map(|id| (id.to_string(), 1)).collect();
        assert_eq!(found, want, "{family}: one series per server\n{text}");
    }
    assert!(text.contains("pomelo_server_up{server_id=\"chat-1\",server_type=\"chat\"} 1"), "{text}");
    assert!(text.contains("pomelo_server_state{server_id=\"chat-1\",server_type=\"chat\",state=\"running\"} 1"));
    assert!(text.contains("# TYPE pomelo_server_messages_in_total counter"));
    assert!(text.contains("pomelo_cluster_servers{state=\"running\"} 5"));
    // Other worker stats are exported too, typed by their name.
    assert!(text.contains("# TYPE pomelo_server_requests_total counter"), "{text}");
    // Connectors report their chat RPC latency as a histogram.
    assert!(text.contains("# TYPE pomelo_server_rpc_latency_seconds histogram"), "{text}");
    assert!(text.contains("pomelo_server_rpc_latency_seconds_bucket{server_id=\"connector-1\""), "{text}");
    for own in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(text.lines().any(|l| l.starts_with(own)), "the master's {own}\n{text}");
    }

    // A server removed from servers.yaml leaves no series behind.
    std::fs::write(c.config(), yaml(&SMALL.replace("    - {id: chat-2, port: 0}\n", ""), "")).expect("write");
    let _ = c.post("/api/reload");
    wait_until(Duration::from_secs(20), "chat-2 removed", || {
        (!c.servers().iter().any(|s| s["id"] == "chat-2")).then_some(())
    });
    let (_, text) = c.http("GET", "/metrics", Some(&c.token()));
    assert!(!text.contains("chat-2"), "chat-2 lingers:\n{text}");
    assert_eq!(series(&text, "pomelo_server_up").len(), 4);
    let (ok, said) = promtool(&text);
    assert!(ok, "{said}");
}
