//! The chat demo across a real cluster: gate, connectors, chat servers, over real sockets.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::harness::{signal, wait_until, yaml, Cluster};
use crate::pomelo_client::{login, try_login, Client};

const CLUSTER: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n    - {id: connector-2, port: 0, clientPort: 0}\n    - {id: connector-3, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-2, port: 0}\n";

/// Six room names, three owned by each chat server.
fn rooms() -> Vec<String> {
    let chats = ["chat-1", "chat-2"];
    let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let rid = format!("room{i}");
        let owner = pomelo_proto::route::rendezvous(&rid, chats.iter().copied()).expect("owner");
        let v = by.entry(owner).or_default();
        if v.len() < 3 {
            v.push(rid);
        }
        if by.values().map(Vec::len).sum::<usize>() == 6 && by.len() == 2 {
            break;
        }
    }
    by.into_values().flatten().collect()
}

struct User {
    name: String,
    rid: String,
    client: Client,
}

fn gate(c: &Cluster) -> SocketAddr {
    c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr")
}

fn start() -> (Cluster, SocketAddr) {
    let c = Cluster::start(&yaml(CLUSTER, ""));
    c.wait_running();
    // Connectors learn the chat servers from the membership; give it a moment to reach everyone.
    let g = gate(&c);
    wait_until(Duration::from_secs(10), "a login to work", || {
        try_login(g, "probe", "probe-room").map(|(mut cl, _)| cl.close())
    });
    (c, g)
}

fn log_in_all(g: SocketAddr, n: usize, rooms: &[String]) -> Vec<User> {
    let mut users = Vec::new();
    for i in 0..n {
        let name = format!("u{i}");
        let rid = rooms[i % rooms.len()].clone();
        let (client, reply) = login(g, &name, &rid);
        let list: Vec<String> = serde_json::from_value(reply["users"].clone()).expect("users");
        assert_eq!(list.len(), i / rooms.len() + 1, "{name} sees everyone already in {rid}: {list:?}");
        assert!(list.contains(&name));
        users.push(User { name, rid, client });
    }
    users
}

/// Every user sends one broadcast; every member of its room must get each exactly once, nobody else any.
fn check_broadcasts(users: &mut [User], tag: &str) {
    for u in users.iter_mut() {
        u.client.drain_pushes(Duration::from_millis(20));
    }
    for u in users.iter_mut() {
        let reply = u.client.request(
            "chat.chatHandler.send",
            json!({"rid": u.rid, "content": format!("{tag} from {}", u.name), "from": u.name, "target": "*"}),
        );
        assert_eq!(reply, json!({}), "send answered {reply}");
    }
    let members: HashMap<String, Vec<String>> = users.iter().fold(HashMap::new(), |mut m, u| {
        m.entry(u.rid.clone()).or_default().push(u.name.clone());
        m
    });
    for u in users.iter_mut() {
        let n = members[&u.rid].len();
        let mut got: Vec<String> = u
            .client
            .collect("onChat", n, Duration::from_secs(5), Duration::from_millis(30))
            .into_iter()
            .map(|b| {
                assert_eq!(b["target"], "*");
                format!("{} / {}", b["from"].as_str().unwrap_or(""), b["msg"].as_str().unwrap_or(""))
            })
            .collect();
        got.sort();
        let mut want: Vec<String> = members[&u.rid].iter().map(|m| format!("{m} / {tag} from {m}")).collect();
        want.sort();
        assert_eq!(got, want, "{} in {} got exactly its room's messages, once each", u.name, u.rid);
    }
}

