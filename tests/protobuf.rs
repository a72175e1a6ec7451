//! Protobuf bodies (issue 17) across the real binary: servers.yaml `protobuf` names the two files, every
//! gate, connector and chat server gets them, and the handshake carries them (all three keys) unless the
//! client's `protoVersion` says it has them. Over raw TCP with this crate's client (which panics on any
//! push or response of a proto route that is not protobuf of that proto), and over WebSocket with
//! Pomelo's own browser client and pomelo-protobuf's browser codec from npm in Chromium.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, yaml, Cluster};
use crate::pomelo_client::Client;

const CLUSTER: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";

/// What the server sends: the demo's onChat plus the history fields, onAdd, and send's answer.
const SERVER_PROTOS: &str = r#"{
  "onChat": {"required string msg": 1, "required string from": 2, "required string target": 3,
             "optional string epoch": 4, "optional uInt32 offset": 5},
  "onAdd": {"required string user": 1},
  "onLeave": {"required string user": 1},
  "chat.chatHandler.send": {"optional uInt32 code": 1}
}"#;
/// What clients send: send's body (the demo's page sends all four).
const CLIENT_PROTOS: &str = r#"{
  "chat.chatHandler.send": {"optional string rid": 1, "required string content": 2, "optional string from": 3,
                            "required string target": 4}
}"#;

/// A running cluster of `servers` whose servers.yaml has `protobuf` with these two files, and `root`
/// (more root keys) before its sections.
pub(crate) fn with_protos(server_protos: &str, client_protos: &str, root: &str, servers: &str) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("serverProtos.json"), server_protos).expect("write");
    std::fs::write(dir.path().join("clientProtos.json"), client_protos).expect("write");
    let text = format!(
        "protobuf: {{serverProtos: serverProtos.json, clientProtos: clientProtos.json}}\n{root}{}",
        yaml(servers, "")
    );
    let c = Cluster::start_in(dir, &text);
    c.wait_running();
    c
}

fn start() -> (Cluster, SocketAddr) {
    let c = with_protos(SERVER_PROTOS, CLIENT_PROTOS, "", CLUSTER);
    let g: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    (c, g)
}

/// The connector the gate names for `name`, once one is up.
fn connector_for(g: SocketAddr, name: &str) -> SocketAddr {
    wait_until(Duration::from_secs(20), "a connector from the gate", || {
        let mut gate = Client::connect(g);
        let entry = gate.request("gate.gateHandler.queryEntry", json!({"uid": name}));
        gate.close();
        let addr: SocketAddr = format!("{}:{}", entry["host"].as_str()?, entry["port"]).parse().ok()?;
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok().map(|_| addr)
    })
}

fn sys(proto_version: Value) -> Value {
    json!({"type": "rust-test", "version": "0.0.1", "rsa": {}, "protoVersion": proto_version})
}

/// The protobuf client of `name`, in room `rid`.
fn enter(g: SocketAddr, name: &str, rid: &str) -> (Client, Value) {
    let mut c = Client::connect(connector_for(g, name)).with_protos(SERVER_PROTOS, CLIENT_PROTOS);
    let reply = c.request("connector.entryHandler.enter", json!({"username": name, "rid": rid}));
    assert!(reply["users"].is_array(), "enter (no proto) answers JSON: {reply}");
    (c, reply)
}

#[test]
fn the_handshake_carries_the_protos_unless_the_client_has_them() {
    let (_c, g) = start();
    let gate = Client::connect_sys(g, sys(json!(0)));
    let gate_sys = &gate.handshake["sys"];
    assert_eq!(gate_sys["useProto"], true, "{gate_sys}");
    let protos = gate_sys["protos"].as_object().expect("protos in a fresh client's handshake");
    assert_eq!(protos.keys().collect::<Vec<_>>(), ["client", "server", "version"]);
    let version = protos["version"].as_str().expect("a version string").to_owned();
    // The parsed form Pomelo sends (checked byte for byte against pomelo-protobuf in proto/tests).
    assert_eq!(protos["server"]["onChat"]["offset"], json!({"option": "optional", "type": "uInt32", "tag": 5}));
    assert_eq!(protos["server"]["onChat"]["__tags"]["1"], "msg");
    assert_eq!(protos["client"]["chat.chatHandler.send"]["content"]["tag"], 2);

    let addr = connector_for(g, "ann");
    // The version the client cached from the gate: the connector says protobuf is on, and sends none.
    let cached = Client::connect_sys(addr, sys(json!(version)));
    let s = &cached.handshake["sys"];
    assert_eq!((&s["useProto"], s.get("protos")), (&json!(true), None), "{s}");
    assert!(s["dict"].is_object() && s["routeToCode"].is_object() && s["codeToRoute"].is_object(), "{s}");
    assert!(s["dictVersion"].is_string(), "the dictionary's four keys come together: {s}");
    // Another version (stale cache, or a number) gets all three keys again.
    for other in [json!("c3RhbGU="), json!(0), Value::Null] {
        let c = Client::connect_sys(addr, sys(other.clone()));
        let p = &c.handshake["sys"]["protos"];
        assert_eq!(p["version"], json!(version), "protoVersion {other}: {p}");
        assert!(p["server"].is_object() && p["client"].is_object(), "{p}");
    }
}

