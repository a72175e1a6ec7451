//! The WebSocket transport (`--transport ws`): the same Pomelo packages, carried in binary WebSocket
//! messages over the same connector port (the connector tells the two apart by the first byte).
//!
//! [`upgrade`] does the HTTP/1.1 upgrade on a dialled stream and checks `Sec-WebSocket-Accept`;
//! [`Ws::frame`] wraps outgoing bytes in one masked binary frame (clients must mask, RFC 6455 §5.3; the
//! key comes from a per-connection xorshift, which is all a load generator needs); [`next_frame`] splits
//! an incoming (unmasked) frame off a plain slice without allocating, the way `wire::next_package` does
//! for packages. Frame headers are parsed and written by tungstenite's `FrameHeader`. The payloads of
//! data frames are concatenated into the package stream, so a package split over frames or several
//! packages in one message both work. No tasks; the caller bounds every call with a timeout.

use std::io::Cursor;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data as WsData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

use crate::connect::write_all;
use crate::wire::MAX_BODY;

/// Largest HTTP response head accepted from the server.
const MAX_HEAD: usize = 8 * 1024;

/// Which transport the clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Ws,
}

/// The WebSocket state of one connection.
#[derive(Debug)]
pub struct Ws {
    /// Bytes of an incomplete frame, kept between reads.
    pub raw: Vec<u8>,
    /// The masking key generator's state (never zero).
    rng: u64,
    /// Reused buffer a frame is built in.
    pub frame_buf: Vec<u8>,
}

/// The next value of a xorshift64 generator (`state` never zero): all the randomness a load generator
/// needs, for masking keys and retry jitter.
pub fn xorshift64(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

impl Ws {
    pub fn new(seed: u64) -> Ws {
        Ws { raw: Vec::new(), rng: seed | 1, frame_buf: Vec::new() }
    }

    fn next_key(&mut self) -> [u8; 4] {
        (xorshift64(&mut self.rng) as u32).to_le_bytes()
    }

    /// Builds one masked frame of `payload` in `frame_buf` and returns it.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) -> &[u8] {
        let key = self.next_key();
        let header = FrameHeader { is_final: true, opcode, mask: Some(key), ..FrameHeader::default() };
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.clear();
        // Writing into a Vec cannot fail.
        let _ = header.format(payload.len() as u64, &mut buf);
        let start = buf.len();
        buf.extend_from_slice(payload);
        for (i, b) in buf[start..].iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
        self.frame_buf = buf;
        &self.frame_buf
    }

    /// The pong answering a ping with payload `p`.
    pub fn pong(&mut self, p: &[u8]) -> &[u8] {
        self.frame(OpCode::Control(Control::Pong), p)
    }

    /// One masked binary frame carrying `packages`.
    pub fn binary(&mut self, packages: &[u8]) -> &[u8] {
        self.frame(OpCode::Data(WsData::Binary), packages)
    }
}

/// A frame split off the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The payload of a binary, text or continuation frame: package bytes.
    Data(&'a [u8]),
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong or a reserved control frame: nothing to do.
    Ignored,
    /// The server closes the WebSocket.
    Close,
}

/// The next whole frame in `buf` and the bytes it took; `Ok(None)` if more bytes are needed.
pub fn next_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
    let mut cursor = Cursor::new(buf);
    let Some((header, len)) = FrameHeader::parse(&mut cursor).map_err(|e| format!("websocket frame: {e}"))? else {
        return Ok(None);
    };
    if header.mask.is_some() {
        return Err("websocket: the server sent a masked frame".into());
    }
    if len > MAX_BODY as u64 {
        return Err(format!("websocket: a {len}-byte frame (at most {MAX_BODY})"));
    }
    let start = cursor.position() as usize;
    let end = start + len as usize;
    let Some(payload) = buf.get(start..end) else { return Ok(None) };
    let frame = match header.opcode {
        OpCode::Data(WsData::Binary | WsData::Text | WsData::Continue) => Frame::Data(payload),
        OpCode::Data(WsData::Reserved(op)) => return Err(format!("websocket: reserved opcode {op}")),
        OpCode::Control(Control::Ping) => Frame::Ping(payload),
        OpCode::Control(Control::Close) => Frame::Close,
        OpCode::Control(_) => Frame::Ignored,
    };
    Ok(Some((frame, end)))
}

