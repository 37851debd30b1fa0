//! Fireflies end to end: the daemon tags flows by policy and announces each to a
//! collector and to the flow's remote host, both listening on the peer host; the
//! datagrams are received there and checked field by field and against the
//! published schema. Privileged.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Daemon, Netns, Pair, ADDR_A, ADDR_B};
use serde_json::Value;

const V4_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const V4_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const COLLECTOR_PORT: u16 = 10600;

/// A UDP socket in `ns` on [::]:`port` that takes IPv4 too.
fn udp_listener(ns: &Netns, port: u16) -> UdpSocket {
    ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        s.set_only_v6(false).unwrap();
        s.bind(&SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port).into())
            .unwrap();
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s
    })
    .join()
    .unwrap()
}

/// Everything that arrives on `socks` until each has `want` datagrams or the
/// deadline passes; then a short wait for anything beyond `want`.
fn receive(socks: &[&UdpSocket], want: usize, within: Duration) -> Vec<Vec<Vec<u8>>> {
    let mut got = vec![Vec::new(); socks.len()];
    let deadline = Instant::now() + within;
    let mut extra_until = None;
    loop {
        for (s, out) in socks.iter().zip(got.iter_mut()) {
            let mut buf = [0u8; 2048];
            if let Ok(n) = s.recv(&mut buf) {
                out.push(buf[..n].to_vec());
            }
        }
        let now = Instant::now();
        if got.iter().all(|g| g.len() >= want) {
            let until = *extra_until.get_or_insert(now + Duration::from_millis(500));
            if now >= until {
                break;
            }
        } else if now >= deadline {
            break;
        }
    }
    got
}

/// Splits a datagram into its RFC 5424 header and JSON object.
fn split(d: &[u8]) -> (String, Value) {
    let text = std::str::from_utf8(d).expect("a firefly is UTF-8");
    let brace = text.find('{').expect("a JSON object");
    (
        text[..brace].to_string(),
        serde_json::from_str(&text[brace..]).expect("valid JSON"),
    )
}

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/firefly/firefly-schema-v1.0.0.json"
    ))
    .unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&serde_json::from_str(&text).unwrap())
        .unwrap()
}

/// A transfer from `client` to `server` by a process named "xrootd" (the
/// firefly's "application").
fn transfer(client: &Netns, server: &Netns, from: SocketAddr, to: SocketAddr, payload: usize) {
    common::transfer(client, server, from, to, payload, Some(c"xrootd"));
}

