//! One simulated chat user: gate, connector, `enter`, then a loop that answers the server's heartbeat
//! the way the JS client does, sends `chat.chatHandler.send` on the step's schedule and counts every
//! `onChat` it receives (unique or duplicate, latency from the send timestamp in the content).
//!
//! Sends are open-loop: message `n` of a step is due at `start + (phase + n) / rate` whatever happened to
//! the previous ones, so a slow server shows up as latency, not as a lower offered rate. Reads (in
//! `inbound.rs`) go through the shard's shared scratch buffer; only a partial package is kept per
//! client. The task ends at `Finish`, or when the server closes the connection (counted as lost).

use std::rc::Rc;
use std::time::Duration;

use std::future::poll_fn;

use pomelo_proto::wire::Route;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_stream::{wrappers::WatchStream, StreamExt};

use crate::connect::{self, fail, Failure, Stage};
use crate::shard::{now_us, Phase, Shard};
use crate::spec::Spec;
use crate::track::Window;
use crate::wire::{self, Stamp};
use crate::ws::Ws;

/// Bytes a client may have waiting to be written before its sends are counted as failed.
const MAX_OUT: usize = 256 * 1024;
/// The id of the `enter` request.
pub(crate) const ENTER_ID: u32 = 1;

pub(crate) enum Hb {
    /// Before the server's first heartbeat.
    Idle,
    /// Send one at this time.
    Due(Instant),
    /// Sent; the echo should arrive before this time.
    Awaiting(Instant),
}

/// The sending schedule of the current step.
struct Plan {
    k: u32,
    start_us: u64,
    end_us: u64,
    interval_us: f64,
    offset: f64,
    n: u64,
}

impl Plan {
    fn due_us(&self) -> u64 {
        self.start_us + ((self.offset + self.n as f64) * self.interval_us) as u64
    }
}

pub(crate) struct Client {
    pub(crate) g: u32,
    pub(crate) room: u32,
    pub(crate) rid: String,
    pub(crate) username: String,
    /// The connector the gate sent this client to.
    pub(crate) connector: std::net::SocketAddr,
    pub(crate) stream: TcpStream,
    /// The WebSocket framing, for `--transport ws`.
    pub(crate) ws: Option<Ws>,
    /// Package bytes of an incomplete package.
    pub(crate) pending: Vec<u8>,
    pub(crate) out: Vec<u8>,
    /// Per sender slot of the room, allocated on the first `onChat`.
    pub(crate) windows: Vec<Window>,
    pub(crate) next_id: u32,
    pub(crate) send_route: Route,
    pub(crate) hb_every: Option<Duration>,
    pub(crate) hb: Hb,
    pub(crate) entered: Option<bool>,
    pub(crate) seq: u32,
    /// The step sends are counted in (acks and errors too).
    pub(crate) cur_step: usize,
}

pub async fn run(shard: Rc<Shard>, g: u32) {
    let t0 = now_us();
    let connected = match shard.connecting.acquire().await {
        Ok(_permit) => connect(&shard, g).await,
        Err(_) => fail(Stage::Connect, "shutting down"),
    };
    let mut client = match connected {
        Ok(c) => c,
        Err(f) => {
            shard.fail(&f);
            shard.settle();
            return;
        }
    };
    {
        let mut c = shard.counts.borrow_mut();
        c.made += 1;
        *c.made_by_connector.entry(client.connector.to_string()).or_default() += 1;
        if let Some(j) = c.joined_by_room.get_mut(client.room as usize) {
            *j += 1;
        }
        let _ = shard.connect_hist.borrow_mut().record((now_us() - t0).max(1));
    }
    shard.settle();
    loop {
        let Err(why) = client.drive(&shard).await else { return };
        count_lost(&shard, &client, &why);
        if !shard.spec.reconnect {
            return;
        }
        match rejoin(&shard, g).await {
            Some(c) => client = c,
            None => return,
        }
    }
}

fn count_lost(shard: &Shard, client: &Client, why: &str) {
    let mut c = shard.counts.borrow_mut();
    c.lost += 1;
    *c.lost_by_connector.entry(client.connector.to_string()).or_default() += 1;
    if c.lost <= 3 {
        eprintln!("pomelo-bench: client {} lost: {why}", client.g);
    }
}

/// How long a client whose connection was lost keeps trying to log in again.
const REJOIN_FOR: Duration = Duration::from_secs(60);

