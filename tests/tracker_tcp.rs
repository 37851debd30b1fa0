//! Privileged tests of the eBPF tracker, TCP lifecycles: each builds its own network
//! namespace, runs clients/servers inside it on a setns'd thread, and checks what
//! the tracker (loaded from the root namespace) reports. Gate: root, or
//! FLOWD_PRIVILEGED_TESTS=1 to make a missing privilege a failure.

mod common;

use std::{io, os::fd::AsRawFd, time::Duration};

use common::tracker::*;
use common::*;
use flowd::discovery::tracker_event::{EventKind, TrackerEvent};
use flowd::model::socket::{Direction, Protocol, SockState};
use nix::sys::socket::{AddressFamily, SockType};

#[test]
fn privileged_tcp_v4_connect_accept_close_report_tuple_cookie_owner_netns() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    let f = t.features().clone();
    assert!(f.tcp_state && f.sockops && f.owner_context, "{f:?}");
    let p = tcp_pair(&mut t, &ns, "127.0.0.1:0", "127.0.0.1", graceful);
    let pid = std::process::id();
    let (cc, sc) = (p.client_cookie, p.server_cookie);
    let evs = t.wait_for(
        WAIT,
        &[
            ("sockops connect", &|e| is(e, EventKind::TcpConnect, cc)),
            ("CLOSE->SYN_SENT", &|e| {
                tcp_change(e, cc, SockState::Close, SockState::SynSent)
            }),
            ("SYN_SENT->EST", &|e| {
                tcp_change(e, cc, SockState::SynSent, SockState::Established)
            }),
            ("passive est", &|e| {
                is(e, EventKind::TcpPassiveEstablished, sc)
            }),
            ("accept", &|e| is(e, EventKind::TcpAccept, sc)),
            ("EST->FIN_WAIT1", &|e| {
                tcp_change(e, cc, SockState::Established, SockState::FinWait1)
            }),
            ("client ->CLOSE", &|e| {
                is(e, EventKind::TcpState, cc) && e.observation.state == SockState::Close
            }),
            ("server ->CLOSE", &|e| {
                is(e, EventKind::TcpState, sc) && e.observation.state == SockState::Close
            }),
        ],
    );
    let one = |pred: &dyn Fn(&TrackerEvent) -> bool| evs.iter().find(|e| pred(e)).unwrap().clone();

    let conn = one(&|e| is(e, EventKind::TcpConnect, cc));
    let o = &conn.observation;
    assert_eq!(o.key.proto, Protocol::Tcp);
    assert_eq!(o.key.local(), p.client_local);
    assert_eq!(o.key.remote(), p.server_local);
    assert_eq!(
        (o.state, o.direction),
        (SockState::SynSent, Direction::Outbound)
    );
    assert_eq!(
        (o.pid, o.uid, o.inode),
        (Some(pid), Some(0), p.client_inode)
    );
    assert!(o.comm.is_some() && o.cgroup_id.is_some());
    assert!(conn.has_full_tuple());

    // The tracepoint's first event has no source port yet (not bound).
    let syn = one(&|e| tcp_change(e, cc, SockState::Close, SockState::SynSent));
    assert_eq!(syn.observation.key.local().port(), 0);
    assert_eq!(syn.observation.pid, Some(pid));

    // Server child is created in softirq while the *client* task is current:
    // owner fields must be withheld, uid (from the socket) kept.
    // The kernels measured before 6.18 fire this change before the new socket has
    // its own cookie (bpf/README.md, "Kernels"), so it is not the accepted
    // socket's event there; the passive-established event (required above) is
    // what reports the accept everywhere. Where it is reported, it must be right.
    if let Some(rx) = evs
        .iter()
        .find(|e| tcp_change(e, sc, SockState::Listen, SockState::SynRecv))
    {
        assert_eq!(
            rx.observation.pid, None,
            "softirq event claims an owner: {rx:?}"
        );
        assert_eq!(rx.observation.uid, Some(0));
        assert_eq!(rx.observation.direction, Direction::Inbound);
        assert_eq!(rx.observation.key.local(), p.server_local);
        assert_eq!(rx.observation.key.remote(), p.client_local);
    }

    let pe = one(&|e| is(e, EventKind::TcpPassiveEstablished, sc));
    assert_eq!(pe.observation.direction, Direction::Inbound);
    assert_eq!(pe.observation.key.local(), p.server_local);
    // No owner in softirq, but the socket's own cgroup (the listener's, this
    // process's): what a dump would report, so none is needed for it.
    assert_eq!(pe.observation.pid, None);
    assert_eq!(pe.observation.cgroup_id, conn.observation.cgroup_id);
    // accept() names who took it, and the inode it now has.
    let acc = one(&|e| is(e, EventKind::TcpAccept, sc));
    let o = &acc.observation;
    assert_eq!(
        (o.pid, o.inode, o.state),
        (Some(pid), p.server_inode, SockState::Established)
    );
    assert_eq!(
        (o.key.local(), o.key.remote()),
        (p.server_local, p.client_local)
    );
    assert_eq!(o.direction, Direction::Inbound);
    assert!(o.comm.is_some() && o.cgroup_id.is_some());

    let fin = one(&|e| tcp_change(e, cc, SockState::Established, SockState::FinWait1));
    assert_eq!(
        fin.observation.pid,
        Some(pid),
        "close() from user is the owner"
    );

    // Closes keep the full tuple (source port from inet_sport, skc_num is zeroed).
    let close = one(&|e| is(e, EventKind::TcpState, cc) && e.observation.state == SockState::Close);
    assert_eq!(close.observation.key.local(), p.client_local);
    assert_eq!(close.observation.key.remote(), p.server_local);
    for e in &evs {
        assert_eq!(e.observation.netns, ns.inode());
    }
    assert_eq!(t.drops().unwrap(), 0);
    assert_eq!(t.decode_errors(), 0);
}

