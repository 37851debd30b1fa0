//! PRIVILEGED: real sockets in a private network namespace, dumped with sock_diag.
//! Run as root, or with FLOWD_PRIVILEGED_TESTS=1 to make a missing privilege a failure.

mod common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::sockdiag::*;
use common::*;
use flowd::discovery::procfs::ProcResolver;
use flowd::discovery::sockdiag::SockDiag;
use flowd::flows::{FlowEvent, FlowTable, FlowTableConfig};
use flowd::model::socket::{Direction, FlowKey, Protocol, SockState, SocketObservation, Source};

fn dump(sd: &mut SockDiag) -> Vec<SocketObservation> {
    let mut v = Vec::new();
    sd.dump(&mut v).expect("sock_diag dump");
    v
}

fn by_cookie(d: &[SocketObservation], c: u64) -> &SocketObservation {
    d.iter()
        .find(|o| o.cookie == c)
        .unwrap_or_else(|| panic!("cookie {c} missing from dump: {d:#?}"))
}

fn key(p: Protocol, l: &str, r: &str) -> FlowKey {
    FlowKey::new(p, addr(l), addr(r))
}

/// cgroup v2 id of this process: inode of its cgroup directory (hybrid or unified).
fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = flowd::discovery::procfs::cgroup_v2_path(&cg)?.to_owned();
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .find_map(|root| std::fs::metadata(format!("{root}{path}")).ok())
        .map(|m| m.ino())
}

#[test]
fn privileged_dump_reports_exact_tuples_uid_inode_cookie_direction_state() {
    if !privileged() {
        return;
    }
    Netns::new("sd").enter(|| {
        let set = SocketSet::open();

        let mut sd = SockDiag::new().unwrap();
        assert_eq!(sd.netns(), netns_inode());
        let d = dump(&mut sd);
        let cg = own_cgroup_id();

        let o = by_cookie(&d, cookie(&set.c4));
        assert_eq!(
            o.key,
            key(Protocol::Tcp, "127.0.0.1:40000", "127.0.0.1:5000")
        );
        assert_eq!((o.uid, o.inode), (Some(1234), inode(&set.c4)));
        assert_eq!(
            (o.state, o.direction),
            (SockState::Established, Direction::Outbound)
        );
        assert_eq!(o.netns, netns_inode());
        assert!(o.tcp.is_some_and(|t| t.snd_cwnd > 0));
        assert!(o.cgroup_id.is_some());
        if let Some(cg) = cg {
            assert_eq!(
                o.cgroup_id,
                Some(cg),
                "cgroup id = inode of our cgroup2 dir"
            );
        }

        let o = by_cookie(&d, cookie(&set.s4));
        assert_eq!(
            o.key,
            key(Protocol::Tcp, "127.0.0.1:5000", "127.0.0.1:40000")
        );
        assert_eq!(
            (o.uid, o.inode, o.direction),
            (Some(0), inode(&set.s4), Direction::Inbound)
        );

        let o = by_cookie(&d, cookie(&set.c6));
        let l = set.c6.local_addr().unwrap();
        assert_eq!(o.key, FlowKey::new(Protocol::Tcp, l, addr("[::1]:5001")));
        assert!(o.key.is_ipv6());
        assert_eq!(
            (o.inode, o.direction),
            (inode(&set.c6), Direction::Outbound)
        );
        assert_eq!(by_cookie(&d, cookie(&set.s6)).direction, Direction::Inbound);

        // IPv4-mapped: dumped from AF_INET6, reported as plain IPv4.
        let o = by_cookie(&d, cookie(&set.cm));
        assert!(!o.key.is_ipv6(), "{:?}", o.key);
        assert_eq!(o.key.remote(), addr("127.0.0.1:5003"));
        assert_eq!(o.direction, Direction::Outbound);
        let o = by_cookie(&d, cookie(&set.sm));
        assert_eq!(o.key.local(), addr("127.0.0.1:5003"));
        assert_eq!(o.direction, Direction::Inbound);

        let o = by_cookie(&d, cookie(&set.uc));
        let l = set.uc.local_addr().unwrap();
        assert_eq!(
            o.key,
            FlowKey::new(Protocol::Udp, l, addr("127.0.0.1:5002"))
        );
        assert_eq!(
            (o.state, o.inode, o.tcp),
            (SockState::Established, inode(&set.uc), None)
        );
        let o = by_cookie(&d, cookie(&set.u6));
        assert_eq!(o.key.remote(), addr("[::1]:5004"));
        assert!(
            d.iter().all(|o| o.cookie != cookie(&set.us)),
            "unconnected UDP is not a flow"
        );
        assert!(d.iter().all(|o| o.state != SockState::Listen));
        assert_eq!(d.len(), 8, "{d:#?}");
    });
}

