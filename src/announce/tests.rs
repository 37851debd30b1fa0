use std::time::Duration;

use super::*;
use std::net::SocketAddr;

use crate::model::socket::Protocol;
use crate::model::tag::Tag;

fn key(local_port: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new("fd00::1".parse().unwrap(), local_port),
        "[fd00::2]:1094".parse().unwrap(),
    )
}

fn start(k: FlowKey, exp: u16) -> Announcement {
    Announcement {
        key: k,
        tag: Some(Tag::new(exp, 1).unwrap()),
        origin: Origin::Firefly("127.0.0.1:5000".parse().unwrap()),
        only_for_uid: None,
    }
}

#[test]
fn an_announcement_names_its_flow_in_either_orientation_until_the_flow_ends() {
    let mut a = Announcements::new(Duration::from_secs(30));
    assert_eq!(a.verdict_for(&key(1), None), None);
    let keys = a.apply(start(key(1), 2));
    assert_eq!(keys, [key(1), key(1).reversed()]);
    let v = a.verdict_for(&key(1), None).unwrap();
    assert_eq!((v.tag.experiment, v.tag.activity), (2, 1));
    assert_eq!(
        v.rule.to_string(),
        "(announced):firefly from 127.0.0.1:5000"
    );
    assert!(a.verdict_for(&key(1).reversed(), None).is_some());
    assert_eq!(a.verdict_for(&key(2), None), None);
    // A restatement (ongoing, a second start) replaces it, from either end.
    a.apply(start(key(1), 3));
    assert_eq!(a.verdict_for(&key(1), None).unwrap().tag.experiment, 3);
    a.apply(start(key(1).reversed(), 4));
    assert_eq!(a.verdict_for(&key(1), None).unwrap().tag.experiment, 4);
    assert_eq!(a.counters().held, 1);
    a.forget(&key(1).reversed());
    assert_eq!(a.verdict_for(&key(1), None), None);
    assert_eq!(
        a.counters(),
        AnnouncementCounters {
            received_firefly: 3,
            held: 0,
            ..Default::default()
        }
    );
}

#[test]
fn unmatched_announcements_expire_after_the_grace_and_matched_ones_stay() {
    let mut a = Announcements::new(Duration::from_millis(30));
    a.apply(start(key(1), 2));
    a.apply(start(key(2), 2));
    assert!(a.verdict_for(&key(1), None).is_some());
    a.expire();
    assert_eq!(a.counters().held, 2, "within the grace");
    std::thread::sleep(Duration::from_millis(40));
    a.expire();
    assert_eq!(a.counters().held, 1);
    assert_eq!(a.counters().expired, 1);
    assert!(a.verdict_for(&key(1), None).is_some());
    // An end for something never announced withdraws nothing.
    a.apply(Announcement {
        key: key(9),
        tag: None,
        origin: Origin::Pipe,
        only_for_uid: None,
    });
    assert_eq!((a.counters().withdrawn, a.counters().received_pipe), (0, 1));
}

fn from_user(k: FlowKey, uid: u32) -> Announcement {
    Announcement {
        only_for_uid: Some(uid),
        ..start(k, 2)
    }
}

#[test]
fn a_users_announcement_applies_to_its_own_flows_only() {
    let mut a = Announcements::new(Duration::from_secs(30));
    a.apply(from_user(key(1), 1000));
    assert_eq!(a.verdict_for(&key(1), Some(0)), None, "root's flow");
    assert_eq!(a.verdict_for(&key(1), Some(1001)), None, "another user's");
    assert_eq!(a.verdict_for(&key(1), None), None, "owner unknown");
    assert_eq!(a.counters().foreign_flow, 3);
    assert!(a.verdict_for(&key(1), Some(1000)).is_some());
    // Root's (or the pipe's) announcements name any flow.
    a.apply(start(key(2), 2));
    assert!(a.verdict_for(&key(2), Some(1000)).is_some());
}

#[test]
fn held_announcements_are_bounded_and_the_excess_is_counted() {
    let mut a = Announcements::with_limit(Duration::from_millis(1), 100);
    for port in 1..=1000 {
        a.apply(start(key(port), 2));
    }
    assert_eq!(a.counters().held, 100);
    assert_eq!(a.counters().dropped_full, 900);
    // A restatement of a held one is not new: it is taken.
    a.apply(start(key(1).reversed(), 5));
    assert_eq!(a.verdict_for(&key(1), None).unwrap().tag.experiment, 5);
    assert_eq!(a.counters().dropped_full, 900);
    std::thread::sleep(Duration::from_millis(5));
    a.expire();
    assert_eq!(a.counters().held, 1, "the matched one stays");
    assert!(
        a.held.capacity() < 64,
        "memory handed back: {}",
        a.held.capacity()
    );
}

#[test]
fn an_announced_flow_no_dump_finds_gets_its_own_start_and_end() {
    let mut a = Announcements::new(Duration::from_secs(30))
        .with_fireflies_for(&[crate::config::AnnounceInput::Firefly]);
    let before = std::time::Instant::now();
    a.apply(start(key(1), 2));
    a.apply(start(key(2), 2));
    let mut by_user = start(key(3), 2);
    by_user.only_for_uid = Some(1000);
    a.apply(by_user);
    assert!(a.verdict_for(&key(2), None).is_some(), "key 2 has a socket");
    assert_eq!(a.unseen(before), [], "a dump begun before: proves nothing");
    let after = std::time::Instant::now();
    let unseen = a.unseen(after);
    assert_eq!(
        unseen.len(),
        1,
        "not the matched one, nor a user's: {unseen:?}"
    );
    assert_eq!((unseen[0].key, unseen[0].tag.experiment), (key(1), 2));
    assert_eq!(a.unseen(after), [], "started once");
    assert!(
        !a.fireflies_ours(&key(1)),
        "a socket found later sends none itself"
    );
    // A restatement (ongoing) continues it; the end ends it with the same start.
    a.apply(start(key(1).reversed(), 2));
    assert_eq!(a.take_ended(), []);
    a.apply(Announcement {
        tag: None,
        ..start(key(1), 2)
    });
    let ended = a.take_ended();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].start, unseen[0].start);
    assert_eq!(ended[0].key, key(1).reversed(), "as last announced");
    assert_eq!(a.counters().unseen, 1);
    // A matched flow ending sends nothing from here (its socket's end does).
    a.forget(&key(2));
    assert_eq!(a.take_ended(), []);
}
