//! The handshake: the client's JSON request (read leniently, as Pomelo does) and the server's reply,
//! with its keys in Pomelo's order: `code`, `sys {heartbeat, dict, routeToCode, codeToRoute,
//! dictVersion, useDict}`, `user`. Pure; the frontend decides the code and calls these.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::dictionary::{CodeToRoute, Dictionary, RouteToCode};
use super::package::{self, PackageError, PackageType};
use super::protobuf::ProtoBundle;

pub const CODE_OK: u16 = 200;
/// Bad handshake (no `sys`) or the user hook failed.
pub const CODE_USE_ERROR: u16 = 500;
/// `checkClient` refused the client type/version.
pub const CODE_OLD_CLIENT: u16 = 501;

/// A dotted version (`1.2.10`) as numbers, compared part by part (`1.2.10` > `1.2.9`); `None` if it is not one.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    let v = v.trim().trim_start_matches('v');
    let parts: Option<Vec<u64>> = v.split('.').map(|p| p.parse().ok()).collect();
    parts.filter(|p| !p.is_empty() && p.len() <= 8)
}

/// `checkClient` from servers.yaml: the minimum version for the client's type (or for `*`); a client of
/// a type with a minimum passes only with a version at least that. Types without one pass.
pub fn client_allowed(
    min_versions: &std::collections::BTreeMap<String, String>,
    client_type: Option<&str>,
    client_version: Option<&str>,
) -> bool {
    let rule = client_type.and_then(|t| min_versions.get(t)).or_else(|| min_versions.get("*"));
    let Some(min) = rule.and_then(|m| parse_version(m)) else { return true };
    let Some(have) = client_version.and_then(parse_version) else { return false };
    let len = have.len().max(min.len());
    let pad = |v: &[u64]| (0..len).map(|i| v.get(i).copied().unwrap_or(0)).collect::<Vec<_>>();
    pad(&have) >= pad(&min)
}

/// What the client sent; every field is optional because Pomelo treats a bad body as `{}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandshakeRequest {
    /// `sys` was present (and not null): without it the reply is 500.
    pub has_sys: bool,
    pub client_type: Option<String>,
    pub client_version: Option<String>,
    pub dict_version: Option<String>,
    pub proto_version: Option<Value>,
    /// `sys.rsa`: `{rsa_n, rsa_e}` from a client that signs its messages (`useCrypto`), `{}` otherwise.
    pub rsa: Option<Value>,
    pub user: Option<Value>,
}

impl HandshakeRequest {
    /// Parses a handshake body; never fails (bodies that are not JSON objects read as `{}`).
    pub fn parse(body: &[u8]) -> HandshakeRequest {
        let Ok(Value::Object(mut root)) = serde_json::from_slice::<Value>(body) else {
            return HandshakeRequest::default();
        };
        let user = root.remove("user");
        let sys = root.remove("sys").filter(|s| !s.is_null());
        let field = |k: &str| -> Option<String> {
            match sys.as_ref()?.get(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        HandshakeRequest {
            has_sys: sys.is_some(),
            client_type: field("type"),
            client_version: field("version"),
            dict_version: field("dictVersion"),
            proto_version: sys.as_ref().and_then(|s| s.get("protoVersion")).cloned(),
            rsa: sys.as_ref().and_then(|s| s.get("rsa")).cloned(),
            user,
        }
    }
}

#[derive(Serialize)]
struct Sys<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dict: Option<RouteToCode<'a>>,
    #[serde(rename = "routeToCode", skip_serializing_if = "Option::is_none")]
    route_to_code: Option<RouteToCode<'a>>,
    #[serde(rename = "codeToRoute", skip_serializing_if = "Option::is_none")]
    code_to_route: Option<CodeToRoute<'a>>,
    #[serde(rename = "dictVersion", skip_serializing_if = "Option::is_none")]
    dict_version: Option<&'a str>,
    #[serde(rename = "useDict", skip_serializing_if = "Option::is_none")]
    use_dict: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protos: Option<&'a serde_json::value::RawValue>,
    #[serde(rename = "useProto", skip_serializing_if = "Option::is_none")]
    use_proto: Option<bool>,
}

#[derive(Serialize)]
struct Reply<'a> {
    code: u16,
    sys: Sys<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a Value>,
}

/// Heartbeat interval in seconds as Pomelo sends it: an integer when whole (`3`), otherwise a fraction.
fn heartbeat_secs(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        Value::from(d.as_secs())
    } else {
        Value::from(d.as_secs_f64())
    }
}

