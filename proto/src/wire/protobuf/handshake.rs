//! What Pomelo's handshake carries for protobuf: the protos in *parsed* form and their version.
//!
//! Pomelo's protobuf component sends `sys.protos = {server, client, version}` where `server` and
//! `client` are `pomelo-protobuf`'s `parse()` of the files (`{"<route>": {"<name>": {"option", "type",
//! "tag"}, "__messages": {...}, "__tags": {"<tag>": "<name>"}}}`; the browser client uses that shape as
//! it is) and `version` is `base64(md5(JSON.stringify(client) + JSON.stringify(server)))`. Both depend on
//! the key order of the file, which a `serde_json::Value` does not keep, so [`parsed_json`] reads the
//! text itself, in order, and writes what `JSON.stringify(parse(JSON.parse(text)))` writes, byte for
//! byte (checked in `proto/tests/protobuf_oracle.rs`). Pure, no I/O.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::schema::is_index_like;
use super::{Protos, ProtosError};
use crate::wire::digest;

/// A JSON value whose objects keep their keys in the order JavaScript gives them.
enum Node {
    Object(Vec<(String, Node)>),
    Other(Value),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Node, E> {
                Ok(Node::Other(Value::Bool(b)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Node, E> {
                Ok(Node::Other(Value::from(n)))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Node, E> {
                Ok(Node::Other(Value::from(n)))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Node, E> {
                Ok(Node::Other(Value::from(n)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Node, E> {
                Ok(Node::Other(Value::String(s.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Other(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element::<Value>()? {
                    items.push(v);
                }
                Ok(Node::Other(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries: Vec<(String, Node)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Node>()? {
                    // JSON.parse: a repeated key keeps its first place and its last value.
                    match entries.iter_mut().find(|(e, _)| *e == k) {
                        Some(slot) => slot.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                // JS objects list array-index keys first, ascending; the rest in insertion order.
                entries.sort_by_key(|(k, _)| js_key_order(k));
                Ok(Node::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

fn put_str(out: &mut String, s: &str) {
    // serde_json escapes exactly what JSON.stringify escapes: `"`, `\` and control characters.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// `JSON.stringify(parseObject(obj))` for one message (a validated one: see [`parsed_json`]).
fn put_message(out: &mut String, entries: &[(String, Node)]) {
    let mut fields: Vec<(&str, &str, &str, &Value)> = Vec::new();
    let mut nested: Vec<(&str, &[(String, Node)])> = Vec::new();
    for (key, value) in entries {
        let parts: Vec<&str> = key.split(' ').collect();
        match (&parts[..], value) {
            (&["message", name], Node::Object(inner)) => nested.push((name, inner)),
            (&[label, ty, name], Node::Other(tag)) => fields.push((name, label, ty, tag)),
            _ => {}
        }
    }
    // The parsed object's own keys are field names (then `__messages`, `__tags`), and message names
    // in `__messages`: JS lists the array-index ones first.
    fields.sort_by_key(|f| js_key_order(f.0));
    nested.sort_by_key(|m| js_key_order(m.0));
    out.push('{');
    for (name, label, ty, tag) in &fields {
        put_str(out, name);
        out.push_str(":{\"option\":");
        put_str(out, label);
        out.push_str(",\"type\":");
        put_str(out, ty);
        out.push_str(",\"tag\":");
        out.push_str(&tag.to_string());
        out.push_str("},");
    }
    out.push_str("\"__messages\":{");
    for (i, (name, inner)) in nested.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        put_str(out, name);
        out.push(':');
        put_message(out, inner);
    }
    out.push_str("},\"__tags\":{");
    let mut tags: Vec<(u64, &str)> = fields.iter().map(|f| (f.3.as_u64().unwrap_or(0), f.0)).collect();
    tags.sort_by_key(|t| t.0);
    for (i, (tag, name)) in tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("\"{tag}\":"));
        put_str(out, name);
    }
    out.push_str("}}");
}

/// Sort key for JS own-property order: array indices first, ascending; the rest keep their order.
fn js_key_order(k: &str) -> (u8, u64) {
    if is_index_like(k) {
        (0, k.parse().unwrap_or(0))
    } else {
        (1, 0)
    }
}

/// Compiles a protos file and returns it with the parsed form that Pomelo's handshake carries for it,
/// as the exact text `JSON.stringify(protobuf.parse(JSON.parse(text)))` gives.
pub fn parsed_json(text: &str) -> Result<(Protos, String), ProtosError> {
    let protos = Protos::parse(text)?;
    let node: Node = serde_json::from_str(text).map_err(|e| ProtosError::BadJson { message: e.to_string() })?;
    let Node::Object(routes) = node else {
        return Err(ProtosError::NotAnObjectOfRoutes { found: "not an object" });
    };
    let mut out = String::with_capacity(text.len() * 2);
    out.push('{');
    for (i, (route, body)) in routes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        put_str(&mut out, route);
        out.push(':');
        match body {
            Node::Object(entries) => put_message(&mut out, entries),
            Node::Other(_) => out.push_str("{\"__messages\":{},\"__tags\":{}}"),
        }
    }
    out.push('}');
    Ok((protos, out))
}

/// Pomelo's `sys.protos.version`: base64 of the MD5 of the client's parsed JSON then the server's
/// (`"{}"` for a file that is not there).
pub fn version(client_parsed: &str, server_parsed: &str) -> String {
    let mut both = Vec::with_capacity(client_parsed.len() + server_parsed.len());
    both.extend_from_slice(client_parsed.as_bytes());
    both.extend_from_slice(server_parsed.as_bytes());
    digest::base64(&digest::md5(&both))
}
