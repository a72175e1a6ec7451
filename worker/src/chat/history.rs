//! Room history: what was said in each room, numbered, so a client that reconnects gets what it missed.
//!
//! Every room has an epoch and a sequence. The chat server that owns the room numbers each message it
//! accepts (offsets 1, 2, … within an epoch) and stores it here *before* the send is answered, so an
//! acknowledged message is in the history. A new epoch means the history before it is lost: a client
//! holding an older epoch, or an offset the history no longer covers, gets `recovered: false`, never a
//! silent gap.
//!
//! [`History`] is the interface a backend implements; the rooms task owns one and calls it inline (no
//! tasks, no channels, nothing to shut down: it is dropped with the rooms task). [`MemoryHistory`] is
//! the `memory` backend: a ring per room on its chat server, bounded by count and by age, and a cap on
//! the rooms it keeps; a chat server that (re)creates a room it has no history for starts a new epoch
//! (a restarted chat server has none, so every room gets a new epoch).
//!
//! Three backends, chosen per chat server in servers.yaml (`history.backend`): `memory` ([`MemoryHistory`]),
//! `disk` ([`disk::DiskHistory`]: redb, committed before the sends are answered, so kill -9 loses none) and
//! `redis` ([`redis::RedisHistory`]: Streams shared by the chat servers, so a room's new owner continues its
//! sequence). `disk` and `redis` *stage* appends: the rooms task numbers and holds a batch of sends, then
//! [`History::commit`]s them at once (group commit: one fsync or one round trip for every send it drained)
//! and only then answers and delivers them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pomelo_proto::cluster::Since;
use pomelo_proto::config::{HistoryBackend, HistoryConfig};
use serde_json::Value;
use tokio::time::Instant;

pub mod disk;
pub mod redis;

/// Bounds of a room's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryLimits {
    /// Messages kept per room.
    pub size: usize,
    /// Messages older than this are forgotten.
    pub ttl: Duration,
    /// Rooms kept; past it the one idle longest is forgotten.
    pub rooms: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits { size: 1000, ttl: Duration::from_secs(300), rooms: 100_000 }
    }
}

impl HistoryLimits {
    /// A chat server's `history` from servers.yaml, or (without one) [`from_env`](Self::from_env).
    pub fn configured(h: Option<&HistoryConfig>) -> HistoryLimits {
        match h {
            Some(h) => HistoryLimits { size: h.max_messages, ttl: h.max_age, ..HistoryLimits::default() },
            None => HistoryLimits::from_env(),
        }
    }

    /// The defaults, overridden by `POMELO_HISTORY_SIZE` (messages per room, 1..=100000) and
    /// `POMELO_HISTORY_TTL_S` (seconds, 1..=86400) in the chat server's environment.
    pub fn from_env() -> HistoryLimits {
        let mut l = HistoryLimits::default();
        let var = |k: &str, max: u64| -> Option<u64> {
            let v = std::env::var(k).ok()?;
            match v.trim().parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Some(n),
                _ => {
                    tracing::warn!("{k}={v:?} is not a whole number in 1..={max}; using the default");
                    None
                }
            }
        };
        if let Some(n) = var("POMELO_HISTORY_SIZE", 100_000) {
            l.size = n as usize;
        }
        if let Some(s) = var("POMELO_HISTORY_TTL_S", 86_400) {
            l.ttl = Duration::from_secs(s);
        }
        l
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub offset: u64,
    pub from: String,
    pub target: String,
    pub msg: Value,
    pub(crate) at: Instant,
}

impl Stored {
    /// Whether `username` received it live: broadcasts, and private messages to them.
    pub fn visible_to(&self, username: &str) -> bool {
        self.target == "*" || self.target == username
    }
}

/// What a history was asked for: messages after a position, or a page of the latest.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Everything after `since` (all of it, or `None` when the history does not cover it).
    Since(Since),
    /// The last `limit` messages with an offset below `before` (the newest without it).
    Before { before: Option<u64>, limit: usize },
}

/// Why a message could not be stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HistoryError {
    #[error("the history backend failed: {0}")]
    Backend(String),
}

/// A room's history backend, as servers.yaml chose it. Calls are made by the one rooms task, in order.
pub enum History {
    Memory(MemoryHistory),
    Disk(disk::DiskHistory),
    Redis(Box<redis::RedisHistory>),
}

