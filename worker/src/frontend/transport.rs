//! One client port, two transports (Pomelo's hybrid connector): a connection whose first byte starts an
//! HTTP method (`GET`, `POST`, `PUT`, `DELETE`, `HEAD`) is HTTP, either a WebSocket upgrade or a plain
//! request answered by [`super::Handler::http_get`]; anything else is raw TCP with the same package
//! framing. After the upgrade both are split into a [`Reader`] (owned by the connection task) and a
//! [`Writer`] (owned by the writer task). No tasks here; the caller bounds every call with a timeout.
//!
//! With a certificate configured (`ssl` in servers.yaml), a connection whose first byte is a TLS
//! handshake record (0x16) is TLS, and the same choice is made inside it: `wss://` and TLS over TCP on the
//! same port as the plain ones. Plain TCP keeps its zero-buffer idle reads; TLS needs a buffer per socket.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::tls::{Stream, TlsAcceptor};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

use super::handler::Handler;

/// Largest HTTP request head we read before giving up on a client.
const MAX_HTTP_HEAD: usize = 8 * 1024;

type Ws = WebSocketStream<Stream>;

pub(crate) enum Accepted {
    /// The handshake (HTTP 101) is done.
    WebSocket(Box<Ws>),
    /// Raw TCP; nothing has been read yet.
    Tcp(TcpStream),
    /// Raw TCP inside TLS, and the first bytes read from it.
    TlsTcp(Box<Stream>, BytesMut),
    /// A plain HTTP request was answered; close.
    HttpAnswered,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error("closed before sending anything")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad HTTP request: {0}")]
    BadHttp(&'static str),
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

fn is_http(first: u8) -> bool {
    matches!(first, b'G' | b'P' | b'D' | b'H')
}

/// Decides the transport (TLS or not, then HTTP or TCP) and performs the WebSocket upgrade.
pub(crate) async fn accept(
    stream: TcpStream,
    handler: &dyn Handler,
    ws_config: WebSocketConfig,
    tls: Option<&TlsAcceptor>,
) -> Result<Accepted, AcceptError> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(AcceptError::Eof);
    }
    if let (TLS_HANDSHAKE, Some(tls)) = (first[0], tls) {
        let _ = stream.set_nodelay(true);
        let mut io = Stream::Server(Box::new(tls.accept(stream).await?));
        let mut buf = BytesMut::with_capacity(1024);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(AcceptError::Eof);
        }
        if !is_http(buf[0]) {
            return Ok(Accepted::TlsTcp(Box::new(io), buf));
        }
        return http(io, buf, handler, ws_config).await;
    }
    if !is_http(first[0]) {
        return Ok(Accepted::Tcp(stream));
    }
    http(Stream::Plain(stream), BytesMut::with_capacity(1024), handler, ws_config).await
}

/// An HTTP request (`buf` holds what was read of it already): a WebSocket upgrade, or a page.
async fn http(
    mut stream: Stream,
    mut buf: BytesMut,
    handler: &dyn Handler,
    ws_config: WebSocketConfig,
) -> Result<Accepted, AcceptError> {
    let head_len = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HTTP_HEAD {
            respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", b"").await;
            return Err(AcceptError::BadHttp("request head over 8 KiB"));
        }
        buf.reserve(1024);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(AcceptError::BadHttp("closed inside the request head"));
        }
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| AcceptError::BadHttp("head is not UTF-8"))?;
    let req = parse_head(head).ok_or(AcceptError::BadHttp("malformed request line"))?;
    if req.method == "GET" && req.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        let (Some(key), Some("13")) = (req.header("sec-websocket-key"), req.header("sec-websocket-version")) else {
            respond(&mut stream, "400 Bad Request", "text/plain", b"websocket version 13 and a key are required").await;
            return Err(AcceptError::BadHttp("websocket upgrade without key or version 13"));
        };
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        stream.write_all(reply.as_bytes()).await?;
        stream.flush().await?;
        // Bytes after the head (a client that did not wait for 101) belong to the WebSocket.
        let rest = buf.split_off(head_len + 4).to_vec();
        let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config)).await;
        return Ok(Accepted::WebSocket(Box::new(ws)));
    }
    if req.method == "GET" {
        match handler.http_get(req.path) {
            Some((ctype, body)) => respond(&mut stream, "200 OK", &ctype, &body).await,
            None => respond(&mut stream, "404 Not Found", "text/plain", b"not found").await,
        }
    } else {
        respond(&mut stream, "405 Method Not Allowed", "text/plain", b"").await;
    }
    Ok(Accepted::HttpAnswered)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

