//! The bounded outbound queue of one session.
//!
//! Producers (the connection task, handlers, fan-out from other tasks) push pre-encoded packages without
//! blocking; a push that would pass the package or byte cap fails, and the caller kicks the session.
//! One writer task per connection takes everything queued as one batch, writes it, and only then
//! releases the batch's bytes, so the cap covers what is queued *and* what is being written. Close lets
//! the writer drain what is left; abort drops it; `replace_with_last` drops the backlog but keeps one
//! last package (a KICK saying why). No task of its own.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::metrics::{self, FrontendMetrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("outbound queue is full")]
    Full,
    #[error("session is closed")]
    Closed,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Bytes>,
    /// Bytes queued plus bytes handed to the writer and not yet written.
    bytes: usize,
    closed: bool,
    aborted: bool,
}

#[derive(Debug)]
pub(crate) struct OutQueue {
    state: Mutex<State>,
    ready: Notify,
    max_packages: usize,
    max_bytes: usize,
    max_batch: usize,
    metrics: Arc<FrontendMetrics>,
}

impl OutQueue {
    pub(crate) fn new(max_packages: usize, max_bytes: usize, max_batch: usize, metrics: Arc<FrontendMetrics>) -> Self {
        OutQueue { state: Mutex::default(), ready: Notify::new(), max_packages, max_bytes, max_batch, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain counters inconsistent enough to matter.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one or more whole packages.
    pub(crate) fn push(&self, pkg: Bytes) -> Result<(), PushError> {
        self.push_inner(pkg, false)
    }

    /// Queues a last package (the KICK) past the caps, then closes the queue: bounded by one package.
    pub(crate) fn push_last(&self, pkg: Bytes) {
        let _ = self.push_inner(pkg, true);
        self.close();
    }

    fn push_inner(&self, pkg: Bytes, force: bool) -> Result<(), PushError> {
        let len = pkg.len();
        {
            let mut s = self.lock();
            if s.closed || s.aborted {
                return Err(PushError::Closed);
            }
            if !force && (s.items.len() >= self.max_packages || s.bytes + len > self.max_bytes) {
                return Err(PushError::Full);
            }
            s.items.push_back(pkg);
            s.bytes += len;
            self.metrics.outbound_queue_peak_bytes.fetch_max(s.bytes as u64, Ordering::Relaxed);
        }
        metrics::add(&self.metrics.outbound_queued_bytes, len);
        self.ready.notify_one();
        Ok(())
    }

    /// Drops everything queued (not the batch the writer holds), queues `pkg` past the caps and closes:
    /// the writer finishes its batch, if the peer takes it, then sends `pkg` (a queue-full KICK).
    pub(crate) fn replace_with_last(&self, pkg: Bytes) {
        let dropped = {
            let mut s = self.lock();
            let queued: usize = s.items.drain(..).map(|b| b.len()).sum();
            s.bytes -= queued;
            queued
        };
        metrics::sub(&self.metrics.outbound_queued_bytes, dropped);
        self.push_last(pkg);
    }

    /// No more pushes; the writer drains what is queued and then ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Drops everything queued; the writer ends as soon as it looks.
    pub(crate) fn abort(&self) {
        let dropped = {
            let mut s = self.lock();
            s.aborted = true;
            s.closed = true;
            let queued: usize = s.items.drain(..).map(|b| b.len()).sum();
            s.bytes -= queued;
            queued
        };
        metrics::sub(&self.metrics.outbound_queued_bytes, dropped);
        self.ready.notify_one();
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.lock().aborted
    }

    /// Waits for work: the next batch (every queued package, coalesced up to `max_batch` bytes; a single
    /// package is passed through without copying), or `None` once closed and drained, or aborted.
    pub(crate) async fn next_batch(&self) -> Option<(Bytes, usize)> {
        loop {
            {
                let mut s = self.lock();
                if s.aborted {
                    return None;
                }
                if let Some(first) = s.items.pop_front() {
                    let mut count = 1;
                    if s.items.front().is_none_or(|b| first.len() + b.len() > self.max_batch) {
                        return Some((first, count));
                    }
                    let mut buf = BytesMut::with_capacity(self.max_batch.min(s.bytes));
                    buf.extend_from_slice(&first);
                    while let Some(next) = s.items.front() {
                        if buf.len() + next.len() > self.max_batch {
                            break;
                        }
                        buf.extend_from_slice(next);
                        s.items.pop_front();
                        count += 1;
                    }
                    return Some((buf.freeze(), count));
                }
                if s.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// The writer wrote `n` bytes of a batch: release them from the cap.
    pub(crate) fn written(&self, n: usize) {
        let mut s = self.lock();
        let n = n.min(s.bytes);
        s.bytes -= n;
        drop(s);
        metrics::sub(&self.metrics.outbound_queued_bytes, n);
    }

    /// Releases whatever is still counted (a dropped connection's unwritten batch).
    pub(crate) fn release_all(&self) {
        let n = {
            let mut s = self.lock();
            s.items.clear();
            std::mem::take(&mut s.bytes)
        };
        metrics::sub(&self.metrics.outbound_queued_bytes, n);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn q(pk: usize, bytes: usize) -> OutQueue {
        OutQueue::new(pk, bytes, 10, Arc::new(FrontendMetrics::new()))
    }

    #[tokio::test]
    async fn caps_count_packages_and_bytes_until_written() {
        let q = q(3, 12);
        q.push(Bytes::from_static(b"aaaa")).unwrap();
        q.push(Bytes::from_static(b"bbbb")).unwrap();
        q.push(Bytes::from_static(b"cccc")).unwrap();
        assert_eq!(q.push(Bytes::from_static(b"d")), Err(PushError::Full));
        let (batch, n) = q.next_batch().await.unwrap();
        assert_eq!((&batch[..], n), (&b"aaaabbbb"[..], 2));
        // Still counted while being written.
        assert_eq!(q.push(Bytes::from_static(b"d")), Err(PushError::Full));
        q.written(batch.len());
        q.push(Bytes::from_static(b"dddd")).unwrap();
        let (batch, _) = q.next_batch().await.unwrap();
        assert_eq!(&batch[..], b"ccccdddd");
        assert_eq!(q.metrics.outbound_queue_peak_bytes.load(Ordering::Relaxed), 12);
    }

    #[tokio::test]
    async fn close_drains_and_abort_drops() {
        let q = q(10, 100);
        q.push(Bytes::from_static(b"x")).unwrap();
        q.push_last(Bytes::from_static(b"kick"));
        assert_eq!(q.push(Bytes::from_static(b"y")), Err(PushError::Closed));
        assert_eq!(&q.next_batch().await.unwrap().0[..], b"xkick");
        assert!(q.next_batch().await.is_none());
        let q2 = super::tests::q(10, 100);
        q2.push(Bytes::from_static(b"x")).unwrap();
        q2.abort();
        assert!(q2.next_batch().await.is_none());
        assert_eq!(q2.metrics.outbound_queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn replace_with_last_drops_the_backlog_but_keeps_the_kick() {
        let q = q(3, 12);
        q.push(Bytes::from_static(b"aaaa")).unwrap();
        let (batch, _) = q.next_batch().await.unwrap();
        q.push(Bytes::from_static(b"bbbb")).unwrap();
        q.push(Bytes::from_static(b"cccc")).unwrap();
        assert_eq!(q.push(Bytes::from_static(b"d")), Err(PushError::Full));
        q.replace_with_last(Bytes::from_static(b"kick"));
        q.written(batch.len());
        assert_eq!(&q.next_batch().await.unwrap().0[..], b"kick");
        assert!(q.next_batch().await.is_none());
        q.written(4);
        assert_eq!(q.metrics.outbound_queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn writer_wakes_on_push() {
        let q = Arc::new(q(10, 100));
        let q2 = q.clone();
        let t = tokio::spawn(async move { q2.next_batch().await.map(|b| b.0) });
        tokio::task::yield_now().await;
        q.push(Bytes::from_static(b"hi")).unwrap();
        assert_eq!(&t.await.unwrap().unwrap()[..], b"hi");
    }
}
