//! A bounded fuzz run against the gate's and the connector's client ports, over WebSocket and TCP:
//! random bytes, mutated valid sessions and garbage under the WebSocket framing, from a fixed seed.
//! Afterwards the cluster must still serve other clients, and no server may have crashed or restarted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pomelo_proto::wire::{Message, PackageType, Route};
use serde_json::json;

use crate::hostile::{cluster, member, runtime, send_pkg, support, watch, Client, Kind, ENTER};

/// A deterministic byte generator (xorshift), so a failing seed reproduces.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One fuzz input: random bytes, or a valid session (handshake, ack, enter, send, heartbeat) with a few
/// bytes flipped, lengths changed or a tail cut.
fn fuzz_input(rng: &mut Rng) -> Vec<Vec<u8>> {
    use pomelo_proto::wire::handshake::JS_CLIENT_HANDSHAKE;
    use pomelo_proto::wire::package;
    if rng.below(4) == 0 {
        let n = 1 + rng.below(3000);
        return vec![rng.bytes(n)];
    }
    let enter = json!({"username": format!("f{}", rng.below(1000)), "rid": "fuzz"});
    let mut frames = vec![
        package::encode(PackageType::Handshake, JS_CLIENT_HANDSHAKE.as_bytes()).expect("encode").to_vec(),
        package::empty(PackageType::HandshakeAck).to_vec(),
        Message::request(1, Route::Plain(ENTER.into()), Bytes::from(enter.to_string()))
            .encode_package()
            .expect("enter")
            .to_vec(),
        Message::request(2, Route::Code(1), Bytes::from_static(br#"{"rid":"fuzz","content":"hi","target":"*"}"#))
            .encode_package()
            .expect("send")
            .to_vec(),
        send_pkg(3, "fuzz", "f", json!({"a": [1, 2, {"b": null}]})).to_vec(),
        package::empty(PackageType::Heartbeat).to_vec(),
    ];
    for _ in 0..1 + rng.below(4) {
        let f = rng.below(frames.len());
        let frame = &mut frames[f];
        match rng.below(4) {
            0 if !frame.is_empty() => {
                let at = rng.below(frame.len());
                frame[at] = rng.next() as u8;
            }
            1 if frame.len() > 3 => frame[1 + rng.below(3)] = rng.next() as u8,
            2 => frame.truncate(rng.below(frame.len() + 1)),
            _ => {
                let n = rng.below(64);
                frame.extend(rng.bytes(n))
            }
        }
    }
    frames
}

#[test]
fn a_fuzz_run_against_the_client_ports_leaves_the_cluster_serving() {
    let (c, gate, conn) = cluster("");
    let before = c.wait_running();
    runtime().block_on(async {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let started = Instant::now();
        let mut runs = 0;
        // Bounded: 400 connections or 6 s, whichever comes first.
        while runs < 400 && started.elapsed() < Duration::from_secs(6) {
            let target = if runs % 2 == 0 { gate } else { conn };
            let kind = if (runs / 2) % 2 == 0 { Kind::Ws } else { Kind::Tcp };
            let mut cl = Client::connect(kind, target).await;
            if let (support::Transport::Ws(ws), 0) = (&mut cl.t, rng.below(5)) {
                // Garbage under the WebSocket framing itself.
                let n = 1 + rng.below(200);
                let junk = rng.bytes(n);
                let _ = tokio::io::AsyncWriteExt::write_all(ws.get_mut(), &junk).await;
            }
            for frame in fuzz_input(&mut rng) {
                if !cl.send_raw(&frame).await {
                    break;
                }
            }
            // Read briefly whatever comes back (a reply, a KICK, a close), then drop the connection.
            let _ = tokio::time::timeout(Duration::from_millis(20), async {
                while let Ok(Some(_)) = cl.recv_within(Duration::from_millis(20)).await {}
            })
            .await;
            runs += 1;
        }
        assert!(runs >= 40, "only {runs} fuzz connections in the time allowed");
        // Everyone else is still served, over both transports.
        let mut a = member(Kind::Ws, conn, "after-ws", "after").await;
        let mut b = member(Kind::Tcp, conn, "after-tcp", "after").await;
        // Sent raw and read with `watch`, so the reply and the push are seen in whichever order they come.
        assert!(a.send_raw(&send_pkg(9, "after", "after-ws", json!("still here"))).await);
        for (m, sender) in [(&mut a, true), (&mut b, false)] {
            let seen =
                watch(m, Duration::from_secs(10), |s| !s.chats.is_empty() && (!sender || !s.responses.is_empty()))
                    .await;
            assert_eq!(seen.from("after-ws"), vec![&json!("still here")]);
            if sender {
                assert_eq!(seen.responses, vec![(9, json!({}))]);
            }
        }
        let mut g = Client::connect(Kind::Ws, gate).await;
        g.handshake(false).await;
        assert_eq!(g.request(1, "gate.gateHandler.queryEntry", &json!({"uid": "x"})).await["code"], 200);
    });
    let after = c.wait_running();
    assert_eq!(before, after, "no server crashed or restarted during the fuzz run");
    for s in c.servers() {
        assert_eq!(s["restarts"], 0, "{s}");
    }
}
