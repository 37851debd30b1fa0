//! Autonomous marking end to end: policies decide, discovery finds the sockets, the
//! marker stamps them; captured on the receiving host. Privileged.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    policies_with, write_policy, Capture, Daemon, Netns, Packet, Pair, ADDR_A, ADDR_B, IF_B,
};
use flowd::model::tag::{decode, Tag};
use serde_json::Value;

/// Connects from `client` (as `uid`), waits `settle` for the daemon to tag the flow,
/// then sends `chunks` of 1000 bytes `gap` apart, calling `between(i)` before chunk i.
fn converse(
    client: &Netns,
    uid: Option<u32>,
    port: u16,
    settle: Duration,
    chunks: usize,
    gap: Duration,
    between: impl Fn(usize) + Send + 'static,
) -> u16 {
    client
        .run(move || {
            if let Some(u) = uid {
                common::become_uid(u);
            }
            let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), port)).expect("connect");
            let local = s.local_addr().unwrap().port();
            std::thread::sleep(settle);
            for i in 0..chunks {
                between(i);
                s.write_all(&[0x42; 1000]).unwrap();
                std::thread::sleep(gap);
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
            local
        })
        .join()
        .unwrap()
}

fn data_packets_from(pkts: &[Packet], port: u16) -> Vec<&Packet> {
    // Data-carrying packets: the 1000-byte chunks (headers and SACK options are less).
    pkts.iter()
        .filter(|p| p.src == SocketAddr::new(ADDR_A.into(), port) && p.payload_len > 500)
        .collect()
}

fn status(d: &Daemon) -> Value {
    serde_json::from_str::<Value>(&d.cli_ok(&["status"])).unwrap()["status"].clone()
}

fn policy_daemon(pair: &Pair, dir: &Path, policies: &Path, discovery: &str) -> Daemon {
    Daemon::start_with(
        &pair.a,
        dir,
        &format!(
            "[policy]\ndir = \"{}\"\n[discovery]\n{discovery}\n",
            policies.display()
        ),
    )
}

const ATLAS: &str = "experiment = \"atlas\"\n[[rule]]\nname = \"to-5201\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n";
const CMS_NOBODY: &str =
    "experiment = \"cms\"\n[[rule]]\nname = \"nobody-5202\"\nactivity = 12\nusers = [65534]\nremote_ports = [5202]\n";

#[test]
fn each_flow_carries_the_tag_its_policy_gives_and_unmatched_flows_none() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_with(
        dir.path(),
        &[("atlas.toml", ATLAS), ("cms.toml", CMS_NOBODY)],
    );
    let pair = Pair::new();
    let d = policy_daemon(&pair, dir.path(), &policies, "");
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());

    let settle = Duration::from_millis(300);
    let mut ports = Vec::new();
    // atlas by port (root); cms by user 65534 and port; 5202 as root and 5203: no rule.
    for (uid, port) in [
        (None, 5201),
        (Some(65534), 5202),
        (None, 5202),
        (None, 5203),
    ] {
        let srv = common::serve_once(&pair.b, port);
        ports.push(converse(
            &pair.a,
            uid,
            port,
            settle,
            5,
            Duration::from_millis(10),
            |_| {},
        ));
        assert_eq!(srv.join().unwrap(), 5000);
    }
    let pkts = cap.finish();
    let st = status(&d);
    d.stop();

    let expect = [
        Some(Tag::new(2, 4).unwrap()),
        Some(Tag::new(3, 12).unwrap()),
        None,
        None,
    ];
    for (port, want) in ports.iter().zip(expect) {
        let data = data_packets_from(&pkts, *port);
        assert_eq!(data.len(), 5, "data packets of flow from port {port}");
        let labels: Vec<u32> = data.iter().map(|p| p.flow_label).collect();
        match want {
            Some(tag) => {
                assert!(
                    labels.iter().all(|l| *l == labels[0]),
                    "label changed mid-flow: {labels:x?}"
                );
                assert_eq!(
                    decode(labels[0]).tag,
                    Some(tag),
                    "flow from port {port}: {labels:x?}"
                );
            }
            None => {
                // The kernel's own labels are hashes: they must not be our tags.
                for l in labels {
                    let t = decode(l).tag;
                    assert!(
                        t != Some(Tag::new(2, 4).unwrap()) && t != Some(Tag::new(3, 12).unwrap())
                    );
                }
            }
        }
    }
    assert!(st["flows_started"].as_u64().unwrap() >= 4, "{st}");
}

