use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::*;
use crate::flows::{Owner, SeenBy};
use crate::model::socket::{Comm, Direction, FlowKey, SockState, TcpStats};
use crate::policy::RuleRef;

fn flow(cookie: u64, proto: Protocol, lifecycle: Lifecycle) -> Flow {
    let now = Instant::now();
    Flow {
        key: FlowKey::new(
            proto,
            "10.201.0.1:40000".parse().unwrap(),
            "10.201.0.2:1094".parse().unwrap(),
        ),
        cookie,
        netns: 1,
        state: SockState::Established,
        lifecycle,
        direction: Direction::Outbound,
        inode: 0,
        owner: Owner {
            comm: Some(Comm::new("xrootd")),
            ..Owner::default()
        },
        first_seen: now,
        last_seen: now,
        tcp: None,
        seen_by: SeenBy::default(),
    }
}

fn decision(f: &Flow, experiment: u16, activity: u8) -> Decision {
    Decision {
        tag: Tag::new(experiment, activity).unwrap(),
        rule: Arc::new(RuleRef {
            file: "atlas.toml".into(),
            name: "x".into(),
            line: 2,
        }),
        entropy: 0,
        key: f.key,
        in_map: false,
        tagged_at: Instant::now(),
        first_packet_exact: false,
        announced: false,
    }
}

fn announcer(capacity: usize, ongoing: Option<Duration>) -> (Fireflies, mpsc::Receiver<Firefly>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        Fireflies::new(tx, Arc::new(FireflyCounters::default()), ongoing),
        rx,
    )
}

fn drain(rx: &mut mpsc::Receiver<Firefly>) -> Vec<(State, Tag)> {
    let mut out = Vec::new();
    while let Ok(f) = rx.try_recv() {
        out.push((f.state, f.tag));
    }
    out
}

#[test]
fn a_tcp_flow_is_announced_once_established_and_ended_once() {
    let (mut ff, mut rx) = announcer(16, None);
    let syn_sent = flow(7, Protocol::Tcp, Lifecycle::New);
    let d = decision(&syn_sent, 2, 4);
    ff.on_flow(&syn_sent, Some(&d));
    assert!(
        drain(&mut rx).is_empty(),
        "no firefly before the handshake completes"
    );

    let up = flow(7, Protocol::Tcp, Lifecycle::Established);
    ff.on_flow(&up, Some(&d));
    ff.on_flow(&up, Some(&d));
    let closing = flow(7, Protocol::Tcp, Lifecycle::Closing);
    ff.on_flow(&closing, Some(&d));
    assert_eq!(drain(&mut rx), [(State::Start, d.tag)]);
    assert_eq!(ff.status().announced, 1);

    let mut gone = flow(7, Protocol::Tcp, Lifecycle::Gone);
    gone.tcp = Some(TcpStats {
        bytes_acked: 5000,
        bytes_received: 12,
        ..Default::default()
    });
    ff.on_end(&gone);
    ff.on_end(&gone);
    let end = rx.try_recv().unwrap();
    assert_eq!(end.state, State::End);
    assert_eq!(end.end, Some(end.now));
    assert_eq!(
        end.usage,
        Some(Usage {
            received: 12,
            sent: 5000
        })
    );
    assert_eq!(end.application.as_deref(), Some("xrootd"));
    assert!(rx.try_recv().is_err(), "one end only");
    assert_eq!(ff.status().announced, 0);
}

#[test]
fn a_connect_that_never_completes_gets_no_firefly_at_all() {
    let (mut ff, mut rx) = announcer(16, None);
    let f = flow(1, Protocol::Tcp, Lifecycle::New);
    ff.on_flow(&f, Some(&decision(&f, 2, 4)));
    ff.on_end(&flow(1, Protocol::Tcp, Lifecycle::Gone));
    assert!(drain(&mut rx).is_empty());
}

#[test]
fn a_udp_flow_is_announced_at_once_and_untagged_flows_never() {
    let (mut ff, mut rx) = announcer(16, None);
    let f = flow(3, Protocol::Udp, Lifecycle::New);
    ff.on_flow(&f, Some(&decision(&f, 5, 1)));
    ff.on_flow(&flow(4, Protocol::Tcp, Lifecycle::Established), None);
    ff.on_end(&flow(4, Protocol::Tcp, Lifecycle::Gone));
    assert_eq!(drain(&mut rx), [(State::Start, Tag::new(5, 1).unwrap())]);
}

#[test]
fn a_changed_tag_ends_the_old_announcement_and_starts_the_new_one_a_lost_tag_ends_it() {
    let (mut ff, mut rx) = announcer(16, None);
    let f = flow(9, Protocol::Tcp, Lifecycle::Established);
    let (old, new) = (decision(&f, 2, 4), decision(&f, 3, 12));
    ff.on_flow(&f, Some(&old));
    ff.on_flow(&f, Some(&new));
    ff.on_flow(&f, None);
    assert_eq!(
        drain(&mut rx),
        [
            (State::Start, old.tag),
            (State::End, old.tag),
            (State::Start, new.tag),
            (State::End, new.tag)
        ]
    );
}