/// A lost client logs in again (gate, connector, `enter` in the same room) as a Pomelo client with
/// reconnection does: at once, then after 50 ms doubling to at most 800 ms, each wait scaled by a factor
/// in [0.5, 1.5) of its own so thousands of clients do not retry in step. `None` once the run finishes
/// or [`REJOIN_FOR`] passes (counted as failed).
async fn rejoin(shard: &Shard, g: u32) -> Option<Client> {
    let (lost_at, lost_us) = (Instant::now(), now_us());
    let mut wait = Duration::from_millis(50);
    let mut seed = u64::from(g).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut attempts = 0;
    while lost_at.elapsed() < REJOIN_FOR && *shard.phase.borrow() != Phase::Finish {
        attempts += 1;
        let r = match shard.connecting.acquire().await {
            Ok(_permit) => connect(shard, g).await,
            Err(_) => break,
        };
        match r {
            Ok(client) => {
                let now = now_us();
                let mut c = shard.counts.borrow_mut();
                c.rejoined += 1;
                c.rejoin_attempts += attempts;
                c.last_rejoin_us = c.last_rejoin_us.max(now);
                *c.made_by_connector.entry(client.connector.to_string()).or_default() += 1;
                let _ = shard.rejoin_hist.borrow_mut().record((now - lost_us).max(1));
                return Some(client);
            }
            Err(f) => {
                let mut c = shard.counts.borrow_mut();
                if c.first_rejoin_error.is_none() {
                    c.first_rejoin_error = Some(format!("{:?}: {}", f.stage, f.why));
                }
            }
        }
        let factor = 0.5 + (crate::ws::xorshift64(&mut seed) % 1000) as f64 / 1000.0;
        tokio::time::sleep(wait.mul_f64(factor)).await;
        wait = (wait * 2).min(Duration::from_millis(800));
    }
    let mut c = shard.counts.borrow_mut();
    c.rejoin_failed += 1;
    c.rejoin_attempts += attempts;
    None
}

async fn connect(shard: &Shard, g: u32) -> Result<Client, Failure> {
    let spec: &Spec = &shard.spec;
    let stage = Duration::from_secs_f64(spec.stage_timeout);
    let (username, src) = (spec.username(g), spec.source_of(g));
    // The masking keys only need to differ between connections.
    let seed = (u64::from(g) << 32) ^ now_us();
    let addr = match timeout(stage, connect::query_gate(spec.gate, src, &username, spec.transport, seed)).await {
        Ok(r) => r?,
        Err(_) => return fail(Stage::Gate, "gate timed out"),
    };
    let (stream, mut ws) = match timeout(stage, connect::open(addr, src, spec.transport, seed.rotate_left(17))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(Stage::Connect, e),
        Err(_) => return fail(Stage::Connect, format_args!("connect to {addr} timed out")),
    };
    let mut pending = Vec::new();
    let hs = match timeout(stage, connect::handshake(&stream, ws.as_mut(), &mut pending)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return fail(Stage::Handshake, e),
        Err(_) => return fail(Stage::Handshake, "handshake timed out"),
    };
    let room = spec.room_of(g);
    let mut c = Client {
        g,
        room,
        rid: format!("r{room}"),
        username,
        connector: addr,
        stream,
        ws,
        pending,
        out: Vec::new(),
        windows: Vec::new(),
        next_id: ENTER_ID + 1,
        send_route: hs.route(wire::SEND_ROUTE),
        hb_every: hs.heartbeat_secs.map(Duration::from_secs),
        hb: Hb::Idle,
        entered: None,
        seq: 0,
        cur_step: 0,
    };
    if !spec.enter {
        return Ok(c);
    }
    let body = serde_json::json!({"username": c.username, "rid": c.rid}).to_string().into_bytes();
    let Some(req) = wire::request(ENTER_ID, hs.route(wire::ENTER_ROUTE), body) else {
        return fail(Stage::Enter, "cannot encode enter");
    };
    if let Err(e) = c.write(&req) {
        return fail(Stage::Enter, e);
    }
    let entered = timeout(stage, async {
        // Packages that came with the handshake reply (the first heartbeat) are handled first.
        c.process_pending(shard)?;
        while c.entered.is_none() {
            c.stream.readable().await.map_err(|e| e.to_string())?;
            c.on_readable(shard)?;
        }
        Ok::<_, String>(())
    })
    .await;
    match (entered, c.entered) {
        (Ok(Ok(())), Some(true)) => Ok(c),
        (Ok(Ok(())), _) => fail(Stage::Enter, "enter refused"),
        (Ok(Err(e)), _) => fail(Stage::Enter, e),
        (Err(_), _) => fail(Stage::Enter, "enter timed out"),
    }
}

