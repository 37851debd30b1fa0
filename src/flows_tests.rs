use super::*;
use crate::model::socket::{Protocol, TcpBytes};
use proptest::prelude::*;
use std::collections::BTreeSet;

const NS: u64 = 4026531840;

fn obs(cookie: u64, state: SockState, source: Source) -> SocketObservation {
    let port = 10_000 + (cookie % 50_000) as u16;
    SocketObservation {
        key: FlowKey::new(
            Protocol::Tcp,
            format!("10.0.0.1:{port}").parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
        ),
        cookie,
        netns: NS,
        state,
        direction: match source {
            Source::Tracker => Direction::Outbound,
            Source::SockDiag => Direction::Unknown,
        },
        inode: 1000 + cookie,
        uid: Some(1000),
        pid: None,
        comm: None,
        cgroup_id: Some(7),
        tcp: None,
        tcp_bytes: None,
        source,
    }
}

fn table() -> FlowTable {
    FlowTable::new(FlowTableConfig {
        netns: NS,
        ..FlowTableConfig::default()
    })
}

fn kinds(events: &[FlowEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            FlowEvent::Started(_) => "started",
            FlowEvent::Updated(_) => "updated",
            FlowEvent::Ended(_, EndReason::Closed) => "closed",
            FlowEvent::Ended(_, EndReason::Vanished) => "vanished",
            FlowEvent::Ended(_, EndReason::TimeWaitExpired) => "tw-expired",
        })
        .collect()
}

#[test]
fn tracker_lifecycle_new_established_closing_gone() {
    let mut t = table();
    let ev = t.apply_observation(obs(1, SockState::SynSent, Source::Tracker));
    assert_eq!(kinds(&ev), ["started"]);
    assert_eq!(t.get(1).unwrap().lifecycle, Lifecycle::New);
    let ev = t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    assert_eq!(kinds(&ev), ["updated"]);
    assert_eq!(t.get(1).unwrap().lifecycle, Lifecycle::Established);
    let ev = t.apply_observation(obs(1, SockState::FinWait1, Source::Tracker));
    assert_eq!(kinds(&ev), ["updated"]);
    assert_eq!(t.get(1).unwrap().lifecycle, Lifecycle::Closing);
    let ev = t.apply_observation(obs(1, SockState::Close, Source::Tracker));
    assert_eq!(kinds(&ev), ["closed"]);
    let FlowEvent::Ended(f, _) = &ev[0] else {
        unreachable!()
    };
    assert_eq!(f.lifecycle, Lifecycle::Gone);
    assert!(t.is_empty());
    let c = t.counters();
    assert_eq!((c.flows_started, c.flows_ended), (1, 1));
}

#[test]
fn lifecycle_never_goes_backwards() {
    let mut t = table();
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    let ev = t.apply_observation(obs(1, SockState::SynSent, Source::Tracker));
    assert!(ev.is_empty());
    assert_eq!(t.get(1).unwrap().state, SockState::Established);
}

#[test]
fn listen_sockets_are_not_flows() {
    let mut t = table();
    assert!(t
        .apply_observation(obs(1, SockState::Listen, Source::Tracker))
        .is_empty());
    assert!(t
        .reconcile(
            &[obs(2, SockState::Listen, Source::SockDiag)],
            Instant::now()
        )
        .is_empty());
    assert!(t.is_empty());
}

#[test]
fn tracker_and_dump_of_same_socket_make_one_flow() {
    let mut t = table();
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    let started = Instant::now();
    let ev = t.reconcile(&[obs(1, SockState::Established, Source::SockDiag)], started);
    assert_eq!(kinds(&ev), ["updated"], "first confirmation by sock_diag");
    let ev = t.reconcile(
        &[obs(1, SockState::Established, Source::SockDiag)],
        Instant::now(),
    );
    assert!(ev.is_empty(), "nothing changed: no event");
    assert_eq!(t.len(), 1);
    let f = t.get(1).unwrap();
    assert_eq!(
        f.seen_by,
        SeenBy {
            tracker: true,
            sockdiag: true
        }
    );
    assert_eq!(
        f.direction,
        Direction::Outbound,
        "the tracker's direction wins"
    );
    assert_eq!(t.counters().reconcile_added, 0);
}

