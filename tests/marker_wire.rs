//! The marker on real traffic: two namespaces joined by veth, the daemon attached on
//! the sender, tcpdump on the receiver. Privileged.

mod common;

use std::net::SocketAddr;

use common::{Capture, Daemon, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::model::tag::{decode, Tag};

const TAG: Tag = Tag {
    experiment: 2,
    activity: 3,
};

fn mark(d: &Daemon, sport: u16, dport: u16, entropy: u8) {
    d.cli_ok(&[
        "mark",
        "add",
        "tcp",
        &format!("[{ADDR_A}]:{sport}"),
        &format!("[{ADDR_B}]:{dport}"),
        "--experiment",
        &TAG.experiment.to_string(),
        "--activity",
        &TAG.activity.to_string(),
        "--entropy",
        &entropy.to_string(),
    ]);
}

fn a(port: u16) -> SocketAddr {
    SocketAddr::new(ADDR_A.into(), port)
}

/// Marks one flow, sends it and an unmarked neighbour, then unmarks a third flow
/// before sending it: only the marked flow's packets carry the label, every one of
/// them from the SYN on.
fn label_on_the_wire(marker_toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = Daemon::start(&pair.a, dir.path(), marker_toml);
    mark(&d, 41000, 5201, 0b10101);
    mark(&d, 41002, 5203, 0);
    d.cli_ok(&[
        "mark",
        "del",
        "tcp",
        &format!("[{ADDR_A}]:41002"),
        &format!("[{ADDR_B}]:5203"),
    ]);

    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    common::tcp_transfer(&pair.a, &pair.b, 41000, 5201, 200_000);
    common::tcp_transfer(&pair.a, &pair.b, 41001, 5202, 10_000);
    common::tcp_transfer(&pair.a, &pair.b, 41002, 5203, 10_000);
    let pkts = cap.finish();
    let status = d.cli_ok(&["status"]);
    let log = d.stop();

    let want = TAG.label(0b10101);
    let marked: Vec<_> = pkts.iter().filter(|p| p.src == a(41000)).collect();
    assert!(
        marked.len() >= 5,
        "too few packets captured: {}\n{log}",
        marked.len()
    );
    for p in &marked {
        assert_eq!(p.flow_label, want, "packet {p:?}");
        assert_eq!(decode(p.flow_label).tag, Some(TAG));
    }
    for port in [41001, 41002] {
        let other: Vec<_> = pkts.iter().filter(|p| p.src == a(port)).collect();
        assert!(!other.is_empty(), "no packets of flow from port {port}");
        assert!(
            other.iter().all(|p| p.flow_label != want),
            "unmarked flow {port} carries our label"
        );
    }
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let marked_count = v["counters"]["outcomes"]["marked"].as_u64().unwrap();
    assert!(
        marked_count >= marked.len() as u64,
        "counter {marked_count} < {} packets seen (GSO may merge, never split)",
        marked.len()
    );
}

#[test]
fn tcx_marks_exactly_the_marked_flow_on_the_wire() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if common::tcx_refused_where_missing(&Pair::new(), dir.path()) {
        return;
    }
    label_on_the_wire("attach = \"tcx\"");
}

#[test]
fn clsact_fallback_marks_exactly_the_marked_flow_on_the_wire() {
    if !common::privileged() {
        return;
    }
    label_on_the_wire("attach = \"clsact\"");
}

