//! The demo chat over real sockets: gate query, connector enter, broadcast and private chat, kick,
//! leave, heartbeats, shutdown; over WebSocket and raw TCP.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use pomelo_proto::control::{BoundAddrs, Membership, ServerInfo, ServerType};
use pomelo_proto::wire::PackageType;
use pomelo_worker::connector::Connector;
use pomelo_worker::frontend::FrontendConfig;
use pomelo_worker::gate::Gate;
use serde_json::{json, Value};
use support::local_rooms::{self, LocalRooms};
use support::{bounded, Client, Kind, Server};
use tokio::sync::watch;

fn connector_config(heartbeat_ms: u64) -> FrontendConfig {
    FrontendConfig { heartbeat: Some(Duration::from_millis(heartbeat_ms)), ..local_rooms::connector_config() }
}

async fn connector(heartbeat_ms: u64) -> (Server, Arc<LocalRooms>) {
    let rooms = Arc::new(LocalRooms::new());
    let server = Server::start(connector_config(heartbeat_ms), Arc::new(Connector::new(rooms.clone()))).await;
    (server, rooms)
}

fn membership(connector: &Server) -> Membership {
    let info = |id: &str, t, client| ServerInfo {
        id: id.into(),
        server_type: t,
        host: "127.0.0.1".into(),
        client_host: None,
        pid: 1,
        addrs: BoundAddrs { rpc: None, client },
        link_keys: Default::default(),
    };
    Membership {
        epoch: 0,
        version: 1,
        servers: vec![
            info("gate-server-1", ServerType::Gate, None),
            info("connector-server-1", ServerType::Connector, Some(connector.addr)),
        ],
    }
}