#[test]
fn reconcile_adopts_sockets_the_tracker_missed() {
    let mut t = table();
    let mut o = obs(5, SockState::Established, Source::SockDiag);
    o.direction = Direction::Inbound;
    o.tcp = Some(TcpStats {
        rtt_us: 42,
        ..TcpStats::default()
    });
    let ev = t.reconcile(&[o], Instant::now());
    assert_eq!(kinds(&ev), ["started"]);
    let f = t.get(5).unwrap();
    assert_eq!(f.direction, Direction::Inbound);
    assert_eq!(f.tcp.unwrap().rtt_us, 42);
    assert_eq!(f.owner.uid, Some(1000));
    assert_eq!(t.counters().reconcile_added, 1);
}

#[test]
fn the_close_events_byte_counts_reach_the_ended_flow_and_never_go_back() {
    let mut t = table();
    let mut dumped = obs(6, SockState::Established, Source::SockDiag);
    dumped.tcp = Some(TcpStats {
        rtt_us: 42,
        bytes_acked: 1000,
        bytes_received: 900,
        ..TcpStats::default()
    });
    t.reconcile(&[dumped], Instant::now());
    let mut close = obs(6, SockState::Close, Source::Tracker);
    close.tcp_bytes = Some(TcpBytes {
        acked: 5000,
        received: 700,
    });
    let ev = t.apply_observation(close);
    let [FlowEvent::Ended(f, EndReason::Closed)] = ev.as_slice() else {
        panic!("{ev:?}");
    };
    let tcp = f.tcp.unwrap();
    assert_eq!((tcp.bytes_acked, tcp.bytes_received), (5000, 900));
    assert_eq!(tcp.rtt_us, 42, "the rest of tcp_info stays");
}

#[test]
fn reconcile_ends_flows_missing_from_the_dump() {
    let mut t = table();
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    t.apply_observation(obs(2, SockState::Established, Source::Tracker));
    let started = Instant::now();
    let ev = t.reconcile(&[obs(2, SockState::Established, Source::SockDiag)], started);
    assert!(kinds(&ev).contains(&"vanished"));
    assert!(t.get(1).is_none() && t.get(2).is_some());
    assert_eq!(t.counters().reconcile_ended, 1);
}

#[test]
fn a_dump_in_parts_adds_as_they_come_and_ends_flows_only_when_complete() {
    use SockState::Established;
    let mut t = table();
    t.apply_observation(obs(1, Established, Source::Tracker));
    let started = Instant::now();
    let ev = t.dump_part(&[obs(2, Established, Source::SockDiag)]);
    assert_eq!(kinds(&ev), ["started"]);
    let ev = t.dump_part(&[obs(3, Established, Source::SockDiag)]);
    assert_eq!(kinds(&ev), ["started"]);
    assert!(
        t.get(1).is_some(),
        "nothing ends before the dump is complete"
    );
    let ev = t.dump_complete(started);
    assert_eq!(kinds(&ev), ["vanished"]);
    assert!(t.get(1).is_none() && t.get(2).is_some() && t.get(3).is_some());

    // An abandoned dump ends nothing, and the next one counts only its own parts.
    t.dump_part(&[obs(2, Established, Source::SockDiag)]);
    t.dump_abandoned();
    t.dump_part(&[obs(3, Established, Source::SockDiag)]);
    let ev = t.dump_complete(Instant::now());
    assert_eq!(kinds(&ev), ["vanished"]);
    assert!(t.get(2).is_none() && t.get(3).is_some());
}

#[test]
fn flow_born_during_the_dump_is_not_ended() {
    let mut t = table();
    let started = Instant::now();
    // The tracker reports a socket created after the kernel walked its bucket.
    t.apply_observation(obs(1, SockState::SynSent, Source::Tracker));
    let ev = t.reconcile(&[], started);
    assert!(ev.is_empty());
    assert!(t.get(1).is_some());
    // Next round, dump started after the event: absence now means it is gone.
    let ev = t.reconcile(&[], Instant::now());
    assert_eq!(kinds(&ev), ["vanished"]);
}

#[test]
fn close_reported_after_the_dump_is_not_undone_by_it() {
    let mut t = table();
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    let started = Instant::now();
    let dump = [obs(1, SockState::Established, Source::SockDiag)];
    t.apply_observation(obs(1, SockState::Close, Source::Tracker));
    let ev = t.reconcile(&dump, started);
    assert!(ev.is_empty(), "{:?}", kinds(&ev));
    assert!(t.is_empty());
}