#[test]
fn tagged_flows_are_announced_at_start_and_end_to_the_collector_and_the_remote_host() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(
        dir.path(),
        &[
            (
                "atlas.toml",
                "experiment = \"atlas\"\n[[rule]]\nname = \"to-5301\"\nactivity = 4\nremote_ports = [5301]\n",
            ),
            (
                "cms.toml",
                "experiment = \"cms\"\n[[rule]]\nname = \"to-5302\"\nactivity = 12\nremote_ports = [5302]\n",
            ),
        ],
    );
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let remote = udp_listener(&pair.b, 10514);
    // The second collector has no route: every send to it fails, and must cost
    // nothing but a counted error.
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[fireflies]\nenabled = true\n\
             collectors = [\"[{ADDR_B}]:{COLLECTOR_PORT}\", \"[fd00:dead::1]:10514\"]\n",
            policies.display()
        ),
    );

    // Untagged first: had it been announced, its firefly would be among those read.
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(ADDR_A.into(), 41003),
        SocketAddr::new(ADDR_B.into(), 5399),
        1000,
    );
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(ADDR_A.into(), 41001),
        SocketAddr::new(ADDR_B.into(), 5301),
        200_000,
    );
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(V4_A.into(), 41002),
        SocketAddr::new(V4_B.into(), 5302),
        50_000,
    );

    let got = receive(&[&collector, &remote], 4, Duration::from_secs(20));
    let log = d.log();
    let (at_collector, at_remote) = (&got[0], &got[1]);
    assert_eq!(at_collector.len(), 4, "{at_collector:?}\n{log}");
    // The same datagrams reach the remote host (sent once per destination).
    let mut a = at_collector.clone();
    let mut b = at_remote.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    let schema = schema();
    // By (src-port, state): the flows' fireflies, each checked against the schema.
    let mut by_flow: BTreeMap<(u64, String), Value> = BTreeMap::new();
    for d in at_collector {
        let (header, v) = split(d);
        assert!(
            header.starts_with("<134>1 ") && header.ends_with(" flowd-rs - firefly-json - "),
            "{header:?}"
        );
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?} in {v}");
        let port = v["flow-id"]["src-port"].as_u64().unwrap();
        let state = v["flow-lifecycle"]["state"].as_str().unwrap().to_string();
        assert!(by_flow.insert((port, state), v).is_none(), "one per state");
    }

    let v6_start = &by_flow[&(41001, "start".into())];
    assert_eq!(
        v6_start["flow-id"],
        serde_json::json!({"afi": "ipv6", "src-ip": "fd00:f1::1", "dst-ip": "fd00:f1::2",
                           "protocol": "tcp", "src-port": 41001, "dst-port": 5301})
    );
    assert_eq!(
        v6_start["context"],
        serde_json::json!({"experiment-id": 2, "activity-id": 4, "application": "xrootd"})
    );
    let v4_end = &by_flow[&(41002, "end".into())];
    assert_eq!(v4_end["flow-id"]["afi"], "ipv4");
    assert_eq!(v4_end["flow-id"]["src-ip"], "10.201.0.1");
    assert_eq!(v4_end["flow-id"]["dst-ip"], "10.201.0.2");
    assert_eq!(v4_end["context"]["experiment-id"], 3);
    assert_eq!(v4_end["context"]["activity-id"], 12);

    for (port, payload) in [(41001u64, 200_000u64), (41002, 50_000)] {
        let start = &by_flow[&(port, "start".into())];
        let end = &by_flow[&(port, "end".into())];
        let life = &end["flow-lifecycle"];
        assert_eq!(life["start-time"], start["flow-lifecycle"]["start-time"]);
        assert!(life["end-time"].as_str() >= life["start-time"].as_str());
        // The kernel's counters when the socket closed (tcpi_bytes_acked and
        // _received count sequence space: our SYN and FIN are one byte each, the
        // peer's FIN one byte received). A stale dump would say 0 or less.
        assert_eq!(
            end["usage"],
            serde_json::json!({"sent": payload + 2, "received": 1}),
            "{end}"
        );
    }

    let status: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    let ff = &status["status"]["fireflies"];
    assert_eq!(ff["announced"], 0, "{ff}");
    // Two destinations reached per firefly, the unroutable one refused each time.
    assert_eq!(
        (ff["sent_start"].as_u64(), ff["sent_end"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(ff["send_errors"], 4, "{ff}");
    assert_eq!(ff["queue_full"], 0);
    d.stop();
}

/// Announced flows on the wire: a flow named through the named pipe gets this
/// daemon's start and end fireflies with the announced tag (flowd-go sends one per
/// plugin event); a flow its application announced by firefly gets none from us
/// (the application sends its own).
#[test]
fn pipe_announced_flows_get_fireflies_firefly_announced_ones_stay_quiet() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(dir.path(), &[]);
    let pipe = dir.path().join("flowd.pipe");
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[fireflies]\nenabled = true\nto_remote = false\n\
             collectors = [\"[{ADDR_B}]:{COLLECTOR_PORT}\"]\n\
             [announcements]\npipe = \"{}\"\nfirefly_listen = [\"127.0.0.1:10514\"]\n",
            policies.display(),
            pipe.display()
        ),
    );
    let announcements = |field: &str| -> u64 {
        let v: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
        v["status"]["announcements"][field].as_u64().unwrap()
    };
    let wait_for = |field: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while announcements(field) != 1 {
            assert!(Instant::now() < deadline, "{field}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let a = |p: u16| SocketAddr::new(ADDR_A.into(), p);
    let piped = (a(41030), SocketAddr::new(ADDR_B.into(), 5310));
    let fireflied = (a(41031), SocketAddr::new(ADDR_B.into(), 5311));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&pipe).unwrap();
        writeln!(f, "start tcp {ADDR_A} 41030 {ADDR_B} 5310 3 12").unwrap();
    }
    wait_for("received_pipe");
    let datagram = flowd::firefly::Firefly {
        state: flowd::firefly::State::Start,
        key: flowd::model::socket::FlowKey::new(
            flowd::model::socket::Protocol::Tcp,
            fireflied.0,
            fireflied.1,
        ),
        tag: flowd::model::tag::Tag::new(5, 1).unwrap(),
        start: std::time::SystemTime::now(),
        now: std::time::SystemTime::now(),
        end: None,
        usage: None,
        application: Some("xrootd".into()),
    }
    .datagram(Some("se01"));
    // The sender keeps its socket until the daemon has read the datagram: a local
    // sender is identified by its socket's owner (sock_diag), a closed one is not.
    let sender = pair
        .a
        .run(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(&datagram, "127.0.0.1:10514").unwrap();
            s
        })
        .join()
        .unwrap();
    wait_for("received_firefly");
    drop(sender);
    transfer(&pair.a, &pair.b, piped.0, piped.1, 30_000);
    transfer(&pair.a, &pair.b, fireflied.0, fireflied.1, 30_000);

    let got = receive(&[&collector], 2, Duration::from_secs(20));
    let log = d.log();
    assert_eq!(got[0].len(), 2, "{:?}\n{log}", got[0]);
    let schema = schema();
    let mut states = Vec::new();
    for datagram in &got[0] {
        let (_, v) = split(datagram);
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?} in {v}");
        assert_eq!(v["flow-id"]["src-port"], 41030, "{v}");
        assert_eq!(v["flow-id"]["dst-port"], 5310, "{v}");
        assert_eq!(v["context"]["experiment-id"], 3);
        assert_eq!(v["context"]["activity-id"], 12);
        states.push(v["flow-lifecycle"]["state"].as_str().unwrap().to_string());
    }
    assert_eq!(states, ["start", "end"]);
    d.stop();
}

