//! TLS on client ports (issue 17; issue 14): with `ssl` on the gate and a connector, `wss://` and TLS over
//! raw TCP work on the same ports as the plain transports, a plain client still works beside them, and a
//! client that sends broken TLS costs nobody else anything.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::tls::{self, Authority, Material, Stream};
use pomelo_proto::wire::message::{Message, MessageType, Route};
use pomelo_proto::wire::package::{self, Decoded, PackageDecoder, PackageType};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::harness::{wait_until, yaml, Cluster};
use crate::pomelo_client::try_login;

/// A Pomelo client over TLS: raw TCP or WebSocket inside, the bytes read and not yet decoded, and the
/// chat pushes that arrived while it waited for a response.
struct Conn {
    io: Io,
    buf: BytesMut,
    chats: std::collections::VecDeque<Value>,
}

enum Io {
    Tcp(Box<Stream>),
    Ws(Box<WebSocketStream<Stream>>),
}

async fn tls_to(addr: SocketAddr, ca: &Material) -> Stream {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tls::connect(Some(&ca.connector().expect("connector")), tcp, addr.ip()).await.expect("TLS handshake")
}

impl Conn {
    async fn open(addr: SocketAddr, ca: &Material, ws: bool) -> Conn {
        let s = tls_to(addr, ca).await;
        let io = if ws {
            let url = format!("wss://{addr}/");
            let (ws, _) = tokio_tungstenite::client_async(url, s).await.expect("websocket upgrade over TLS");
            Io::Ws(Box::new(ws))
        } else {
            Io::Tcp(Box::new(s))
        };
        let mut c = Conn { io, buf: BytesMut::new(), chats: Default::default() };
        let hs = json!({"sys": {"type": "rust-tls-test", "version": "0.0.1"}, "user": {}});
        c.send(package::encode(PackageType::Handshake, hs.to_string().as_bytes()).expect("encode")).await;
        let reply = c.next(PackageType::Handshake).await;
        let reply: Value = serde_json::from_slice(&reply).expect("json");
        assert_eq!(reply["code"], 200, "{reply}");
        c.send(package::empty(PackageType::HandshakeAck)).await;
        c
    }

    async fn send(&mut self, bytes: Bytes) {
        match &mut self.io {
            Io::Tcp(s) => {
                s.write_all(&bytes).await.expect("write");
                s.flush().await.expect("flush");
            }
            Io::Ws(s) => s.send(WsMessage::Binary(bytes)).await.expect("ws send"),
        }
    }

