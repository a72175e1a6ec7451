//! The per-connection protocol state machine, as pure functions: given the phase and one package, what
//! to do. The connection task (`conn.rs`) performs the actions. Rules are Pomelo's (reference §1.3-1.9).

use std::collections::HashSet;

use bytes::Bytes;
use pomelo_proto::wire::crypto::ClientKey;
use pomelo_proto::wire::handshake::HandshakeRequest;
use pomelo_proto::wire::protobuf::ProtoBundle;
use pomelo_proto::wire::{Dictionary, Message, MessageType, Package, PackageType, Route};
use serde_json::Value;

/// INITED → WAIT_ACK → WORKING → (closed by the task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Inited,
    WaitAck,
    Working,
}

/// What the connection task must do with one package.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Nothing (Pomelo ignores it); the string says why, for debug logs.
    Ignore(&'static str),
    /// Answer the handshake (the task calls the hooks and builds the reply).
    Handshake(HandshakeRequest),
    /// The ACK arrived: register the session, send one heartbeat if on, arm the timeout.
    Ack,
    /// A heartbeat in WORKING: echo it and re-arm the heartbeat timeout.
    Heartbeat,
    /// Run the handler; `id` is `None` for a notify.
    Dispatch { id: Option<u32>, route: String, body: Value },
    /// Answer `{"code":500}` to request `id` (protobuf-encoded when `route` has a server proto).
    Error500 { id: u32, why: &'static str, route: Option<String> },
    /// A signing client's message without a valid `__crypto__`: counted, and a request answered 500.
    BadSignature { id: Option<u32>, why: String },
    /// Kick the session with this reason (Pomelo's `constructor` guard).
    Kick(&'static str),
    /// Malformed input: close this connection and count a protocol error.
    ProtocolError(String),
}

/// What the state machine needs to know about the server.
pub(crate) struct Ctx<'a> {
    pub(crate) dict: Option<&'a Dictionary>,
    /// Routes with a client proto have protobuf bodies.
    pub(crate) protos: Option<&'a ProtoBundle>,
    /// The key of a client that signs its messages (`useCrypto`).
    pub(crate) key: Option<&'a ClientKey>,
    pub(crate) routes: &'a HashSet<String>,
}

pub(crate) fn on_package(phase: &mut Phase, pkg: Package, ctx: &Ctx<'_>) -> Action {
    match pkg.kind {
        PackageType::Handshake if *phase == Phase::Inited => Action::Handshake(HandshakeRequest::parse(&pkg.body)),
        PackageType::Handshake => Action::Ignore("handshake after the handshake"),
        PackageType::HandshakeAck if *phase == Phase::WaitAck => {
            *phase = Phase::Working;
            Action::Ack
        }
        PackageType::HandshakeAck => Action::Ignore("ack outside WAIT_ACK"),
        PackageType::Heartbeat if *phase == Phase::Working => Action::Heartbeat,
        PackageType::Heartbeat => Action::Ignore("heartbeat before WORKING"),
        PackageType::Data if *phase == Phase::Working => on_message(&pkg.body, ctx),
        PackageType::Data => Action::Ignore("data before WORKING"),
        PackageType::Kick => Action::ProtocolError("client sent package type 5 (KICK)".into()),
    }
}

/// Called after the task sent a handshake reply with code 200.
pub(crate) fn handshake_accepted(phase: &mut Phase) {
    if *phase == Phase::Inited {
        *phase = Phase::WaitAck;
    }
}

fn on_message(body: &Bytes, ctx: &Ctx<'_>) -> Action {
    let msg = match Message::decode(body) {
        Ok(m) => m,
        Err(e) => return Action::ProtocolError(format!("bad message: {e}")),
    };
    let id = match msg.kind {
        MessageType::Request => Some(msg.id),
        MessageType::Notify => None,
        MessageType::Response | MessageType::Push => {
            return Action::ProtocolError(format!("client sent a {:?} message", msg.kind))
        }
    };
    let route = match msg.route {
        Some(Route::Plain(r)) => r,
        Some(Route::Code(code)) => match ctx.dict.and_then(|d| d.route(code)) {
            Some(r) => r.to_owned(),
            None => return Action::Ignore("compressed route without a dictionary entry"),
        },
        None => return Action::Ignore("message without a route"),
    };
    if !route.contains('.') {
        return Action::Ignore("invalid route string");
    }
    let segments: Vec<&str> = route.split('.').collect();
    let fail = |why| match id {
        Some(id) => Action::Error500 { id, why, route: None },
        None => Action::Ignore(why),
    };
    if segments.len() != 3 {
        return fail("route without exactly 3 segments");
    }
    if segments[2] == "constructor" {
        return Action::Kick("attack");
    }
    if !ctx.routes.contains(&route) {
        return fail("no handler for route");
    }
    if let Some(key) = ctx.key {
        // Pomelo checks the signature of every message of a client that gave a key; a protobuf body has
        // no `__crypto__`, so it fails there too.
        let checked = match ctx.protos.is_some_and(|p| p.decodes(&route)) {
            true => Err("a route with a client proto cannot carry __crypto__".to_owned()),
            false => key.verify(&msg.body).map_err(|e| e.to_string()),
        };
        return match checked {
            Ok(body) => Action::Dispatch { id, route, body },
            Err(why) => Action::BadSignature { id, why },
        };
    }
    if let Some(decoded) = ctx.protos.and_then(|p| p.decode(&route, &msg.body)) {
        return match (decoded, id) {
            (Ok(body), _) => Action::Dispatch { id, route, body },
            (Err(e), Some(id)) => {
                tracing::debug!("request {id}: {e}");
                Action::Error500 { id, why: "protobuf body does not decode", route: Some(route) }
            }
            (Err(_), None) => Action::Ignore("notify whose protobuf body does not decode"),
        };
    }
    // Pomelo: a body that is not JSON is `{}`. The JS client sends emoji as CESU-8 surrogate pairs, which
    // are not UTF-8: joined into real characters first.
    let body = serde_json::from_slice(&msg.body)
        .ok()
        .or_else(|| serde_json::from_slice(&pomelo_proto::wire::text::cesu8_to_utf8(&msg.body)?).ok())
        .unwrap_or_else(|| Value::Object(Default::default()));
    Action::Dispatch { id, route, body }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(m: Message) -> Package {
        Package::new(PackageType::Data, m.encode().unwrap())
    }

    fn run(phase: &mut Phase, pkg: Package) -> Action {
        let dict = Dictionary::build(["chat.chatHandler.send", "connector.entryHandler.enter"], ["onX"]).unwrap();
        let routes: HashSet<String> = ["connector.entryHandler.enter".to_owned()].into();
        on_package(phase, pkg, &Ctx { dict: Some(&dict), protos: None, key: None, routes: &routes })
    }

    #[test]
    fn phases() {
        let mut p = Phase::Inited;
        let hb = Package::new(PackageType::Heartbeat, "");
        let ack = Package::new(PackageType::HandshakeAck, "");
        assert!(matches!(run(&mut p, hb.clone()), Action::Ignore(_)));
        assert!(matches!(run(&mut p, ack.clone()), Action::Ignore(_)));
        let hs = run(&mut p, Package::new(PackageType::Handshake, "garbage"));
        assert_eq!(hs, Action::Handshake(HandshakeRequest::default()));
        handshake_accepted(&mut p);
        assert_eq!(p, Phase::WaitAck);
        assert!(matches!(run(&mut p, Package::new(PackageType::Handshake, "{}")), Action::Ignore(_)));
        assert_eq!(run(&mut p, ack.clone()), Action::Ack);
        assert_eq!(p, Phase::Working);
        assert_eq!(run(&mut p, hb), Action::Heartbeat);
        assert!(matches!(run(&mut p, ack), Action::Ignore(_)));
        assert!(matches!(run(&mut p, Package::new(PackageType::Kick, "")), Action::ProtocolError(_)));
    }

    #[test]
    fn routing_rules() {
        let mut p = Phase::Working;
        let body = || Bytes::from_static(br#"{"username":"bob","rid":"r1"}"#);
        let want = Action::Dispatch {
            id: Some(1),
            route: "connector.entryHandler.enter".into(),
            body: json!({"username":"bob","rid":"r1"}),
        };
        assert_eq!(run(&mut p, data(Message::request(1, Route::Code(2), body()))), want);
        let plain = Route::Plain("connector.entryHandler.enter".into());
        assert_eq!(run(&mut p, data(Message::request(1, plain.clone(), body()))), want);
        let r = run(&mut p, data(Message::notify(plain.clone(), "not json")));
        assert_eq!(r, Action::Dispatch { id: None, route: "connector.entryHandler.enter".into(), body: json!({}) });
        // Unknown code, no dot, wrong segment count, unknown route, constructor.
        assert!(matches!(run(&mut p, data(Message::request(2, Route::Code(9), body()))), Action::Ignore(_)));
        assert!(matches!(
            run(&mut p, data(Message::request(2, Route::Plain("nodot".into()), body()))),
            Action::Ignore(_)
        ));
        assert!(matches!(
            run(&mut p, data(Message::request(3, Route::Plain("a.b".into()), body()))),
            Action::Error500 { id: 3, .. }
        ));
        assert!(matches!(run(&mut p, data(Message::notify(Route::Plain("a.b".into()), body()))), Action::Ignore(_)));
        assert!(matches!(
            run(&mut p, data(Message::request(4, Route::Plain("chat.chatHandler.send".into()), body()))),
            Action::Error500 { id: 4, .. }
        ));
        assert_eq!(
            run(&mut p, data(Message::request(5, Route::Plain("connector.entryHandler.constructor".into()), body()))),
            Action::Kick("attack")
        );
        // Clients may not send responses or pushes, nor undecodable messages.
        assert!(matches!(run(&mut p, data(Message::response(1, ""))), Action::ProtocolError(_)));
        assert!(matches!(run(&mut p, Package::new(PackageType::Data, "")), Action::ProtocolError(_)));
    }

    #[test]
    fn compressed_route_without_dictionary_is_dropped() {
        let routes: HashSet<String> = HashSet::new();
        let mut p = Phase::Working;
        let a = on_package(
            &mut p,
            data(Message::request(1, Route::Code(1), "")),
            &Ctx { dict: None, protos: None, key: None, routes: &routes },
        );
        assert!(matches!(a, Action::Ignore(_)));
    }

    #[test]
    fn bodies_of_routes_with_a_client_proto_are_protobuf() {
        let protos =
            ProtoBundle::new(None, Some(r#"{"connector.entryHandler.enter": {"required string username": 1}}"#))
                .unwrap();
        let routes: HashSet<String> = ["connector.entryHandler.enter".to_owned(), "a.b.c".to_owned()].into();
        let ctx = Ctx { dict: None, protos: Some(&protos), key: None, routes: &routes };
        let mut p = Phase::Working;
        let enter =
            |body: &'static [u8]| data(Message::request(7, Route::Plain("connector.entryHandler.enter".into()), body));
        assert_eq!(
            on_package(&mut p, enter(&[0x0a, 3, b'a', b'n', b'n']), &ctx),
            Action::Dispatch {
                id: Some(7),
                route: "connector.entryHandler.enter".into(),
                body: json!({"username": "ann"})
            }
        );
        // A body that is not this proto answers 500 (through the route's server proto, if any); JSON is not tried.
        assert!(matches!(
            on_package(&mut p, enter(br#"{"username":"ann"}"#), &ctx),
            Action::Error500 { id: 7, route: Some(_), .. }
        ));
        // Other routes stay JSON.
        let other = data(Message::request(8, Route::Plain("a.b.c".into()), &br#"{"x":1}"#[..]));
        assert_eq!(
            on_package(&mut p, other, &ctx),
            Action::Dispatch { id: Some(8), route: "a.b.c".into(), body: json!({"x": 1}) }
        );
    }
}