#[test]
fn reload_switches_the_tag_keeps_the_entropy_and_survives_a_broken_file() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    let pair = Pair::new();
    let d = policy_daemon(&pair, dir.path(), &policies, "");
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let srv = common::serve_once(&pair.b, 5201);
    let pol = policies.clone();
    let pid = d.child.id() as i32;
    let port = converse(
        &pair.a,
        None,
        5201,
        Duration::from_millis(300),
        30,
        Duration::from_millis(30),
        move |i| {
            let hup = || {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGHUP,
                )
                .unwrap()
            };
            if i == 10 {
                write_policy(
                    &pol,
                    "atlas.toml",
                    &ATLAS.replace("Data Consolidation", "Debug"),
                );
                hup();
                std::thread::sleep(Duration::from_millis(200));
            }
            if i == 20 {
                write_policy(&pol, "broken.toml", "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = \"Debug\"\nremote_ports = [70000]\n");
                hup();
                std::thread::sleep(Duration::from_millis(200));
            }
        },
    );
    assert_eq!(srv.join().unwrap(), 30_000);
    let pkts = cap.finish();
    let st = status(&d);
    let log = d.stop();

    let data = data_packets_from(&pkts, port);
    assert_eq!(data.len(), 30);
    let tags: Vec<_> = data.iter().map(|p| decode(p.flow_label)).collect();
    let consolidation = Tag::new(2, 4).unwrap();
    let debug = Tag::new(2, 9).unwrap();
    assert!(
        tags[..10].iter().all(|t| t.tag == Some(consolidation)),
        "{tags:?}"
    );
    // After the first reload every packet carries the new activity, the broken
    // file changed nothing, and the entropy bits never moved.
    assert!(tags[10..].iter().all(|t| t.tag == Some(debug)), "{tags:?}");
    assert!(tags.iter().all(|t| t.entropy == tags[0].entropy));
    assert_eq!(st["policy_reloads_ok"], 1, "{st}");
    assert_eq!(st["policy_reloads_failed"], 1, "{st}");
    assert!(
        log.contains("broken.toml:5:"),
        "the failed reload names file and line:\n{log}"
    );
}

