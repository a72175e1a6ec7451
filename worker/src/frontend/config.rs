//! Settings of one frontend listener (gate or connector). Plain data, validated by [`FrontendConfig::check`].

use std::sync::Arc;
use std::time::Duration;

use pomelo_proto::wire::Dictionary;

/// How one client port behaves. Build with [`FrontendConfig::gate`] or [`FrontendConfig::connector`] and
/// adjust fields.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Interval sent in the handshake; `None` means no heartbeat (the demo's gate).
    pub heartbeat: Option<Duration>,
    /// Heartbeat timeout; `None` means 2 × `heartbeat`. Only HEARTBEAT packages re-arm it.
    pub heartbeat_timeout: Option<Duration>,
    /// When there is no heartbeat: a connection with no inbound package for this long is closed (Pomelo: 90 s).
    pub idle_timeout: Duration,
    /// A socket that has not finished the handshake (HANDSHAKE and ACK) by then is closed.
    pub handshake_timeout: Duration,
    /// Send and accept dictionary-coded routes.
    pub use_dict: bool,
    /// Built from the routes of every server type (see `crate::routes::chat_dictionary`).
    pub dictionary: Arc<Dictionary>,
    /// Sockets beyond this are closed at once and counted in `refused_total`.
    pub max_connections: usize,
    /// Outbound queue cap per session, in packages; a client over it is kicked.
    pub queue_max_packages: usize,
    /// Outbound queue cap per session, in bytes (queued plus being written); a client over it is kicked.
    pub queue_max_bytes: usize,
    /// Largest client → server package body (servers.yaml `maxMessageSize`); larger ones close the
    /// connection. Pushes of this size (or merged to more) reach every client: see `max_batch_bytes`.
    pub max_package_bytes: usize,
    /// Requests of one client handled at once. Packages past it stay buffered (one read's worth) and
    /// are dispatched as requests finish; nothing more is read meanwhile.
    pub max_inflight_requests: usize,
    /// Requests (and notifies) one session may send per second, with a burst of as many (servers.yaml
    /// `maxRequestsPerSecond`); a client over it is kicked with a reason.
    pub max_requests_per_second: u32,
    /// Largest single write (several queued packages are coalesced up to this). A larger queued item is
    /// cut at package boundaries into WebSocket messages of at most this (one package alone may be
    /// larger, up to `queue_max_bytes`).
    pub max_batch_bytes: usize,
    /// How long a kicked client gets to receive its KICK before the socket is dropped.
    pub kick_flush_timeout: Duration,
    /// How long `serve` waits for connections to close after shutdown before dropping them.
    pub shutdown_grace: Duration,
    /// Bound on `Handler::on_close`.
    pub close_hook_timeout: Duration,
    /// servers.yaml `checkClient`: the oldest version accepted per client type (`*` for the others).
    pub check_client: std::collections::BTreeMap<String, String>,
    /// TLS for `wss://` and TLS over TCP on the same port (servers.yaml `ssl`); plain clients still work.
    pub tls: Option<ClientTls>,
    /// Pomelo protobuf bodies for the routes with a proto (servers.yaml `protobuf`); JSON otherwise.
    pub protobuf: pomelo_proto::wire::protobuf::Protobuf,
    /// servers.yaml `useCrypto`: a client that sent an RSA key in its handshake signs every request
    /// (`__crypto__`); one that does not, or signs wrongly, is answered `{"code":500}` and counted.
    pub use_crypto: bool,
}

/// A client port's certificate and key, ready to accept TLS.
#[derive(Clone)]
pub struct ClientTls(pub pomelo_proto::tls::TlsAcceptor);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// From PEM files: the certificate chain and its private key.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<ClientTls> {
        pomelo_proto::tls::client_port_acceptor(cert, key).map(ClientTls)
    }
}

impl FrontendConfig {
    /// Pomelo demo gate: no heartbeat, no dictionary.
    pub fn gate() -> FrontendConfig {
        FrontendConfig {
            heartbeat: None,
            heartbeat_timeout: None,
            idle_timeout: Duration::from_secs(90),
            handshake_timeout: Duration::from_secs(10),
            use_dict: false,
            dictionary: Arc::new(Dictionary::default()),
            max_connections: 10_000,
            queue_max_packages: 1024,
            // A burst of large messages (30 of 60 KB, merged by the chat server) fits with room to spare;
            // fan-out shares one buffer among a room's sessions, so this counts, it does not copy.
            queue_max_bytes: 4 << 20,
            max_package_bytes: pomelo_proto::config::DEFAULT_MAX_MESSAGE_BYTES,
            max_inflight_requests: 32,
            // Far above what a person types, and above the benchmark's fastest step (300 per client per second).
            max_requests_per_second: pomelo_proto::config::DEFAULT_REQUESTS_PER_SECOND,
            max_batch_bytes: 64 * 1024,
            kick_flush_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(2),
            close_hook_timeout: Duration::from_secs(5),
            tls: None,
            check_client: Default::default(),
            protobuf: None,
            use_crypto: false,
        }
    }

    /// Pomelo demo connector: heartbeat 3 s, dictionary on.
    pub fn connector(dictionary: Arc<Dictionary>) -> FrontendConfig {
        FrontendConfig { heartbeat: Some(Duration::from_secs(3)), use_dict: true, dictionary, ..FrontendConfig::gate() }
    }

    /// Sets the largest client package, and raises the queue cap so that it holds at least four pushes
    /// of that size: a message a client may send, every member may receive.
    pub fn with_max_message(mut self, bytes: usize) -> FrontendConfig {
        self.max_package_bytes = bytes;
        self.queue_max_bytes = self.queue_max_bytes.max(bytes.saturating_mul(4));
        self
    }

    /// The timeout that applies once a connection works: heartbeat timeout if heartbeats are on, else idle.
    pub fn working_timeout(&self) -> Duration {
        match self.heartbeat {
            Some(hb) => self.heartbeat_timeout.unwrap_or(hb * 2),
            None => self.idle_timeout,
        }
    }

    /// The dictionary when `use_dict` is on.
    pub fn dict(&self) -> Option<&Dictionary> {
        self.use_dict.then_some(&*self.dictionary)
    }

    /// Refuses settings that would make the server useless or unbounded.
    pub fn check(&self) -> Result<(), String> {
        let zero = |d: Duration| d.is_zero();
        if self.heartbeat.is_some_and(zero) || zero(self.idle_timeout) || zero(self.handshake_timeout) {
            return Err("heartbeat, idle_timeout and handshake_timeout must be above zero".into());
        }
        if self.max_connections == 0
            || self.queue_max_packages == 0
            || self.max_inflight_requests == 0
            || self.max_requests_per_second == 0
        {
            return Err(
                "max_connections, queue_max_packages, max_inflight_requests and max_requests_per_second must be above zero"
                    .into(),
            );
        }
        if self.queue_max_bytes < 1024 || self.max_batch_bytes < 1024 || self.max_package_bytes < 64 {
            return Err("queue_max_bytes and max_batch_bytes must be at least 1 KiB, max_package_bytes 64 B".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_demo() {
        let g = FrontendConfig::gate();
        assert_eq!(g.working_timeout(), Duration::from_secs(90));
        assert!(g.dict().is_none());
        let c = FrontendConfig::connector(Arc::new(Dictionary::default()));
        assert_eq!(c.working_timeout(), Duration::from_secs(6));
        assert!(c.dict().is_some());
        assert!(c.check().is_ok());
        let bad = FrontendConfig { max_connections: 0, ..c };
        assert!(bad.check().is_err());
    }
}