#[test]
fn broadcasts_private_messages_joins_leaves_and_duplicate_logins() {
    let (c, g) = start();
    let rooms = rooms();
    let mut users = log_in_all(g, 30, &rooms);
    // Rooms are spread over both chat servers.
    wait_until(Duration::from_secs(5), "3 rooms on each chat server", || {
        let r = |id: &str| c.server(id)["stats"]["rooms"].as_f64();
        (r("chat-1") == Some(3.0) && r("chat-2") == Some(3.0)).then_some(())
    });
    // Users are spread over the connectors.
    let conns: Vec<f64> = ["connector-1", "connector-2", "connector-3"]
        .iter()
        .map(|id| c.server(id)["stats"]["connections"].as_f64().unwrap_or(0.0))
        .collect();
    assert!(conns.iter().filter(|n| **n > 0.0).count() >= 2, "connections per connector {conns:?}");

    // The first of each room heard onAdd for every later member of its room.
    let adds: Vec<String> = users[0]
        .client
        .drain_pushes(Duration::from_millis(300))
        .into_iter()
        .filter(|(r, _)| r == "onAdd")
        .map(|(_, b)| b["user"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(adds, ["u6", "u12", "u18", "u24"]);
    check_broadcasts(&mut users, "hello");

    // A private message reaches its target only (u0 and u6 share a room).
    for u in users.iter_mut() {
        u.client.drain_pushes(Duration::from_millis(100));
    }
    let r = users[0]
        .client
        .request("chat.chatHandler.send", json!({"rid": rooms[0], "content": "psst", "from": "u0", "target": "u6"}));
    assert_eq!(r, json!({}));
    let got = users[6].client.next_push(Duration::from_secs(2)).expect("u6 gets it");
    assert_eq!(got.0, "onChat");
    let body = &got.1;
    assert_eq!((&body["msg"], &body["from"], &body["target"]), (&json!("psst"), &json!("u0"), &json!("u6")), "{body}");
    assert!(body["epoch"].is_string() && body["offset"].as_u64() > Some(0), "numbered in the room's history: {body}");
    for (i, u) in users.iter_mut().enumerate().filter(|(i, _)| *i != 6) {
        assert!(u.client.next_push(Duration::from_millis(100)).is_none(), "user {i} got a private message");
    }
    // A private message to someone not in the room is refused (not answered `{}` as if delivered).
    let r = users[0].client.request(
        "chat.chatHandler.send",
        json!({"rid": rooms[0], "content": "psst", "from": "u0", "target": "nobody"}),
    );
    assert_eq!(r, json!({"code": 500}), "a private message to no one");

    // The same name in the same room is refused.
    let (_dup, reply) = login(g, "u0", &rooms[0]);
    assert_eq!(reply, json!({"code": 500, "error": true}));
    // Also on another connector than the gate would pick (the room's chat server refuses it).
    let mut gq = Client::connect(g);
    let home = gq.request("gate.gateHandler.queryEntry", json!({"uid": "u0"}))["port"].as_u64();
    let other: SocketAddr = c
        .servers()
        .iter()
        .filter(|s| s["type"] == "connector")
        .filter_map(|s| s["addrs"]["client"].as_str()?.parse::<SocketAddr>().ok())
        .find(|a| Some(a.port() as u64) != home)
        .expect("another connector");
    let mut elsewhere = Client::connect(other);
    let reply = elsewhere.request("connector.entryHandler.enter", json!({"username": "u0", "rid": rooms[0]}));
    assert_eq!(reply, json!({"code": 500, "error": true}), "duplicate across connectors");
    // The refused session can still enter under another name.
    let reply = elsewhere.request("connector.entryHandler.enter", json!({"username": "u0b", "rid": rooms[0]}));
    assert!(reply["users"].as_array().is_some_and(|u| u.len() == 6), "{reply}");
    elsewhere.close();
    for u in users.iter_mut() {
        u.client.drain_pushes(Duration::from_millis(50));
    }

    // A user who leaves is announced to the rest of the room.
    let mut gone = users.remove(1);
    gone.client.close();
    for u in users.iter_mut().filter(|u| u.rid == rooms[1]) {
        let (route, body) = u.client.next_push(Duration::from_secs(3)).expect("onLeave");
        assert_eq!((route.as_str(), body["user"].as_str()), ("onLeave", Some("u1")));
    }
    wait_until(Duration::from_secs(5), "29 members", || {
        let m = |id: &str| c.server(id)["stats"]["members"].as_f64().unwrap_or(0.0);
        (m("chat-1") + m("chat-2") == 29.0).then_some(())
    });
}

#[test]
fn rooms_survive_a_chat_server_kill() {
    let (c, g) = start();
    let rooms = rooms();
    let mut users = log_in_all(g, 12, &rooms);
    let old = c.server("chat-1")["pid"].as_u64().expect("pid") as u32;
    signal(old, 9);
    wait_until(Duration::from_secs(15), "chat-1 back", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)).then_some(())
    });
    // Rooms rebuild on their own: the member counts come back without anyone logging in again.
    wait_until(Duration::from_secs(10), "members back on both chat servers", || {
        let m = |id: &str| c.server(id)["stats"]["members"].as_f64().unwrap_or(0.0);
        (m("chat-1") + m("chat-2") == 12.0 && m("chat-1") > 0.0).then_some(())
    });
    // A newcomer to each room sees the complete user list.
    for (k, rid) in rooms.iter().enumerate() {
        let (mut nc, reply) = login(g, &format!("late{k}"), rid);
        let list: Vec<String> = serde_json::from_value(reply["users"].clone()).expect("users");
        let mut want: Vec<String> = users.iter().filter(|u| &u.rid == rid).map(|u| u.name.clone()).collect();
        want.push(format!("late{k}"));
        let mut got = list.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "user list of {rid} after the restart");
        nc.close();
    }
    check_broadcasts(&mut users, "after the restart");
}