#[tokio::test]
async fn gate_then_connector_chat_over_websocket_and_tcp() {
    bounded(Duration::from_secs(30), async {
        let (conn, rooms) = connector(3000).await;
        let (_tx, rx) = watch::channel(Arc::new(membership(&conn)));
        let gate = Server::start(Gate::frontend_config(), Arc::new(Gate::new(rx))).await;

        // Gate: no heartbeat, no dictionary.
        let mut g = Client::connect(Kind::Ws, gate.addr).await;
        let reply = g.handshake(false).await;
        assert_eq!(reply, json!({"code":200,"sys":{}}));
        let entry = g.request(1, "gate.gateHandler.queryEntry", &json!({"uid":"alice"})).await;
        assert_eq!(entry, json!({"code":200,"host":"127.0.0.1","port":conn.addr.port()}));
        assert_eq!(g.request(2, "gate.gateHandler.queryEntry", &json!({})).await, json!({"code":500}));

        // Connector: heartbeat 3 s, dictionary codes 3, 2, 1 as in the demo, then history (issue 16) as 4.
        let mut a = Client::connect(Kind::Ws, conn.addr).await;
        let reply = a.handshake(true).await;
        assert_eq!(reply["sys"]["heartbeat"], 3);
        assert_eq!(reply["sys"]["useDict"], true);
        assert_eq!(
            reply["sys"]["routeToCode"],
            json!({"chat.chatHandler.send":1,"connector.entryHandler.enter":2,"gate.gateHandler.queryEntry":3,
                "chat.chatHandler.history":4})
        );
        let users = a.request(1, "connector.entryHandler.enter", &json!({"username":"alice","rid":"r1"})).await;
        assert_eq!(users, json!({"users":["alice"]}));

        let mut b = Client::connect(Kind::Tcp, conn.addr).await;
        b.handshake(true).await;
        let users = b.request(1, "connector.entryHandler.enter", &json!({"username":"bob","rid":"r1"})).await;
        assert_eq!(users, json!({"users":["alice","bob"]}));
        assert_eq!(a.next_push().await, ("onAdd".into(), json!({"route":"onAdd","user":"bob"})));

        // Duplicate login on this connector.
        let mut dup = Client::connect(Kind::Tcp, conn.addr).await;
        dup.handshake(true).await;
        let r = dup.request(1, "connector.entryHandler.enter", &json!({"username":"bob","rid":"r1"})).await;
        assert_eq!(r, json!({"code":500,"error":true}));

        // Broadcast reaches everyone, sender included; the response is {}.
        let send = json!({"rid":"r1","content":"hi all","from":"alice","target":"*"});
        assert_eq!(a.request(2, "chat.chatHandler.send", &send).await, json!({}));
        let chat = ("onChat".to_string(), json!({"msg":"hi all","from":"alice","target":"*"}));
        assert_eq!(a.next_push().await, chat);
        assert_eq!(b.next_push().await, chat);

        // Private message reaches only the target.
        let send = json!({"rid":"r1","content":"psst","from":"bob","target":"alice"});
        assert_eq!(b.request(2, "chat.chatHandler.send", &send).await, json!({}));
        assert_eq!(a.next_push().await, ("onChat".into(), json!({"msg":"psst","from":"bob","target":"alice"})));
        assert!(b.pushes.is_empty());
        let mut c = Client::connect(Kind::Tcp, conn.addr).await;
        c.handshake(true).await;
        assert_eq!(c.request(9, "chat.chatHandler.send", &send).await, json!({"code":500}), "send before enter fails");

        // Kick by uid: bob gets KICK and is closed; alice gets onLeave.
        assert_eq!(conn.sessions.kick_uid("bob*r1", "kick"), 1);
        let got = b.expect_closed(Duration::from_secs(3)).await;
        let kick = got.last().expect("a KICK before close");
        assert_eq!(kick.kind, PackageType::Kick);
        assert_eq!(&kick.body[..], br#"{"reason":"kick"}"#);
        assert_eq!(a.next_push().await, ("onLeave".into(), json!({"route":"onLeave","user":"bob"})));
        conn.eventually("bob's leave", |_| rooms.members("r1") == vec!["alice*r1".to_string()]).await;
        assert!(conn.metric("kicks_total") >= 1);
        assert!(conn.metric("handshakes_total") >= 4);
    })
    .await;
}

#[tokio::test]
async fn heartbeats_keep_a_client_alive_and_a_missed_one_disconnects() {
    bounded(Duration::from_secs(30), async {
        // Heartbeat 300 ms, timeout 600 ms.
        let (conn, _) = connector(300).await;
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut c = Client::connect(kind, conn.addr).await;
            let reply = c.handshake(true).await;
            assert_eq!(reply["sys"]["heartbeat"], 0.3);
            // Echo heartbeats for 3× the timeout: still connected.
            let until = tokio::time::Instant::now() + Duration::from_millis(1800);
            let mut beats = 0;
            while tokio::time::Instant::now() < until {
                // As the JS client: wait the interval (here a bit less), send, get the echo at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(c.send_pkg(PackageType::Heartbeat, b"").await);
                let p = c.recv_within(Duration::from_millis(300)).await.expect("echoed at once").expect("alive");
                assert_eq!(p.kind, PackageType::Heartbeat);
                beats += 1;
            }
            assert!(beats >= 4, "{kind:?}: only {beats} heartbeats");
            let r =
                c.request(7, "connector.entryHandler.enter", &json!({"username":format!("{kind:?}"),"rid":"r"})).await;
            assert!(r["users"].is_array(), "{kind:?}: {r}");
            // Data does not re-arm the heartbeat timer: keep sending requests but no heartbeat.
            let started = tokio::time::Instant::now();
            let mut id = 100;
            loop {
                assert!(started.elapsed() < Duration::from_secs(3), "{kind:?}: never timed out");
                id += 1;
                // Paced well under maxRequestsPerSecond, so the heartbeat timeout is what ends it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                c.send_request(id, "nope.nope.nope", &json!({})).await;
                match c.recv_within(Duration::from_millis(100)).await {
                    Ok(None) => break,
                    Ok(Some(p)) => assert_eq!(p.kind, PackageType::Data, "only 500 answers, no heartbeats"),
                    Err(()) => {}
                }
            }
            let took = started.elapsed();
            assert!(took < Duration::from_millis(2500), "{kind:?}: heartbeat timeout took {took:?}");
        }
        conn.eventually("sessions gone", |s| s.sessions.count() == 0).await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_kicks_every_client_with_a_reason() {
    bounded(Duration::from_secs(20), async {
        let (mut conn, _) = connector(3000).await;
        let mut clients = Vec::new();
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut c = Client::connect(kind, conn.addr).await;
            c.handshake(true).await;
            clients.push(c);
        }
        conn.eventually("two sessions", |s| s.sessions.count() == 2).await;
        conn.shutdown.cancel();
        for c in &mut clients {
            let got = c.expect_closed(Duration::from_secs(3)).await;
            let kick = got.last().expect("a KICK");
            assert_eq!(kick.kind, PackageType::Kick);
            let v: Value = serde_json::from_slice(&kick.body).unwrap();
            assert_eq!(v, json!({"reason":"server shutting down"}));
        }
        let task = conn.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(3), task).await.expect("serve returns").unwrap();
        assert_eq!(conn.metric("connections"), 0);
    })
    .await;
}

#[tokio::test]
async fn queued_pushes_are_coalesced_into_one_websocket_message() {
    use futures_util::StreamExt;
    use pomelo_proto::wire::PackageDecoder;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    bounded(Duration::from_secs(20), async {
        let (conn, _) = connector(3000).await;
        let mut a = Client::connect(Kind::Ws, conn.addr).await;
        a.handshake(true).await;
        let mut b = Client::connect(Kind::Tcp, conn.addr).await;
        b.handshake(true).await;
        conn.eventually("two sessions", |s| s.sessions.count() == 2).await;
        let ids: Vec<u64> = [1, 2].into_iter().filter(|id| conn.sessions.get(*id).is_some()).collect();
        assert_eq!(ids.len(), 2);
        // One encoded push, shared by both sessions; 50 of them queued without yielding, so the writer
        // finds them all queued and writes them together.
        let push = conn.sessions.encode_push("onChat", &json!({"msg":"m","from":"x","target":"*"})).unwrap();
        for _ in 0..50 {
            assert_eq!(conn.sessions.push_bytes(&ids, &push), 2);
        }
        let support::Transport::Ws(ws) = &mut a.t else { unreachable!() };
        let (mut packages, mut messages) = (0, 0);
        while packages < 50 {
            match tokio::time::timeout(Duration::from_secs(3), ws.next()).await.unwrap() {
                Some(Ok(WsMessage::Binary(m))) => {
                    messages += 1;
                    let got = PackageDecoder::default().decode_all(&m).unwrap();
                    assert!(got.iter().all(|p| p.body == push.slice(4..)));
                    packages += got.len();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(packages, 50);
        assert!(messages < 5, "50 queued pushes took {messages} WebSocket messages");
        for _ in 0..50 {
            assert_eq!(b.next_push().await.0, "onChat");
        }
        assert!(conn.metric("packages_out_total") >= 100);
    })
    .await;
}
