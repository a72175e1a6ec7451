//! What a client does with the bytes the server sends: one read into the shard's scratch buffer, every
//! whole package in it (over a WebSocket: every whole frame, its payload fed to the package parser, pings
//! answered), heartbeats re-armed, `enter`'s answer, acks of sends, and every `onChat` counted once per
//! sender and sequence number with its latency. No I/O but the read itself (and a pong's write).

use std::os::fd::AsRawFd;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client::{write_raw, Client, Hb, ENTER_ID};
use crate::shard::{now_us, Shard};
use crate::track::Window;
use crate::wire::{self, Data};
use crate::ws::{self, Frame};

impl Client {
    /// Handles packages already in `pending`.
    pub(crate) fn process_pending(&mut self, shard: &Shard) -> Result<(), String> {
        let buf = std::mem::take(&mut self.pending);
        let used = self.process(shard, &buf, now_us())?;
        self.pending = buf[used..].to_vec();
        Ok(())
    }

    /// One read into the shared scratch buffer, then every whole package in it. A read that leaves room
    /// in the buffer emptied the socket, so its readiness is cleared at once (as tokio's `AsyncRead`
    /// does) instead of by a second read that would find nothing.
    pub(crate) fn on_readable(&mut self, shard: &Shard) -> Result<(), String> {
        if self.ws.is_some() {
            return self.on_readable_ws(shard);
        }
        let mut scratch = shard.scratch.borrow_mut();
        let keep = self.pending.len();
        scratch_keep(&mut scratch, &self.pending);
        let Some(got) = read_after(&self.stream, &mut scratch, keep)? else { return Ok(()) };
        let used = self.process(shard, &scratch[..keep + got], now_us())?;
        self.pending.clear();
        self.pending.extend_from_slice(&scratch[used..keep + got]);
        Ok(())
    }

    /// The same over a WebSocket: the bytes of an incomplete frame are kept in `ws.raw`.
    fn on_readable_ws(&mut self, shard: &Shard) -> Result<(), String> {
        let Some(mut w) = self.ws.take() else { return Ok(()) };
        let mut scratch = shard.scratch.borrow_mut();
        let keep = w.raw.len();
        scratch_keep(&mut scratch, &w.raw);
        let r = read_after(&self.stream, &mut scratch, keep).and_then(|got| {
            let Some(got) = got else { return Ok(()) };
            let (now, end) = (now_us(), keep + got);
            let mut used = 0;
            while let Some((frame, n)) = ws::next_frame(&scratch[used..end])? {
                match frame {
                    Frame::Data(p) => self.feed(shard, p, now)?,
                    Frame::Ping(p) => write_raw(&self.stream, &mut self.out, w.pong(p))?,
                    Frame::Ignored => {}
                    Frame::Close => return Err("closed by the server (close frame)".into()),
                }
                used += n;
            }
            w.raw.clear();
            w.raw.extend_from_slice(&scratch[used..end]);
            Ok(())
        });
        self.ws = Some(w);
        r
    }

