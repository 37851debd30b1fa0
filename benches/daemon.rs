//! The daemon under a realistic load: N established TCP connections in its namespace
//! (all matched by policy), measured from outside through /proc:
//! idle CPU and RSS with N flows, then CPU while a client asks for every flow once a
//! second (what `flowd-rs inspect` does). Needs root; builds its own namespaces.
//!
//! The peer side never accepts: the handshakes complete into the listeners' accept
//! queues, so it needs no fds, and the clients are spread over helper processes
//! (RLIMIT_NOFILE is 20 000 here) and over several server ports (a port pair is
//! needed per connection). The tracker is host-wide: the daemon's table also holds
//! the peer's N sockets, as `flows in table` shows.
//!
//! `cargo bench --bench daemon -- [N]` (default 100 000). FLOWD_BENCH_DISCOVERY adds
//! [discovery] keys (e.g. `full_dump_interval_s = 0`, a dump every 5 s as before
//! the tracker-driven schedule); FLOWD_BENCH_IDLE_S sets the idle window (default
//! 65 s: one safety-interval dump included).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Daemon, Pair, ADDR_B};
use flowd::api::client::Client;
use flowd::api::filter::FlowFilter;

const PORT: u16 = 5400;
/// Server ports: 60 000 ephemeral ports each.
const PORTS: u16 = 4;
/// Connections per helper process (below the fd limit).
const PER_HOLDER: usize = 15_000;

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

/// A helper process in the daemon's namespace: opens `n` connections spread over the
/// server ports, says "ready", and holds them until its stdin closes.
fn hold(n: usize, first: usize) {
    let conns: Vec<TcpStream> = (first..first + n)
        .map(|i| {
            let port = PORT + (i % usize::from(PORTS)) as u16;
            TcpStream::connect(SocketAddr::new(ADDR_B.into(), port)).unwrap()
        })
        .collect();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(conns);
}

/// Listeners in the peer namespace with room for every connection in their accept
/// queues; never accepted.
fn listeners(pair: &Pair, n: usize) -> Vec<socket2::Socket> {
    pair.b
        .sh(&format!("sysctl -qw net.core.somaxconn={}", n + 1024));
    pair.a
        .sh("sysctl -qw net.ipv4.ip_local_port_range=\"1024 65535\"");
    let backlog = (n / usize::from(PORTS) + 1024) as i32;
    pair.b
        .run(move || {
            (0..PORTS)
                .map(|i| {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
                            .unwrap();
                    s.bind(&SocketAddr::new(ADDR_B.into(), PORT + i).into())
                        .unwrap();
                    s.listen(backlog).unwrap();
                    s
                })
                .collect()
        })
        .join()
        .unwrap()
}

