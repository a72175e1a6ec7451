//! The conformance corpus (`tests/corpus/`, issue 17): the exact first bytes of libpomelo2, libpomelo v1,
//! the Unity client, the JS client and libpitaya, read from their sources, replayed against the real
//! cluster with protobuf and a `dictionary` entry on. Each reply is checked for what that client reads
//! and asserts (see corpus/README.md); then its ACK must bring the server's first heartbeat (the JS client
//! waits for it) and its own `enter` package must be answered with a whole, non-empty JSON body. The JS
//! client's bytes go over WebSocket, the others over TCP. libpomelo2's session then chats with a
//! dictionary-coded protobuf `send`, and the `onChat` push must come with its dictionary code (5, under
//! 256 so libpomelo v1 resolves it too).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::wire::{package, Decoded, Message, MessageType, PackageDecoder, PackageType, Route};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::repo;

const CLUSTER: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";
const SERVER_PROTOS: &str =
    r#"{"onChat": {"required string msg": 1, "required string from": 2, "required string target": 3}}"#;
const CLIENT_PROTOS: &str = r#"{"chat.chatHandler.send": {"required string content": 2, "required string target": 4}}"#;

enum Io {
    Tcp(tokio::net::TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>),
}

struct Wire {
    io: Io,
    buf: BytesMut,
}

impl Wire {
    async fn open(addr: SocketAddr, ws: bool) -> Wire {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let io = if ws {
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await.expect("upgrade");
            Io::Ws(Box::new(ws))
        } else {
            Io::Tcp(tcp)
        };
        Wire { io, buf: BytesMut::new() }
    }

    async fn send(&mut self, bytes: Vec<u8>) {
        match &mut self.io {
            Io::Tcp(s) => s.write_all(&bytes).await.expect("write"),
            Io::Ws(s) => s.send(WsMessage::Binary(Bytes::from(bytes))).await.expect("ws send"),
        }
    }

    /// The next package (at most 5 s).
    async fn next(&mut self) -> (PackageType, Bytes) {
        let decoder = PackageDecoder::new(1 << 20);
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(Decoded::Package(p)) = decoder.decode(&mut self.buf) {
                    return (p.kind, p.body);
                }
                match &mut self.io {
                    Io::Tcp(s) => {
                        let n = s.read_buf(&mut self.buf).await.expect("read");
                        assert!(n > 0, "closed by the server");
                    }
                    Io::Ws(s) => match s.next().await.expect("open").expect("ws read") {
                        WsMessage::Binary(b) => self.buf.extend_from_slice(&b),
                        WsMessage::Close(_) => panic!("closed by the server"),
                        _ => {}
                    },
                }
            }
        })
        .await
        .expect("a package within 5 s")
    }
}

