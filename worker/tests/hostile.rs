//! Hostile and oversized traffic against one frontend, over WebSocket and TCP: pushes larger than one
//! WebSocket write reach the client, a join-sized reply works, a queue-full kick is delivered, one read
//! carrying hundreds of requests dispatches only `max_inflight_requests` at once, a session over
//! `max_requests_per_second` is kicked with a reason, and a client that resets is not "malformed input".

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pomelo_proto::wire::{self, Message, MessageType, PackageType, Route};
use pomelo_worker::frontend::{BoxFuture, FrontendConfig, Handler, HandlerError, Request};
use serde_json::{json, Value};
use support::{bounded, Client, Kind, Server};
use tokio::sync::watch;

/// Test routes: `t.h.echo` answers its body (binding the uid in `bind` if there is one), `t.h.big` a user list of `n` 64-byte names, `t.h.hold`
/// waits until the gate opens (counting how many wait at once).
struct Probe {
    now: AtomicUsize,
    max: AtomicUsize,
    gate: watch::Receiver<bool>,
}

impl Probe {
    fn new() -> (Arc<Probe>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (Arc::new(Probe { now: AtomicUsize::new(0), max: AtomicUsize::new(0), gate: rx }), tx)
    }
}

impl Handler for Probe {
    fn routes(&self) -> Vec<String> {
        vec!["t.h.echo".into(), "t.h.big".into(), "t.h.hold".into()]
    }

    fn handle<'a>(&'a self, req: Request) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            match req.route.as_str() {
                "t.h.big" => {
                    let n = req.body["n"].as_u64().unwrap_or(0) as usize;
                    let users: Vec<String> = (0..n).map(|i| format!("{i:064}")).collect();
                    Ok(json!({ "users": users }))
                }
                "t.h.hold" => {
                    let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                    self.max.fetch_max(now, Ordering::SeqCst);
                    let mut gate = self.gate.clone();
                    let _ = gate.wait_for(|open| *open).await;
                    self.now.fetch_sub(1, Ordering::SeqCst);
                    Ok(json!({}))
                }
                _ => {
                    if let Some(uid) = req.body.get("bind").and_then(Value::as_str) {
                        req.session.bind(uid).map_err(|e| HandlerError::new(e.to_string()))?;
                    }
                    Ok(req.body)
                }
            }
        })
    }
}

fn config() -> FrontendConfig {
    FrontendConfig { handshake_timeout: Duration::from_secs(2), ..FrontendConfig::connector(Default::default()) }
}

async fn ready(kind: Kind, s: &Server) -> Client {
    let mut c = Client::connect(kind, s.addr).await;
    c.handshake(true).await;
    c
}

/// Binds `uid` to the client's session; returns the session id.
async fn bound(s: &Server, c: &mut Client, uid: &str) -> u64 {
    c.request(1, "t.h.echo", &json!({ "bind": uid })).await;
    s.sessions.get_by_uid(uid)[0].id()
}

fn request(id: u32, route: &str, body: &Value) -> Bytes {
    Message::request(id, Route::Plain(route.into()), Bytes::from(body.to_string())).encode_package().unwrap()
}

/// Reads until `n` DATA packages came, answering heartbeats; returns their bodies.
async fn data(c: &mut Client, n: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = c.recv().await.unwrap_or_else(|| panic!("closed after {} of {n} packages", out.len()));
        match p.kind {
            PackageType::Heartbeat => assert!(c.send_pkg(PackageType::Heartbeat, b"").await),
            PackageType::Data => out.push(p.body),
            other => panic!("unexpected {other:?}: {:?}", String::from_utf8_lossy(&p.body)),
        }
    }
    out
}

