//! One client connection: its task, its writer task and its teardown.
//!
//! The connection task owns the read half, the protocol phase, the timers and the handler futures of
//! this client (at most `max_inflight_requests`, polled in the same task). What one read brings is
//! dispatched package by package as that cap allows (`intake.rs`); the next read waits until it is all
//! dispatched, and a session over `max_requests_per_second` is kicked with a reason. Everything it sends goes
//! through the session's bounded queue; a writer task owns the write half and writes what is queued in
//! batches, as WebSocket messages of at most `max_batch_bytes` cut at package boundaries. The task ends
//! on peer close, malformed input (one log line, one counter), a timeout, a kick (its session token), or
//! shutdown (which kicks with "server shutting down"); `close.rs` logs why. Teardown: unregister,
//! cancel handler futures, flush a KICK within `kick_flush_timeout`, run `on_close` within
//! `close_hook_timeout`. The `force` token drops everything at once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use pomelo_proto::wire::{self, handshake, Package, PackageDecoder, PackageType};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::close::{self, End};
use super::config::FrontendConfig;
use super::handler::{BoxFuture, Handler, HandlerError, Request, RequestKind};
use pomelo_proto::wire::crypto::ClientKey;

use super::intake::{Intake, IntakeError, RateLimit};
use super::metrics::{self, FrontendMetrics};
use super::session::{CloseReason, Session, SessionInner, Sessions};
use super::state::{self, Action, Ctx, Phase};
use super::transport::{self, Accepted, Inbound, Reader, Writer};

/// What every connection of one listener shares.
pub(crate) struct Shared {
    pub(crate) config: FrontendConfig,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) routes: HashSet<String>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) metrics: Arc<FrontendMetrics>,
    pub(crate) ws_config: WebSocketConfig,
    pub(crate) decoder: PackageDecoder,
}

/// A request's id (none for a notify), its route when the response has a server proto, and its answer.
type Answer = (Option<u32>, Option<String>, Result<Value, HandlerError>);
type Inflight<'a> = FuturesUnordered<BoxFuture<'a, Answer>>;

pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let cfg = &shared.config;
    let started = Instant::now();
    // Boxed: the HTTP/WebSocket upgrade state is large and only needed until the protocol starts, so a
    // long-lived connection task does not carry it.
    let accept = Box::pin(transport::accept(
        stream,
        &*shared.handler,
        shared.ws_config,
        shared.config.tls.as_ref().map(|t| &t.0),
    ));
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = timeout(cfg.handshake_timeout, accept) => r,
    };
    let accepted = match accepted {
        Ok(Ok(a)) => a,
        Ok(Err(transport::AcceptError::BadHttp(why))) => {
            metrics::inc(&shared.metrics.protocol_errors_total);
            tracing::info!(%peer, "closing connection: {why}");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "connection ended before the protocol started: {e}");
            return;
        }
        Err(_) => {
            metrics::inc(&shared.metrics.timeouts_total);
            tracing::info!(%peer, "closing connection: nothing usable within the handshake timeout");
            return;
        }
    };
    if matches!(accepted, Accepted::HttpAnswered) {
        metrics::inc(&shared.metrics.http_requests_total);
        return;
    }
    let Some((mut reader, writer)) = transport::split(accepted) else { return };
    let inner = Arc::new(SessionInner::new(shared.sessions.next_id(), peer, cfg, shared.metrics.clone()));
    let mut writer_task = tokio::spawn(write_loop(writer, inner.clone(), shared.metrics.clone(), cfg.max_batch_bytes));
    let _guard = Teardown { inner: inner.clone(), sessions: shared.sessions.clone() };

    let mut conn = Conn { shared: &shared, inner: &inner, phase: Phase::Inited, registered: false, key: None };
    let end = conn.read_loop(&mut reader, started, &shutdown, &force).await;
    let registered = conn.registered;

    if registered {
        shared.sessions.unregister(&inner);
    }
    close::settle(&end, &inner, peer, &shared.metrics);
    // Let the writer flush a KICK or handshake error, but not for long.
    let flushed = tokio::select! {
        _ = force.cancelled() => false,
        r = timeout(cfg.kick_flush_timeout, &mut writer_task) => r.is_ok(),
    };
    if !flushed {
        writer_task.abort();
    } else if matches!(end, End::Closing | End::Protocol(_)) {
        // A lingering close, so the KICK is not lost to a reset (see `Reader::linger`).
        tokio::select! {
            _ = force.cancelled() => {}
            _ = reader.linger(cfg.kick_flush_timeout) => {}
        }
    }
    inner.queue.release_all();
    inner.closing.cancel();
    if registered {
        let session = Session::new(inner.clone(), shared.sessions.clone());
        if timeout(cfg.close_hook_timeout, shared.handler.on_close(session)).await.is_err() {
            tracing::warn!(session = inner.id, "on_close hook took longer than {:?}", cfg.close_hook_timeout);
        }
    }
}