#[test]
fn requests_and_pushes_of_proto_routes_are_protobuf_over_tcp() {
    let (_c, g) = start();
    let (mut ann, r) = enter(g, "ann", "pb");
    let (mut bob, _) = enter(g, "bob", "pb");
    let added = ann.collect("onAdd", 1, Duration::from_secs(10), Duration::from_millis(100));
    assert_eq!(added, [json!({"user": "bob"})], "onAdd through its proto (its `route` field is not in it)");

    // Bob's body is protobuf of clientProtos; the answer `{}` is an empty protobuf body.
    let text = "hi 😀 héllo";
    assert_eq!(bob.request("chat.chatHandler.send", json!({"content": text, "target": "*"})), json!({}));
    let got = ann.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(200));
    assert_eq!(got, [json!({"msg": text, "from": "bob", "target": "*", "epoch": r["epoch"], "offset": 1})]);

    // The JS browser client writes an emoji as a CESU-8 surrogate pair: it arrives as the real character.
    let mut cesu = vec![0x12, 6, 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80];
    cesu.extend_from_slice(&[0x22, 1, b'*']);
    assert_eq!(bob.request_bytes("chat.chatHandler.send", cesu), json!({}));
    let got = ann.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(200));
    assert_eq!(got[0]["msg"], "😀", "{got:?}");

    // A body that is not protobuf of its proto: {code: 500} through send's proto, and the session goes on.
    let refused = bob.request_bytes("chat.chatHandler.send", br#"{"content":"json","target":"*"}"#.to_vec());
    assert_eq!(refused, json!({"code": 500}));
    // A refused send (no such user) also answers through the proto.
    let refused = bob.request("chat.chatHandler.send", json!({"content": "x", "target": "nobody"}));
    assert_eq!(refused, json!({"code": 500}));
    assert_eq!(bob.request("chat.chatHandler.send", json!({"content": "still here", "target": "*"})), json!({}));
    let got = ann.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(300));
    assert_eq!((got.len(), &got[0]["msg"], &got[0]["offset"]), (1, &json!("still here"), &json!(3)), "{got:?}");
    assert!(!ann.closed && !bob.closed);

    bob.close();
    let left = ann.collect("onLeave", 1, Duration::from_secs(10), Duration::from_millis(100));
    assert_eq!(left, [json!({"user": "bob"})]);
}

#[test]
fn an_edited_protos_file_is_applied_by_reload_and_a_broken_one_changes_nothing() {
    let (c, g) = start();
    let version = |g| {
        let client = Client::connect_sys(connector_for(g, "ann"), sys(json!(0)));
        client.handshake["sys"]["protos"]["version"].as_str().map(String::from).expect("a version")
    };
    let before = version(g);
    let file = c.dir.path().join("serverProtos.json");
    std::fs::write(&file, "{\"onChat\": {\"required string msg\": 1,").expect("write");
    let out = c.run(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("protobuf.serverProtos") && err.contains("nothing was changed"), "{err}");
    assert_eq!(version(g), before, "the running servers keep their protos");

    let edited = SERVER_PROTOS
        .replace("\"optional uInt32 offset\": 5", "\"optional uInt32 offset\": 5, \"optional string room\": 6");
    std::fs::write(&file, edited).expect("write");
    let out = c.run(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    // Every server restarts with them (their clientPort is 0: the gate comes back on another port).
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("restarted: gate-1, connector-1, chat-1"), "{summary}");
    let g = wait_until(Duration::from_secs(20), "the gate back on its new port", || {
        let g: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str()?.parse().ok()?;
        let v = std::panic::catch_unwind(|| version(g)).ok()?;
        (v != before).then_some(g)
    });
    let after = version(g);
    let client = Client::connect_sys(connector_for(g, "ann"), sys(json!(after)));
    assert_eq!(client.handshake["sys"].get("protos"), None);
    // And the chat works with them.
    let (mut ann, _) = enter(g, "ann", "pb2");
    assert_eq!(ann.request("chat.chatHandler.send", json!({"content": "new", "target": "*"})), json!({}));
    let got = ann.collect("onChat", 1, Duration::from_secs(10), Duration::from_millis(100));
    assert_eq!(got[0]["msg"], "new");
    drop(ann);

    // Saving a protos file is enough, as in Pomelo, which watched them: no command.
    let saved = SERVER_PROTOS
        .replace("\"optional uInt32 offset\": 5", "\"optional uInt32 offset\": 5, \"optional string saved\": 7");
    std::fs::write(&file, saved).expect("write");
    wait_until(Duration::from_secs(20), "the servers restarted with the saved protos", || {
        let g: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str()?.parse().ok()?;
        let v = std::panic::catch_unwind(|| version(g)).ok()?;
        (v != after).then_some(())
    });
}