#[test]
fn an_end_that_finds_the_queue_full_is_dropped_and_counted_never_waited_for() {
    let (mut ff, mut rx) = announcer(4, None);
    let flows: Vec<Flow> = (0..4)
        .map(|c| flow(c, Protocol::Udp, Lifecycle::New))
        .collect();
    for f in &flows[..2] {
        ff.on_flow(f, Some(&decision(f, 2, 4)));
    }
    drain(&mut rx); // the sender took both starts
    for f in &flows[2..] {
        ff.on_flow(f, Some(&decision(f, 2, 4)));
    }
    for f in &flows[..3] {
        ff.on_end(f); // the third finds the queue full
    }
    assert_eq!(ff.status().queue_full, 1);
    assert_eq!(drain(&mut rx).len(), 4, "two starts, two ends");
}

#[test]
fn a_round_of_ongoing_waits_for_room_like_starts() {
    let (mut ff, mut rx) = announcer(2, Some(Duration::ZERO));
    let a = flow(0, Protocol::Udp, Lifecycle::New);
    ff.on_flow(&a, Some(&decision(&a, 2, 4)));
    let live = |c: u64| (c == 0).then_some(&a);
    ff.ongoing(live); // no room beyond half the queue: it waits
    assert!(ff.has_waiting());
    assert_eq!(drain(&mut rx), [(State::Start, Tag::new(2, 4).unwrap())]);
    ff.flush(live);
    assert_eq!(drain(&mut rx), [(State::Ongoing, Tag::new(2, 4).unwrap())]);
    assert!(!ff.has_waiting());
    assert_eq!(ff.status().queue_full, 0);
}

#[test]
fn ongoing_fireflies_go_out_per_interval_for_live_announced_flows_only() {
    let (mut ff, mut rx) = announcer(16, Some(Duration::from_millis(50)));
    let (a, b) = (
        flow(1, Protocol::Tcp, Lifecycle::Established),
        flow(2, Protocol::Tcp, Lifecycle::Established),
    );
    ff.on_flow(&a, Some(&decision(&a, 2, 4)));
    ff.on_flow(&b, Some(&decision(&b, 2, 4)));
    drain(&mut rx);
    let live = |cookie: u64| (cookie == 1).then_some(&a);
    ff.ongoing(live);
    assert!(drain(&mut rx).is_empty(), "the interval has not passed yet");
    std::thread::sleep(Duration::from_millis(60));
    ff.ongoing(live);
    ff.ongoing(live);
    let sent = drain(&mut rx);
    assert_eq!(sent, [(State::Ongoing, Tag::new(2, 4).unwrap())]);

    let (mut off, mut rx) = announcer(16, None);
    off.on_flow(&a, Some(&decision(&a, 2, 4)));
    drain(&mut rx);
    std::thread::sleep(Duration::from_millis(10));
    off.ongoing(live);
    assert!(
        drain(&mut rx).is_empty(),
        "ongoing is off without an interval"
    );
}

#[test]
fn a_flow_its_application_announced_is_left_to_the_application() {
    let (mut ff, mut rx) = announcer(16, None);
    let f = flow(5, Protocol::Tcp, Lifecycle::Established);
    let by_policy = decision(&f, 2, 4);
    ff.on_flow(&f, Some(&by_policy));
    // The application announces it itself: ours ends, and no new start follows.
    let announced = Decision {
        announced: true,
        ..decision(&f, 3, 12)
    };
    ff.on_flow(&f, Some(&announced));
    ff.on_end(&flow(5, Protocol::Tcp, Lifecycle::Gone));
    assert_eq!(
        drain(&mut rx),
        [(State::Start, by_policy.tag), (State::End, by_policy.tag)]
    );
}

#[test]
fn a_burst_of_starts_waits_for_room_instead_of_being_lost_and_keeps_room_for_ends() {
    let (mut ff, mut rx) = announcer(8, None);
    let flows: Vec<Flow> = (0..10)
        .map(|c| flow(c, Protocol::Tcp, Lifecycle::Established))
        .collect();
    for f in &flows {
        ff.on_flow(f, Some(&decision(f, 2, 4)));
    }
    // Starts take half the queue; the other six wait.
    assert_eq!(ff.status().starts_waiting, 6);
    assert!(ff.has_waiting());
    // An end still finds room; a flow whose start never went out ends silently.
    ff.on_end(&flows[0]);
    ff.on_end(&flows[9]);
    assert_eq!(ff.status().queue_full, 0);
    let first: Vec<State> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| f.state)
        .collect();
    assert_eq!(
        first,
        [
            State::Start,
            State::Start,
            State::Start,
            State::Start,
            State::End
        ],
        "four starts, then the end"
    );
    let live = |c: u64| flows.get(c as usize);
    ff.flush(live);
    ff.flush(live);
    let mut starts = 4;
    while ff.has_waiting() {
        starts += drain(&mut rx).len();
        ff.flush(live);
    }
    starts += drain(&mut rx).len();
    assert_eq!(starts, 9, "every start but the one that ended waiting");
    assert_eq!(ff.status().starts_waiting, 0);
    assert_eq!(ff.status().queue_full, 0);
}