#[test]
fn privileged_tcp_rst_by_linger_zero_is_a_close_on_both_ends() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    let p = tcp_pair(&mut t, &ns, "127.0.0.1:0", "127.0.0.1", |c, a| {
        let lg = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and a linger struct of the size passed.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&lg as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        drop(c);
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
    });
    let (cc, sc) = (p.client_cookie, p.server_cookie);
    let evs = t.wait_for(
        WAIT,
        &[
            ("client EST->CLOSE", &|e| {
                tcp_change(e, cc, SockState::Established, SockState::Close)
            }),
            ("server EST->CLOSE", &|e| {
                tcp_change(e, sc, SockState::Established, SockState::Close)
            }),
        ],
    );
    let c = evs
        .iter()
        .find(|e| tcp_change(e, cc, SockState::Established, SockState::Close))
        .unwrap();
    assert_eq!(
        c.observation.pid,
        Some(std::process::id()),
        "abort from close(): owner"
    );
    assert_eq!(c.observation.key.local(), p.client_local);
    let s = evs
        .iter()
        .find(|e| tcp_change(e, sc, SockState::Established, SockState::Close))
        .unwrap();
    assert_eq!(s.observation.pid, None, "RST received in softirq: no owner");
    assert_eq!(s.observation.key.local(), p.server_local);
}

#[test]
fn privileged_tcp_refused_connect_reports_syn_sent_to_close() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    let (ck, local) = t.run(&ns, || {
        let fd = raw_socket(AddressFamily::Inet, SockType::Stream);
        let err = raw_connect(&fd, "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        (cookie(&fd), local_of(&fd))
    });
    let evs = t.wait_for(
        WAIT,
        &[
            ("sockops connect", &|e| is(e, EventKind::TcpConnect, ck)),
            ("SYN_SENT->CLOSE", &|e| {
                tcp_change(e, ck, SockState::SynSent, SockState::Close)
            }),
        ],
    );
    let c = evs
        .iter()
        .find(|e| tcp_change(e, ck, SockState::SynSent, SockState::Close))
        .unwrap();
    let conn = evs
        .iter()
        .find(|e| is(e, EventKind::TcpConnect, ck))
        .unwrap();
    assert_eq!(c.observation.key.remote(), "127.0.0.1:1".parse().unwrap());
    assert_eq!(c.observation.direction, Direction::Outbound);
    // The close names the tuple the connect announced (after the failure the
    // kernel has reset the local address: getsockname says 0.0.0.0:PORT).
    assert_eq!(c.observation.key, conn.observation.key);
    assert_eq!(c.observation.key.local().port(), local.port());
}