#[test]
fn time_wait_is_closing_and_ends_after_grace() {
    let mut t = FlowTable::new(FlowTableConfig {
        netns: NS,
        time_wait_grace: Duration::from_secs(3600),
        ..FlowTableConfig::default()
    });
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    let ev = t.reconcile(
        &[obs(1, SockState::TimeWait, Source::SockDiag)],
        Instant::now(),
    );
    assert_eq!(kinds(&ev), ["updated"]);
    assert_eq!(t.get(1).unwrap().lifecycle, Lifecycle::Closing);
    // Gone from the dump: ended.
    let ev = t.reconcile(&[], Instant::now());
    assert_eq!(kinds(&ev), ["vanished"]);

    let mut t = FlowTable::new(FlowTableConfig {
        netns: NS,
        time_wait_grace: Duration::ZERO,
        ..FlowTableConfig::default()
    });
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    let ev = t.reconcile(
        &[obs(1, SockState::TimeWait, Source::SockDiag)],
        Instant::now(),
    );
    assert_eq!(kinds(&ev), ["updated", "tw-expired"]);
    // Its TIME_WAIT remnant keeps the cookie: not brought back.
    let ev = t.reconcile(
        &[obs(1, SockState::TimeWait, Source::SockDiag)],
        Instant::now(),
    );
    assert!(ev.is_empty());
}

#[test]
fn unknown_time_wait_sockets_are_not_adopted() {
    let mut t = table();
    assert!(t
        .reconcile(
            &[obs(9, SockState::TimeWait, Source::SockDiag)],
            Instant::now()
        )
        .is_empty());
    assert!(t.is_empty());
}

#[test]
fn flows_of_other_namespaces_survive_a_local_reconcile() {
    let mut t = table();
    let mut o = obs(1, SockState::Established, Source::Tracker);
    o.netns = 12345;
    t.apply_observation(o);
    assert!(t.reconcile(&[], Instant::now()).is_empty());
    assert_eq!(t.get(1).unwrap().netns, 12345);
    let ev = t.reconcile_scoped(&[], &[12345], Instant::now());
    assert_eq!(kinds(&ev), ["vanished"]);
}

#[test]
fn closing_flows_of_other_namespaces_end_after_a_minute_of_silence() {
    let mut t = table();
    let long_ago = Instant::now() - Duration::from_secs(61);
    let mut closing = obs(1, SockState::FinWait1, Source::Tracker);
    closing.netns = 12345;
    t.apply_observation_at(closing, long_ago);
    let mut open = obs(2, SockState::Established, Source::Tracker);
    open.netns = 12345;
    t.apply_observation_at(open, long_ago);
    let mut recent = obs(3, SockState::FinWait1, Source::Tracker);
    recent.netns = 12345;
    t.apply_observation(recent);
    // The close of socket 1 was lost: a minute later it is ended; an established
    // socket and a recently closing one stay.
    let ev = t.reconcile(&[], Instant::now());
    assert_eq!(ev.len(), 1);
    assert!(t.get(1).is_none());
    assert!(t.get(2).is_some() && t.get(3).is_some());
}

#[test]
fn unbound_client_key_is_completed_by_later_event() {
    let mut t = table();
    let mut o = obs(1, SockState::SynSent, Source::Tracker);
    let mut unbound = o.key.local();
    unbound.set_port(0);
    o.key = FlowKey::new(o.key.proto, unbound, o.key.remote());
    t.apply_observation(o);
    let ev = t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    assert_eq!(kinds(&ev), ["updated"]);
    assert_ne!(t.get(1).unwrap().key.local().port(), 0);
}

#[test]
fn many_open_close_leave_nothing_behind() {
    let mut t = FlowTable::new(FlowTableConfig {
        netns: NS,
        tombstone_ttl: Duration::ZERO,
        ..FlowTableConfig::default()
    });
    for c in 1..=20_000 {
        t.apply_observation(obs(c, SockState::SynSent, Source::Tracker));
        t.apply_observation(obs(c, SockState::Established, Source::Tracker));
        t.apply_observation(obs(c, SockState::Close, Source::Tracker));
        if c % 1000 == 0 {
            t.reconcile(&[], Instant::now());
        }
    }
    t.reconcile(&[], Instant::now());
    assert!(t.is_empty());
    assert_eq!(t.tombstones(), 0);
    let c = t.counters();
    assert_eq!((c.flows_started, c.flows_ended), (20_000, 20_000));
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Open,
    MissedOpen,
    Close,
    MissedClose,
    Reconcile,
}

