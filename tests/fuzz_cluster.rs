//! A bounded fuzz run against every cluster-facing decoder of a real cluster: both chat servers' RPC
//! ports and the master's control port, from fixed seeds, as attackers without the cluster token (inputs
//! from [`crate::fuzz_frames`]), with idle and half-open connections held open meanwhile.
//!
//! Meanwhile, a WebSocket and a TCP member of a room of each chat server exchange messages both ways.
//! Afterwards: no server crashed or restarted (same pids, no restarts in the admin API), the master still
//! answers, the held connections were closed by the servers within a few seconds, and a WebSocket and a
//! TCP client that come in through the gate and the connector exchange messages, both ways, in a room of
//! each chat server. The run must also have reached the decoders: the servers closed fuzz connections
//! promptly (before any hello or register timeout) and their logs name fuzz peers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fuzz::Rng;
use crate::fuzz_frames::{idle_script, script, Port, Script};
use crate::harness::{wait_until, yaml, Cluster};
use crate::hostile::{runtime, send_pkg, watch, Client, Kind, ENTER};

const SERVERS: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0, heartbeat: 30s}\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-2, port: 0}\n";

/// How long each port is fuzzed, by this many connections at a time.
const FUZZ_FOR: Duration = Duration::from_secs(4);
const PARALLEL: u64 = 12;
/// Connections held idle or half-open per port while the fuzz runs.
const HELD: usize = 40;
/// A server that closes a connection within this long after its last byte refused what it read
/// (every pre-authentication timeout is longer).
const PROMPT: Duration = Duration::from_millis(1500);
/// Held connections must be closed by the server this long after they opened.
const HELD_LIMIT: Duration = Duration::from_secs(12);

/// What the fuzz of one port did.
#[derive(Default, Debug)]
struct Tally {
    conns: usize,
    /// Closed by the server (EOF or reset) within [`PROMPT`] of the last write.
    refused: usize,
    /// Connections that got bytes back (a rejection message, a challenge).
    answered: usize,
    /// Local ports of the fuzz connections, to find them in the logs.
    ports: HashSet<u16>,
}

/// Writes a script; true if the server then closed the connection within `within`.
async fn play(s: &mut TcpStream, sc: &Script, within: Duration) -> (bool, bool) {
    // A write may fail once the server has refused the first bytes: that is a refusal too.
    let wrote = s.write_all(&sc.bytes).await.is_ok();
    if sc.half_close && wrote {
        let _ = s.shutdown().await;
    }
    let mut answered = false;
    let mut buf = vec![0u8; 16 << 10];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => answered = true,
            }
        }
    })
    .await
    .is_ok();
    (closed || !wrote, answered)
}

async fn fuzz_port(addr: SocketAddr, port: Port, seed: u64) -> Tally {
    let stop = Instant::now() + FUZZ_FOR;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..PARALLEL {
        set.spawn(async move {
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut t = Tally::default();
            while Instant::now() < stop {
                let sc = script(port, &mut rng);
                let Ok(mut s) = TcpStream::connect(addr).await else { continue };
                if let Ok(a) = s.local_addr() {
                    t.ports.insert(a.port());
                }
                let (refused, answered) = play(&mut s, &sc, PROMPT).await;
                t.conns += 1;
                t.refused += refused as usize;
                t.answered += answered as usize;
            }
            t
        });
    }
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        let t = t.expect("a fuzz task");
        all.conns += t.conns;
        all.refused += t.refused;
        all.answered += t.answered;
        all.ports.extend(t.ports);
    }
    all
}

/// Opens [`HELD`] idle or half-open connections; each returns when the server closes it, or panics after
/// [`HELD_LIMIT`].
async fn hold(addr: SocketAddr, port: Port, seed: u64) -> tokio::task::JoinSet<()> {
    let mut rng = Rng(seed);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..HELD {
        let sc = idle_script(i, port, &mut rng);
        let mut s = TcpStream::connect(addr).await.expect("connect a held connection");
        set.spawn(async move {
            let opened = std::time::Instant::now();
            let (closed, _) = play(&mut s, &sc, HELD_LIMIT).await;
            assert!(
                closed,
                "{port:?} {addr}: a held connection ({} bytes) still open after {:?}",
                sc.bytes.len(),
                opened.elapsed()
            );
        });
    }
    set
}

fn log_lines(c: &Cluster, id: &str) -> String {
    let v = c.api(&format!("/api/servers/{id}/logs?lines=5000"));
    v["lines"].as_array().map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// The lines of `log` that name one of `ports` as a 127.0.0.1 peer.
fn peer_lines<'a>(log: &'a str, ports: &HashSet<u16>) -> Vec<&'a str> {
    log.lines()
        .filter(|l| {
            l.split("127.0.0.1:").skip(1).any(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().is_ok_and(|p: u16| ports.contains(&p))
            })
        })
        .collect()
}

