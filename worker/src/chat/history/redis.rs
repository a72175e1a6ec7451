//! The `redis` backend: every chat server keeps its rooms' history in one Redis, so a room's new owner
//! (a chat server added, removed or crashed) continues its epoch and sequence instead of starting anew.
//!
//! A room is two keys: `<prefix>h:<room>`, a hash with the room's `epoch` and `top` (last offset), and
//! `<prefix>s:<room>`, a stream of its messages (fields `o` offset, `f` from, `t` target, `m` the message's
//! JSON), trimmed by count (`MAXLEN ~`) and age (`MINID ~`, stream ids being Redis's clock), both keys
//! expiring once the room is idle past `maxAge` plus an hour.
//!
//! A commit is one script for every staged send: each is stored only if the room's `epoch` and `top` are
//! still what this server numbered it after (so two chat servers that both believe they own a room for a
//! moment cannot interleave offsets: the later one's sends fail and are answered 500). A room whose append
//! failed is re-read before its next use, in a new epoch ([`NEW_EPOCH`]): offsets a join reported may not
//! have been stored and must never name other messages.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pomelo_proto::cluster::Since;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde_json::Value;
use tokio::time::Instant;

use super::{covers, unix_ms, Epochs, Failed, HistoryError, HistoryLimits, Position, Query, Staged, Stored};

/// The longest a Redis call may take before the sends waiting for it are answered 500.
const TIMEOUT: Duration = Duration::from_secs(2);
/// A room's keys expire this long after `maxAge` of idleness.
const EXPIRY_MARGIN_MS: u64 = 3_600_000;

/// KEYS: hash. ARGV: a new epoch, expiry ms. The room's epoch (created if absent) and top.
const POSITION: &str = r"
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'epoch', 'top')
return {v[1], tonumber(v[2]) or 0}
";

/// KEYS: hash. ARGV: a new epoch, the least top. Starts a new epoch, the top never going back.
const NEW_EPOCH: &str = r"
local top = math.max(tonumber(redis.call('HGET', KEYS[1], 'top')) or 0, tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'top', top)
return {ARGV[1], top}
";

/// KEYS: hash, stream, for each message. ARGV: max length, max age ms, expiry ms, then for each message its
/// epoch, offset, from, target and JSON. 1 for each message stored, 0 for one whose room moved on.
const APPEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local h, s, a = KEYS[2 * i + 1], KEYS[2 * i + 2], 3 + 5 * i
  local epoch, offset = ARGV[a + 1], tonumber(ARGV[a + 2])
  local cur = redis.call('HMGET', h, 'epoch', 'top')
  if cur[1] == epoch and (tonumber(cur[2]) or 0) == offset - 1 then
    redis.call('HSET', h, 'top', offset)
    redis.call('XADD', s, 'MAXLEN', '~', ARGV[1], '*', 'o', offset, 'f', ARGV[a + 3], 't', ARGV[a + 4], 'm', ARGV[a + 5])
    redis.call('XTRIM', s, 'MINID', '~', now - tonumber(ARGV[2]))
    redis.call('PEXPIRE', h, ARGV[3])
    redis.call('PEXPIRE', s, ARGV[3])
    out[i + 1] = 1
  else
    out[i + 1] = 0
  end
end
return out
";

/// The scripts, sent by hash (EVALSHA; redis-rs loads one again if Redis lost it).
struct Scripts {
    position: Script,
    new_epoch: Script,
    append: Script,
}

pub struct RedisHistory {
    client: redis::Client,
    con: Option<ConnectionManager>,
    scripts: Scripts,
    prefix: String,
    limits: HistoryLimits,
    /// Positions of the rooms in use, at most `limits.rooms` (Redis has the rest).
    rooms: HashMap<String, Position>,
    /// Rooms whose last commit failed, with the least top their next epoch may start from.
    poisoned: HashMap<String, u64>,
    staged: Vec<Staged>,
    epochs: Epochs,
}

