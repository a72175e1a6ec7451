//! What a generator process counts, and how counts from several processes are merged.
//!
//! Every receiver keeps, per sender of its room, a [`Window`] of the last 256 sequence numbers seen, so
//! a repeated delivery is counted as a duplicate and a unique one once. Missing deliveries are not counted
//! here: the orchestrator compares the unique deliveries of all processes with what the senders sent
//! times the room's members. [`Counts`] is plain data, serialized as JSON between processes; latency
//! histograms travel as `(value, count)` pairs and are merged with [`merge_hist`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, up to an hour.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("1 µs to 1 h with 3 significant figures is valid")
}

/// The recorded values of a histogram, compactly.
pub fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

pub fn merge_hist(into: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        // Values come from a histogram with the same bounds; saturate rather than fail on a bad peer.
        let _ = into.record_n(v.clamp(1, 3_600_000_000), n);
    }
}

/// Two recorded histograms as one.
fn merged(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut h = new_hist();
    merge_hist(&mut h, a);
    merge_hist(&mut h, b);
    hist_pairs(&h)
}

/// Adds per-room counts of another process (which may know more rooms).
fn add_by_room(into: &mut Vec<u64>, other: &[u64]) {
    if into.len() < other.len() {
        into.resize(other.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a += b;
    }
}

/// Seen sequence numbers of one sender, as a sliding window of 256.
#[derive(Debug, Clone, Default)]
pub struct Window {
    base: u32,
    bits: [u64; 4],
}

impl Window {
    /// Records `seq`; `true` if it is new.
    pub fn see(&mut self, seq: u32) -> bool {
        if seq < self.base {
            return false;
        }
        if seq - self.base >= 256 {
            let new_base = seq - 255;
            if new_base - self.base >= 256 {
                self.bits = [0; 4];
            } else {
                for s in self.base..new_base {
                    self.bits[(s % 256 / 64) as usize] &= !(1u64 << (s % 64));
                }
            }
            self.base = new_base;
        }
        let (word, bit) = ((seq % 256 / 64) as usize, 1u64 << (seq % 64));
        let new = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        new
    }
}

/// Counts of one step, in one process (or, merged, of all).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepCounts {
    /// Messages sent (written to the socket), per room.
    pub sent_by_room: Vec<u64>,
    /// Responses `{}` to sends, and other responses (errors).
    pub acks: u64,
    pub send_errors: u64,
    /// Unique deliveries of this step's messages.
    pub received: u64,
    pub duplicates: u64,
    /// Latency of every unique delivery, microseconds.
    pub latency_us: Vec<(u64, u64)>,
    /// The same from when each message was written (without the generator's lag behind its schedule).
    #[serde(default)]
    pub latency_from_write_us: Vec<(u64, u64)>,
    /// Largest delay between when a send was due and when it was written, microseconds.
    pub max_send_lag_us: u64,
}

impl StepCounts {
    pub fn merge(&mut self, o: &StepCounts) {
        add_by_room(&mut self.sent_by_room, &o.sent_by_room);
        self.acks += o.acks;
        self.send_errors += o.send_errors;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.max_send_lag_us = self.max_send_lag_us.max(o.max_send_lag_us);
        self.latency_us = merged(&self.latency_us, &o.latency_us);
        self.latency_from_write_us = merged(&self.latency_from_write_us, &o.latency_from_write_us);
    }
}

