//! Throughput over a veth pair with and without flowd-rs: iperf3 (single TCP stream,
//! IPv6) from namespace A to B, alternating runs without the daemon and with it
//! attached and marking the flow (label strategy, in-kernel decisions). Prints each
//! run and the ratio of medians. Needs root and iperf3; traffic stays in the pair.
//!
//! `cargo bench --bench throughput [-- SECONDS]` (default 5 s per run, 5 runs each).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Pair, ADDR_B};

const RUNS: usize = 5;

fn iperf(pair: &Pair, secs: u32) -> f64 {
    let mut server = pair
        .b
        .command("iperf3")
        .args(["-s", "-1", "-B", &ADDR_B.to_string(), "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = pair
        .a
        .command("iperf3")
        .args([
            "-6",
            "-c",
            &ADDR_B.to_string(),
            "-p",
            "5201",
            "-J",
            "-t",
            &secs.to_string(),
        ])
        .output()
        .unwrap();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP throughput: needs root");
        return;
    }
    let secs: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    if Command::new("iperf3").arg("--version").output().is_err() {
        println!("SKIP throughput: iperf3 not installed (bash .ci/setup installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = dir.path().join("policies.d");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("atlas.toml"),
        "experiment = \"atlas\"\n[[rule]]\nname = \"iperf\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n",
    )
    .unwrap();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut marked = 0;
    for _ in 0..RUNS {
        without.push(iperf(&pair, secs));
        let d = Daemon::start_with(
            &pair.a,
            dir.path(),
            // FLOWD_BENCH_CONFIG: extra sections, e.g. "[discovery]\ntracker = \"disabled\"".
            &format!(
                "[policy]\ndir = \"{}\"\n[metrics]\nenabled = false\n{}\n",
                policies.display(),
                std::env::var("FLOWD_BENCH_CONFIG").unwrap_or_default()
            ),
        );
        with.push(iperf(&pair, secs));
        let st: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
        marked += st["status"]["outcomes"]["marked"].as_u64().unwrap_or(0);
        d.stop();
    }
    assert!(
        marked > 0,
        "the daemon marked nothing: the comparison would be meaningless"
    );
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!("iperf3 -6 single stream over veth, {secs} s per run, {RUNS} runs each (Gbit/s)");
    println!(
        "  without flowd-rs: {}",
        without
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "  with flowd-rs:    {}",
        with.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "  ratio of medians: {:.3} (target >= 0.98); {marked} packets marked",
        b / a
    );
}