struct Head<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Head<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

fn parse_head(head: &str) -> Option<Head<'_>> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim(), v.trim())).collect();
    Some(Head { method, path, headers })
}

async fn respond(stream: &mut (impl AsyncWrite + Unpin), status: &str, ctype: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\n\
         X-Frame-Options: DENY\r\nReferrer-Policy: same-origin\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The client may already be gone; there is nobody to report a failure to.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// Why a read failed: the peer broke the WebSocket rules (a protocol error), reset the connection
/// (an ordinary way for a client to go), or the socket failed otherwise.
pub(crate) enum ReadError {
    Malformed(String),
    Reset(String),
    Io(String),
}

fn io_error(what: &str, e: std::io::Error) -> ReadError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => ReadError::Reset(format!("{what}: {e}")),
        _ => ReadError::Io(format!("{what}: {e}")),
    }
}

/// The read side of a connection.
pub(crate) enum Reader {
    Ws(SplitStream<Ws>),
    Tcp(OwnedReadHalf),
    /// TCP inside TLS, and bytes read before the split not yet handed out.
    TlsTcp(ReadHalf<Stream>, BytesMut),
}

/// One read: bytes of a WebSocket message (whole packages only) or of the TCP stream (any split).
pub(crate) enum Inbound {
    Message(Bytes),
    Stream(usize),
    Closed,
}

/// The most a lingering close reads (and discards) before it closes anyway.
const LINGER_BYTES: usize = 1 << 20;

impl Reader {
    /// A lingering close: reads and discards what the peer still sends, until it closes, [`LINGER_BYTES`]
    /// or `limit` pass. Had the socket closed with the client's requests still unread, the kernel would
    /// answer with a reset, and a reset makes the client's kernel throw away what it has not read yet,
    /// the KICK that says why among it.
    pub(crate) async fn linger(&mut self, limit: Duration) {
        let max = LINGER_BYTES;
        let mut buf = BytesMut::new();
        let mut seen = 0;
        let _ = tokio::time::timeout(limit, async {
            while seen < max {
                buf.clear();
                match self.read(&mut buf).await {
                    Ok(Inbound::Closed) | Err(_) => return,
                    Ok(Inbound::Message(b)) => seen += b.len(),
                    Ok(Inbound::Stream(n)) => seen += n.max(1),
                }
            }
        })
        .await;
    }

    /// Cancel-safe: either nothing was consumed or the result is returned.
    pub(crate) async fn read(&mut self, tcp_buf: &mut BytesMut) -> Result<Inbound, ReadError> {
        match self {
            Reader::Ws(s) => loop {
                match s.next().await {
                    None | Some(Ok(WsMessage::Close(_))) => return Ok(Inbound::Closed),
                    Some(Ok(WsMessage::Binary(b))) => return Ok(Inbound::Message(b)),
                    // Pomelo's ws server hands text frames to the same decoder.
                    Some(Ok(WsMessage::Text(t))) => return Ok(Inbound::Message(Bytes::from(t))),
                    Some(Ok(_)) => continue, // ping/pong are answered by tungstenite
                    Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                        return Err(ReadError::Reset("websocket: closed without a close frame".into()))
                    }
                    Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(Inbound::Closed),
                    Some(Err(WsError::Io(e))) => return Err(io_error("websocket", e)),
                    Some(Err(e @ (WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_)))) => {
                        return Err(ReadError::Malformed(format!("websocket: {e}")))
                    }
                    Some(Err(e)) => return Err(ReadError::Io(format!("websocket: {e}"))),
                }
            },
            Reader::Tcp(r) => loop {
                // An idle connection holds no read buffer: wait for readiness, then read into the stack
                // and keep only the bytes that arrived (or into room a partial package reserved).
                r.readable().await.map_err(|e| io_error("tcp", e))?;
                match try_read_tcp(r, tcp_buf) {
                    Ok(0) => return Ok(Inbound::Closed),
                    Ok(n) => return Ok(Inbound::Stream(n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io_error("tcp", e)),
                }
            },
            Reader::TlsTcp(r, early) => {
                if !early.is_empty() {
                    let n = early.len();
                    tcp_buf.extend_from_slice(&early.split());
                    return Ok(Inbound::Stream(n));
                }
                if tcp_buf.capacity() - tcp_buf.len() < READ_CHUNK {
                    tcp_buf.reserve(READ_CHUNK);
                }
                match r.read_buf(tcp_buf).await {
                    Ok(0) => Ok(Inbound::Closed),
                    Ok(n) => Ok(Inbound::Stream(n)),
                    Err(e) => Err(io_error("tls", e)),
                }
            }
        }
    }
}

