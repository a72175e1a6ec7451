//! The admin server on the master's admin address (default 127.0.0.1:7001).
//!
//! Routes (see each module for details): `GET /healthz` (no token); the JSON API under `/api/` ([`api`]).
//! Every route but `/healthz` needs the admin token ([`auth`]); mutations are POST-only. The server reads
//! the cluster only through a [`MasterHandle`] and stops gracefully when its token is cancelled.

pub mod api;
pub mod auth;

use std::convert::Infallible;
use std::sync::Arc;

use pomelo_master::MasterHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, handle: MasterHandle, token: Arc<str>, shutdown: CancellationToken) {
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok".into_response());
    let api = auth::require(token).and(api::routes(handle));
    let routes = healthz.or(api).unify().recover(recover);
    warp::serve(routes).incoming(listener).graceful(async move { shutdown.cancelled().await }).run().await;
}

async fn recover(r: Rejection) -> Result<Response, Infallible> {
    Ok(if r.find::<auth::Unauthorized>().is_some() {
        api::error(StatusCode::UNAUTHORIZED, "unauthorized", "send the admin token as `Authorization: Bearer <token>`")
    } else if r.is_not_found() {
        api::error(StatusCode::NOT_FOUND, "not found", "no such route")
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        api::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "mutations are POST-only")
    } else {
        api::error(StatusCode::BAD_REQUEST, "bad request", format!("{r:?}"))
    })
}
