//! `GET /api/events`: the live feed, as Server-Sent Events.
//!
//! Each client gets, in order:
//!
//! - `event: snapshot` at once: the whole view (`/api/servers`'s JSON plus `at_ms`), with a `retry:` hint;
//! - `event: state` for every [`ServerEvent`] of the supervisor (`{at_ms, id, state, pid, message}`);
//! - `event: snapshot` again whenever the cluster's shape changes (servers added or removed, a state, pid or
//!   restart count, the config error), and after this client fell behind the event broadcast;
//! - `event: stats` once a second: the latest view, for the page's figures and charts.
//!
//! Tasks: one pump task per client, feeding a bounded queue that warp streams out. The pump ends when the
//! client goes away, when it falls [`QUEUE`] events behind (a client that does not read is dropped, never
//! buffered without bound), when the supervisor is gone, or when the admin server shuts down. At most
//! `max` clients at once ([`Feeds`]); beyond that the answer is 503.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pomelo_master::{ClusterView, MasterHandle};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::sse::Event;
use warp::{Filter, Rejection};

/// Events a client may fall behind by before it is dropped.
pub const QUEUE: usize = 64;

/// The live feeds: how many may be open, and what ends them all.
#[derive(Clone)]
pub struct Feeds {
    handle: MasterHandle,
    slots: Arc<Semaphore>,
    max: usize,
    stop: CancellationToken,
}

impl Feeds {
    pub fn new(handle: MasterHandle, max: usize, stop: CancellationToken) -> Feeds {
        Feeds { handle, slots: Arc::new(Semaphore::new(max)), max, stop }
    }

    /// Feeds open now.
    pub fn clients(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    fn open(&self) -> Response {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return crate::api::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many live feeds",
                format!("at most {} at once; close another dashboard tab", self.max),
            );
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(pump(self.handle.clone(), tx, self.stop.clone(), permit));
        let stream = warp::sse::keep_alive().interval(Duration::from_secs(15)).stream(ReceiverStream::new(rx));
        warp::reply::with_header(warp::sse::reply(stream), "x-accel-buffering", "no").into_response()
    }
}

pub fn route(feeds: Feeds) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "events").and(warp::get()).map(move || feeds.open())
}

/// A view as the feed sends it.
#[derive(Serialize)]
struct Frame<'a> {
    at_ms: u64,
    #[serde(flatten)]
    view: &'a ClusterView,
}

/// What makes the page rebuild rather than just refresh figures.
#[derive(PartialEq)]
struct Shape {
    servers: Vec<(String, &'static str, Option<u32>, u64)>,
    config_error: Option<String>,
}

fn shape(view: &ClusterView) -> Shape {
    Shape {
        servers: view.servers.iter().map(|s| (s.id.clone(), s.state.as_str(), s.pid, s.restarts)).collect(),
        config_error: view.master.config_error.clone(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn view_event(kind: &str, view: &ClusterView) -> Event {
    let data = serde_json::to_string(&Frame { at_ms: now_ms(), view }).unwrap_or_else(|_| "{}".into());
    Event::default().event(kind).data(data)
}

type Tx = mpsc::Sender<Result<Event, Infallible>>;

/// Queues one event; false when this client is gone or too far behind.
fn send(tx: &Tx, event: Event) -> bool {
    tx.try_send(Ok(event)).is_ok()
}

async fn pump(handle: MasterHandle, tx: Tx, stop: CancellationToken, _slot: OwnedSemaphorePermit) {
    let mut views = handle.watch();
    let mut events = handle.events();
    let first = views.borrow_and_update().clone();
    let mut last = shape(&first);
    if !send(&tx, view_event("snapshot", &first).retry(Duration::from_secs(2))) {
        return;
    }
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            event = events.recv() => match event {
                Ok(e) => {
                    let data = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
                    send(&tx, Event::default().event("state").data(data))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let view = handle.view();
                    last = shape(&view);
                    send(&tx, view_event("snapshot", &view))
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = views.borrow_and_update().clone();
                let now = shape(&view);
                if now == last {
                    true
                } else {
                    last = now;
                    send(&tx, view_event("snapshot", &view))
                }
            }
            _ = tick.tick() => send(&tx, view_event("stats", &handle.view())),
        };
        if !ok {
            tracing::debug!("a live feed client fell behind or left; dropping it");
            return;
        }
    }
}
