//! What `inspect` costs on the client side with 10 000 flows:
//! 1. the serialization of a `flows` reply (daemon side) and its parsing (client side),
//!    plus filtering and sorting;
//! 2. the live view refreshing once a second for 30 s (FLOWD_BENCH_SECS) against a
//!    fake daemon, run in a private tmux server: CPU% and RSS of the inspect process;
//! 3. `inspect --json` of 100 000 flows from a fake daemon that pages as the real one
//!    (5 000 a page): the client's peak RSS streaming (no --sort) and sorted.
//!
//! `cargo bench --bench inspect_client`; needs tmux for part 2 (skipped without).

#[path = "../tests/support/mod.rs"]
mod support;

use support::fake_daemon;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use flowd::api::filter::FlowFilter;
use flowd::api::view::FlowView;
use flowd::inspect::columns::{sorted_indices, Column};

const FLOWS: usize = 10_000;

fn time<T>(runs: u32, mut f: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    for _ in 0..runs {
        black_box(f());
    }
    start.elapsed() / runs
}

fn serialization() {
    let flows = fake_daemon::flows(FLOWS);
    let reply = serde_json::json!({"v": 1, "ok": true, "result": {"flows": &flows}});
    let bytes = serde_json::to_vec(&reply).unwrap();
    let ser = time(20, || serde_json::to_vec(&reply).unwrap());
    let ser_direct = time(20, || serde_json::to_vec(&flows).unwrap());
    // What main's engine does today: one Value per flow (view::flow), then the reply.
    let build_and_ser = time(20, || {
        let values: Vec<serde_json::Value> = flows
            .iter()
            .map(|f| serde_json::to_value(f).unwrap())
            .collect();
        serde_json::to_vec(&serde_json::json!({"v": 1, "ok": true, "result": {"flows": values}}))
            .unwrap()
    });
    let de = time(20, || {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v
    });
    let text = serde_json::to_vec(&flows).unwrap();
    let de_typed = time(20, || {
        serde_json::from_slice::<Vec<FlowView>>(&text).unwrap()
    });
    let filter = FlowFilter::parse("exp:atlas addr:2001:db8::/32 proc:xrd").unwrap();
    let filt = time(50, || flows.iter().filter(|f| filter.matches(f)).count());
    let sort = time(50, || sorted_indices(&flows, |_| true, Column::Bytes, true));
    let sort_text = time(20, || {
        sorted_indices(&flows, |_| true, Column::Remote, false)
    });
    println!("== serialization of {FLOWS} FlowViews");
    println!(
        "reply size                 {:>8.2} MiB ({} B per flow)",
        bytes.len() as f64 / 1048576.0,
        bytes.len() / FLOWS
    );
    println!("serialize (via Value)      {:>8.2} ms", ms(ser));
    println!("build Values + serialize   {:>8.2} ms", ms(build_and_ser));
    println!("serialize (typed)          {:>8.2} ms", ms(ser_direct));
    println!("parse to Value             {:>8.2} ms", ms(de));
    println!("parse to Vec<FlowView>     {:>8.2} ms", ms(de_typed));
    println!("filter (3 conditions)      {:>8.2} ms", ms(filt));
    println!("sort by bytes              {:>8.2} ms", ms(sort));
    println!("sort by remote address     {:>8.2} ms", ms(sort_text));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?;
    // CLK_TCK is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak RSS (KiB) and wall time of `flowd-rs inspect ARGS` against `sock`. VmHWM is
/// polled until the process exits: the kernel's own figure for a child (wait4's
/// ru_maxrss) also counts the bench's memory the child shared before its exec.
fn peak_rss(sock: &std::path::Path, args: &[&str]) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} inspect {} > /dev/null",
            support::flowd_rs(sock),
            args.join(" ")
        ))
        .spawn()
        .unwrap();
    let mut hwm = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "inspect {args:?}: {status}");
            return (hwm, t0.elapsed());
        }
        // Once sh has exec'd flowd-rs (its comm changes), VmHWM is flowd-rs's own.
        let comm =
            std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
        if comm.trim() == "flowd-rs" {
            hwm = hwm.max(status_kib(child.id(), "VmHWM:").unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn json_listing() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let _daemon = fake_daemon::FakeDaemon::start_paged(&sock, fake_daemon::flows(N), 5_000);
    println!("== inspect --json, {N} flows, pages of 5 000 (peak RSS of the client)");
    for args in [
        &["--json"][..],
        &["--json", "--sort", "bytes"],
        &["--json", "--sort", "bytes", "--top", "100"],
        &["--once", "--sort", "bytes", "--top", "100"],
    ] {
        let (kib, took) = peak_rss(&sock, args);
        println!(
            "{:<32} {:>8.1} MiB, {:.2} s",
            args.join(" "),
            kib as f64 / 1024.0,
            took.as_secs_f64()
        );
    }
}

fn live_view() {
    let secs: u64 = std::env::var("FLOWD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("== live view: SKIPPED (tmux not installed)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let daemon = fake_daemon::FakeDaemon::start(&sock, fake_daemon::flows(FLOWS));
    let tmux = format!("flowd-inspect-bench-{}", std::process::id());
    let cmd = format!(
        "exec {} inspect --interval-ms 1000",
        support::flowd_rs(&sock)
    );
    let run = |args: &[&str]| {
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&tmux)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    run(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "40",
        "-s",
        "b",
        &cmd,
    ]);
    let socket_path = run(&["display-message", "-p", "#{socket_path}"]);
    let pid: u32 = run(&["display-message", "-p", "-t", "b", "#{pane_pid}"])
        .parse()
        .unwrap();
    // Let it start and draw the first screen before measuring.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run(&["capture-pane", "-p", "-t", "b"]).contains("shown of 10000") {
        assert!(Instant::now() < deadline, "inspect did not show the flows");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu0 = cpu_secs(pid).unwrap();
    let t0 = Instant::now();
    let mut rss_max = 0;
    let mut rss_samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
        rss_max = rss_max.max(rss);
        rss_samples.push(rss);
    }
    let cpu = cpu_secs(pid).unwrap() - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    let requests = daemon.requests.lock().unwrap().len();
    run(&["send-keys", "-t", "b", "q"]);
    std::thread::sleep(Duration::from_millis(300));
    run(&["kill-server"]);
    let _ = std::fs::remove_file(socket_path);
    drop(daemon);
    println!("== live view, {FLOWS} flows, refresh 1 s, {wall:.0} s measured");
    println!(
        "CPU                        {:>8.1} % of one core ({cpu:.2} s)",
        100.0 * cpu / wall
    );
    println!(
        "RSS                        {:>8.1} MiB now, {:.1} MiB max sampled, {:.1} MiB peak (VmHWM)",
        *rss_samples.last().unwrap_or(&0) as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("requests served            {requests:>8} (status + flows per refresh)");
}

fn main() {
    // `cargo test --benches` runs bench targets with no argument to check they work;
    // keep that quick.
    if std::env::args().any(|a| a == "--bench") {
        serialization();
        live_view();
        json_listing();
    } else {
        println!("inspect_client: run with `cargo bench --bench inspect_client`");
    }
}