#[test]
fn privileged_tcp_connect_timeout_reports_syn_sent_to_close() {
    if !privileged() {
        return;
    }
    // The timeout's close runs in a timer softirq. When that softirq interrupts the
    // same tracepoint program running for another socket of the host on that CPU,
    // the kernel skips the nested run (counted as a recursion miss): under host-wide
    // churn the event is then lost, and only the reconcile dump corrects it. Such an
    // attempt is repeated, twice at most; a missing event with no skipped run fails.
    for attempt in 1..=3 {
        let ns = Netns::new("trk");
        ns.add_black_hole();
        let mut t = Probe::new(&default_cfg(), &ns);
        let ck = t.run(&ns, || {
            let fd = raw_socket(AddressFamily::Inet, SockType::Stream);
            // One SYN retransmission: gives up after ~3 s (1 s + 2 s).
            setsockopt_int(&fd, libc::IPPROTO_TCP, libc::TCP_SYNCNT, 1);
            let err = raw_connect(&fd, "10.201.0.5:80".parse().unwrap()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
            cookie(&fd)
        });
        let closed = |e: &TrackerEvent| tcp_change(e, ck, SockState::SynSent, SockState::Close);
        let evs = match t.try_wait_for(WAIT, &[("SYN_SENT->CLOSE", &closed)]) {
            Ok(evs) => evs,
            Err(e) if attempt < 3 && t.kernel_skipped_a_run() => {
                eprintln!("attempt {attempt}: the kernel skipped a tracker run, again: {e}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let c = evs.iter().find(|e| closed(e)).unwrap();
        assert_eq!(c.observation.key.remote(), "10.201.0.5:80".parse().unwrap());
        assert_eq!(c.observation.key.local().ip().to_string(), "10.200.0.1");
        assert!(c.has_full_tuple());
        return;
    }
}

#[test]
fn privileged_tcp_v4_mapped_v6_sockets_are_reported_as_ipv4() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    let p = tcp_pair(&mut t, &ns, "[::]:0", "::ffff:127.0.0.1", graceful);
    let (cc, sc) = (p.client_cookie, p.server_cookie);
    let evs = t.wait_for(
        WAIT,
        &[
            ("sockops connect", &|e| is(e, EventKind::TcpConnect, cc)),
            ("passive est", &|e| {
                is(e, EventKind::TcpPassiveEstablished, sc)
            }),
        ],
    );
    for e in evs.iter().filter(|e| e.has_full_tuple()) {
        let k = &e.observation.key;
        assert!(!k.is_ipv6(), "mapped address not unmapped: {e:?}");
        assert_eq!(k.local().ip().to_string(), "127.0.0.1");
    }
    let c = evs
        .iter()
        .find(|e| is(e, EventKind::TcpConnect, cc))
        .unwrap();
    assert_eq!(c.observation.key.local().port(), p.client_local.port());
    assert_eq!(c.observation.key.remote().port(), p.server_local.port());
}

#[test]
fn privileged_tcp_v6_loopback_keeps_ipv6_tuple() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    let p = tcp_pair(&mut t, &ns, "[::1]:0", "::1", graceful);
    let cc = p.client_cookie;
    let evs = t.wait_for(
        WAIT,
        &[
            ("sockops connect", &|e| is(e, EventKind::TcpConnect, cc)),
            ("SYN_SENT->EST", &|e| {
                tcp_change(e, cc, SockState::SynSent, SockState::Established)
            }),
        ],
    );
    for e in evs
        .iter()
        .filter(|e| e.observation.cookie == cc && e.has_full_tuple())
    {
        assert_eq!(e.observation.key.local(), p.client_local);
        assert_eq!(e.observation.key.remote(), p.server_local);
    }
}

/// The sockops STATE_CB path (what reports a change the tracepoint program skips
/// when a softirq nests into it), made to report every change: a connection's
/// closes arrive from it too, with the tuple, the final byte counts and no owner.
#[test]
fn privileged_state_cb_reports_closes_with_tuple_and_bytes() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("trk");
    let mut t = Probe::new(&default_cfg(), &ns);
    assert!(t.features().sockops);
    t.tracker.report_every_state_change();
    let p = tcp_pair(&mut t, &ns, "127.0.0.1:0", "127.0.0.1", |mut c, a| {
        use std::io::Write;
        c.write_all(b"hello").unwrap();
        drop(c);
        drop(a);
    });
    let (cc, sc) = (p.client_cookie, p.server_cookie);
    let closed_cb = |cookie: u64| {
        move |e: &TrackerEvent| {
            is(e, EventKind::TcpStateCb, cookie) && e.observation.state == SockState::Close
        }
    };
    let (c_cb, s_cb) = (closed_cb(cc), closed_cb(sc));
    let evs = t.wait_for(
        WAIT,
        &[
            ("client close via STATE_CB", &c_cb),
            ("server close via STATE_CB", &s_cb),
        ],
    );
    let c = evs.iter().find(|e| c_cb(e)).unwrap();
    assert_eq!(c.observation.key.local(), p.client_local);
    assert_eq!(c.observation.key.remote(), p.server_local);
    assert_eq!(c.observation.pid, None, "sockops knows no owner");
    let bytes = c.observation.tcp_bytes.expect("final byte counts");
    assert!(bytes.acked >= 5, "{bytes:?}");
    let s = evs.iter().find(|e| s_cb(e)).unwrap();
    assert_eq!(s.observation.key.local(), p.server_local);
    assert_eq!(s.observation.netns, ns.inode());
}