impl History {
    /// The backend `cfg` names for chat server `id` (`None`: memory, bounded by the environment). A disk
    /// store that cannot be opened is an error: the server must not answer sends it cannot keep. `fresh`
    /// (the master says this server's rooms had another owner while it was away) empties a disk store,
    /// whose rooms would otherwise continue with a silent gap.
    pub fn open(cfg: Option<&HistoryConfig>, id: &str, fresh: bool) -> Result<History, String> {
        let limits = HistoryLimits::configured(cfg);
        Ok(match cfg.map(|c| c.backend) {
            None | Some(HistoryBackend::Memory) => History::Memory(MemoryHistory::new(limits)),
            Some(HistoryBackend::Disk) => {
                // servers.yaml resolves `dir` (default `<runDir>/history`) for every disk chat server.
                let dir = cfg.and_then(|c| c.dir.clone()).ok_or("the disk backend has no `dir`")?;
                History::Disk(disk::DiskHistory::open(&dir.join(format!("{id}.redb")), limits, fresh)?)
            }
            Some(HistoryBackend::Redis) => {
                let c = cfg.expect("a redis config");
                let url = c.url.clone().ok_or("the redis backend needs `url`")?;
                History::Redis(Box::new(redis::RedisHistory::new(&url, &c.prefix, limits)?))
            }
        })
    }

    /// The room's epoch and last offset (a room no backend knows gets a new epoch).
    pub async fn position(&mut self, rid: &str) -> Result<Since, HistoryError> {
        match self {
            History::Memory(m) => Ok(m.position(rid, Instant::now())),
            History::Disk(d) => d.position(rid),
            History::Redis(r) => r.position(rid).await,
        }
    }

    /// Numbers a message; memory stores it at once, disk and redis at the next [`commit`](Self::commit).
    pub async fn append(&mut self, rid: &str, from: &str, target: &str, msg: &Value) -> Result<Since, HistoryError> {
        match self {
            History::Memory(m) => m.append(rid, from, target, msg, Instant::now()),
            History::Disk(d) => d.append(rid, from, target, msg),
            History::Redis(r) => r.append(rid, from, target, msg).await,
        }
    }

    /// Whether appends wait for a [`commit`](Self::commit).
    pub fn staged(&self) -> bool {
        match self {
            History::Memory(_) => false,
            History::Disk(d) => d.staged(),
            History::Redis(r) => r.staged(),
        }
    }

    /// Stores what was appended since the last commit; the rooms whose appends failed (each then starts a
    /// new epoch: offsets a join already reported must never be reused for other messages).
    pub async fn commit(&mut self) -> Result<(), Failed> {
        match self {
            History::Memory(_) => Ok(()),
            History::Disk(d) => d.commit().await,
            History::Redis(r) => r.commit().await,
        }
    }

    /// See [`Query`]; `Ok(None)` when the history does not cover `Query::Since`. Appends not yet committed
    /// are not read: commit first.
    pub async fn read(&mut self, rid: &str, q: &Query) -> Result<Option<Vec<Stored>>, HistoryError> {
        match self {
            History::Memory(m) => Ok(m.read(rid, q, Instant::now())),
            History::Disk(d) => d.read(rid, q),
            History::Redis(r) => r.read(rid, q).await,
        }
    }

    /// Rooms `owns` refuses moved to another chat server: memory and disk forget them (should one come
    /// back, what they kept would have a gap), redis only stops caching them (the history is shared).
    pub fn retain(&mut self, owns: &dyn Fn(&str) -> bool) {
        match self {
            History::Memory(m) => m.retain(owns),
            History::Disk(d) => d.retain(owns),
            History::Redis(r) => r.retain(owns),
        }
    }
}

/// Appends a commit could not store: the rooms, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub rooms: std::collections::HashSet<String>,
    pub why: String,
}

/// An epoch no chat server has used: the wall clock, the pid and a counter.
#[derive(Debug)]
pub(crate) struct Epochs {
    seed: u64,
    created: AtomicU64,
}

impl Epochs {
    pub(crate) fn new() -> Epochs {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
        Epochs { seed, created: AtomicU64::new(0) }
    }