fn backend(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Backend(format!("redis: {e}"))
}

impl RedisHistory {
    /// Connects lazily (at the first room): a Redis that is down at start makes sends fail, not the server.
    pub fn new(url: &str, prefix: &str, limits: HistoryLimits) -> Result<RedisHistory, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url: {e}"))?;
        Ok(RedisHistory {
            client,
            con: None,
            scripts: Scripts {
                position: Script::new(POSITION),
                new_epoch: Script::new(NEW_EPOCH),
                append: Script::new(APPEND),
            },
            prefix: prefix.to_string(),
            limits,
            rooms: HashMap::new(),
            poisoned: HashMap::new(),
            staged: Vec::new(),
            epochs: Epochs::new(),
        })
    }

    /// The connection, made at the first call (and re-made by the manager after a failure).
    async fn connection(&mut self) -> Result<&mut ConnectionManager, HistoryError> {
        if self.con.is_none() {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_max_delay(Duration::from_secs(1));
            let con = tokio::time::timeout(TIMEOUT, ConnectionManager::new_with_config(self.client.clone(), cfg))
                .await
                .map_err(|_| backend("no connection within 2 s"))?
                .map_err(backend)?;
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("connected"))
    }

    /// One call (a script invocation or a command), within [`TIMEOUT`].
    async fn timed<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, HistoryError> {
        match tokio::time::timeout(TIMEOUT, call).await {
            Ok(r) => r.map_err(backend),
            Err(_) => Err(backend("no answer within 2 s")),
        }
    }

    async fn load(&mut self, rid: &str) -> Result<Position, HistoryError> {
        if let Some(p) = self.rooms.get(rid) {
            return Ok(p.clone());
        }
        self.connection().await?;
        let hash = format!("{}h:{rid}", self.prefix);
        let mut call = match self.poisoned.get(rid) {
            Some(_) => self.scripts.new_epoch.key(hash),
            None => self.scripts.position.key(hash),
        };
        call.arg(self.epochs.next());
        match self.poisoned.get(rid) {
            Some(least) => call.arg(least),
            None => call.arg(self.limits.ttl.as_millis() as u64 + EXPIRY_MARGIN_MS),
        };
        let con = self.con.as_mut().expect("connected");
        let (epoch, top): (String, u64) = Self::timed(call.invoke_async(con)).await?;
        self.poisoned.remove(rid);
        let p = Position { epoch, top };
        if self.rooms.len() >= self.limits.rooms {
            // Bounded: positions are re-read from Redis when needed again, except those of staged rooms.
            let staged: HashSet<&str> = self.staged.iter().map(|s| s.rid.as_str()).collect();
            self.rooms.retain(|r, _| staged.contains(r.as_str()));
        }
        self.rooms.insert(rid.to_string(), p.clone());
        Ok(p)
    }

    pub async fn position(&mut self, rid: &str) -> Result<Since, HistoryError> {
        let p = self.load(rid).await?;
        Ok(Since { epoch: p.epoch, offset: p.top })
    }

    pub async fn append(&mut self, rid: &str, from: &str, target: &str, msg: &Value) -> Result<Since, HistoryError> {
        self.load(rid).await?;
        let p = self.rooms.get_mut(rid).expect("loaded");
        Staged::next(&mut self.staged, rid, p, from, target, msg)
    }

    pub fn staged(&self) -> bool {
        !self.staged.is_empty()
    }

    pub async fn commit(&mut self) -> Result<(), Failed> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let connected = self.connection().await.map(|_| ());
        let ttl_ms = self.limits.ttl.as_millis() as u64;
        let mut call = self.scripts.append.prepare_invoke();
        call.arg(self.limits.size).arg(ttl_ms).arg(ttl_ms + EXPIRY_MARGIN_MS);
        for m in &staged {
            call.key(format!("{}h:{}", self.prefix, m.rid)).key(format!("{}s:{}", self.prefix, m.rid));
            call.arg(&m.epoch).arg(m.offset).arg(&m.from).arg(&m.target).arg(m.msg.get());
        }
        let stored = match connected {
            Ok(()) => Self::timed(call.invoke_async::<Vec<i64>>(self.con.as_mut().expect("connected"))).await,
            Err(e) => Err(e),
        };
        let (failed, why): (HashSet<String>, String) = match stored {
            Ok(stored) if stored.len() == staged.len() => (
                staged.iter().zip(&stored).filter(|(_, ok)| **ok != 1).map(|(m, _)| m.rid.clone()).collect(),
                "the room moved to another chat server".into(),
            ),
            Ok(stored) => (
                staged.iter().map(|m| m.rid.clone()).collect(),
                format!("{} answers for {}", stored.len(), staged.len()),
            ),
            Err(e) => (staged.iter().map(|m| m.rid.clone()).collect(), e.to_string()),
        };
        if failed.is_empty() {
            return Ok(());
        }
        for rid in &failed {
            let top = self.rooms.remove(rid).map_or(0, |p| p.top);
            self.poisoned.insert(rid.clone(), top);
        }
        tracing::error!("could not store messages of {} rooms: {why}", failed.len());
        Err(Failed { rooms: failed, why })
    }

    pub async fn read(&mut self, rid: &str, q: &Query) -> Result<Option<Vec<Stored>>, HistoryError> {
        let at = self.load(rid).await?;
        let limits = self.limits;
        let count = match q {
            Query::Since(s) if s.epoch != at.epoch || s.offset >= at.top || at.top - s.offset > limits.size as u64 => {
                return Ok(covers(s, &at, None, &limits).then(Vec::new));
            }
            Query::Since(s) => at.top - s.offset,
            Query::Before { before, limit } => {
                let skip = before.map_or(0, |b| (at.top + 1).saturating_sub(b));
                (skip + *limit as u64).min(limits.size as u64 + 100)
            }
        };
        let stream = format!("{}s:{rid}", self.prefix);
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(&stream).arg("+").arg("-").arg("COUNT").arg(count);
        let con = self.connection().await?;
        let entries: Vec<(String, Vec<String>)> = Self::timed(cmd.query_async(con)).await?;
        let oldest = unix_ms().saturating_sub(limits.ttl.as_millis() as u64);
        let mut found: Vec<(Stored, u64)> =
            entries.into_iter().rev().filter_map(|(id, fields)| entry(&id, &fields)).collect();
        Ok(match q {
            Query::Since(s) => {
                found.retain(|(m, _)| m.offset > s.offset);
                covers(s, &at, found.first().map(|(m, ms)| (m.offset, *ms)), &limits)
                    .then(|| found.into_iter().map(|(m, _)| m).collect())
            }
            Query::Before { before, limit } => {
                let below = before.unwrap_or(u64::MAX);
                found.retain(|(m, ms)| m.offset < below && *ms >= oldest);
                let skip = found.len().saturating_sub(*limit);
                Some(found.into_iter().skip(skip).map(|(m, _)| m).collect())
            }
        })
    }

    pub fn retain(&mut self, owns: &dyn Fn(&str) -> bool) {
        self.rooms.retain(|rid, _| owns(rid));
    }
}

/// A stream entry: its message, and its age from the id (`<ms>-<seq>`).
fn entry(id: &str, fields: &[String]) -> Option<(Stored, u64)> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    let mut m = Stored { offset: 0, from: String::new(), target: String::new(), msg: Value::Null, at: Instant::now() };
    for kv in fields.chunks(2) {
        let [k, v] = kv else { return None };
        match k.as_str() {
            "o" => m.offset = v.parse().ok()?,
            "f" => m.from = v.clone(),
            "t" => m.target = v.clone(),
            "m" => m.msg = serde_json::from_str(v).ok()?,
            _ => {}
        }
    }
    (m.offset > 0).then_some((m, ms))
}