#[test]
fn with_the_tracker_disabled_polling_finds_and_marks_a_flow_within_one_interval() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    let pair = Pair::new();
    let d = policy_daemon(
        &pair,
        dir.path(),
        &policies,
        "tracker = \"disabled\"\nreconcile_interval_ms = 500",
    );
    let srv = common::serve_once(&pair.b, 5201);
    let sock = d.state_dir.join("control.sock");
    // Connect, then watch the daemon find the socket with no event to tell it.
    let watcher = std::thread::spawn(move || {
        let t0 = Instant::now();
        loop {
            let st = flowd::api::client::request(&sock, &flowd::api::request::Request::Status {})
                .unwrap();
            if st["flows_tagged"] == 1 {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never tagged: {st}");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    converse(
        &pair.a,
        None,
        5201,
        Duration::from_millis(1200),
        1,
        Duration::ZERO,
        |_| {},
    );
    let found_after = watcher.join().unwrap();
    srv.join().unwrap();
    let st = status(&d);
    d.stop();
    assert!(
        found_after <= Duration::from_millis(1100),
        "found after {found_after:?} with a 500 ms interval"
    );
    assert!(st["reconcile_added"].as_u64().unwrap() >= 1, "{st}");
}

#[test]
fn churn_of_ten_thousand_connections_leaves_no_flow_and_no_mark_behind() {
    if !common::privileged() {
        return;
    }
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_with(
        dir.path(),
        &[("atlas.toml", &ATLAS.replace("5201", "5301"))],
    );
    let pair = Pair::new();
    let d = policy_daemon(&pair, dir.path(), &policies, "reconcile_interval_ms = 1000");
    let server = pair.b.run(|| {
        let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), 5301)).unwrap();
        for _ in 0..N {
            let (mut c, _) = l.accept().unwrap();
            let _ = c.read_to_end(&mut Vec::new());
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    pair.a
        .run(|| {
            for _ in 0..N {
                let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5301)).unwrap();
                s.write_all(b"x").unwrap();
            }
        })
        .join()
        .unwrap();
    server.join().unwrap();
    let churn = t0.elapsed();
    // Wait for the table to settle (closes in flight, one reconcile).
    let deadline = Instant::now() + Duration::from_secs(20);
    let sock = d.state_dir.join("control.sock");
    let ours = flowd::api::request::Request::Flows {
        filter: Some(flowd::api::filter::FlowFilter {
            address: Some("fd00:f1::/64".into()),
            ..Default::default()
        }),
        limit: None,
        after: None,
    };
    // The tracker sees the whole host; only the daemon's namespace is kept.
    let own_netns = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pair.a.path()).unwrap());
    let (flows, st) = loop {
        let mut flows = flowd::api::client::request(&sock, &ours).unwrap();
        if let Some(list) = flows["flows"].as_array_mut() {
            list.retain(|f| f["netns"].as_u64() == Some(own_netns));
        }
        let st = status(&d);
        if st["map_entries"] == 0 && flows["flows"].as_array().is_some_and(|f| f.is_empty()) {
            break (flows, st);
        }
        assert!(
            Instant::now() < deadline,
            "table never settled: {st}\n{flows}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    d.stop();
    eprintln!("{N} connections in {churn:?}; status {st}");
    assert_eq!(flows["flows"].as_array().unwrap().len(), 0);
    // The client ends are in the daemon's namespace: every one of them was seen and
    // tagged. The server ends, in the peer namespace, are not kept
    // (discovery.all_namespaces is off by default).
    assert_eq!(st["flows_started"].as_u64().unwrap(), N as u64, "{st}");
    assert!(
        st["flows_tagged_total"].as_u64().unwrap() >= N as u64,
        "{st}"
    );
}

/// The tracker reports every namespace of the host; by default the table keeps the
/// daemon's own (what it marks and reconciles), and `all_namespaces` adds the others
/// for display.
#[test]
fn other_namespaces_are_listed_only_with_all_namespaces() {
    if !common::privileged() {
        return;
    }
    for (all, netns_listed) in [(false, 1), (true, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let policies = policies_with(dir.path(), &[]);
        let pair = Pair::new();
        let d = policy_daemon(
            &pair,
            dir.path(),
            &policies,
            &format!("all_namespaces = {all}"),
        );
        let srv = common::serve_once(&pair.b, 5201);
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let client = pair.a.run(move || {
            let s = std::net::TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
            hold_rx.recv().unwrap();
            drop(s);
        });
        let sock = d.state_dir.join("control.sock");
        let ino = |ns: &Netns| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(ns.path()).unwrap())
        };
        let ours = [ino(&pair.a), ino(&pair.b)];
        // With all_namespaces the sockets of tests running beside this one show too:
        // count only this pair's.
        let want = |v: &Value| {
            v["flows"].as_array().is_some_and(|f| {
                let f: Vec<u64> = f.iter().filter_map(|f| f["netns"].as_u64()).collect();
                let mine: std::collections::BTreeSet<u64> =
                    f.iter().copied().filter(|n| ours.contains(n)).collect();
                let foreign = f.iter().filter(|n| **n != ours[0]).count();
                mine.len() == netns_listed && (all || foreign == 0)
            })
        };
        let list = || {
            flowd::api::client::request(
                &sock,
                &flowd::api::request::Request::Flows {
                    filter: None,
                    limit: None,
                    after: None,
                },
            )
            .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let flows = loop {
            let flows = list();
            if want(&flows) || Instant::now() > deadline {
                break flows;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Both ends stay listed (or not) while the connection lives.
        std::thread::sleep(Duration::from_millis(300));
        let later = list();
        hold_tx.send(()).unwrap();
        client.join().unwrap();
        srv.join().unwrap();
        d.stop();
        assert!(want(&flows), "all_namespaces = {all}: {flows}");
        assert!(want(&later), "all_namespaces = {all}: {later}");
    }
}

/// The entropy key comes from the kernel's boot id: a flow that outlives a daemon
/// restart (an upgrade) gets the same label from the new daemon, which adopts it
/// from its first dump.
#[test]
fn a_flow_keeps_its_label_across_a_daemon_restart() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    let pair = Pair::new();
    let d = policy_daemon(&pair, dir.path(), &policies, "");
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let srv = common::serve_once(&pair.b, 5201);
    let (step_tx, step_rx) = std::sync::mpsc::channel::<u8>();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<u16>();
    let client = pair.a.run(move || {
        let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
        s.set_nodelay(true).unwrap();
        for phase in step_rx {
            s.write_all(&[phase; 3000]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            sent_tx.send(s.local_addr().unwrap().port()).unwrap();
        }
    });
    step_tx.send(1).unwrap();
    let port = sent_rx.recv().unwrap();
    d.stop();
    let d = policy_daemon(&pair, dir.path(), &policies, "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&d)["flows_tagged"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the new daemon never tagged the flow"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    step_tx.send(2).unwrap();
    sent_rx.recv().unwrap();
    drop(step_tx);
    client.join().unwrap();
    srv.join().unwrap();
    let pkts = cap.finish();
    d.stop();

    let mut labels: [Vec<u32>; 3] = Default::default();
    for p in data_packets_from(&pkts, port) {
        if let Some(phase) = p.tcp_payload_first_byte() {
            labels[usize::from(phase).min(2)].push(p.flow_label);
        }
    }
    let atlas = Tag::new(2, 4).unwrap();
    assert!(
        !labels[1].is_empty() && !labels[2].is_empty(),
        "{labels:x?}"
    );
    let first = labels[1][0];
    assert_eq!(decode(first).tag, Some(atlas));
    assert!(
        labels[1].iter().chain(&labels[2]).all(|l| *l == first),
        "the label changed across the restart: {labels:x?}"
    );
}
