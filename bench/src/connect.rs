//! Getting a client onto a connector: dial from a chosen 127.x source address (and upgrade to a
//! WebSocket for `--transport ws`), ask the gate which connector to use (`gate.gateHandler.queryEntry`),
//! and do the handshake there. Every step is bounded by the caller's timeout; errors say which stage
//! failed, for the report. No tasks of its own.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use nix::sys::socket::{setsockopt, sockopt};
use pomelo_proto::wire::{PackageType, Route};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};

use crate::wire;
use crate::ws::{self, Frame, Transport, Ws};

/// Which connect stage failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Gate,
    Connect,
    Handshake,
    Enter,
}

#[derive(Debug)]
pub struct Failure {
    pub stage: Stage,
    pub why: String,
}

pub fn fail<T>(stage: Stage, why: impl std::fmt::Display) -> Result<T, Failure> {
    Err(Failure { stage, why: why.to_string() })
}

/// Connects from `src` (port chosen at connect time, so many destinations can share a source port).
pub async fn dial(addr: SocketAddr, src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    setsockopt(&sock, sockopt::IpBindAddressNoPort, &true).map_err(std::io::Error::from)?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Dials `addr` from `src` and, for a WebSocket, upgrades; the `Ws` is `None` for raw TCP.
pub async fn open(
    addr: SocketAddr,
    src: Ipv4Addr,
    transport: Transport,
    seed: u64,
) -> Result<(TcpStream, Option<Ws>), String> {
    let stream = dial(addr, src).await.map_err(|e| format!("connect to {addr}: {e}"))?;
    match transport {
        Transport::Tcp => Ok((stream, None)),
        Transport::Ws => {
            let mut w = Ws::new(seed);
            w.raw = ws::upgrade(&stream, addr).await?;
            Ok((stream, Some(w)))
        }
    }
}

/// Writes all of `bytes`, in one binary frame over a WebSocket (used before the session loop, where
/// blocking on the socket is fine).
pub async fn write_all(stream: &TcpStream, ws: Option<&mut Ws>, bytes: &[u8]) -> std::io::Result<()> {
    let mut bytes = match ws {
        Some(w) => w.binary(bytes),
        None => bytes,
    };
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until one whole package is in `buf`; returns its type and body, leaving the rest in `buf`.
/// Over a WebSocket, frames are read into `ws.raw` and their payloads appended to `buf`.
pub async fn read_package(
    stream: &TcpStream,
    mut ws: Option<&mut Ws>,
    buf: &mut Vec<u8>,
) -> Result<(u8, Vec<u8>), String> {
    loop {
        if let Some(w) = ws.as_deref_mut() {
            deframe(stream, w, buf).await?;
        }
        if let Some((p, used)) = wire::next_package(buf)? {
            let out = (p.kind, p.body.to_vec());
            buf.drain(..used);
            return Ok(out);
        }
        stream.readable().await.map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        let into = match ws.as_deref_mut() {
            Some(w) => &mut w.raw,
            None => &mut *buf,
        };
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err("closed by the server".into()),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Moves the payloads of the whole frames in `ws.raw` to `buf`, answering pings.
async fn deframe(stream: &TcpStream, ws: &mut Ws, buf: &mut Vec<u8>) -> Result<(), String> {
    let raw = std::mem::take(&mut ws.raw);
    let mut used = 0;
    while let Some((frame, n)) = ws::next_frame(&raw[used..])? {
        match frame {
            Frame::Data(p) => buf.extend_from_slice(p),
            Frame::Ping(p) => {
                let pong = ws.pong(p).to_vec();
                write_all(stream, None, &pong).await.map_err(|e| e.to_string())?;
            }
            Frame::Ignored => {}
            Frame::Close => return Err("closed by the server (close frame)".into()),
        }
        used += n;
    }
    ws.raw = raw[used..].to_vec();
    Ok(())
}

/// What the server's handshake reply says.
pub struct Handshaken {
    pub heartbeat_secs: Option<u64>,
    pub route_to_code: HashMap<String, u16>,
}

impl Handshaken {
    pub fn route(&self, route: &str) -> Route {
        match self.route_to_code.get(route) {
            Some(c) => Route::Code(*c),
            None => Route::Plain(route.to_owned()),
        }
    }
}

/// HANDSHAKE, its reply, HANDSHAKE_ACK. Packages that arrive with the reply stay in `buf`.
pub async fn handshake(stream: &TcpStream, mut ws: Option<&mut Ws>, buf: &mut Vec<u8>) -> Result<Handshaken, String> {
    write_all(stream, ws.as_deref_mut(), &wire::handshake()).await.map_err(|e| e.to_string())?;
    let (kind, body) = read_package(stream, ws.as_deref_mut(), buf).await?;
    if kind != PackageType::Handshake as u8 {
        return Err(format!("expected a handshake reply, got package type {kind}"));
    }
    let reply: Value = serde_json::from_slice(&body).map_err(|e| format!("handshake reply: {e}"))?;
    if reply["code"] != 200 {
        return Err(format!("handshake refused: {reply}"));
    }
    let route_to_code = reply["sys"]["routeToCode"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), u16::try_from(v.as_u64()?).ok()?))).collect())
        .unwrap_or_default();
    write_all(stream, ws, &wire::ack()).await.map_err(|e| e.to_string())?;
    Ok(Handshaken { heartbeat_secs: reply["sys"]["heartbeat"].as_u64().filter(|&s| s > 0), route_to_code })
}

/// Asks the gate for this user's connector.
pub async fn query_gate(
    gate: SocketAddr,
    src: Ipv4Addr,
    uid: &str,
    transport: Transport,
    seed: u64,
) -> Result<SocketAddr, Failure> {
    let (stream, mut ws) = match open(gate, src, transport, seed).await {
        Ok(s) => s,
        Err(e) => return fail(Stage::Gate, format_args!("the gate {gate}: {e}")),
    };
    let mut buf = Vec::new();
    let hs = match handshake(&stream, ws.as_mut(), &mut buf).await {
        Ok(h) => h,
        Err(e) => return fail(Stage::Gate, format_args!("gate handshake: {e}")),
    };
    let body = serde_json::json!({ "uid": uid }).to_string().into_bytes();
    let req: Option<Bytes> = wire::request(1, hs.route(wire::GATE_ROUTE), body);
    let Some(req) = req else { return fail(Stage::Gate, "cannot encode queryEntry") };
    if let Err(e) = write_all(&stream, ws.as_mut(), &req).await {
        return fail(Stage::Gate, format_args!("gate write: {e}"));
    }
    loop {
        let (kind, body) = match read_package(&stream, ws.as_mut(), &mut buf).await {
            Ok(p) => p,
            Err(e) => return fail(Stage::Gate, format_args!("gate read: {e}")),
        };
        if kind != PackageType::Data as u8 {
            continue;
        }
        let wire::Data::Response { id: 1, body } = wire::classify(&body) else { continue };
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let (Some(host), Some(port)) = (v["host"].as_str(), v["port"].as_u64()) else {
            return fail(Stage::Gate, format_args!("gate answered {v}"));
        };
        let ip: IpAddr = match host.parse() {
            Ok(ip @ IpAddr::V4(a)) if a.is_loopback() => ip,
            _ => return fail(Stage::Gate, format_args!("gate sent a non-loopback host {host}")),
        };
        let Ok(port) = u16::try_from(port) else { return fail(Stage::Gate, "gate sent a bad port") };
        return Ok(SocketAddr::new(ip, port));
    }
}
