//! Room history and recovery (issue 16) through a connector and a chat server over real cluster RPC,
//! with clients over WebSocket and raw TCP: every `onChat` carries the room's epoch and offset; a client
//! that drops and re-enters with `since` gets exactly what it missed, in order, once, while another
//! keeps sending; a wrong epoch, an offset in the future or one the history no longer covers answer
//! `recovered: false` and push nothing; `chat.chatHandler.history` pages through the room.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::MiniCluster;
use support::{bounded, Client, Kind};

const ENTER: &str = "connector.entryHandler.enter";
const SEND: &str = "chat.chatHandler.send";
const HISTORY: &str = "chat.chatHandler.history";
const LIMIT: Duration = Duration::from_secs(60);

/// Enters `rid` with `extra` fields (`since`), retrying while the name is still taken by a session
/// that is closing.
async fn enter(kind: Kind, c: &MiniCluster, name: &str, rid: &str, extra: Value) -> (Client, Value) {
    for _ in 0..50 {
        let mut cl = Client::connect(kind, c.connector.addr).await;
        cl.handshake(true).await;
        let mut body = json!({"username": name, "rid": rid});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = cl.request(1, ENTER, &body).await;
        if r["error"] != json!(true) {
            return (cl, r);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} could not enter {rid}");
}

/// `onChat` pushes until one with offset `last` (ignoring `onAdd`/`onLeave`), then none for a moment.
async fn chats_until(c: &mut Client, last: u64) -> Vec<Value> {
    let mut got = Vec::new();
    while got.last().and_then(|b: &Value| b["offset"].as_u64()) != Some(last) {
        let (route, body) = c.next_push().await;
        if route == "onChat" {
            got.push(body);
        }
    }
    quiet(c).await;
    got
}

/// No further `onChat` arrives within 300 ms.
async fn quiet(c: &mut Client) {
    let end = tokio::time::Instant::now() + Duration::from_millis(300);
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, c.next_push_within(Duration::from_secs(5))).await {
            Ok((route, body)) => assert_ne!(route, "onChat", "nothing more: {body}"),
            Err(_) => break,
        }
    }
    assert!(c.pushes.iter().all(|(r, _)| r != "onChat"), "nothing more: {:?}", c.pushes);
}

