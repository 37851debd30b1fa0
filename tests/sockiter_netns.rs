//! PRIVILEGED: the BPF socket iterator's full dump against sock_diag's, on real
//! sockets in a private network namespace: the two must report exactly the same
//! observations (set, cookies, uids, inodes, states, directions, tcp_info).
//! Run as root, or with FLOWD_PRIVILEGED_TESTS=1 to make a missing privilege a failure.

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::sockdiag::*;
use common::*;
use flowd::config::DumpSourceSetting;
use flowd::discovery::full_dump::{DumpSource, FullDump};
use flowd::discovery::sockdiag::SockDiag;
use flowd::discovery::sockiter::{SockIter, SockIterError};
use flowd::features::{Feature, KernelFeatures};
use flowd::model::socket::{SockState, SocketObservation};

fn sorted(mut v: Vec<SocketObservation>) -> Vec<SocketObservation> {
    v.sort_by_key(|o| (o.cookie, o.key));
    v
}

fn sock_diag_dump(sd: &mut SockDiag) -> Vec<SocketObservation> {
    let mut v = Vec::new();
    sd.dump(&mut v).expect("sock_diag dump");
    sorted(v)
}

fn iter_dump(it: &mut SockIter) -> Vec<SocketObservation> {
    let mut v = Vec::new();
    it.dump(&mut v).expect("socket iterator dump");
    sorted(v)
}

/// Every kind of socket the reconcile meets, kept open by the returned value:
/// the common `SocketSet`, a TIME_WAIT and a FIN_WAIT2 socket.
fn open_sockets() -> Vec<Box<dyn std::any::Any + Send>> {
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let set = SocketSet::open();
    // Active close on both sides: the closer ends in TIME_WAIT.
    let tw_client = TcpStream::connect("127.0.0.1:5000").unwrap();
    let (tw_server, _) = set.l4.accept().unwrap();
    drop(tw_client);
    drop(tw_server);
    // Half close: the closer waits in FIN_WAIT2 (a full socket, its peer in
    // CLOSE_WAIT).
    let fw_client = TcpStream::connect("[::1]:5001").unwrap();
    let (fw_server, _) = set.l6.accept().unwrap();
    fw_client.shutdown(std::net::Shutdown::Write).unwrap();
    keep.push(Box::new(set));
    keep.push(Box::new((fw_client, fw_server)));
    keep
}