/// What a frontend offers in its handshake: heartbeat, dictionary and protobuf, each when it is on.
#[derive(Clone, Copy, Default)]
pub struct Offer<'a> {
    pub heartbeat: Option<Duration>,
    pub dict: Option<&'a Dictionary>,
    pub protos: Option<&'a ProtoBundle>,
}

/// The JSON of a 200 reply. The dictionary (`dict`, `routeToCode`, `codeToRoute`, `dictVersion`, always
/// together) is sent only when the client's `dictVersion` differs, and the protos (`server`, `client`,
/// `version`, always together) only when its `protoVersion` differs; `useDict` / `useProto` say either
/// is on.
pub fn ok_reply_json(offer: Offer<'_>, req: &HandshakeRequest, user: Option<&Value>) -> String {
    let Offer { heartbeat, dict, protos } = offer;
    let send_dict = dict.filter(|d| req.dict_version.as_deref() != Some(d.version()));
    let send_protos = protos.filter(|p| !p.client_has(req.proto_version.as_ref()));
    let reply = Reply {
        code: CODE_OK,
        sys: Sys {
            heartbeat: heartbeat.map(heartbeat_secs),
            dict: send_dict.map(Dictionary::route_to_code),
            route_to_code: send_dict.map(Dictionary::route_to_code),
            code_to_route: send_dict.map(Dictionary::code_to_route),
            dict_version: send_dict.map(Dictionary::version),
            use_dict: dict.map(|_| true),
            protos: send_protos.map(ProtoBundle::handshake_json),
            use_proto: protos.map(|_| true),
        },
        user,
    };
    serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"code":500}"#.to_owned())
}

/// A 200 reply as a HANDSHAKE package.
pub fn ok_reply(offer: Offer<'_>, req: &HandshakeRequest, user: Option<&Value>) -> Result<Bytes, PackageError> {
    package::encode(PackageType::Handshake, ok_reply_json(offer, req, user).as_bytes())
}

