//! Local announcers are authenticated: a firefly sent to the loopback listener by
//! a user that is not root is heard only when the user is allowed
//! (`announcements.allow_users`), and then tags that user's own flows only; root's
//! flow keeps its policy tag. Labels are read off packets captured on the peer.
//! Privileged.

mod common;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use common::{Capture, Daemon, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::firefly::{Firefly, State};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::{decode, Tag};
use serde_json::Value;

const ATLAS: &str =
    "experiment = \"atlas\"\n[[rule]]\nname = \"to-5311\"\nactivity = 4\nremote_ports = [5311]\n";
const NOBODY: u32 = 65534;
/// A uid with no passwd entry and in no allowed list.
const STRANGER: u32 = 43210;

fn a(port: u16) -> SocketAddr {
    SocketAddr::new(ADDR_A.into(), port)
}

fn b(port: u16) -> SocketAddr {
    SocketAddr::new(ADDR_B.into(), port)
}

fn start(local: SocketAddr, remote: SocketAddr, t: Tag) -> Vec<u8> {
    Firefly {
        state: State::Start,
        key: FlowKey::new(Protocol::Tcp, local, remote),
        tag: t,
        start: SystemTime::now(),
        now: SystemTime::now(),
        end: None,
        usage: None,
        application: Some("xrootd".into()),
    }
    .datagram(Some("se01"))
}

/// Switches the calling thread (only: the raw syscall, not glibc's process-wide
/// setuid) to `uid`, so that the sockets it opens are that user's.
fn become_user(uid: u32) {
    // SAFETY: setresuid on this thread alone; the test process keeps root elsewhere.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    assert_eq!(r, 0, "setresuid({uid})");
}

fn status(d: &Daemon) -> Value {
    let v: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    v["status"]["announcements"].clone()
}

#[test]
fn a_local_user_retags_only_its_own_flows_and_an_unlisted_user_nothing() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = common::policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[announcements]\nfirefly_listen = [\"127.0.0.1:10514\"]\n\
             allow_users = [\"{NOBODY}\"]\n",
            policies.display()
        ),
    );
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    // Root's flow, tagged by the policy; nobody's flow, untagged by any.
    let servers = [
        common::serve_once(&pair.b, 5311),
        common::serve_once(&pair.b, 5312),
    ];
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let mut clients = Vec::new();
    let mut gos = Vec::new();
    for (uid, sport, dport) in [(0, 41050, 5311), (NOBODY, 41051, 5312)] {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        gos.push(go_tx);
        let up_tx = up_tx.clone();
        clients.push(pair.a.run(move || {
            if uid != 0 {
                become_user(uid);
            }
            let s =
                socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
            s.bind(&a(sport).into()).unwrap();
            s.connect(&b(dport).into()).unwrap();
            let mut s: std::net::TcpStream = s.into();
            up_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            s.write_all(&[7u8; 20_000]).unwrap();
        }));
    }
    drop((go_tx, go_rx));
    up_rx.recv().unwrap();
    up_rx.recv().unwrap();
    // Discovery sees the connections at connect; let the daemon take them.
    std::thread::sleep(Duration::from_millis(300));

    let to = SocketAddr::from(([127, 0, 0, 1], 10514));
    let send_as = |uid: u32, datagram: Vec<u8>| -> UdpSocket {
        pair.a
            .run(move || {
                become_user(uid);
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(&datagram, to).unwrap();
                s
            })
            .join()
            .unwrap()
    };
    // Kept open until the daemon has read them: it identifies senders by socket.
    let _senders = [
        // Nobody tries root's flow (heard, not applied) and tags its own.
        send_as(NOBODY, start(a(41050), b(5311), Tag::new(5, 1).unwrap())),
        send_as(NOBODY, start(a(41051), b(5312), Tag::new(3, 12).unwrap())),
        // Not allowed at all.
        send_as(STRANGER, start(a(41050), b(5311), Tag::new(7, 7).unwrap())),
        send_as(STRANGER, start(a(41051), b(5312), Tag::new(7, 7).unwrap())),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&d)["received_firefly"] != 2 || status(&d)["refused"] != 2 {
        assert!(Instant::now() < deadline, "{}\n{}", status(&d), d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    for go in gos {
        go.send(()).unwrap();
    }
    for c in clients {
        c.join().unwrap();
    }
    for s in servers {
        assert_eq!(s.join().unwrap(), 20_000);
    }
    let pkts = cap.finish();
    let s = status(&d);
    assert!(s["foreign_flow"].as_u64().unwrap() >= 1, "{s}");
    let log = d.stop();
    assert!(log.contains("uid 43210 is not root"), "{log}");
    for (sport, want) in [(41050, Tag::new(2, 4)), (41051, Tag::new(3, 12))] {
        let labels: Vec<Option<Tag>> = pkts
            .iter()
            .filter(|p| p.src == a(sport) && p.payload_len > 500)
            .map(|p| decode(p.flow_label).tag)
            .collect();
        assert!(!labels.is_empty(), "no data from {sport}");
        let want = Some(want.unwrap());
        assert!(
            labels.iter().all(|t| *t == want),
            "{sport}: {labels:?}\n{log}"
        );
    }
}
