//! The room limits of servers.yaml, enforced with a clear error over WebSocket and TCP: a name longer than
//! `maxNameLength`, a join past `maxRoomMembers`, a new room past `maxRooms`; and the room still serves
//! the members it holds.

use std::net::SocketAddr;

use serde_json::json;

use crate::harness::{yaml, Cluster};
use crate::hostile::{member, runtime, Client, Kind, ENTER};

fn cluster() -> (Cluster, SocketAddr) {
    let servers = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0, heartbeat: 30s, maxNameLength: 8}\n  chat:\n    - {id: chat-1, port: 0, maxRoomMembers: 3, maxRooms: 2}\n";
    let c = Cluster::start(&yaml(servers, ""));
    c.wait_running();
    let conn = c.server("connector-1")["addrs"]["client"].as_str().expect("client address").parse().expect("address");
    (c, conn)
}

async fn enter(kind: Kind, conn: SocketAddr, name: &str, rid: &str) -> (Client, serde_json::Value) {
    let mut c = Client::connect(kind, conn).await;
    c.handshake(true).await;
    let r = c.request(1, ENTER, &json!({"username": name, "rid": rid})).await;
    (c, r)
}

#[test]
fn room_and_name_limits_refuse_with_a_message_over_websocket_and_tcp() {
    let (_c, conn) = cluster();
    runtime().block_on(async {
        // Wait until the connector reaches its chat server (member retries), then fill room a.
        let _a1 = member(Kind::Ws, conn, "a1", "a").await;
        let _a2 = member(Kind::Tcp, conn, "a2", "a").await;
        let _a3 = member(Kind::Ws, conn, "a3", "a").await;
        for (kind, name) in [(Kind::Ws, "a4"), (Kind::Tcp, "a5")] {
            let (_x, r) = enter(kind, conn, name, "a").await;
            assert_eq!(r["code"], 500, "{kind:?} join of a full room: {r}");
            assert!(r["message"].as_str().is_some_and(|m| m.contains("room is full (3 members)")), "{r}");
        }
        // A second room is allowed, a third is not.
        let (_b1, r) = enter(Kind::Tcp, conn, "b1", "b").await;
        assert!(r["users"].is_array(), "second room: {r}");
        for kind in [Kind::Ws, Kind::Tcp] {
            let (_x, r) = enter(kind, conn, "c1", "c").await;
            assert_eq!(r["code"], 500, "{kind:?} third room: {r}");
            assert!(r["message"].as_str().is_some_and(|m| m.contains("maximum of 2 rooms")), "{r}");
        }
        // A name over maxNameLength (8 bytes) is refused with a message; 8 bytes is fine.
        for kind in [Kind::Ws, Kind::Tcp] {
            let (_x, r) = enter(kind, conn, "ninebytes", "b").await;
            assert_eq!(r["code"], 500, "{kind:?} long name: {r}");
            let text = r.to_string();
            assert!(text.contains("at most 8 bytes"), "{kind:?} long name: {r}");
        }
        let (_ok, r) = enter(Kind::Ws, conn, "eightbyt", "b").await;
        assert!(r["users"].is_array(), "an 8-byte name: {r}");
        // The full room still works for the members it holds: a fourth member gets in once one leaves.
        drop(_a3);
        let mut tries = 0;
        loop {
            let (_x, r) = enter(Kind::Tcp, conn, "a6", "a").await;
            if r["users"].is_array() {
                break;
            }
            tries += 1;
            assert!(tries < 50, "a place in room a never freed: {r}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}