impl Client {
    async fn drive(&mut self, shard: &Shard) -> Result<(), String> {
        // Polled in place across iterations (no waiter re-registered per wake-up, unlike `changed()`).
        let mut phases = WatchStream::new(shard.phase.clone());
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        let send_sleep = sleep_until(far);
        let hb_sleep = sleep_until(self.hb_deadline().unwrap_or(far));
        tokio::pin!(send_sleep, hb_sleep);
        let mut plan: Option<Plan> = None;
        loop {
            tokio::select! {
                biased;
                p = phases.next() => {
                    let Some(p) = p else { return Ok(()) };
                    plan = match p {
                        Phase::Finish => return Ok(()),
                        Phase::Step { k, start_us, end_us, rate } if rate > 0.0 => Some(Plan {
                            k, start_us, end_us, interval_us: 1e6 / rate, offset: Spec::phase_of(self.g), n: 0,
                        }),
                        _ => None,
                    };
                    if let Some(p) = &plan {
                        self.cur_step = p.k as usize;
                        send_sleep.as_mut().reset(shard.clock.instant(p.due_us()));
                    }
                }
                r = poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    r.map_err(|e| e.to_string())?;
                    self.on_readable(shard)?;
                }
                _ = &mut send_sleep, if plan.is_some() => {
                    if let Some(p) = &mut plan {
                        self.send_due(shard, p);
                        if p.due_us() >= p.end_us {
                            plan = None;
                        } else {
                            send_sleep.as_mut().reset(shard.clock.instant(p.due_us()));
                        }
                    }
                }
                _ = &mut hb_sleep, if !matches!(self.hb, Hb::Idle) => self.on_hb_timer(shard)?,
                r = poll_fn(|cx| self.stream.poll_write_ready(cx)), if !self.out.is_empty() => {
                    r.map_err(|e| e.to_string())?;
                    self.flush()?;
                }
            }
            let hb_at = self.hb_deadline().unwrap_or(far);
            if hb_sleep.deadline() != hb_at {
                hb_sleep.as_mut().reset(hb_at);
            }
        }
    }

    fn hb_deadline(&self) -> Option<Instant> {
        match self.hb {
            Hb::Idle => None,
            Hb::Due(t) | Hb::Awaiting(t) => Some(t),
        }
    }

    fn on_hb_timer(&mut self, shard: &Shard) -> Result<(), String> {
        let Some(every) = self.hb_every else { return Ok(()) };
        let now = Instant::now();
        match self.hb {
            Hb::Idle => {}
            Hb::Due(due) => {
                self.write(&wire::heartbeat())?;
                let mut c = shard.counts.borrow_mut();
                c.heartbeats_sent += 1;
                c.heartbeat_max_lag_us =
                    c.heartbeat_max_lag_us.max(now.saturating_duration_since(due).as_micros() as u64);
                self.hb = Hb::Awaiting(now + every * 2);
            }
            Hb::Awaiting(_) => {
                shard.counts.borrow_mut().heartbeat_timeouts += 1;
                self.hb = Hb::Due(now);
            }
        }
        Ok(())
    }

    fn send_due(&mut self, shard: &Shard, p: &mut Plan) {
        // Latency counts from when the message was due, not from when a busy generator got to it, so a
        // saturated machine cannot hide its delay in the sender (no coordinated omission).
        let due = p.due_us();
        let lag = now_us().saturating_sub(due);
        p.n += 1;
        let stamp = Stamp { sender: self.g, seq: self.seq, step: p.k, sent_us: due, lag_us: lag };
        self.seq += 1;
        let content = wire::content(stamp, shard.spec.payload);
        let body = wire::send_body(&self.rid, &content, &self.username);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(ENTER_ID + 1);
        let mut steps = shard.steps.borrow_mut();
        let Some(step) = steps.get_mut(p.k as usize) else { return };
        step.counts.max_send_lag_us = step.counts.max_send_lag_us.max(lag);
        let sent = self.out.len() < MAX_OUT
            && wire::request(id, self.send_route.clone(), body).is_some_and(|req| self.write(&req).is_ok());
        if sent {
            if let Some(n) = step.counts.sent_by_room.get_mut(self.room as usize) {
                *n += 1;
            }
        } else {
            step.counts.send_errors += 1;
        }
    }

    /// Writes now what the socket takes; keeps the rest for when it is writable. Over a WebSocket the
    /// packages go in one masked binary frame.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match &mut self.ws {
            Some(ws) => write_raw(&self.stream, &mut self.out, ws.binary(bytes)),
            None => write_raw(&self.stream, &mut self.out, bytes),
        }
    }

    pub(crate) fn flush(&mut self) -> Result<(), String> {
        match self.stream.try_write(&self.out) {
            Ok(n) => {
                self.out.drain(..n);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Writes what the socket takes of `bytes` behind `out`; keeps the rest in `out`.
pub(crate) fn write_raw(stream: &TcpStream, out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), String> {
    if !out.is_empty() {
        out.extend_from_slice(bytes);
        return Ok(());
    }
    match stream.try_write(bytes) {
        Ok(n) => out.extend_from_slice(&bytes[n..]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => out.extend_from_slice(bytes),
        Err(e) => return Err(e.to_string()),
    }
    Ok(())
}
