//! An async Pomelo chat client for the failover test, over WebSocket or raw TCP, many per tokio runtime.
//!
//! [`login`] asks the gate for a connector and enters a room there, then spawns the client's task: it
//! sends a heartbeat every half interval (as the JS client does), one chat message a second while
//! `sending` is set, and writes everything it sees (each send and its reply, each push, how the
//! connection ended) to its [`Log`], which the test reads while the task runs. The task ends when the
//! server closes the connection or kicks the client, or when the test aborts it (dropping the socket).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::wire::handshake::JS_CLIENT_HANDSHAKE;
use pomelo_proto::wire::{package, Decoded, Message, MessageType, Package, PackageDecoder, PackageType, Route};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Tcp,
}

enum Io {
    Ws(Box<WebSocketStream<TcpStream>>),
    Tcp(TcpStream, BytesMut),
}

pub struct Conn {
    io: Io,
    pending: VecDeque<Package>,
    code_to_route: HashMap<u64, String>,
    pub heartbeat: Option<Duration>,
}

pub enum Event {
    Response(u32, Value),
    Push(String, Value),
    Other,
}

impl Conn {
    /// Connects and completes the handshake (as the JS client does).
    pub async fn connect(kind: Kind, addr: SocketAddr) -> anyhow::Result<Conn> {
        Conn::connect_with(kind, addr, None).await
    }

    /// [`Conn::connect`] with the socket's receive buffer set to `recv_buffer` bytes (a client that stops
    /// reading then fills the server's queue, not the kernel's).
    pub async fn connect_with(kind: Kind, addr: SocketAddr, recv_buffer: Option<u32>) -> anyhow::Result<Conn> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr)).await??;
        tcp.set_nodelay(true).ok();
        let io = match kind {
            Kind::Ws => Io::Ws(Box::new(tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await?.0)),
            Kind::Tcp => Io::Tcp(tcp, BytesMut::new()),
        };
        let mut c = Conn { io, pending: VecDeque::new(), code_to_route: HashMap::new(), heartbeat: None };
        c.send(package::encode(PackageType::Handshake, JS_CLIENT_HANDSHAKE.as_bytes())?).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), c.recv()).await?.context("closed in handshake")?;
        let reply: Value = serde_json::from_slice(&reply.body)?;
        if reply["code"] != 200 {
            bail!("handshake refused: {reply}");
        }
        c.heartbeat = reply["sys"]["heartbeat"].as_u64().map(Duration::from_secs);
        if let Some(m) = reply["sys"]["routeToCode"].as_object() {
            c.code_to_route = m.iter().filter_map(|(r, code)| Some((code.as_u64()?, r.clone()))).collect();
        }
        c.send(package::empty(PackageType::HandshakeAck)).await?;
        Ok(c)
    }

    pub async fn send(&mut self, bytes: Bytes) -> anyhow::Result<()> {
        match &mut self.io {
            Io::Ws(ws) => ws.send(WsMessage::Binary(bytes)).await?,
            Io::Tcp(s, _) => s.write_all(&bytes).await?,
        }
        Ok(())
    }

    pub async fn send_request(&mut self, id: u32, route: &str, body: &Value) -> anyhow::Result<()> {
        let m = Message::request(id, Route::Plain(route.into()), Bytes::from(body.to_string()));
        self.send(m.encode_package()?).await
    }

    /// The next package; `None` once the server closed. Cancel-safe: its only awaits are reads.
    pub async fn recv(&mut self) -> Option<Package> {
        let dec = PackageDecoder::default();
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            match &mut self.io {
                Io::Ws(ws) => match ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => self.pending.extend(dec.decode_all(&b).ok()?),
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                },
                Io::Tcp(s, buf) => {
                    while let Decoded::Package(p) = dec.decode(buf).ok()? {
                        self.pending.push_back(p);
                    }
                    if self.pending.is_empty() && matches!(s.read_buf(buf).await, Ok(0) | Err(_)) {
                        return None;
                    }
                }
            }
        }
    }

    pub fn event(&self, p: &Package) -> Event {
        if p.kind != PackageType::Data {
            return Event::Other;
        }
        let Ok(m) = Message::decode(&p.body) else { return Event::Other };
        let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
        match (m.kind, m.route) {
            (MessageType::Response, _) => Event::Response(m.id, body),
            (_, Some(Route::Plain(r))) => Event::Push(r, body),
            (_, Some(Route::Code(c))) => {
                Event::Push(self.code_to_route.get(&(c as u64)).cloned().unwrap_or_default(), body)
            }
            (_, None) => Event::Other,
        }
    }

    /// A request and its response (within 10 s); pushes meanwhile are dropped (the test counts none yet).
    async fn request(&mut self, id: u32, route: &str, body: Value) -> anyhow::Result<Value> {
        self.send_request(id, route, &body).await?;
        let wait = async {
            while let Some(p) = self.recv().await {
                if let Event::Response(rid, body) = self.event(&p) {
                    if rid == id {
                        return Ok(body);
                    }
                }
            }
            bail!("closed before the answer to {route}")
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.context("no answer within 10s")?
    }
}

