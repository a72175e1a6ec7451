//! Hostile and oversized clients against a real cluster, over WebSocket and raw TCP: a burst of large
//! messages reaches every member, a push of the maximum message size reaches WebSocket members, request
//! floods are limited without costing anyone else, a bounded fuzz run leaves the cluster serving, and the
//! log view survives an invalid UTF-8 byte. Clients are `worker/tests/support`'s async Ws/Tcp clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pomelo_proto::wire::{Message, MessageType, PackageType, Route};
use serde_json::{json, Value};

use crate::harness::{wait_until, yaml, Cluster};

#[path = "../worker/tests/support/mod.rs"]
#[allow(unused_imports)]
pub(crate) mod support;

pub(crate) use support::{Client, Kind};

pub(crate) const SEND: &str = "chat.chatHandler.send";
pub(crate) const ENTER: &str = "connector.entryHandler.enter";

/// One gate, one connector, one chat server. The heartbeat is long: these clients only answer the
/// server's heartbeats while a test reads them, and a heartbeat timeout is not what is tested here.
pub(crate) fn cluster(connector_extra: &str) -> (Cluster, SocketAddr, SocketAddr) {
    let servers = format!(
        "  gate:\n    - {{id: gate-1, clientPort: 0}}\n  connector:\n    - {{id: connector-1, port: 0, clientPort: 0, heartbeat: 30s{connector_extra}}}\n  chat:\n    - {{id: chat-1, port: 0}}\n"
    );
    let c = Cluster::start(&yaml(&servers, ""));
    c.wait_running();
    let addr = |id: &str, key: &str| -> SocketAddr {
        let a = c.server(id)["addrs"][key].as_str().map(str::to_owned);
        a.unwrap_or_else(|| panic!("{id} has no {key} address")).parse().expect("address")
    };
    let (gate, conn) = (addr("gate-1", "client"), addr("connector-1", "client"));
    (c, gate, conn)
}

