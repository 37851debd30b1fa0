//! Marking against a recording sink: adoption of kernel marks, their removal at
//! flow end, and the two-strike sweep.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use super::*;
use crate::flows::{Lifecycle, Owner, SeenBy};
use crate::model::socket::{Direction, Protocol, SockState};
use crate::policy::{Registry, StaticAccounts};

/// The map: key -> (tag, entropy, written by the kernel); the kernel's insert
/// count; how often the map was walked for kernel marks.
#[derive(Default)]
struct Sink(
    RefCell<HashMap<FlowKey, (Tag, u8, bool)>>,
    std::cell::Cell<u64>,
    std::cell::Cell<u32>,
);

impl Sink {
    fn kernel_writes(&self, key: FlowKey, tag: Tag, entropy: u8) {
        self.0.borrow_mut().insert(key, (tag, entropy, true));
        self.1.set(self.1.get() + 1);
    }
    fn get(&self, key: &FlowKey) -> Option<(Tag, u8, bool)> {
        self.0.borrow().get(key).copied()
    }
}

impl MarkSink for Sink {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        self.0.borrow_mut().insert(*key, (tag, entropy, false));
        Ok(())
    }
    fn insert_new(
        &self,
        key: &FlowKey,
        tag: Tag,
        entropy: u8,
    ) -> Result<Option<ExistingMark>, MapError> {
        if let Some(e) = self.existing(key)? {
            return Ok(Some(e));
        }
        self.insert(key, tag, entropy).map(|()| None)
    }
    fn existing(&self, key: &FlowKey) -> Result<Option<ExistingMark>, MapError> {
        Ok(self.get(key).map(|(tag, entropy, kernel)| ExistingMark {
            tag: Some(tag),
            entropy,
            kernel,
        }))
    }
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError> {
        Ok(self.0.borrow_mut().remove(key).is_some())
    }
    fn kernel_inserts(&self) -> Option<u64> {
        Some(self.1.get())
    }
    fn kernel_marked(&self) -> Vec<FlowKey> {
        self.2.set(self.2.get() + 1);
        self.0
            .borrow()
            .iter()
            .filter(|(_, v)| v.2)
            .map(|(k, _)| *k)
            .collect()
    }
}

const NETNS: u64 = 7;

fn key(port: u16, remote_port: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        format!("[fd00::1]:{port}").parse().unwrap(),
        format!("[fd00::2]:{remote_port}").parse().unwrap(),
    )
}

fn flow(cookie: u64, key: FlowKey, lifecycle: Lifecycle) -> Flow {
    let now = Instant::now();
    Flow {
        key,
        cookie,
        netns: NETNS,
        state: SockState::Established,
        lifecycle,
        direction: Direction::Outbound,
        inode: 0,
        owner: Owner::default(),
        first_seen: now,
        last_seen: now,
        tcp: None,
        seen_by: SeenBy::default(),
    }
}

fn policy() -> Policy {
    Policy::from_sources_with(
        &[(
            PathBuf::from("atlas.toml"),
            "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = \"Debug\"\nremote_ports = [1094]\n"
                .to_owned(),
        )],
        &Registry::bundled(),
        &StaticAccounts::new(&[], &[]),
    )
    .unwrap()
}

fn debug() -> Tag {
    let id = Registry::bundled().activity(2, "Debug").unwrap().id;
    Tag::new(2, id).unwrap()
}

fn decide(m: &mut Marking, f: &Flow, sink: &Sink) {
    m.on_flow(f, &policy(), sink, &mut |_| None);
}

#[test]
fn a_kernel_mark_with_the_same_tag_is_adopted_with_its_entropy() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let k = key(40000, 1094);
    sink.kernel_writes(k, debug(), 21);
    decide(&mut m, &flow(1, k, Lifecycle::Established), &sink);
    let d = m.decision(1).unwrap();
    assert_eq!(
        (d.entropy, d.first_packet_exact, d.in_map),
        (21, true, true)
    );
    assert_eq!(
        sink.get(&k),
        Some((debug(), 21, true)),
        "entry left as the kernel wrote it"
    );
    assert_eq!(m.counters().kernel_decided_total, 1);
}