    /// The body of the next package of `kind` (others skipped).
    async fn next(&mut self, kind: PackageType) -> Bytes {
        let decoder = PackageDecoder::new(1 << 20);
        loop {
            if let Ok(Decoded::Package(p)) = decoder.decode(&mut self.buf) {
                if p.kind == kind {
                    return p.body;
                }
                continue;
            }
            let read = async {
                match &mut self.io {
                    Io::Tcp(s) => {
                        let n = s.read_buf(&mut self.buf).await.expect("read");
                        assert!(n > 0, "closed");
                    }
                    Io::Ws(s) => match s.next().await {
                        Some(Ok(WsMessage::Binary(m))) => self.buf.extend_from_slice(&m),
                        Some(Ok(_)) => {}
                        other => panic!("websocket ended: {other:?}"),
                    },
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read).await.expect("a package within 10 s");
        }
    }

    /// Sends a request and returns its response; chat pushes meanwhile are kept for [`Conn::chat`] (a
    /// broadcast can reach its sender before the sender's `{}`).
    async fn request(&mut self, id: u32, route: &str, body: Value) -> Value {
        let msg = Message::request(id, Route::Plain(route.into()), body.to_string().into_bytes());
        self.send(msg.encode_package().expect("encode")).await;
        loop {
            let m = Message::decode(&self.next(PackageType::Data).await).expect("message");
            let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
            match m.kind {
                MessageType::Response if m.id == id => return body,
                MessageType::Push if body.get("msg").is_some() => self.chats.push_back(body),
                _ => {}
            }
        }
    }

    /// The next push whose body has a `msg` (an onChat).
    async fn chat(&mut self) -> Value {
        if let Some(body) = self.chats.pop_front() {
            return body;
        }
        loop {
            let m = Message::decode(&self.next(PackageType::Data).await).expect("message");
            let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
            if m.kind == MessageType::Push && body.get("msg").is_some() {
                return body;
            }
        }
    }
}

#[test]
fn wss_and_tls_over_tcp_chat_beside_plain_clients_on_the_same_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Authority::load_or_create(&dir.path().join("test-ca")).expect("ca");
    let issued = ca.issue("frontends", "127.0.0.1").expect("issue");
    std::fs::write(dir.path().join("cert.pem"), &issued.cert).expect("cert");
    std::fs::write(dir.path().join("key.pem"), &issued.key).expect("key");
    let ssl = "ssl: {cert: ../cert.pem, key: ../key.pem}";
    // A long heartbeat: these clients send none, and on a loaded CI machine the test outlasted the
    // connector's default heartbeat timeout (6 s) and alice was closed.
    let servers = format!(
        "  gate:\n    - {{id: gate-1, clientPort: 0, {ssl}}}\n  connector:\n    - {{id: connector-1, port: 0, clientPort: 0, heartbeat: 30s, {ssl}}}\n  chat:\n    - {{id: chat-1, port: 0}}\n"
    );
    let c = Cluster::start(&yaml(&servers, "").replace("../", &format!("{}/", dir.path().display())));
    c.wait_running();
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let connector: SocketAddr =
        c.server("connector-1")["addrs"]["client"].as_str().expect("connector").parse().expect("addr");
    // A plain client on the same ports first: it still works.
    let (mut plain, reply) =
        wait_until(Duration::from_secs(10), "a plain login", || try_login(gate, "plain", "tls-room"));
    assert_eq!(reply["users"].as_array().map(Vec::len), Some(1), "{reply}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // Broken TLS: a handshake record of garbage, then nothing. It is closed; nobody else notices.
        let mut bad = tokio::net::TcpStream::connect(connector).await.expect("connect");
        bad.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).await.expect("write");
        let mut sink = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), bad.read(&mut sink)).await.expect("closed in time");
        assert!(n.as_ref().map_or(true, |n| *n < 64), "broken TLS got an answer of {n:?} bytes");

        // TLS over TCP through the gate to the connector.
        let mut g = Conn::open(gate, &issued, false).await;
        let entry = g.request(1, "gate.gateHandler.queryEntry", json!({"uid": "alice"})).await;
        assert_eq!(entry["code"], 200, "{entry}");
        assert_eq!(entry["port"].as_u64(), Some(u64::from(connector.port())));
        let mut alice = Conn::open(connector, &issued, false).await;
        let r = alice.request(1, "connector.entryHandler.enter", json!({"username": "alice", "rid": "tls-room"})).await;
        assert_eq!(r["users"].as_array().map(Vec::len), Some(2), "{r}");

        // wss:// to the same connector port.
        let mut bob = Conn::open(connector, &issued, true).await;
        let r = bob.request(1, "connector.entryHandler.enter", json!({"username": "bob", "rid": "tls-room"})).await;
        assert_eq!(r["users"].as_array().map(Vec::len), Some(3), "{r}");

        let sent = alice
            .request(
                2,
                "chat.chatHandler.send",
                json!({"rid": "tls-room", "content": "hi over tls", "from": "alice", "target": "*"}),
            )
            .await;
        assert!(sent.get("code").is_none(), "{sent}");
        assert_eq!(bob.chat().await["msg"], "hi over tls");
        assert_eq!(alice.chat().await["msg"], "hi over tls");
    });
    let got = plain.collect("onChat", 1, Duration::from_secs(5), Duration::from_millis(100));
    assert_eq!(got.len(), 1, "the plain client got the TLS clients' message: {got:?}");
    assert_eq!(got[0]["msg"], "hi over tls");
}