#[test]
fn hop_by_hop_header_travels_and_tcp_still_works() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    // A header grows each packet by 8 bytes: the route MTU leaves room for it, as
    // the README tells operators (full-size packets are otherwise sent unmarked).
    pair.a
        .sh("ip -6 route replace fd00:f1::/64 dev vfa metric 256 mtu 1492");
    let d = Daemon::start(&pair.a, dir.path(), "strategy = \"label+hop-by-hop\"");
    mark(&d, 42000, 5301, 0);
    let cap = Capture::start(&pair.b, IF_B, "ip6", dir.path());
    // 1 MB: large enough for GSO super-packets, whose gso_size the kernel must lower.
    common::tcp_transfer(&pair.a, &pair.b, 42000, 5301, 1_000_000);
    let pkts = cap.finish();
    let status: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    d.stop();
    assert_eq!(status["counters"]["outcomes"]["skipped_mtu"], 0);
    let ours: Vec<_> = pkts.iter().filter(|p| p.src == a(42000)).collect();
    assert!(ours.len() >= 5);
    for p in ours {
        assert_eq!(p.next_header, 0, "no hop-by-hop header: {p:?}");
        assert_eq!(&p.l3[40..48], &[6, 0, 0x1e, 3, 0, 2, 3, 0]);
        assert_eq!(p.flow_label, 0x1000c);
    }
}

/// The socket cache (marker.socket_cache, on by default) must never outlive a change
/// of the flow map: on a live connection, a mark added after packets went out
/// unmarked, a mark replaced by another, and a mark removed each show on the very
/// next data packet.
#[test]
fn a_live_connection_follows_every_mark_change_at_once() {
    if !common::privileged() {
        return;
    }
    const OTHER: Tag = Tag {
        experiment: 3,
        activity: 5,
    };
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = Daemon::start(&pair.a, dir.path(), "");
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let server = common::serve_once(&pair.b, 5210);
    let (phase_tx, phase_rx) = std::sync::mpsc::channel::<u8>();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<()>();
    let client = pair.a.run(move || {
        use std::io::Write;
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.bind(&a(41010).into()).unwrap();
        s.connect(&SocketAddr::new(ADDR_B.into(), 5210).into())
            .unwrap();
        s.set_tcp_nodelay(true).unwrap();
        let mut s: std::net::TcpStream = s.into();
        for phase in phase_rx {
            s.write_all(&[phase; 3000]).unwrap();
            // Let the segments leave before the next change.
            std::thread::sleep(std::time::Duration::from_millis(200));
            sent_tx.send(()).unwrap();
        }
    });
    let flow = [
        "tcp".to_string(),
        format!("[{ADDR_A}]:41010"),
        format!("[{ADDR_B}]:5210"),
    ];
    let set = |tag: Tag| {
        let (e, act) = (tag.experiment.to_string(), tag.activity.to_string());
        let mut args = vec!["mark", "add"];
        args.extend(flow.iter().map(String::as_str));
        args.extend(["--experiment", &e, "--activity", &act, "--entropy", "9"]);
        d.cli_ok(&args);
    };
    let step = |phase: u8| {
        phase_tx.send(phase).unwrap();
        sent_rx.recv().unwrap();
    };
    step(1);
    set(TAG);
    step(2);
    set(OTHER);
    step(3);
    let mut del = vec!["mark", "del"];
    del.extend(flow.iter().map(String::as_str));
    d.cli_ok(&del);
    step(4);
    drop(phase_tx);
    client.join().unwrap();
    assert_eq!(server.join().unwrap(), 12_000);
    let pkts = cap.finish();
    let log = d.stop();

    // Data segments by the phase byte they carry.
    let mut labels: [Vec<u32>; 5] = Default::default();
    for p in pkts.iter().filter(|p| p.src == a(41010)) {
        if let Some(phase) = p.tcp_payload_first_byte() {
            labels[usize::from(phase)].push(p.flow_label);
        }
    }
    for (phase, want) in [(2, Some(TAG)), (3, Some(OTHER))] {
        assert!(!labels[phase].is_empty(), "no data of phase {phase}\n{log}");
        for l in &labels[phase] {
            assert_eq!(*l, want.unwrap().label(9), "phase {phase}: {labels:x?}");
        }
    }
    for phase in [1, 4] {
        assert!(!labels[phase].is_empty(), "no data of phase {phase}\n{log}");
        for l in &labels[phase] {
            assert!(
                *l != TAG.label(9) && *l != OTHER.label(9),
                "phase {phase} carries a mark: {labels:x?}"
            );
        }
    }
}
