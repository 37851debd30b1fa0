//! Restarts and upgrades hand marking over without a gap: a live iperf3 flow is
//! captured on the peer while the daemon is stopped (SIGTERM) and started again,
//! then replaced by one whose marker program differs; every packet of the flow
//! carries its label and the interface drops nothing. TCX and clsact. Privileged.
//!
//! `FLOWD_RESTART_TEST_UNPINNED=1` runs the same checks with pinning off (the
//! behaviour before pinning): they fail, with the unmarked packets counted.

mod common;

use std::path::Path;
use std::time::Duration;

use common::live_flow::{tx_dropped, BpfFs, LiveFlow};
use common::{Capture, Daemon, Netns, Pair, IF_A, IF_B};
use flowd::model::tag::{decode, Tag};

const TAG: Tag = Tag {
    experiment: 2,
    activity: 3,
};
const CPORT: u16 = 45011;
const SPORT: u16 = 5201;

fn unpinned() -> bool {
    std::env::var_os("FLOWD_RESTART_TEST_UNPINNED").is_some_and(|v| v == "1")
}

fn marker_toml(attach: &str, pins: &BpfFs) -> String {
    let pin_dir = if unpinned() {
        String::new()
    } else {
        pins.pin_dir().display().to_string()
    };
    format!("attach = \"{attach}\"\npin_dir = \"{pin_dir}\"\n")
}

const FLOW: LiveFlow = LiveFlow {
    cport: CPORT,
    sport: SPORT,
    tag: TAG,
};

/// Our programs on IF_A: TCX egress and clsact egress, and A's qdiscs.
fn on_iface(ns: &Netns) -> String {
    let tcx = ns.tcx_egress(IF_A);
    format!(
        "tcx: {tcx:?}\nclsact: {}\nqdiscs: {}",
        ns.sh(&format!("tc filter show dev {IF_A} egress")),
        ns.sh(&format!("tc qdisc show dev {IF_A}"))
    )
}

/// What the hand-over test saw.
struct Seen {
    packets: usize,
    unmarked: usize,
    dropped: u64,
    logs: Vec<String>,
}

/// Starts the daemon, marks the iperf3 flow, and while it runs: restarts the
/// daemon (SIGTERM, start), then upgrades it (SIGTERM, start of a daemon whose
/// marker program differs); finally stops it and cleans, which must leave A as
/// it was found.
fn hand_over(attach: &str) -> Option<Seen> {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    if attach == "tcx" && common::tcx_refused_where_missing(&pair, dir.path()) {
        return None;
    }
    let pins = BpfFs::new(dir.path());
    let before = on_iface(&pair.a);
    let d = Daemon::start(&pair.a, dir.path(), &marker_toml(attach, &pins));
    FLOW.mark(&d);
    let dropped_before = tx_dropped(&pair.a);
    let filter = format!("ip6 and tcp and src port {CPORT}");
    let cap = Capture::start(&pair.b, IF_B, &filter, dir.path());
    // Long enough for any hand-over, even under emulation: stopped once done.
    let (mut server, mut client) = FLOW.iperf(&pair, 600);
    std::thread::sleep(Duration::from_secs(1));
    let (log1, d) = d.restart(dir.path(), &[]);
    if unpinned() {
        // Nothing is handed over: the new daemon must be told the flow again.
        FLOW.mark(&d);
    }
    std::thread::sleep(Duration::from_secs(1));
    let (log2, d) = d.restart(dir.path(), &[("FLOWD_TEST_MARKER_VARIANT", "1")]);
    if unpinned() {
        FLOW.mark(&d);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        client.try_wait().unwrap().is_none(),
        "the iperf3 flow ended before the hand-overs were done"
    );
    // SIGINT: iperf3 ends the test and closes the flow.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let _ = client.wait();
    let _ = server.wait();
    let pkts = cap.finish();
    let dropped = tx_dropped(&pair.a) - dropped_before;
    // The last daemon counts the flow under its tag: it took the counter slot
    // over with the maps (the first daemon gave it).
    let status = d.cli_ok(&["status"]);
    let per_tag = &status[status.find("\"per_tag\"").expect("per_tag in status")..];
    assert!(
        per_tag.contains("\"experiment\": 2") && per_tag.contains("\"activity\": 3"),
        "{status}"
    );
    let config = d.config.clone();
    let log3 = d.stop();
    let clean = pair
        .a
        .command(common::bin())
        .arg("-c")
        .arg(&config)
        .arg("clean")
        .output()
        .unwrap();
    assert!(clean.status.success(), "{clean:?}");
    assert_eq!(on_iface(&pair.a), before, "stop and clean left something");
    assert!(
        !pins
            .pin_dir()
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "pins left behind"
    );
    Some(Seen {
        packets: pkts.len(),
        unmarked: pkts
            .iter()
            .filter(|p| decode(p.flow_label).tag != Some(TAG))
            .count(),
        dropped,
        logs: vec![log1, log2, log3],
    })
}

