//! Explicit announcements end to end: a live connection marked by policy is
//! re-tagged by a named-pipe line and by fireflies sent to the daemon, returns to
//! the policy when they are withdrawn, and ignores fireflies from sources outside
//! the allow list; a flow announced before it exists is tagged once discovered.
//! Labels are read off packets captured on the peer. Privileged.

mod common;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{Capture, Daemon, Netns, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::firefly::{Firefly, State};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::{decode, Tag};
use serde_json::Value;

const ATLAS: &str =
    "experiment = \"atlas\"\n[[rule]]\nname = \"to-5301\"\nactivity = 4\nremote_ports = [5301]\n";

fn a(port: u16) -> SocketAddr {
    SocketAddr::new(ADDR_A.into(), port)
}

fn b(port: u16) -> SocketAddr {
    SocketAddr::new(ADDR_B.into(), port)
}

fn tag(e: u16, act: u8) -> Tag {
    Tag::new(e, act).unwrap()
}

/// A firefly about `local` -> `remote`, as an application on this host sends it.
fn firefly(state: State, local: SocketAddr, remote: SocketAddr, t: Tag) -> Vec<u8> {
    Firefly {
        state,
        key: FlowKey::new(Protocol::Tcp, local, remote),
        tag: t,
        start: SystemTime::now(),
        now: SystemTime::now(),
        end: (state == State::End).then(SystemTime::now),
        usage: None,
        application: Some("xrootd".into()),
    }
    .datagram(Some("se01"))
}

/// Sends `datagram` from `ns` (from `from`) to `to`. The socket is returned: the
/// daemon identifies a local sender by its socket, which must still exist when
/// the datagram is read.
fn send_udp(ns: &Netns, from: SocketAddr, to: SocketAddr, datagram: Vec<u8>) -> UdpSocket {
    ns.run(move || {
        let s = UdpSocket::bind(from).unwrap();
        s.send_to(&datagram, to).unwrap();
        s
    })
    .join()
    .unwrap()
}

fn announcements(d: &Daemon) -> Value {
    let v: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    v["status"]["announcements"].clone()
}

/// Waits until the daemon has taken `n` announcements from `source`.
fn wait_received(d: &Daemon, source: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while announcements(d)[source].as_u64() != Some(n) {
        assert!(
            Instant::now() < deadline,
            "{source} never reached {n}: {}\n{}",
            announcements(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_pipe(pipe: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().write(true).open(pipe).unwrap();
    writeln!(f, "{line}").unwrap();
}

fn daemon(pair: &Pair, dir: &Path) -> (Daemon, std::path::PathBuf) {
    let policies = common::policies_with(dir, &[("atlas.toml", ATLAS)]);
    let pipe = dir.join("flowd.pipe");
    let d = Daemon::start_with(
        &pair.a,
        dir,
        &format!(
            "[policy]\ndir = \"{}\"\n[announcements]\nfirefly_listen = [\"[::]:10514\"]\npipe = \"{}\"\n",
            policies.display(),
            pipe.display()
        ),
    );
    (d, pipe)
}

#[test]
fn pipe_lines_and_fireflies_retag_a_live_flow_and_their_end_gives_it_back_to_the_policy() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let (d, pipe) = daemon(&pair, dir.path());
    assert_eq!(
        std::fs::metadata(&pipe)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o620
    );
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let server = common::serve_once(&pair.b, 5301);
    let (phase_tx, phase_rx) = std::sync::mpsc::channel::<u8>();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<()>();
    let client = pair.a.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.bind(&a(41020).into()).unwrap();
        s.connect(&b(5301).into()).unwrap();
        s.set_tcp_nodelay(true).unwrap();
        let mut s: std::net::TcpStream = s.into();
        for phase in phase_rx {
            s.write_all(&[phase; 3000]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            sent_tx.send(()).unwrap();
        }
    });
    let step = |phase: u8| {
        phase_tx.send(phase).unwrap();
        sent_rx.recv().unwrap();
    };
    let daemon_lo = SocketAddr::from(([127, 0, 0, 1], 10514));
    let app_lo = SocketAddr::from(([127, 0, 0, 1], 0));

    step(1); // the policy's tag
             // An overlong line is skipped whole; the next line is read as usual.
    write_pipe(&pipe, &"x".repeat(2000));
    write_pipe(
        &pipe,
        &format!("start tcp {ADDR_A} 41020 {ADDR_B} 5301 cms 12"),
    );
    wait_received(&d, "received_pipe", 1);
    step(2);
    // The application describes the flow from the peer's side here: either
    // orientation names the same connection.
    let _app = send_udp(
        &pair.a,
        app_lo,
        daemon_lo,
        firefly(State::Start, b(5301), a(41020), tag(5, 1)),
    );
    wait_received(&d, "received_firefly", 1);
    step(3);
    let _app = send_udp(
        &pair.a,
        app_lo,
        daemon_lo,
        firefly(State::End, b(5301), a(41020), tag(5, 1)),
    );
    wait_received(&d, "received_firefly", 2);
    step(4);
    // From the peer host: outside the allow list (loopback), so not heard.
    send_udp(
        &pair.b,
        b(0),
        a(10514),
        firefly(State::Start, a(41020), b(5301), tag(7, 7)),
    );
    std::thread::sleep(Duration::from_millis(300));
    step(5);
    // A malformed line is reported and changes nothing.
    write_pipe(&pipe, "start tcp nonsense");
    drop(phase_tx);
    client.join().unwrap();
    assert_eq!(server.join().unwrap(), 15_000);
    let pkts = cap.finish();
    let status = announcements(&d);
    assert_eq!(status["received_firefly"], 2, "{status}");
    assert_eq!(status["received_pipe"], 1, "{status}");
    assert_eq!(status["withdrawn"], 1, "{status}");
    let log = d.stop();
    assert!(
        log.contains("line ignored") && log.contains("expected 8 fields"),
        "{log}"
    );
    assert!(
        log.contains("source outside announcements.firefly_allow"),
        "{log}"
    );
    assert!(!pipe.exists(), "the FIFO is removed at exit");

    let mut tags: [Vec<Option<Tag>>; 6] = Default::default();
    for p in pkts.iter().filter(|p| p.src == a(41020)) {
        if let Some(phase) = p.tcp_payload_first_byte() {
            tags[usize::from(phase)].push(decode(p.flow_label).tag);
        }
    }
    for (phase, want) in [
        (1, (2, 4)),
        (2, (3, 12)),
        (3, (5, 1)),
        (4, (2, 4)),
        (5, (2, 4)),
    ] {
        let want = Some(tag(want.0, want.1));
        assert!(!tags[phase].is_empty(), "no data of phase {phase}\n{log}");
        assert!(
            tags[phase].iter().all(|t| *t == want),
            "phase {phase} wants {want:?}: {tags:?}"
        );
    }
}

#[test]
fn a_flow_announced_before_it_exists_is_tagged_once_discovered() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let (d, pipe) = daemon(&pair, dir.path());
    // Port 5302: no policy matches it.
    write_pipe(
        &pipe,
        &format!("start tcp {ADDR_A} 41021 {ADDR_B} 5302 3 12"),
    );
    wait_received(&d, "received_pipe", 1);
    assert_eq!(announcements(&d)["held"], 1);
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let server = common::serve_once(&pair.b, 5302);
    pair.a
        .run(|| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
            s.bind(&a(41021).into()).unwrap();
            s.connect(&b(5302).into()).unwrap();
            let mut s: std::net::TcpStream = s.into();
            // Discovery reports the socket at connect; give userspace that moment.
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(&[9u8; 20_000]).unwrap();
        })
        .join()
        .unwrap();
    assert_eq!(server.join().unwrap(), 20_000);
    let pkts = cap.finish();
    let data: Vec<u32> = pkts
        .iter()
        .filter(|p| p.src == a(41021) && p.payload_len > 500)
        .map(|p| p.flow_label)
        .collect();
    assert!(!data.is_empty());
    for l in &data {
        assert_eq!(decode(*l).tag, Some(tag(3, 12)), "{data:x?}");
    }
    // Its flow ended: the announcement went with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while announcements(&d)["held"] != 0 {
        assert!(Instant::now() < deadline, "{}", announcements(&d));
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
}

#[test]
fn the_daemons_own_fireflies_coming_back_to_its_listener_are_not_announcements() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = common::policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    // A collector pointed at the daemon's own listener: without care, each firefly
    // would come back as an announcement, which ends our announcement, and so on.
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[fireflies]\nenabled = true\nto_remote = false\n\
             collectors = [\"127.0.0.1:10514\"]\n[announcements]\nfirefly_listen = [\"127.0.0.1:10514\"]\n",
            policies.display()
        ),
    );
    common::tcp_transfer(&pair.a, &pair.b, 41030, 5301, 10_000);
    let status = || -> Value {
        serde_json::from_str::<Value>(&d.cli_ok(&["status"])).unwrap()["status"].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status()["fireflies"]["sent_end"] != 1 {
        assert!(Instant::now() < deadline, "{}\n{}", status(), d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = status();
    assert_eq!(s["fireflies"]["sent_start"], 1, "{s}");
    assert_eq!(s["fireflies"]["sent_end"], 1, "{s}");
    assert_eq!(s["announcements"]["received_firefly"], 0, "{s}");
    let log = d.stop();
    assert!(log.contains("this daemon's own firefly"), "{log}");
}
