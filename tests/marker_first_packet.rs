//! First-packet marking end to end: with in-kernel decisions every packet of a
//! matched flow carries its tag from the very first (the SYN of an active open, the
//! SYN-ACK of an accepted connection, the first datagram of a connected UDP socket);
//! with `marker.in_kernel_decisions = false` the first packets leave unmarked, because
//! userspace decides only after the tracker reports the socket. Captured on the peer.
//! Privileged.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Capture, Daemon, Packet, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::model::tag::{decode, Tag};
use serde_json::Value;

const POLICY: &str = "experiment = \"atlas\"\n\
[[rule]]\nname = \"out\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n\
[[rule]]\nname = \"nobody\"\nactivity = \"Debug\"\nusers = [65534]\nremote_ports = [5202]\npriority = 3\n\
[[rule]]\nname = \"in\"\nactivity = \"Analysis Input\"\ndirection = \"inbound\"\nlocal_ports = [5401]\npriority = 2\n\
[[rule]]\nname = \"udp\"\nactivity = \"T0 Export\"\nprotocol = \"udp\"\nremote_ports = [5501]\npriority = 1\n";

/// The atlas tag of an activity name, through the bundled registry.
fn tag(activity: &str) -> Tag {
    let id = flowd::policy::Registry::bundled()
        .activity(2, activity)
        .unwrap()
        .id;
    Tag::new(2, id).unwrap()
}

fn tcp_flags(p: &Packet) -> u8 {
    // Label strategy: no option headers, TCP right after the fixed header.
    p.l3.get(40 + 13).copied().unwrap_or(0)
}

fn daemon(pair: &Pair, dir: &Path, in_kernel: bool) -> Daemon {
    let policies = dir.join(format!("policies-{in_kernel}"));
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("atlas.toml"), POLICY).unwrap();
    Daemon::start_with(
        &pair.a,
        dir,
        &format!(
            "[policy]\ndir = \"{}\"\n[marker]\nin_kernel_decisions = {in_kernel}\n[discovery]\nreconcile_interval_ms = 500\n",
            policies.display()
        ),
    )
}

/// Active open from A (as `uid`) to B:port, 3 chunks; returns A's port.
fn active(pair: &Pair, uid: Option<u32>, port: u16) -> u16 {
    active_pausing(pair, uid, port, None)
}

/// `active`, with the process `paused` (the daemon) stopped while connect() runs, so
/// that userspace certainly cannot act between the tracker's report and the SYN.
fn active_pausing(pair: &Pair, uid: Option<u32>, port: u16, paused: Option<u32>) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.b.run(move || {
        let l = listen(SocketAddr::new(ADDR_B.into(), port));
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        c.write_all(b"bye").unwrap();
    });
    rx.recv().unwrap();
    let local = pair
        .a
        .run(move || {
            if let Some(u) = uid {
                common::become_uid(u);
            }
            let pause = |sig| {
                if let Some(pid) = paused {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
                }
            };
            pause(nix::sys::signal::Signal::SIGSTOP);
            let s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), port));
            pause(nix::sys::signal::Signal::SIGCONT);
            let mut s = s.unwrap();
            for _ in 0..3 {
                s.write_all(&[7; 1000]).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
            s.local_addr().unwrap().port()
        })
        .join()
        .unwrap();
    srv.join().unwrap();
    local
}

/// A listener on `at`, where the test's previous connection to that port may still
/// be closing: the 5.10 guest once refused the bind (EADDRINUSE) right after one.
fn listen(at: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + common::patient(Duration::from_secs(5));
    loop {
        match TcpListener::bind(at) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            r => return r.unwrap(),
        }
    }
}