/// One non-blocking read, appended to `buf`. Not async, so the stack chunk is never part of a future.
fn try_read_tcp(r: &OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() >= READ_CHUNK {
        return r.try_read_buf(buf);
    }
    let mut chunk = [0u8; READ_CHUNK];
    let n = r.try_read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Bytes one TCP read takes at most when the buffer has no room reserved.
const READ_CHUNK: usize = 4096;

/// The write side of a connection.
pub(crate) enum Writer {
    Ws(SplitSink<Ws, WsMessage>),
    Tcp(OwnedWriteHalf),
    TlsTcp(WriteHalf<Stream>),
}

impl Writer {
    /// Writes one batch of whole packages: binary WebSocket messages of at most `max_message` bytes cut
    /// at package boundaries (a single larger package is one message of its own), or one TCP write.
    pub(crate) async fn write(&mut self, batch: Bytes, max_message: usize) -> Result<(), String> {
        match self {
            Writer::Ws(s) => {
                for piece in pomelo_proto::wire::package::split_at_packages(batch, max_message) {
                    s.feed(WsMessage::Binary(piece)).await.map_err(|e| format!("websocket: {e}"))?;
                }
                s.flush().await.map_err(|e| format!("websocket: {e}"))
            }
            Writer::Tcp(w) => w.write_all(&batch).await.map_err(|e| format!("tcp: {e}")),
            Writer::TlsTcp(w) => {
                w.write_all(&batch).await.map_err(|e| format!("tls: {e}"))?;
                w.flush().await.map_err(|e| format!("tls: {e}"))
            }
        }
    }

    pub(crate) async fn close(&mut self) {
        // Best effort: the peer may be gone already.
        let _ = match self {
            Writer::Ws(s) => s.close().await.map_err(|_| ()),
            Writer::Tcp(w) => w.shutdown().await.map_err(|_| ()),
            Writer::TlsTcp(w) => w.shutdown().await.map_err(|_| ()),
        };
    }
}

pub(crate) fn split(accepted: Accepted) -> Option<(Reader, Writer)> {
    match accepted {
        Accepted::WebSocket(ws) => {
            let (w, r) = (*ws).split();
            Some((Reader::Ws(r), Writer::Ws(w)))
        }
        Accepted::Tcp(s) => {
            // Packages are small and latency matters more than segment count.
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            Some((Reader::Tcp(r), Writer::Tcp(w)))
        }
        Accepted::TlsTcp(s, early) => {
            let (r, w) = tokio::io::split(*s);
            Some((Reader::TlsTcp(r, early), Writer::TlsTcp(w)))
        }
        Accepted::HttpAnswered => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_heads() {
        let h =
            parse_head("GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13").unwrap();
        assert_eq!((h.method, h.path), ("GET", "/chat?x=1"));
        assert_eq!(h.header("upgrade"), Some("WebSocket"));
        assert_eq!(h.header("sec-websocket-version"), Some("13"));
        assert!(parse_head("GET /").is_none());
        assert!(parse_head("GET / SPDY").is_none());
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nxx"), Some(14));
    }
}
