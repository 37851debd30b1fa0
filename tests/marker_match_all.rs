//! A `match_all = true` rule (perfSONAR hosts): every IPv6 packet the host sends
//! carries its tag (ICMPv6 echo, TCP from the SYN on, connected and unconnected UDP),
//! other rules' flows keep their own tag, and without that rule nothing is labelled.
//! Two namespaces joined by veth, the daemon on A, tcpdump on B. Privileged.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use common::{Capture, Daemon, Packet, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::model::tag::{decode, Tag};

/// experiment "default" (1), activity "perfSONAR" (2).
const PERFSONAR: Tag = Tag {
    experiment: 1,
    activity: 2,
};
/// atlas (2), "Data Consolidation" (4): the ordinary rule beside it.
const ATLAS: Tag = Tag {
    experiment: 2,
    activity: 4,
};

const MATCH_ALL: &str = "experiment = \"default\"\n\
[[rule]]\nname = \"everything\"\nactivity = \"perfSONAR\"\nmatch_all = true\n";
const ATLAS_RULE: &str = "experiment = \"atlas\"\n\
[[rule]]\nname = \"out\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n";

fn daemon(pair: &Pair, dir: &Path, files: &[(&str, &str)]) -> Daemon {
    let policies = dir.join(format!("policies-{}", files.len()));
    std::fs::create_dir_all(&policies).unwrap();
    for (name, text) in files {
        common::write_policy(&policies, name, text);
    }
    Daemon::start_with(
        &pair.a,
        dir,
        &format!("[policy]\ndir = \"{}\"\n", policies.display()),
    )
}

/// Three ICMPv6 echo requests from A to B through a raw socket (the kernel fills
/// in the ICMPv6 checksum of raw ICMPv6 sockets).
fn ping(pair: &Pair) {
    pair.a
        .run(|| {
            let s = socket2::Socket::new(
                socket2::Domain::IPV6,
                socket2::Type::RAW,
                Some(socket2::Protocol::ICMPV6),
            )
            .unwrap();
            let to: SocketAddr = SocketAddr::new(ADDR_B.into(), 0);
            for seq in 0u8..3 {
                let echo = [128, 0, 0, 0, 0x12, 0x34, 0, seq, b'f', b'l', b'o', b'w'];
                s.send_to(&echo, &to.into()).unwrap();
            }
        })
        .join()
        .unwrap();
}

/// Datagrams from A:`sport` to B:`dport`, from an unconnected socket (sendto) or a
/// connected one.
fn udp(pair: &Pair, sport: u16, dport: u16, connected: bool) {
    pair.a
        .run(move || {
            let s = UdpSocket::bind(SocketAddr::new(ADDR_A.into(), sport)).unwrap();
            let to = SocketAddr::new(ADDR_B.into(), dport);
            if connected {
                s.connect(to).unwrap();
            }
            for _ in 0..3 {
                if connected {
                    s.send(b"scitags").unwrap();
                } else {
                    s.send_to(b"scitags", to).unwrap();
                }
            }
        })
        .join()
        .unwrap();
}

/// Pings, a TCP transfer to B:5201 (the atlas rule), one to B:5301, UDP to B:5401
/// (unconnected) and B:5402 (connected); the packets A sent, as B captured them.
fn traffic(pair: &Pair, dir: &Path) -> Vec<Packet> {
    // Receivers, so that no port-unreachable error fails the connected sends.
    let _sinks: Vec<UdpSocket> = [5401, 5402]
        .map(|port| {
            pair.b
                .run(move || UdpSocket::bind(SocketAddr::new(ADDR_B.into(), port)).unwrap())
                .join()
                .unwrap()
        })
        .into();
    let cap = Capture::start(&pair.b, IF_B, "ip6 src fd00:f1::1", dir);
    ping(pair);
    common::tcp_transfer(&pair.a, &pair.b, 43000, 5201, 50_000);
    common::tcp_transfer(&pair.a, &pair.b, 43001, 5301, 50_000);
    udp(pair, 43002, 5401, false);
    udp(pair, 43003, 5402, true);
    cap.finish()
}

fn echo_requests(pkts: &[Packet]) -> Vec<&Packet> {
    pkts.iter()
        .filter(|p| p.next_header == 58 && p.l3.get(40) == Some(&128))
        .collect()
}

fn from_port(pkts: &[Packet], next: u8, port: u16) -> Vec<&Packet> {
    pkts.iter()
        .filter(|p| p.next_header == next && p.src.port() == port)
        .collect()
}

/// The kernel's own flow labels (net.ipv6.auto_flowlabels) off on A: a packet the
/// marker leaves alone then carries label 0.
fn quiet_labels(pair: &Pair) {
    pair.a.sh("sysctl -qw net.ipv6.auto_flowlabels=0");
}

#[test]
fn match_all_labels_every_ipv6_packet_and_other_rules_keep_their_tag() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    quiet_labels(&pair);
    let d = daemon(
        &pair,
        dir.path(),
        &[("atlas.toml", ATLAS_RULE), ("perfsonar.toml", MATCH_ALL)],
    );
    let pkts = traffic(&pair, dir.path());
    let status: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    let log = d.stop();

    assert_eq!(
        status["status"]["policy_match_all"], "perfsonar.toml:everything (1/2)",
        "{status}"
    );
    let pings = echo_requests(&pkts);
    assert_eq!(pings.len(), 3, "echo requests captured\n{log}");
    for p in pings {
        // Not a flow: no entropy bits.
        assert_eq!(p.flow_label, PERFSONAR.label(0), "echo request {p:?}");
    }
    for (next, port, want) in [
        (6, 43000, ATLAS),
        (6, 43001, PERFSONAR),
        (17, 43002, PERFSONAR),
        (17, 43003, PERFSONAR),
    ] {
        let flow = from_port(&pkts, next, port);
        assert!(
            flow.len() >= 3,
            "packets from port {port}: {}\n{log}",
            flow.len()
        );
        for p in flow {
            assert_eq!(
                decode(p.flow_label).tag,
                Some(want),
                "port {port}, packet {p:?}\n{log}"
            );
        }
    }
    // The SYNs too: the kernel decided both connections before they left.
    for port in [43000, 43001] {
        let syn = from_port(&pkts, 6, port)
            .into_iter()
            .find(|p| p.l3.get(40 + 13).is_some_and(|f| f & 0x12 == 0x02))
            .expect("SYN captured");
        assert_ne!(syn.flow_label, 0, "SYN from {port} unlabelled");
    }
}

#[test]
fn without_a_match_all_rule_nothing_else_is_labelled() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    quiet_labels(&pair);
    let d = daemon(&pair, dir.path(), &[("atlas.toml", ATLAS_RULE)]);
    let pkts = traffic(&pair, dir.path());
    let status: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    let log = d.stop();

    assert!(status["status"]["policy_match_all"].is_null(), "{status}");
    assert!(!from_port(&pkts, 6, 43000).is_empty());
    for p in &pkts {
        let want = if p.next_header == 6 && p.src.port() == 43000 {
            decode(p.flow_label).tag
        } else {
            None
        };
        if want.is_some() {
            assert_eq!(want, Some(ATLAS), "{p:?}");
        } else {
            assert_eq!(p.flow_label, 0, "labelled without a rule: {p:?}\n{log}");
        }
    }
}
