//! The gate: `gate.gateHandler.queryEntry {uid}` → `{"code":200,"host":..,"port":..}` of the connector
//! Pomelo would pick (`abs(crc32(uid)) % n` over the live connectors in membership order). Reads the
//! live membership from a `watch` channel on each request; no tasks of its own. Optionally serves one
//! page on plain HTTP `GET /`.

use std::sync::Arc;

use bytes::Bytes;
use pomelo_proto::control::{Membership, ServerType};
use pomelo_proto::route::pomelo_index;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::frontend::{BoxFuture, FrontendConfig, Handler, HandlerError, Request};

use crate::routes::QUERY_ENTRY;

pub struct Gate {
    membership: watch::Receiver<Arc<Membership>>,
    page: Option<(String, Bytes)>,
}

impl Gate {
    pub fn new(membership: watch::Receiver<Arc<Membership>>) -> Gate {
        Gate { membership, page: None }
    }

    /// Serves `body` with `content_type` on `GET /` and `GET /index.html`.
    pub fn with_page(mut self, content_type: &str, body: Bytes) -> Gate {
        self.page = Some((content_type.to_owned(), body));
        self
    }

    /// The connector for `uid`: the host clients reach it by (`clientHost`, else `host`) and its client port.
    pub fn pick(&self, uid: &str) -> Option<(String, u16)> {
        let m = self.membership.borrow().clone();
        let live: Vec<_> = m.of_type(ServerType::Connector).filter(|s| s.addrs.client.is_some()).collect();
        let s = live.get(pomelo_index(uid, live.len())?)?;
        Some((s.client_host.clone().unwrap_or_else(|| s.host.clone()), s.addrs.client?.port()))
    }

    /// Pomelo demo gate settings: no heartbeat, no dictionary.
    pub fn frontend_config() -> FrontendConfig {
        FrontendConfig::gate()
    }

    fn query_entry(&self, body: &Value) -> Value {
        // Pomelo hashes `String(uid)`; an absent or empty uid is refused.
        let uid = match body.get("uid") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return json!({"code": 500}),
        };
        match self.pick(&uid) {
            Some((host, port)) => json!({"code": 200, "host": host, "port": port}),
            None => json!({"code": 500}),
        }
    }
}

impl Handler for Gate {
    fn routes(&self) -> Vec<String> {
        vec![QUERY_ENTRY.to_string()]
    }

    fn handle<'a>(&'a self, req: Request) -> BoxFuture<'a, Result<Value, HandlerError>> {
        let out = match req.route.as_str() {
            QUERY_ENTRY => Ok(self.query_entry(&req.body)),
            other => Err(HandlerError::new(format!("gate has no route {other}"))),
        };
        Box::pin(std::future::ready(out))
    }

    fn http_get(&self, path: &str) -> Option<(String, Bytes)> {
        match path {
            "/" | "/index.html" => self.page.clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pomelo_proto::control::{BoundAddrs, ServerInfo};

    fn server(id: &str, t: ServerType, port: u16) -> ServerInfo {
        ServerInfo {
            id: id.into(),
            server_type: t,
            host: "127.0.0.1".into(),
            client_host: None,
            pid: 1,
            addrs: BoundAddrs { rpc: None, client: Some(format!("127.0.0.1:{port}").parse().unwrap()) },
            link_keys: Default::default(),
        }
    }

    #[test]
    fn picks_like_pomelo() {
        let m = Membership {
            epoch: 0,
            version: 1,
            servers: vec![
                server("gate-1", ServerType::Gate, 3014),
                server("connector-1", ServerType::Connector, 3050),
                server("chat-1", ServerType::Chat, 0),
                server("connector-2", ServerType::Connector, 3051),
                server("connector-3", ServerType::Connector, 3052),
            ],
        };
        let (tx, rx) = watch::channel(Arc::new(m));
        let g = Gate::new(rx);
        // crc32("bob") → index 2 of 3 (reference §4.2).
        assert_eq!(g.query_entry(&json!({"uid":"bob"})), json!({"code":200,"host":"127.0.0.1","port":3052}));
        assert_eq!(g.query_entry(&json!({})), json!({"code":500}));
        assert_eq!(g.query_entry(&json!({"uid":""})), json!({"code":500}));
        // `clientHost`: what clients are told, where the cluster's own name for the connector would not do.
        let mut m = (**g.membership.borrow()).clone();
        m.servers[4].client_host = Some("chat.example.com".into());
        tx.send(Arc::new(m)).unwrap();
        assert_eq!(g.query_entry(&json!({"uid":"bob"})), json!({"code":200,"host":"chat.example.com","port":3052}));
        tx.send(Arc::new(Membership::default())).unwrap();
        assert_eq!(g.query_entry(&json!({"uid":"bob"})), json!({"code":500}));
    }
}
