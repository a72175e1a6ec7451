//! Deliveries waiting to be sent, merged so that a connector gets one frame (and each session one write)
//! per room and batch instead of one per message, and the [`Pacer`] that decides when they go.
//!
//! Deliveries of the same room to the same connector with the same sessions are concatenated, in order.
//! A delivery whose sessions differ from the room's last batch on that connector (a join, a leave, a
//! private message) starts a new batch after it, so every session still sees its packages in order;
//! batches of different rooms never share a session (a session is in one room), so they may go in any
//! order. Batches are capped in bytes so a frame stays far below the cluster frame limit.
//!
//! Pacing works like Nagle's algorithm, per room and connector: a batch goes at once unless that pair
//! sent one less than `delay` ago; then it waits for the rest of `delay`, gathering what else comes.
//! A quiet room never waits; a busy one sends at most one frame per `delay`. While everything a pair
//! holds is joins (`onAdd`), the pair's pace is the longer `join_delay`: in a login storm a member
//! hears of many joins in one write instead of one write each (a write is a TCP segment, most of a
//! delivery's cost); a message or a leave arriving behind them takes them along at the message pace, in
//! order. A join in a quiet room still goes at once. Leaves keep the message pace: a page that still
//! lists someone who left may send them a private message that can only be refused. Plain data, no I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::room_table::Delivery;

/// Largest payload of one merged frame. A connector queues it for each session as one item: it must
/// stay within a session's queue cap (a larger item is refused and the session kicked), and the
/// connector's writer cuts it at package boundaries into WebSocket messages of `max_batch_bytes`.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Packages for some sessions of one connector.
#[derive(Debug)]
pub struct Batch {
    pub connector: Arc<str>,
    pub room: Arc<str>,
    pub sessions: Arc<[u64]>,
    pub payloads: Vec<Bytes>,
    bytes: usize,
}

impl Batch {
    /// Deliveries in this batch: packages times sessions.
    pub fn deliveries(&self) -> u64 {
        (self.payloads.len() * self.sessions.len()) as u64
    }
}

type Key = (Arc<str>, Arc<str>);

/// What is held for one (connector, room).
#[derive(Debug)]
struct Pair {
    /// Index of the pair's last batch.
    last: usize,
    /// Everything held is joins (`onAdd`): the pair may wait for the join pace.
    joins_only: bool,
}

#[derive(Debug, Default)]
pub struct Batches {
    batches: Vec<Batch>,
    pairs: HashMap<Key, Pair>,
    bytes: usize,
}

impl Batches {
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn add(&mut self, d: Delivery) {
        let bytes = d.payload.len();
        self.bytes += bytes;
        let key = (d.connector, d.room);
        let next = self.batches.len();
        match self.pairs.get_mut(&key) {
            Some(pair) => {
                pair.joins_only &= d.join;
                if let Some(b) = self.batches.get_mut(pair.last) {
                    let same = Arc::ptr_eq(&b.sessions, &d.sessions) || b.sessions == d.sessions;
                    if same && b.bytes + bytes <= MAX_BATCH_BYTES {
                        b.bytes += bytes;
                        b.payloads.push(d.payload);
                        return;
                    }
                }
                pair.last = next;
            }
            None => {
                self.pairs.insert(key.clone(), Pair { last: next, joins_only: d.join });
            }
        }
        let (connector, room) = key;
        self.batches.push(Batch { connector, room, sessions: d.sessions, payloads: vec![d.payload], bytes });
    }

    /// The batches in the order they were started; empties the set.
    pub fn take(&mut self) -> Vec<Batch> {
        self.pairs.clear();
        self.bytes = 0;
        std::mem::take(&mut self.batches)
    }

    /// Takes every batch of the pairs `go` accepts (asked once per pair), in order; keeps the others.
    fn take_if(&mut self, mut go: impl FnMut(&Key, &Pair) -> bool) -> Vec<Batch> {
        self.pairs.retain(|key, pair| !go(key, pair));
        self.bytes = 0;
        let mut out = Vec::new();
        for b in std::mem::take(&mut self.batches) {
            match self.pairs.get_mut(&(b.connector.clone(), b.room.clone())) {
                None => out.push(b),
                Some(pair) => {
                    pair.last = self.batches.len();
                    self.bytes += b.bytes;
                    self.batches.push(b);
                }
            }
        }
        out
    }
}

/// When each (connector, room) last sent a batch, to send at most one per `delay` (per `join_delay`
/// while all it holds is joins).
#[derive(Debug)]
pub struct Pacer {
    delay: Duration,
    join_delay: Duration,
    sent: HashMap<Key, Instant>,
}

impl Pacer {
    pub fn new(delay: Duration, join_delay: Duration) -> Pacer {
        Pacer { delay, join_delay: join_delay.max(delay), sent: HashMap::new() }
    }

    /// Takes the batches that may go at `now`; returns them and when the first held one may go.
    pub fn ready(&mut self, pending: &mut Batches, now: Instant) -> (Vec<Batch>, Option<Instant>) {
        let (delay, join_delay) = (self.delay, self.join_delay);
        self.sent.retain(|_, t| now.saturating_duration_since(*t) < join_delay);
        let sent = &mut self.sent;
        let mut next: Option<Instant> = None;
        let out = pending.take_if(|key, pair| {
            // A pair goes at the message pace if it holds anything but joins.
            let pace = if pair.joins_only { join_delay } else { delay };
            match sent.get(key) {
                Some(t) if *t + pace > now => {
                    next = Some(next.map_or(*t + pace, |n| n.min(*t + pace)));
                    false
                }
                _ => {
                    sent.insert(key.clone(), now);
                    true
                }
            }
        });
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: &str, room: &str, sessions: &[u64], p: &'static [u8]) -> Delivery {
        Delivery {
            connector: c.into(),
            room: room.into(),
            sessions: sessions.into(),
            payload: Bytes::from_static(p),
            join: false,
        }
    }