/// The HTTP upgrade on a dialled stream. Returns the bytes that came after the response head (the
/// start of the first frame, if the server sent one at once).
pub async fn upgrade(stream: &TcpStream, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let key = generate_key();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    write_all(stream, None, req.as_bytes()).await.map_err(|e| format!("upgrade request: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err("upgrade: response head over 8 KiB".into());
        }
        stream.readable().await.map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 1024];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err("upgrade: closed by the server".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim().to_owned());
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(format!("upgrade: wrong Sec-WebSocket-Accept {accept:?}"));
    }
    Ok(buf[head_end + 4..].to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Unmasks a client frame the way a server does.
    fn unmask(frame: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut c = Cursor::new(frame);
        let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
        let start = c.position() as usize;
        let key = h.mask.unwrap();
        let body = frame[start..start + len as usize].iter().enumerate().map(|(i, b)| b ^ key[i & 3]).collect();
        (h, body)
    }

    #[test]
    fn client_frames_are_masked_binary_and_round_trip() {
        let mut ws = Ws::new(42);
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let a = ws.binary(&payload).to_vec();
        let (h, body) = unmask(&a);
        assert!(h.is_final);
        assert_eq!(h.opcode, OpCode::Data(WsData::Binary));
        assert_eq!(body, payload);
        assert_ne!(&a[a.len() - 300..], &payload[..], "the payload went out masked");
        let b = ws.binary(&payload).to_vec();
        assert_ne!(unmask(&b).0.mask, h.mask, "every frame has its own key");
    }

    #[test]
    fn server_frames_split_off_a_slice() {
        let mut buf = Vec::new();
        let bin = FrameHeader { opcode: OpCode::Data(WsData::Binary), ..FrameHeader::default() };
        bin.format(3, &mut buf).unwrap();
        buf.extend_from_slice(&[3, 0, 0]);
        let ping = FrameHeader { opcode: OpCode::Control(Control::Ping), ..FrameHeader::default() };
        ping.format(2, &mut buf).unwrap();
        buf.extend_from_slice(b"hi");
        let close = FrameHeader::default();
        close.format(0, &mut buf).unwrap();
        let (f, n) = next_frame(&buf).unwrap().unwrap();
        assert_eq!((f, n), (Frame::Data(&[3, 0, 0]), 5));
        let (f, n2) = next_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!(f, Frame::Ping(b"hi"));
        assert_eq!(next_frame(&buf[n + n2..]).unwrap().unwrap().0, Frame::Close);
        assert_eq!(next_frame(&buf[..4]).unwrap(), None, "a partial payload waits");
        assert_eq!(next_frame(&buf[..1]).unwrap(), None, "a partial header waits");
        let masked = Ws::new(1).binary(b"x").to_vec();
        assert!(next_frame(&masked).is_err(), "a masked server frame is an error");
    }

    /// A one-shot server on 127.0.0.1 that reads the upgrade request and answers with `reply(key)`.
    async fn serve_once(reply: fn(&str) -> String) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut b = [0u8; 256];
                let n = s.read(&mut b).await.unwrap();
                head.extend_from_slice(&b[..n]);
            }
            let head = String::from_utf8(head).unwrap();
            let key = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap().trim().to_owned();
            s.write_all(reply(&key).as_bytes()).await.unwrap();
            // Keep the socket open until the client has read the reply.
            let _ = s.read(&mut [0u8; 1]).await;
        });
        addr
    }

    #[tokio::test]
    async fn upgrade_checks_the_status_and_the_accept_key() {
        let good = |key: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n\x02\x01",
                derive_accept_key(key.as_bytes())
            )
        };
        let addr = serve_once(good).await;
        let s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(upgrade(&s, addr).await.unwrap(), vec![0x02, 0x01], "bytes after the head are kept");

        let wrong_key = |_: &str| "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n".to_owned();
        let addr = serve_once(wrong_key).await;
        let s = TcpStream::connect(addr).await.unwrap();
        assert!(upgrade(&s, addr).await.unwrap_err().contains("Sec-WebSocket-Accept"));

        let refused = |_: &str| "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_owned();
        let addr = serve_once(refused).await;
        let s = TcpStream::connect(addr).await.unwrap();
        assert!(upgrade(&s, addr).await.unwrap_err().contains("400"));
    }
}
