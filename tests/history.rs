//! Room history (issue 16) across the real binary, over raw TCP: a kill -9 of a connector loses
//! nothing (its clients re-enter with `since` and recover what was said meanwhile); a kill -9 of a
//! chat server with the `memory` backend starts a new epoch, so the next message says so and a
//! re-enter with the old position answers `recovered: false`: never a silent gap. And the oracle:
//! Pomelo's own browser client from npm reads `onChat` with the extra fields and recovers with `since`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{signal, wait_until, yaml, Cluster};
use crate::pomelo_client::Client;

const CLUSTER: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";

fn start() -> (Cluster, SocketAddr) {
    let c = Cluster::start(&yaml(CLUSTER, ""));
    c.wait_running();
    let g: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    (c, g)
}

/// Logs in through the gate with `since` (or none), retrying (at most 20 s) while no connector or chat
/// server is up yet or the name is still held by a session that is going away.
fn enter(g: SocketAddr, name: &str, rid: &str, since: Option<Value>) -> (Client, Value) {
    wait_until(Duration::from_secs(20), &format!("{name} to enter {rid}"), || {
        let mut gate = Client::connect(g);
        let entry = gate.request("gate.gateHandler.queryEntry", json!({"uid": name}));
        gate.close();
        if entry["code"] != 200 {
            std::thread::sleep(Duration::from_millis(100));
            return None;
        }
        let addr: SocketAddr = format!("{}:{}", entry["host"].as_str()?, entry["port"]).parse().ok()?;
        // A connector that was just killed may still be listed for a moment: only connect to a live one.
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        let mut c = Client::connect(addr);
        let mut body = json!({"username": name, "rid": rid});
        if let Some(s) = &since {
            body["since"] = s.clone();
        }
        let reply = c.request("connector.entryHandler.enter", body);
        if reply.get("users").is_some() {
            return Some((c, reply));
        }
        c.close();
        std::thread::sleep(Duration::from_millis(100));
        None
    })
}

fn send(c: &mut Client, text: &str) -> Value {
    c.request("chat.chatHandler.send", json!({"content": text, "target": "*"}))
}

/// `onChat` bodies until `n` have come (at most 10 s), then any more within 300 ms.
fn chats(c: &mut Client, n: usize) -> Vec<Value> {
    c.collect("onChat", n, Duration::from_secs(10), Duration::from_millis(300))
}

fn texts(chats: &[Value]) -> Vec<String> {
    chats.iter().map(|b| b["msg"].as_str().unwrap_or("?").to_string()).collect()
}

#[test]
fn a_killed_connector_s_clients_recover_what_was_said_meanwhile() {
    let (c, g) = start();
    let (mut ann, r) = enter(g, "ann", "k", None);
    let epoch = r["epoch"].clone();
    let (mut bob, _) = enter(g, "bob", "k", None);
    for t in ["a1", "a2"] {
        assert_eq!(send(&mut bob, t), json!({}));
    }
    let got = chats(&mut ann, 2);
    assert_eq!(texts(&got), ["a1", "a2"]);
    let at = json!({"epoch": epoch, "offset": got[1]["offset"]});
    let pid = c.server("connector-1")["pid"].as_u64().expect("pid") as u32;
    signal(pid, 9);
    assert!(ann.wait_closed(Duration::from_secs(5)) && bob.wait_closed(Duration::from_secs(5)));
    // Bob is back first and goes on talking; ann comes back later, from where she was.
    let (mut bob, r) = enter(g, "bob", "k", Some(at.clone()));
    assert_eq!((&r["recovered"], &r["epoch"]), (&json!(true), &epoch), "the chat server kept the history: {r}");
    for t in ["b1", "b2", "b3"] {
        assert_eq!(send(&mut bob, t), json!({}));
    }
    let (mut ann, r) = enter(g, "ann", "k", Some(at));
    assert_eq!(r["recovered"], true, "{r}");
    let got = chats(&mut ann, 3);
    assert_eq!(texts(&got), ["b1", "b2", "b3"], "what ann missed, in order, once");
    assert!(got.iter().all(|b| b["epoch"] == epoch), "{got:?}");
}

