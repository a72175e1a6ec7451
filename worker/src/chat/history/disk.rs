//! The `disk` backend: each chat server keeps its rooms' history in one redb file on its host.
//!
//! Why redb: one file, no background threads (compaction would compete with delivery on a two-core host),
//! a commit that is durable when it returns (`Durability::Immediate`: copy-on-write pages and a checksummed
//! header, one fsync), a stable file format, and ordered keys, so a room's messages are a key range
//! `(room, offset)`. fjall (an LSM tree) writes less per commit but brings flush and compaction threads; with
//! group commit (one transaction for every send the rooms task drained, typically tens) the commit cost is
//! shared, which is what the benchmark measures.
//!
//! Writes go to a thread of their own, so an fsync never blocks the runtime: the rooms task stages a
//! batch, hands it over and waits for the answer before it answers any of those sends. Reads are redb read
//! transactions on the rooms task (they see only committed data, which is why the rooms task commits
//! before it reads a room it has staged appends for). The writer also keeps the set of rooms on disk, so
//! a membership change finds the rooms that moved away without reading the store.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pomelo_proto::cluster::Since;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{covers, unix_ms, Epochs, Failed, HistoryError, HistoryLimits, Position, Query, Staged, Stored};

/// The rooms the store holds, kept by the writer thread (commits add, forgets and sweeps remove).
type StoredRooms = Arc<Mutex<HashSet<String>>>;

fn names(s: &StoredRooms) -> std::sync::MutexGuard<'_, HashSet<String>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget_names(s: &StoredRooms, gone: &[String]) {
    let mut names = names(s);
    for r in gone {
        names.remove(r);
    }
}

/// Room → `{"epoch", "top", "at"}` (`at`: when it was last written, in Unix ms).
const ROOMS: TableDefinition<&str, &[u8]> = TableDefinition::new("rooms");
/// (room, offset) → 8 bytes of Unix ms (big-endian), then `{"f", "t", "m"}`.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// Commits waiting for the writer thread, at most.
const QUEUE: usize = 16;
/// How often the writer forgets rooms idle past `maxAge` and messages older than it.
const SWEEP: Duration = Duration::from_secs(60);

