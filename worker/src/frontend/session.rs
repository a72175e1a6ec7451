//! Sessions of one frontend process and their registry.
//!
//! A session is one client connection: a per-process id (from 1), an optional uid, a settings map and
//! the bounded outbound queue its writer task drains. [`Sessions`] maps id → session and uid → ids for
//! sessions that completed the handshake; other tasks (handlers, chat fan-out) push pre-encoded bytes
//! and kick through it. A kick cancels the session's token; its connection task does the rest (KICK
//! package, close, unregister, `on_close`). Nothing here spawns tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use pomelo_proto::wire::{self, Dictionary};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::config::FrontendConfig;
use super::metrics::{self, FrontendMetrics};
use super::queue::{OutQueue, PushError};

/// The KICK reason a client gets when its outbound queue overflows.
pub const QUEUE_FULL_REASON: &str = "outbound queue full: the client is not reading fast enough";

/// Why a session ends, decided by whoever ends it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Send KICK `{"reason": ..}` and close.
    Kick(String),
    /// Flush what is queued and close, without a KICK (handshake refused).
    Close(String),
    /// The outbound queue overflowed: the client is not reading; what is queued is dropped and a KICK
    /// with [`QUEUE_FULL_REASON`] is sent instead.
    QueueFull,
    /// The peer is gone (a write failed).
    PeerGone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("session {id} is already bound to uid {bound}")]
    AlreadyBound { id: u64, bound: String },
    #[error("session is closed")]
    Closed,
}