/// A room of each chat server.
fn room_of(chat: &str) -> String {
    (0..)
        .map(|i| format!("fz{i}"))
        .find(|r| pomelo_proto::route::rendezvous(r, ["chat-1", "chat-2"].into_iter()) == Some(chat))
        .expect("a room")
}

/// Through the gate to the connector it names, then `enter` into `rid`: the client and the answer.
async fn try_enter(kind: Kind, gate: SocketAddr, name: &str, rid: &str) -> (Client, Value) {
    let mut g = Client::connect(kind, gate).await;
    g.handshake(false).await;
    let r = g.request(1, "gate.gateHandler.queryEntry", &json!({"uid": name})).await;
    assert_eq!(r["code"], 200, "{r}");
    let conn: SocketAddr = format!("{}:{}", r["host"].as_str().expect("host"), r["port"]).parse().expect("addr");
    let mut c = Client::connect(kind, conn).await;
    c.handshake(true).await;
    let r = c.request(1, ENTER, &json!({"username": name, "rid": rid})).await;
    (c, r)
}

async fn enter(kind: Kind, gate: SocketAddr, name: &str, rid: &str) -> Client {
    let (c, r) = try_enter(kind, gate, name, rid).await;
    assert!(r["users"].is_array(), "{name} cannot enter {rid}: {r}");
    c
}

/// `from` sends to `rid`; it gets the answer and its own push, `to` gets the push.
async fn exchange(from: &mut Client, fname: &str, to: &mut Client, rid: &str, id: u32) {
    let text = json!(format!("{fname} in {rid}"));
    assert!(from.send_raw(&send_pkg(id, rid, fname, text.clone())).await);
    let seen = watch(from, Duration::from_secs(10), |s| !s.chats.is_empty() && !s.responses.is_empty()).await;
    assert_eq!(seen.responses, vec![(id, json!({}))], "{fname} in {rid}");
    assert_eq!(seen.from(fname), vec![&text], "{fname} sees its own message in {rid}");
    let seen = watch(to, Duration::from_secs(10), |s| !s.chats.is_empty()).await;
    assert_eq!(seen.from(fname), vec![&text], "the other member gets {fname}'s message in {rid}");
}