pub struct DiskHistory {
    db: Arc<Database>,
    limits: HistoryLimits,
    /// Positions of the rooms in use, at most `limits.rooms` (the store has the rest).
    rooms: HashMap<String, Position>,
    /// Rooms whose position must be written with the next commit (a new epoch).
    dirty: HashSet<String>,
    /// Rooms that moved away, whose records the writer may not have deleted yet: never read back.
    forgotten: HashSet<String>,
    /// Moved rooms whose deletion the writer has not been handed yet (its queue was full).
    to_forget: Vec<String>,
    stored: StoredRooms,
    staged: Vec<Staged>,
    epochs: Epochs,
    writer: SyncSender<Job>,
    /// Joined on drop, so the file is closed (and may be opened again) once this is gone.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DiskHistory {
    fn drop(&mut self) {
        let (orphan, _) = sync_channel(1);
        drop(std::mem::replace(&mut self.writer, orphan));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Job {
    Commit { staged: Vec<Staged>, rooms: Vec<(String, Position)>, done: oneshot::Sender<Result<(), String>> },
    Forget(Vec<String>),
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl DiskHistory {
    /// Opens (or creates) the store at `file`; `fresh` empties it first.
    pub fn open(file: &Path, limits: HistoryLimits, fresh: bool) -> Result<DiskHistory, String> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let db = Database::create(file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
        let txn = db.begin_write().map_err(err)?;
        if fresh {
            txn.delete_table(ROOMS).map_err(err)?;
            txn.delete_table(MESSAGES).map_err(err)?;
            tracing::info!(
                "{}: this server's rooms had another owner meanwhile: its history starts anew",
                file.display()
            );
        }
        txn.open_table(ROOMS).map_err(err)?;
        txn.open_table(MESSAGES).map_err(err)?;
        txn.commit().map_err(err)?;
        let stored: StoredRooms = Arc::new(Mutex::new(room_names(&db)?));
        let db = Arc::new(db);
        let (writer, jobs) = sync_channel(QUEUE);
        let (w, ttl, on_disk) = (db.clone(), limits.ttl, stored.clone());
        let thread = std::thread::Builder::new()
            .name("history-disk".into())
            .spawn(move || {
                // Swept every SWEEP whether or not commits keep coming.
                let mut swept = std::time::Instant::now();
                loop {
                    match jobs.recv_timeout(SWEEP.saturating_sub(swept.elapsed())) {
                        Ok(Job::Commit { staged, rooms, done }) => {
                            let r = write(&w, &staged, &rooms, &limits);
                            if r.is_ok() {
                                names(&on_disk).extend(rooms.into_iter().map(|(rid, _)| rid));
                            }
                            let _ = done.send(r);
                        }
                        Ok(Job::Forget(rids)) => match forget(&w, &rids) {
                            Ok(()) => forget_names(&on_disk, &rids),
                            Err(e) => tracing::error!("could not forget {} moved rooms: {e}", rids.len()),
                        },
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    if swept.elapsed() >= SWEEP {
                        swept = std::time::Instant::now();
                        match sweep(&w, ttl) {
                            Ok(gone) => forget_names(&on_disk, &gone),
                            Err(e) => tracing::warn!("history sweep failed: {e}"),
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the history writer: {e}"))?;
        Ok(DiskHistory {
            db,
            limits,
            rooms: HashMap::new(),
            dirty: HashSet::new(),
            forgotten: HashSet::new(),
            to_forget: Vec::new(),
            stored,
            staged: Vec::new(),
            epochs: Epochs::new(),
            writer,
            thread: Some(thread),
        })
    }

    fn load(&mut self, rid: &str) -> Result<&mut Position, HistoryError> {
        if !self.rooms.contains_key(rid) {
            // A room that came back after moving away starts anew (its deletion is queued before the next
            // commit, which writes its new epoch).
            let stored = match self.forgotten.remove(rid) {
                true => None,
                false => read_room(&self.db, rid).map_err(HistoryError::Backend)?,
            };
            let p = match stored {
                Some(p) => p,
                None => {
                    self.dirty.insert(rid.to_string());
                    Position { epoch: self.epochs.next(), top: 0 }
                }
            };
            if self.rooms.len() >= self.limits.rooms {
                // Bounded: drop the positions the store already has (not the new epochs nor staged rooms).
                let staged: HashSet<&str> = self.staged.iter().map(|s| s.rid.as_str()).collect();
                let dirty = &self.dirty;
                self.rooms.retain(|r, _| dirty.contains(r) || staged.contains(r.as_str()));
            }
            self.rooms.insert(rid.to_string(), p);
        }
        Ok(self.rooms.get_mut(rid).expect("just inserted"))
    }

    pub fn position(&mut self, rid: &str) -> Result<Since, HistoryError> {
        let p = self.load(rid)?;
        Ok(Since { epoch: p.epoch.clone(), offset: p.top })
    }

    pub fn append(&mut self, rid: &str, from: &str, target: &str, msg: &Value) -> Result<Since, HistoryError> {
        self.load(rid)?;
        let p = self.rooms.get_mut(rid).expect("loaded");
        Staged::next(&mut self.staged, rid, p, from, target, msg)
    }

    pub fn staged(&self) -> bool {
        !self.staged.is_empty()
    }

    pub async fn commit(&mut self) -> Result<(), Failed> {
        if self.staged.is_empty() && self.dirty.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let mut touched: HashSet<String> = std::mem::take(&mut self.dirty);
        touched.extend(staged.iter().map(|s| s.rid.clone()));
        let rooms = touched.iter().filter_map(|r| Some((r.clone(), self.rooms.get(r)?.clone()))).collect();
        self.hand_over_forgets();
        let (done, answer) = oneshot::channel();
        let result = match self.writer.try_send(Job::Commit { staged, rooms, done }) {
            Ok(()) => answer.await.unwrap_or_else(|_| Err("the history writer stopped".into())),
            Err(_) => Err("the history writer is not keeping up".into()),
        };
        if result.is_ok() && self.to_forget.is_empty() {
            // The writer takes jobs in order: every deletion handed over before this commit has landed.
            self.forgotten.clear();
        }
        result.map_err(|why| {
            // Offsets a join may have reported are not stored: those rooms go on in a new epoch (offsets keep
            // rising, so nothing on disk is overwritten), written with the next commit.
            for rid in &touched {
                if let Some(p) = self.rooms.get_mut(rid) {
                    p.epoch = self.epochs.next();
                }
                self.dirty.insert(rid.clone());
            }
            tracing::error!("could not store {} rooms' messages: {why}", touched.len());
            Failed { rooms: touched, why }
        })
    }

    pub fn read(&mut self, rid: &str, q: &Query) -> Result<Option<Vec<Stored>>, HistoryError> {
        let at = self.load(rid)?.clone();
        let limits = self.limits;
        let range = match q {
            Query::Since(s) if s.epoch != at.epoch || s.offset >= at.top || at.top - s.offset > limits.size as u64 => {
                return Ok(covers(s, &at, None, &limits).then(Vec::new));
            }
            Query::Since(s) => (s.offset + 1, at.top, usize::MAX),
            Query::Before { before, limit } => {
                (0, before.unwrap_or(u64::MAX).min(at.top + 1).saturating_sub(1), *limit)
            }
        };
        let found = read_messages(&self.db, rid, range).map_err(HistoryError::Backend)?;
        let oldest = unix_ms().saturating_sub(limits.ttl.as_millis() as u64);
        Ok(match q {
            Query::Since(s) => covers(s, &at, found.first().map(|(m, ms)| (m.offset, *ms)), &limits)
                .then(|| found.into_iter().map(|(m, _)| m).collect()),
            Query::Before { .. } => Some(found.into_iter().filter(|(_, ms)| *ms >= oldest).map(|(m, _)| m).collect()),
        })
    }

    pub fn retain(&mut self, owns: &dyn Fn(&str) -> bool) {
        self.rooms.retain(|rid, _| owns(rid));
        self.dirty.retain(|rid| owns(rid));
        let moved: Vec<String> = names(&self.stored).iter().filter(|r| !owns(r)).cloned().collect();
        self.forgotten.extend(moved.iter().cloned());
        self.to_forget.extend(moved);
        self.hand_over_forgets();
    }

    /// Hands the writer the deletions of moved rooms; what its full queue refuses waits for the next try.
    fn hand_over_forgets(&mut self) {
        if self.to_forget.is_empty() {
            return;
        }
        if let Err(e) = self.writer.try_send(Job::Forget(std::mem::take(&mut self.to_forget))) {
            let (std::sync::mpsc::TrySendError::Full(Job::Forget(back))
            | std::sync::mpsc::TrySendError::Disconnected(Job::Forget(back))) = e
            else {
                return;
            };
            tracing::warn!("the history writer is busy: {} moved rooms are forgotten later", back.len());
            self.to_forget = back;
        }
    }
}

fn read_room(db: &Database, rid: &str) -> Result<Option<Position>, String> {
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(ROOMS).map_err(err)?;
    let Some(v) = t.get(rid).map_err(err)? else { return Ok(None) };
    let v: Value = serde_json::from_slice(v.value()).map_err(err)?;
    match (v["epoch"].as_str(), v["top"].as_u64()) {
        (Some(e), Some(top)) => Ok(Some(Position { epoch: e.to_string(), top })),
        _ => Err(format!("room {rid:?}: a damaged record")),
    }
}

fn room_names(db: &Database) -> Result<HashSet<String>, String> {
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(ROOMS).map_err(err)?;
    let mut out = HashSet::new();
    for kv in t.iter().map_err(err)? {
        out.insert(kv.map_err(err)?.0.value().to_string());
    }
    Ok(out)
}

/// Messages of `rid` with offsets in `first..=last`, the newest `limit` of them, oldest first, with their ages.
fn read_messages(
    db: &Database,
    rid: &str,
    (first, last, limit): (u64, u64, usize),
) -> Result<Vec<(Stored, u64)>, String> {
    let mut out = Vec::new();
    if first > last {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(MESSAGES).map_err(err)?;
    for kv in t.range((rid, first)..=(rid, last)).map_err(err)?.rev().take(limit) {
        let (k, v) = kv.map_err(err)?;
        let (_, offset) = k.value();
        let bytes = v.value();
        if bytes.len() < 8 {
            return Err(format!("room {rid:?} message {offset}: a damaged record"));
        }
        let ms = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let body: Value = serde_json::from_slice(&bytes[8..]).map_err(err)?;
        let s = |k: &str| body[k].as_str().unwrap_or_default().to_string();
        out.push((Stored { offset, from: s("f"), target: s("t"), msg: body["m"].clone(), at: Instant::now() }, ms));
    }
    out.reverse();
    Ok(out)
}

/// One transaction: the staged messages, the rooms' positions, and each room trimmed to its bounds.
fn write(db: &Database, staged: &[Staged], rooms: &[(String, Position)], limits: &HistoryLimits) -> Result<(), String> {
    let now = unix_ms();
    let oldest = now.saturating_sub(limits.ttl.as_millis() as u64);
    let txn = db.begin_write().map_err(err)?;
    {
        let mut msgs = txn.open_table(MESSAGES).map_err(err)?;
        let mut value = Vec::with_capacity(256);
        for m in staged {
            value.clear();
            value.extend_from_slice(&m.at_ms.to_be_bytes());
            serde_json::to_writer(&mut value, &Body { f: &m.from, t: &m.target, m: &m.msg }).map_err(err)?;
            msgs.insert((m.rid.as_str(), m.offset), value.as_slice()).map_err(err)?;
        }
        let mut table = txn.open_table(ROOMS).map_err(err)?;
        for (rid, p) in rooms {
            let v = json!({"epoch": p.epoch, "top": p.top, "at": now}).to_string();
            table.insert(rid.as_str(), v.as_bytes()).map_err(err)?;
            let keep_from = p.top.saturating_sub(limits.size as u64) + 1;
            let aged: Vec<u64> = msgs
                .range((rid.as_str(), 0)..(rid.as_str(), keep_from.max(1)))
                .map_err(err)?
                .filter_map(|kv| kv.ok().map(|(k, _)| k.value().1))
                .chain(msgs.range((rid.as_str(), keep_from)..=(rid.as_str(), p.top)).map_err(err)?.map_while(|kv| {
                    let (k, v) = kv.ok()?;
                    let ms = u64::from_be_bytes(v.value().get(..8)?.try_into().ok()?);
                    (ms < oldest).then(|| k.value().1)
                }))
                .collect();
            for o in aged {
                msgs.remove((rid.as_str(), o)).map_err(err)?;
            }
        }
    }
    txn.commit().map_err(err)
}

fn forget(db: &Database, rids: &[String]) -> Result<(), String> {
    let txn = db.begin_write().map_err(err)?;
    {
        let mut rooms = txn.open_table(ROOMS).map_err(err)?;
        let mut msgs = txn.open_table(MESSAGES).map_err(err)?;
        for rid in rids {
            rooms.remove(rid.as_str()).map_err(err)?;
            msgs.retain_in((rid.as_str(), 0)..=(rid.as_str(), u64::MAX), |_, _| false).map_err(err)?;
        }
    }
    txn.commit().map_err(err)
}

/// Forgets messages past `ttl` and rooms not written for that long (what memory does with idle rooms);
/// the rooms forgotten.
fn sweep(db: &Database, ttl: Duration) -> Result<Vec<String>, String> {
    let oldest = unix_ms().saturating_sub(ttl.as_millis() as u64);
    let mut gone = Vec::new();
    let txn = db.begin_write().map_err(err)?;
    {
        let mut msgs = txn.open_table(MESSAGES).map_err(err)?;
        msgs.retain(|_, v| {
            v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).is_some_and(|ms| ms >= oldest)
        })
        .map_err(err)?;
        let mut rooms = txn.open_table(ROOMS).map_err(err)?;
        rooms
            .retain(|rid, v| {
                let keep = serde_json::from_slice::<Value>(v)
                    .ok()
                    .and_then(|v| v["at"].as_u64())
                    .is_some_and(|ms| ms >= oldest);
                if !keep {
                    gone.push(rid.to_string());
                }
                keep
            })
            .map_err(err)?;
    }
    txn.commit().map_err(err)?;
    Ok(gone)
}

/// A stored message's JSON after its timestamp: who, to whom, and the message as the sender's JSON.
#[derive(serde::Serialize)]
struct Body<'a> {
    f: &'a str,
    t: &'a str,
    m: &'a RawValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: usize) -> HistoryLimits {
        HistoryLimits { size, ttl: Duration::from_secs(60), rooms: 100 }
    }

    #[tokio::test]
    async fn committed_messages_survive_reopening_and_the_sequence_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("chat-1.redb");
        let mut h = DiskHistory::open(&file, limits(3), false).expect("open");
        let start = h.position("r").expect("position");
        for i in 1..=5 {
            assert_eq!(h.append("r", "ann", "*", &json!(format!("m{i}"))).expect("staged").offset, i);
        }
        assert!(h.read("r", &Query::Since(start.clone())).expect("read").is_none(), "only 3 are kept");
        h.commit().await.expect("stored");
        let got = h.read("r", &Query::Since(Since { epoch: start.epoch.clone(), offset: 2 })).expect("read");
        let got: Vec<_> = got.expect("covered").into_iter().map(|m| (m.offset, m.msg)).collect();
        assert_eq!(got, [(3, json!("m3")), (4, json!("m4")), (5, json!("m5"))]);
        assert!(h.read("r", &Query::Since(Since { epoch: start.epoch.clone(), offset: 1 })).expect("read").is_none());
        h.append("r", "ann", "*", &json!("not committed")).expect("staged");
        drop(h);
        let mut h = DiskHistory::open(&file, limits(3), false).expect("reopen");
        let p = h.position("r").expect("position");
        assert_eq!((p.epoch.as_str(), p.offset), (start.epoch.as_str(), 5), "the uncommitted one was never answered");
        let page = h.read("r", &Query::Before { before: None, limit: 2 }).expect("read").expect("a page");
        assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [4, 5]);
        drop(h);
        let mut h = DiskHistory::open(&file, limits(3), true).expect("fresh");
        assert_ne!(h.position("r").expect("position").epoch, start.epoch, "emptied: a new epoch");
    }

    #[tokio::test]
    async fn positions_are_cached_within_the_room_bound_and_read_back_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bound = HistoryLimits { size: 10, ttl: Duration::from_secs(60), rooms: 2 };
        let mut h = DiskHistory::open(&dir.path().join("c.redb"), bound, false).expect("open");
        let mut epochs = Vec::new();
        for r in ["a", "b", "c", "d"] {
            epochs.push(h.append(r, "x", "*", &json!(r)).expect("staged").epoch);
            h.commit().await.expect("stored");
            assert!(h.rooms.len() <= 2, "{} positions cached", h.rooms.len());
        }
        for (r, e) in ["a", "b", "c", "d"].iter().zip(epochs) {
            let p = h.position(r).expect("position");
            assert_eq!((p.epoch, p.offset), (e, 1), "{r} from the store");
        }
    }

    #[tokio::test]
    async fn moved_rooms_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.redb");
        let mut h = DiskHistory::open(&file, limits(10), false).expect("open");
        h.append("a", "x", "*", &json!(1)).expect("staged");
        h.append("b", "x", "*", &json!(1)).expect("staged");
        h.commit().await.expect("stored");
        let (a, b) = (h.position("a").expect("a").epoch, h.position("b").expect("b").epoch);
        h.retain(&|rid| rid == "a");
        // The writer forgets in order with later commits; a commit after it is a barrier.
        h.append("a", "x", "*", &json!(2)).expect("staged");
        h.commit().await.expect("stored");
        drop(h);
        let mut h = DiskHistory::open(&file, limits(10), false).expect("reopen");
        assert_eq!(h.position("a").expect("a").epoch, a);
        assert_ne!(h.position("b").expect("b").epoch, b, "b moved away: its history is gone");
    }
}