#[derive(Debug)]
pub(crate) struct SessionInner {
    pub(crate) id: u64,
    pub(crate) peer: SocketAddr,
    uid: Mutex<Option<String>>,
    settings: Mutex<HashMap<String, Value>>,
    pub(crate) queue: OutQueue,
    close: Mutex<Option<CloseReason>>,
    pub(crate) closing: CancellationToken,
    metrics: Arc<FrontendMetrics>,
    /// A JS client with protobuf on: strings beyond U+FFFF in protobuf pushes go to it as surrogate pairs.
    pub(crate) js_strings: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SessionInner {
    pub(crate) fn new(id: u64, peer: SocketAddr, cfg: &FrontendConfig, metrics: Arc<FrontendMetrics>) -> Self {
        SessionInner {
            id,
            peer,
            uid: Mutex::new(None),
            settings: Mutex::default(),
            queue: OutQueue::new(cfg.queue_max_packages, cfg.queue_max_bytes, cfg.max_batch_bytes, metrics.clone()),
            close: Mutex::new(None),
            closing: CancellationToken::new(),
            metrics,
            js_strings: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn wants_js_strings(&self) -> bool {
        self.js_strings.load(Ordering::Relaxed)
    }

    /// Records why the session ends (the first reason wins) and wakes its connection task.
    pub(crate) fn end(&self, reason: CloseReason) -> bool {
        let mut c = lock(&self.close);
        if c.is_some() {
            return false;
        }
        match reason {
            CloseReason::QueueFull => {
                // The backlog will not be read in time; free it now, but tell the client why it goes
                // (the KICK passes the cap; the writer gets `kick_flush_timeout` to deliver it).
                self.queue.replace_with_last(wire::kick(QUEUE_FULL_REASON));
                metrics::inc(&self.metrics.queue_full_total);
                metrics::inc(&self.metrics.kicks_total);
            }
            CloseReason::Kick(_) => metrics::inc(&self.metrics.kicks_total),
            CloseReason::Close(_) | CloseReason::PeerGone => {}
        }
        *c = Some(reason);
        drop(c);
        self.closing.cancel();
        true
    }

    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.close).clone()
    }

    /// Queues bytes; a full queue ends the session.
    pub(crate) fn send(&self, pkg: Bytes) -> bool {
        match self.queue.push(pkg) {
            Ok(()) => true,
            Err(PushError::Full) => {
                if self.end(CloseReason::QueueFull) {
                    tracing::info!(session = self.id, peer = %self.peer, "kicking client: {QUEUE_FULL_REASON}");
                }
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

/// A handle to one session, cheap to clone, given to handlers.
#[derive(Debug, Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
    registry: Arc<Sessions>,
}

impl Session {
    pub(crate) fn new(inner: Arc<SessionInner>, registry: Arc<Sessions>) -> Session {
        Session { inner, registry }
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    pub fn uid(&self) -> Option<String> {
        lock(&self.inner.uid).clone()
    }

    /// Binds a uid; binding the same uid again is fine, another uid is refused (Pomelo's `bind`).
    pub fn bind(&self, uid: &str) -> Result<(), BindError> {
        self.registry.bind(&self.inner, uid)
    }

    pub fn unbind(&self) {
        self.registry.unbind(&self.inner);
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        lock(&self.inner.settings).get(key).cloned()
    }

    pub fn set(&self, key: &str, value: Value) {
        lock(&self.inner.settings).insert(key.to_owned(), value);
    }

    pub fn settings(&self) -> HashMap<String, Value> {
        lock(&self.inner.settings).clone()
    }

    /// Pushes `body` as JSON under `route` (dictionary-coded if the route is in the dictionary).
    pub fn push_json(&self, route: &str, body: &Value) -> bool {
        match self.registry.encode_push(route, body) {
            Some(b) if self.inner.wants_js_strings() => {
                let js = self.registry.js_copy(&b);
                self.push_bytes(js.unwrap_or(b))
            }
            Some(b) => self.push_bytes(b),
            None => false,
        }
    }

    /// Queues one or more whole pre-encoded packages. `false` if the session is closed or was just
    /// kicked because its queue is full.
    pub fn push_bytes(&self, pkg: Bytes) -> bool {
        self.inner.send(pkg)
    }

    /// Kicks the client: KICK `{"reason": reason}`, then close.
    pub fn kick(&self, reason: &str) {
        self.inner.end(CloseReason::Kick(reason.to_owned()));
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closing.is_cancelled()
    }

    /// The registry this session belongs to.
    pub fn registry(&self) -> &Arc<Sessions> {
        &self.registry
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_id: HashMap<u64, Arc<SessionInner>>,
    by_uid: HashMap<String, Vec<u64>>,
}

/// The live sessions of one frontend; share it as `Arc<Sessions>`.
#[derive(Debug)]
pub struct Sessions {
    maps: Mutex<Maps>,
    next_id: AtomicU64,
    dict: Option<Arc<Dictionary>>,
    protobuf: pomelo_proto::wire::protobuf::Protobuf,
    metrics: Arc<FrontendMetrics>,
}

impl Sessions {
    pub fn new(config: &FrontendConfig, metrics: Arc<FrontendMetrics>) -> Arc<Sessions> {
        Arc::new(Sessions {
            maps: Mutex::default(),
            next_id: AtomicU64::new(1),
            dict: config.use_dict.then(|| config.dictionary.clone()),
            protobuf: config.protobuf.clone(),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<FrontendMetrics> {
        &self.metrics
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register(&self, s: &Arc<SessionInner>) {
        lock(&self.maps).by_id.insert(s.id, s.clone());
    }

    /// Removes a session (and its uid binding); returns whether it was registered.
    pub(crate) fn unregister(&self, s: &SessionInner) -> bool {
        let mut m = lock(&self.maps);
        let was = m.by_id.remove(&s.id).is_some();
        if let Some(uid) = lock(&s.uid).as_ref() {
            remove_uid(&mut m, uid, s.id);
        }
        was
    }

    fn bind(&self, s: &Arc<SessionInner>, uid: &str) -> Result<(), BindError> {
        let mut m = lock(&self.maps);
        if !m.by_id.contains_key(&s.id) {
            return Err(BindError::Closed);
        }
        let mut cur = lock(&s.uid);
        match cur.as_deref() {
            Some(b) if b == uid => return Ok(()),
            Some(b) => return Err(BindError::AlreadyBound { id: s.id, bound: b.to_owned() }),
            None => {}
        }
        *cur = Some(uid.to_owned());
        m.by_uid.entry(uid.to_owned()).or_default().push(s.id);
        Ok(())
    }

    fn unbind(&self, s: &SessionInner) {
        let mut m = lock(&self.maps);
        if let Some(uid) = lock(&s.uid).take() {
            remove_uid(&mut m, &uid, s.id);
        }
    }

    /// Sessions bound to `uid` (several if the same uid logged in more than once).
    pub fn get_by_uid(self: &Arc<Self>, uid: &str) -> Vec<Session> {
        let m = lock(&self.maps);
        let ids = m.by_uid.get(uid).map(Vec::as_slice).unwrap_or_default();
        ids.iter().filter_map(|id| m.by_id.get(id)).map(|s| Session::new(s.clone(), self.clone())).collect()
    }

    pub fn get(self: &Arc<Self>, id: u64) -> Option<Session> {
        lock(&self.maps).by_id.get(&id).map(|s| Session::new(s.clone(), self.clone()))
    }

    /// Sessions that completed the handshake and are still open.
    pub fn count(&self) -> usize {
        lock(&self.maps).by_id.len()
    }

    /// Queues the same encoded bytes on each session (a refcount bump each); returns how many took them.
    pub fn push_bytes(&self, session_ids: &[u64], pkg: &Bytes) -> usize {
        let targets: Vec<Arc<SessionInner>> = {
            let m = lock(&self.maps);
            session_ids.iter().filter_map(|id| m.by_id.get(id).cloned()).collect()
        };
        if self.protobuf.is_none() {
            return targets.iter().filter(|s| s.send(pkg.clone())).count();
        }
        // The JS clients' copy, made at most once per delivery and only when it differs.
        let mut js: Option<Option<Bytes>> = None;
        targets
            .iter()
            .filter(|s| match s.wants_js_strings() {
                true => s.send(js.get_or_insert_with(|| self.js_copy(pkg)).clone().unwrap_or_else(|| pkg.clone())),
                false => s.send(pkg.clone()),
            })
            .count()
    }

    /// What a JS client gets instead of `pkg` (see `ProtoBundle::js_strings`), if anything.
    fn js_copy(&self, pkg: &Bytes) -> Option<Bytes> {
        self.protobuf.as_ref()?.js_strings(self.dict.as_deref(), pkg)
    }

    /// Encodes a push once, with this frontend's dictionary and protos. `None` for a route over 255 bytes
    /// or a body its proto cannot carry (logged).
    pub fn encode_push(&self, route: &str, body: &Value) -> Option<Bytes> {
        wire::encode_push_with(self.dict.as_deref(), self.protobuf.as_deref(), route, body)
            .map_err(|e| tracing::warn!("cannot encode a {route:?} push: {e}"))
            .ok()
    }

    pub fn kick_uid(&self, uid: &str, reason: &str) -> usize {
        let targets: Vec<Arc<SessionInner>> = {
            let m = lock(&self.maps);
            let ids = m.by_uid.get(uid).map(Vec::as_slice).unwrap_or_default();
            ids.iter().filter_map(|id| m.by_id.get(id).cloned()).collect()
        };
        targets.iter().filter(|s| s.end(CloseReason::Kick(reason.to_owned()))).count()
    }

    pub fn kick_session(&self, id: u64, reason: &str) -> bool {
        let s = lock(&self.maps).by_id.get(&id).cloned();
        s.is_some_and(|s| s.end(CloseReason::Kick(reason.to_owned())))
    }
}

fn remove_uid(m: &mut Maps, uid: &str, id: u64) {
    if let Some(ids) = m.by_uid.get_mut(uid) {
        ids.retain(|x| *x != id);
        if ids.is_empty() {
            m.by_uid.remove(uid);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn setup() -> (Arc<Sessions>, Session, Session) {
        let cfg = FrontendConfig { queue_max_bytes: 1 << 20, ..FrontendConfig::gate() };
        let reg = Sessions::new(&cfg, Arc::new(FrontendMetrics::new()));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mk = |reg: &Arc<Sessions>| {
            let inner = Arc::new(SessionInner::new(reg.next_id(), peer, &cfg, reg.metrics().clone()));
            reg.register(&inner);
            Session::new(inner, reg.clone())
        };
        let a = mk(&reg);
        let b = mk(&reg);
        (reg, a, b)
    }

    #[test]
    fn ids_bind_lookup_and_unregister() {
        let (reg, a, b) = setup();
        assert_eq!((a.id(), b.id()), (1, 2));
        a.bind("bob*r1").unwrap();
        a.bind("bob*r1").unwrap();
        assert!(matches!(a.bind("eve*r1"), Err(BindError::AlreadyBound { .. })));
        b.bind("bob*r1").unwrap();
        assert_eq!(reg.get_by_uid("bob*r1").len(), 2);
        assert!(reg.unregister(&a.inner));
        assert_eq!(reg.get_by_uid("bob*r1").iter().map(Session::id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(a.bind("x"), Err(BindError::Closed));
        b.unbind();
        assert!(reg.get_by_uid("bob*r1").is_empty());
        assert_eq!(reg.count(), 1);
    }

    #[test]
    fn kicks_record_the_first_reason() {
        let (reg, a, b) = setup();
        b.bind("u").unwrap();
        assert_eq!(reg.kick_uid("u", "bye"), 1);
        assert!(b.is_closed());
        b.kick("later");
        assert_eq!(b.inner.close_reason(), Some(CloseReason::Kick("bye".into())));
        assert!(reg.kick_session(a.id(), "kick"));
        assert!(!reg.kick_session(99, "kick"));
        assert_eq!(reg.metrics().kicks_total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn push_bytes_shares_and_overflow_kicks() {
        let (reg, a, b) = setup();
        let pkg = Bytes::from(vec![0u8; 400 * 1024]);
        assert_eq!(reg.push_bytes(&[a.id(), b.id(), 77], &pkg), 2);
        assert_eq!(reg.push_bytes(&[a.id()], &pkg), 1);
        // Third 400 KiB push passes the 1 MiB cap: kicked, queue dropped.
        assert_eq!(reg.push_bytes(&[a.id()], &pkg), 0);
        assert_eq!(a.inner.close_reason(), Some(CloseReason::QueueFull));
        assert_eq!(reg.metrics().queue_full_total.load(Ordering::Relaxed), 1);
        assert!(!a.push_json("onChat", &serde_json::json!({})));
        assert!(b.push_json("onChat", &serde_json::json!({"msg":"hi"})));
    }
}