fn op() -> impl Strategy<Value = (u64, Op)> {
    (
        1u64..40,
        prop_oneof![
            Just(Op::Open),
            Just(Op::MissedOpen),
            Just(Op::Close),
            Just(Op::MissedClose),
            Just(Op::Reconcile)
        ],
    )
}

proptest! {
    /// Whatever the tracker missed, a complete dump taken after the last event leaves
    /// the table holding exactly the live sockets.
    #[test]
    fn complete_dump_converges_to_live_set(ops in proptest::collection::vec(op(), 0..200)) {
        let mut t = table();
        let mut live = BTreeSet::new();
        let mut dead = BTreeSet::new();
        let dump_of = |live: &BTreeSet<u64>| -> Vec<SocketObservation> {
            live.iter().map(|&c| obs(c, SockState::Established, Source::SockDiag)).collect()
        };
        for (c, op) in ops {
            match op {
                Op::Open | Op::MissedOpen if !live.contains(&c) && !dead.contains(&c) => {
                    live.insert(c);
                    if matches!(op, Op::Open) {
                        t.apply_observation(obs(c, SockState::Established, Source::Tracker));
                    }
                }
                Op::Close | Op::MissedClose if live.remove(&c) => {
                    dead.insert(c);
                    if matches!(op, Op::Close) {
                        t.apply_observation(obs(c, SockState::Close, Source::Tracker));
                    }
                }
                Op::Reconcile => {
                    let started = Instant::now();
                    t.reconcile(&dump_of(&live), started);
                }
                _ => {}
            }
        }
        let started = Instant::now();
        t.reconcile(&dump_of(&live), started);
        let got: BTreeSet<u64> = t.iter().map(|f| f.cookie).collect();
        prop_assert_eq!(got, live);
    }
}

/// What a verify walk of exactly these connections would return.
fn kernel_digest(
    seed: u64,
    conns: &[(u64, SockState)],
) -> crate::discovery::walk_digest::WalkDigest {
    let mut d = crate::discovery::walk_digest::WalkDigest::new(seed);
    for &(cookie, state) in conns {
        let o = obs(cookie, state, Source::Tracker);
        d.add(cookie, &o.key, state, o.inode);
    }
    d
}

#[test]
fn verify_walk_passes_on_an_equal_table_and_finds_what_the_tracker_missed() {
    use SockState::*;
    let mut t = table();
    for c in 1..=50 {
        t.apply_observation(obs(c, Established, Source::Tracker));
    }
    let conns: Vec<_> = (1..=50).map(|c| (c, Established)).collect();
    assert!(t.verify_begin(9).is_empty());
    let o = t.verify_end(Some(&kernel_digest(9, &conns)));
    assert_eq!(
        o,
        VerifyOutcome::Verified {
            connections: 50,
            excused: 0
        }
    );

    // A socket the tracker never reported.
    let mut more = conns.clone();
    more.push((51, Established));
    t.verify_begin(9);
    assert_eq!(
        t.verify_end(Some(&kernel_digest(9, &more))),
        VerifyOutcome::Mismatch {
            parts: 1,
            kernel: 51,
            table: 50
        }
    );
    // A state change it missed.
    let mut changed = conns.clone();
    changed[0].1 = CloseWait;
    t.verify_begin(9);
    assert!(matches!(
        t.verify_end(Some(&kernel_digest(9, &changed))),
        VerifyOutcome::Mismatch { parts: 1, .. }
    ));
    // The same change reported while the kernel walks: the kernel may have seen
    // either state, so that partition is excused.
    t.verify_begin(9);
    t.apply_observation(obs(1, CloseWait, Source::Tracker));
    assert_eq!(
        t.verify_end(Some(&kernel_digest(9, &changed))),
        VerifyOutcome::Verified {
            connections: 50,
            excused: 1
        }
    );

    // No digest, none begun, another seed: nothing verified.
    t.verify_begin(9);
    assert_eq!(t.verify_end(None), VerifyOutcome::Failed);
    let k = kernel_digest(9, &changed);
    assert_eq!(t.verify_end(Some(&k)), VerifyOutcome::Failed);
    t.verify_begin(10);
    assert_eq!(t.verify_end(Some(&k)), VerifyOutcome::Failed);
    let c = t.counters().verify;
    assert_eq!(
        (c.verified, c.mismatched, c.failed, c.excused_parts),
        (2, 2, 3, 1)
    );
    assert_eq!(
        t.len(),
        50,
        "a verify walk never adds or ends a flow itself"
    );
}