    /// Package bytes from a WebSocket payload: every whole package, the rest kept in `pending`.
    fn feed(&mut self, shard: &Shard, payload: &[u8], now: u64) -> Result<(), String> {
        if self.pending.is_empty() {
            let used = self.process(shard, payload, now)?;
            self.pending.extend_from_slice(&payload[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(payload);
            let used = self.process(shard, &buf, now)?;
            buf.drain(..used);
            self.pending = buf;
        }
        Ok(())
    }

    /// Handles every whole package at the front of `buf`; returns the bytes used.
    fn process(&mut self, shard: &Shard, buf: &[u8], now: u64) -> Result<usize, String> {
        let mut used = 0;
        while let Some((pkg, n)) = wire::next_package(&buf[used..])? {
            used += n;
            match pkg.kind {
                3 => self.on_heartbeat(shard),
                4 => self.on_data(shard, pkg.body, now),
                5 => {
                    shard.counts.borrow_mut().kicked += 1;
                    return Err(format!("kicked: {}", String::from_utf8_lossy(pkg.body)));
                }
                _ => {}
            }
        }
        Ok(used)
    }

    fn on_heartbeat(&mut self, shard: &Shard) {
        shard.counts.borrow_mut().heartbeats_received += 1;
        if let (Some(every), Hb::Idle | Hb::Awaiting(_)) = (self.hb_every, &self.hb) {
            self.hb = Hb::Due(Instant::now() + every);
        }
    }

    fn on_data(&mut self, shard: &Shard, body: &[u8], now: u64) {
        match wire::classify(body) {
            Data::Response { id: ENTER_ID, body } if self.entered.is_none() => {
                // `{users, epoch, offset, ...}` in whatever key order: parsed once per client.
                let users =
                    serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v.get("users").cloned());
                self.entered = Some(users.is_some_and(|u| u.is_array()));
            }
            Data::Response { body, .. } => {
                let mut steps = shard.steps.borrow_mut();
                if let Some(s) = steps.get_mut(self.cur_step) {
                    if body == b"{}" {
                        s.counts.acks += 1;
                    } else {
                        s.counts.send_errors += 1;
                    }
                }
            }
            Data::Push { route: b"onChat", body, .. } => self.on_chat(shard, body, now),
            Data::Push { .. } => shard.counts.borrow_mut().other_pushes += 1,
            Data::Other => shard.counts.borrow_mut().unparsed += 1,
        }
    }

    fn on_chat(&mut self, shard: &Shard, body: &[u8], now: u64) {
        let spec = &shard.spec;
        let Some(stamp) = wire::parse_chat(body) else {
            shard.counts.borrow_mut().unparsed += 1;
            return;
        };
        let slot = spec.slot_of(stamp.sender) as usize;
        let mut steps = shard.steps.borrow_mut();
        let (Some(step), true) = (steps.get_mut(stamp.step as usize), spec.room_of(stamp.sender) == self.room) else {
            shard.counts.borrow_mut().stray += 1;
            return;
        };
        if self.windows.is_empty() {
            self.windows = vec![Window::default(); spec.room_capacity() as usize];
        }
        let Some(w) = self.windows.get_mut(slot) else { return };
        if w.see(stamp.seq) {
            step.counts.received += 1;
            let _ = step.hist.record(now.saturating_sub(stamp.sent_us).max(1));
            let _ = step.hist_write.record(now.saturating_sub(stamp.sent_us + stamp.lag_us).max(1));
        } else {
            step.counts.duplicates += 1;
        }
    }
}

/// Puts `keep` at the front of the scratch buffer, with at least 16 KiB of room after it.
fn scratch_keep(scratch: &mut Vec<u8>, keep: &[u8]) {
    if scratch.len() < keep.len() + 16 * 1024 {
        scratch.resize(keep.len() + 16 * 1024, 0);
    }
    scratch[..keep.len()].copy_from_slice(keep);
}

/// One read into the scratch buffer after its first `keep` bytes: `Some(bytes read)`, or `None` if the
/// socket had nothing. A read that leaves room in the buffer emptied the socket, so its readiness is
/// cleared at once (as tokio's `AsyncRead` does) instead of by a second read that would find nothing.
fn read_after(stream: &TcpStream, scratch: &mut [u8], keep: usize) -> Result<Option<usize>, String> {
    let space = scratch.len() - keep;
    let fd = stream.as_raw_fd();
    let mut got = 0;
    let r = stream.try_io(Interest::READABLE, || {
        let n = recv(fd, &mut scratch[keep..], MsgFlags::empty()).map_err(std::io::Error::from)?;
        got = n;
        if n > 0 && n < space {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match r {
        Ok(()) if got == 0 => Err("closed by the server".into()),
        Ok(()) => Ok(Some(got)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(Some(got)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