#[test]
fn a_kernel_mark_userspace_disagrees_with_is_replaced_keeping_the_entropy() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let k = key(40000, 1094);
    let other = Tag::new(3, 1).unwrap();
    sink.kernel_writes(k, other, 9);
    decide(&mut m, &flow(1, k, Lifecycle::Established), &sink);
    assert_eq!(sink.get(&k), Some((debug(), 9, false)));
    assert!(!m.decision(1).unwrap().first_packet_exact);
    assert_eq!(m.counters().kernel_overridden, 1);
}

#[test]
fn a_kernel_mark_of_a_flow_no_rule_matches_is_removed() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let k = key(40000, 80);
    sink.kernel_writes(k, debug(), 1);
    decide(&mut m, &flow(1, k, Lifecycle::Established), &sink);
    assert_eq!(sink.get(&k), None);
}

#[test]
fn the_end_of_a_flow_removes_its_kernel_mark_even_undecided() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let (k1, k2) = (key(40000, 1094), key(40001, 1094));
    sink.kernel_writes(k1, debug(), 1);
    sink.kernel_writes(k2, debug(), 2);
    decide(&mut m, &flow(1, k1, Lifecycle::Established), &sink);
    m.on_end(&flow(1, k1, Lifecycle::Gone), &sink);
    // Never decided by userspace (ended before it was seen alive).
    m.on_end(&flow(2, k2, Lifecycle::Gone), &sink);
    assert!(sink.0.borrow().is_empty());
}

#[test]
fn the_sweep_removes_unclaimed_kernel_marks_on_the_second_strike_only() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let (owned, stale, late) = (key(40000, 1094), key(40001, 1094), key(40002, 1094));
    sink.kernel_writes(owned, debug(), 1);
    sink.kernel_writes(stale, debug(), 2);
    decide(&mut m, &flow(1, owned, Lifecycle::Established), &sink);
    sink.insert(&key(1, 1), debug(), 0).unwrap(); // a userspace (manual) mark
    m.sweep(&sink);
    assert!(sink.get(&stale).is_some(), "first strike only");
    sink.kernel_writes(late, debug(), 3);
    m.sweep(&sink);
    assert_eq!(sink.get(&stale), None, "second strike");
    assert!(
        sink.get(&late).is_some(),
        "born between sweeps: first strike"
    );
    assert!(sink.get(&owned).is_some() && sink.get(&key(1, 1)).is_some());
    assert_eq!(m.counters().kernel_swept, 1);
}

#[test]
fn the_sweep_walks_the_map_only_when_the_kernel_wrote_or_a_strike_is_pending() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let stale = key(40001, 1094);
    sink.kernel_writes(stale, debug(), 2);
    m.sweep(&sink);
    m.sweep(&sink);
    assert_eq!(sink.get(&stale), None, "second strike");
    assert_eq!(sink.2.get(), 2);
    // Nothing written since, nothing pending: no walk.
    m.sweep(&sink);
    m.sweep(&sink);
    assert_eq!(sink.2.get(), 2);
    sink.kernel_writes(key(40002, 1094), debug(), 3);
    m.sweep(&sink);
    assert_eq!(sink.2.get(), 3);
}