/// The last lines of a server's log, for failure messages.
fn log_tail(c: &Cluster, id: &str) -> String {
    let v = c.api(&format!("/api/servers/{id}/logs?lines=30"));
    v["lines"].as_array().map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Handshake and enter `rid` as `name`; waits (bounded) until the connector reaches its chat server.
pub(crate) async fn member(kind: Kind, conn: SocketAddr, name: &str, rid: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = Client::connect(kind, conn).await;
        c.handshake(true).await;
        let r = c.request(1, ENTER, &json!({"username": name, "rid": rid})).await;
        if r["users"].is_array() {
            return c;
        }
        assert!(Instant::now() < deadline, "{name} cannot enter {rid}: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn send_pkg(id: u32, rid: &str, from: &str, content: Value) -> Bytes {
    let body = json!({"rid": rid, "from": from, "target": "*", "content": content});
    Message::request(id, Route::Plain(SEND.into()), Bytes::from(body.to_string())).encode_package().expect("encode")
}

/// What one client saw: onChat `(from, msg)`, responses by id, the KICK if any, whether it closed.
#[derive(Default, Debug)]
pub(crate) struct Seen {
    pub(crate) chats: Vec<(String, Value)>,
    pub(crate) responses: Vec<(u32, Value)>,
    pub(crate) kick: Option<Value>,
    pub(crate) closed: bool,
}

impl Seen {
    /// Contents of the onChat pushes from `from`.
    pub(crate) fn from(&self, from: &str) -> Vec<&Value> {
        self.chats.iter().filter(|(f, _)| f == from).map(|(_, m)| m).collect()
    }
}

/// Reads (answering heartbeats) until `done` holds, the connection closes, or `within` passes.
pub(crate) async fn watch(c: &mut Client, within: Duration, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    watch_into(c, &mut seen, within, done).await;
    seen
}

async fn watch_into(c: &mut Client, seen: &mut Seen, within: Duration, done: impl Fn(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(seen) && !seen.closed {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = match c.recv_within(left).await {
            Err(()) => break,
            Ok(None) => {
                seen.closed = true;
                break;
            }
            Ok(Some(p)) => p,
        };
        match p.kind {
            PackageType::Heartbeat => {
                c.send_pkg(PackageType::Heartbeat, b"").await;
            }
            PackageType::Kick => seen.kick = serde_json::from_slice(&p.body).ok(),
            PackageType::Data => {
                let m = Message::decode(&p.body).expect("a valid message");
                let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                match (m.kind, m.route) {
                    (MessageType::Response, _) => seen.responses.push((m.id, body)),
                    (MessageType::Push, Some(Route::Plain(r))) if r == "onChat" => {
                        seen.chats.push((body["from"].as_str().unwrap_or("").to_owned(), body["msg"].clone()))
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Sends each package at once, taking in what has already arrived between them (as a browser's event
/// loop does), so a client that sends a burst still reads while it sends.
async fn send_reading(c: &mut Client, seen: &mut Seen, pkgs: &[Bytes]) {
    for pkg in pkgs {
        assert!(c.send_raw(pkg).await, "closed while sending");
        watch_into(c, seen, Duration::from_millis(2), |_| false).await;
    }
}

#[test]
fn a_burst_of_large_messages_reaches_every_websocket_and_tcp_member() {
    let (c, _gate, conn) = cluster("");
    runtime().block_on(async {
        let kinds = [Kind::Ws, Kind::Ws, Kind::Tcp, Kind::Tcp];
        let mut members = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            members.push(member(kind, conn, &format!("m{i}"), "burst").await);
        }
        for sender in [0, 2] {
            // 30 messages of 60 KB back to back: the chat server merges them into batches of up to 256 KiB.
            let tag = format!("s{sender}");
            let burst: Vec<Bytes> = (0..30u32)
                .map(|i| send_pkg(100 + i, "burst", &tag, json!(format!("{tag}-{i:02}-{}", "x".repeat(60_000)))))
                .collect();
            // Every member reads at the same time, as real clients do.
            let mut tasks = Vec::new();
            for (i, mut m) in members.drain(..).enumerate() {
                // The connector sets `from` to the sender's username.
                let (burst, from) = (if i == sender { burst.clone() } else { Vec::new() }, format!("m{sender}"));
                tasks.push(tokio::spawn(async move {
                    let mut seen = Seen::default();
                    send_reading(&mut m, &mut seen, &burst).await;
                    let want = burst.len();
                    watch_into(&mut m, &mut seen, Duration::from_secs(40), |s| {
                        s.from(&from).len() >= 30 && s.responses.len() >= want
                    })
                    .await;
                    (m, seen)
                }));
            }
            let from = format!("m{sender}");
            for (i, t) in tasks.into_iter().enumerate() {
                let (m, seen) = t.await.expect("member task");
                members.push(m);
                let kind = kinds[i];
                assert!(
                    !seen.closed && seen.kick.is_none(),
                    "member {i} ({kind:?}) dropped: {:?}\n{}",
                    seen.kick,
                    log_tail(&c, "connector-1")
                );
                let got: Vec<String> =
                    seen.from(&from).iter().map(|v| v.as_str().unwrap_or("").chars().take(5).collect()).collect();
                let want: Vec<String> = (0..30).map(|n| format!("{tag}-{n:02}")).collect();
                assert_eq!(got, want, "member {i} ({kind:?}) after sender {sender}");
                assert!(seen.from(&from).iter().all(|v| v.as_str().is_some_and(|s| s.len() == 60_006)));
                assert!(seen.responses.iter().all(|(_, r)| r == &json!({})), "{:?}", seen.responses);
            }
        }
    });
    // Stats reach the master with the worker's heartbeat: wait until they include the bursts (4 members
    // x 60 messages x 60 KB went out), then nothing may have failed or been kicked.
    let m = wait_until(Duration::from_secs(10), "the bursts in the stats", || {
        let m = c.api("/api/servers/connector-1");
        (m["stats"]["bytes_out_total"].as_f64()? >= 4.0 * 60.0 * 60_000.0).then_some(m)
    });
    assert_eq!(m["stats"]["write_failures_total"], 0.0, "{m}");
    assert_eq!(m["stats"]["kicks_total"], 0.0, "{m}");
}

#[test]
fn a_push_of_the_maximum_message_size_reaches_websocket_members() {
    let (_c, _gate, conn) = cluster(", maxMessageSize: 320KiB");
    runtime().block_on(async {
        // The connector sets `from` to the sender's username.
        let mut ws = member(Kind::Ws, conn, "ws", "big").await;
        let mut tcp = member(Kind::Tcp, conn, "tcp", "big").await;
        let content = "y".repeat(300 * 1024);
        for from in ["tcp", "ws"] {
            let pkg = send_pkg(7, "big", from, json!(content));
            let sender = if from == "ws" { &mut ws } else { &mut tcp };
            assert!(sender.send_raw(&pkg).await);
            for (m, kind) in [(&mut ws, "ws"), (&mut tcp, "tcp")] {
                let mine = kind == from;
                let seen = watch(m, Duration::from_secs(20), |s| {
                    !s.from(from).is_empty() && (!mine || !s.responses.is_empty())
                })
                .await;
                assert!(!seen.closed && seen.kick.is_none(), "{kind} member dropped: {:?}", seen.kick);
                let got = seen.from(from).first().and_then(|v| v.as_str()).map(str::len);
                assert_eq!(got, Some(300 * 1024), "{kind} member, push from {from}");
                if mine {
                    assert_eq!(seen.responses, vec![(7, json!({}))], "{kind} sender");
                }
            }
        }
    });
}

#[test]
fn request_floods_are_limited_and_cost_other_users_nothing() {
    let (c, _gate, conn) = cluster("");
    runtime().block_on(async {
        for kind in [Kind::Ws, Kind::Tcp] {
            let tag = format!("{kind:?}").to_lowercase();
            let mut victim = member(kind, conn, &format!("victim-{tag}"), "calm").await;
            let mut attackers = Vec::new();
            for i in 0..3 {
                attackers.push(member(kind, conn, &format!("atk{i}-{tag}"), "loud").await);
            }
            // Each attacker: one write (one WebSocket message) of 4,000 send requests.
            // As small as a send gets (dictionary route, no rid), so 4,000 fit one WebSocket message.
            let send = |i: u32| {
                Message::request(10 + i % 100, Route::Code(1), Bytes::from_static(br#"{"target":"*","content":1}"#))
            };
            let flood: Vec<u8> =
                (0..4000u32).flat_map(|i| send(i).encode_package().expect("encode").to_vec()).collect();
            // The victim sends all through the flood, in its own task, and gets normal replies.
            let victim_task = tokio::spawn(async move {
                for i in 0..20u32 {
                    let body = json!({"rid": "calm", "from": "v", "target": "*", "content": i});
                    let r = victim.request(100 + i, SEND, &body).await;
                    assert_eq!(r, json!({}), "{kind:?}: victim request {i} during the flood");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                victim
            });
            let flooded = Instant::now();
            for a in attackers.iter_mut() {
                assert!(a.send_raw(&flood).await);
            }
            let mut victim = victim_task.await.expect("the victim's requests");
            for (i, a) in attackers.iter_mut().enumerate() {
                let seen = watch(a, Duration::from_secs(20), |s| s.kick.is_some()).await;
                let reason = seen.kick.as_ref().and_then(|k| k["reason"].as_str()).map(str::to_owned);
                assert_eq!(
                    reason.as_deref(),
                    Some("too many requests: more than 500 per second"),
                    "{kind:?} attacker {i}: {} responses, closed {}",
                    seen.responses.len(),
                    seen.closed
                );
                // The burst of 500, plus what the rate refilled while the flood was being served.
                let allowed = 500.0 + 500.0 * flooded.elapsed().as_secs_f64() + 1.0;
                let served = seen.responses.len() as f64;
                assert!(served <= allowed, "{kind:?} attacker {i}: {served} served, at most {allowed} allowed");
                assert!(seen.responses.iter().all(|(_, r)| r == &json!({})), "{kind:?}: an attacker got an error");
            }
            // Its own 20 messages reach it (some already taken in while it waited for its replies).
            let early = victim.pushes.iter().filter(|(r, _)| r == "onChat").count();
            let seen = watch(&mut victim, Duration::from_secs(10), |s| early + s.chats.len() >= 20).await;
            assert!(!seen.closed && seen.kick.is_none(), "{kind:?}: the victim was dropped");
            assert_eq!(early + seen.chats.len(), 20, "{kind:?}: the victim's own messages");
        }
    });
    // Stats reach the master with the worker's heartbeat: wait for the six kicks to show.
    let stat = |name: &str| c.api("/api/servers/connector-1")["stats"][name].as_f64();
    wait_until(Duration::from_secs(10), "six rate-limit kicks counted", || {
        (stat("rate_limited_total") == Some(6.0)).then_some(())
    });
    assert_eq!(stat("rpc_errors_total"), Some(0.0), "no request failed on the way to the chat server");
}

#[test]
fn the_log_view_shows_lines_around_an_invalid_utf8_byte() {
    let (c, _gate, _conn) = cluster("");
    let path = c.dir.path().join("logs/connector-1.log");
    wait_until(Duration::from_secs(10), "connector-1.log", || path.exists().then_some(()));
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open the log");
    std::io::Write::write_all(&mut f, b"before the bad byte\n\xff invalid\nafter the bad byte\n").expect("append");
    drop(f);
    let v = c.api("/api/servers/connector-1/logs?lines=50");
    let lines: Vec<&str> = v["lines"].as_array().expect("lines").iter().filter_map(Value::as_str).collect();
    assert!(lines.contains(&"before the bad byte"), "{lines:?}");
    assert!(lines.contains(&"\u{FFFD} invalid"), "{lines:?}");
    assert!(lines.contains(&"after the bad byte"), "{lines:?}");
}

#[test]
fn the_client_limits_are_checked_in_servers_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("servers.yaml");
    let text = "servers:\n  gate:\n    - {id: g, clientPort: 0, maxRequestsPerSecond: 0}\n  connector:\n    - id: c\n      port: 0\n      clientPort: 0\n      maxMessageSize: 2MiB\n  chat:\n    - {id: h, port: 0, maxMessageSize: 64KiB}\n";
    std::fs::write(&file, text).expect("write");
    let check =
        std::process::Command::new(crate::harness::bin()).args(["check", "-c"]).arg(&file).output().expect("run");
    assert_eq!(check.status.code(), Some(2));
    let err = String::from_utf8_lossy(&check.stderr);
    for needle in [
        ":3: servers.gate[0].maxRequestsPerSecond: must be at least 1",
        ":8: servers.connector[0].maxMessageSize: between 1KiB and 1MiB",
        ":10: servers.chat[0].maxMessageSize: `maxMessageSize` applies to frontends",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let ok = "servers:\n  connector:\n    - {id: c, port: 0, clientPort: 0, maxMessageSize: 1MiB, maxRequestsPerSecond: 20}\n  chat:\n    - {id: h, port: 0}\n";
    std::fs::write(&file, ok).expect("write");
    let check =
        std::process::Command::new(crate::harness::bin()).args(["check", "-c"]).arg(&file).output().expect("run");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn max_requests_per_second_from_servers_yaml_reaches_the_connector() {
    let (_c, _gate, conn) = cluster(", maxRequestsPerSecond: 20");
    runtime().block_on(async {
        for kind in [Kind::Ws, Kind::Tcp] {
            let name = format!("{kind:?}");
            let mut c = member(kind, conn, &name, "slow").await;
            let burst: Vec<u8> = (0..100u32).flat_map(|i| send_pkg(10 + i, "slow", &name, json!(i)).to_vec()).collect();
            assert!(c.send_raw(&burst).await);
            let seen = watch(&mut c, Duration::from_secs(10), |s| s.kick.is_some()).await;
            let reason = seen.kick.as_ref().and_then(|k| k["reason"].as_str()).map(str::to_owned);
            assert_eq!(reason.as_deref(), Some("too many requests: more than 20 per second"), "{kind:?}");
        }
    });
}