fn corpus(name: &str) -> Option<String> {
    std::fs::read_to_string(repo().join("tests/corpus").join(name)).ok()
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Sends a handshake body and returns the reply.
async fn handshake(wire: &mut Wire, body: &str) -> Value {
    wire.send(package::encode(PackageType::Handshake, body.as_bytes()).expect("encode").to_vec()).await;
    let (kind, reply) = wire.next().await;
    assert_eq!(kind, PackageType::Handshake);
    serde_json::from_slice(&reply).expect("the reply is JSON")
}

/// What each client reads from a reply to its uncached handshake (corpus/README.md).
fn check_fresh(client: &str, r: &Value) {
    assert!(r["code"].is_u64() && r["code"] == 200, "{client}: code a number, 200: {r}");
    let sys = &r["sys"];
    assert!(sys["heartbeat"].is_u64(), "{client}: heartbeat an integer (libpomelo v1 reads 3.0 as 0): {sys}");
    let has = |k: &str| sys.get(k).is_some();
    match client {
        "libpomelo2" => {
            assert!(
                has("routeToCode") && has("codeToRoute") && has("dictVersion"),
                "{client}: the three together: {sys}"
            );
            let p = &sys["protos"];
            assert!(p["server"].is_object() && p["client"].is_object() && p["version"].is_string(), "{client}: {sys}");
        }
        "libpomelo" => {
            let dict = sys["dict"].as_object().expect("libpomelo v1 reads sys.dict");
            assert!(dict.values().all(|c| c.as_u64().is_some_and(|c| c <= 255)), "{client}: codes & 0xff: {dict:?}");
            assert!(sys["protos"]["server"].is_object(), "{client}: {sys}");
        }
        "unity" => {
            assert!(sys["dict"].is_object(), "{client}: hard cast of sys.dict: {sys}");
            assert!(sys["protos"]["server"].is_object() && sys["protos"]["client"].is_object(), "{client}: {sys}");
        }
        "js-websocket" => {
            assert!(sys["dict"].is_object() && sys["protos"]["version"].is_string(), "{client}: {sys}");
        }
        _ => {}
    }
    assert_eq!((&sys["useDict"], &sys["useProto"]), (&json!(true), &json!(true)), "{client}: {sys}");
}

async fn replay(client: &str, connector: SocketAddr) -> Option<Value> {
    let ws = client == "js-websocket";
    let fresh = corpus(&format!("{client}.handshake.json")).expect("corpus file");
    let mut w = Wire::open(connector, ws).await;
    let reply = handshake(&mut w, &fresh).await;
    check_fresh(client, &reply);
    let sys = &reply["sys"];
    // With the versions it cached, the client gets neither the dictionary nor the protos again.
    if let Some(cached) = corpus(&format!("{client}.handshake-cached.json")) {
        let text = cached
            .replace("{protoVersion}", sys["protos"]["version"].as_str().expect("version"))
            .replace("{dictVersion}", sys["dictVersion"].as_str().expect("dictVersion"));
        let mut again = Wire::open(connector, ws).await;
        let r = handshake(&mut again, &text).await;
        assert_eq!(r["code"], 200, "{client} cached: {r}");
        assert_eq!(r["sys"].get("protos"), None, "{client} cached its protos: {r}");
        if text.contains("dictVersion") {
            let s = &r["sys"];
            assert!(s.get("dict").is_none() && s.get("routeToCode").is_none() && s.get("codeToRoute").is_none(), "{s}");
        }
    }
    w.send(package::empty(PackageType::HandshakeAck).to_vec()).await;
    assert_eq!(w.next().await.0, PackageType::Heartbeat, "{client}: the server's first heartbeat after the ACK");
    let mut enter = unhex(&corpus(&format!("{client}.enter.hex")).expect("corpus file"));
    // Each client its own user name (`ann` is 3 bytes; so is each replacement).
    let name = &client.as_bytes()[..3];
    let at = enter.windows(5).position(|x| x == b"\"ann\"").expect("the user name in the body");
    enter[at + 1..at + 4].copy_from_slice(name);
    w.send(enter).await;
    let (kind, body) = w.next().await;
    assert_eq!(kind, PackageType::Data, "{client}");
    let m = Message::decode(&body).expect("a message");
    assert_eq!((m.kind, m.id), (MessageType::Response, 1), "{client}");
    assert!(!m.body.is_empty(), "{client}: libpomelo2 treats an empty body as a decode error");
    let answer: Value = serde_json::from_slice(&m.body).expect("one whole JSON value, nothing after it");
    assert!(answer["users"].is_array(), "{client}: {answer}");
    if client != "libpomelo2" {
        return Some(answer);
    }
    // libpomelo2 chats: `send` coded 1 with a protobuf body (content "hi", target "*").
    let send = Message::request(2, Route::Code(1), vec![0x12, 2, b'h', b'i', 0x22, 1, b'*']);
    w.send(send.encode_package().expect("encode").to_vec()).await;
    let mut push = None;
    while push.is_none() {
        let (kind, body) = w.next().await;
        if kind != PackageType::Data {
            continue;
        }
        let m = Message::decode(&body).expect("a message");
        match m.kind {
            MessageType::Response => assert_eq!(m.id, 2, "{client}"),
            MessageType::Push => push = Some(m),
            _ => {}
        }
    }
    let push = push.expect("a push");
    assert_eq!(push.route, Some(Route::Code(5)), "onChat, coded by servers.yaml's dictionary");
    // Its body is protobuf of onChat (fields in the body's key order, which any decoder takes).
    let reader = pomelo_proto::wire::protobuf::ProtoBundle::new(None, Some(SERVER_PROTOS)).expect("protos");
    let chat = reader.decode("onChat", &push.body).expect("a proto route").expect("protobuf of onChat");
    assert_eq!(chat, json!({"msg": "hi", "from": "lib", "target": "*"}));
    Some(answer)
}

#[test]
fn every_client_s_first_bytes_are_served() {
    let c = crate::protobuf::with_protos(SERVER_PROTOS, CLIENT_PROTOS, "dictionary: [onChat]\n", CLUSTER);
    let connector: SocketAddr =
        c.server("connector-1")["addrs"]["client"].as_str().expect("connector").parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for client in ["libpomelo2", "libpomelo", "unity", "js-websocket", "libpitaya"] {
            replay(client, connector).await.unwrap_or_else(|| panic!("{client}"));
        }
    });
}
