//! The master killed with SIGKILL under chat load, and a new master adopting its workers (issue 12).
//!
//! The README promises this is invisible to clients: workers keep serving without a master and a new
//! `pomelo-rs start` adopts them. Each test runs 2 connectors and 2 chat servers, [`CLIENTS`] clients (half
//! WebSocket, half raw TCP) in [`ROOMS`] rooms spread over both chat servers, each sending one message a
//! second; kills the master mid-stream, starts a new one [`MASTER_DOWN`] later and keeps chatting. The
//! registration order with the new master is forced per test: the workers named `late` wait
//! [`LATE_MS`] before they re-register (the `POMELO_TEST_REGISTER_DELAY_MS` hook in worker/src/control.rs).
//!
//! Convergence waits are generous (a noisy 2-core machine); what is checked is counted exactly: the same
//! worker pids; no `{"code":500}` outside the seconds the master was down (plus [`MARGIN`]); every
//! acknowledged send delivered exactly once to every member of its room (nobody leaves, so every member
//! was there for the whole run), nothing delivered to another room; no onLeave or onAdd at all once
//! chatting began; no client disconnected; and afterwards a newcomer to each room sees every member in
//! its user list.

pub mod client;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{wait_until, yaml, Cluster};
use client::{login, Kind, User};

const CLIENTS: usize = 160;
const ROOMS: usize = 10;
/// How long the late workers wait before re-registering: past the time the others need to re-register
/// (their retry backoff is at most 1 s), well inside the new master's wait for adopted workers.
const LATE_MS: u64 = 2000;
const MASTER_DOWN: Duration = Duration::from_secs(2);
/// Chatting before the kill, and after every worker is adopted again.
const BEFORE_KILL: Duration = Duration::from_secs(4);
const AFTER_ADOPTION: Duration = Duration::from_secs(8);
/// A refused send is excused only between the kill and this long after the new master is up.
const MARGIN: Duration = Duration::from_secs(1);

#[test]
fn a_master_restart_is_invisible_when_the_connectors_re_register_last() {
    master_restart_under_load(&["connector-1", "connector-2"]);
}

#[test]
fn a_master_restart_is_invisible_when_the_chat_servers_re_register_last() {
    master_restart_under_load(&["chat-1", "chat-2"]);
}

#[test]
fn a_master_restart_is_invisible_when_one_connector_and_one_chat_server_re_register_last() {
    master_restart_under_load(&["connector-2", "chat-1"]);
}

fn cluster_yaml(late: &[&str]) -> String {
    let env = |id: &str| {
        if late.contains(&id) {
            format!(", env: {{POMELO_TEST_REGISTER_DELAY_MS: '{LATE_MS}'}}")
        } else {
            String::new()
        }
    };
    let servers = format!(
        "  gate:\n    - {{id: gate-1, clientPort: 0}}\n  connector:\n{}  chat:\n{}",
        ["connector-1", "connector-2"]
            .iter()
            .map(|id| format!("    - {{id: {id}, port: 0, clientPort: 0{}}}\n", env(id)))
            .collect::<String>(),
        ["chat-1", "chat-2"].iter().map(|id| format!("    - {{id: {id}, port: 0{}}}\n", env(id))).collect::<String>(),
    );
    // The new master waits max(heartbeatTimeout, 3 s) for an adopted worker to register: make it
    // comfortably longer than a late worker needs, so no worker is replaced.
    let text = yaml(&servers, "");
    assert!(text.contains("heartbeatTimeout: 2s"));
    text.replace("heartbeatTimeout: 2s", "heartbeatTimeout: 8s")
}