#[test]
fn privileged_socket_opened_before_the_daemon_is_adopted_and_attributed() {
    if !privileged() {
        return;
    }
    Netns::new("sd").enter(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();

        // The "daemon" starts now.
        let mut sd = SockDiag::new().unwrap();
        let mut table = FlowTable::new(FlowTableConfig {
            netns: sd.netns(),
            ..FlowTableConfig::default()
        });
        let started = Instant::now();
        let d = dump(&mut sd);
        let ev = table.reconcile(&d, started);
        let started_cookies: BTreeSet<u64> = ev
            .iter()
            .filter_map(|e| match e {
                FlowEvent::Started(f) => Some(f.cookie),
                _ => None,
            })
            .collect();
        assert_eq!(started_cookies, BTreeSet::from([cookie(&c), cookie(&s)]));
        assert_eq!(table.counters().reconcile_added, 2);
        let f = table.get(cookie(&c)).unwrap();
        assert_eq!(f.direction, Direction::Outbound);
        assert!(f.seen_by.sockdiag && !f.seen_by.tracker);

        let mut procs = ProcResolver::new(1024);
        let p = procs.lookup(f.inode).unwrap().expect("our own socket");
        assert_eq!(p.pid, std::process::id());

        drop((c, s));
        // Poll with a deadline: the server side may linger in LAST_ACK briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let started = Instant::now();
            let d = dump(&mut sd);
            let ev = table.reconcile(&d, started);
            assert!(ev.iter().all(|e| !matches!(e, FlowEvent::Started(_))));
            if table.iter().all(|f| f.state == SockState::TimeWait) && table.len() <= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "flows not ended: {:?}",
                table.iter().collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

fn tracker_obs(c: &TcpStream, state: SockState, netns: u64) -> SocketObservation {
    SocketObservation {
        key: FlowKey::new(
            Protocol::Tcp,
            c.local_addr().unwrap(),
            c.peer_addr().unwrap(),
        ),
        cookie: cookie(c),
        netns,
        state,
        direction: Direction::Outbound,
        inode: inode(c),
        uid: Some(0),
        pid: Some(std::process::id()),
        comm: None,
        cgroup_id: None,
        tcp: None,
        tcp_bytes: None,
        source: Source::Tracker,
    }
}

#[test]
fn privileged_churn_10k_connections_table_ends_with_exactly_the_live_sockets() {
    if !privileged() {
        return;
    }
    Netns::new("sd").enter(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = l.local_addr().unwrap();
        let mut sd = SockDiag::new().unwrap();
        let mut table = FlowTable::new(FlowTableConfig {
            netns: sd.netns(),
            time_wait_grace: Duration::ZERO,
            ..FlowTableConfig::default()
        });
        let mut kept = Vec::new();
        let mut buf = Vec::new();
        let mut reconciles = 0;
        for i in 0..10_000u32 {
            let c = TcpStream::connect(dst).unwrap();
            let (s, _) = l.accept().unwrap();
            // Half the connections are also reported by a (simulated) tracker, which
            // then misses every other close: reconcile has to end those.
            let tracked = i % 2 == 0;
            if tracked {
                table.apply_observation(tracker_obs(&c, SockState::Established, sd.netns()));
            }
            if i % 250 == 0 {
                kept.push((c, s));
            } else {
                if tracked && i % 4 == 0 {
                    table.apply_observation(tracker_obs(&c, SockState::Close, sd.netns()));
                }
                drop(c);
                drop(s);
            }
            if i % 500 == 499 {
                let started = Instant::now();
                sd.dump(&mut buf).unwrap();
                table.reconcile(&buf, started);
                reconciles += 1;
            }
            // Close some kept ones along the way.
            if i % 3000 == 2999 {
                kept.remove(0);
            }
        }
        let live: BTreeSet<u64> = kept
            .iter()
            .flat_map(|(c, s)| [cookie(c), cookie(s)])
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let started = Instant::now();
            sd.dump(&mut buf).unwrap();
            table.reconcile(&buf, started);
            let got: BTreeSet<u64> = table.iter().map(|f| f.cookie).collect();
            if got == live {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "table {} flows, live {}",
                got.len(),
                live.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let c = table.counters();
        assert_eq!(c.flows_started - c.flows_ended, live.len() as u64);
        assert!(reconciles >= 20);
        // Missed closes show up as TIME_WAIT remnants (same cookie) or vanish: both end.
        assert!(c.flows_ended >= 4900, "missed closes were corrected: {c:?}");
        assert!(table.tombstones() <= c.flows_ended as usize);
        println!("churn: {c:?}, live {}", live.len());
    });
}

#[test]
fn privileged_poller_opened_in_another_namespace_dumps_that_namespace() {
    if !privileged() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        Netns::new("sd").enter(move || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
            tx.send((path, netns_inode(), cookie(&c))).unwrap();
            done_rx.recv().unwrap();
            drop((l, c));
        })
    });
    let (path, ns, c) = rx.recv().unwrap();
    let mut sd = SockDiag::in_netns(&path).unwrap();
    assert_eq!(sd.netns(), ns);
    assert_ne!(
        ns,
        netns_inode(),
        "test thread is still in the original namespace"
    );
    let d = dump(&mut sd);
    let o = by_cookie(&d, c);
    assert_eq!((o.netns, o.direction), (ns, Direction::Outbound));
    done_tx.send(()).unwrap();
    t.join().unwrap();
}