#[test]
fn a_fuzz_run_against_the_cluster_ports_leaves_the_cluster_serving() {
    let c = Cluster::start(&yaml(SERVERS, ""));
    let before = c.wait_running();
    let addr = |id: &str, key: &str| -> SocketAddr {
        c.server(id)["addrs"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{id} has no {key} address"))
            .parse()
            .expect("address")
    };
    let (gate, chat1, chat2) = (addr("gate-1", "client"), addr("chat-1", "rpc"), addr("chat-2", "rpc"));
    let control: SocketAddr =
        c.master_json().and_then(|m| m["control_addr"].as_str()?.parse().ok()).expect("the control address");
    let rooms = [room_of("chat-1"), room_of("chat-2")];
    // The connector must reach both chat servers before the fuzz, so what fails afterwards is the fuzz's doing.
    runtime().block_on(async {
        for rid in &rooms {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if try_enter(Kind::Tcp, gate, "probe", rid).await.1["users"].is_array() {
                    break;
                }
                assert!(Instant::now() < deadline, "the connector does not reach the owner of {rid}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    let targets = [(chat1, Port::Rpc, "chat-1"), (chat2, Port::Rpc, "chat-2"), (control, Port::Control, "master")];
    let tallies = runtime().block_on(async {
        let mut held = Vec::new();
        for (i, (a, p, _)) in targets.iter().enumerate() {
            held.push(hold(*a, *p, 0xc1a5_7e20 + i as u64).await);
        }
        // Members of a room of each chat server keep talking, both ways, while the fuzz runs.
        let mut pairs = Vec::new();
        for (n, rid) in rooms.iter().enumerate() {
            let (wn, tn) = (format!("during-ws{n}"), format!("during-tcp{n}"));
            pairs.push((enter(Kind::Ws, gate, &wn, rid).await, wn, enter(Kind::Tcp, gate, &tn, rid).await, tn, rid));
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        let during = async {
            let mut rounds = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for (ws, wn, tcp, tn, rid) in pairs.iter_mut() {
                    exchange(ws, wn, tcp, rid, 20 + 2 * rounds).await;
                    exchange(tcp, tn, ws, rid, 21 + 2 * rounds).await;
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            rounds
        };
        let fuzz = targets.iter().enumerate().map(|(i, (a, p, _))| fuzz_port(*a, *p, 0x5eed_c1a5_0000 + i as u64));
        let fuzz = async {
            let tallies = futures_util::future::join_all(fuzz).await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            tallies
        };
        let (tallies, rounds) = tokio::join!(fuzz, during);
        eprintln!("{rounds} rounds of messages in both rooms during the fuzz");
        assert!(rounds >= 2, "only {rounds} rounds of messages during the fuzz");
        for mut set in held {
            while let Some(r) = set.join_next().await {
                if let Err(e) = r {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        tallies
    });
    for ((_, p, id), t) in targets.iter().zip(&tallies) {
        eprintln!(
            "fuzz {id} ({p:?}): {} connections, {} refused promptly, {} answered",
            t.conns, t.refused, t.answered
        );
        assert!(t.conns >= 50, "{id}: only {} fuzz connections", t.conns);
        assert!(t.refused * 4 >= t.conns, "{id}: only {} of {} fuzz connections refused promptly", t.refused, t.conns);
    }

    // Nothing crashed or restarted, and the master still answers its admin API.
    let after = c.wait_running();
    assert_eq!(before, after, "no server crashed or restarted during the fuzz run");
    for s in c.servers() {
        assert_eq!(s["restarts"], 0, "{s}");
    }
    let list = c.run(&["list", "--json"]);
    assert!(list.status.success(), "list: {}", String::from_utf8_lossy(&list.stderr));

    // The fuzz reached the decoders: each server's log names fuzz peers (logs are written a little late).
    let logged = |what: &str, log: &dyn Fn() -> String, ports: &HashSet<u16>| {
        wait_until(Duration::from_secs(5), &format!("{what} to name a fuzz connection"), || {
            let log = log();
            let lines = peer_lines(&log, ports);
            let (n, first) = (lines.len(), lines.first().map(|l| l.to_string()));
            first.map(|l| eprintln!("{what}: {n} lines name fuzz peers, e.g. {l}"))
        })
    };
    logged("the master's log", &|| c.master_output(), &tallies[2].ports);
    for (i, id) in ["chat-1", "chat-2"].into_iter().enumerate() {
        logged(&format!("{id}'s log"), &|| log_lines(&c, id), &tallies[i].ports);
    }

    // Real clients, over WebSocket and TCP through the gate, in a room of each chat server, both ways.
    runtime().block_on(async {
        for (n, rid) in rooms.iter().enumerate() {
            let (wn, tn) = (format!("ws{n}"), format!("tcp{n}"));
            let mut ws = enter(Kind::Ws, gate, &wn, rid).await;
            let mut tcp = enter(Kind::Tcp, gate, &tn, rid).await;
            exchange(&mut ws, &wn, &mut tcp, rid, 10).await;
            exchange(&mut tcp, &tn, &mut ws, rid, 11).await;
        }
    });
    assert_eq!(c.wait_running(), before, "still the same processes");
}

/// What the fuzz found: a decoder's error quoted the attacker's bytes, newlines included, into the log,
/// so one frame before authentication wrote a line of its choosing (review H5 and M4); so did the id of
/// a registration with a wrong token.
#[test]
fn frames_before_authentication_cannot_forge_log_lines() {
    let c = Cluster::start(&yaml("  chat:\n    - {id: chat-1, port: 0}\n", ""));
    c.wait_running();
    let rpc: SocketAddr = c.server("chat-1")["addrs"]["rpc"].as_str().expect("rpc").parse().expect("addr");
    let control: SocketAddr =
        c.master_json().and_then(|m| m["control_addr"].as_str()?.parse().ok()).expect("the control address");
    let forged = |what: &str| format!("x\nFORGED {what}");
    let frames = [
        (rpc, [&b"J"[..], json!({"t": forged("tag on rpc")}).to_string().as_bytes()].concat()),
        (
            rpc,
            [&b"J"[..], json!({"t": "hello", "connector": forged("hello"), "token": "no"}).to_string().as_bytes()]
                .concat(),
        ),
        (control, json!({"t": forged("tag on control")}).to_string().into_bytes()),
        (
            control,
            json!({"t": "register", "id": forged("register"), "server_type": "chat", "pid": 1, "token": "no",
                   "spec_hash": "", "addrs": {}})
            .to_string()
            .into_bytes(),
        ),
    ];
    runtime().block_on(async {
        for (addr, body) in &frames {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut b = (body.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(body);
            let (closed, _) = play(&mut s, &Script { bytes: b, half_close: false }, PROMPT).await;
            assert!(closed, "{addr} refuses {}", String::from_utf8_lossy(body));
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let logs = [("master", c.master_output()), ("chat-1", log_lines(&c, "chat-1"))];
    let bad: Vec<String> = logs
        .iter()
        .flat_map(|(id, log)| log.lines().filter(|l| l.starts_with("FORGED")).map(move |l| format!("{id}: {l}")))
        .collect();
    assert!(bad.is_empty(), "forged log lines: {bad:#?}");
}