fn offsets(chats: &[Value]) -> Vec<u64> {
    chats.iter().map(|b| b["offset"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn a_client_that_drops_recovers_exactly_what_it_missed_while_others_send() {
    bounded(LIMIT, async {
        for kind in [Kind::Ws, Kind::Tcp] {
            let c = MiniCluster::start().await;
            let (mut ann, r) = enter(kind, &c, "ann", "h", json!({})).await;
            let epoch = r["epoch"].as_str().expect("enter says the room's epoch").to_string();
            assert_eq!(r["offset"], 0, "{kind:?}: {r}");
            assert!(r.get("recovered").is_none(), "no since, no recovered: {r}");
            let (mut bob, _) = enter(kind, &c, "bob", "h", json!({})).await;
            const N: u64 = 60;
            let sender = tokio::spawn(async move {
                for i in 1..=N {
                    let r = bob.request(10 + i as u32, SEND, &json!({"content": format!("m{i}"), "target": "*"})).await;
                    assert_eq!(r, json!({}), "send {i} acknowledged");
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
                bob
            });
            // Ann reads a few, then her connection drops while bob goes on.
            let mut seen = Vec::new();
            while seen.len() < 5 {
                let (route, body) = ann.next_push().await;
                if route == "onChat" {
                    seen.push(body);
                }
            }
            drop(ann);
            let last = *offsets(&seen).last().unwrap();
            assert_eq!(offsets(&seen), (1..=last).collect::<Vec<_>>(), "{kind:?}: in order from 1");
            assert!(seen.iter().all(|b| b["epoch"] == json!(epoch)), "{kind:?}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(40)).await;
            assert!(!sender.is_finished(), "{kind:?}: bob is still sending while ann comes back");
            let since = json!({"since": {"epoch": epoch, "offset": last}});
            let (mut ann, r) = enter(kind, &c, "ann", "h", since).await;
            assert_eq!(r["recovered"], true, "{kind:?}: {r}");
            assert_eq!(r["epoch"], json!(epoch), "{kind:?}: same epoch: {r}");
            let _bob = sender.await.unwrap();
            let after = chats_until(&mut ann, N).await;
            assert_eq!(offsets(&after), (last + 1..=N).collect::<Vec<_>>(), "{kind:?}: all missed, in order, once");
            for b in &after {
                let o = b["offset"].as_u64().unwrap();
                assert_eq!(
                    (&b["msg"], &b["from"], &b["target"]),
                    (&json!(format!("m{o}")), &json!("bob"), &json!("*"))
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn since_that_history_does_not_cover_is_not_recovered_and_history_pages() {
    bounded(LIMIT, async {
        for kind in [Kind::Ws, Kind::Tcp] {
            let c = MiniCluster::start().await;
            let (mut ann, r) = enter(kind, &c, "ann", "w", json!({})).await;
            let epoch = r["epoch"].as_str().unwrap().to_string();
            for i in 1..=3 {
                assert_eq!(ann.request(10 + i, SEND, &json!({"content": i, "target": "*"})).await, json!({}));
            }
            assert_eq!(offsets(&chats_until(&mut ann, 3).await), [1, 2, 3]);
            for (what, since) in [
                ("another epoch", json!({"epoch": "not-it", "offset": 1})),
                ("an offset in the future", json!({"epoch": epoch, "offset": 4})),
            ] {
                let (mut carl, r) = enter(kind, &c, "carl", "w", json!({ "since": since })).await;
                assert_eq!(r["recovered"], false, "{kind:?} {what}: {r}");
                assert_eq!((&r["epoch"], &r["offset"]), (&json!(epoch), &json!(3)), "where to go on from: {r}");
                quiet(&mut carl).await;
            }
            for bad in [json!("x"), json!({"epoch": 1, "offset": 1}), json!({"epoch": "e", "offset": -1})] {
                let (_, r) = enter(kind, &c, "dan", "w", json!({ "since": bad })).await;
                assert_eq!(r["code"], 500, "{kind:?}: a malformed since is refused: {r}");
            }

            let page = |r: &Value| offsets(r["messages"].as_array().unwrap());
            let r = ann.request(20, HISTORY, &json!({"rid": "w", "limit": 2})).await;
            assert_eq!((page(&r), &r["epoch"], &r["offset"]), (vec![2, 3], &json!(epoch), &json!(3)), "{r}");
            assert_eq!(r["messages"][0], json!({"msg": 2, "from": "ann", "target": "*", "epoch": epoch, "offset": 2}));
            let r = ann.request(21, HISTORY, &json!({"before": 2})).await;
            assert_eq!(page(&r), [1], "{r}");
            let r = ann.request(22, HISTORY, &json!({"since": {"epoch": epoch, "offset": 1}})).await;
            assert_eq!((page(&r), &r["recovered"]), (vec![2, 3], &json!(true)), "{r}");
            let r = ann.request(23, HISTORY, &json!({"since": {"epoch": "old", "offset": 1}})).await;
            assert_eq!((page(&r), &r["recovered"]), (vec![], &json!(false)), "{r}");
            let r = ann.request(24, HISTORY, &json!({"rid": "someone-else's"})).await;
            assert_eq!(r["code"], 500, "only one's own room: {r}");

            // The default ring keeps 1000 messages: after 1001 more, offset 3 is no longer covered.
            for i in 0..1001u32 {
                // Paced under the 500 requests/s a session may send (a fast machine got ann kicked).
                if i % 400 == 399 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                assert_eq!(ann.request(100 + i, SEND, &json!({"content": "x", "target": "*"})).await, json!({}));
                ann.pushes.clear();
            }
            let (mut eve, r) = enter(kind, &c, "eve", "w", json!({"since": {"epoch": epoch, "offset": 3}})).await;
            assert_eq!((&r["recovered"], &r["offset"]), (&json!(false), &json!(1004)), "{kind:?}: too old: {r}");
            quiet(&mut eve).await;
            let (mut fay, r) = enter(kind, &c, "fay", "w", json!({"since": {"epoch": epoch, "offset": 1000}})).await;
            assert_eq!(r["recovered"], true, "{kind:?}: {r}");
            assert_eq!(offsets(&chats_until(&mut fay, 1004).await), (1001..=1004).collect::<Vec<_>>());
            // At most 500 are pushed on a join (more would overflow the client's queue and get it kicked).
            let (mut gus, r) =
                enter(kind, &c, "gus", "w", json!({"since": {"epoch": epoch, "offset": 1004 - 501}})).await;
            assert_eq!(r["recovered"], false, "{kind:?}: 501 missed is too many to push: {r}");
            quiet(&mut gus).await;
            let r =
                gus.request(30, HISTORY, &json!({"since": {"epoch": epoch, "offset": 1004 - 501}, "limit": 200})).await;
            assert_eq!(page(&r), (504..=703).collect::<Vec<_>>(), "{kind:?}: still there to page through");
            let (mut hal, r) =
                enter(kind, &c, "hal", "w", json!({"since": {"epoch": epoch, "offset": 1004 - 500}})).await;
            assert_eq!(r["recovered"], true, "{kind:?}: 500 are pushed: {r}");
            assert_eq!(offsets(&chats_until(&mut hal, 1004).await), (505..=1004).collect::<Vec<_>>());
        }
    })
    .await;
}