fn check(attach: &str) {
    if !common::privileged() {
        return;
    }
    let Some(seen) = hand_over(attach) else {
        return;
    };
    let logs = seen.logs.join("\n----\n");
    assert!(
        seen.packets > 200,
        "too few packets captured: {}",
        seen.packets
    );
    assert_eq!(
        (seen.unmarked, seen.dropped),
        (0, 0),
        "{attach}: of {} packets, {} unmarked and {} dropped across a restart and an upgrade\n{logs}",
        seen.packets,
        seen.unmarked,
        seen.dropped
    );
    // The second start took the first one's marker over; the third replaced a
    // program that differs.
    assert!(logs.contains("adopting the pinned marker maps"), "{logs}");
    assert!(
        logs.contains("same program, swapped in atomically"),
        "{logs}"
    );
    assert!(
        logs.contains("program differs, replaced atomically"),
        "{logs}"
    );
}

#[test]
fn restart_and_upgrade_leave_no_gap_tcx() {
    check("tcx");
}

#[test]
fn restart_and_upgrade_leave_no_gap_clsact() {
    check("clsact");
}

/// SIGTERM leaves the marker attached and pinned for the next start;
/// `marker.detach_on_exit` makes every exit a real stop.
#[test]
fn sigterm_keeps_marking_detach_on_exit_removes_it() {
    if !common::privileged() || unpinned() {
        return;
    }
    for attach in attach_modes() {
        let dir = tempfile::tempdir().unwrap();
        let pair = Pair::new();
        let pins = BpfFs::new(dir.path());
        let before = on_iface(&pair.a);
        let d = Daemon::start(&pair.a, dir.path(), &marker_toml(attach, &pins));
        // The same configuration and state, then with detach_on_exit.
        let config = d.config.clone();
        let log = d.stop();
        assert!(on_iface(&pair.a).contains("flowd_mark"), "{attach}: {log}");
        assert!(pins.pin_dir().read_dir().unwrap().next().is_some());
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replacen("[marker]\n", "[marker]\ndetach_on_exit = true\n", 1),
        )
        .unwrap();
        let d = Daemon::start_config(&pair.a, dir.path(), &config);
        let log = d.stop();
        assert!(log.contains("marker adopted"), "{log}");
        assert_eq!(on_iface(&pair.a), before, "{attach}");
        assert!(pins.pin_dir().read_dir().unwrap().next().is_none());
    }
}

/// A second daemon on the same pinned state is refused, naming the holder.
#[test]
fn second_daemon_on_the_pinned_state_is_refused() {
    if !common::privileged() || unpinned() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let pins = BpfFs::new(dir.path());
    let ino = pair.a.inode();
    let toml = marker_toml("auto", &pins);
    let d = Daemon::start(
        &pair.a,
        dir.path(),
        &format!("{toml}detach_on_exit = true\n"),
    );
    // The netns lock refuses a second daemon in this namespace first; the pinned
    // state's lock is what a daemon reaching it some other way meets.
    let dir_lock = std::fs::File::open(pins.pin_dir().join(format!("net{ino}"))).unwrap();
    assert!(
        nix::fcntl::Flock::lock(dir_lock, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        "the pinned state is not locked while a daemon runs"
    );
    d.stop();
}

/// After SIGKILL the pinned TCX link (or the clsact filter) marks on; the next
/// start takes it over, and `clean` removes it and the pins.
#[test]
fn after_sigkill_the_next_start_adopts_and_clean_removes_all() {
    if !common::privileged() || unpinned() {
        return;
    }
    for attach in attach_modes() {
        let dir = tempfile::tempdir().unwrap();
        let pair = Pair::new();
        let pins = BpfFs::new(dir.path());
        let before = on_iface(&pair.a);
        let mut d = Daemon::start(&pair.a, dir.path(), &marker_toml(attach, &pins));
        d.signal(nix::sys::signal::Signal::SIGKILL);
        d.child.wait().unwrap();
        assert!(on_iface(&pair.a).contains("flowd_mark"), "{attach}");
        let config = d.config.clone();
        let d = Daemon::start_config(&pair.a, dir.path(), &config);
        let log = d.stop();
        assert!(log.contains("marker adopted"), "{attach}: {log}");
        assert!(
            log.contains("adopting the pinned marker maps"),
            "{attach}: {log}"
        );
        let out = d_clean(&pair.a, &config);
        assert!(out.contains("removed the pinned marker state"), "{out}");
        assert_eq!(on_iface(&pair.a), before, "{attach}");
        assert!(pins.pin_dir().read_dir().unwrap().next().is_none());
    }
}

/// TCX and clsact where the kernel has TCX; clsact alone where it does not (one
/// pass: under emulation every pass costs a minute).
fn attach_modes() -> &'static [&'static str] {
    use flowd::features::{Feature, KernelFeatures};
    if KernelFeatures::detect().has(Feature::Tcx) {
        &["tcx", "clsact"]
    } else {
        &["clsact"]
    }
}

fn d_clean(ns: &Netns, config: &Path) -> String {
    let out = ns
        .command(common::bin())
        .arg("-c")
        .arg(config)
        .arg("clean")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A first start that fails leaves no pins behind.
#[test]
fn a_failed_first_start_leaves_no_pins() {
    if !common::privileged() || unpinned() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let pins = BpfFs::new(dir.path());
    let toml = format!(
        "{}interfaces = [\"{IF_A}\", \"nope0\"]\n",
        marker_toml("auto", &pins)
    );
    let err = common::run_expecting_error(&pair.a, dir.path(), &toml, false);
    assert!(err.contains("nope0"), "{err}");
    let left: Vec<_> = pins.pin_dir().read_dir().unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
