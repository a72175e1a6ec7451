//! The JSON API.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/servers` | the master and every server: state, pid, uptime, restarts, CPU, RSS, stats |
//! | `GET /api/servers/{id}` | one server (404 if unknown) |
//! | `POST /api/servers/{id}/restart`, `/stop`, `/start` | 202, or 404 unknown id, 409 already stopping/there |
//! | `GET /api/servers/{id}/logs?lines=N` | the last N (default 100, at most 5000) lines of its log |
//! | `POST /api/reload` | re-read servers.yaml and apply it; 422 with every problem if it is invalid |
//! | `POST /api/shutdown` | stop every server, then the master |
//!
//! Errors are `{"error": "...", "detail": "..."}` with the matching status.

use std::collections::HashMap;

use pomelo_master::{Command, CommandError, MasterHandle};
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

pub fn error(status: StatusCode, error: &str, detail: impl Into<String>) -> Response {
    warp::reply::with_status(warp::reply::json(&json!({"error": error, "detail": detail.into()})), status)
        .into_response()
}

pub fn routes(handle: MasterHandle) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let h = warp::any().map(move || handle.clone());
    let list = warp::path!("api" / "servers").and(warp::get()).and(h.clone()).map(|h: MasterHandle| {
        let view = h.view();
        warp::reply::json(&*view).into_response()
    });
    let one =
        warp::path!("api" / "servers" / String).and(warp::get()).and(h.clone()).map(|id: String, h: MasterHandle| {
            let view = h.view();
            match view.servers.iter().find(|s| s.id == id) {
                Some(s) => warp::reply::json(s).into_response(),
                None => error(StatusCode::NOT_FOUND, "unknown server", format!("no server `{id}` in servers.yaml")),
            }
        });
    let action = warp::path!("api" / "servers" / String / String).and(warp::post()).and(h.clone()).then(
        |id: String, verb: String, h: MasterHandle| async move {
            let cmd = match verb.as_str() {
                "restart" => Command::Restart(id),
                "stop" => Command::Stop(id),
                "start" => Command::Start(id),
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "unknown action",
                        format!("`{verb}`: use restart, stop or start"),
                    )
                }
            };
            command(&h, cmd).await
        },
    );
    let logs = warp::path!("api" / "servers" / String / "logs")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(h.clone())
        .map(|id: String, q: HashMap<String, String>, h: MasterHandle| {
            if !h.view().servers.iter().any(|s| s.id == id) {
                return error(StatusCode::NOT_FOUND, "unknown server", format!("no server `{id}` in servers.yaml"));
            }
            let lines = q.get("lines").and_then(|l| l.parse::<usize>().ok()).unwrap_or(100).min(5000);
            match h.tail(&id, lines) {
                Ok(lines) => warp::reply::json(&json!({"id": id, "lines": lines})).into_response(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    warp::reply::json(&json!({"id": id, "lines": []})).into_response()
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the log", e.to_string()),
            }
        });
    let reload = warp::path!("api" / "reload")
        .and(warp::post())
        .and(h.clone())
        .then(|h: MasterHandle| async move { command(&h, Command::Reload).await });
    let shutdown = warp::path!("api" / "shutdown")
        .and(warp::post())
        .and(h)
        .then(|h: MasterHandle| async move { command(&h, Command::Shutdown).await });
    list.or(one).unify().or(logs).unify().or(action).unify().or(reload).unify().or(shutdown).unify()
}

async fn command(h: &MasterHandle, cmd: Command) -> Response {
    match h.command(cmd).await {
        Ok(message) => {
            warp::reply::with_status(warp::reply::json(&json!({"ok": true, "message": message})), StatusCode::ACCEPTED)
                .into_response()
        }
        Err(e) => {
            let status = match e {
                CommandError::UnknownServer(_) => StatusCode::NOT_FOUND,
                CommandError::AlreadyStopping(_) | CommandError::AlreadyThere(..) => StatusCode::CONFLICT,
                CommandError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                CommandError::InvalidConfig(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let kind = match e {
                CommandError::UnknownServer(_) => "unknown server",
                CommandError::AlreadyStopping(_) => "already stopping",
                CommandError::AlreadyThere(..) => "nothing to do",
                CommandError::ShuttingDown => "shutting down",
                CommandError::InvalidConfig(_) => "invalid servers.yaml",
            };
            error(status, kind, e.to_string())
        }
    }
}