#[test]
fn a_killed_connector_s_users_leave_and_can_log_in_again() {
    let (c, g) = start();
    let rooms = rooms();
    let mut users = log_in_all(g, 18, &rooms);
    // The connector of u0.
    let victim_pid = wait_until(Duration::from_secs(5), "a connector with users", || {
        c.servers()
            .iter()
            .find(|s| s["type"] == "connector" && s["stats"]["connections"].as_f64().unwrap_or(0.0) > 0.0)
            .and_then(|s| s["pid"].as_u64())
            .map(|p| p as u32)
    });
    for u in users.iter_mut() {
        u.client.drain_pushes(Duration::from_millis(100));
    }
    signal(victim_pid, 9);
    std::thread::sleep(Duration::from_millis(500));
    for u in users.iter_mut() {
        u.client.wait_closed(Duration::from_millis(100));
    }
    // Whoever lost the connection is gone; the others hear onLeave for them.
    let (gone, stay): (Vec<User>, Vec<User>) = users.into_iter().partition(|u| u.client.closed);
    assert!(!gone.is_empty(), "some users were on the killed connector");
    assert!(!stay.is_empty(), "some users were on the other connectors");
    let gone_names: Vec<String> = gone.iter().map(|u| u.name.clone()).collect();
    let mut stay = stay;
    for u in stay.iter_mut() {
        let expected: Vec<&String> = gone.iter().filter(|g| g.rid == u.rid).map(|g| &g.name).collect();
        let leaves: Vec<String> = u
            .client
            .collect("onLeave", expected.len(), Duration::from_secs(5), Duration::from_millis(30))
            .into_iter()
            .map(|b| b["user"].as_str().unwrap_or("").to_string())
            .collect();
        let mut want: Vec<String> = expected.into_iter().cloned().collect();
        let mut got = leaves;
        want.sort();
        got.sort();
        assert_eq!(got, want, "{} hears onLeave for its room's users of the dead connector", u.name);
    }
    // They log in again through the gate.
    for (k, name) in gone_names.iter().enumerate() {
        let rid = &gone[k].rid;
        let (_c, reply) = login(g, name, rid);
        assert!(reply["users"].as_array().is_some_and(|l| l.iter().any(|n| n == name.as_str())), "{reply}");
    }
}

#[test]
fn the_chat_page_works_in_a_browser() {
    use crate::harness::{browser_ready, repo};
    if !browser_ready() {
        return;
    }
    let (c, g) = start();
    // The gate answers a plain GET / with the page.
    let (status, body) = crate::harness::http(g, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains("<title>pomelo-rs chat</title>"));
    let shot = c.dir.path().join("chat.png");
    let seen = crate::harness::browser_script(
        "chat.js",
        &[format!("http://{g}/"), shot.display().to_string(), format!("http://{}", c.admin_addr()), c.token()],
    );
    assert_eq!(seen["ok"], true);
    assert_eq!(seen["ada_users"], json!(["ada"]), "bob has left ada's list");
    let log: Vec<String> = serde_json::from_value(seen["ada_log"].clone()).expect("log");
    assert!(log.iter().any(|l| l.starts_with("disconnected: ")), "the page said why it lost the connector: {log:?}");
    assert!(log.iter().any(|l| l == "reconnected"), "{log:?}");
    assert_eq!(
        c.server("connector-1")["restarts"].as_u64().unwrap_or(0)
            + c.server("connector-2")["restarts"].as_u64().unwrap_or(0)
            + c.server("connector-3")["restarts"].as_u64().unwrap_or(0),
        1
    );
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    let keep = repo().join("target/screenshots");
    std::fs::create_dir_all(&keep).ok();
    std::fs::write(keep.join("chat.png"), png).ok();
}