    /// An `onAdd` or `onLeave`.
    fn join(c: &str, room: &str, sessions: &[u64], p: &'static [u8]) -> Delivery {
        Delivery { join: true, ..d(c, room, sessions, p) }
    }

    /// A batch as (connector, sessions, payloads).
    type Row<'a> = (&'a str, Vec<u64>, Vec<&'a [u8]>);

    #[test]
    fn same_room_and_sessions_merge_in_order_and_changes_start_a_batch() {
        let mut b = Batches::default();
        b.add(d("c1", "r1", &[1, 2], b"a"));
        b.add(d("c1", "r2", &[3], b"x"));
        b.add(d("c1", "r1", &[1, 2], b"b"));
        b.add(d("c2", "r1", &[1, 2], b"other connector"));
        b.add(d("c1", "r1", &[1], b"private"));
        b.add(d("c1", "r1", &[1, 2], b"c"));
        let out = b.take();
        let got: Vec<Row> = out
            .iter()
            .map(|b| (&*b.connector, b.sessions.to_vec(), b.payloads.iter().map(|p| &p[..]).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("c1", vec![1, 2], vec![&b"a"[..], b"b"]),
                ("c1", vec![3], vec![&b"x"[..]]),
                ("c2", vec![1, 2], vec![&b"other connector"[..]]),
                ("c1", vec![1], vec![&b"private"[..]]),
                ("c1", vec![1, 2], vec![&b"c"[..]]),
            ]
        );
        assert_eq!(out[0].deliveries(), 4);
        assert!(b.is_empty());
    }

    #[test]
    fn a_merged_batch_always_fits_a_session_queue() {
        // Four full batches fit the default cap, so a burst merged to the limit never kicks a reader.
        assert!(4 * MAX_BATCH_BYTES <= crate::frontend::FrontendConfig::gate().queue_max_bytes);
        let mut b = Batches::default();
        for _ in 0..10 {
            b.add(d("c1", "r1", &[1], &[b'x'; 60 * 1024]));
        }
        let out = b.take();
        assert_eq!(out.iter().map(|b| b.payloads.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert!(out.iter().all(|b| b.bytes <= MAX_BATCH_BYTES));
    }

    #[test]
    fn the_pacer_sends_a_quiet_room_at_once_and_a_busy_one_once_per_delay() {
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(2), ms(2));
        let mut b = Batches::default();
        let t0 = Instant::now();
        b.add(d("c1", "r1", &[1], b"a"));
        let (out, next) = p.ready(&mut b, t0);
        assert_eq!((out.len(), next), (1, None), "nothing sent lately: at once");
        b.add(d("c1", "r1", &[1], b"b"));
        b.add(d("c1", "r2", &[2], b"x"));
        let (out, next) = p.ready(&mut b, t0 + ms(1));
        assert_eq!((&*out[0].room, out.len(), next), ("r2", 1, Some(t0 + ms(2))), "r1 waits");
        b.add(d("c1", "r1", &[1], b"c"));
        assert_eq!(p.ready(&mut b, t0 + ms(1)).0.len(), 0);
        let (out, next) = p.ready(&mut b, t0 + ms(2));
        assert_eq!((out.len(), out[0].payloads.len(), next), (1, 2, None), "b and c in one frame");
        assert!(b.is_empty() && b.bytes() == 0);
    }

    #[test]
    fn joins_alone_wait_the_join_pace_and_a_message_takes_it_along_in_order() {
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(2), ms(100));
        let mut b = Batches::default();
        let t0 = Instant::now();
        b.add(join("c1", "r1", &[1], b"add a"));
        let (out, next) = p.ready(&mut b, t0);
        assert_eq!((out.len(), next), (1, None), "a join in a quiet room goes at once");

        // Joins keep coming: they wait for the join pace, not the message pace.
        b.add(join("c1", "r1", &[1, 2], b"add b"));
        b.add(join("c1", "r1", &[1, 2, 3], b"add c"));
        let (out, next) = p.ready(&mut b, t0 + ms(5));
        assert_eq!((out.len(), next), (0, Some(t0 + ms(100))), "held: only joins, sent 5 ms ago");
        let (out, next) = p.ready(&mut b, t0 + ms(100));
        assert_eq!((out.len(), next), (2, None), "both joins at the join pace, one frame per session set");
        assert_eq!(out.iter().map(|b| b.sessions.len()).collect::<Vec<_>>(), vec![2, 3]);

        // A message behind held joins goes at the message pace and takes the joins along, after them.
        b.add(join("c1", "r1", &[1, 2, 3], b"add d"));
        b.add(join("c1", "r2", &[7], b"add in another room"));
        b.add(d("c1", "r1", &[1, 2, 3, 4], b"hello"));
        let (out, next) = p.ready(&mut b, t0 + ms(101));
        assert_eq!(out.iter().map(|b| &*b.room).collect::<Vec<_>>(), vec!["r2"], "r2 never sent: at once");
        assert_eq!(next, Some(t0 + ms(102)), "r1 sent 1 ms ago and holds a message: the message pace");
        let (out, next) = p.ready(&mut b, t0 + ms(102));
        let got: Vec<(&str, Vec<&[u8]>)> =
            out.iter().map(|b| (&*b.room, b.payloads.iter().map(|p| &p[..]).collect())).collect();
        assert_eq!(got, vec![("r1", vec![&b"add d"[..]]), ("r1", vec![&b"hello"[..]])], "r1 in order");
        assert_eq!(next, None);
        assert!(b.is_empty());
    }
}
