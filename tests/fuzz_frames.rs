//! Fuzz inputs for the cluster-facing ports (the chat servers' RPC port and the master's control port):
//! what one attacker connection without the cluster token sends, from a seeded [`Rng`].
//!
//! Both links frame with a 4-byte big-endian length; a cluster frame's body starts with a tag byte
//! (`J` + JSON, `D` + binary delivery), a control frame's body is JSON. Inputs are built from a few
//! valid-looking templates (a register, a hello, requests, heartbeats, and names a challenge-response
//! handshake might use), mutated structurally (fields removed, added, retyped, deeply nested) and at the
//! byte level, plus raw bytes, lying and oversized length prefixes, truncated frames and half-closes.
//! Nothing here depends on the exact handshake messages. No tasks, no state beyond the generator.

use serde_json::{json, Map, Value};

use crate::fuzz::Rng;

/// Which decoder a connection is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    /// A chat server's RPC port: cluster frames.
    Rpc,
    /// The master's control port: JSON frames.
    Control,
}

impl Port {
    fn cap(self) -> usize {
        match self {
            Port::Rpc => pomelo_proto::link::CLUSTER_MAX_FRAME,
            Port::Control => pomelo_proto::link::CONTROL_MAX_FRAME,
        }
    }
}

/// One connection's script: what to write, and whether to close the write half afterwards.
pub(crate) struct Script {
    pub(crate) bytes: Vec<u8>,
    pub(crate) half_close: bool,
}

fn member(rng: &mut Rng) -> Value {
    let u = format!("u{}", rng.below(100));
    json!({"rid": "r1", "uid": format!("{u}*r1"), "username": u, "session": rng.next()})
}

/// Valid-looking messages with a wrong token: the attacker has none.
fn templates(port: Port, rng: &mut Rng) -> Vec<Value> {
    let token = ["", "wrong", "00000000000000000000000000000000"][rng.below(3)];
    let pid = [1u64, 0, u32::MAX as u64, rng.below(1 << 22) as u64][rng.below(4)];
    let id = ["chat-1", "connector-1", "gate-1", "x"][rng.below(4)];
    let server_type = ["chat", "connector", "gate", "master"][rng.below(4)];
    let t_name = ["challenge", "response", "auth", "proof", "welcome"][rng.below(5)];
    let mut t = vec![
        json!({"t": "hello", "connector": "connector-1", "token": token}),
        json!({"t": "register", "id": id,
               "server_type": server_type, "pid": pid, "token": token,
               "spec_hash": "x", "addrs": {"rpc": "127.0.0.1:1", "client": null}}),
        // Names a challenge-response handshake might use: the fuzz must not depend on the real ones.
        json!({"t": t_name,
               "nonce": hex(rng, 16), "proof": hex(rng, 32), "id": "chat-1"}),
    ];
    match port {
        Port::Rpc => t.extend([
            json!({"t": "request", "id": rng.below(1000), "req": {"op": "join", "member": member(rng)}}),
            json!({"t": "request", "id": 2, "req": {"op": "send", "rid": "r1", "from": "u1", "target": "*",
                   "content": "hi"}}),
            json!({"t": "request", "id": 3, "req": {"op": "rejoin", "members": [member(rng), member(rng)],
                   "more": true}}),
            json!({"t": "request", "id": 4, "req": {"op": "leave", "member": member(rng)}}),
        ]),
        Port::Control => t.extend([
            json!({"t": "heartbeat", "stats": {"connections": 1.0, "rpc_links": 2.0}}),
            json!({"t": "leaving", "reason": "fuzz"}),
        ]),
    }
    t
}

/// Up to `max - 1` random bytes.
fn junk(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = rng.below(max);
    rng.bytes(n)
}

/// One to `max` random bytes.
fn junk1(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = 1 + rng.below(max);
    rng.bytes(n)
}

fn hex(rng: &mut Rng, n: usize) -> String {
    rng.bytes(n).iter().map(|b| format!("{b:02x}")).collect()
}