#[test]
fn an_announcement_overrides_the_policy_and_its_withdrawal_restores_it() {
    use crate::announce::Announcements;
    use crate::model::announcement::{Announcement, Origin};
    let (sink, mut m, policy) = (Sink::default(), Marking::new(NETNS), policy());
    let mut ann = Announcements::new(std::time::Duration::from_secs(30));
    let f = flow(1, key(40000, 1094), Lifecycle::Established);
    let decide_now = |m: &mut Marking, ann: &mut Announcements| {
        let v = ann.verdict_for(&f.key, None);
        m.on_flow_with(&f, &policy, &sink, &mut |_| None, v);
    };
    decide_now(&mut m, &mut ann);
    let (policy_tag, entropy, _) = sink.get(&f.key).unwrap();
    assert_eq!(policy_tag, debug());

    // The application describes the flow from its side: source = its local end.
    let cms = Tag::new(3, 12).unwrap();
    ann.apply(Announcement {
        key: f.key.reversed(),
        tag: Some(cms),
        origin: Origin::Pipe,
        only_for_uid: None,
    });
    decide_now(&mut m, &mut ann);
    assert_eq!(
        sink.get(&f.key),
        Some((cms, entropy, false)),
        "same entropy"
    );
    let d = m.decision(1).unwrap();
    assert!(d.announced);
    assert_eq!(d.rule.to_string(), "(announced):named pipe");

    ann.apply(Announcement {
        key: f.key,
        tag: None,
        origin: Origin::Pipe,
        only_for_uid: None,
    });
    decide_now(&mut m, &mut ann);
    assert_eq!(sink.get(&f.key), Some((policy_tag, entropy, false)));
    assert!(!m.decision(1).unwrap().announced);
    assert_eq!(ann.counters().withdrawn, 1);
}

fn closing(cookie: u64, key: FlowKey, state: SockState) -> Flow {
    Flow {
        state,
        ..flow(cookie, key, Lifecycle::Closing)
    }
}

#[test]
fn a_flow_that_closed_first_keeps_its_mark_through_time_wait() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let (active, passive) = (key(40000, 1094), key(40001, 1094));
    sink.kernel_writes(active, debug(), 5);
    decide(&mut m, &flow(1, active, Lifecycle::Established), &sink);
    decide(&mut m, &flow(2, passive, Lifecycle::Established), &sink);
    // The client closes first (FIN_WAIT1); the other flow's peer did (LAST_ACK).
    decide(&mut m, &closing(1, active, SockState::FinWait1), &sink);
    decide(&mut m, &closing(2, passive, SockState::LastAck), &sink);
    m.on_end(&flow(1, active, Lifecycle::Gone), &sink);
    m.on_end(&flow(2, passive, Lifecycle::Gone), &sink);
    assert_eq!(sink.get(&passive), None, "no TIME_WAIT: removed at once");
    assert_eq!(
        sink.get(&active),
        Some((debug(), 5, false)),
        "its last ACK leaves from TIME_WAIT; the mark is no longer a kernel one"
    );
    assert_eq!(m.lingering(), 1);
    // Not swept as an unclaimed mark meanwhile, not removed before its time.
    m.sweep(&sink);
    m.sweep(&sink);
    assert!(sink.get(&active).is_some());
    m.expire_lingering(
        &sink,
        Instant::now() + m.linger - std::time::Duration::from_secs(1),
    );
    assert!(sink.get(&active).is_some());
    m.expire_lingering(&sink, Instant::now() + m.linger);
    assert_eq!(sink.get(&active), None);
    assert_eq!(m.lingering(), 0);
}

#[test]
fn a_new_flow_on_a_lingering_tuple_takes_the_entry_over() {
    let (sink, mut m) = (Sink::default(), Marking::new(NETNS));
    let k = key(40000, 1094);
    decide(&mut m, &flow(1, k, Lifecycle::Established), &sink);
    decide(&mut m, &closing(1, k, SockState::TimeWait), &sink);
    m.on_end(&flow(1, k, Lifecycle::Gone), &sink);
    decide(&mut m, &flow(2, k, Lifecycle::Established), &sink);
    assert_eq!(m.lingering(), 0);
    m.expire_lingering(&sink, Instant::now() + m.linger);
    assert!(sink.get(&k).is_some(), "the new flow's mark stays");
    m.release_lingering(&sink);
    assert!(sink.get(&k).is_some());
}
