//! A Pomelo client for end-to-end tests, over raw TCP (the hybrid connector's non-WebSocket side).
//!
//! A reader thread decodes packages into a channel; a heartbeat thread keeps the session alive the way
//! the JS client does. Requests wait for their response and keep any pushes that arrive meanwhile.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pomelo_proto::wire::protobuf::ProtoBundle;
use pomelo_proto::wire::{package, Decoded, Message, MessageType, PackageDecoder, PackageType, Route};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub enum Event {
    Response { id: u32, body: Value, raw: Vec<u8> },
    Push { route: String, body: Value, raw: Vec<u8> },
    Kick(Value),
    Closed,
}

pub struct Client {
    stream: Arc<Mutex<TcpStream>>,
    events: mpsc::Receiver<Event>,
    pushes: VecDeque<(String, Value)>,
    next_id: u32,
    route_to_code: HashMap<String, u16>,
    pub kicked: Option<Value>,
    pub closed: bool,
    alive: Arc<AtomicBool>,
    /// The server's handshake reply.
    pub handshake: Value,
    /// With protobuf: the protos mirrored (`encode` with clientProtos, `decode` with serverProtos).
    protos: Option<Arc<ProtoBundle>>,
    /// `useCrypto`: signs every JSON request body with this key, as the JS client does.
    signer: Option<Arc<ring::signature::RsaKeyPair>>,
}

/// The test RSA key (tests/fixtures) and the `sys.rsa` a client holding it sends.
pub fn test_key() -> (Arc<ring::signature::RsaKeyPair>, Value) {
    let der = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/client-rsa-2048.pk8")).expect("key");
    let kp = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("a PKCS#8 RSA key");
    let public: ring::signature::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
    let n: String = public.n.iter().map(|b| format!("{b:02x}")).collect();
    (Arc::new(kp), json!({"rsa_n": n, "rsa_e": 65537}))
}

