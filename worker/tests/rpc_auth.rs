//! A chat server's RPC port against attackers, over real sockets: no one links without the link key the
//! master issued for the name it claims (a forged connector name, a wrong proof, a replayed transcript and
//! the old bearer-token hello are all refused, and the real connector's link is untouched); a first frame
//! over the handshake cap is cut off at once. And the other way round: a connector that meets a squatter
//! on a chat server's port says hello and nothing else (no proof, no member, no message).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pomelo_proto::auth::{self, LinkKind, Role, Transcript};
use pomelo_proto::cluster::{self, FromChat, ToChat};
use serde_json::json;
use support::cluster::{rpc_handshake, MiniCluster, SECRET};
use support::{bounded, Client, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const LIMIT: Duration = Duration::from_secs(40);

type Link = Framed<TcpStream, LengthDelimitedCodec>;

async fn open(c: &MiniCluster) -> Link {
    Framed::new(TcpStream::connect(c.chat_addr).await.unwrap(), pomelo_proto::link::cluster_codec())
}

async fn hello(link: &mut Link, connector: &str, nonce: &str) -> (String, String) {
    link.send(cluster::encode_msg(&ToChat::Hello { connector: connector.into(), nonce: nonce.into() })).await.unwrap();
    let frame = tokio::time::timeout(support::WAIT, link.next()).await.unwrap().unwrap().unwrap();
    match cluster::decode::<FromChat>(frame.freeze()).unwrap() {
        cluster::Frame::Msg(FromChat::Challenge { nonce, proof, .. }) => (nonce, proof),
        other => panic!("no challenge: {other:?}"),
    }
}

/// The chat server closes the link without a welcome (and without anything else).
async fn refused(link: &mut Link, what: &str) {
    let next = tokio::time::timeout(support::WAIT, link.next()).await.expect("closed within the wait");
    assert!(!matches!(next, Some(Ok(_))), "{what}: the chat server answered {next:?}");
}

fn link_key(connector: &str) -> auth::Key {
    auth::link_key(&auth::server_key(SECRET, "chat-1"), connector)
}

#[tokio::test]
async fn a_forged_connector_name_or_a_wrong_proof_is_refused() {
    bounded(LIMIT, async {
        let c = MiniCluster::start().await;
        assert_eq!(c.chat.links.load(Ordering::SeqCst), 1, "the real connector is linked");

        // connector-2's holder (it has its own link key) claims connector-1's name.
        let mut link = open(&c).await;
        let nonce = auth::nonce().unwrap();
        let (chat_nonce, _) = hello(&mut link, "connector-1", &nonce).await;
        let t = Transcript {
            kind: LinkKind::Rpc,
            dialler: "connector-1",
            acceptor: "chat-1",
            dialler_nonce: &nonce,
            acceptor_nonce: &chat_nonce,
        };
        let forged = t.prove(&link_key("connector-2"), Role::Dialler);
        link.send(cluster::encode_msg(&ToChat::Proof { proof: forged })).await.unwrap();
        refused(&mut link, "connector-2's key for connector-1's name").await;

        // Someone with no key at all: the chat server's own proof sent back (reflection), then garbage.
        let mut link = open(&c).await;
        let (_, proof) = hello(&mut link, "connector-1", &nonce).await;
        link.send(cluster::encode_msg(&ToChat::Proof { proof })).await.unwrap();
        refused(&mut link, "the chat server's proof reflected").await;

        // The old bearer hello: a token field is no proof.
        let mut link = open(&c).await;
        link.send(bytes::Bytes::from_static(br#"J{"t":"hello","connector":"connector-1","token":"test-token"}"#))
            .await
            .unwrap();
        refused(&mut link, "a token hello").await;

        // The real connector-1's key still works, and nothing above touched the real link.
        let ok = rpc_handshake(c.chat_addr, "connector-x", "chat-1", &link_key("connector-x")).await;
        assert!(ok.is_ok(), "{:?}", ok.err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.chat.links.load(Ordering::SeqCst), 2, "connector-1's link and connector-x's, nothing else");
        assert_eq!(c.relay.accepted(), 1, "the real connector's link never broke");
    })
    .await;
}

#[tokio::test]
async fn a_replayed_transcript_is_refused() {
    bounded(LIMIT, async {
        let c = MiniCluster::start().await;
        // A good handshake, recorded by a wiretap: hello nonce and the connector's proof.
        let key = link_key("connector-x");
        let mut link = open(&c).await;
        let nonce = auth::nonce().unwrap();
        let (chat_nonce, _) = hello(&mut link, "connector-x", &nonce).await;
        let t = Transcript {
            kind: LinkKind::Rpc,
            dialler: "connector-x",
            acceptor: "chat-1",
            dialler_nonce: &nonce,
            acceptor_nonce: &chat_nonce,
        };
        let proof = t.prove(&key, Role::Dialler);
        link.send(cluster::encode_msg(&ToChat::Proof { proof: proof.clone() })).await.unwrap();
        let frame = tokio::time::timeout(support::WAIT, link.next()).await.unwrap().unwrap().unwrap();
        assert!(matches!(
            cluster::decode::<FromChat>(frame.freeze()).unwrap(),
            cluster::Frame::Msg(FromChat::Welcome { .. })
        ));

        // The same hello and proof again: the chat server's fresh nonce makes the old proof worthless.
        let mut replay = open(&c).await;
        let (again, _) = hello(&mut replay, "connector-x", &nonce).await;
        assert_ne!(again, chat_nonce, "a fresh nonce every time");
        replay.send(cluster::encode_msg(&ToChat::Proof { proof })).await.unwrap();
        refused(&mut replay, "a replayed proof").await;
    })
    .await;
}

#[tokio::test]
async fn an_oversized_first_frame_is_cut_off_at_once() {
    bounded(LIMIT, async {
        let c = MiniCluster::start().await;
        let mut raw = TcpStream::connect(c.chat_addr).await.unwrap();
        raw.write_all(&(4u32 << 20).to_be_bytes()).await.unwrap();
        raw.write_all(&[b'J'; 1024]).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed at once, got {n:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await;
}

#[tokio::test]
async fn a_connector_tells_a_squatter_on_a_chat_port_nothing() {
    bounded(LIMIT, async {
        let c = MiniCluster::start().await;
        for kind in [Kind::Ws, Kind::Tcp] {
            let mut cl = Client::connect(kind, c.connector.addr).await;
            cl.handshake(true).await;
            let r =
                cl.request(1, "connector.entryHandler.enter", &json!({"username": "ann", "rid": "secret-room"})).await;
            assert!(r["users"].is_array(), "{kind:?}: {r}");

            // chat-1 "restarted" at a port a squatter holds.
            let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            c.publish_chat_at(squatter.local_addr().unwrap(), 2);
            let (s, _) = tokio::time::timeout(support::WAIT, squatter.accept()).await.unwrap().unwrap();
            let mut link = Framed::new(s, pomelo_proto::link::cluster_codec());
            let first = tokio::time::timeout(support::WAIT, link.next()).await.unwrap().unwrap().unwrap();
            let cluster::Frame::Msg(ToChat::Hello { connector, .. }) =
                cluster::decode::<ToChat>(first.freeze()).unwrap()
            else {
                panic!("{kind:?}: not a hello");
            };
            assert_eq!(connector, "connector-1");
            let forged = FromChat::Challenge { chat: "chat-1".into(), nonce: "ab".repeat(32), proof: "00".repeat(32) };
            link.send(cluster::encode_msg(&forged)).await.unwrap();
            link.send(cluster::encode_msg(&FromChat::Welcome { chat: "chat-1".into() })).await.unwrap();
            // A send would reach it now if the link had come up.
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                cl.request(2, "chat.chatHandler.send", &json!({"target": "*", "content": "for chat-1 only"})),
            )
            .await;
            let mut rest = Vec::new();
            while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_millis(500), link.next()).await {
                rest.push(String::from_utf8_lossy(&f).to_string());
            }
            assert!(rest.is_empty(), "{kind:?}: the connector told a squatter {rest:?}");
            drop(link);
            drop(squatter);
            // Back to the real chat server for the next round.
            c.publish(true);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
}

/// Issue 14, the peer check on RPC links (review H3's "any holder can claim any identity"): a connector
/// the membership lists on another host is refused from here even with its real link key; listed on
/// this machine, the same key links.
#[tokio::test]
async fn a_listed_connector_must_connect_from_its_host() {
    bounded(LIMIT, async {
        let c = MiniCluster::start().await;
        c.publish_connector_on("connector-x", "192.0.2.9");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let far = rpc_handshake(c.chat_addr, "connector-x", "chat-1", &link_key("connector-x")).await;
        assert!(far.is_err(), "connector-x listed on 192.0.2.9 linked from 127.0.0.1");
        c.publish_connector_on("connector-x", "no-such-host.invalid");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let named = rpc_handshake(c.chat_addr, "connector-x", "chat-1", &link_key("connector-x")).await;
        assert!(named.is_err(), "connector-x listed on a name that does not resolve linked");
        c.publish_connector_on("connector-x", "127.0.0.1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let near = rpc_handshake(c.chat_addr, "connector-x", "chat-1", &link_key("connector-x")).await;
        assert!(near.is_ok(), "{:?}", near.err());
        assert_eq!(c.relay.accepted(), 1, "the real connector's link never broke");
    })
    .await;
}