/// An error reply `{"code":N}` as a HANDSHAKE package.
pub fn error_reply(code: u16) -> Bytes {
    let body = format!(r#"{{"code":{code}}}"#);
    package::encode(PackageType::Handshake, body.as_bytes()).unwrap_or_default()
}

/// What the JS websocket client sends (75 bytes), for tests and tools.
pub const JS_CLIENT_HANDSHAKE: &str = r#"{"sys":{"type":"js-websocket","version":"0.0.1","rsa":{},"protoVersion":0}}"#;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn demo() -> Dictionary {
        Dictionary::build(
            ["gate.gateHandler.queryEntry", "connector.entryHandler.enter", "chat.chatHandler.send"],
            Vec::<String>::new(),
        )
        .unwrap()
    }

    #[test]
    fn js_client_handshake_is_75_bytes_and_parses() {
        let p = package::encode(PackageType::Handshake, JS_CLIENT_HANDSHAKE.as_bytes()).unwrap();
        assert_eq!(&p[..4], &[0x01, 0x00, 0x00, 0x4b]);
        let r = HandshakeRequest::parse(JS_CLIENT_HANDSHAKE.as_bytes());
        assert!(r.has_sys);
        assert_eq!(r.client_type.as_deref(), Some("js-websocket"));
        assert_eq!(r.client_version.as_deref(), Some("0.0.1"));
        assert_eq!(r.dict_version, None);
        assert_eq!(r.proto_version, Some(Value::from(0)));
        assert_eq!(r.user, None);
    }

    #[test]
    fn check_client_compares_versions_per_type() {
        let rules: std::collections::BTreeMap<String, String> =
            [("js-websocket", "0.0.2"), ("desktop", "1.10")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        assert!(client_allowed(&rules, Some("js-websocket"), Some("0.0.2")));
        assert!(client_allowed(&rules, Some("js-websocket"), Some("0.1")));
        assert!(!client_allowed(&rules, Some("js-websocket"), Some("0.0.1")));
        assert!(!client_allowed(&rules, Some("js-websocket"), None), "no version for a type with a minimum");
        assert!(!client_allowed(&rules, Some("desktop"), Some("1.9.9")), "1.9.9 < 1.10");
        assert!(client_allowed(&rules, Some("desktop"), Some("1.10.0")));
        assert!(client_allowed(&rules, Some("unity"), None), "types without a rule pass");
        let any: std::collections::BTreeMap<String, String> = [("*".to_string(), "2".to_string())].into();
        assert!(!client_allowed(&any, Some("unity"), Some("1.5")));
        assert!(client_allowed(&any, None, Some("2.0.1")));
        assert_eq!(parse_version("v1.2.3"), Some(vec![1, 2, 3]));
        assert_eq!(parse_version("1.x"), None);
    }

    #[test]
    fn bad_bodies_read_as_empty() {
        for b in [&b"not json"[..], b"[1,2]", b"", b"{\"sys\":null}", &[0xff, 0xfe]] {
            assert!(!HandshakeRequest::parse(b).has_sys);
        }
    }

    #[test]
    fn connector_reply_key_order() {
        let d = demo();
        let offer = Offer { heartbeat: Some(Duration::from_secs(3)), dict: Some(&d), protos: None };
        let json = ok_reply_json(offer, &HandshakeRequest::default(), None);
        assert_eq!(
            json,
            concat!(
                r#"{"code":200,"sys":{"heartbeat":3,"#,
                r#""dict":{"chat.chatHandler.send":1,"connector.entryHandler.enter":2,"gate.gateHandler.queryEntry":3},"#,
                r#""routeToCode":{"chat.chatHandler.send":1,"connector.entryHandler.enter":2,"gate.gateHandler.queryEntry":3},"#,
                r#""codeToRoute":{"1":"chat.chatHandler.send","2":"connector.entryHandler.enter","3":"gate.gateHandler.queryEntry"},"#,
                r#""dictVersion":"s2r1qfKDrbhWCkA6uf+PTA==","useDict":true}}"#
            )
        );
        // A client that already has this dictionary gets only useDict.
        let cached = HandshakeRequest { dict_version: Some(d.version().to_owned()), ..Default::default() };
        let json = ok_reply_json(offer, &cached, None);
        assert_eq!(json, r#"{"code":200,"sys":{"heartbeat":3,"useDict":true}}"#);
    }

    #[test]
    fn gate_reply_and_user_echo() {
        let none = HandshakeRequest::default();
        assert_eq!(ok_reply_json(Offer::default(), &none, None), r#"{"code":200,"sys":{}}"#);
        let user = serde_json::json!({"a":1});
        assert_eq!(ok_reply_json(Offer::default(), &none, Some(&user)), r#"{"code":200,"sys":{},"user":{"a":1}}"#);
        assert_eq!(
            ok_reply_json(Offer { heartbeat: Some(Duration::from_millis(1500)), ..Offer::default() }, &none, None),
            r#"{"code":200,"sys":{"heartbeat":1.5}}"#
        );
    }

    #[test]
    fn protos_go_after_the_dictionary_and_honour_the_cache() {
        let d = demo();
        let p = ProtoBundle::new(Some(r#"{"onChat": {"required string msg": 1}}"#), None).unwrap();
        let offer = Offer { heartbeat: Some(Duration::from_secs(3)), dict: Some(&d), protos: Some(&p) };
        let fresh = HandshakeRequest::parse(JS_CLIENT_HANDSHAKE.as_bytes());
        let json = ok_reply_json(offer, &fresh, None);
        let tail = format!(
            r#""useDict":true,"protos":{{"server":{{"onChat":{{"msg":{{"option":"required","type":"string","tag":1}},"__messages":{{}},"__tags":{{"1":"msg"}}}}}},"client":{{}},"version":"{}"}},"useProto":true}}}}"#,
            p.version()
        );
        assert!(json.ends_with(&tail), "{json}");
        // A client holding both (libpomelo2 sends both versions) gets neither, only that they are on.
        let cached = HandshakeRequest {
            dict_version: Some(d.version().to_owned()),
            proto_version: Some(Value::from(p.version())),
            ..fresh.clone()
        };
        assert_eq!(
            ok_reply_json(offer, &cached, None),
            r#"{"code":200,"sys":{"heartbeat":3,"useDict":true,"useProto":true}}"#
        );
        // An old cached version gets the new protos, all three keys.
        let old = HandshakeRequest { proto_version: Some(Value::from("c3RhbGU=")), ..fresh };
        assert!(ok_reply_json(offer, &old, None).contains(r#""protos":{"server":"#));
    }

    #[test]
    fn error_replies() {
        let e = error_reply(501);
        assert_eq!(&e[..4], &[1, 0, 0, 12]);
        assert_eq!(&e[4..], br#"{"code":501}"#);
    }
}
