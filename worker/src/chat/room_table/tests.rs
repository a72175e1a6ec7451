//! Unit tests of the room table: joins, leaves, broadcasts, gone connectors, authoritative re-joins.

use super::*;

fn chat<'a>(from: &'a str, target: &'a str, msg: &'a serde_json::Value) -> OnChat<'a> {
    OnChat { msg, from, target, epoch: "e1", offset: 7 }
}

fn m(name: &str, rid: &str, session: u64) -> Member {
    Member { rid: rid.into(), uid: format!("{name}*{rid}"), username: name.into(), session }
}

#[test]
fn join_pushes_on_add_to_the_others_and_lists_users_in_order() {
    let mut r = RoomTable::new(None);
    let c1: Arc<str> = "c1".into();
    let c2: Arc<str> = "c2".into();
    let (users, d) = r.join(&c1, m("ann", "r", 1)).expect("join");
    assert_eq!(users, ["ann"]);
    assert!(d.is_empty());
    r.join(&c1, m("bob", "r", 2)).expect("join");
    let (users, d) = r.join(&c2, m("cy", "r", 7)).expect("join");
    assert_eq!(users, ["ann", "bob", "cy"]);
    assert_eq!(d.len(), 1, "one delivery for connector c1");
    assert_eq!(&d[0].sessions[..], [1, 2]);
    assert!(d[0].payload.ends_with(br#"{"route":"onAdd","user":"cy"}"#));
    assert!(matches!(r.join(&c2, m("ann", "r", 9)), Err(ChatError::Duplicate { .. })));
    assert!(r.join(&c1, m("ann", "r", 1)).is_ok(), "the same session joining again is harmless");
    assert_eq!(r.member_count(), 3);
}

#[test]
fn broadcast_includes_the_sender_and_private_reaches_one() {
    let mut r = RoomTable::new(None);
    let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
    r.join(&c1, m("ann", "r", 1)).expect("join");
    r.join(&c2, m("bob", "r", 2)).expect("join");
    r.join(&c2, m("eve", "other", 3)).expect("join");
    let d = r.send("r", chat("ann", "*", &json!("hi"))).expect("send");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].payload.as_ptr(), d[1].payload.as_ptr(), "encoded once, shared");
    assert!(d[0].payload.ends_with(br#"{"msg":"hi","from":"ann","target":"*","epoch":"e1","offset":7}"#));
    let d = r.send("r", chat("ann", "bob", &json!("psst"))).expect("send");
    assert_eq!(d.len(), 1);
    assert_eq!((&*d[0].connector, &d[0].sessions[..]), ("c2", &[2u64][..]));
    assert!(r.send("r", chat("ann", "eve", &json!("x"))).expect("send").is_empty(), "eve is in another room");
}

#[test]
fn broadcasts_follow_joins_and_leaves() {
    let mut r = RoomTable::new(None);
    let c1: Arc<str> = "c1".into();
    r.join(&c1, m("ann", "r", 1)).expect("join");
    assert_eq!(&r.send("r", chat("ann", "*", &json!("a"))).expect("send")[0].sessions[..], [1]);
    r.join(&c1, m("bob", "r", 2)).expect("join");
    let d = r.send("r", chat("ann", "*", &json!("b"))).expect("send");
    assert_eq!((&d[0].sessions[..], &*d[0].room), (&[1u64, 2][..], "r"));
    r.leave(&c1, &m("ann", "r", 1));
    assert_eq!(&r.send("r", chat("bob", "*", &json!("c"))).expect("send")[0].sessions[..], [2]);
}

#[test]
fn a_gone_connector_leaves_and_the_rest_hear_on_leave() {
    let mut r = RoomTable::new(None);
    let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
    r.join(&c1, m("ann", "r", 1)).expect("join");
    r.join(&c2, m("bob", "r", 2)).expect("join");
    r.join(&c2, m("cy", "solo", 3)).expect("join");
    let d = r.drop_connector("c2");
    assert_eq!(d.len(), 1);
    assert_eq!(&d[0].sessions[..], [1]);
    assert!(d[0].payload.ends_with(br#"{"route":"onLeave","user":"bob"}"#));
    assert_eq!(r.room_count(), 1, "the emptied room is gone");
    assert_eq!(r.member_count(), 1);
}

#[test]
fn rejoin_is_silent_and_retain_drops_moved_rooms() {
    let mut r = RoomTable::new(None);
    let c1: Arc<str> = "c1".into();
    let all = || vec![m("ann", "r1", 1), m("bob", "r1", 2), m("cy", "r2", 3)];
    assert!(r.rejoin(&c1, all(), |_| true).is_empty(), "nobody is told of a re-join");
    assert!(r.rejoin(&c1, all(), |_| true).is_empty(), "the same set again changes nothing");
    assert_eq!(r.member_count(), 3);
    assert_eq!(r.retain(|rid| rid == "r1"), 1);
    assert_eq!((r.room_count(), r.member_count()), (1, 2));
    let d = r.leave(&c1, &m("ann", "r1", 99));
    assert!(d.is_empty(), "another session cannot remove ann");
    let d = r.leave(&c1, &m("ann", "r1", 1));
    assert_eq!(&d[0].sessions[..], [2]);
}

#[test]
fn rejoin_is_authoritative_for_its_connector_only() {
    let mut r = RoomTable::new(None);
    let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
    r.join(&c1, m("ann", "r", 1)).expect("join");
    r.join(&c1, m("ghost", "r", 2)).expect("join");
    r.join(&c1, m("old", "gone", 3)).expect("join");
    r.join(&c2, m("bob", "r", 4)).expect("join");
    // c1 now says: ann is still in r, cy joined r (its join's answer was lost), nothing else; and dan is in
    // a room another server owns.
    let d = r.rejoin(&c1, vec![m("ann", "r", 1), m("cy", "r", 5), m("dan", "elsewhere", 6)], |rid| rid != "elsewhere");
    let leaves: Vec<&[u8]> = d.iter().map(|d| &d.payload[..]).collect();
    assert_eq!(d.len(), 2, "onLeave ghost to c1 and c2 in r; the emptied room `gone` tells no one: {leaves:?}");
    assert!(d.iter().all(|d| d.payload.ends_with(br#"{"route":"onLeave","user":"ghost"}"#)));
    let to_c1 = d.iter().find(|d| &*d.connector == "c1").expect("c1 hears it");
    assert_eq!(&to_c1.sessions[..], [1, 5], "the members c1 listed hear of the ghost");
    assert_eq!(r.room_count(), 1, "room `gone` emptied; `elsewhere` not created");
    assert_eq!(r.member_count(), 3, "ann, cy (c1) and bob (c2)");
    assert!(r.join(&c2, m("ghost", "r", 9)).is_ok(), "the ghost's name is free again");
    let d = r.rejoin(&c1, vec![], |_| true);
    assert_eq!(d.len(), 2, "an empty set removes every c1 member: onLeave ann, onLeave cy");
    assert_eq!(r.member_count(), 2, "c2's bob and ghost stay");
    let d = r.rejoin(&c1, vec![m("ann", "r", 7)], |_| true);
    assert!(d.is_empty());
    let d = r.rejoin(&c1, vec![m("ann", "r", 8)], |_| true);
    assert_eq!(r.member_count(), 3, "a new session of the same uid replaces the old one");
    assert!(d.is_empty(), "replaced in place, nobody leaves: {d:?}");
}

#[test]
fn limits_refuse_joins_past_them_but_never_a_rejoin_or_a_member_joining_again() {
    let mut r = RoomTable::new(None).with_limits(Limits { room_members: 2, rooms: 1 });
    let c1: Arc<str> = "c1".into();
    r.join(&c1, m("ann", "r", 1)).expect("join");
    r.join(&c1, m("bob", "r", 2)).expect("join");
    match r.join(&c1, m("cy", "r", 3)) {
        Err(ChatError::Full { msg }) => assert_eq!(msg, "room is full (2 members)"),
        other => panic!("a third member of a room of 2: {other:?}"),
    }
    match r.join(&c1, m("dee", "s", 4)) {
        Err(ChatError::Full { msg }) => assert_eq!(msg, "this chat server holds its maximum of 1 rooms"),
        other => panic!("a second room of 1: {other:?}"),
    }
    assert!(r.join(&c1, m("ann", "r", 1)).is_ok(), "a member already in may join again");
    assert_eq!((r.room_count(), r.member_count()), (1, 2));
    // A connector's authoritative re-join is never refused: its members were admitted before.
    r.rejoin(&c1, vec![m("ann", "r", 1), m("bob", "r", 2), m("cy", "r", 3), m("dee", "s", 4)], |_| true);
    assert_eq!((r.room_count(), r.member_count()), (2, 4));
    // A leave frees a place.
    r.leave(&c1, &m("cy", "r", 3));
    assert!(matches!(r.join(&c1, m("cy", "r", 3)), Err(ChatError::Full { .. })), "still 2 of 2 in r");
}