#[test]
fn verify_walk_during_heavy_churn_proves_nothing() {
    use crate::discovery::walk_digest::{part_of, PARTS};
    use SockState::*;
    let mut t = table();
    let n = 3 * PARTS as u64;
    for c in 1..=n {
        t.apply_observation(obs(c, Established, Source::Tracker));
    }
    let conns: Vec<_> = (1..=n).map(|c| (c, CloseWait)).collect();
    // Every connection changed while the kernel walked: a difference in
    // nearly every partition, every one excused.
    t.verify_begin(9);
    for c in 1..=n {
        t.apply_observation(obs(c, CloseWait, Source::Tracker));
    }
    let parts: std::collections::HashSet<usize> = (1..=n).map(|c| part_of(9, c)).collect();
    assert_eq!(
        t.verify_end(Some(&kernel_digest(9, &conns))),
        VerifyOutcome::Churn {
            excused: parts.len()
        }
    );
    assert!(parts.len() * 4 > PARTS);
    assert_eq!(t.counters().verify.inconclusive, 1);
}

#[test]
fn verify_walk_is_inconclusive_while_a_flow_lacks_what_a_dump_fills_in() {
    use SockState::*;
    let mut t = table();
    t.apply_observation(obs(1, Established, Source::Tracker));
    assert_eq!(t.incomplete_flows(), 0);
    // An accepted socket reported from softirq: no owner's cgroup.
    let mut softirq = obs(2, Established, Source::Tracker);
    softirq.cgroup_id = None;
    // In another namespace it is never dumped: nothing to wait for.
    let mut foreign = softirq.clone();
    (foreign.cookie, foreign.netns) = (99, NS + 1);
    t.apply_observation(foreign);
    assert_eq!(t.incomplete_flows(), 0);
    t.apply_observation(softirq.clone());
    assert_eq!(t.incomplete_flows(), 1);
    // A later event that tells the cgroup (the passive-established one) takes
    // a flow off; one that does not, leaves it; so does its end.
    let mut other = softirq.clone();
    other.cookie = 5;
    t.apply_observation(other.clone());
    other.pid = Some(77);
    t.apply_observation(other.clone());
    assert_eq!(t.incomplete_flows(), 2);
    other.cgroup_id = Some(7);
    t.apply_observation(other.clone());
    assert_eq!(t.incomplete_flows(), 1);
    other.cgroup_id = None;
    t.apply_observation(other.clone());
    assert_eq!(t.incomplete_flows(), 1, "known values are kept");
    let mut third = softirq.clone();
    third.cookie = 6;
    t.apply_observation(third.clone());
    third.state = Close;
    t.apply_observation(third);
    other.state = Close;
    t.apply_observation(other);
    assert_eq!(t.incomplete_flows(), 1);
    let k = kernel_digest(3, &[(1, Established), (2, Established)]);
    t.verify_begin(3);
    assert_eq!(
        t.verify_end(Some(&k)),
        VerifyOutcome::Inconclusive { flows: 1 }
    );
    assert_eq!(t.incomplete_flows(), 1, "the walk found it still lacking");
    // A complete dump fills it in.
    let dump = [
        obs(1, Established, Source::SockDiag),
        obs(2, Established, Source::SockDiag),
    ];
    t.reconcile(&dump, Instant::now());
    assert_eq!(t.incomplete_flows(), 0);
    t.verify_begin(3);
    assert!(t.verify_end(Some(&k)).verified());

    // A request socket a dump met: no full socket for the kernel to count.
    let mut req = obs(3, SynRecv, Source::SockDiag);
    req.direction = Direction::Inbound;
    t.dump_part(&[req]);
    t.dump_abandoned();
    t.verify_begin(3);
    assert_eq!(
        t.verify_end(Some(&k)),
        VerifyOutcome::Inconclusive { flows: 1 }
    );
}

#[test]
fn verify_walk_ends_time_wait_past_its_grace_as_a_dump_does() {
    let mut t = FlowTable::new(FlowTableConfig {
        netns: NS,
        time_wait_grace: Duration::ZERO,
        ..FlowTableConfig::default()
    });
    t.apply_observation(obs(1, SockState::Established, Source::Tracker));
    t.apply_observation(obs(1, SockState::TimeWait, Source::Tracker));
    let ev = t.verify_begin(5);
    assert_eq!(kinds(&ev), ["tw-expired"]);
    assert!(t.is_empty());
    let o = t.verify_end(Some(&kernel_digest(5, &[])));
    assert!(o.verified(), "{o:?}");
}
