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
pub const ROUTES: &[&str] = &[QUERY_ENTRY, ENTER, SEND];

/// The route dictionary of every server type: the demo's routes sorted (codes 3, 2, 1, as in the demo),
/// then [`HISTORY`] as 4, so adding it moves no code a client may have cached.
pub fn chat_dictionary() -> Dictionary {
    Dictionary::build(ROUTES.iter().copied(), [HISTORY]).expect("four routes fit in a dictionary")
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
    }
}