/// Collectors by host name: the daemon runs with an /etc/hosts of the test's own
/// (bind-mounted in a mount namespace of its own), resolves the collector's name to
/// the peer's address and sends there; a name no resolver knows is counted as a
/// failed lookup and costs nothing else.
#[test]
fn a_collector_named_by_host_name_is_resolved_through_the_hosts_file() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(
        dir.path(),
        &[(
            "atlas.toml",
            "experiment = \"atlas\"\n[[rule]]\nname = \"to-5320\"\nactivity = 4\nremote_ports = [5320]\n",
        )],
    );
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{ADDR_B} collector.flowd.test\n"),
    )
    .unwrap();
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let mount = format!("mount --bind {} /etc/hosts && exec \"$@\"", hosts.display());
    let d = Daemon::start_via(
        &["unshare", "-m", "--propagation", "private", "sh", "-c", &mount, "sh"],
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[fireflies]\nenabled = true\nto_remote = false\n\
             collectors = [\"collector.flowd.test:{COLLECTOR_PORT}\", \"nowhere.flowd.test:{COLLECTOR_PORT}\"]\n",
            policies.display()
        ),
    );
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(ADDR_A.into(), 41040),
        SocketAddr::new(ADDR_B.into(), 5320),
        10_000,
    );
    let got = receive(&[&collector], 2, Duration::from_secs(20));
    let log = d.log();
    let states: Vec<String> = got[0]
        .iter()
        .map(|d| {
            let (_, v) = split(d);
            assert_eq!(v["flow-id"]["src-port"], 41040, "{v}");
            v["flow-lifecycle"]["state"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(states, ["start", "end"], "{log}");
    assert!(
        log.contains("firefly collector resolved") && log.contains(&ADDR_B.to_string()),
        "{log}"
    );
    let status: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    let ff = &status["status"]["fireflies"];
    assert_eq!(ff["collector_lookups_ok"], 1, "{ff}");
    assert_eq!(ff["collector_lookups_failed"], 1, "{ff}");
    assert_eq!(ff["send_errors"], 0, "{ff}");
    d.stop();
}

/// Enriched `ongoing` fireflies: every second (the reconcile interval is a minute, so
/// the timer is its own), each carrying flowd-go's lean `netlink` object with the
/// live connection's tcp_info, schema-valid.
#[test]
fn ongoing_fireflies_carry_tcp_info_every_second_whatever_the_reconcile_interval() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(
        dir.path(),
        &[(
            "atlas.toml",
            "experiment = \"atlas\"\n[[rule]]\nname = \"to-5330\"\nactivity = 4\nremote_ports = [5330]\n",
        )],
    );
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[discovery]\nreconcile_interval_ms = 60000\n\
             [fireflies]\nenabled = true\nto_remote = false\nongoing_interval_s = 1\nenrich = \"lean\"\n\
             collectors = [\"[{ADDR_B}]:{COLLECTOR_PORT}\"]\n",
            policies.display()
        ),
    );
    let server = common::serve_once(&pair.b, 5330);
    let client = pair.a.run(|| {
        use std::io::Write;
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(ADDR_A.into(), 41050).into())
            .unwrap();
        s.connect(&SocketAddr::new(ADDR_B.into(), 5330).into())
            .unwrap();
        let mut s: std::net::TcpStream = s.into();
        for _ in 0..7 {
            s.write_all(&[1u8; 10_000]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    client.join().unwrap();
    assert_eq!(server.join().unwrap(), 70_000);
    let got = receive(&[&collector], 4, Duration::from_secs(10));
    let log = d.log();
    let schema = schema();
    let mut ongoing = Vec::new();
    for datagram in &got[0] {
        let (_, v) = split(datagram);
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?} in {v}");
        if v["flow-lifecycle"]["state"] == "ongoing" {
            ongoing.push(v);
        } else {
            assert!(v.get("netlink").is_none(), "start and end are plain: {v}");
        }
    }
    assert!(ongoing.len() >= 2, "{} ongoing\n{log}", ongoing.len());
    let mut last_sent = 0;
    for v in &ongoing {
        let tcp = &v["netlink"]["tcpInfo"];
        let sent = tcp["bytesSent"].as_u64().unwrap_or_else(|| panic!("{v}"));
        assert!(sent >= last_sent && sent <= 70_000, "{v}");
        last_sent = sent;
        assert!(tcp["rtt"].as_u64().unwrap() > 0, "{v}");
        assert!(tcp["sndCwnd"].as_u64().unwrap() > 0, "{v}");
        assert!(v["netlink"]["cong"]["algorithm"].is_string(), "{v}");
    }
    assert!(last_sent > 0);
    d.stop();
}

/// A STUN server in `ns` on `port` (both families) that answers every Binding
/// request with XOR-MAPPED-ADDRESS `v4` or `v6` (by the requester's family) and
/// counts the requests; it stops when the returned flag is set.
fn stun_responder(
    ns: &Netns,
    port: u16,
    v4: Ipv4Addr,
    v6: std::net::Ipv6Addr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<usize>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sock = udp_listener(ns, port);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let t = std::thread::spawn(move || {
        let mut answered = 0;
        let mut buf = [0u8; 1500];
        while !stopped.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            // A Binding request: type 0x0001, the magic cookie.
            if n < 20 || buf[..2] != [0, 1] || buf[4..8] != [0x21, 0x12, 0xa4, 0x42] {
                continue;
            }
            let mask = buf[4..20].to_vec();
            let port = from.port() ^ 0x2112;
            let ipv4 = match from.ip() {
                std::net::IpAddr::V4(_) => true,
                std::net::IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
            };
            let (family, addr): (u8, Vec<u8>) = if ipv4 {
                (1, v4.octets().to_vec())
            } else {
                (2, v6.octets().to_vec())
            };
            let xaddr: Vec<u8> = addr.iter().zip(&mask).map(|(a, m)| a ^ m).collect();
            let mut attr = vec![0, family];
            attr.extend(port.to_be_bytes());
            attr.extend(xaddr);
            let mut msg = vec![0x01, 0x01];
            msg.extend((4 + attr.len() as u16).to_be_bytes());
            msg.extend(&buf[4..20]);
            msg.extend([0x00, 0x20]);
            msg.extend((attr.len() as u16).to_be_bytes());
            msg.extend(attr);
            sock.send_to(&msg, from).unwrap();
            answered += 1;
        }
        answered
    });
    (stop, t)
}

