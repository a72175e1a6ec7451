//! Test harness: a frontend server on 127.0.0.1:0 and a Pomelo client speaking raw package bytes over
//! WebSocket or TCP. Every wait is bounded; a server is shut down when its handle drops.

#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;
pub mod local_rooms;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::wire::handshake::JS_CLIENT_HANDSHAKE;
use pomelo_proto::wire::{package, Decoded, Message, MessageType, Package, PackageDecoder, PackageType, Route};
use pomelo_worker::frontend::{serve_with, FrontendConfig, FrontendMetrics, Handler, Sessions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(5);

pub struct Server {
    pub addr: SocketAddr,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<FrontendMetrics>,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl Server {
    pub async fn start(config: FrontendConfig, handler: Arc<dyn Handler>) -> Server {
        let metrics = Arc::new(FrontendMetrics::new());
        let sessions = Sessions::new(&config, metrics.clone());
        Server::start_with(config, handler, sessions, metrics).await
    }

    /// A server over sessions made beforehand (a connector's chat client delivers into them).
    pub async fn start_with(
        config: FrontendConfig,
        handler: Arc<dyn Handler>,
        sessions: Arc<Sessions>,
        metrics: Arc<FrontendMetrics>,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let (s, t) = (sessions.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            serve_with(listener, config, handler, s, t).await.unwrap();
        });
        Server { addr, sessions, metrics, shutdown, task: Some(task) }
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics.get(name).unwrap()
    }

    /// Waits until `f` holds, for at most `WAIT`.
    pub async fn eventually(&self, what: &str, f: impl Fn(&Server) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub enum Transport {
    Ws(Box<WebSocketStream<TcpStream>>),
    Tcp(TcpStream, BytesMut),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Tcp,
}

pub struct Client {
    pub t: Transport,
    pending: std::collections::VecDeque<Package>,
    /// Pushes seen while waiting for responses.
    pub pushes: Vec<(String, Value)>,
    pub dict: Option<Value>,
}

impl Client {
    pub async fn connect(kind: Kind, addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Client::over(kind, tcp, addr).await
    }

    /// A client with a tiny receive buffer, so a server's writes back up quickly when it stops reading.
    pub async fn connect_small_buffer(kind: Kind, addr: SocketAddr) -> Client {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        Client::over(kind, tcp, addr).await
    }

    async fn over(kind: Kind, tcp: TcpStream, addr: SocketAddr) -> Client {
        let t = match kind {
            Kind::Ws => {
                let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await.unwrap();
                Transport::Ws(Box::new(ws))
            }
            Kind::Tcp => Transport::Tcp(tcp, BytesMut::new()),
        };
        Client { t, pending: Default::default(), pushes: Vec::new(), dict: None }
    }

    /// `false` if the server already closed the connection.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> bool {
        match &mut self.t {
            Transport::Ws(ws) => ws.send(WsMessage::Binary(Bytes::copy_from_slice(bytes))).await.is_ok(),
            Transport::Tcp(s, _) => s.write_all(bytes).await.is_ok(),
        }
    }

    pub async fn send_pkg(&mut self, kind: PackageType, body: &[u8]) -> bool {
        self.send_raw(&package::encode(kind, body).unwrap()).await
    }

    /// The next package, or `None` once the server closed; panics after `WAIT`.
    pub async fn recv(&mut self) -> Option<Package> {
        self.recv_within(WAIT).await.expect("timed out waiting for a package")
    }

    /// `Err(())` on timeout.
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<Package>, ()> {
        tokio::time::timeout(d, self.recv_inner()).await.map_err(|_| ())
    }

    async fn recv_inner(&mut self) -> Option<Package> {
        let dec = PackageDecoder::default();
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            match &mut self.t {
                Transport::Ws(ws) => match ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => self.pending.extend(dec.decode_all(&b).unwrap()),
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                },
                Transport::Tcp(s, buf) => {
                    while let Decoded::Package(p) = dec.decode(buf).unwrap() {
                        self.pending.push_back(p);
                    }
                    if !self.pending.is_empty() {
                        continue;
                    }
                    match s.read_buf(buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    /// Reads until the server closes; returns what arrived. Panics if it stays open for `within`.
    pub async fn expect_closed(&mut self, within: Duration) -> Vec<Package> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(Some(p)) => got.push(p),
                Ok(None) => return got,
                Err(()) => panic!("connection still open after {within:?}; got {got:?}"),
            }
        }
    }

    /// HANDSHAKE (as the JS client) and ACK; returns the reply. Expects one HEARTBEAT if `heartbeat`.
    pub async fn handshake(&mut self, heartbeat: bool) -> Value {
        self.send_pkg(PackageType::Handshake, JS_CLIENT_HANDSHAKE.as_bytes()).await;
        let p = self.recv().await.expect("handshake reply");
        assert_eq!(p.kind, PackageType::Handshake);
        let reply: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(reply["code"], 200, "{reply}");
        self.dict = reply["sys"].get("dict").cloned();
        self.send_pkg(PackageType::HandshakeAck, b"").await;
        if heartbeat {
            let p = self.recv().await.expect("heartbeat after ack");
            assert_eq!(p.kind, PackageType::Heartbeat);
        }
        reply
    }

    /// The route as the JS client sends it: compressed when the handshake gave a dictionary entry.
    pub fn route(&self, route: &str) -> Route {
        match self.dict.as_ref().and_then(|d| d.get(route)).and_then(Value::as_u64) {
            Some(code) => Route::Code(code as u16),
            None => Route::Plain(route.to_owned()),
        }
    }

    pub async fn send_request(&mut self, id: u32, route: &str, body: &Value) {
        let r = self.route(route);
        let m = Message::request(id, r, Bytes::from(body.to_string()));
        self.send_raw(&m.encode_package().unwrap()).await;
    }

    pub async fn notify(&mut self, route: &str, body: &Value) {
        let m = Message::notify(self.route(route), Bytes::from(body.to_string()));
        self.send_raw(&m.encode_package().unwrap()).await;
    }

    /// Sends a request and waits for its response, collecting pushes and answering heartbeats.
    pub async fn request(&mut self, id: u32, route: &str, body: &Value) -> Value {
        self.request_within(id, route, body, WAIT).await
    }

    /// [`Client::request`] waiting up to `d` for each package.
    pub async fn request_within(&mut self, id: u32, route: &str, body: &Value, d: Duration) -> Value {
        self.send_request(id, route, body).await;
        loop {
            let p = self.recv_within(d).await.expect("timed out waiting for a package");
            let p = p.expect("connection closed before the response");
            if let Some(v) = self.absorb(p, Some(id)).await {
                return v;
            }
        }
    }

    /// Waits for the next push, answering heartbeats.
    pub async fn next_push(&mut self) -> (String, Value) {
        self.next_push_within(WAIT).await
    }

    /// [`Client::next_push`] waiting up to `d` for each package.
    pub async fn next_push_within(&mut self, d: Duration) -> (String, Value) {
        if !self.pushes.is_empty() {
            return self.pushes.remove(0);
        }
        loop {
            let p = self.recv_within(d).await.expect("timed out waiting for a package");
            let p = p.expect("connection closed before a push");
            self.absorb(p, None).await;
            if !self.pushes.is_empty() {
                return self.pushes.remove(0);
            }
        }
    }

    async fn absorb(&mut self, p: Package, want_id: Option<u32>) -> Option<Value> {
        match p.kind {
            PackageType::Heartbeat => {
                self.send_pkg(PackageType::Heartbeat, b"").await;
                None
            }
            PackageType::Data => {
                let m = Message::decode(&p.body).unwrap();
                let body: Value = serde_json::from_slice(&m.body).unwrap();
                match m.kind {
                    MessageType::Response if Some(m.id) == want_id => Some(body),
                    MessageType::Push => {
                        let route = match m.route {
                            Some(Route::Plain(r)) => r,
                            other => panic!("push route {other:?}"),
                        };
                        self.pushes.push((route, body));
                        None
                    }
                    _ => panic!("unexpected message {m:?}"),
                }
            }
            other => panic!("unexpected package {other:?}: {:?}", p.body),
        }
    }
}

/// Runs a test body with a hard time limit.
pub async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    tokio::time::timeout(limit, f).await.expect("test exceeded its time limit");
}
