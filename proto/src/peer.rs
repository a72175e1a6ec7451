//! Whether a peer's address fits the `host` servers.yaml gives for the id it proved: checked by the master
//! on control links and by a chat server on RPC links, after the key, so a stolen key is of no use from
//! another machine.

use std::net::IpAddr;
use std::time::Duration;

/// Whether a peer's address fits the `host` of the id it proved: a local server connects from this
/// machine, a server whose host is an IP address from that address, one whose host is a DNS name from
/// one of the addresses it resolved to (`resolved`, from [`resolve`]).
pub fn fits(host: &str, peer: IpAddr, peer_local: bool, resolved: &[IpAddr]) -> Result<(), String> {
    let peer = peer.to_canonical();
    if crate::config::is_local_host(host) {
        return if peer_local {
            Ok(())
        } else {
            Err(format!("a server on `{host}` must connect from this machine, not {peer}"))
        };
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.to_canonical() != peer => Err(format!("a server on {host} must connect from it, not from {peer}")),
        Ok(_) => Ok(()),
        Err(_) if resolved.is_empty() => Err(format!("`{host}` did not resolve, so no peer can prove it is that host")),
        Err(_) if !resolved.iter().any(|a| a.to_canonical() == peer) => {
            let list: Vec<String> = resolved.iter().map(|a| a.to_string()).collect();
            Err(format!(
                "a server on `{host}` must connect from one of its addresses ({}), not from {peer}",
                list.join(", ")
            ))
        }
        Err(_) => Ok(()),
    }
}

/// How long resolving a server's host name may take before the registration is refused.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A `host` that is neither local nor an IP address: its addresses come from the resolver.
pub fn is_dns_name(host: &str) -> bool {
    !crate::config::is_local_host(host) && host.parse::<IpAddr>().is_err()
}

/// `host`'s addresses (at most 32), or none if it does not resolve within [`RESOLVE_TIMEOUT`].
pub async fn resolve(host: &str) -> Vec<IpAddr> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip().to_canonical()).take(32).collect(),
        Ok(Err(e)) => {
            tracing::warn!("cannot resolve `{}`: {e}", crate::auth::printable(host));
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("resolving `{}` took over {}s", crate::auth::printable(host), RESOLVE_TIMEOUT.as_secs());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fits;

    #[test]
    fn a_peer_must_come_from_its_servers_host() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let peer_fits = |h: &str, p, l| fits(h, p, l, &[]);
        assert!(peer_fits("127.0.0.1", ip("127.0.0.1"), true).is_ok());
        assert!(peer_fits("localhost", ip("127.0.0.1"), true).is_ok());
        assert!(peer_fits("127.0.0.1", ip("10.0.0.9"), false).is_err(), "a local server from another machine");
        assert!(peer_fits("10.0.0.2", ip("10.0.0.2"), false).is_ok());
        assert!(peer_fits("10.0.0.2", ip("::ffff:10.0.0.2"), false).is_ok(), "v4-mapped is the same address");
        assert!(peer_fits("10.0.0.2", ip("10.0.0.3"), false).is_err(), "another host claiming its id");
        assert!(peer_fits("chat-b.internal", ip("10.0.0.3"), false).is_err(), "a name that did not resolve");
        let b = [ip("10.0.0.3"), ip("10.0.0.4")];
        assert!(fits("chat-b.internal", ip("10.0.0.4"), false, &b).is_ok(), "one of its addresses");
        assert!(fits("chat-b.internal", ip("::ffff:10.0.0.3"), false, &b).is_ok(), "v4-mapped");
        assert!(fits("chat-b.internal", ip("10.0.0.5"), false, &b).is_err(), "another address");
    }
}
