//! What a frontend asks of the application: the [`Handler`] trait (routes, requests, close hook,
//! handshake hooks, plain HTTP). Handlers run inside their connection's task, so a slow handler only
//! delays its own client; a connection runs at most `max_inflight_requests` of them at once.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde_json::Value;

use super::session::Session;

/// A boxed, sendable future (handlers are trait objects, so their futures are boxed).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A handler failure: the client gets `{"code":500}` (Pomelo's `next(err)` without a code).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    pub fn new(msg: impl Into<String>) -> HandlerError {
        HandlerError(msg.into())
    }
}

/// REQUEST (answered) or NOTIFY (never answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Request,
    Notify,
}

/// One client message routed to a handler.
#[derive(Debug, Clone)]
pub struct Request {
    pub session: Session,
    /// `serverType.handler.method`, already checked to be one of [`Handler::routes`].
    pub route: String,
    /// The parsed body (`{}` when it was not JSON).
    pub body: Value,
    pub kind: RequestKind,
}

/// The application side of a frontend.
pub trait Handler: Send + Sync + 'static {
    /// The routes this frontend answers; any other route gets `{"code":500}`.
    fn routes(&self) -> Vec<String>;

    /// Handles one request or notify. `Ok(body)` is sent as is (`null` becomes `{}`); no `code` is added.
    fn handle<'a>(&'a self, req: Request) -> BoxFuture<'a, Result<Value, HandlerError>>;

    /// Called once when a session that completed the handshake closes, for whatever reason.
    fn on_close<'a>(&'a self, session: Session) -> BoxFuture<'a, ()> {
        let _ = session;
        Box::pin(std::future::ready(()))
    }

    /// Pomelo's `checkClient(type, version)`; `false` answers the handshake with code 501.
    fn check_client(&self, client_type: Option<&str>, client_version: Option<&str>) -> bool {
        let _ = (client_type, client_version);
        true
    }

    /// Pomelo's user `handshake` hook: what it returns is sent back as `user` (nothing by default, as in
    /// the demo); an error answers the handshake with code 500.
    fn handshake_user(&self, user: Option<&Value>) -> Result<Option<Value>, HandlerError> {
        let _ = user;
        Ok(None)
    }

    /// A plain HTTP `GET` (not a WebSocket upgrade) on the client port: `(content type, body)`, or `None`
    /// for 404.
    fn http_get(&self, path: &str) -> Option<(String, Bytes)> {
        let _ = path;
        None
    }
}
