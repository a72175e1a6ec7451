//! What one connection has read but not yet acted on, and the per-session request rate.
//!
//! [`Intake`] holds the bytes of one read (one WebSocket message, or what a TCP read brought) and
//! decodes them a few packages at a time, so a read carrying thousands of requests is dispatched as
//! the in-flight cap allows, never all at once; the connection reads again only once it is empty, so it
//! never holds more than one read. [`RateLimit`] is a token bucket that says when a session has sent more
//! requests per second than it may. Plain data, no I/O, no tasks; dropped with the connection.

use std::collections::VecDeque;

use bytes::BytesMut;
use pomelo_proto::wire::{Decoded, Package, PackageDecoder, PackageError};
use tokio::time::Instant;

/// Packages decoded ahead of dispatch at most: enough to keep the in-flight cap busy.
const DECODE_AHEAD: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IntakeError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("{0} bytes of a truncated package at the end of a websocket message")]
    Truncated(usize),
}

/// The undispatched part of the last read.
#[derive(Debug, Default)]
pub(crate) struct Intake {
    /// Bytes not yet decoded: the rest of a WebSocket message, or of the TCP stream (which may end in
    /// a partial package).
    buf: BytesMut,
    /// `buf` holds the rest of one WebSocket message, which must end on a package boundary.
    message: bool,
    decoded: VecDeque<Package>,
}

impl Intake {
    /// The buffer a TCP read appends to.
    pub(crate) fn tcp_buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Takes one WebSocket message; only called when [`Intake::is_drained`].
    pub(crate) fn message(&mut self, bytes: &[u8]) {
        self.buf = BytesMut::from(bytes);
        self.message = true;
    }

    /// Nothing decoded is waiting and no whole package is left in the buffer: time to read again.
    pub(crate) fn is_drained(&self) -> bool {
        self.decoded.is_empty() && (self.buf.is_empty() || !self.message && !self.has_whole_package())
    }

    fn has_whole_package(&self) -> bool {
        let Some(h) = self.buf.get(..4) else { return false };
        self.buf.len() >= 4 + u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize
    }

    /// The next package to act on, without taking it; decodes a few more when none is waiting.
    pub(crate) fn peek(&mut self, decoder: &PackageDecoder) -> Result<Option<&Package>, IntakeError> {
        if self.decoded.is_empty() {
            self.decode_ahead(decoder)?;
        }
        Ok(self.decoded.front())
    }

    pub(crate) fn pop(&mut self) -> Option<Package> {
        self.decoded.pop_front()
    }

    fn decode_ahead(&mut self, decoder: &PackageDecoder) -> Result<(), IntakeError> {
        while self.decoded.len() < DECODE_AHEAD {
            match decoder.decode(&mut self.buf)? {
                Decoded::Package(p) => self.decoded.push_back(p),
                // What was decoded before the truncated tail is acted on first.
                Decoded::NeedMore if self.message && !self.buf.is_empty() && self.decoded.is_empty() => {
                    return Err(IntakeError::Truncated(self.buf.len()))
                }
                Decoded::NeedMore => break,
            }
        }
        if self.buf.is_empty() {
            // Give the allocation back (once the packages are dropped) while idle.
            self.buf = BytesMut::new();
            self.message = false;
        }
        Ok(())
    }
}

/// A token bucket: `rate` requests per second, and a burst of as many.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(rate: u32, now: Instant) -> RateLimit {
        RateLimit { rate: rate as f64, tokens: rate as f64, last: now }
    }

    /// Takes one request's token; `false` when the session is over its rate.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use pomelo_proto::wire::{package, PackageType};

    use super::*;

    fn beats(n: usize) -> Vec<u8> {
        (0..n).flat_map(|_| package::empty(PackageType::Heartbeat).to_vec()).collect()
    }

    #[test]
    fn a_big_message_is_decoded_a_few_packages_at_a_time() {
        let d = PackageDecoder::default();
        let mut i = Intake::default();
        assert!(i.is_drained());
        i.message(&beats(1000));
        assert!(!i.is_drained());
        let mut n = 0;
        while i.peek(&d).unwrap().is_some() {
            assert!(i.decoded.len() <= DECODE_AHEAD);
            i.pop();
            n += 1;
        }
        assert_eq!(n, 1000);
        assert!(i.is_drained());
    }

    #[test]
    fn a_truncated_message_is_an_error_but_a_tcp_tail_waits() {
        let d = PackageDecoder::default();
        let mut i = Intake::default();
        let mut bytes = beats(1);
        bytes.extend_from_slice(&[4, 0, 0, 9, 1]);
        i.message(&bytes);
        assert!(i.peek(&d).unwrap().is_some());
        i.pop();
        assert_eq!(i.peek(&d).map(|p| p.is_some()), Err(IntakeError::Truncated(5)));
        let mut t = Intake::default();
        t.tcp_buf().extend_from_slice(&bytes);
        assert!(t.peek(&d).unwrap().is_some());
        t.pop();
        assert!(t.peek(&d).unwrap().is_none());
        assert!(t.is_drained(), "a partial package: read more");
        t.tcp_buf().extend_from_slice(&[0; 8]);
        assert!(!t.is_drained());
        assert!(t.peek(&d).unwrap().is_some());
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        assert!((0..10).all(|_| r.take(t0)));
        assert!(!r.take(t0));
        assert!(!r.take(t0 + Duration::from_millis(50)));
        assert!(r.take(t0 + Duration::from_millis(160)));
        assert!(!r.take(t0 + Duration::from_millis(160)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| r.take(later)).count(), 10, "the burst never exceeds one second's worth");
    }
}
