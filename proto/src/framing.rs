//! Length-delimited JSON frames with a size cap, for the control link and cluster RPC.
//!
//! A frame is a 4-byte big-endian length and a JSON document. Frames over the cap are refused on both
//! the read and the write side, so one bad peer cannot make a process allocate without bound.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Largest control or RPC frame (membership of a large cluster fits with room to spare).
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection closed")]
    Closed,
}

/// A framed JSON connection.
pub struct JsonFramed<T> {
    inner: Framed<T, LengthDelimitedCodec>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> JsonFramed<T> {
    pub fn new(io: T) -> Self {
        let codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec();
        JsonFramed { inner: Framed::new(io, codec) }
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
        tokio::io::AsyncWriteExt::write_all(&mut raw, &((MAX_FRAME as u32) + 1).to_be_bytes()).await.expect("write");
        assert!(matches!(c.recv::<ToWorker>().await, Err(FrameError::Io(_))));
    }
}
