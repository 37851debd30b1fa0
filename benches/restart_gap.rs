//! What a restart and an upgrade cost on the wire: a 100 Mbit/s iperf3 flow from A
//! to B, captured on B, while the daemon on A is restarted (SIGTERM, start) or
//! upgraded (the next daemon's marker program differs: FLOWD_TEST_MARKER_VARIANT),
//! for TCX and clsact, before (nothing pinned: every exit detaches, as
//! `--detach-on-exit` does) and after (the pinned marker handed over). Prints the
//! flow's packets left unmarked, A's tx_dropped, and the gap the unmarked share
//! of the flow amounts to. Needs root and iperf3; builds its own namespaces.
//!
//! `cargo bench --bench restart_gap`

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::live_flow::{tx_dropped, BpfFs, LiveFlow};
use common::{Capture, Daemon, Netns, Pair, IF_B};
use flowd::features::{Feature, KernelFeatures};
use flowd::model::tag::{decode, Tag};

const TAG: Tag = Tag {
    experiment: 2,
    activity: 3,
};
const CPORT: u16 = 45021;
const SPORT: u16 = 5211;
const SECS: u32 = 3;

const FLOW: LiveFlow = LiveFlow {
    cport: CPORT,
    sport: SPORT,
    tag: TAG,
};

struct Run {
    packets: usize,
    unmarked: usize,
    dropped: u64,
    secs: f64,
}

/// One flow, one restart (with `env` for the next daemon) a second into it.
fn run(attach: &str, pinned: bool, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let fs = BpfFs::new(dir.path());
    let pin_dir = if pinned {
        fs.pin_dir().display().to_string()
    } else {
        String::new()
    };
    let d = Daemon::start(
        &pair.a,
        dir.path(),
        &format!("attach = \"{attach}\"\npin_dir = \"{pin_dir}\"\n"),
    );
    FLOW.mark(&d);
    let dropped0 = tx_dropped(&pair.a);
    let cap = Capture::start(
        &pair.b,
        IF_B,
        &format!("ip6 and tcp and src port {CPORT}"),
        dir.path(),
    );
    let t0 = Instant::now();
    let (mut server, mut client) = FLOW.iperf(&pair, SECS);
    std::thread::sleep(Duration::from_secs(1));
    let (_, d) = d.restart(dir.path(), env);
    if !pinned {
        // Nothing handed over: the new daemon learns the flow again.
        FLOW.mark(&d);
    }
    client.wait().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let _ = server.wait();
    let pkts = cap.finish();
    let dropped = tx_dropped(&pair.a) - dropped0;
    let config = d.config.clone();
    d.stop();
    clean(&pair.a, &config);
    Run {
        packets: pkts.len(),
        unmarked: pkts
            .iter()
            .filter(|p| decode(p.flow_label).tag != Some(TAG))
            .count(),
        dropped,
        secs,
    }
}

fn clean(ns: &Netns, config: &Path) {
    let _ = ns
        .command(common::bin())
        .arg("-c")
        .arg(config)
        .arg("clean")
        .output();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut modes = vec!["clsact"];
    if KernelFeatures::detect().has(Feature::Tcx) {
        modes.insert(0, "tcx");
    }
    println!(
        "restart gap: iperf3 at 100 Mbit/s for {SECS} s, the daemon restarted 1 s in; \
         gap = unmarked share x flow duration"
    );
    println!(
        "{:<7} {:<8} {:<30} {:>8} {:>9} {:>8} {:>9}",
        "attach", "event", "daemon", "packets", "unmarked", "dropped", "gap"
    );
    for attach in &modes {
        for (event, env) in [
            ("restart", vec![]),
            ("upgrade", vec![("FLOWD_TEST_MARKER_VARIANT", "1")]),
        ] {
            for (pinned, what) in [
                (false, "before: unpinned, detach"),
                (true, "after: pinned, handed over"),
            ] {
                let r = run(attach, pinned, &env);
                let gap_ms = r.unmarked as f64 / r.packets.max(1) as f64 * r.secs * 1000.0;
                println!(
                    "{attach:<7} {event:<8} {what:<30} {:>8} {:>9} {:>8} {:>6.0} ms",
                    r.packets, r.unmarked, r.dropped, gap_ms
                );
            }
        }
    }
}