/// `text` (a JSON object) signed with `key`, `__crypto__` added last, as the JS client sends it.
pub fn sign(key: &ring::signature::RsaKeyPair, text: &str) -> String {
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), text.as_bytes(), &mut sig)
        .expect("sign");
    let sig: String = sig.iter().map(|b| format!("{b:02x}")).collect();
    match text.strip_suffix('}') {
        Some("{") => format!(r#"{{"__crypto__":"{sig}"}}"#),
        Some(head) => format!(r#"{head},"__crypto__":"{sig}"}}"#),
        None => panic!("not an object: {text}"),
    }
}

/// The handshake's `sys` of [`Client::connect`].
fn default_sys() -> Value {
    json!({"type": "rust-test", "version": "0.0.1", "rsa": {}, "protoVersion": 0})
}

fn write(stream: &Mutex<TcpStream>, bytes: &[u8]) -> bool {
    stream.lock().map(|mut s| s.write_all(bytes).is_ok()).unwrap_or(false)
}

impl Client {
    /// Connects and completes the handshake; panics if the server refuses.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::connect_sys(addr, default_sys())
    }

    /// [`Client::connect`] sending `sys` as the handshake's `sys`.
    pub fn connect_sys(addr: SocketAddr, sys: Value) -> Client {
        Client::try_connect_sys(addr, sys).unwrap_or_else(|e| panic!("{addr}: {e}"))
    }

    /// [`Client::connect`], or why it could not: refused, closed, or a handshake answer other than 200.
    pub fn try_connect(addr: SocketAddr) -> Result<Client, String> {
        Client::try_connect_sys(addr, default_sys())
    }

    /// [`Client::connect_sys`], or why it could not.
    pub fn try_connect_sys(addr: SocketAddr, sys: Value) -> Result<Client, String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        let hs = json!({"sys": sys, "user": {}});
        let bytes = package::encode(PackageType::Handshake, hs.to_string().as_bytes()).expect("encode");
        s.write_all(&bytes).map_err(|e| format!("send handshake: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut buf = BytesMut::new();
        let decoder = PackageDecoder::new(16 << 20);
        let reply = loop {
            if let Ok(Decoded::Package(p)) = decoder.decode(&mut buf) {
                break p;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).map_err(|e| format!("read handshake reply: {e}"))?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if reply.kind != PackageType::Handshake {
            return Err(format!("a {:?} package instead of the handshake reply", reply.kind));
        }
        let reply: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("handshake json: {e}"))?;
        if reply["code"] != 200 {
            return Err(format!("handshake refused: {reply}"));
        }
        let route_to_code: HashMap<String, u16> = reply["sys"]["routeToCode"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u16))).collect())
            .unwrap_or_default();
        let code_to_route: HashMap<u16, String> = route_to_code.iter().map(|(k, v)| (*v, k.clone())).collect();
        s.write_all(&package::empty(PackageType::HandshakeAck)).map_err(|e| format!("ack: {e}"))?;
        s.set_read_timeout(None).ok();
        let alive = Arc::new(AtomicBool::new(true));
        let reader = s.try_clone().expect("clone");
        let stream = Arc::new(Mutex::new(s));
        let (tx, events) = mpsc::channel();
        let a = alive.clone();
        std::thread::spawn(move || read_loop(reader, buf, tx, code_to_route, a));
        if let Some(hb) = reply["sys"]["heartbeat"].as_u64() {
            let (st, a) = (stream.clone(), alive.clone());
            std::thread::spawn(move || {
                let beat = package::empty(PackageType::Heartbeat);
                while a.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(hb * 1000 / 2));
                    if !a.load(Ordering::Relaxed) || !write(&st, &beat) {
                        return;
                    }
                }
            });
        }
        Ok(Client {
            stream,
            events,
            pushes: VecDeque::new(),
            next_id: 1,
            route_to_code,
            kicked: None,
            closed: false,
            alive,
            handshake: reply,
            protos: None,
            signer: None,
        })
    }

    /// Signs every JSON request from now on (the handshake must have sent this key's `sys.rsa`).
    pub fn signing(mut self, key: Arc<ring::signature::RsaKeyPair>) -> Client {
        self.signer = Some(key);
        self
    }

    /// Speaks protobuf from now on: requests of routes in `client` are encoded with it, and responses
    /// and pushes of routes in `server` decoded with it (the raw files, as the server has them).
    pub fn with_protos(mut self, server: &str, client: &str) -> Client {
        // Mirrored: the bundle's server side is what this client writes, its client side what it reads.
        self.protos = Some(Arc::new(ProtoBundle::new(Some(client), Some(server)).expect("protos compile")));
        self
    }

    fn decoded(&self, route: &str, body: Value, raw: &[u8]) -> Value {
        match self.protos.as_ref().and_then(|p| p.decode(route, raw)) {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!("{route}: the body is not protobuf of its proto: {e} ({raw:02x?})"),
            None => body,
        }
    }

    fn send_message(&self, msg: Message) {
        let bytes = msg.encode_package().expect("encode");
        write(&self.stream, &bytes);
    }

    fn route(&self, route: &str) -> Route {
        match self.route_to_code.get(route) {
            Some(c) => Route::Code(*c),
            None => Route::Plain(route.to_string()),
        }
    }

    fn take(&mut self, ev: Event) -> Option<(u32, Value, Vec<u8>)> {
        match ev {
            Event::Response { id, body, raw } => return Some((id, body, raw)),
            Event::Push { route, body, raw } => {
                let body = self.decoded(&route, body, &raw);
                self.pushes.push_back((route, body));
            }
            Event::Kick(v) => self.kicked = Some(v),
            Event::Closed => self.closed = true,
        }
        None
    }

    /// Sends a request and waits (at most 10 s) for its response.
    pub fn request(&mut self, route: &str, body: Value) -> Value {
        let bytes = match (self.protos.as_ref().and_then(|p| p.encode(route, &body)), &self.signer) {
            (Some(b), _) => b.expect("the request fits its proto"),
            (None, Some(key)) => sign(key, &body.to_string()).into_bytes(),
            (None, None) => body.to_string().into_bytes(),
        };
        self.request_bytes(route, bytes)
    }

    /// A request whose body is exactly `body` (e.g. the CESU-8 bytes a JS client sends).
    pub fn request_bytes(&mut self, route: &str, body: Vec<u8>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_message(Message::request(id, self.route(route), body));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !self.closed {
            let Ok(ev) = self.events.recv_timeout(Duration::from_millis(50)) else { continue };
            if let Some((rid, body, raw)) = self.take(ev) {
                if rid == id {
                    return self.decoded(route, body, &raw);
                }
            }
        }
        panic!("no response to {route} (closed: {}, kicked: {:?})", self.closed, self.kicked);
    }

    pub fn notify(&mut self, route: &str, body: Value) {
        self.send_message(Message::notify(self.route(route), body.to_string().into_bytes()));
    }

    /// The next push, waiting at most `within`.
    pub fn next_push(&mut self, within: Duration) -> Option<(String, Value)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.pushes.pop_front() {
                return Some(p);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Ok(ev) = self.events.recv_timeout(left.min(Duration::from_millis(50))) {
                self.take(ev);
            }
        }
    }

    /// Every push that arrives until nothing has come for `quiet`.
    pub fn drain_pushes(&mut self, quiet: Duration) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some(p) = self.next_push(quiet) {
            out.push(p);
        }
        out
    }

    /// Pushes of `route` until `n` have come (at most `within`), then any more that come in `grace`.
    pub fn collect(&mut self, route: &str, n: usize, within: Duration, grace: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            match self.next_push(left) {
                Some((r, b)) if r == route => out.push(b),
                Some(_) => {}
                None => break,
            }
        }
        while let Some((r, b)) = self.next_push(grace) {
            if r == route {
                out.push(b);
            }
        }
        out
    }

    /// Waits for the server to close this connection.
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.closed && Instant::now() < deadline {
            if let Ok(ev) = self.events.recv_timeout(Duration::from_millis(50)) {
                self.take(ev);
            }
        }
        self.closed
    }

    pub fn close(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        if let Ok(s) = self.stream.lock() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

fn read_loop(
    mut s: TcpStream,
    mut buf: BytesMut,
    tx: mpsc::Sender<Event>,
    codes: HashMap<u16, String>,
    alive: Arc<AtomicBool>,
) {
    let decoder = PackageDecoder::new(16 << 20);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Package(p)) => {
                    let ev = match p.kind {
                        PackageType::Data => match Message::decode(&p.body) {
                            Ok(m) => {
                                let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                                let raw = m.body.to_vec();
                                match (m.kind, m.route) {
                                    (MessageType::Response, _) => Event::Response { id: m.id, body, raw },
                                    (_, Some(Route::Plain(r))) => Event::Push { route: r, body, raw },
                                    (_, Some(Route::Code(c))) => {
                                        Event::Push { route: codes.get(&c).cloned().unwrap_or_default(), body, raw }
                                    }
                                    (_, None) => continue,
                                }
                            }
                            Err(_) => continue,
                        },
                        PackageType::Kick => Event::Kick(serde_json::from_slice(&p.body).unwrap_or(Value::Null)),
                        _ => continue,
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Ok(Decoded::NeedMore) => break,
                Err(_) => {
                    let _ = tx.send(Event::Closed);
                    return;
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                alive.store(false, Ordering::Relaxed);
                let _ = tx.send(Event::Closed);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// [`login`], or `None` while the cluster cannot take it yet: the gate knows no connector (`{"code":500}`),
/// the connector it named is not listening yet, or the enter answer has no `users`. For `wait_until`.
pub fn try_login(gate: SocketAddr, username: &str, rid: &str) -> Option<(Client, Value)> {
    let mut g = Client::try_connect(gate).ok()?;
    let entry = g.request("gate.gateHandler.queryEntry", json!({"uid": username}));
    g.close();
    if entry["code"] != 200 {
        return None;
    }
    let addr: SocketAddr = format!("{}:{}", entry["host"].as_str()?, entry["port"]).parse().ok()?;
    let mut c = Client::try_connect(addr).ok()?;
    let reply = c.request("connector.entryHandler.enter", json!({"username": username, "rid": rid}));
    reply.get("users").is_some().then_some((c, reply))
}

/// Logs in as Pomelo's chat demo does: ask the gate for a connector, then enter the room there.
pub fn login(gate: SocketAddr, username: &str, rid: &str) -> (Client, Value) {
    let mut g = Client::connect(gate);
    let entry = g.request("gate.gateHandler.queryEntry", json!({"uid": username}));
    assert_eq!(entry["code"], 200, "gate answer {entry}");
    g.close();
    let addr: SocketAddr =
        format!("{}:{}", entry["host"].as_str().expect("host"), entry["port"]).parse().expect("connector address");
    let mut c = Client::connect(addr);
    let reply = c.request("connector.entryHandler.enter", json!({"username": username, "rid": rid}));
    (c, reply)
}