/// Logs in `n` clients through `gate` (16 at a time), `u0`.. spread over `rooms` in turn, alternating
/// WebSocket and TCP per round of rooms, their sends staggered over the second.
pub(crate) fn log_in_all(
    rt: &tokio::runtime::Runtime,
    gate: SocketAddr,
    n: usize,
    rooms: &[String],
    sending: &Arc<AtomicBool>,
) -> Vec<User> {
    rt.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(16));
        let logins: Vec<_> = (0..n)
            .map(|i| {
                let kind = if (i / rooms.len()) % 2 == 0 { Kind::Ws } else { Kind::Tcp };
                let (name, rid) = (format!("u{i}"), rooms[i % rooms.len()].clone());
                let phase = Duration::from_millis((i * 1000 / n) as u64);
                let (limit, sending) = (limit.clone(), sending.clone());
                tokio::spawn(async move {
                    let _permit = limit.acquire().await;
                    let (u, reply) = login(kind, gate, name.clone(), rid, phase, sending).await.expect("login");
                    assert!(reply["users"].as_array().is_some(), "{name} entered: {reply}");
                    u
                })
            })
            .collect();
        let mut users = Vec::new();
        for l in logins {
            users.push(l.await.expect("login task"));
        }
        users
    })
}

/// Ten rooms, five owned by each chat server.
pub(crate) fn rooms() -> Vec<String> {
    let chats = ["chat-1", "chat-2"];
    let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let rid = format!("room{i}");
        let owner = pomelo_proto::route::rendezvous(&rid, chats.iter().copied()).expect("owner");
        let v = by.entry(owner).or_default();
        if v.len() < ROOMS / 2 {
            v.push(rid);
        }
        if by.values().map(Vec::len).sum::<usize>() == ROOMS {
            break;
        }
    }
    by.into_values().flatten().collect()
}