#[tokio::test]
async fn pushes_larger_than_one_websocket_write_reach_every_client() {
    bounded(Duration::from_secs(60), async {
        let (probe, _gate) = Probe::new();
        let s = Server::start(config(), probe).await;
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut c = ready(kind, &s).await;
            let id = bound(&s, &mut c, &format!("{kind:?}")).await;
            // One package of 300 KiB, then five of 60 KiB merged into one item (as a chat server sends them).
            let big = wire::encode_push(None, "onChat", &vec![b'x'; 300 * 1024]).unwrap();
            let mut merged = BytesMut::new();
            for _ in 0..5 {
                merged.extend_from_slice(&wire::encode_push(None, "onChat", &vec![b'y'; 60 * 1024]).unwrap());
            }
            assert_eq!(s.sessions.push_bytes(&[id], &big), 1);
            assert_eq!(s.sessions.push_bytes(&[id], &merged.freeze()), 1);
            let got = data(&mut c, 6).await;
            let sizes: Vec<usize> = got.iter().map(|b| Message::decode(b).unwrap().body.len()).collect();
            assert_eq!(sizes, vec![300 * 1024, 60 * 1024, 60 * 1024, 60 * 1024, 60 * 1024, 60 * 1024], "{kind:?}");
            assert_eq!(c.request(2, "t.h.echo", &json!({"still": "here"})).await, json!({"still": "here"}), "{kind:?}");
        }
        assert_eq!(s.metric("write_failures_total"), 0);
        assert_eq!(s.metric("kicks_total"), 0);
    })
    .await;
}

#[tokio::test]
async fn a_reply_listing_ten_thousand_members_reaches_the_client() {
    bounded(Duration::from_secs(60), async {
        let (probe, _gate) = Probe::new();
        let s = Server::start(config(), probe).await;
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut c = ready(kind, &s).await;
            // About 680 KB: 10,000 names of 64 bytes, the longest a connector accepts.
            let r = c.request(1, "t.h.big", &json!({"n": 10_000})).await;
            assert_eq!(r["users"].as_array().map(Vec::len), Some(10_000), "{kind:?}");
            assert_eq!(c.request(2, "t.h.echo", &json!(1)).await, json!(1));
        }
        assert_eq!(s.metric("write_failures_total"), 0);
    })
    .await;
}

#[tokio::test]
async fn a_queue_full_kick_reaches_the_client_with_its_reason() {
    bounded(Duration::from_secs(60), async {
        let (probe, _gate) = Probe::new();
        let s = Server::start(FrontendConfig { queue_max_bytes: 64 * 1024, ..config() }, probe).await;
        let pkg = wire::encode_push(None, "onChat", &vec![b'x'; 4000]).unwrap();
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut slow = Client::connect_small_buffer(kind, s.addr).await;
            slow.handshake(true).await;
            let id = bound(&s, &mut slow, &format!("slow{kind:?}")).await;
            let mut kicked = false;
            for n in 0..50_000 {
                if s.sessions.push_bytes(&[id], &pkg) == 0 {
                    kicked = true;
                    break;
                }
                if n % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            assert!(kicked, "{kind:?}: never kicked");
            // Now read: what was being written, then the KICK, then the close.
            let got = slow.expect_closed(Duration::from_secs(5)).await;
            let last = got.last().unwrap_or_else(|| panic!("{kind:?}: nothing arrived"));
            assert_eq!(last.kind, PackageType::Kick, "{kind:?}: the last package is the KICK");
            let reason: Value = serde_json::from_slice(&last.body).unwrap();
            assert_eq!(reason["reason"], pomelo_worker::frontend::session::QUEUE_FULL_REASON, "{kind:?}");
        }
        assert_eq!(s.metric("queue_full_total"), 2);
    })
    .await;
}