fn random_string(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => String::new(),
        1 => "A".repeat(rng.below(8000)),
        2 => "x\n2026-12-02T00:00:00Z  INFO forged\u{0}\u{202e}*".into(),
        3 => String::from_utf8_lossy(&junk1(rng, 40)).into_owned(),
        _ => format!("chat-{}", rng.below(4)),
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!([u64::MAX as f64 * 4.0, -1.5, 1e300][rng.below(3)]),
        4 | 5 => json!(random_string(rng)),
        6 => Value::Array((0..rng.below(5)).map(|_| random_value(rng, depth - 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(["t", "id", "token", "op", "req", "x"][rng.below(6)].into(), random_value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// One structural change somewhere in `v`.
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(4) != 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            match rng.below(5) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(format!("x{}", rng.below(100)), random_value(rng, 3));
                }
                _ => {
                    if let Some(inner) = m.get_mut(&k) {
                        mutate_json(inner, rng);
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(3) != 0 => {
            let i = rng.below(a.len());
            mutate_json(&mut a[i], rng);
        }
        _ => *v = random_value(rng, 3),
    }
}

/// Byte-level damage: a flipped byte, a cut tail, junk appended.
fn damage(b: &mut Vec<u8>, rng: &mut Rng) {
    match rng.below(3) {
        0 if !b.is_empty() => {
            let at = rng.below(b.len());
            b[at] = rng.next() as u8;
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        _ => {
            let n = rng.below(64);
            b.extend(rng.bytes(n));
        }
    }
}

/// A binary delivery frame (`D`), normally only chat → connector, with a session count that may lie.
fn delivery(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(4);
    let claimed = [n as u32, u32::MAX, n as u32 + 1, 0x2000_0000][rng.below(4)];
    let mut b = vec![b'D'];
    b.extend(claimed.to_be_bytes());
    for _ in 0..n {
        b.extend(rng.next().to_be_bytes());
    }
    b.extend(junk(rng, 40));
    b
}

/// One frame body: a mutated template (with its tag on the RPC port), a delivery, raw bytes, or a
/// JSON nesting too deep to decode.
fn body(port: Port, rng: &mut Rng) -> Vec<u8> {
    let mut b = match rng.below(12) {
        0 if port == Port::Rpc => return delivery(rng),
        1 => junk(rng, 300),
        2 => {
            let d = 100 + rng.below(2000);
            format!(r#"{{"t":"request","id":7,"req":{}}}"#, "[".repeat(d) + &"]".repeat(d)).into_bytes()
        }
        _ => {
            let t = templates(port, rng);
            let mut v = t[rng.below(t.len())].clone();
            for _ in 0..rng.below(3) {
                mutate_json(&mut v, rng);
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
    };
    if rng.below(4) == 0 {
        damage(&mut b, rng);
    }
    let tag = [b'J', b'J', b'J', b'D', b'X', 0, b'j'][rng.below(7)];
    tagged(port, b, tag)
}

/// A cluster frame's body starts with its tag; a control frame's has none.
fn tagged(port: Port, mut b: Vec<u8>, tag: u8) -> Vec<u8> {
    if port == Port::Rpc {
        b.insert(0, tag);
    }
    b
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// What one fuzz connection sends.
pub(crate) fn script(port: Port, rng: &mut Rng) -> Script {
    let half_close = rng.below(3) == 0;
    let bytes = match rng.below(8) {
        // Raw bytes: the first four are a (usually absurd) length prefix.
        0 => junk1(rng, 4000),
        // Oversized length prefixes, with or without a start of a body.
        1 => {
            let len = [u32::MAX, port.cap() as u32 + 1, 0x8000_0000, (port.cap() * 2) as u32][rng.below(4)];
            let mut b = len.to_be_bytes().to_vec();
            b.extend(body(port, rng).iter().take(rng.below(200)));
            b
        }
        // A length that promises more than is sent (truncated frame).
        2 => {
            let b = body(port, rng);
            let mut out = ((b.len() + 1 + rng.below(100_000)) as u32).to_be_bytes().to_vec();
            out.extend(b);
            out
        }
        // A length prefix cut short.
        3 => framed(&body(port, rng))[..1 + rng.below(3)].to_vec(),
        // Empty frames first.
        4 => {
            let mut out = framed(b"");
            out.extend(framed(&body(port, rng)));
            out
        }
        // One valid-looking message, unchanged (but with a wrong token).
        5 => {
            let t = templates(port, rng);
            framed(&tagged(port, serde_json::to_vec(&t[rng.below(2)]).unwrap_or_default(), b'J'))
        }
        // One to four well-framed bodies.
        _ => (0..1 + rng.below(4)).flat_map(|_| framed(&body(port, rng))).collect(),
    };
    Script { bytes, half_close }
}

/// A connection left open and idle (or half-open): nothing, a partial prefix, or a partial frame.
pub(crate) fn idle_script(i: usize, port: Port, rng: &mut Rng) -> Script {
    match i % 3 {
        0 => Script { bytes: vec![], half_close: false },
        1 => Script { bytes: vec![0, 0], half_close: false },
        _ => {
            let mut b = framed(&body(port, rng));
            b.truncate(4 + b.len().saturating_sub(4) / 2);
            Script { bytes: b, half_close: true }
        }
    }
}
