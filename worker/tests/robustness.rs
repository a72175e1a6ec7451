//! Pomelo's rules and bad input over real sockets: malformed bytes close only their own connection and
//! are counted, a client that stops reading is kicked with its queue capped, `max_connections` refuses
//! and recovers, routing rules, timeouts and plain HTTP.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pomelo_proto::control::Membership;
use pomelo_proto::wire::{Message, PackageType, Route};
use pomelo_worker::connector::Connector;
use pomelo_worker::frontend::FrontendConfig;
use pomelo_worker::gate::Gate;
use serde_json::{json, Value};
use support::local_rooms::{self, LocalRooms};
use support::{bounded, Client, Kind, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

async fn connector(cfg: FrontendConfig) -> Server {
    Server::start(cfg, Arc::new(Connector::new(Arc::new(LocalRooms::new())))).await
}

fn quick() -> FrontendConfig {
    FrontendConfig { handshake_timeout: Duration::from_millis(500), ..local_rooms::connector_config() }
}

async fn entered(kind: Kind, s: &Server, name: &str) -> Client {
    let mut c = Client::connect(kind, s.addr).await;
    c.handshake(true).await;
    let r = c.request(1, "connector.entryHandler.enter", &json!({"username":name,"rid":"r"})).await;
    assert!(r["users"].is_array(), "{r}");
    c
}

/// A deterministic byte generator (xorshift), so failures reproduce.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn malformed_input_closes_only_that_connection() {
    bounded(Duration::from_secs(60), async {
        let s = connector(quick()).await;
        let mut good = entered(Kind::Ws, &s, "good").await;
        let before = s.metric("protocol_errors_total");
        let mut definite = 0;

        // Unknown package type, as the very first bytes of a TCP connection.
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.send_raw(&[9, 0, 0, 1, 0]).await;
        c.expect_closed(Duration::from_secs(2)).await;
        definite += 1;

        // A client may not send KICK (type 5).
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.handshake(true).await;
        c.send_pkg(PackageType::Kick, b"{}").await;
        c.expect_closed(Duration::from_secs(2)).await;
        definite += 1;

        // Oversized package (128 KiB declared, cap 64 KiB), over TCP and over WebSocket.
        for kind in [Kind::Tcp, Kind::Ws] {
            let mut c = Client::connect(kind, s.addr).await;
            c.handshake(true).await;
            let mut big = vec![4u8, 0x02, 0x00, 0x00];
            big.extend(std::iter::repeat_n(b'x', 128 * 1024));
            c.send_raw(&big).await;
            c.expect_closed(Duration::from_secs(2)).await;
            definite += 1;
        }
        assert!(s.metric("oversized_total") >= 1);

        // A WebSocket message over the WebSocket cap (4 full packages) is refused by the WebSocket layer.
        let mut c = Client::connect(Kind::Ws, s.addr).await;
        c.handshake(true).await;
        let counted = s.metric("protocol_errors_total");
        c.send_raw(&vec![3u8; 300 * 1024]).await;
        c.expect_closed(Duration::from_secs(2)).await;
        s.eventually("the WebSocket overflow counted", |s| s.metric("protocol_errors_total") == counted + 1).await;
        definite += 1;

        // A WebSocket message ending in a truncated package.
        let mut c = Client::connect(Kind::Ws, s.addr).await;
        c.send_raw(&[3, 0, 0, 0, 4, 0, 0, 10, 1, 2]).await;
        c.expect_closed(Duration::from_secs(2)).await;
        definite += 1;

        // A DATA package whose message is undecodable (type 7 in the flag).
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.handshake(true).await;
        c.send_pkg(PackageType::Data, &[0x0e, 1, 2, 3]).await;
        c.expect_closed(Duration::from_secs(2)).await;
        definite += 1;

        // A truncated package over TCP waits for more, then the handshake timeout closes it.
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.send_raw(&[1, 0, 0, 50, b'{']).await;
        c.expect_closed(Duration::from_secs(2)).await;

        // Random bytes: every connection ends (error, refusal or handshake timeout), none hangs.
        let mut tasks = Vec::new();
        for seed in 0..40u64 {
            let addr = s.addr;
            tasks.push(tokio::spawn(async move {
                let kind = if seed % 2 == 0 { Kind::Tcp } else { Kind::Ws };
                let mut c = Client::connect(kind, addr).await;
                if seed % 4 == 1 {
                    c.handshake(true).await;
                }
                c.send_raw(&noise(seed, 1 + (seed as usize * 37) % 300)).await;
                c.expect_closed(Duration::from_secs(3)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        let errors = s.metric("protocol_errors_total") - before;
        assert!(errors >= definite, "{errors} protocol errors counted, expected at least {definite}");
        // The server and the other client are unaffected.
        let r = good.request(2, "chat.chatHandler.send", &json!({"content":"still here","target":"*"})).await;
        assert_eq!(r, json!({}));
        assert_eq!(good.next_push().await.1["msg"], "still here");
        assert!(!s.task.as_ref().unwrap().is_finished());
        s.eventually("only the good session left", |s| s.sessions.count() == 1).await;
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_kicked_and_its_queue_stays_capped() {
    bounded(Duration::from_secs(60), async {
        let cap = 64 * 1024;
        let s = connector(FrontendConfig { queue_max_bytes: cap, ..quick() }).await;
        let pkg = pomelo_proto::wire::encode_push(None, "onChat", &vec![b'x'; 4000]).unwrap();
        for (i, kind) in [Kind::Tcp, Kind::Ws].into_iter().enumerate() {
            let mut slow = Client::connect_small_buffer(kind, s.addr).await;
            slow.handshake(true).await;
            let name = format!("slow{i}");
            slow.request(1, "connector.entryHandler.enter", &json!({"username":name,"rid":"r"})).await;
            let id = s.sessions.get_by_uid(&format!("{name}*r"))[0].id();
            // The client reads nothing from now on.
            let out_before = s.metric("bytes_out_total");
            let mut pushed = 0usize;
            let mut kicked = false;
            for n in 0..50_000 {
                if s.sessions.push_bytes(&[id], &pkg) == 0 {
                    kicked = true;
                    break;
                }
                pushed += pkg.len();
                if n % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            assert!(kicked, "{kind:?}: never kicked after {pushed} bytes");
            assert_eq!(s.metric("queue_full_total"), i as u64 + 1);
            assert!(s.metric("outbound_queue_peak_bytes") <= cap as u64);
            s.eventually("slow session gone", |s| s.sessions.get_by_uid(&format!("{name}*r")).is_empty()).await;
            s.eventually("queue released", |s| s.metric("outbound_queued_bytes") == 0).await;
            let written = s.metric("bytes_out_total") - out_before;
            println!("{kind:?}: pushed {pushed} bytes before the kick, wrote {written}, queue cap {cap}");
            assert!(written < pushed as u64, "{kind:?}: wrote {written} of {pushed}: the kick should drop the rest");
            drop(slow);
        }
        assert!(s.metric("kicks_total") >= 2);
    })
    .await;
}

#[tokio::test]
async fn max_connections_refuses_and_recovers() {
    bounded(Duration::from_secs(30), async {
        let s = connector(FrontendConfig { max_connections: 2, ..quick() }).await;
        let mut a = Client::connect(Kind::Tcp, s.addr).await;
        a.handshake(true).await;
        let mut b = Client::connect(Kind::Ws, s.addr).await;
        b.handshake(true).await;
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.send_pkg(PackageType::Handshake, br#"{"sys":{}}"#).await;
        assert!(c.expect_closed(Duration::from_secs(2)).await.is_empty(), "refused without a reply");
        assert_eq!(s.metric("refused_total"), 1);
        drop(a);
        s.eventually("slot freed", |s| s.metric("connections") == 1).await;
        let mut d = Client::connect(Kind::Tcp, s.addr).await;
        d.handshake(true).await;
        assert_eq!((s.metric("refused_total"), s.metric("connections_total"), s.metric("connections")), (1, 3, 2));
        drop(b);
        drop(d);
        s.eventually("all closed", |s| s.metric("connections") == 0).await;
    })
    .await;
}

#[tokio::test]
async fn pomelo_routing_rules() {
    bounded(Duration::from_secs(30), async {
        let s = connector(quick()).await;
        let mut c = entered(Kind::Tcp, &s, "rules").await;
        assert_eq!(c.request(2, "connector.entryHandler.nope", &json!({})).await, json!({"code":500}));
        assert_eq!(c.request(3, "a.b", &json!({})).await, json!({"code":500}));
        // No dot: silence. Notify: no answer. Unknown code: dropped. The next answer is for the next id.
        c.send_request(4, "nodot", &json!({})).await;
        c.notify("connector.entryHandler.nope", &json!({})).await;
        let m = Message::request(5, Route::Code(99), Bytes::from_static(b"{}"));
        c.send_raw(&m.encode_package().unwrap()).await;
        assert_eq!(c.request(6, "a.b.c.d", &json!({})).await, json!({"code":500}));
        // A request id of 2^21 round-trips.
        assert_eq!(c.request(1 << 21, "x.y.z", &json!({})).await, json!({"code":500}));
        // `constructor` is an attack.
        c.send_request(7, "connector.entryHandler.constructor", &json!({})).await;
        let got = c.expect_closed(Duration::from_secs(2)).await;
        assert_eq!(
            got.last().map(|p| (p.kind, p.body.clone())),
            Some((PackageType::Kick, Bytes::from_static(br#"{"reason":"attack"}"#)))
        );

        // A handshake without `sys` gets {"code":500} and is closed.
        let mut h = Client::connect(Kind::Ws, s.addr).await;
        h.send_pkg(PackageType::Handshake, b"not json").await;
        let got = h.expect_closed(Duration::from_secs(2)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].body[..], br#"{"code":500}"#);

        // A client that already has the dictionary gets only useDict.
        let mut k = Client::connect(Kind::Tcp, s.addr).await;
        let version = local_rooms::connector_config().dictionary.version().to_owned();
        let hs = json!({"sys":{"type":"js-websocket","version":"0.0.1","dictVersion":version}});
        k.send_pkg(PackageType::Handshake, hs.to_string().as_bytes()).await;
        let reply: Value = serde_json::from_slice(&k.recv().await.unwrap().body).unwrap();
        assert_eq!(reply, json!({"code":200,"sys":{"heartbeat":3,"useDict":true}}));
    })
    .await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test]
async fn timeouts_and_plain_http() {
    bounded(Duration::from_secs(30), async {
        let (_tx, rx) = watch::channel(Arc::new(Membership::default()));
        let gate = Gate::new(rx).with_page("text/html; charset=utf-8", Bytes::from_static(b"<h1>chat</h1>"));
        let cfg = FrontendConfig {
            idle_timeout: Duration::from_millis(400),
            handshake_timeout: Duration::from_millis(300),
            ..Gate::frontend_config()
        };
        let s = Server::start(cfg, Arc::new(gate)).await;

        let page = http_get(s.addr, "/").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains("Content-Type: text/html; charset=utf-8") && page.ends_with("<h1>chat</h1>"));
        assert!(http_get(s.addr, "/nope").await.starts_with("HTTP/1.1 404"));
        assert_eq!(s.metric("http_requests_total"), 2);

        // Never handshakes: closed after the handshake timeout.
        let started = tokio::time::Instant::now();
        let mut silent = Client::connect(Kind::Tcp, s.addr).await;
        silent.expect_closed(Duration::from_secs(2)).await;
        assert!(started.elapsed() >= Duration::from_millis(250));

        // No heartbeat on the gate: any request keeps it alive, silence closes it.
        let mut c = Client::connect(Kind::Ws, s.addr).await;
        c.handshake(false).await;
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(c.request(i + 1, "gate.gateHandler.queryEntry", &json!({"uid":"u"})).await, json!({"code":500}));
        }
        let quiet = tokio::time::Instant::now();
        c.expect_closed(Duration::from_secs(2)).await;
        assert!(quiet.elapsed() >= Duration::from_millis(300), "closed too early: {:?}", quiet.elapsed());
    })
    .await;
}

struct Panicky;

impl pomelo_worker::frontend::Handler for Panicky {
    fn routes(&self) -> Vec<String> {
        vec!["t.h.panic".into(), "t.h.echo".into()]
    }

    fn handle<'a>(
        &'a self,
        req: pomelo_worker::frontend::Request,
    ) -> pomelo_worker::frontend::BoxFuture<'a, Result<Value, pomelo_worker::frontend::HandlerError>> {
        Box::pin(async move {
            if req.route == "t.h.panic" {
                panic!("handler bug");
            }
            Ok(req.body)
        })
    }
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_connection_lives_on() {
    bounded(Duration::from_secs(20), async {
        let s = Server::start(quick(), Arc::new(Panicky)).await;
        let mut c = Client::connect(Kind::Tcp, s.addr).await;
        c.handshake(true).await;
        assert_eq!(c.request(1, "t.h.panic", &json!({})).await, json!({"code":500}));
        assert_eq!(c.request(2, "t.h.echo", &json!({"a":[1,"é"]})).await, json!({"a":[1,"é"]}));
        assert_eq!(s.sessions.count(), 1);
    })
    .await;
}