#[test]
fn pomelo_s_npm_client_speaks_protobuf_with_the_cluster() {
    use crate::harness::{browser_ready, have, repo};
    if !browser_ready()
        || !have(repo().join("browser/node_modules/pomelo-protobuf").exists(), "pomelo-protobuf in browser/")
    {
        return;
    }
    let (_c, g) = start();
    let seen = crate::harness::browser_script("pomelo-npm-protobuf.js", &[g.ip().to_string(), g.port().to_string()]);
    assert_eq!(seen["ok"], true);
    assert_eq!(seen["chat"]["from"], "bob", "{seen}");
    assert_eq!(seen["refused"]["code"], 500, "{seen}");
}

/// The chat page the gate serves, in a cluster with protobuf on: its send bodies must be protobuf (the
/// clientProtos' required fields make a JSON body answer 500) and it must read protobuf onChat, onAdd and
/// onLeave (JSON parsing of them gives `{}` and the page's checks fail): the whole page test, reload with
/// recovery and a connector restart (the page then sends its cached protoVersion) included.
#[test]
fn the_chat_page_speaks_protobuf() {
    use crate::harness::browser_ready;
    if !browser_ready() {
        return;
    }
    let (c, g) = start();
    let shot = c.dir.path().join("chat-protobuf.png");
    let seen = crate::harness::browser_script(
        "chat.js",
        &[format!("http://{g}/"), shot.display().to_string(), format!("http://{}", c.admin_addr()), c.token()],
    );
    assert_eq!(seen["ok"], true);
    let log: Vec<String> = serde_json::from_value(seen["ada_log"].clone()).expect("log");
    assert!(log.iter().any(|l| l.contains("while you were away")), "{log:?}");
    assert!(log.iter().any(|l| l == "reconnected"), "{log:?}");
}

/// Chat load with protobuf bodies: 80 TCP clients in 4 rooms (two connectors' worth of sessions on one
/// connector, rooms spread over the chat server's merged deliveries) each send 3 messages, each answered
/// `{}` only once stored; every member then holds every message of its room exactly once, in the room's
/// order (offsets 1..=60 without a gap), each sender's in the order sent, and nothing of another room.
#[test]
fn every_acknowledged_protobuf_message_reaches_every_member_once() {
    const ROOMS: usize = 4;
    const PER_ROOM: usize = 20;
    const ROUNDS: usize = 3;
    let (_c, g) = start();
    let mut clients: Vec<(String, usize, Client)> = (0..ROOMS * PER_ROOM)
        .map(|i| {
            let name = format!("u{i}");
            let (c, _) = enter(g, &name, &format!("load-{}", i % ROOMS));
            (name, i % ROOMS, c)
        })
        .collect();
    for k in 0..ROUNDS {
        for (name, _, c) in clients.iter_mut() {
            let r = c.request("chat.chatHandler.send", json!({"content": format!("{name}:{k}"), "target": "*"}));
            assert_eq!(r, json!({}), "{name}'s message {k} acknowledged");
        }
    }
    let want = PER_ROOM * ROUNDS;
    for (name, room, c) in clients.iter_mut() {
        let got = c.collect("onChat", want, Duration::from_secs(20), Duration::from_millis(50));
        assert_eq!(got.len(), want, "{name} got {} of {want}", got.len());
        let offsets: Vec<u64> = got.iter().map(|m| m["offset"].as_u64().expect("offset")).collect();
        assert_eq!(offsets, (1..=want as u64).collect::<Vec<_>>(), "{name}: the room's order, no gap, no double");
        let mut last: std::collections::HashMap<&str, usize> = Default::default();
        for m in &got {
            let (sender, k) = m["msg"].as_str().and_then(|s| s.split_once(':')).expect("name:k");
            let k: usize = k.parse().expect("k");
            let from: usize = sender[1..].parse().expect("u<i>");
            assert_eq!(from % ROOMS, *room, "{name} got a message of another room: {m}");
            assert_eq!(m["from"], sender, "{m}");
            assert_eq!(last.insert(sender, k).map_or(0, |p| p + 1), k, "{name}: {sender}'s messages in order");
        }
    }
}