#[tokio::test]
async fn one_read_of_hundreds_of_requests_dispatches_only_the_inflight_cap() {
    bounded(Duration::from_secs(60), async {
        for kind in [Kind::Ws, Kind::Tcp] {
            let (probe, gate) = Probe::new();
            let s = Server::start(config(), probe.clone()).await;
            let cap = config().max_inflight_requests;
            let mut c = ready(kind, &s).await;
            let burst: Vec<u8> = (1..=200).flat_map(|i| request(i, "t.h.hold", &json!({})).to_vec()).collect();
            assert!(c.send_raw(&burst).await);
            s.eventually("the cap busy", |_| probe.now.load(Ordering::SeqCst) == cap).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(probe.max.load(Ordering::SeqCst), cap, "{kind:?}: more than the cap in flight");
            gate.send(true).unwrap();
            let got = data(&mut c, 200).await;
            let mut ids: Vec<u32> = got.iter().map(|b| Message::decode(b).unwrap()).map(|m| m.id).collect();
            ids.sort();
            assert_eq!(ids, (1..=200).collect::<Vec<u32>>(), "{kind:?}: every request answered once");
            assert!(got.iter().all(|b| Message::decode(b).unwrap().kind == MessageType::Response));
            assert_eq!(probe.max.load(Ordering::SeqCst), cap, "{kind:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_session_over_its_request_rate_is_kicked_with_a_reason_and_others_carry_on() {
    bounded(Duration::from_secs(60), async {
        let (probe, _gate) = Probe::new();
        let s = Server::start(FrontendConfig { max_requests_per_second: 100, ..config() }, probe).await;
        let mut bystander = ready(Kind::Tcp, &s).await;
        for (i, kind) in [Kind::Ws, Kind::Tcp].into_iter().enumerate() {
            let mut c = ready(kind, &s).await;
            let burst: Vec<u8> = (1..=400).flat_map(|i| request(i, "t.h.echo", &json!(i)).to_vec()).collect();
            let sent = tokio::time::Instant::now();
            assert!(c.send_raw(&burst).await);
            let got = c.expect_closed(Duration::from_secs(5)).await;
            let answers = got.iter().filter(|p| p.kind == PackageType::Data).count() as f64;
            // The burst of 100, plus what the rate refilled meanwhile.
            let allowed = 100.0 + 100.0 * sent.elapsed().as_secs_f64() + 1.0;
            assert!(answers <= allowed, "{kind:?}: {answers} requests served, at most {allowed} allowed");
            // Requests still in flight when the kick comes are dropped with the session (the KICK says why).
            let inflight = config().max_inflight_requests as f64;
            assert!(answers >= 100.0 - inflight, "{kind:?}: {answers} answered: the burst of 100 is served");
            let last = got.last().unwrap();
            assert_eq!(last.kind, PackageType::Kick, "{kind:?}");
            let reason: Value = serde_json::from_slice(&last.body).unwrap();
            assert_eq!(reason["reason"], "too many requests: more than 100 per second", "{kind:?}");
            assert_eq!(s.metric("rate_limited_total"), i as u64 + 1);
            assert_eq!(bystander.request(i as u32 + 1, "t.h.echo", &json!("ok")).await, json!("ok"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_resets_its_socket_is_not_malformed_input() {
    bounded(Duration::from_secs(30), async {
        let (probe, _gate) = Probe::new();
        let s = Server::start(config(), probe).await;
        for (kind, reset) in [(Kind::Ws, false), (Kind::Ws, true), (Kind::Tcp, false), (Kind::Tcp, true)] {
            let mut c = ready(kind, &s).await;
            c.request(1, "t.h.echo", &json!({})).await;
            // Drop the socket without a WebSocket close frame: with a FIN, or with a reset.
            if reset {
                match &c.t {
                    support::Transport::Ws(ws) => ws.get_ref().set_zero_linger().unwrap(),
                    support::Transport::Tcp(t, _) => t.set_zero_linger().unwrap(),
                }
            }
            drop(c);
            s.eventually("the session gone", |s| s.sessions.count() == 0).await;
        }
        assert_eq!(s.metric("protocol_errors_total"), 0, "a reset is how clients leave, not malformed input");
    })
    .await;
}

#[tokio::test]
async fn timeouts_are_counted() {
    bounded(Duration::from_secs(30), async {
        let (probe, _gate) = Probe::new();
        let cfg = FrontendConfig { handshake_timeout: Duration::from_millis(200), ..config() };
        let s = Server::start(cfg, probe).await;
        // Silent from the start, and silent after the handshake (no ACK), over both transports.
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut quiet = Client::connect(kind, s.addr).await;
            quiet.expect_closed(Duration::from_secs(3)).await;
            let mut no_ack = Client::connect(kind, s.addr).await;
            no_ack.send_pkg(PackageType::Handshake, wire::handshake::JS_CLIENT_HANDSHAKE.as_bytes()).await;
            no_ack.expect_closed(Duration::from_secs(3)).await;
        }
        s.eventually("four timeouts counted", |s| s.metric("timeouts_total") == 4).await;
    })
    .await;
}