/// Passive open: A listens on 5401, B connects; A answers 3 chunks.
fn passive(pair: &Pair) {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.a.run(move || {
        let l = TcpListener::bind(SocketAddr::new(ADDR_A.into(), 5401)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        for _ in 0..3 {
            c.write_all(&[9; 1000]).unwrap();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = c.read_to_end(&mut Vec::new());
    });
    rx.recv().unwrap();
    pair.b
        .run(|| {
            let mut s = TcpStream::connect(SocketAddr::new(ADDR_A.into(), 5401)).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        })
        .join()
        .unwrap();
    srv.join().unwrap();
}

/// A connected UDP socket on A sends 3 datagrams to B:5501 right after connect().
fn udp(pair: &Pair) -> u16 {
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let rcv = pair.b.run(move || {
        let s = UdpSocket::bind(SocketAddr::new(ADDR_B.into(), 5501)).unwrap();
        s.set_read_timeout(Some(common::patient(Duration::from_secs(5))))
            .unwrap();
        bound_tx.send(()).unwrap();
        let mut buf = [0u8; 100];
        for _ in 0..3 {
            s.recv(&mut buf).unwrap();
        }
    });
    // Sending before the receiver is bound would be refused (ICMP port unreachable):
    // on a slow guest the bind can take longer than any fixed sleep.
    bound.recv().unwrap();
    let port = pair
        .a
        .run(|| {
            let s = UdpSocket::bind(SocketAddr::new(ADDR_A.into(), 0)).unwrap();
            s.connect(SocketAddr::new(ADDR_B.into(), 5501)).unwrap();
            for _ in 0..3 {
                s.send(b"hello").unwrap();
            }
            let port = s.local_addr().unwrap().port();
            // Keep the socket while the datagrams leave.
            std::thread::sleep(Duration::from_millis(100));
            port
        })
        .join()
        .unwrap();
    rcv.join().unwrap();
    port
}

/// Holds a matched connection (A -> B:5201) open until the daemon's `flows` view has
/// tagged it; returns that view's `first_packet_exact`.
fn first_packet_exact_in_view(pair: &Pair, d: &Daemon) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.b.run(move || {
        let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let _ = c.read_to_end(&mut Vec::new());
    });
    rx.recv().unwrap();
    let (ptx, prx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let cli = pair.a.run(move || {
        let s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
        ptx.send(s.local_addr().unwrap().port()).unwrap();
        let _ = done_rx.recv();
    });
    let port = prx.recv().unwrap();
    let sock = d.state_dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exact = loop {
        let v = flowd::api::client::request(
            &sock,
            &flowd::api::request::Request::Flows {
                filter: None,
                limit: None,
                after: None,
            },
        )
        .unwrap();
        let flow = v["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["local"] == format!("[{ADDR_A}]:{port}") && !f["experiment"].is_null());
        if let Some(f) = flow {
            break f["first_packet_exact"].as_bool().unwrap();
        }
        assert!(Instant::now() < deadline, "flow never tagged: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    done_tx.send(()).unwrap();
    cli.join().unwrap();
    srv.join().unwrap();
    exact
}

fn from_a(pkts: &[Packet], port: u16) -> Vec<&Packet> {
    pkts.iter()
        .filter(|p| p.src == SocketAddr::new(ADDR_A.into(), port))
        .collect()
}

fn tags(pkts: &[&Packet]) -> Vec<Option<Tag>> {
    pkts.iter().map(|p| decode(p.flow_label).tag).collect()
}

fn status(d: &Daemon) -> Value {
    serde_json::from_str::<Value>(&d.cli_ok(&["status"])).unwrap()["status"].clone()
}

/// Waits until the daemon's map is empty (no stale kernel marks).
fn settle(d: &Daemon) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(d);
        if st["map_entries"] == 0 && st["kernel_marks"] == 0 {
            return st;
        }
        assert!(Instant::now() < deadline, "marks left behind: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn in_kernel_decisions_mark_every_packet_from_the_first() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path(), true);
    let cap = Capture::start(&pair.b, IF_B, "ip6 and (tcp or udp)", dir.path());
    let out = active(&pair, None, 5201);
    let nobody = active(&pair, Some(65534), 5202);
    let root_5202 = active(&pair, None, 5202);
    passive(&pair);
    let udp_port = udp(&pair);
    let pkts = cap.finish();

    let check = |name: &str, flow: Vec<&Packet>, want: Tag, first_flags: Option<u8>| {
        assert!(flow.len() >= 3, "{name}: only {} packets", flow.len());
        if let Some(f) = first_flags {
            assert_eq!(tcp_flags(flow[0]) & 0x12, f, "{name}: first packet flags");
        }
        let t = tags(&flow);
        assert!(
            t.iter().all(|t| *t == Some(want)),
            "{name}: every packet must carry {want}: {t:?}"
        );
        let e: Vec<u8> = flow.iter().map(|p| decode(p.flow_label).entropy).collect();
        assert!(e.iter().all(|x| *x == e[0]), "{name}: entropy moved: {e:?}");
    };
    check(
        "active open",
        from_a(&pkts, out),
        tag("Data Consolidation"),
        Some(0x02),
    );
    check(
        "active open as nobody",
        from_a(&pkts, nobody),
        tag("Debug"),
        Some(0x02),
    );
    check(
        "passive open",
        from_a(&pkts, 5401),
        tag("Analysis Input"),
        Some(0x12),
    );
    check(
        "connected udp",
        from_a(&pkts, udp_port),
        tag("T0 Export"),
        None,
    );
    // uid 0 on 5202 matches no rule (the kernel's own labels are hashes: they must
    // just not be the rule's tag).
    assert!(
        tags(&from_a(&pkts, root_5202))
            .iter()
            .all(|t| *t != Some(tag("Debug"))),
        "uid 0 on 5202 matches no rule"
    );
    assert!(
        first_packet_exact_in_view(&pair, &d),
        "flows view: first_packet_exact"
    );
    let st = settle(&d);
    d.stop();
    assert!(st["kernel_decided_total"].as_u64().unwrap() >= 3, "{st}");
    assert_eq!(st["policy_first_packet_exact_rules"], 4, "{st}");
}

#[test]
fn without_in_kernel_decisions_the_first_packets_leave_unmarked() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path(), false);
    // A first connection (no rule) resolves B's link-layer address: the first SYN
    // to an unknown neighbour waits in the neighbour queue before TC sees it, which
    // can give userspace time to win the race this test shows it loses.
    active(&pair, None, 5203);
    let cap = Capture::start(&pair.b, IF_B, "ip6 and (tcp or udp)", dir.path());
    // The tracker reports the connect before the SYN leaves, within the same
    // syscall: a daemon that is busy (here: stopped) at that moment always loses the
    // race, and under emulation an idle one can occasionally win it.
    let out = active_pausing(&pair, None, 5201, Some(d.child.id()));
    passive(&pair);
    let pkts = cap.finish();
    assert!(
        !first_packet_exact_in_view(&pair, &d),
        "flows view: first_packet_exact"
    );
    let st = settle(&d);
    d.stop();
    // The SYN left while userspace could not act, and a SYN-ACK answers a request
    // socket that userspace never hears of: only the kernel could have marked them.
    let syn = from_a(&pkts, out);
    assert_eq!(tcp_flags(syn[0]) & 0x12, 0x02);
    let consolidation = Some(tag("Data Consolidation"));
    assert_ne!(
        decode(syn[0].flow_label).tag,
        consolidation,
        "SYN marked without the kernel"
    );
    let synack = from_a(&pkts, 5401);
    assert_eq!(tcp_flags(synack[0]) & 0x12, 0x12);
    assert_ne!(
        decode(synack[0].flow_label).tag,
        Some(tag("Analysis Input"))
    );
    assert_eq!(st["kernel_decided_total"], 0, "{st}");
    assert_eq!(st["policy_first_packet_exact_rules"], 0, "{st}");
}

/// A SYN flood cannot fill the marker map: an accepted connection is written into
/// the map when its handshake completes (sockops), so the SYN-ACK of a half-open
/// one is labelled but takes no entry.
#[test]
fn half_open_connections_get_labelled_syn_acks_and_no_map_entry() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("atlas.toml"), POLICY).unwrap();
    // No reconcile during the test: its sweep would hide entries left behind.
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[discovery]\nreconcile_interval_ms = 600000\n",
            policies.display()
        ),
    );
    let listener = pair
        .a
        .run(|| {
            let l = TcpListener::bind(SocketAddr::new(ADDR_A.into(), 5401)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap();
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    const SYNS: u16 = 100;
    pair.b
        .run(|| {
            use std::os::fd::AsRawFd;
            let raw = socket2::Socket::new(
                socket2::Domain::IPV6,
                socket2::Type::RAW,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            // The kernel fills in the TCP checksum (at byte 16) of what we send.
            let at: libc::c_int = 16;
            // SAFETY: a valid fd and a c_int option value of the right size.
            let r = unsafe {
                libc::setsockopt(
                    raw.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_CHECKSUM,
                    (&at as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "IPV6_CHECKSUM");
            let to = SocketAddr::new(ADDR_A.into(), 0).into();
            for sport in 20_000..20_000 + SYNS {
                let mut syn = [0u8; 20];
                syn[..2].copy_from_slice(&sport.to_be_bytes());
                syn[2..4].copy_from_slice(&5401u16.to_be_bytes());
                syn[4..8].copy_from_slice(&u32::from(sport).to_be_bytes());
                syn[12] = 5 << 4;
                syn[13] = 0x02;
                syn[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
                raw.send_to(&syn, &to).unwrap();
            }
        })
        .join()
        .unwrap();
    // No socket on B owns those ports: B answers each SYN-ACK with a reset.
    std::thread::sleep(Duration::from_millis(300));
    let st = status(&d);
    let pkts = cap.finish();
    drop(listener);
    d.stop();

    let syn_acks: Vec<&Packet> = from_a(&pkts, 5401)
        .into_iter()
        .filter(|p| tcp_flags(p) & 0x12 == 0x12)
        .collect();
    assert!(
        syn_acks.len() >= usize::from(SYNS),
        "{} SYN-ACKs captured",
        syn_acks.len()
    );
    let t = tags(&syn_acks);
    assert!(
        t.iter().all(|t| *t == Some(tag("Analysis Input"))),
        "every SYN-ACK carries the rule's tag: {t:?}"
    );
    assert_eq!(st["map_entries"], 0, "{st}");
    assert_eq!(st["kernel_marks"], 0, "{st}");
}

/// A connection A -> B:5201 that A closes first; B closes `late` after A's FIN, so
/// A's last ACK leaves from its TIME_WAIT socket, after the daemon has heard of the
/// close. Returns A's port.
fn client_closes_first(pair: &Pair, late: Duration) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.b.run(move || {
        let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let _ = c.read_to_end(&mut Vec::new());
        std::thread::sleep(late);
        drop(c);
    });
    rx.recv().unwrap();
    let port = pair
        .a
        .run(|| {
            let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
            s.write_all(&[7; 1000]).unwrap();
            s.local_addr().unwrap().port()
        })
        .join()
        .unwrap();
    srv.join().unwrap();
    port
}

/// Every packet of a tagged flow carries its tag to the last: the final ACK of the
/// side that closed first leaves from TIME_WAIT, after the close event.
#[test]
fn the_last_ack_from_time_wait_carries_the_tag() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path(), true);
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let ports: Vec<u16> = (0..3)
        .map(|_| client_closes_first(&pair, Duration::from_millis(200)))
        .collect();
    let pkts = cap.finish();
    d.stop();
    let want = Some(tag("Data Consolidation"));
    for port in ports {
        let flow = from_a(&pkts, port);
        // From the peer: its FIN (to A's port), then A's ACK of it, the last packet.
        let peer_fin = pkts
            .iter()
            .rposition(|p| p.dst.port() == port && tcp_flags(p) & 0x01 != 0)
            .expect("the peer's FIN was captured");
        let last = pkts
            .iter()
            .rposition(|p| p.src == SocketAddr::new(ADDR_A.into(), port))
            .unwrap();
        assert!(
            last > peer_fin,
            "port {port}: A acknowledged the peer's FIN"
        );
        assert_eq!(
            tcp_flags(&pkts[last]) & 0x17,
            0x10,
            "port {port}: a pure ACK"
        );
        let t = tags(&flow);
        assert!(
            t.iter().all(|t| *t == want),
            "port {port}: every packet, the ACK from TIME_WAIT too, must carry the tag: {t:?}"
        );
    }
}