/// One chat message this client sent: when, and the reply (`None` while unanswered).
pub struct Sent {
    pub at: Instant,
    pub content: String,
    pub reply: Option<Value>,
}

/// Everything one client saw.
#[derive(Default)]
pub struct Log {
    pub sent: Vec<Sent>,
    /// onChat `msg` → how many times it arrived.
    pub chats: HashMap<String, u32>,
    /// Other pushes (onAdd, onLeave, anything else) with when they arrived.
    pub pushes: Vec<(Instant, String, Value)>,
    /// When and why the connection ended, if it did.
    pub closed: Option<(Instant, String)>,
}

pub struct User {
    pub name: String,
    pub rid: String,
    pub kind: Kind,
    pub log: Arc<Mutex<Log>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Gate, then connector, then the client's task; `phase` staggers its sends within each second.
pub async fn login(
    kind: Kind,
    gate: SocketAddr,
    name: String,
    rid: String,
    phase: Duration,
    sending: Arc<AtomicBool>,
) -> anyhow::Result<(User, Value)> {
    let mut g = Conn::connect(kind, gate).await?;
    let entry = g.request(1, "gate.gateHandler.queryEntry", json!({"uid": name})).await?;
    drop(g);
    let addr: SocketAddr =
        format!("{}:{}", entry["host"].as_str().context("host")?, entry["port"]).parse().context("connector")?;
    let mut c = Conn::connect(kind, addr).await?;
    let reply = c.request(1, "connector.entryHandler.enter", json!({"username": name, "rid": rid})).await?;
    let log = Arc::new(Mutex::new(Log::default()));
    let task = tokio::spawn(run(c, name.clone(), rid.clone(), phase, log.clone(), sending));
    Ok((User { name, rid, kind, log, task }, reply))
}

async fn run(mut c: Conn, me: String, rid: String, phase: Duration, log: Arc<Mutex<Log>>, sending: Arc<AtomicBool>) {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(start + phase, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat_every = c.heartbeat.map(|h| h / 2).unwrap_or(Duration::from_secs(3600));
    let mut beat = tokio::time::interval_at(start + beat_every, beat_every);
    let mut ids: HashMap<u32, usize> = HashMap::new();
    let mut next_id = 100u32;
    let record = |why: String| {
        if let Ok(mut l) = log.lock() {
            l.closed.get_or_insert((Instant::now(), why));
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !sending.load(Ordering::SeqCst) {
                    continue;
                }
                let content = {
                    let Ok(mut l) = log.lock() else { return };
                    let content = format!("{rid}/{me}#{}", l.sent.len());
                    ids.insert(next_id, l.sent.len());
                    l.sent.push(Sent { at: Instant::now(), content: content.clone(), reply: None });
                    content
                };
                let body = json!({"rid": rid, "content": content, "from": me, "target": "*"});
                if let Err(e) = c.send_request(next_id, "chat.chatHandler.send", &body).await {
                    return record(format!("send failed: {e}"));
                }
                next_id += 1;
            }
            _ = beat.tick() => {
                if let Err(e) = c.send(package::empty(PackageType::Heartbeat)).await {
                    return record(format!("heartbeat failed: {e}"));
                }
            }
            p = c.recv() => {
                let Some(p) = p else { return record("closed by the server".into()) };
                if p.kind == PackageType::Kick {
                    return record(format!("kicked: {}", String::from_utf8_lossy(&p.body)));
                }
                let Ok(mut l) = log.lock() else { return };
                match c.event(&p) {
                    Event::Response(id, body) => match ids.remove(&id).and_then(|i| l.sent.get_mut(i)) {
                        Some(s) => s.reply = Some(body),
                        None => l.pushes.push((Instant::now(), format!("response to unknown id {id}"), body)),
                    },
                    Event::Push(route, body) if route == "onChat" => {
                        let msg = body["msg"].as_str().unwrap_or("").to_string();
                        *l.chats.entry(msg).or_default() += 1;
                    }
                    Event::Push(route, body) => l.pushes.push((Instant::now(), route, body)),
                    Event::Other => {}
                }
            }
        }
    }
}
