//! The handler routes of every server type, the route dictionary built from them, and how a Pomelo uid
//! (`username*rid`) splits. Shared by the gate, the connector and the chat server (which encodes pushes
//! with the same dictionary the connector announced in its handshake). Plain data, no tasks.

use pomelo_proto::wire::Dictionary;

/// The gate's only route.
pub const QUERY_ENTRY: &str = "gate.gateHandler.queryEntry";
/// The connector's routes.
pub const ENTER: &str = "connector.entryHandler.enter";
pub const SEND: &str = "chat.chatHandler.send";
/// Room history (issue 16); not one of the demo's routes, so it comes after them in the dictionary.
pub const HISTORY: &str = "chat.chatHandler.history";

/// Every handler route of the demo's server types.
pub const ROUTES: &[&str] = pomelo_proto::wire::dictionary::CHAT_HANDLER_ROUTES;

/// The route dictionary of every server type: the demo's routes sorted (codes 3, 2, 1, as in the demo),
/// then [`HISTORY`] as 4, so adding it moves no code a client may have cached.
pub fn chat_dictionary() -> Dictionary {
    chat_dictionary_with(&[])
}

/// [`chat_dictionary`] then servers.yaml's `dictionary` entries (checked to fit when the file was read;
/// an oversized one falls back to the routes alone rather than to no dictionary).
pub fn chat_dictionary_with(extra: &[String]) -> Dictionary {
    pomelo_proto::wire::dictionary::chat_dictionary(extra).unwrap_or_else(|e| {
        tracing::error!("servers.yaml dictionary: {e}; using the handler routes alone");
        pomelo_proto::wire::dictionary::chat_dictionary(&[]).unwrap_or_default()
    })
}

/// The username part of a uid `username*rid` (usernames cannot contain `*`, see the connector's `enter`).
pub fn username_of(uid: &str) -> &str {
    uid.split('*').next().unwrap_or(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_codes_match_the_demo() {
        let d = chat_dictionary();
        assert_eq!(d.code(SEND), Some(1));
        assert_eq!(d.code(ENTER), Some(2));
        assert_eq!(d.code(QUERY_ENTRY), Some(3));
        assert_eq!(d.code(HISTORY), Some(4));
        assert_eq!(username_of("bob*r1"), "bob");
        assert_eq!((ROUTES, HISTORY), (&[QUERY_ENTRY, ENTER, SEND][..], "chat.chatHandler.history"));
        let extra = chat_dictionary_with(&["onChat".to_owned(), "onAdd".to_owned()]);
        assert_eq!((extra.code(HISTORY), extra.code("onChat"), extra.code("onAdd")), (Some(4), Some(5), Some(6)));
    }
}