/// STUN: the daemon asks a STUN server (here on the peer host) for its public
/// addresses; fireflies of flows from the local address the request left from
/// carry the mapped address as their source, IPv4 and IPv6 alike.
#[test]
fn stun_discovered_public_addresses_become_the_fireflies_source() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(
        dir.path(),
        &[(
            "atlas.toml",
            "experiment = \"atlas\"\n[[rule]]\nname = \"to-5330\"\nactivity = 4\nremote_ports = [5330]\n",
        )],
    );
    let public4 = Ipv4Addr::new(203, 0, 113, 77);
    let public6: std::net::Ipv6Addr = "2001:db8::77".parse().unwrap();
    let (stop, responder) = stun_responder(&pair.b, 3478, public4, public6);
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[fireflies]\nenabled = true\nto_remote = false\n\
             collectors = [\"[{ADDR_B}]:{COLLECTOR_PORT}\"]\n\
             [fireflies.stun]\nservers = [\"{V4_B}:3478\", \"[{ADDR_B}]:3478\"]\n",
            policies.display()
        ),
    );
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(ADDR_A.into(), 41050),
        SocketAddr::new(ADDR_B.into(), 5330),
        10_000,
    );
    transfer(
        &pair.a,
        &pair.b,
        SocketAddr::new(V4_A.into(), 41051),
        SocketAddr::new(V4_B.into(), 5330),
        10_000,
    );
    let got = receive(&[&collector], 4, Duration::from_secs(20));
    let log = d.log();
    let mut sources: Vec<(u64, String, String)> = got[0]
        .iter()
        .map(|d| {
            let (_, v) = split(d);
            (
                v["flow-id"]["src-port"].as_u64().unwrap(),
                v["flow-lifecycle"]["state"].as_str().unwrap().to_string(),
                v["flow-id"]["src-ip"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    sources.sort();
    let want = |port, state: &str, ip: &str| (port, state.to_string(), ip.to_string());
    assert_eq!(
        sources,
        [
            want(41050, "end", "2001:db8::77"),
            want(41050, "start", "2001:db8::77"),
            want(41051, "end", "203.0.113.77"),
            want(41051, "start", "203.0.113.77"),
        ],
        "{log}"
    );
    assert!(log.contains("public address discovered"), "{log}");
    let status: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    let ff = &status["status"]["fireflies"];
    assert_eq!(ff["stun_ok"], 2, "one answer per family: {ff}");
    assert_eq!(ff["stun_failed"], 0, "{ff}");
    d.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(responder.join().unwrap(), 2);
}

/// A flow announced on the pipe that has no socket on this host (a transfer the
/// announcer describes for another host) still gets its start firefly at the
/// announcement, as flowd-go sends it (a targeted sock_diag lookup finds no socket;
/// dumps are a minute apart here, and the fallback waits 10 s), and its end at the
/// `end` line, with the announced 5-tuple, tag and start time, schema-valid.
#[test]
fn a_pipe_announced_flow_without_a_local_socket_gets_start_and_end_fireflies() {
    if !common::privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let policies = common::policies_with(dir.path(), &[]);
    let pipe = dir.path().join("flowd.pipe");
    let collector = udp_listener(&pair.b, COLLECTOR_PORT);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n\
             [fireflies]\nenabled = true\nto_remote = false\n\
             collectors = [\"[{ADDR_B}]:{COLLECTOR_PORT}\"]\n\
             [announcements]\npipe = \"{}\"\n",
            policies.display(),
            pipe.display()
        ),
    );
    let line = |l: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&pipe).unwrap();
        writeln!(f, "{l}").unwrap();
    };
    // A remote address no socket of this host has.
    line("start tcp 2001:db8:5::1 41060 2001:db8:6::2 1094 2 4");
    // Well under the 10 s fallback: only the lookup at the announcement sends it.
    let start = receive(&[&collector], 1, common::patient(Duration::from_secs(5)));
    line("end tcp 2001:db8:5::1 41060 2001:db8:6::2 1094 2 4");
    let end = receive(&[&collector], 1, Duration::from_secs(20));
    let log = d.log();
    assert_eq!((start[0].len(), end[0].len()), (1, 1), "{log}");
    let schema = schema();
    let mut start_times = Vec::new();
    for (datagram, state) in [(&start[0][0], "start"), (&end[0][0], "end")] {
        let (_, v) = split(datagram);
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?} in {v}");
        assert_eq!(v["flow-lifecycle"]["state"], state, "{v}");
        assert_eq!(v["flow-id"]["src-ip"], "2001:db8:5::1", "{v}");
        assert_eq!(v["flow-id"]["src-port"], 41060, "{v}");
        assert_eq!(v["flow-id"]["dst-ip"], "2001:db8:6::2", "{v}");
        assert_eq!(v["flow-id"]["dst-port"], 1094, "{v}");
        assert_eq!(v["context"]["experiment-id"], 2);
        assert_eq!(v["context"]["activity-id"], 4);
        start_times.push(v["flow-lifecycle"]["start-time"].clone());
    }
    assert_eq!(start_times[0], start_times[1]);
    let v: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    assert_eq!(v["status"]["announcements"]["unseen"], 1, "{v}");
    d.stop();
}
