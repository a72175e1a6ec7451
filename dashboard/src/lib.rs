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
//! The token is a bearer header or the login cookie ([`auth`]); mutations are POST-only, and cookie-driven
//! ones must be same-origin. The server reads the cluster only through a [`MasterHandle`]. When `shutdown`
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

use pomelo_master::MasterHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// Live feeds (browser tabs, `curl`s) open at once.
pub const MAX_FEEDS: usize = 32;

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, handle: MasterHandle, token: Arc<str>, shutdown: CancellationToken) {
    let feeds = sse::Feeds::new(handle.clone(), MAX_FEEDS, shutdown.clone());
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok".into_response());
    let public = healthz.or(page::routes(token.clone())).unify();
    let private = auth::guard(token).and(
        api::routes(handle.clone())
            .or(sse::route(feeds.clone()))
            .unify()
            .or(metrics::route(handle, feeds))
            .unify()
            .or(page::assets())
            .unify(),
    );
    let routes = public
        .or(private)
        .unify()
        .recover(recover)
        .with(warp::reply::with::header("x-content-type-options", "nosniff"));
    warp::serve(routes).incoming(listener).graceful(async move { shutdown.cancelled().await }).run().await;
}

async fn recover(r: Rejection) -> Result<Response, Infallible> {
    use warp::reject::{LengthRequired, MethodNotAllowed, PayloadTooLarge, UnsupportedMediaType};
    Ok(if r.find::<auth::Unauthorized>().is_some() {
        api::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>`, or log in at /",
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
        api::error(StatusCode::BAD_REQUEST, "bad request", format!("{r:?}"))
    })
}