/// Waits until the dump shows the TIME_WAIT and FIN_WAIT2 sockets: the FINs
/// travel through loopback's softirq after close() returns.
fn settled(sd: &mut SockDiag) -> Vec<SocketObservation> {
    let deadline = Instant::now() + patient(Duration::from_secs(5));
    loop {
        let d = sock_diag_dump(sd);
        let has = |s| d.iter().any(|o| o.state == s);
        if has(SockState::TimeWait) && has(SockState::FinWait2) && has(SockState::CloseWait) {
            return d;
        }
        assert!(Instant::now() < deadline, "sockets never settled: {d:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_same(iter: &[SocketObservation], sock_diag: &[SocketObservation]) {
    if iter != sock_diag {
        let only_iter: Vec<_> = iter.iter().filter(|o| !sock_diag.contains(o)).collect();
        let only_sd: Vec<_> = sock_diag.iter().filter(|o| !iter.contains(o)).collect();
        panic!("iterator and sock_diag disagree\nonly from the iterator: {only_iter:#?}\nonly from sock_diag: {only_sd:#?}");
    }
}

#[test]
fn privileged_iterator_dump_equals_sock_diag_dump() {
    if !privileged() {
        return;
    }
    Netns::new("it").enter(|| {
        let _keep = open_sockets();
        let mut sd = SockDiag::new().unwrap();
        let mut it = SockIter::new().expect("loading the socket iterators");
        assert_eq!(it.netns(), netns_inode());
        // sock_diag first: on Linux < 5.12 only it gives accepted sockets a cookie.
        let before = settled(&mut sd);
        // 6 established ends, TIME_WAIT, FIN_WAIT2 + CLOSE_WAIT, 2 connected UDP.
        assert_eq!(before.len(), 6 + 1 + 2 + 2, "{before:#?}");
        let found = iter_dump(&mut it);
        let after = sock_diag_dump(&mut sd);
        assert_eq!(before, after, "the sockets changed during the test");
        assert_same(&found, &after);
        // Without tcp_info, as sock_diag without INET_DIAG_INFO.
        sd.set_tcp_info(false);
        it.set_tcp_info(false);
        assert_same(&iter_dump(&mut it), &sock_diag_dump(&mut sd));
        assert!(iter_dump(&mut it).iter().all(|o| o.tcp.is_none()));
        // The uid-1234 socket, to be sure the uid is not everyone's 0.
        assert!(found.iter().any(|o| o.uid == Some(1234)));
        let st = it.stats();
        assert_eq!(st.last_dump_sockets, found.len());
        // 3 listeners in each of the 3 walks so far.
        assert_eq!(st.parse.listeners, 3 * 3);
    });
}

#[test]
fn privileged_iterator_of_a_namespace_by_path_sees_only_that_namespace() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("ip");
    let _keep = ns.enter(|| {
        let keep = open_sockets();
        let mut sd = SockDiag::new().unwrap();
        settled(&mut sd);
        keep
    });
    // From the host's namespace, which has sockets of its own (the test
    // harness's, the lead's builds): none of them may appear.
    let _host = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut sd = SockDiag::in_netns(ns.path()).unwrap();
    let mut it = SockIter::in_netns(ns.path()).unwrap();
    assert_eq!(it.netns(), ns.inode());
    let expected = sock_diag_dump(&mut sd);
    let found = iter_dump(&mut it);
    assert_eq!(found.len(), 11);
    assert!(found.iter().all(|o| o.netns == ns.inode()));
    assert_same(&found, &expected);
}

#[test]
fn privileged_full_dump_uses_the_iterator_or_falls_back_to_sock_diag() {
    if !privileged() {
        return;
    }
    Netns::new("fd").enter(|| {
        let l = TcpListener::bind("127.0.0.1:5000").unwrap();
        let c = TcpStream::connect("127.0.0.1:5000").unwrap();
        let (s, _) = l.accept().unwrap();
        let tracing_cookie = KernelFeatures::detect().has(Feature::TracingCookie);
        let mut it = SockIter::new().unwrap();
        let mut v = Vec::new();
        match it.dump(&mut v) {
            // Before Linux 5.12 the accepted socket has no cookie until sock_diag
            // gives it one: the walk must fail, not leave it out.
            Err(SockIterError::Record { .. }) if !tracing_cookie => {}
            r => assert!(r.is_ok() && tracing_cookie, "{r:?}"),
        }
        let mut full = FullDump::open(DumpSourceSetting::Iterator).unwrap();
        let mut parts = Vec::new();
        full.dump_chunked(1, &mut |p| parts.append(p)).unwrap();
        let expected = sorted(parts);
        let mut sd = SockDiag::new().unwrap();
        assert_same(&expected, &sock_diag_dump(&mut sd));
        assert_eq!(expected.len(), 2);
        let want = if tracing_cookie {
            (DumpSource::Iterator, 0)
        } else {
            (DumpSource::SockDiag, 1)
        };
        assert_eq!((full.source(), full.fallbacks()), want);
        // Now that sock_diag gave every socket a cookie, the iterator works on any
        // kernel.
        let mut parts = Vec::new();
        full.dump_chunked(1, &mut |p| parts.append(p)).unwrap();
        assert_eq!(full.source(), DumpSource::Iterator);
        assert_same(&sorted(parts), &expected);
        // auto: the iterator only where the kernel can give cookies from it.
        let auto = FullDump::open(DumpSourceSetting::Auto).unwrap();
        let want = if tracing_cookie {
            DumpSource::Iterator
        } else {
            DumpSource::SockDiag
        };
        assert_eq!(auto.source(), want);
        let forced = FullDump::open(DumpSourceSetting::SockDiag).unwrap();
        assert_eq!(forced.source(), DumpSource::SockDiag);
        drop((c, s));
    });
}

/// The daemon's status once its first full dump is in.
fn status_after_first_dump(d: &Daemon) -> serde_json::Value {
    let deadline = Instant::now() + patient(Duration::from_secs(20));
    loop {
        let v: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
        let st = v["status"].clone();
        if st["dump_source"].as_str().is_some_and(|s| !s.is_empty()) {
            return st;
        }
        assert!(Instant::now() < deadline, "no full dump: {st}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_daemon_adopts_sockets_from_the_iterator_dump_and_says_so() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("id");
    // Opened before the daemon: only a full dump can find this connection.
    let _conn = ns.enter(|| {
        let l = TcpListener::bind("127.0.0.1:5000").unwrap();
        let c = TcpStream::connect("127.0.0.1:5000").unwrap();
        let (s, _) = l.accept().unwrap();
        (l, c, s)
    });
    let d = Daemon::start_with(
        &ns,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[marker]\ninterfaces = [\"lo\"]\n[discovery]\ndump_source = \"iterator\"\n",
            dir.path().join("no-policies").display()
        ),
    );
    let st = status_after_first_dump(&d);
    assert!(
        d.log().contains("full dumps: BPF socket iterator"),
        "{}",
        d.log()
    );
    // Before Linux 5.12 the first walk meets the accepted socket without a cookie
    // and sock_diag makes that dump.
    let want = if KernelFeatures::detect().has(Feature::TracingCookie) {
        ("bpf_iterator", 0)
    } else {
        ("sock_diag", 1)
    };
    assert_eq!(
        (
            st["dump_source"].as_str().unwrap(),
            st["dump_source_fallbacks"].as_u64().unwrap()
        ),
        want,
        "{st}"
    );
    assert_eq!(st["flows_total"], 2, "{st}");
    assert_eq!(st["dump_errors"], 0, "{st}");
}

/// Between full dumps the daemon verifies its table with digest walks, and
/// says so in `status` and `/metrics`; a connection the tracker reports keeps
/// the table verified (no full dump needed to adopt it).
#[test]
fn privileged_daemon_reconciles_with_verify_walks_between_full_dumps() {
    if !privileged() {
        return;
    }
    if !KernelFeatures::detect().has(Feature::TracingCookie) {
        return; // no iterator dumps, so no verify walks (Linux < 5.12)
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("vd");
    let (listener, _before) = ns.enter(|| {
        let l = TcpListener::bind("127.0.0.1:5000").unwrap();
        let c = TcpStream::connect("127.0.0.1:5000").unwrap();
        let (s, _) = l.accept().unwrap();
        (l, (c, s))
    });
    let d = Daemon::start_with(
        &ns,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[marker]\ninterfaces = [\"lo\"]\n\
             [discovery]\ndump_source = \"iterator\"\nreconcile_interval_ms = 100\nfull_dump_interval_s = 1\n",
            dir.path().join("no-policies").display()
        ),
    );
    let verified_at_least = |n: u64, conns: u64| {
        let deadline = Instant::now() + patient(Duration::from_secs(20));
        loop {
            let v: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
            let w = v["status"]["verify_walks"].clone();
            if w["verified"].as_u64().unwrap_or(0) >= n
                && w["last_outcome"] == "verified"
                && w["last_connections"] == conns
            {
                return v["status"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no verify walk: {v}\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let st = verified_at_least(2, 2);
    assert_eq!(st["flows_total"], 2, "{st}");
    let w = &st["verify_walks"];
    assert_eq!(
        (w["mismatch"].as_u64(), w["failed"].as_u64()),
        (Some(0), Some(0)),
        "{st}"
    );
    // A connection made now: the tracker reports it (from the connecting
    // process, so nothing is left for a dump to fill in on the client's end; the
    // accepted end waits for one), and the walks after it count four.
    let _after = ns.enter(move || {
        let c = TcpStream::connect("127.0.0.1:5000").unwrap();
        let (s, _) = listener.accept().unwrap();
        (c, s, listener)
    });
    let before = st["verify_walks"]["verified"].as_u64().unwrap();
    let dumps_before = st["full_dumps"].as_u64().unwrap();
    assert!(dumps_before >= 1, "{st}");
    let st = verified_at_least(before + 1, 4);
    assert_eq!(st["flows_total"], 4, "{st}");
    assert_eq!(st["verify_walks"]["mismatch"], 0, "{st}");
    // The tracker told the table all a dump would (the accepted end's cgroup,
    // then its owner and inode at accept()): no full dump was needed, unless the
    // every-10th-round one fell in between (slow guests).
    let rounds = st["verify_walks"]["verified"].as_u64().unwrap() - before;
    if rounds < 5 {
        assert_eq!(st["full_dumps"].as_u64().unwrap(), dumps_before, "{st}");
    }
    let metrics = scrape_metrics(&ns);
    assert!(
        metrics.contains("flowd_reconcile_verify_walks_total{outcome=\"verified\"}"),
        "{metrics}"
    );
}

#[test]
fn privileged_walks_during_churn_list_every_socket_that_lived_throughout() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    if !privileged() {
        return;
    }
    Netns::new("ch").enter(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let stable: Vec<(TcpStream, TcpStream)> = (0..300)
            .map(|_| {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect();
        let want: std::collections::BTreeSet<u64> = stable
            .iter()
            .flat_map(|(c, s)| [cookie(c), cookie(s)])
            .collect();
        // Connections opened and closed while the walks run (the thread starts in
        // this namespace: it inherits the creating thread's).
        let stop = Arc::new(AtomicBool::new(false));
        let churned = Arc::new(AtomicU64::new(0));
        let churn = {
            let (stop, churned) = (stop.clone(), churned.clone());
            let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
                    let s = l2.accept().unwrap().0;
                    drop((c, s));
                    churned.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let mut full = FullDump::open(DumpSourceSetting::Iterator).unwrap();
        for _ in 0..40 {
            let mut got = std::collections::BTreeSet::new();
            full.dump_chunked(64, &mut |part| {
                got.extend(part.iter().map(|o| o.cookie));
                part.clear();
            })
            .expect("a full dump during churn");
            let missing: Vec<_> = want.difference(&got).collect();
            assert!(
                missing.is_empty(),
                "{} stable sockets missing from a {:?} dump: {missing:?}",
                missing.len(),
                full.source()
            );
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        assert!(churned.load(Ordering::Relaxed) > 100, "no churn happened");
        if KernelFeatures::detect().has(Feature::TracingCookie) {
            assert_eq!(full.fallbacks(), 0, "every walk succeeded on its own");
        }
    });
}

/// The verify walk (`SockIter::verify`) against the flow table's own fold: equal
/// for a table a full dump built, different once a connection opens or closes
/// behind the table's back, equal again after a dump; a difference in a partition
/// an event touched while the kernel walked is excused.
#[test]
fn privileged_verify_walk_matches_the_table_and_finds_what_it_lacks() {
    use flowd::flows::{FlowTable, FlowTableConfig, VerifyOutcome};
    if !privileged() {
        return;
    }
    if !KernelFeatures::detect().has(Feature::TracingCookie) {
        // Linux < 5.12: the daemon never makes verify walks there (no iterator
        // dumps), and an iterator cannot give accepted sockets a cookie.
        return;
    }
    Netns::new("vw").enter(|| {
        let _keep = open_sockets();
        let mut sd = SockDiag::new().unwrap();
        settled(&mut sd);
        let mut it = SockIter::new().expect("loading the socket iterators");
        let mut table = FlowTable::new(FlowTableConfig {
            netns: it.netns(),
            ..FlowTableConfig::default()
        });
        let dump_into = |it: &mut SockIter, table: &mut FlowTable| {
            let t = Instant::now();
            table.reconcile(&iter_dump(it), t);
        };
        let verify = |it: &mut SockIter, table: &mut FlowTable| {
            table.verify_begin(it.digest_seed());
            let digest = it.verify().expect("verify walk");
            table.verify_end(Some(&digest))
        };
        // Verified, nothing excused: no event arrived during these walks.
        let clean = |connections| VerifyOutcome::Verified {
            connections,
            excused: 0,
        };
        dump_into(&mut it, &mut table);
        // 6 established ends, FIN_WAIT2 and CLOSE_WAIT, 2 connected UDP; not the
        // listeners, the bound UDP socket or the TIME_WAIT remnant.
        assert_eq!(verify(&mut it, &mut table), clean(10));
        // The walk read no record, and the next full dump still works.
        assert_eq!(iter_dump(&mut it).len(), 11);
        // The progress records that keep a walk of a million sockets going
        // (every 2^19 by default) change nothing.
        it.set_digest_progress_every(2);
        assert_eq!(verify(&mut it, &mut table), clean(10));
        // One per 2 sockets visited: 3 listeners, 6 established ends, TIME_WAIT,
        // FIN_WAIT2, CLOSE_WAIT and 3 UDP sockets make 15.
        assert_eq!(it.verify_progress_records(), 7);
        it.set_digest_progress_every(1 << 19);

        // A connection the table has not heard of.
        let l = TcpListener::bind("127.0.0.1:6000").unwrap();
        let c = TcpStream::connect("127.0.0.1:6000").unwrap();
        let (s, _) = l.accept().unwrap();
        match verify(&mut it, &mut table) {
            VerifyOutcome::Mismatch {
                parts,
                kernel: 12,
                table: 10,
            } => assert!((1..=2).contains(&parts)),
            other => panic!("{other:?}"),
        }
        // The same, with events about both ends while the walk runs: excused.
        let new_ends: Vec<SocketObservation> = iter_dump(&mut it)
            .into_iter()
            .filter(|o| o.cookie == cookie(&c) || o.cookie == cookie(&s))
            .collect();
        assert_eq!(new_ends.len(), 2);
        table.verify_begin(it.digest_seed());
        let digest = it.verify().unwrap();
        for o in new_ends {
            table.apply_observation(o);
        }
        match table.verify_end(Some(&digest)) {
            VerifyOutcome::Verified {
                connections: 12,
                excused,
            } => assert!((1..=2).contains(&excused)),
            other => panic!("{other:?}"),
        }
        assert!(verify(&mut it, &mut table).verified());

        // Closed behind the table's back: the kernel has a TIME_WAIT remnant and
        // nothing of the other end; the table still has two connections.
        drop((c, s));
        let deadline = Instant::now() + patient(Duration::from_secs(5));
        loop {
            match verify(&mut it, &mut table) {
                VerifyOutcome::Mismatch {
                    kernel: 10,
                    table: 12,
                    ..
                } => break,
                // The FINs are still on their way through loopback.
                VerifyOutcome::Mismatch { .. } if Instant::now() < deadline => {}
                other => panic!("{other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        dump_into(&mut it, &mut table);
        assert_eq!(verify(&mut it, &mut table), clean(10));

        // Established in the accept queue when the table learns of it (no inode
        // yet), then accepted: the digest sees the socket it now has.
        let l2 = TcpListener::bind("127.0.0.1:6001").unwrap();
        let c2 = TcpStream::connect("127.0.0.1:6001").unwrap();
        dump_into(&mut it, &mut table);
        assert_eq!(verify(&mut it, &mut table), clean(12));
        let (s2, _) = l2.accept().unwrap();
        assert_eq!(
            verify(&mut it, &mut table),
            VerifyOutcome::Mismatch {
                parts: 1,
                kernel: 12,
                table: 12
            }
        );
        dump_into(&mut it, &mut table);
        assert!(verify(&mut it, &mut table).verified());
        drop((c2, s2, l2));

        let c = table.counters().verify;
        assert_eq!((c.verified, c.failed, c.inconclusive), (7, 0, 0));
        assert!(c.mismatched >= 3, "{c:?}");
    });
}