    pub(crate) fn next(&self) -> String {
        format!("{:016x}-{}", self.seed, self.created.fetch_add(1, Ordering::Relaxed))
    }
}

/// Milliseconds since the Unix epoch: the age of a stored message across restarts.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A staged append of `disk` and `redis`.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    pub rid: String,
    pub epoch: String,
    pub offset: u64,
    pub from: String,
    pub target: String,
    /// The message's JSON, serialized once here and written as is.
    pub msg: Box<serde_json::value::RawValue>,
    pub at_ms: u64,
}

impl Staged {
    /// Numbers the next message of the room at `p` (advancing it) and stages it; its position.
    pub(crate) fn next(
        staged: &mut Vec<Staged>,
        rid: &str,
        p: &mut Position,
        from: &str,
        target: &str,
        msg: &Value,
    ) -> Result<Since, HistoryError> {
        let msg = serde_json::value::to_raw_value(msg).map_err(|e| HistoryError::Backend(e.to_string()))?;
        p.top += 1;
        let at = Since { epoch: p.epoch.clone(), offset: p.top };
        staged.push(Staged {
            rid: rid.to_string(),
            epoch: at.epoch.clone(),
            offset: at.offset,
            from: from.to_string(),
            target: target.to_string(),
            msg,
            at_ms: unix_ms(),
        });
        Ok(at)
    }
}

/// A room's position as a staging backend last stored or numbered it.
#[derive(Debug, Clone)]
pub(crate) struct Position {
    pub epoch: String,
    pub top: u64,
}

/// Checks a read of the messages after `since` (`found`, oldest first, each with its offset and age) against
/// the room's position: `None` unless they start right after `since` and none has aged out.
pub(crate) fn covers(since: &Since, at: &Position, first: Option<(u64, u64)>, limits: &HistoryLimits) -> bool {
    if since.epoch != at.epoch || since.offset > at.top {
        return false;
    }
    if since.offset == at.top {
        return true;
    }
    let oldest_allowed = unix_ms().saturating_sub(limits.ttl.as_millis() as u64);
    matches!(first, Some((o, ms)) if o == since.offset + 1 && ms >= oldest_allowed)
}

#[derive(Debug)]
struct Ring {
    epoch: String,
    /// Offset of the last message (0 before any).
    top: u64,
    messages: VecDeque<Stored>,
    touched: Instant,
}

impl Ring {
    fn expire(&mut self, limits: &HistoryLimits, now: Instant) {
        while self.messages.len() > limits.size
            || self.messages.front().is_some_and(|m| now.saturating_duration_since(m.at) > limits.ttl)
        {
            self.messages.pop_front();
        }
    }

    /// Offset of the oldest message kept (`top + 1` when none is).
    fn first(&self) -> u64 {
        self.top + 1 - self.messages.len() as u64
    }
}

/// The `memory` backend.
#[derive(Debug)]
pub struct MemoryHistory {
    limits: HistoryLimits,
    rooms: HashMap<String, Ring>,
    epochs: Epochs,
}

impl MemoryHistory {
    pub fn new(limits: HistoryLimits) -> MemoryHistory {
        MemoryHistory { limits, rooms: HashMap::new(), epochs: Epochs::new() }
    }

    fn ring(&mut self, rid: &str, now: Instant) -> &mut Ring {
        if !self.rooms.contains_key(rid) && self.rooms.len() >= self.limits.rooms {
            let ttl = self.limits.ttl;
            self.rooms.retain(|_, r| now.saturating_duration_since(r.touched) <= ttl);
            if self.rooms.len() >= self.limits.rooms {
                let idlest = self.rooms.iter().min_by_key(|(_, r)| r.touched).map(|(k, _)| k.clone());
                if let Some(k) = idlest {
                    self.rooms.remove(&k);
                }
            }
        }
        let limits = self.limits;
        let epochs = &self.epochs;
        let ring = self.rooms.entry(rid.to_string()).or_insert_with(|| Ring {
            epoch: epochs.next(),
            top: 0,
            messages: VecDeque::new(),
            touched: now,
        });
        ring.touched = now;
        ring.expire(&limits, now);
        ring
    }

    pub fn position(&mut self, rid: &str, now: Instant) -> Since {
        let r = self.ring(rid, now);
        Since { epoch: r.epoch.clone(), offset: r.top }
    }

