//! The admin server on the master's admin address (default 127.0.0.1:7001).
//!
//! | route | module | token |
//! |---|---|---|
//! | `GET /healthz` | here | no |
//! | `GET /` (dashboard, or the login form), `POST /login`, `POST /logout` | [`page`] | no (shows nothing without it) |
//! | `GET /assets/app.js`, `/assets/app.css` | [`page`] | yes |
//! | `GET /api/servers`, `/api/servers/{id}`, `/api/servers/{id}/logs`; `POST /api/servers/{id}/{restart,stop,start}`, `/api/reload`, `/api/shutdown` | [`api`] | yes |
//! | `GET /api/events` (SSE live feed) | [`sse`] | yes |
//! | `GET /metrics` (Prometheus) | [`metrics`] | yes |
//!
//! The token is a bearer header or the login session's cookie ([`auth`]); mutations are POST-only, and
//! cookie-driven ones must be same-origin; every request must name this server in `Host`. Connections are
//! capped at [`MAX_CONNECTIONS`] and each must send its request head within [`HEADER_READ_TIMEOUT`], so
//! idle sockets cannot use up the master's files. The server reads the cluster only through a [`MasterHandle`]. When `shutdown`
//! is cancelled it stops accepting, ends every live feed, and lets the other requests finish.

pub mod api;
pub mod auth;
pub mod histogram;
pub mod metrics;
pub mod page;
pub mod process;
pub mod sse;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use pomelo_master::MasterHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// Live feeds (browser tabs, `curl`s) open at once.
pub const MAX_FEEDS: usize = 32;

/// Connections open at once (live feeds included); more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection must send a whole request head within this, for its first request and for every next
/// one (an idle keep-alive connection is closed then).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` is cancelled. `hosts`: the names besides IP literals and `localhost` that
/// may appear in `Host` (`master.adminHosts`).
pub async fn serve(
    listener: TcpListener,
    handle: MasterHandle,
    token: Arc<str>,
    hosts: Vec<String>,
    shutdown: CancellationToken,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let keys = auth::Keys::new(token);
    let feeds = sse::Feeds::new(handle.clone(), MAX_FEEDS, shutdown.clone());
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok".into_response());
    let public = healthz.or(page::routes(keys.clone())).unify();
    let private = auth::guard(keys).and(
        api::routes(handle.clone())
            .or(sse::route(feeds.clone()))
            .unify()
            .or(metrics::route(handle, feeds))
            .unify()
            .or(page::assets())
            .unify(),
    );
    let routes = auth::host(auth::HostAllow::new(port, &hosts))
        .and(public.or(private).unify())
        .recover(recover)
        .with(warp::reply::with::header("x-content-type-options", "nosniff"));

    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    pomelo_proto::link::accept_loop(listener, shutdown, "admin server", |stream, peer| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin server: {MAX_CONNECTIONS} connections open; closing one from {peer}");
            return;
        };
        let svc = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("admin connection from {peer}: {e}");
            }
            drop(slot);
        });
    })
    .await;
    // The listener is closed; the connections in hand finish (live feeds end with `shutdown`).
    graceful.shutdown().await;
}

async fn recover(r: Rejection) -> Result<Response, Infallible> {
    use warp::reject::{LengthRequired, MethodNotAllowed, PayloadTooLarge, UnsupportedMediaType};
    Ok(if r.find::<auth::Unauthorized>().is_some() {
        api::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>`, or log in at /",
        )
    } else if r.find::<auth::Throttled>().is_some() {
        api::error(StatusCode::TOO_MANY_REQUESTS, "too many wrong tokens", "wait a moment before trying again")
    } else if r.find::<auth::WrongHost>().is_some() {
        api::error(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown host",
            "use an IP address or localhost, or list the name in master.adminHosts",
        )
    } else if r.find::<auth::CrossOrigin>().is_some() {
        api::error(StatusCode::FORBIDDEN, "cross-origin request", "cookie-authenticated POSTs must come from this page")
    } else if r.is_not_found() {
        api::error(StatusCode::NOT_FOUND, "not found", "no such route")
    } else if r.find::<MethodNotAllowed>().is_some() {
        api::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "mutations are POST-only")
    } else if r.find::<PayloadTooLarge>().is_some() {
        api::error(StatusCode::PAYLOAD_TOO_LARGE, "body too large", format!("at most {} bytes", page::MAX_FORM))
    } else if r.find::<LengthRequired>().is_some() {
        api::error(StatusCode::LENGTH_REQUIRED, "length required", "send a Content-Length")
    } else if r.find::<UnsupportedMediaType>().is_some() {
        api::error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type", "send a form")
    } else {
        tracing::debug!("admin request rejected: {r:?}");
        api::error(StatusCode::BAD_REQUEST, "bad request", "the request could not be understood")
    })
}