fn master_restart_under_load(late: &[&str]) {
    let mut c = Cluster::start(&cluster_yaml(late));
    let mut before = c.wait_running();
    before.sort();
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let rooms = rooms();
    let sending = Arc::new(AtomicBool::new(false));
    // The membership reaches the gate and the connectors a moment after `running`.
    wait_until(Duration::from_secs(20), "a first login to work", || {
        let probe =
            rt.block_on(login(Kind::Tcp, gate, "probe".into(), "probe-room".into(), Duration::ZERO, sending.clone()));
        let (u, reply) = probe.ok()?;
        u.task.abort();
        reply.get("users").map(|_| ())
    });
    let users = log_in_all(&rt, gate, CLIENTS, &rooms, &sending);
    wait_until(Duration::from_secs(10), "clients on both connectors", || {
        let n = |id: &str| c.server(id)["stats"]["connections"].as_f64().unwrap_or(0.0);
        (n("connector-1") > 0.0 && n("connector-2") > 0.0).then_some(())
    });
    // Let every onAdd of the logins arrive; from here on no membership push is expected.
    std::thread::sleep(Duration::from_secs(1));
    let counting = Instant::now();
    sending.store(true, Ordering::SeqCst);
    std::thread::sleep(BEFORE_KILL);

    let killed = Instant::now();
    c.kill_master();
    std::thread::sleep(MASTER_DOWN);
    c.spawn_master();
    let up = Instant::now();
    let pids = || -> Vec<(String, u32, bool)> {
        let ok = |s: &serde_json::Value| s["state"] == "running" && s["adopted"] == true;
        let id = |s: &serde_json::Value| s["id"].as_str().unwrap_or("").to_string();
        c.servers().iter().map(|s| (id(s), s["pid"].as_u64().unwrap_or(0) as u32, ok(s))).collect()
    };
    let mut problems = Vec::new();
    if !wait_until_or(Duration::from_secs(30), || {
        let now = pids();
        now.len() == before.len() && now.iter().all(|(.., ok)| *ok)
    }) {
        problems.push(format!("not every worker is running and adopted 30s after the new master: {:?}", pids()));
    }
    let mut after: Vec<(String, u32)> = pids().into_iter().map(|(id, pid, _)| (id, pid)).collect();
    let adopted = Instant::now();
    after.sort();
    // The order was forced: exactly the late workers waited before re-registering.
    for (id, _) in &before {
        let log = std::fs::read_to_string(c.dir.path().join(format!("logs/{id}.log"))).unwrap_or_default();
        let waited = log.contains("test hook POMELO_TEST_REGISTER_DELAY_MS");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("regist")).collect();
        assert_eq!(waited, late.contains(&id.as_str()), "{id} waited before re-registering: {waited}; {lines:#?}");
    }
    std::thread::sleep(AFTER_ADOPTION);
    sending.store(false, Ordering::SeqCst);

    // Every send is answered within the connectors' RPC timeout (5 s); then every delivery is in.
    let _ =
        wait_until_or(Duration::from_secs(20), || users.iter().all(|u| lock(u).sent.iter().all(|s| s.reply.is_some())));
    let _ = wait_until_or(Duration::from_secs(15), || missing(&users).0 == 0);
    std::thread::sleep(Duration::from_millis(500));

    problems.extend(check(&users, counting, killed, up));
    // The rooms heal: a newcomer to each sees every member (after check(), which its onAdd would upset).
    let mut wrong = Vec::new();
    for (k, rid) in rooms.iter().enumerate() {
        let name = format!("newcomer{k}");
        match rt.block_on(login(Kind::Tcp, gate, name.clone(), rid.clone(), Duration::ZERO, sending.clone())) {
            Ok((u, reply)) => {
                u.task.abort();
                let got: HashSet<String> = serde_json::from_value(reply["users"].clone()).unwrap_or_default();
                let mut want: HashSet<String> =
                    users.iter().filter(|u| &u.rid == rid).map(|u| u.name.clone()).collect();
                want.insert(name);
                if got != want {
                    let lost = want.difference(&got).count();
                    let extra: Vec<_> = got.difference(&want).collect();
                    wrong.push(format!(
                        "{rid}: {} of {} users, {lost} missing, extra {extra:?}",
                        got.len(),
                        want.len()
                    ));
                }
            }
            Err(e) => wrong.push(format!("{rid}: could not enter: {e:#}")),
        }
    }
    if !wrong.is_empty() {
        problems.push(format!("{} rooms give a newcomer a wrong user list: {wrong:?}", wrong.len()));
    }
    for u in &users {
        u.task.abort();
    }
    if after != before {
        problems.push(format!("worker pids changed: before {before:?}, after {after:?}"));
    }
    let mut pids = c.worker_pids();
    pids.sort();
    let mut want: Vec<u32> = before.iter().map(|(_, p)| *p).collect();
    want.sort();
    if pids != want {
        problems.push(format!("worker processes {pids:?}, expected exactly the original {want:?}"));
    }
    eprintln!(
        "late {late:?}: master down {:?}, new master up to all adopted {:?}",
        up.duration_since(killed),
        adopted.duration_since(up)
    );
    if !problems.is_empty() {
        let keep = c.keep_logs(&format!("failover-logs/{}", late.join("+")));
        panic!(
            "with {late:?} re-registering last ({} problems; logs copied to {}):\n- {}",
            problems.len(),
            keep.display(),
            problems.join("\n- ")
        );
    }
}

pub(crate) fn lock(u: &User) -> std::sync::MutexGuard<'_, client::Log> {
    u.log.lock().expect("a client's log")
}