#[test]
fn a_killed_chat_server_with_memory_history_starts_a_new_epoch_never_a_silent_gap() {
    let (c, g) = start();
    let (mut ann, r) = enter(g, "ann", "m", None);
    let old = r["epoch"].clone();
    assert!(old.is_string(), "{r}");
    let (mut bob, _) = enter(g, "bob", "m", None);
    for t in ["x1", "x2", "x3"] {
        assert_eq!(send(&mut bob, t), json!({}));
    }
    let got = chats(&mut ann, 3);
    assert_eq!(texts(&got), ["x1", "x2", "x3"]);
    assert_eq!(got[2]["offset"], 3);
    let pid = c.server("chat-1")["pid"].as_u64().expect("pid") as u32;
    signal(pid, 9);
    // Sends fail while it is down; once it is back (members re-joined), one is stored again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(&mut bob, "y1") != json!({}) {
        assert!(Instant::now() < deadline, "chat-1 never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = chats(&mut ann, 1);
    assert_eq!(texts(&got), ["y1"], "ann stayed in the room");
    assert_ne!(got[0]["epoch"], old, "history was lost, and the push says so: {got:?}");
    assert_eq!(got[0]["offset"], 1, "the new epoch starts at 1: {got:?}");
    let new = got[0]["epoch"].clone();
    ann.close();
    let (_ann, r) = enter(g, "ann", "m", Some(json!({"epoch": old, "offset": 3})));
    assert_eq!(r["recovered"], false, "the old epoch cannot be recovered: {r}");
    assert_eq!((&r["epoch"], &r["offset"]), (&new, &json!(1)), "where the room is now: {r}");
}

#[test]
fn pomelo_s_npm_client_reads_the_history_fields_and_recovers() {
    use crate::harness::{browser_ready, have, repo};
    if !browser_ready()
        || !have(repo().join("browser/node_modules/pomelo-jsclient-websocket").exists(), "pomelo-jsclient-websocket")
    {
        return;
    }
    let (_c, g) = start();
    let seen = crate::harness::browser_script("pomelo-npm.js", &[g.ip().to_string(), g.port().to_string()]);
    assert_eq!(seen["ok"], true);
    assert_eq!(seen["first"]["msg"], "one", "{seen}");
    assert_eq!(seen["missed"].as_array().map(Vec::len), Some(2), "{seen}");
}

#[test]
fn servers_yaml_bounds_each_room_s_history() {
    let cluster =
        CLUSTER.replace("{id: chat-1, port: 0}", "{id: chat-1, port: 0, history: {backend: memory, maxMessages: 3}}");
    let c = Cluster::start(&yaml(&cluster, ""));
    c.wait_running();
    let g: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let (mut ann, r) = enter(g, "ann", "h", None);
    let epoch = r["epoch"].clone();
    for t in ["h1", "h2", "h3", "h4", "h5"] {
        assert_eq!(send(&mut ann, t), json!({}));
    }
    let got = chats(&mut ann, 5);
    let page = ann.request("chat.chatHandler.history", json!({"rid": "h", "since": {"epoch": epoch, "offset": 0}}));
    // Only the last 3 are kept: from offset 0 the gap is not covered, and the page says so.
    assert_eq!(page["recovered"], false, "{page}");
    let page = ann.request(
        "chat.chatHandler.history",
        json!({"rid": "h", "since": {"epoch": epoch, "offset": got[1]["offset"]}}),
    );
    assert_eq!(page["recovered"], true, "{page}");
    let kept: Vec<&str> =
        page["messages"].as_array().expect("messages").iter().filter_map(|m| m["msg"].as_str()).collect();
    assert_eq!(kept, ["h3", "h4", "h5"], "{page}");
    // A backend without what it needs is a clear configuration error, not a silent memory backend.
    let bad = CLUSTER.replace("{id: chat-1, port: 0}", "{id: chat-1, port: 0, history: {backend: redis}}");
    std::fs::write(c.config(), yaml(&bad, "")).expect("write");
    let out = c.run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("the `redis` backend needs `url`"), "{out:?}");
}
