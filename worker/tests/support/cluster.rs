//! A connector and a chat server in this process, joined by real cluster RPC over 127.0.0.1 through a
//! [`Relay`] the test can freeze (a chat server that stops reading) or cut (a link that breaks, losing
//! what it held). The membership is a `watch` the test publishes. Everything stops when it drops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pomelo_proto::auth;
use pomelo_proto::control::{BoundAddrs, Membership, ServerInfo, ServerType, Stats};
use pomelo_worker::chat::server::{ChatMetrics, ChatServer};
use pomelo_worker::connector::metrics::RpcMetrics;
use pomelo_worker::connector::{ChatClient, ClusterRooms, Connector};
use pomelo_worker::frontend::{FrontendConfig, FrontendMetrics, Sessions};
use pomelo_worker::routes::chat_dictionary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::local_rooms::connector_config;
use super::Server;

/// The cluster secret the test plays master with: it derives every key from it.
pub const SECRET: &str = "test-secret";

/// A server's key, as the master would hand it over (hex).
pub fn key(id: &str) -> String {
    auth::server_key(SECRET, id).to_hex()
}

/// Opens a raw cluster link to `chat` at `addr` as the connector `connector` would, proving `link_key`
/// (the right one is `auth::link_key(&server_key(SECRET, chat), connector)`); the framed link after the
/// welcome, or the error the chat server's answer (or silence) amounts to.
pub async fn rpc_handshake(
    addr: SocketAddr,
    connector: &str,
    chat: &str,
    link_key: &auth::Key,
) -> anyhow::Result<Framed<TcpStream, LengthDelimitedCodec>> {
    use futures_util::{SinkExt, StreamExt};
    use pomelo_proto::cluster::{self, FromChat, ToChat};
    let mut link = Framed::new(TcpStream::connect(addr).await?, pomelo_proto::link::cluster_codec());
    let nonce = auth::nonce()?;
    link.send(cluster::encode_msg(&ToChat::Hello { connector: connector.into(), nonce: nonce.clone() })).await?;
    let frame = tokio::time::timeout(super::WAIT, link.next()).await?.ok_or_else(|| anyhow::anyhow!("closed"))??;
    let cluster::Frame::Msg(FromChat::Challenge { nonce: chat_nonce, proof, .. }) = cluster::decode(frame.freeze())?
    else {
        anyhow::bail!("no challenge");
    };
    let t = auth::Transcript {
        kind: auth::LinkKind::Rpc,
        dialler: connector,
        acceptor: chat,
        dialler_nonce: &nonce,
        acceptor_nonce: &chat_nonce,
    };
    anyhow::ensure!(t.verify(link_key, auth::Role::Acceptor, &proof), "the chat server's proof is wrong");
    link.send(cluster::encode_msg(&ToChat::Proof { proof: t.prove(link_key, auth::Role::Dialler) })).await?;
    let frame = tokio::time::timeout(super::WAIT, link.next()).await?.ok_or_else(|| anyhow::anyhow!("closed"))??;
    match cluster::decode(frame.freeze())? {
        cluster::Frame::Msg(FromChat::Welcome { .. }) => Ok(link),
        other => anyhow::bail!("no welcome: {other:?}"),
    }
}

/// A TCP relay to `target`: counts the connections it carried; `freeze` holds what the connector sends
/// (the chat server looks hung); `cut` closes every connection, dropping what was held.
pub struct Relay {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, accepted, stop) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), CancellationToken::new());
        let (cut, cut_rx) = watch::channel(0u64);
        let (f, a, s) = (frozen.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) = TcpStream::connect(target).await else { continue };
                let (f, mut cut, s) = (f.clone(), cut_rx.clone(), s.clone());
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let (mut ci, mut co) = inbound.into_split();
                    let (mut si, mut so) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = ci.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            while f.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if so.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut si, &mut co).await;
                    };
                    // A cut wins over anything held: what a frozen link held is lost, as in a real break.
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = up => {}
                        _ = down => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        Relay { addr, frozen, cut, accepted, stop }
    }

    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
    }

    /// Closes every connection (what a frozen one held is lost) and thaws.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
        self.freeze(false);
    }

    /// Connections carried so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct MiniCluster {
    pub connector: Server,
    pub relay: Relay,
    pub chat_addr: SocketAddr,
    pub chat: Arc<ChatMetrics>,
    pub rpc: Arc<RpcMetrics>,
    membership: watch::Sender<Arc<Membership>>,
    shutdown: CancellationToken,
}

fn server(id: &str, t: ServerType, rpc: Option<SocketAddr>) -> ServerInfo {
    ServerInfo {
        id: id.into(),
        server_type: t,
        host: "127.0.0.1".into(),
        client_host: None,
        pid: 1,
        addrs: BoundAddrs { rpc, client: None },
        link_keys: match t {
            ServerType::Chat => auth::wrapped_link_keys(SECRET, id, ["connector-1"]),
            _ => Default::default(),
        },
    }
}

