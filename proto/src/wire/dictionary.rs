//! The route dictionary (`useDict`), built the way Pomelo's dictionary component builds it: every
//! handler route of every server type, sorted lexicographically and numbered from 1, then the extra
//! entries (Pomelo's `config/dictionary.json`) numbered on. `dictVersion` is base64(MD5(JSON of dict)).
//! Immutable once built; share it behind an `Arc`.

use std::collections::HashMap;

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::digest;

/// The handler routes of the chat cluster's server types (the demo's three), numbered 1.. in sorted order.
pub const CHAT_HANDLER_ROUTES: &[&str] =
    &["gate.gateHandler.queryEntry", "connector.entryHandler.enter", "chat.chatHandler.send"];
/// Routes pomelo-rs adds after the demo's, so that no code a client cached moves (room history).
pub const CHAT_ADDED_ROUTES: &[&str] = &["chat.chatHandler.history"];
/// libpomelo v1 reads route codes with `& 0xff`: past this many routes its codes go to the wrong route.
pub const ONE_BYTE_CODES: usize = 255;

/// The dictionary every server of the cluster uses: [`CHAT_HANDLER_ROUTES`], [`CHAT_ADDED_ROUTES`], then
/// servers.yaml's `dictionary` entries (Pomelo's `config/dictionary.json`, typically push routes).
pub fn chat_dictionary(extra: &[String]) -> Result<Dictionary, DictionaryError> {
    let added = CHAT_ADDED_ROUTES.iter().map(|r| r.to_string()).chain(extra.iter().cloned());
    Dictionary::build(CHAT_HANDLER_ROUTES.iter().copied(), added)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DictionaryError {
    #[error("the dictionary has {0} routes; codes are 2 bytes, so at most 65535 fit")]
    TooMany(usize),
}

/// Route ↔ code, in code order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dictionary {
    /// Index `i` holds the route with code `i + 1`.
    routes: Vec<String>,
    codes: HashMap<String, u16>,
    version: String,
}

impl Dictionary {
    /// `handler_routes` are sorted (byte order, as JavaScript's default sort does for ASCII routes) and
    /// deduplicated; `extra` entries already present are skipped.
    pub fn build<I, J, S, T>(handler_routes: I, extra: J) -> Result<Dictionary, DictionaryError>
    where
        I: IntoIterator<Item = S>,
        J: IntoIterator<Item = T>,
        S: Into<String>,
        T: Into<String>,
    {
        let mut routes: Vec<String> = handler_routes.into_iter().map(Into::into).collect();
        // JavaScript sorts by UTF-16 code units; for the ASCII routes Pomelo builds this is byte order.
        routes.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
        routes.dedup();
        let mut seen: std::collections::HashSet<String> = routes.iter().cloned().collect();
        for e in extra {
            let e = e.into();
            if seen.insert(e.clone()) {
                routes.push(e);
            }
        }
        if routes.len() > usize::from(u16::MAX) {
            return Err(DictionaryError::TooMany(routes.len()));
        }
        let codes = routes.iter().enumerate().map(|(i, r)| (r.clone(), (i + 1) as u16)).collect();
        let mut d = Dictionary { routes, codes, version: String::new() };
        d.version = digest::base64(&digest::md5(d.dict_json().as_bytes()));
        Ok(d)
    }

    pub fn code(&self, route: &str) -> Option<u16> {
        self.codes.get(route).copied()
    }

    pub fn route(&self, code: u16) -> Option<&str> {
        let i = usize::from(code).checked_sub(1)?;
        self.routes.get(i).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// `dictVersion` as sent in the handshake.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Routes in code order (code = index + 1).
    pub fn routes(&self) -> impl Iterator<Item = (&str, u16)> {
        self.routes.iter().enumerate().map(|(i, r)| (r.as_str(), (i + 1) as u16))
    }

    /// `JSON.stringify(dict)`: route → code in insertion (= code) order.
    pub fn dict_json(&self) -> String {
        serde_json::to_string(&RouteToCode(self)).unwrap_or_default()
    }

    /// Serializes as `{"route": code, ...}` in code order (`dict` and `routeToCode`).
    pub fn route_to_code(&self) -> RouteToCode<'_> {
        RouteToCode(self)
    }

    /// Serializes as `{"1": "route", ...}` (`codeToRoute`); JavaScript orders integer keys ascending.
    pub fn code_to_route(&self) -> CodeToRoute<'_> {
        CodeToRoute(self)
    }
}

pub struct RouteToCode<'a>(&'a Dictionary);
pub struct CodeToRoute<'a>(&'a Dictionary);

impl Serialize for RouteToCode<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (r, c) in self.0.routes() {
            m.serialize_entry(r, &c)?;
        }
        m.end()
    }
}

impl Serialize for CodeToRoute<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (r, c) in self.0.routes() {
            m.serialize_entry(&c.to_string(), r)?;
        }
        m.end()
    }
}

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
    fn chat_demo_codes() {
        let d = demo();
        assert_eq!(d.code("chat.chatHandler.send"), Some(1));
        assert_eq!(d.code("connector.entryHandler.enter"), Some(2));
        assert_eq!(d.code("gate.gateHandler.queryEntry"), Some(3));
        assert_eq!(d.code("onChat"), None);
        assert_eq!(d.route(2), Some("connector.entryHandler.enter"));
        assert_eq!(d.route(0), None);
        assert_eq!(d.route(4), None);
        assert_eq!(
            d.dict_json(),
            r#"{"chat.chatHandler.send":1,"connector.entryHandler.enter":2,"gate.gateHandler.queryEntry":3}"#
        );
        assert_eq!(
            serde_json::to_string(&d.code_to_route()).unwrap(),
            r#"{"1":"chat.chatHandler.send","2":"connector.entryHandler.enter","3":"gate.gateHandler.queryEntry"}"#
        );
        // node -e "crypto.createHash('md5').update(JSON.stringify(dict)).digest('base64')"
        assert_eq!(d.version(), "s2r1qfKDrbhWCkA6uf+PTA==");
    }

    #[test]
    fn extras_follow_sorted_routes_and_duplicates_are_skipped() {
        let d = Dictionary::build(["b.h.m", "a.h.m", "a.h.m"], ["onZ", "onA", "a.h.m"]).unwrap();
        let all: Vec<_> = d.routes().collect();
        assert_eq!(all, vec![("a.h.m", 1), ("b.h.m", 2), ("onZ", 3), ("onA", 4)]);
        assert_eq!(d.dict_json(), r#"{"a.h.m":1,"b.h.m":2,"onZ":3,"onA":4}"#);
    }

    #[test]
    fn uppercase_sorts_before_lowercase_like_javascript() {
        let d = Dictionary::build(["a.b.c", "B.b.c", "a.B.c"], Vec::<String>::new()).unwrap();
        let all: Vec<_> = d.routes().map(|(r, _)| r).collect();
        assert_eq!(all, vec!["B.b.c", "a.B.c", "a.b.c"]);
    }
}