/// Last-resort cleanup if the connection task unwinds: unregister, stop the writer. Idempotent, so it
/// also runs (harmlessly) after a normal teardown.
struct Teardown {
    inner: Arc<SessionInner>,
    sessions: Arc<Sessions>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.sessions.unregister(&self.inner);
        self.inner.queue.abort();
        self.inner.queue.release_all();
        self.inner.closing.cancel();
    }
}

async fn write_loop(mut w: Writer, s: Arc<SessionInner>, m: Arc<FrontendMetrics>, max_message: usize) {
    while let Some((batch, packages)) = s.queue.next_batch().await {
        let len = batch.len();
        let r = w.write(batch, max_message).await;
        s.queue.written(len);
        if let Err(e) = r {
            metrics::inc(&m.write_failures_total);
            if s.end(CloseReason::PeerGone) {
                tracing::info!(session = s.id, peer = %s.peer, "connection lost: write failed: {e}");
            }
            return;
        }
        metrics::add(&m.bytes_out_total, len);
        metrics::add(&m.packages_out_total, packages);
    }
    if !s.queue.is_aborted() {
        w.close().await;
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    inner: &'a Arc<SessionInner>,
    phase: Phase,
    registered: bool,
    /// `useCrypto`: the key the client sent in its handshake; its messages must be signed with it.
    key: Option<ClientKey>,
}

impl<'a> Conn<'a> {
    async fn read_loop(
        &mut self,
        reader: &mut Reader,
        started: Instant,
        shutdown: &CancellationToken,
        force: &CancellationToken,
    ) -> End {
        let cfg = &self.shared.config;
        let handler: &'a dyn Handler = &*self.shared.handler;
        let mut inflight: Inflight<'a> = FuturesUnordered::new();
        let mut intake = Intake::default();
        let mut rate = RateLimit::new(cfg.max_requests_per_second, Instant::now());
        let deadline = sleep_until(started + cfg.handshake_timeout);
        tokio::pin!(deadline);
        loop {
            if let Some(end) = self.dispatch(&mut intake, &mut rate, handler, &mut inflight, deadline.as_mut()) {
                return end;
            }
            // Read again only once everything read so far is dispatched: one read's worth is the bound.
            let can_read = intake.is_drained() && inflight.len() < cfg.max_inflight_requests;
            tokio::select! {
                biased;
                _ = force.cancelled() => return End::Forced,
                _ = self.inner.closing.cancelled() => return End::Closing,
                _ = shutdown.cancelled() => {
                    self.inner.end(CloseReason::Kick("server shutting down".into()));
                }
                _ = &mut deadline => {
                    return End::Timeout(match (self.phase, cfg.heartbeat) {
                        (Phase::Working, Some(_)) => "heartbeat timeout",
                        (Phase::Working, None) => "idle timeout",
                        _ => "handshake timeout",
                    });
                }
                Some((id, route, res)) = inflight.next(), if !inflight.is_empty() => {
                    self.respond(id, route.as_deref(), res)
                }
                r = reader.read(intake.tcp_buf()), if can_read => match r {
                    Ok(Inbound::Closed) => return End::PeerClosed,
                    Err(transport::ReadError::Malformed(e)) => return End::Protocol(e),
                    Err(transport::ReadError::Reset(e)) => return End::PeerReset(e),
                    Err(transport::ReadError::Io(e)) => return End::Failed(e),
                    Ok(Inbound::Message(b)) => {
                        metrics::add(&self.shared.metrics.bytes_in_total, b.len());
                        intake.message(&b);
                    }
                    Ok(Inbound::Stream(n)) => metrics::add(&self.shared.metrics.bytes_in_total, n),
                },
            }
        }
    }

    /// Acts on buffered packages in order while the caps allow: a request waits while
    /// `max_inflight_requests` are in flight, and a session over `max_requests_per_second` is kicked.
    fn dispatch(
        &mut self,
        intake: &mut Intake,
        rate: &mut RateLimit,
        handler: &'a dyn Handler,
        inflight: &mut Inflight<'a>,
        mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Option<End> {
        let cfg = &self.shared.config;
        while !self.inner.closing.is_cancelled() {
            let next = match intake.peek(&self.shared.decoder) {
                Ok(next) => next,
                Err(e) => {
                    if matches!(e, IntakeError::Package(wire::PackageError::TooLarge { .. })) {
                        metrics::inc(&self.shared.metrics.oversized_total);
                    }
                    return Some(End::Protocol(e.to_string()));
                }
            };
            let pkg = next?;
            if pkg.kind == PackageType::Data {
                if inflight.len() >= cfg.max_inflight_requests {
                    return None;
                }
                if !rate.take(Instant::now()) {
                    metrics::inc(&self.shared.metrics.rate_limited_total);
                    let reason = format!("too many requests: more than {} per second", cfg.max_requests_per_second);
                    tracing::info!(session = self.inner.id, peer = %self.inner.peer, "kicking client: {reason}");
                    self.inner.end(CloseReason::Kick(reason));
                    return None;
                }
            }
            let pkg = intake.pop()?;
            metrics::inc(&self.shared.metrics.packages_in_total);
            if let Some(end) = self.on_package(pkg, handler, inflight, deadline.as_mut()) {
                return Some(end);
            }
        }
        None
    }

    fn on_package(
        &mut self,
        pkg: Package,
        handler: &'a dyn Handler,
        inflight: &mut Inflight<'a>,
        deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Option<End> {
        let cfg = &self.shared.config;
        let was_working = self.phase == Phase::Working;
        let ctx = Ctx {
            dict: cfg.dict(),
            protos: cfg.protobuf.as_deref(),
            key: self.key.as_ref(),
            routes: &self.shared.routes,
        };
        let action = state::on_package(&mut self.phase, pkg, &ctx);
        // Without heartbeats, any package keeps the connection alive; with them, only heartbeats do.
        if was_working && cfg.heartbeat.is_none() {
            deadline.reset(Instant::now() + cfg.working_timeout());
            return self.act(action, handler, inflight, None);
        }
        self.act(action, handler, inflight, Some(deadline))
    }

    fn act(
        &mut self,
        action: Action,
        handler: &'a dyn Handler,
        inflight: &mut Inflight<'a>,
        deadline: Option<std::pin::Pin<&mut tokio::time::Sleep>>,
    ) -> Option<End> {
        let cfg = &self.shared.config;
        let rearm = |d: Option<std::pin::Pin<&mut tokio::time::Sleep>>| {
            if let Some(d) = d {
                d.reset(Instant::now() + cfg.working_timeout());
            }
        };
        match action {
            Action::Ignore(why) => tracing::debug!(session = self.inner.id, "ignored package: {why}"),
            Action::Handshake(req) => self.handshake(req, handler),
            Action::Ack => {
                self.shared.sessions.register(self.inner);
                self.registered = true;
                if cfg.heartbeat.is_some() {
                    self.inner.send(wire::package::empty(PackageType::Heartbeat));
                }
                rearm(deadline);
            }
            Action::Heartbeat => {
                // Pomelo's heartbeat handler does nothing when the connector has no heartbeat.
                if cfg.heartbeat.is_some() {
                    self.inner.send(wire::package::empty(PackageType::Heartbeat));
                    rearm(deadline);
                }
            }
            Action::Dispatch { id, route, body } => {
                metrics::inc(&self.shared.metrics.requests_total);
                let kind = if id.is_some() { RequestKind::Request } else { RequestKind::Notify };
                let session = Session::new(self.inner.clone(), self.shared.sessions.clone());
                let proto_route = cfg.protobuf.as_ref().filter(|p| p.encodes(&route)).map(|_| route.clone());
                let fut = AssertUnwindSafe(handler.handle(Request { session, route, body, kind })).catch_unwind();
                inflight.push(Box::pin(async move {
                    // A panicking handler answers 500 instead of taking the connection task down.
                    (id, proto_route, fut.await.unwrap_or_else(|_| Err(HandlerError::new("handler panicked"))))
                }));
            }
            Action::Error500 { id, why, route } => {
                tracing::debug!(session = self.inner.id, "answering request {id} with 500: {why}");
                let body = self.error_body(route.as_deref());
                self.send_response(id, &body);
            }
            Action::BadSignature { id, why } => {
                metrics::inc(&self.shared.metrics.bad_signatures_total);
                tracing::warn!(session = self.inner.id, peer = %self.inner.peer, "refused a message: {why}");
                if let Some(id) = id {
                    let body = serde_json::json!({"code": 500, "message": format!("bad signature: {why}")});
                    self.send_response(id, &serde_json::to_vec(&body).unwrap_or_default());
                }
            }
            Action::Kick(reason) => {
                tracing::warn!(session = self.inner.id, peer = %self.inner.peer, "kicking client: {reason}");
                self.inner.end(CloseReason::Kick(reason.to_owned()));
            }
            Action::ProtocolError(e) => return Some(End::Protocol(e)),
        }
        None
    }

    fn handshake(&mut self, req: handshake::HandshakeRequest, handler: &dyn Handler) {
        let cfg = &self.shared.config;
        let key = match cfg.use_crypto.then(|| ClientKey::from_handshake(req.rsa.as_ref())) {
            Some(Err(e)) => {
                tracing::info!(session = self.inner.id, peer = %self.inner.peer, "handshake refused: {e}");
                Err(())
            }
            Some(Ok(key)) => Ok(key),
            None => Ok(None),
        };
        let reply = if !req.has_sys || key.is_err() {
            Err(handshake::CODE_USE_ERROR)
        } else if !handshake::client_allowed(
            &cfg.check_client,
            req.client_type.as_deref(),
            req.client_version.as_deref(),
        ) || !handler.check_client(req.client_type.as_deref(), req.client_version.as_deref())
        {
            Err(handshake::CODE_OLD_CLIENT)
        } else {
            match handler.handshake_user(req.user.as_ref()) {
                Ok(user) => {
                    let offer = handshake::Offer {
                        heartbeat: cfg.heartbeat,
                        dict: cfg.dict(),
                        protos: cfg.protobuf.as_deref(),
                    };
                    handshake::ok_reply(offer, &req, user.as_ref()).map_err(|_| handshake::CODE_USE_ERROR)
                }
                Err(e) => {
                    tracing::info!(session = self.inner.id, "handshake hook refused the client: {:?}", e.to_string());
                    Err(handshake::CODE_USE_ERROR)
                }
            }
        };
        match reply {
            Ok(bytes) => {
                self.key = key.ok().flatten();
                // The JS client (browser, cocos2d-js) reads protobuf strings beyond U+FFFF only as surrogate pairs.
                let js = req.client_type.as_deref().is_some_and(|t| t.starts_with("js-"));
                if js && cfg.protobuf.is_some() {
                    self.inner.js_strings.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                metrics::inc(&self.shared.metrics.handshakes_total);
                self.inner.send(bytes);
                state::handshake_accepted(&mut self.phase);
            }
            Err(code) => {
                self.inner.send(handshake::error_reply(code));
                self.inner.end(CloseReason::Close(format!("handshake refused with code {code}")));
            }
        }
    }

    /// How this client reads protobuf strings.
    fn strings(&self) -> pomelo_proto::wire::protobuf::Strings {
        match self.inner.js_strings.load(std::sync::atomic::Ordering::Relaxed) {
            true => pomelo_proto::wire::protobuf::Strings::Cesu8,
            false => pomelo_proto::wire::protobuf::Strings::Utf8,
        }
    }

    /// `{"code":500}`, as protobuf when `route` has a server proto that can carry it; an empty body (which
    /// a protobuf client reads as `{}`) when the proto cannot.
    fn error_body(&self, route: Option<&str>) -> Vec<u8> {
        let error = serde_json::json!({"code": 500});
        match wire::encode_body_with(
            self.shared.config.protobuf.as_deref(),
            route.unwrap_or_default(),
            &error,
            self.strings(),
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(session = self.inner.id, "cannot write {{\"code\":500}} in {route:?}'s proto: {e}");
                Vec::new()
            }
        }
    }

    fn respond(&mut self, id: Option<u32>, route: Option<&str>, res: Result<Value, HandlerError>) {
        let Some(id) = id else {
            match res {
                Ok(v) if !v.is_null() => tracing::warn!(session = self.inner.id, "handler answered a notify; dropped"),
                Err(e) => tracing::warn!(session = self.inner.id, "notify handler failed: {:?}", e.to_string()),
                Ok(_) => {}
            }
            return;
        };
        let protos = self.shared.config.protobuf.as_deref();
        let body = match (res, route) {
            (Ok(v), Some(route)) => {
                let v = if v.is_null() { Value::Object(Default::default()) } else { v };
                match wire::encode_body_with(protos, route, &v, self.strings()) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(session = self.inner.id, "response {id} does not fit {route}'s proto: {e}");
                        self.error_body(Some(route))
                    }
                }
            }
            (Ok(Value::Null), None) => b"{}".to_vec(),
            (Ok(v), None) => pomelo_proto::wire::text::escape_non_bmp(
                serde_json::to_vec(&v).unwrap_or_else(|_| br#"{"code":500}"#.to_vec()),
            ),
            (Err(e), route) => {
                // Handler errors may quote what the client sent: Debug-quoted, so it cannot forge lines.
                tracing::warn!(session = self.inner.id, "request {id} failed: {:?}", e.to_string());
                self.error_body(route)
            }
        };
        self.send_response(id, &body);
    }

    fn send_response(&self, id: u32, body: &[u8]) {
        match wire::encode_response(id, body) {
            Ok(b) => {
                self.inner.send(b);
            }
            Err(e) => {
                tracing::warn!(session = self.inner.id, "response {id} cannot be encoded ({e}); sending 500");
                if let Ok(b) = wire::encode_response(id, br#"{"code":500}"#) {
                    self.inner.send(b);
                }
            }
        }
    }
}