fn raise_fd_limit() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hold") {
        raise_fd_limit();
        hold(args[2].parse().unwrap(), args[3].parse().unwrap());
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
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = dir.path().join("policies.d");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("atlas.toml"),
        format!("experiment = \"atlas\"\n[[rule]]\nname = \"bench\"\nactivity = \"Data Consolidation\"\nremote_ports = [\"{PORT}-{}\"]\n", PORT + PORTS - 1),
    )
    .unwrap();
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        // FLOWD_BENCH_MARKER: extra [marker] keys, e.g. "in_kernel_decisions = false".
        &format!(
            "[policy]\ndir = \"{}\"\n[metrics]\nenabled = false\n[marker]\n{}\n[discovery]\n{}\n",
            policies.display(),
            std::env::var("FLOWD_BENCH_MARKER").unwrap_or_default(),
            std::env::var("FLOWD_BENCH_DISCOVERY").unwrap_or_default()
        ),
    );
    let pid = d.child.id();
    let base_rss = rss_kib(pid, "VmRSS:");

    let listeners = listeners(&pair, n);
    let t0 = Instant::now();
    let mut holders: Vec<std::process::Child> = (0..n.div_ceil(PER_HOLDER))
        .map(|h| {
            let first = h * PER_HOLDER;
            let count = PER_HOLDER.min(n - first);
            let mut c = pair
                .a
                .command(std::env::current_exe().unwrap().to_str().unwrap())
                .args(["--hold", &count.to_string(), &first.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut ready = String::new();
            std::io::BufReader::new(c.stdout.take().unwrap())
                .read_line(&mut ready)
                .unwrap();
            assert_eq!(ready.trim(), "ready", "helper {h} failed");
            c
        })
        .collect();
    let connect_time = t0.elapsed();
    let client = Client::new(d.state_dir.join("control.sock"));
    let deadline = Instant::now() + Duration::from_secs(180);
    while client.status().unwrap().flows_tagged < n {
        assert!(
            Instant::now() < deadline,
            "daemon never tagged all {n} flows"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tagged_after = t0.elapsed();

    let idle_window = Duration::from_secs(
        std::env::var("FLOWD_BENCH_IDLE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(65),
    );
    let c0 = cpu_secs(pid);
    std::thread::sleep(idle_window);
    let idle_cpu = (cpu_secs(pid) - c0) / idle_window.as_secs_f64() * 100.0;
    let idle_status = client.status().unwrap();
    let window = Duration::from_secs(20);
    let rss = rss_kib(pid, "VmRSS:");

    let c0 = cpu_secs(pid);
    let start = Instant::now();
    let mut reply_times = Vec::new();
    let mut reply_bytes = 0;
    while start.elapsed() < window {
        let t = Instant::now();
        let flows = client.flows(&FlowFilter::default()).unwrap();
        reply_times.push(t.elapsed());
        assert!(flows.len() >= n);
        reply_bytes = serde_json::to_vec(&flows).unwrap().len();
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let inspect_cpu = (cpu_secs(pid) - c0) / start.elapsed().as_secs_f64() * 100.0;
    reply_times.sort();
    let hwm = rss_kib(pid, "VmHWM:");
    // After one more reconcile: the daemon hands free memory back once per interval.
    std::thread::sleep(Duration::from_secs(6));
    let rss_after = rss_kib(pid, "VmRSS:");
    // The same listing in one reply, as clients before paging ask for it: the
    // reference the paged figures are compared with, in the same daemon (its peak
    // RSS is a high-water mark, so this runs last).
    let mut unpaged_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        #[derive(serde::Deserialize)]
        struct Flows {
            flows: Vec<flowd::api::view::FlowView>,
        }
        let v: Flows = client
            .call(serde_json::json!({"op": "flows", "filter": {}}))
            .unwrap();
        unpaged_times.push(t.elapsed());
        assert!(v.flows.len() >= n);
        drop(v);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(unpaged_times[0]));
    }
    unpaged_times.sort();
    let hwm_unpaged = rss_kib(pid, "VmHWM:");
    let st = client.status().unwrap();

    for h in &mut holders {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    drop(listeners);
    d.stop();

    println!(
        "daemon with {n} established, tagged TCP connections, {} flows in its table (2 cores, debug={})",
        st.flows_total,
        cfg!(debug_assertions)
    );
    println!("  connections opened in {connect_time:.2?}; all tagged {tagged_after:.2?} after the first connect");
    println!("  idle CPU over {idle_window:?}: {idle_cpu:.2} % of one core (tracker idle; discovery: {:?})", std::env::var("FLOWD_BENCH_DISCOVERY").unwrap_or_default());
    let v = &idle_status.verify_walks;
    println!(
        "  reconciles by then: verify walks {} verified, {} mismatch, {} inconclusive, {} failed (last {} connections, {:.1} ms); last full dump {:.1} ms from {}",
        v.verified,
        v.mismatch,
        v.inconclusive,
        v.failed,
        v.last_connections,
        v.last_ms,
        idle_status.last_poll_ms,
        idle_status.dump_source
    );
    println!("  RSS: {base_rss} KiB before connections, {rss} KiB with {n} flows, {rss_after} KiB one interval after the listings, peak {hwm} KiB (during paged listings)");
    println!(
        "  unpaged listing (one reply, as before paging): median {:.1?}, max {:.1?}; peak RSS {hwm_unpaged} KiB",
        unpaged_times[unpaged_times.len() / 2],
        unpaged_times.last().unwrap()
    );
    println!(
        "  ({:.0} bytes of RSS per flow above the empty daemon)",
        (rss.saturating_sub(base_rss) * 1024) as f64 / n as f64
    );
    println!(
        "  while listing all flows once a second: {inspect_cpu:.2} % of one core; reply median {:.1?}, max {:.1?}, ~{} bytes per flow",
        reply_times[reply_times.len() / 2],
        reply_times.last().unwrap(),
        reply_bytes / n
    );
    println!(
        "  last sock_diag poll {:.1} ms; reconcile corrections +{} -{}; tracker ring drops {}, recursion misses {:?} (host-wide), STATE_CB reports {}, dumps asked for by the tracker {}",
        st.last_poll_ms,
        st.reconcile_added,
        st.reconcile_ended,
        st.ringbuf_drops,
        st.tracker_recursion_misses,
        st.tracker_state_cb_events,
        st.reconcile_dumps_requested
    );
}
