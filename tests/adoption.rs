//! A master killed and started again while clients are logged in: the new master adopts the workers and
//! announces no membership that lacks a live server, whichever worker re-registers last, so no chat server
//! drops a connector's members and every room keeps working. A worker's re-registration is delayed by
//! stopping it (SIGSTOP) until the new master has heard from the others.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::harness::{signal, wait_until, yaml, Cluster, SMALL};
use crate::pomelo_client::{login, try_login, Client};

const ROOMS: [&str; 4] = ["r0", "r1", "r2", "r3"];

fn master_restart_keeps_every_room_with(late: &str) {
    let mut c = Cluster::start(&yaml(SMALL, ""));
    c.wait_running();
    let gate = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    wait_until(Duration::from_secs(10), "a login to work", || {
        try_login(gate, "probe", "probe-room").map(|(mut cl, _)| cl.close())
    });
    let mut users: Vec<(String, &str, Client)> = (0..8)
        .map(|i| {
            let name = format!("u{i}");
            let rid = ROOMS[i % ROOMS.len()];
            let (client, reply) = login(gate, &name, rid);
            assert!(reply.get("users").is_some(), "{name} logged in: {reply}");
            (name, rid, client)
        })
        .collect();
    let late_pid = c.server(late)["pid"].as_u64().expect("pid") as u32;

    c.kill_master();
    signal(late_pid, 19); // SIGSTOP: it cannot re-register until SIGCONT.
    c.spawn_master();
    std::thread::sleep(Duration::from_millis(1500));
    signal(late_pid, 18); // SIGCONT
    c.wait_running();
    assert!(c.servers().iter().all(|s| s["adopted"] == true), "{:?}", c.servers());
    std::thread::sleep(Duration::from_secs(1));

    for (_, _, cl) in users.iter_mut() {
        cl.drain_pushes(Duration::from_millis(20));
    }
    for (name, rid, cl) in users.iter_mut() {
        let reply = cl.request(
            "chat.chatHandler.send",
            json!({"rid": *rid, "content": format!("after from {name}"), "from": name, "target": "*"}),
        );
        assert_eq!(reply, json!({}), "{late} re-registered last: {name}'s send in {rid} answered {reply}");
    }
    let mut members: HashMap<&str, usize> = HashMap::new();
    for (_, rid, _) in &users {
        *members.entry(*rid).or_default() += 1;
    }
    for (name, rid, cl) in users.iter_mut() {
        let got = cl.collect("onChat", members[*rid], Duration::from_secs(5), Duration::from_millis(30));
        assert_eq!(got.len(), members[*rid], "{late} re-registered last: {name} in {rid} got {got:?}");
        let leaves: Vec<_> =
            cl.drain_pushes(Duration::from_millis(20)).into_iter().filter(|(r, _)| r == "onLeave").collect();
        assert!(leaves.is_empty(), "{late} re-registered last: {name} got onLeave for users who stayed: {leaves:?}");
    }
    for chat in ["chat-1", "chat-2"] {
        let log = std::fs::read_to_string(c.dir.path().join(format!("logs/{chat}.log"))).unwrap_or_default();
        assert!(!log.contains("left the cluster"), "{late} re-registered last: {chat} dropped a connector:\n{log}");
    }
}

#[test]
fn a_master_restart_keeps_every_room_when_a_connector_registers_last() {
    master_restart_keeps_every_room_with("connector-1");
}

#[test]
fn a_master_restart_keeps_every_room_when_a_chat_server_registers_last() {
    master_restart_keeps_every_room_with("chat-1");
}