/// Connect-phase and connection-health counts of one process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    pub attempted: u64,
    /// Entered their room (or, without `enter`, finished the handshake).
    pub made: u64,
    pub failed_gate: u64,
    pub failed_connect: u64,
    pub failed_handshake: u64,
    pub failed_enter: u64,
    /// Sample of the first failure, for the report.
    pub first_error: Option<String>,
    /// Gate query to room entered, microseconds.
    pub connect_us: Vec<(u64, u64)>,
    /// Members that entered each room.
    pub joined_by_room: Vec<u64>,
    /// Connections closed by the server (or failed) after they were made.
    pub lost: u64,
    /// Clients that entered through each connector (its client address), first logins and rejoins.
    #[serde(default)]
    pub made_by_connector: BTreeMap<String, u64>,
    /// Lost connections by the connector they were on.
    #[serde(default)]
    pub lost_by_connector: BTreeMap<String, u64>,
    /// With `reconnect`: lost clients back in their room, and those that gave up.
    #[serde(default)]
    pub rejoined: u64,
    #[serde(default)]
    pub rejoin_failed: u64,
    /// Logins tried by rejoining clients (the first try included).
    #[serde(default)]
    pub rejoin_attempts: u64,
    /// Monotonic µs (as `shard::now_us`) of the latest rejoin.
    #[serde(default)]
    pub last_rejoin_us: u64,
    /// From the lost connection to the room entered again, microseconds.
    #[serde(default)]
    pub rejoin_us: Vec<(u64, u64)>,
    /// Sample of a failed login try while rejoining (a later try may have worked).
    #[serde(default)]
    pub first_rejoin_error: Option<String>,
    pub kicked: u64,
    pub heartbeats_sent: u64,
    pub heartbeats_received: u64,
    /// Heartbeats with no echo within twice the interval (the JS client would disconnect).
    pub heartbeat_timeouts: u64,
    /// Latest a heartbeat was sent after it was due, microseconds (the generator falling behind).
    pub heartbeat_max_lag_us: u64,
    /// Pushes other than `onChat` (`onAdd`, `onLeave`).
    pub other_pushes: u64,
    /// `onChat` pushes whose content this generator did not write.
    pub unparsed: u64,
    /// Deliveries of messages sent in no step this process knows.
    pub stray: u64,
}

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.attempted += o.attempted;
        self.made += o.made;
        self.failed_gate += o.failed_gate;
        self.failed_connect += o.failed_connect;
        self.failed_handshake += o.failed_handshake;
        self.failed_enter += o.failed_enter;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        self.connect_us = merged(&self.connect_us, &o.connect_us);
        add_by_room(&mut self.joined_by_room, &o.joined_by_room);
        self.lost += o.lost;
        for (into, from) in
            [(&mut self.made_by_connector, &o.made_by_connector), (&mut self.lost_by_connector, &o.lost_by_connector)]
        {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
        self.rejoined += o.rejoined;
        self.rejoin_failed += o.rejoin_failed;
        self.rejoin_attempts += o.rejoin_attempts;
        self.last_rejoin_us = self.last_rejoin_us.max(o.last_rejoin_us);
        self.rejoin_us = merged(&self.rejoin_us, &o.rejoin_us);
        if self.first_rejoin_error.is_none() {
            self.first_rejoin_error.clone_from(&o.first_rejoin_error);
        }
        self.kicked += o.kicked;
        self.heartbeats_sent += o.heartbeats_sent;
        self.heartbeats_received += o.heartbeats_received;
        self.heartbeat_timeouts += o.heartbeat_timeouts;
        self.heartbeat_max_lag_us = self.heartbeat_max_lag_us.max(o.heartbeat_max_lag_us);
        self.other_pushes += o.other_pushes;
        self.unparsed += o.unparsed;
        self.stray += o.stray;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_each_seq_once_and_slides() {
        let mut w = Window::default();
        assert!(w.see(0));
        assert!(!w.see(0));
        assert!(w.see(2));
        assert!(w.see(1));
        assert!(w.see(300), "slides forward");
        assert!(!w.see(10), "far behind the window counts as seen");
        assert!(w.see(299));
        assert!(!w.see(300));
        assert!(w.see(100_000));
        assert!(w.see(99_999));
        assert!(!w.see(100_000));
    }

    #[test]
    fn histograms_merge_across_processes() {
        let mut a = new_hist();
        a.record(1000).unwrap();
        a.record(2000).unwrap();
        let mut s1 = StepCounts { latency_us: hist_pairs(&a), sent_by_room: vec![1, 2], ..Default::default() };
        let s2 = StepCounts { latency_us: hist_pairs(&a), sent_by_room: vec![1, 2, 3], ..Default::default() };
        s1.merge(&s2);
        let mut h = new_hist();
        merge_hist(&mut h, &s1.latency_us);
        assert_eq!(h.len(), 4);
        assert!((h.value_at_quantile(1.0) as i64 - 2000).abs() <= 2);
        assert_eq!(s1.sent_by_room, [2, 4, 3]);
    }
}
