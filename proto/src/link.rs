//! The links between pomelo-rs processes: their frame codecs, the one frame error, and the accept loop
//! every listener runs.
//!
//! - A frame is a 4-byte big-endian length and a body. [`control_codec`] (master ↔ worker, JSON bodies
//!   through [`JsonFramed`]) caps a frame at [`CONTROL_MAX_FRAME`]; [`cluster_codec`] (connector ↔ chat
//!   server, bodies as in [`crate::cluster`]) at [`CLUSTER_MAX_FRAME`]. Frames over the cap are refused on
//!   both the read and the write side, so one bad peer cannot make a process allocate without bound.
//! - [`FrameError`] is what reading or decoding a frame of either kind can fail with. Its text quotes
//!   what the peer sent (serde names the unknown variant), so it goes through [`printable`]: a frame
//!   cannot write a log line of its own.
//! - [`accept_loop`] accepts connections until its token is cancelled and hands each one to a callback; an
//!   accept error (usually EMFILE) is logged and retried after a short back-off instead of spinning. It
//!   spawns nothing itself: the callback decides where a connection's task runs, and the loop returns
//!   (dropping the listener) as soon as the token is cancelled.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Largest control frame (membership of a large cluster fits with room to spare).
pub const CONTROL_MAX_FRAME: usize = 4 << 20;
/// Largest cluster frame: a delivery to every session of a big room with a large message fits.
pub const CLUSTER_MAX_FRAME: usize = 8 << 20;

/// How long [`accept_loop`] waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The codec of the control link (master ↔ worker).
pub fn control_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(CONTROL_MAX_FRAME).new_codec()
}

/// The codec of a cluster RPC link (connector ↔ chat server).
pub fn cluster_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(CLUSTER_MAX_FRAME).new_codec()
}

/// Why a frame could not be read or decoded, on either kind of link.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {}", printable(&.0.to_string()))]
    Json(#[from] serde_json::Error),
    #[error("connection closed")]
    Closed,
    #[error("empty frame")]
    Empty,
    #[error("unknown frame tag {0:#04x}")]
    Tag(u8),
    #[error("truncated delivery frame")]
    Truncated,
}

/// `s` with control and bidirectional-override characters escaped (`\n`, `\u{202e}`), for logging text
/// a peer chose.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return s.into();
    }
    s.chars().map(|c| if bad(c) { c.escape_default().to_string() } else { c.to_string() }).collect::<String>().into()
}

/// A framed JSON connection (the control link).
pub struct JsonFramed<T> {
    inner: Framed<T, LengthDelimitedCodec>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> JsonFramed<T> {
    pub fn new(io: T) -> Self {
        JsonFramed { inner: Framed::new(io, control_codec()) }
    }

    /// A link still in its handshake: frames are capped at [`crate::auth::HANDSHAKE_MAX_FRAME`] until
    /// [`JsonFramed::authenticated`].
    pub fn handshake(io: T) -> Self {
        let mut framed = Self::new(io);
        framed.inner.codec_mut().set_max_frame_length(crate::auth::HANDSHAKE_MAX_FRAME);
        framed
    }

    /// The peer proved itself: frames up to [`CONTROL_MAX_FRAME`] from now on.
    pub fn authenticated(&mut self) {
        self.inner.codec_mut().set_max_frame_length(CONTROL_MAX_FRAME);
    }

    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), FrameError> {
        let bytes = serde_json::to_vec(msg)?;
        self.inner.send(Bytes::from(bytes)).await?;
        Ok(())
    }

    /// The next message; `Err(Closed)` at a clean end of stream.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<M, FrameError> {
        match self.inner.next().await {
            Some(frame) => Ok(serde_json::from_slice(&frame?)?),
            None => Err(FrameError::Closed),
        }
    }
}

/// Accepts on `listener` until `shutdown` is cancelled, calling `on_conn` for every connection. `what`
/// names the listener in the warning logged when an accept fails.
pub async fn accept_loop<F>(listener: TcpListener, shutdown: CancellationToken, what: &str, mut on_conn: F)
where
    F: FnMut(TcpStream, SocketAddr),
{
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => on_conn(stream, peer),
            Err(e) => {
                // Usually EMFILE; back off instead of spinning.
                tracing::warn!("{what} accept failed: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Membership, ToWorker};

    #[tokio::test]
    async fn round_trips_and_refuses_oversized_frames() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = JsonFramed::new(a);
        let mut b = JsonFramed::new(b);
        let msg = ToWorker::Membership(Membership { epoch: 1, version: 7, servers: vec![] });
        a.send(&msg).await.expect("send");
        assert_eq!(b.recv::<ToWorker>().await.expect("recv"), msg);

        // A peer that announces a frame over the cap is refused before the body is read.
        let (raw, c) = tokio::io::duplex(64);
        let mut c = JsonFramed::new(c);
        let mut raw = raw;
        tokio::io::AsyncWriteExt::write_all(&mut raw, &((CONTROL_MAX_FRAME as u32) + 1).to_be_bytes())
            .await
            .expect("write");
        assert!(matches!(c.recv::<ToWorker>().await, Err(FrameError::Io(_))));
    }

    #[test]
    fn a_malformed_frame_error_cannot_break_a_log_line() {
        let e = serde_json::from_str::<ToWorker>(r#"{"t":"x\nFORGED \u202e"}"#).expect_err("unknown variant");
        let text = FrameError::from(e).to_string();
        assert!(!text.contains('\n') && !text.contains('\u{202e}'), "{text}");
        assert!(text.contains(r"x\nFORGED \u{202e}"), "{text}");
        assert_eq!(printable("chat-1 `ok`"), "chat-1 `ok`");
    }

    #[tokio::test]
    async fn cluster_frames_have_the_larger_cap() {
        let (raw, c) = tokio::io::duplex(64);
        let mut c = Framed::new(c, cluster_codec());
        let mut raw = raw;
        let len = (CONTROL_MAX_FRAME as u32) + 1;
        tokio::io::AsyncWriteExt::write_all(&mut raw, &len.to_be_bytes()).await.expect("write");
        tokio::io::AsyncWriteExt::write_all(&mut raw, b"Jx").await.expect("write");
        drop(raw);
        // Over the control cap but under the cluster cap: not refused for its size, only cut short.
        let err = c.next().await.expect("an item").expect_err("eof inside the frame");
        assert_ne!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn accept_loop_hands_over_connections_and_stops_on_cancel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(listener, stop.clone(), "test", move |_, peer| {
            let _ = tx.send(peer);
        }));
        let client = TcpStream::connect(addr).await.expect("connect");
        let peer = rx.recv().await.expect("handed over");
        assert_eq!(peer, client.local_addr().expect("local"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("no panic");
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed once the loop returns");
    }
}