impl MiniCluster {
    /// `chat-1` (reached through the relay) and `connector-1`, both in the membership.
    pub async fn start() -> MiniCluster {
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let chat_addr = listener.local_addr().unwrap();
        let relay = Relay::start(chat_addr).await;
        let (membership, rx) = watch::channel(Arc::new(Membership::default()));
        let chat = Arc::new(ChatMetrics::default());
        ChatServer {
            limits: Default::default(),
            history: None,
            fresh_history: false,
            id: "chat-1".into(),
            token: key("chat-1"),
            dict: Some(Arc::new(chat_dictionary())),
            protobuf: None,
            membership: rx.clone(),
            metrics: chat.clone(),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
        }
        .start(listener)
        .expect("memory history");
        // Clients here do not send heartbeats of their own; a long interval keeps them for a whole test.
        let config = FrontendConfig { heartbeat: Some(Duration::from_secs(30)), ..connector_config() };
        let metrics = Arc::new(FrontendMetrics::new());
        let sessions = Sessions::new(&config, metrics.clone());
        let rpc = Arc::new(RpcMetrics::default());
        let (target, kicked) = (sessions.clone(), sessions.clone());
        let client = ChatClient::start(
            "connector-1".into(),
            key("connector-1"),
            Arc::new(move |ids, payload| {
                target.push_bytes(ids, &payload);
            }),
            Arc::new(move |ids| {
                for id in ids {
                    kicked.kick_session(*id, "lost");
                }
            }),
            rpc.clone(),
            rx,
            shutdown.clone(),
        );
        let handler = Arc::new(Connector::with_metrics(Arc::new(ClusterRooms { client }), rpc.clone()));
        let connector = Server::start_with(config, handler, sessions, metrics).await;
        let c = MiniCluster { connector, relay, chat_addr, chat, rpc, membership, shutdown };
        c.publish(true);
        let deadline = tokio::time::Instant::now() + super::WAIT;
        while c.chat.links.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the connector never linked to the chat server");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c
    }

    /// Publishes a new membership epoch with `chat-1`, and `connector-1` if `with_connector`.
    /// Publishes `chat-1` at `addr` with pid `pid` (a squatter's port, say) and `connector-1`.
    pub fn publish_chat_at(&self, addr: SocketAddr, pid: u32) {
        let mut chat = server("chat-1", ServerType::Chat, Some(addr));
        chat.pid = pid;
        let servers = vec![chat, server("connector-1", ServerType::Connector, None)];
        self.membership.send_modify(|m| *m = Arc::new(Membership { epoch: m.epoch, version: m.version + 1, servers }));
    }

    pub fn publish(&self, with_connector: bool) {
        self.publish_with(if with_connector { &["connector-1"] } else { &[] });
    }

    /// Publishes `chat-1`, `connector-1` and `connector` on `host`.
    pub fn publish_connector_on(&self, connector: &str, host: &str) {
        let mut other = server(connector, ServerType::Connector, None);
        other.host = host.into();
        let servers = vec![
            server("chat-1", ServerType::Chat, Some(self.relay.addr)),
            server("connector-1", ServerType::Connector, None),
            other,
        ];
        self.membership.send_modify(|m| *m = Arc::new(Membership { epoch: m.epoch, version: m.version + 1, servers }));
    }

    /// Publishes `chat-1`, the chat servers `others` (at an address nobody listens on) and these connectors.
    pub fn publish_chats(&self, others: &[&str], connectors: &[&str]) {
        let mut servers = vec![server("chat-1", ServerType::Chat, Some(self.relay.addr))];
        servers.extend(others.iter().map(|c| server(c, ServerType::Chat, Some(([127, 0, 0, 1], 9).into()))));
        servers.extend(connectors.iter().map(|c| server(c, ServerType::Connector, None)));
        self.membership.send_modify(|m| *m = Arc::new(Membership { epoch: m.epoch, version: m.version + 1, servers }));
    }

    /// Publishes a new membership epoch with `chat-1` and these connectors.
    pub fn publish_with(&self, connectors: &[&str]) {
        let mut servers = vec![server("chat-1", ServerType::Chat, Some(self.relay.addr))];
        servers.extend(connectors.iter().map(|c| server(c, ServerType::Connector, None)));
        self.membership.send_modify(|m| *m = Arc::new(Membership { epoch: m.epoch, version: m.version + 1, servers }));
    }
}

impl MiniCluster {
    /// One of the connector's RPC stats.
    pub fn rpc_stat(&self, name: &str) -> f64 {
        let mut s = Stats::new();
        self.rpc.snapshot(&mut s);
        s.get(name).copied().unwrap_or_else(|| panic!("no stat {name}"))
    }
}

impl Drop for MiniCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
