//! `useCrypto` (issue 17) across the real binary: a client that sends an RSA key in its handshake must
//! sign every request (`__crypto__`, RSASSA-PKCS1-v1_5 / SHA-256 of the body as it wrote it). Signed
//! requests work; unsigned, tampered or other-key ones are answered `{"code":500}` with a reason and
//! counted in /metrics (Pomelo dropped them silently); a client without a key is not asked to sign; a key
//! that is not one refuses the handshake. Over raw TCP with a 2048-bit test key, and over WebSocket with
//! Pomelo's npm browser client and jsrsasign's 1024-bit keys in Chromium.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, yaml, Cluster};
use crate::pomelo_client::{sign, test_key, Client};

const CLUSTER: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0, useCrypto: true}\n  chat:\n    - {id: chat-1, port: 0}\n";

fn start() -> (Cluster, SocketAddr, SocketAddr) {
    let c = Cluster::start(&yaml(CLUSTER, ""));
    c.wait_running();
    let addr = |id: &str| -> SocketAddr { c.server(id)["addrs"]["client"].as_str().expect(id).parse().expect("addr") };
    let (g, conn) = (addr("gate-1"), addr("connector-1"));
    (c, g, conn)
}

fn sys(rsa: Value) -> Value {
    json!({"type": "rust-test", "version": "0.0.1", "rsa": rsa, "protoVersion": 0})
}

fn bad_signatures(c: &Cluster) -> f64 {
    let (_, text) = c.http("GET", "/metrics", Some(&c.token()));
    text.lines()
        .find(|l| l.starts_with("pomelo_server_bad_signatures_total{") && l.contains("connector-1"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_client_with_a_key_must_sign_every_request_over_tcp() {
    let (c, _g, conn) = start();
    let (key, rsa) = test_key();
    let mut ann = Client::connect_sys(conn, sys(rsa.clone())).signing(key.clone());
    let r = ann.request("connector.entryHandler.enter", json!({"username": "ann", "rid": "k"}));
    assert!(r["users"].is_array(), "a signed enter: {r}");
    // A client without a key (the JS client's `rsa: {}`) signs nothing and is served.
    let mut bob = Client::connect_sys(conn, sys(json!({})));
    let r = bob.request("connector.entryHandler.enter", json!({"username": "bob", "rid": "k"}));
    assert!(r["users"].is_array(), "{r}");

    let text = "signed héllo 中文 😀";
    assert_eq!(ann.request("chat.chatHandler.send", json!({"content": text, "target": "*"})), json!({}));
    let got = bob.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(100));
    assert_eq!(got[0]["msg"], text, "{got:?}");
    assert!(got[0].get("__crypto__").is_none(), "the handler never sees the signature: {got:?}");

    // Unsigned, tampered after signing, and signed text that is not the body: each refused, with a reason.
    let unsigned = ann.request_bytes("chat.chatHandler.send", br#"{"content":"x","target":"*"}"#.to_vec());
    assert_eq!(unsigned["code"], 500, "{unsigned}");
    assert!(unsigned["message"].as_str().unwrap_or("").contains("no __crypto__"), "{unsigned}");
    let tampered = sign(&key, r#"{"content":"pay 1","target":"*"}"#).replace("pay 1", "pay 9");
    let r = ann.request_bytes("chat.chatHandler.send", tampered.into_bytes());
    assert_eq!(r["code"], 500, "{r}");
    assert!(r["message"].as_str().unwrap_or("").contains("does not match"), "{r}");
    let r = ann.request_bytes("chat.chatHandler.send", br#"{"content":"x","__crypto__":"zz"}"#.to_vec());
    assert_eq!(r["code"], 500, "{r}");
    // None of them reached the room; the session goes on.
    assert!(bob.collect("onChat", 1, Duration::from_millis(500), Duration::ZERO).is_empty());
    assert_eq!(ann.request("chat.chatHandler.send", json!({"content": "still", "target": "*"})), json!({}));
    assert_eq!(bob.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(100))[0]["msg"], "still");
    assert!(!ann.closed);
    wait_until(Duration::from_secs(10), "the three refusals in /metrics", || (bad_signatures(&c) == 3.0).then_some(()));

    // A notify with a bad signature is counted and dropped (notifies are never answered).
    ann.notify("chat.chatHandler.send", json!({"content": "n", "target": "*"}));
    wait_until(Duration::from_secs(10), "the notify counted", || (bad_signatures(&c) == 4.0).then_some(()));

    // Someone else's key: the handshake names it, the signatures of this key do not pass.
    let n = format!("c{}", "3".repeat(511));
    let mut eve = Client::connect_sys(conn, sys(json!({"rsa_n": n, "rsa_e": 65537}))).signing(key);
    let r = eve.request("connector.entryHandler.enter", json!({"username": "eve", "rid": "k"}));
    assert_eq!(r["code"], 500, "signed with another key than the handshake's: {r}");
}

#[test]
fn a_key_that_is_not_one_refuses_the_handshake() {
    let (_c, g, conn) = start();
    for rsa in [json!({"rsa_n": "abc", "rsa_e": 65537}), json!({"rsa_n": "ff".repeat(128), "rsa_e": 2})] {
        let mut s = std::net::TcpStream::connect(conn).expect("connect");
        let body = json!({"sys": sys(rsa.clone()), "user": {}}).to_string();
        let pkg = pomelo_proto::wire::package::encode(pomelo_proto::wire::PackageType::Handshake, body.as_bytes())
            .expect("encode");
        std::io::Write::write_all(&mut s, &pkg).expect("send");
        let mut reply = vec![0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let n = std::io::Read::read(&mut s, &mut reply).expect("a reply");
        assert_eq!(&reply[4..n], br#"{"code":500}"#, "rsa {rsa}");
    }
    // The gate has no useCrypto: it ignores the key, as Pomelo's demo gate does.
    let (_, rsa) = test_key();
    let mut gate = Client::connect_sys(g, sys(rsa));
    assert_eq!(gate.request("gate.gateHandler.queryEntry", json!({"uid": "ann"}))["code"], 200);
}

#[test]
fn pomelo_s_npm_client_signs_with_encrypt_on() {
    use crate::harness::{browser_ready, have, repo};
    if !browser_ready() || !have(repo().join("browser/node_modules/jsrsasign").exists(), "jsrsasign in browser/") {
        return;
    }
    let (c, g, _) = start();
    let seen = crate::harness::browser_script("pomelo-npm-crypto.js", &[g.ip().to_string(), g.port().to_string()]);
    assert_eq!(seen["ok"], true);
    wait_until(Duration::from_secs(10), "the refusal in /metrics", || (bad_signatures(&c) >= 1.0).then_some(()));
}