pub(crate) fn wait_until_or(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Acknowledged sends not (yet) delivered to a connected member of the room: (count, examples).
pub(crate) fn missing(users: &[User]) -> (usize, Vec<String>) {
    let mut acked: HashMap<&str, Vec<String>> = HashMap::new();
    for u in users {
        let l = lock(u);
        let ok = l.sent.iter().filter(|s| s.reply.as_ref() == Some(&json!({}))).map(|s| s.content.clone());
        acked.entry(u.rid.as_str()).or_default().extend(ok);
    }
    let (mut n, mut examples) = (0, Vec::new());
    for u in users {
        let l = lock(u);
        if l.closed.is_some() {
            continue;
        }
        let lost: Vec<&String> = acked[u.rid.as_str()].iter().filter(|m| !l.chats.contains_key(*m)).collect();
        n += lost.len();
        if !lost.is_empty() && examples.len() < 5 {
            examples.push(format!(
                "{} ({:?}) in {} missed {} acknowledged messages, e.g. {:?}",
                u.name,
                u.kind,
                u.rid,
                lost.len(),
                &lost[..lost.len().min(3)]
            ));
        }
    }
    (n, examples)
}

pub(crate) fn check(users: &[User], counting: Instant, killed: Instant, up: Instant) -> Vec<String> {
    let mut problems = Vec::new();
    let t = |at: Instant| {
        at.checked_duration_since(killed).map_or_else(|| format!("-{:?}", killed - at), |d| format!("+{d:?}"))
    };
    let (mut acked, mut excused, mut refused, mut unanswered, mut odd) = (0, Vec::new(), Vec::new(), 0, Vec::new());
    let mut sent_in: HashMap<String, HashSet<String>> = HashMap::new();
    let logs: Vec<_> = users.iter().map(lock).collect();
    for (u, l) in users.iter().zip(&logs) {
        for s in &l.sent {
            sent_in.entry(u.rid.clone()).or_default().insert(s.content.clone());
            match &s.reply {
                Some(r) if *r == json!({}) => acked += 1,
                Some(r) if r["code"] == 500 && s.at >= killed && s.at <= up + MARGIN => excused.push(s.at),
                Some(r) if r["code"] == 500 => refused.push(format!("{} sent at kill{}: {r}", s.content, t(s.at))),
                Some(r) => odd.push(format!("{}: {r}", s.content)),
                None => unanswered += 1,
            }
        }
    }
    excused.sort();
    let span = match (excused.first(), excused.last()) {
        (Some(a), Some(b)) => format!(" (sent from kill{} to kill{})", t(*a), t(*b)),
        _ => String::new(),
    };
    eprintln!(
        "{acked} sends acknowledged; {} refused while the master was down{span}; {} refused outside that",
        excused.len(),
        refused.len()
    );
    if !refused.is_empty() {
        let window = format!("kill .. new master up + {MARGIN:?} = kill+{:?}", up + MARGIN - killed);
        let e = &refused[..refused.len().min(4)];
        problems.push(format!(
            "{} sends refused outside the window the master was down ({window}), e.g. {e:?}",
            refused.len()
        ));
    }
    if !odd.is_empty() {
        problems.push(format!("{} sends got an unexpected answer, e.g. {:?}", odd.len(), &odd[..odd.len().min(4)]));
    }
    let closed: Vec<String> = users
        .iter()
        .zip(&logs)
        .filter_map(|(u, l)| l.closed.as_ref().map(|(at, why)| format!("{} at kill{}: {why}", u.name, t(*at))))
        .collect();
    if !closed.is_empty() {
        problems.push(format!(
            "{} clients lost their connection, e.g. {:?}",
            closed.len(),
            &closed[..closed.len().min(4)]
        ));
    }
    if unanswered > 0 {
        problems.push(format!("{unanswered} sends never got an answer"));
    }
    drop(logs);
    let (lost, examples) = missing(users);
    if lost > 0 {
        problems.push(format!("{lost} acknowledged deliveries missing: {examples:?}"));
    }
    let (mut dup, mut stray, mut leaves, mut adds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for u in users {
        let l = lock(u);
        for (msg, n) in &l.chats {
            if !sent_in.get(&u.rid).is_some_and(|m| m.contains(msg)) {
                stray.push(format!("{} in {} got {msg:?}", u.name, u.rid));
            } else if *n > 1 {
                dup.push(format!("{} got {msg:?} {n} times", u.name));
            }
        }
        for (at, route, body) in l.pushes.iter().filter(|(at, ..)| *at >= counting) {
            let what = format!("{} in {} at kill{}: {route} {body}", u.name, u.rid, t(*at));
            if route == "onLeave" {
                leaves.push(what)
            } else {
                adds.push(what)
            }
        }
    }
    for (what, v) in [
        ("duplicate deliveries", dup),
        ("deliveries of another room's messages", stray),
        ("spurious onLeave pushes", leaves),
        ("other unexpected pushes (onAdd for users already there, ...)", adds),
    ] {
        if !v.is_empty() {
            problems.push(format!("{} {what}, e.g. {:?}", v.len(), &v[..v.len().min(4)]));
        }
    }
    problems
}
