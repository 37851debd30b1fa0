//! The daemon under a realistic load: N established TCP connections in its namespace
//! (all matched by policy), measured from outside through /proc:
//! idle CPU and RSS with N flows, then CPU while a client asks for every flow once a
//! second (what `flowd-rs inspect` does). Needs root; builds its own namespaces.
//!
//! `cargo bench --bench daemon -- [N]` (default 10 000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Pair, ADDR_B};
use flowd::inspect::client::Client;
use flowd::inspect::view::FlowFilter;

const PORT: u16 = 5400;

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The server half, run as a child process in the peer namespace: accepts `n`
/// connections and holds them until its stdin closes (fds are limited per process).
fn serve(n: usize) {
    let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), PORT)).unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let held: Vec<TcpStream> = (0..n).map(|_| l.accept().unwrap().0).collect();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
}

fn raise_fd_limit() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        raise_fd_limit();
        serve(args[2].parse().unwrap());
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the daemon bench creates namespaces and loads BPF: run it as root");
        std::process::exit(1);
    }
    raise_fd_limit();
    let n: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = dir.path().join("policies.d");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("atlas.toml"),
        format!("experiment = \"atlas\"\n[[rule]]\nname = \"bench\"\nactivity = \"Data Consolidation\"\nremote_ports = [{PORT}]\n"),
    )
    .unwrap();
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        // FLOWD_BENCH_MARKER: extra [marker] keys, e.g. "in_kernel_decisions = false".
        &format!(
            "[policy]\ndir = \"{}\"\n[metrics]\nenabled = false\n[marker]\n{}\n",
            policies.display(),
            std::env::var("FLOWD_BENCH_MARKER").unwrap_or_default()
        ),
    );
    let pid = d.child.id();
    let base_rss = rss_kib(pid, "VmRSS:");

    let mut server = Command::new("ip")
        .args(["netns", "exec", &pair.b.name])
        .arg(std::env::current_exe().unwrap())
        .args(["--serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let t0 = Instant::now();
    let clients = pair
        .a
        .run(move || {
            (0..n)
                .map(|_| TcpStream::connect(SocketAddr::new(ADDR_B.into(), PORT)).unwrap())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
    let connect_time = t0.elapsed();
    let client = Client::new(d.state_dir.join("control.sock"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.status().unwrap().flows_tagged < n {
        assert!(
            Instant::now() < deadline,
            "daemon never tagged all {n} flows"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tagged_after = t0.elapsed();

    let window = Duration::from_secs(20);
    let c0 = cpu_secs(pid);
    std::thread::sleep(window);
    let idle_cpu = (cpu_secs(pid) - c0) / window.as_secs_f64() * 100.0;
    let rss = rss_kib(pid, "VmRSS:");

    let c0 = cpu_secs(pid);
    let start = Instant::now();
    let mut reply_times = Vec::new();
    while start.elapsed() < window {
        let t = Instant::now();
        let flows = client.flows(&FlowFilter::default()).unwrap();
        reply_times.push(t.elapsed());
        assert!(flows.len() >= n);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let inspect_cpu = (cpu_secs(pid) - c0) / start.elapsed().as_secs_f64() * 100.0;
    reply_times.sort();
    let hwm = rss_kib(pid, "VmHWM:");
    let rss_after = rss_kib(pid, "VmRSS:");
    let st = client.status().unwrap();

    drop(clients);
    drop(server.stdin.take());
    let _ = server.wait();
    d.stop();

    println!(
        "daemon with {n} established, tagged TCP connections (2 cores, debug={})",
        cfg!(debug_assertions)
    );
    println!("  connections opened in {connect_time:.2?}; all tagged {tagged_after:.2?} after the first connect");
    println!("  idle CPU over {window:?}: {idle_cpu:.2} % of one core (sock_diag every 5 s, tracker idle)");
    println!("  RSS: {base_rss} KiB before connections, {rss} KiB with {n} flows, {rss_after} KiB after the listings, peak {hwm} KiB");
    println!(
        "  ({:.0} bytes of RSS per flow above the empty daemon)",
        (rss.saturating_sub(base_rss) * 1024) as f64 / n as f64
    );
    println!(
        "  while listing all flows once a second: {inspect_cpu:.2} % of one core; reply median {:.1?}, max {:.1?}",
        reply_times[reply_times.len() / 2],
        reply_times.last().unwrap()
    );
    println!(
        "  last sock_diag poll {:.1} ms; reconcile corrections +{} -{}",
        st.last_poll_ms, st.reconcile_added, st.reconcile_ended
    );
}