/// Emoji as Pomelo's browser client sends them (each UTF-16 unit as UTF-8: CESU-8 surrogate pairs) arrive
/// as the real characters at the sender and another member (both raw TCP clients here); Pomelo turned them into `{}`
/// (an unparsable body) and so a message without content. The bytes are what pomelo-protocol's browser
/// `strencode` writes (checked against it in proto/tests/oracle.rs).
#[test]
fn emoji_from_the_js_client_arrive_as_emoji() {
    let (_c, g) = start();
    let (mut a, _) = login(g, "amy", "emoji-room");
    let (mut b, _) = login(g, "ben", "emoji-room");
    // "hi 😀": U+1F600 as the surrogates D83D DE00, each written as three bytes.
    let mut content = b"hi ".to_vec();
    content.extend_from_slice(&[0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80]);
    let mut body = br#"{"rid":"emoji-room","content":""#.to_vec();
    body.extend_from_slice(&content);
    body.extend_from_slice(br#"","from":"amy","target":"*"}"#);
    let reply = a.request_bytes("chat.chatHandler.send", body);
    assert!(reply.get("code").is_none(), "{reply}");
    for cl in [&mut a, &mut b] {
        let got = cl.collect("onChat", 1, Duration::from_secs(5), Duration::from_millis(100));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["msg"], "hi 😀");
    }
    // A lone surrogate is not text: the send is refused, not delivered as garbage.
    let mut bad = br#"{"rid":"emoji-room","content":"x"#.to_vec();
    bad.extend_from_slice(&[0xED, 0xA0, 0xBD]);
    bad.extend_from_slice(br#"","from":"amy","target":"*"}"#);
    let reply = a.request_bytes("chat.chatHandler.send", bad);
    assert_eq!(reply["code"], 500, "{reply}");
    assert!(b.collect("onChat", 1, Duration::from_millis(500), Duration::from_millis(50)).is_empty());
}

/// The chat page through a kill -9 of its room's chat server, with room history on disk: a send refused
/// while it is down is said on the page (not silently dropped), and both pages end with exactly the
/// acknowledged messages, each once, in order, and no word of lost history.
#[test]
fn the_chat_page_loses_nothing_when_its_chat_server_is_killed_with_disk_history() {
    use crate::harness::{browser_ready, signal};
    if !browser_ready() {
        return;
    }
    let cluster = CLUSTER
        .replace("{id: chat-1, port: 0}", "{id: chat-1, port: 0, history: {backend: disk}}")
        .replace("{id: chat-2, port: 0}", "{id: chat-2, port: 0, history: {backend: disk}}");
    assert_eq!(cluster.matches("backend: disk").count(), 2, "{cluster}");
    let c = Cluster::start(&yaml(&cluster, ""));
    c.wait_running();
    let g = gate(&c);
    wait_until(Duration::from_secs(10), "a login to work", || {
        try_login(g, "probe", "probe-room").map(|(mut cl, _)| cl.close())
    });
    let owner =
        pomelo_proto::route::rendezvous("durable", ["chat-1", "chat-2"].into_iter()).expect("owner").to_string();
    let before = c.server(&owner)["pid"].as_u64().expect("pid") as u32;
    // The pages send every 300 ms for 9 s: the kill comes while they do.
    let seen = crate::harness::browser_script_on(
        "chat-history.js",
        &[format!("http://{g}/"), "30".into()],
        "sent d10",
        || signal(before, 9),
    );
    assert_eq!(seen["ok"], true);
    assert_ne!(c.server(&owner)["pid"].as_u64(), Some(before as u64), "{owner} was killed and restarted");
}