    pub fn append(
        &mut self,
        rid: &str,
        from: &str,
        target: &str,
        msg: &Value,
        now: Instant,
    ) -> Result<Since, HistoryError> {
        let limits = self.limits;
        let r = self.ring(rid, now);
        r.top += 1;
        r.messages.push_back(Stored {
            offset: r.top,
            from: from.to_string(),
            target: target.to_string(),
            msg: msg.clone(),
            at: now,
        });
        r.expire(&limits, now);
        Ok(Since { epoch: r.epoch.clone(), offset: r.top })
    }

    pub fn retain(&mut self, owns: &dyn Fn(&str) -> bool) {
        self.rooms.retain(|rid, _| owns(rid));
    }

    pub fn read(&mut self, rid: &str, q: &Query, now: Instant) -> Option<Vec<Stored>> {
        let r = self.ring(rid, now);
        match q {
            Query::Since(s) => {
                if s.epoch != r.epoch || s.offset > r.top || s.offset + 1 < r.first() {
                    return None;
                }
                Some(r.messages.iter().filter(|m| m.offset > s.offset).cloned().collect())
            }
            Query::Before { before, limit } => {
                let below = before.unwrap_or(u64::MAX);
                let mut page: Vec<Stored> =
                    r.messages.iter().rev().filter(|m| m.offset < below).take(*limit).cloned().collect();
                page.reverse();
                Some(page)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn since(epoch: &str, offset: u64) -> Query {
        Query::Since(Since { epoch: epoch.into(), offset })
    }

    #[test]
    fn recovery_covers_the_gap_or_says_it_cannot() {
        let now = Instant::now();
        let mut h = MemoryHistory::new(HistoryLimits { size: 3, ttl: Duration::from_secs(10), rooms: 10 });
        let start = h.position("r", now);
        assert_eq!(start.offset, 0);
        for i in 1..=5u64 {
            let p = h.append("r", "ann", "*", &json!(i), now).expect("stored");
            assert_eq!((p.epoch.as_str(), p.offset), (start.epoch.as_str(), i));
        }
        let got: Vec<u64> =
            h.read("r", &since(&start.epoch, 2), now).expect("stored").iter().map(|m| m.offset).collect();
        assert_eq!(got, [3, 4, 5], "ring of 3 still covers after 2");
        assert_eq!(h.read("r", &since(&start.epoch, 5), now), Some(vec![]));
        assert_eq!(h.read("r", &since(&start.epoch, 1), now), None, "message 2 is gone");
        assert_eq!(h.read("r", &since(&start.epoch, 6), now), None, "the future");
        assert_eq!(h.read("r", &since("other", 4), now), None, "another epoch");
        let later = now + Duration::from_secs(11);
        assert_eq!(h.read("r", &since(&start.epoch, 4), later), None, "aged out");
        assert_eq!(h.read("r", &since(&start.epoch, 5), later), Some(vec![]), "nothing missed");
        assert_ne!(h.position("other", now).epoch, start.epoch);
    }

    #[test]
    fn pages_go_back_and_rooms_are_bounded() {
        let now = Instant::now();
        let mut h = MemoryHistory::new(HistoryLimits { size: 100, ttl: Duration::from_secs(10), rooms: 2 });
        for i in 1..=10 {
            h.append("r", "ann", if i == 4 { "bob" } else { "*" }, &json!(i), now).expect("stored");
        }
        let page = |h: &mut MemoryHistory, before, limit| -> Vec<u64> {
            h.read("r", &Query::Before { before, limit }, now).expect("stored").iter().map(|m| m.offset).collect()
        };
        assert_eq!(page(&mut h, None, 3), [8, 9, 10]);
        assert_eq!(page(&mut h, Some(8), 3), [5, 6, 7]);
        assert_eq!(page(&mut h, Some(2), 3), [1]);
        let epoch = h.position("r", now).epoch;
        h.position("a", now + Duration::from_secs(1));
        h.position("b", now + Duration::from_secs(2));
        assert_ne!(h.position("r", now).epoch, epoch, "the idlest room was forgotten: a new epoch");
        let epoch = h.position("b", now).epoch;
        h.retain(&|rid| rid != "b");
        assert_ne!(h.position("b", now).epoch, epoch, "a room that moved away and back starts a new epoch");
    }
}
