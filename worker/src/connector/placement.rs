//! Which chat server holds which of this connector's members: pure functions over the member record and
//! the live chat servers (ids in membership order), unit-tested without links. The owner rule itself is
//! [`pomelo_proto::route::owner`], the same one the chat servers apply to themselves.

use std::collections::HashMap;

use pomelo_proto::cluster::Member;
pub use pomelo_proto::route::owner;

/// The members whose rooms `chat` owns among `chats`.
pub fn owned_by<'a>(chat: &str, members: impl IntoIterator<Item = &'a Member>, chats: &[String]) -> Vec<Member> {
    members.into_iter().filter(|m| owner(&m.rid, chats) == Some(chat)).cloned().collect()
}

/// Members whose room changed owner from `old` to `new`, by their new owner.
pub fn moved<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    old: &[String],
    new: &[String],
) -> HashMap<String, Vec<Member>> {
    let mut out: HashMap<String, Vec<Member>> = HashMap::new();
    for m in members {
        let now = owner(&m.rid, new);
        if let Some(now) = now.filter(|now| owner(&m.rid, old) != Some(now)) {
            out.entry(now.to_string()).or_default().push(m.clone());
        }
    }
    out
}

/// Splits members into chunks whose JSON is at most about `max_bytes` each (a chunk holds at least one
/// member), so a re-join of any size goes in frames far below the cluster frame cap. Always at least
/// one chunk, possibly empty: an empty re-join still says "none of mine are here".
pub fn chunks(members: Vec<Member>, max_bytes: usize) -> Vec<Vec<Member>> {
    let mut out: Vec<Vec<Member>> = vec![Vec::new()];
    let mut bytes = 0;
    for m in members {
        // The JSON of a member: its strings (escaped at most 6 bytes a byte), its keys and the number.
        let size = 64 + 6 * (m.rid.len() + m.uid.len() + m.username.len());
        if bytes + size > max_bytes && out.last().is_some_and(|c| !c.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(c) = out.last_mut() {
            c.push(m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, rid: &str, session: u64) -> Member {
        Member { rid: rid.into(), uid: format!("{name}*{rid}"), username: name.into(), session }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_member_has_exactly_one_owner() {
        let chats = ids(&["chat-1", "chat-2", "chat-3"]);
        let members: Vec<Member> = (0..60).map(|i| m("u", &format!("room{i}"), i)).collect();
        let shares: Vec<Vec<Member>> = chats.iter().map(|c| owned_by(c, &members, &chats)).collect();
        assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), members.len());
        assert!(shares.iter().all(|s| !s.is_empty()), "60 rooms spread over 3 servers");
        for (c, share) in chats.iter().zip(&shares) {
            assert!(share.iter().all(|x| owner(&x.rid, &chats) == Some(c.as_str())));
        }
        assert!(owned_by("chat-1", &members, &[]).is_empty(), "no chat server owns nothing");
    }

    #[test]
    fn chunks_stay_under_the_cap_and_keep_every_member() {
        assert_eq!(chunks(Vec::new(), 1000), vec![Vec::<Member>::new()], "an empty re-join is one empty chunk");
        let name = "n".repeat(64);
        let members: Vec<Member> = (0..30_000).map(|i| m(&name, &format!("{name}{i}"), i)).collect();
        let cap = 1 << 20;
        let parts = chunks(members.clone(), cap);
        assert!(parts.len() > 1, "about 10 MB of members needs several frames");
        for p in &parts {
            let json = serde_json::to_vec(p).expect("json");
            assert!(json.len() <= cap, "{} bytes", json.len());
        }
        assert_eq!(parts.concat(), members, "nothing lost, order kept");
        assert_eq!(chunks(vec![m("a", "r", 1)], 1).len(), 1, "a member over the cap still goes, alone");
    }

    #[test]
    fn moved_lists_only_rooms_that_changed_owner() {
        let old = ids(&["chat-1", "chat-2"]);
        let new = ids(&["chat-1", "chat-2", "chat-3"]);
        let members: Vec<Member> = (0..60).map(|i| m("u", &format!("room{i}"), i)).collect();
        let moved = moved(&members, &old, &new);
        assert_eq!(moved.keys().collect::<Vec<_>>(), ["chat-3"], "adding a server moves rooms only to it");
        let to3 = &moved["chat-3"];
        assert_eq!(to3.len(), owned_by("chat-3", &members, &new).len());
        assert!(super::moved(&members, &new, &new).is_empty(), "the same servers move nothing");
        let back = super::moved(&members, &new, &old);
        assert_eq!(back.values().map(Vec::len).sum::<usize>(), to3.len(), "removing it moves them back");
        assert!(super::moved(&members, &old, &[]).is_empty(), "no owner left: nothing to re-join");
    }
}
