//! What one benchmark run does, as plain data shared by the orchestrator and its generator processes.
//!
//! A run has `clients` simulated users. Client `g` (0-based) is user `<prefix><g>` in room `r<g % rooms>`
//! and belongs to generator process `g % procs`, so every process can tell, without talking to the others,
//! who is in which room and which slot a sender has in its room (`g / rooms`). The timeline after the
//! connect phase is a list of [`Step`]s: each sends at a fixed rate per client for `secs`, then stays quiet
//! for `grace` seconds so that late deliveries are counted in their own step. An idle run is one step at
//! rate 0. Nothing here does I/O.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ws::Transport;

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Messages per second sent by each client (0: heartbeats only).
    pub rate: f64,
    /// How long the step sends.
    pub secs: f64,
    /// A warm-up step: run, but left out of the totals.
    #[serde(default)]
    pub warmup: bool,
}

/// Everything a generator process needs; the orchestrator passes it as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The gate's client address (raw TCP or WebSocket, on the same port).
    pub gate: SocketAddr,
    /// How clients talk to the gate and the connectors.
    #[serde(default)]
    pub transport: Transport,
    pub clients: u32,
    pub rooms: u32,
    /// Bytes of each message's `content` (at least the timestamp header, about 30 bytes).
    pub payload: usize,
    /// New clients per second over the whole run (all processes together).
    pub connect_rate: f64,
    /// Client connections are made from these addresses, round robin (127.0.0.0/8 only).
    pub sources: Vec<Ipv4Addr>,
    /// Generator processes; client `g` belongs to process `g % procs`.
    pub procs: u32,
    /// Usernames are `<prefix><g>`, so two runs on one cluster never collide.
    pub prefix: String,
    /// Enter a room after connecting (off: connect and heartbeat only).
    pub enter: bool,
    pub steps: Vec<Step>,
    /// Quiet seconds after each step before it is reported.
    pub grace: f64,
    /// Bound on each connect stage (gate, connect, handshake, enter), seconds.
    pub stage_timeout: f64,
    /// A client whose connection the server closes logs in again (gate, connector, enter; see
    /// `client::rejoin`) instead of staying lost.
    #[serde(default)]
    pub reconnect: bool,
}

impl Spec {
    /// Global indices of the clients of process `shard`.
    pub fn shard_clients(&self, shard: u32) -> impl Iterator<Item = u32> {
        let procs = self.procs.max(1);
        (shard..self.clients).step_by(procs as usize)
    }

    pub fn room_of(&self, g: u32) -> u32 {
        g % self.rooms.max(1)
    }

    /// A sender's slot in its room.
    pub fn slot_of(&self, g: u32) -> u32 {
        g / self.rooms.max(1)
    }

    /// Most members any room has (slots are `0..room_capacity`).
    pub fn room_capacity(&self) -> u32 {
        self.clients.div_ceil(self.rooms.max(1))
    }

    pub fn username(&self, g: u32) -> String {
        format!("{}{g}", self.prefix)
    }

    pub fn source_of(&self, g: u32) -> Ipv4Addr {
        match self.sources.len() {
            0 => Ipv4Addr::LOCALHOST,
            n => self.sources[g as usize % n],
        }
    }

    /// Deterministic offset in `[0, 1)` that spreads clients' send times over an interval.
    pub fn phase_of(g: u32) -> f64 {
        (f64::from(g) * 0.618_033_988_749_895).fract()
    }

    /// Refuses runs that cannot work or would not stop.
    pub fn check(&self) -> Result<(), String> {
        if self.clients == 0 || self.rooms == 0 || self.procs == 0 {
            return Err("clients, rooms and procs must be at least 1".into());
        }
        if self.sources.iter().any(|a| a.octets()[0] != 127) {
            return Err("source addresses must be in 127.0.0.0/8".into());
        }
        if !self.gate.ip().is_loopback() {
            return Err("the gate must be on a loopback address".into());
        }
        if self.connect_rate <= 0.0 || self.connect_rate > 100_000.0 {
            return Err("connect rate must be in (0, 100000] per second".into());
        }
        if self.payload > 60_000 {
            return Err("payload is at most 60000 bytes".into());
        }
        if self.steps.is_empty() || self.steps.len() > 64 {
            return Err("between 1 and 64 steps".into());
        }
        for s in &self.steps {
            if !(0.0..=1000.0).contains(&s.rate) || !(0.0..=3600.0).contains(&s.secs) {
                return Err("a step's rate is in [0, 1000] per client and its length in [0, 3600] s".into());
            }
        }
        if !(0.0..=60.0).contains(&self.grace) || !(1.0..=120.0).contains(&self.stage_timeout) {
            return Err("grace is in [0, 60] s and stage timeout in [1, 120] s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            transport: Transport::Tcp,
            gate: "127.0.0.1:1".parse().expect("addr"),
            clients: 10,
            rooms: 3,
            payload: 64,
            connect_rate: 100.0,
            sources: vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)],
            procs: 4,
            prefix: "b".into(),
            enter: true,
            steps: vec![Step { rate: 1.0, secs: 1.0, warmup: false }],
            grace: 1.0,
            stage_timeout: 10.0,
            reconnect: false,
        }
    }

    #[test]
    fn shards_partition_the_clients_and_slots_fit_rooms() {
        let s = spec();
        let mut all: Vec<u32> = (0..4).flat_map(|i| s.shard_clients(i)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(s.room_capacity(), 4);
        assert!((0..10).all(|g| s.slot_of(g) < s.room_capacity()));
        assert_eq!((s.room_of(7), s.slot_of(7)), (1, 2));
        assert_eq!(s.source_of(3), Ipv4Addr::new(127, 0, 0, 2));
        assert!(s.check().is_ok());
        assert!(Spec { sources: vec![Ipv4Addr::new(10, 0, 0, 1)], ..spec() }.check().is_err());
    }
}
