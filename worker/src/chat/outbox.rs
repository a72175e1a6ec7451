//! A link's outbox, bounded by frames *and* bytes: what the rooms task has queued for one connector and
//! the link's writer has not yet written. A chat server's frames range from a 30-byte answer to a 256 KiB
//! merged batch or a large room's user list, so a count alone (16k frames) would let one slow connector
//! hold gigabytes; the byte budget caps that. A frame that does not fit is refused (the caller counts it
//! as dropped); one frame is always accepted into an empty outbox, so no single frame can be refused for
//! ever. No task of its own: the writer's `recv` gives the bytes back to the budget.
//!
//! A delivery that does not fit is not lost silently: its sessions are remembered ([`Outbox::lost`],
//! at most [`MAX_LOST`]) and the writer tells the connector ([`OutboxRx::take_lost`], a `Lost` frame),
//! which kicks them with a reason; they come back with `since` and recover from the room's history.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Bytes one connector's outbox may hold (frames queued, not yet written to the socket).
pub const OUTBOX_BYTES: usize = 64 << 20;

/// Sessions with dropped deliveries remembered per link until the connector is told.
pub const MAX_LOST: usize = 100_000;

type LostSet = Arc<Mutex<HashSet<u64>>>;

fn lock(l: &LostSet) -> std::sync::MutexGuard<'_, HashSet<u64>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    cap: usize,
    lost: LostSet,
    ask: Ask,
}

pub struct WeakOutbox {
    tx: mpsc::WeakSender<Bytes>,
    queued: Arc<AtomicUsize>,
    cap: usize,
    lost: LostSet,
    ask: Ask,
}

pub struct OutboxRx {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
    lost: LostSet,
    ask: Ask,
}

/// A control frame that must reach the connector even when the outbox is full: kept here and written
/// after the writer's next batch ([`OutboxRx::take_ask`]).
type Ask = Arc<Mutex<Option<Bytes>>>;

/// An outbox of at most `frames` frames and about `bytes` bytes, and its receiving end.
pub fn outbox(frames: usize, bytes: usize) -> (Outbox, OutboxRx) {
    let (tx, rx) = mpsc::channel(frames);
    let queued = Arc::new(AtomicUsize::new(0));
    let (lost, ask) = (LostSet::default(), Ask::default());
    let tx = Outbox { tx, queued: queued.clone(), cap: bytes, lost: lost.clone(), ask: ask.clone() };
    (tx, OutboxRx { rx, queued, lost, ask })
}

impl Outbox {
    /// Queues `frame` if both budgets allow; gives it back if not (or if the link is gone).
    pub fn try_send(&self, frame: Bytes) -> Result<(), Bytes> {
        let n = frame.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.cap {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(frame);
        }
        self.tx.try_send(frame).map_err(|e| {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f,
            }
        })
    }

    /// Deliveries to `sessions` were dropped: remember them for the writer to report.
    pub fn lost(&self, sessions: &[u64]) {
        let mut l = lock(&self.lost);
        for id in sessions {
            if l.len() >= MAX_LOST {
                break;
            }
            l.insert(*id);
        }
    }

    /// Queues `frame` (a request to the connector, newest wins) so that it is never dropped: when the
    /// outbox is full it waits beside it for the writer, which is busy with what is queued.
    pub fn ask(&self, frame: Bytes) {
        if let Err(frame) = self.try_send(frame) {
            *self.ask.lock().unwrap_or_else(|p| p.into_inner()) = Some(frame);
        }
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn downgrade(&self) -> WeakOutbox {
        let (queued, lost, ask) = (self.queued.clone(), self.lost.clone(), self.ask.clone());
        WeakOutbox { tx: self.tx.downgrade(), queued, cap: self.cap, lost, ask }
    }
}

impl WeakOutbox {
    pub fn upgrade(&self) -> Option<Outbox> {
        let (queued, lost, ask) = (self.queued.clone(), self.lost.clone(), self.ask.clone());
        Some(Outbox { tx: self.tx.upgrade()?, queued, cap: self.cap, lost, ask })
    }
}

impl OutboxRx {
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// The sessions whose deliveries were dropped since the last call (sorted), to tell the connector.
    pub fn take_lost(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::mem::take(&mut *lock(&self.lost)).into_iter().collect();
        v.sort_unstable();
        v
    }

    /// The request [`Outbox::ask`] could not queue, if any.
    pub fn take_ask(&self) -> Option<Bytes> {
        self.ask.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_and_frames_are_both_bounded_and_an_empty_outbox_takes_any_frame() {
        let (tx, mut rx) = outbox(4, 100);
        assert!(tx.try_send(Bytes::from(vec![0; 300])).is_ok(), "one frame always fits an empty outbox");
        assert!(tx.try_send(Bytes::from_static(b"x")).is_err(), "over the byte budget");
        assert_eq!(rx.recv().await.map(|b| b.len()), Some(300));
        assert_eq!(tx.queued(), 0);
        for _ in 0..2 {
            tx.try_send(Bytes::from(vec![0; 40])).expect("80 of 100 bytes");
        }
        assert!(tx.try_send(Bytes::from(vec![0; 40])).is_err(), "120 > 100 bytes");
        assert_eq!(tx.queued(), 80, "a refused frame is not counted");
        for _ in 0..2 {
            tx.try_send(Bytes::from_static(b"y")).expect("small frames fit");
        }
        assert!(tx.try_send(Bytes::from_static(b"z")).is_err(), "over 4 frames");
        let mut got = 0;
        while rx.try_recv().is_some() {
            got += 1;
        }
        assert_eq!((got, tx.queued()), (4, 0));
        tx.lost(&[7, 3, 7]);
        tx.lost(&[9]);
        assert_eq!(rx.take_lost(), [3, 7, 9], "each session once");
        assert!(rx.take_lost().is_empty(), "told once");
        let many: Vec<u64> = (0..MAX_LOST as u64 + 10).collect();
        tx.lost(&many);
        assert_eq!(rx.take_lost().len(), MAX_LOST, "bounded");
        let weak = tx.downgrade();
        drop(tx);
        assert!(weak.upgrade().is_none(), "a weak outbox does not keep the link open");
    }
}
