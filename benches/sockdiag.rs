//! Bench: dump + diff cost of the sock_diag poller and flow table at 5 000, 10 000,
//! 50 000 and 100 000 established loopback TCP connections (each has two sockets in
//! the dump, so 5 000 / 50 000 connections are 10 000 / 100 000 sockets), with
//! `ss -tan` / `ss -tin` timed in the same namespace for comparison; then the
//! reconcile the way the daemon makes it (dump in parts, `dump_part`,
//! `dump_complete`) from sock_diag and from the BPF socket iterator, interleaved,
//! with their ratios to each other and to `ss -tan` of the same run; and the verify
//! walk that replaces most periodic full dumps (digests folded in the kernel,
//! compared with the table's).
//!
//! Run as root: `cargo bench --bench sockdiag` (`-- --max 10000` for the small case
//! only). Everything lives in a private network namespace that dies with the process.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use flowd::discovery::sockdiag::SockDiag;
use flowd::discovery::sockiter::SockIter;
use flowd::flows::{FlowTable, FlowTableConfig};
use flowd::model::socket::SocketObservation;

/// Counts heap allocations so the dump's allocation cost can be reported.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds relaxed counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(l.size() as u64, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(n as u64, Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RUNS: usize = 9;

fn allocs() -> (u64, u64) {
    (ALLOCS.load(Relaxed), BYTES.load(Relaxed))
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn time_cmd(args: &[&str]) -> (Duration, Duration) {
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let st = Command::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .status()
            .expect("run ss");
        assert!(st.success());
        v.push(t.elapsed());
    }
    stats(v)
}

/// Sockets per part of a dump, as the daemon's poller (discovery/feeds.rs DUMP_PART).
const DUMP_PART: usize = 2048;

/// A full dump in parts: `(chunk, emit)`, as `SockDiag::dump_chunked` and
/// `SockIter::dump_chunked`.
type ChunkedDump<'a> = &'a mut dyn FnMut(usize, &mut dyn FnMut(&mut Vec<SocketObservation>));

/// One reconcile as the daemon makes it: the poller thread dumps and sends each
/// part down a bounded channel (discovery/feeds.rs), the engine's thread digests it
/// with `dump_part` meanwhile, then `dump_complete`. Its duration (from the start
/// of the dump to the end of `dump_complete`) and event count.
fn daemon_round(dump: ChunkedDump<'_>, table: &mut FlowTable) -> (Duration, usize) {
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<SocketObservation>>(64);
    let events = std::thread::scope(|s| {
        let engine = s.spawn(|| {
            let mut events = 0;
            for part in rx {
                events += table.dump_part(&part).len();
            }
            events + table.dump_complete(started).len()
        });
        dump(DUMP_PART, &mut |part| {
            tx.send(std::mem::take(part)).expect("engine thread");
        });
        drop(tx);
        engine.join().expect("engine thread")
    });
    (started.elapsed(), events)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

/// `RUNS` reconciles from sock_diag and from the iterator, in turn (the machine's
/// load then weighs on both alike), each into its own table: their durations.
fn interleaved(
    sd: &mut SockDiag,
    it: &mut SockIter,
    t_sd: &mut FlowTable,
    t_it: &mut FlowTable,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut by_sd = |chunk: usize, emit: &mut dyn FnMut(&mut Vec<SocketObservation>)| {
        sd.dump_chunked(chunk, emit).expect("sock_diag dump")
    };
    let mut by_it = |chunk: usize, emit: &mut dyn FnMut(&mut Vec<SocketObservation>)| {
        it.dump_chunked(chunk, emit).expect("iterator dump")
    };
    let (mut v_sd, mut v_it) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (d, ev) = daemon_round(&mut by_sd, t_sd);
        assert_eq!(ev, 0, "sock_diag steady state");
        v_sd.push(d);
        let (d, ev) = daemon_round(&mut by_it, t_it);
        assert_eq!(
            ev, 0,
            "iterator steady state: the same sockets, the same cookies"
        );
        v_it.push(d);
    }
    (v_sd, v_it)
}

/// A verify walk as the daemon makes it: the engine thread folds the table
/// (`verify_begin`) while the poller thread walks (`SockIter::verify`), then
/// `verify_end`. Its duration, and that of the walk alone.
fn verify_round(it: &mut SockIter, table: &mut FlowTable, sockets: usize) -> (Duration, Duration) {
    let started = Instant::now();
    let seed = it.digest_seed();
    let (walk, digest) = std::thread::scope(|s| {
        let engine = s.spawn(|| assert!(table.verify_begin(seed).is_empty()));
        let digest = it.verify().expect("verify walk");
        let walk = started.elapsed();
        engine.join().expect("engine thread");
        (walk, digest)
    });
    let outcome = table.verify_end(Some(&digest));
    let took = started.elapsed();
    assert_eq!(
        outcome,
        flowd::flows::VerifyOutcome::Verified {
            connections: sockets as u64,
            excused: 0
        }
    );
    (took, walk)
}

/// The daemon's reconcile from sock_diag and from the iterator, with and without
/// tcp_info (the poller asks for it on every 4th dump, or every dump when dumps are
/// rare), and the ratios to `ss -tan` of the same run.
fn compare_sources(
    sockets: usize,
    sd: &mut SockDiag,
    it: &mut SockIter,
    empty_it: &mut SockIter,
    ss: (Duration, Duration),
) {
    let table = || {
        FlowTable::new(FlowTableConfig {
            netns: sd.netns(),
            ..FlowTableConfig::default()
        })
    };
    let (mut t_sd, mut t_it) = (table(), table());
    // The first round adopts every socket (one Started event each).
    {
        let mut by_sd = |chunk: usize, emit: &mut dyn FnMut(&mut Vec<SocketObservation>)| {
            sd.dump_chunked(chunk, emit).expect("sock_diag dump")
        };
        assert_eq!(daemon_round(&mut by_sd, &mut t_sd).1, sockets);
        let mut by_it = |chunk: usize, emit: &mut dyn FnMut(&mut Vec<SocketObservation>)| {
            it.dump_chunked(chunk, emit).expect("iterator dump")
        };
        assert_eq!(daemon_round(&mut by_it, &mut t_it).1, sockets);
    }
    let (v_sd, v_it) = interleaved(sd, it, &mut t_sd, &mut t_it);
    let st = *it.stats();
    let (mut v_verify, mut v_walk, mut v_fold) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (took, walk) = verify_round(it, &mut t_it, sockets);
        v_verify.push(took);
        v_walk.push(walk);
        let t = Instant::now();
        t_it.verify_begin(1);
        v_fold.push(t.elapsed());
        t_it.verify_end(None);
    }
    sd.set_tcp_info(false);
    it.set_tcp_info(false);
    let (n_sd, n_it) = interleaved(sd, it, &mut t_sd, &mut t_it);
    sd.set_tcp_info(true);
    it.set_tcp_info(true);
    let mut v_empty = Vec::new();
    let mut none = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        empty_it.dump(&mut none).expect("empty iterator dump");
        v_empty.push(t.elapsed());
    }
    let (sd_min, sd_med) = stats(v_sd);
    let (it_min, it_med) = stats(v_it);
    let (nsd_min, nsd_med) = stats(n_sd);
    let (nit_min, nit_med) = stats(n_it);
    let (e_min, e_med) = stats(v_empty);
    let (vf_min, vf_med) = stats(v_verify);
    let (vw_min, vw_med) = stats(v_walk);
    let (fo_min, fo_med) = stats(v_fold);
    println!("  reconcile as the daemon makes it (poller thread: dump in parts of {DUMP_PART}; engine thread: dump_part, dump_complete; {RUNS} rounds each, interleaved):");
    println!(
        "    sock_diag, tcp_info:     min {} median {}",
        ms(sd_min),
        ms(sd_med)
    );
    println!(
        "    BPF iterator, tcp_info:  min {} median {} (last walk: {} in read() over {} reads, {} KiB)",
        ms(it_min),
        ms(it_med),
        ms(st.last_dump_io),
        st.last_dump_recvs,
        st.last_dump_bytes / 1024
    );
    println!(
        "    without tcp_info: sock_diag min {} median {}; BPF iterator min {} median {}",
        ms(nsd_min),
        ms(nsd_med),
        ms(nit_min),
        ms(nit_med)
    );
    println!(
        "    BPF iterator of an empty namespace (these sockets elsewhere): min {} median {}",
        ms(e_min),
        ms(e_med)
    );
    println!(
        "    verify walk (digests, no records; the table folded meanwhile): min {} median {} (walk alone min {} median {}; table sweep and fold alone min {} median {})",
        ms(vf_min),
        ms(vf_med),
        ms(vw_min),
        ms(vw_med),
        ms(fo_min),
        ms(fo_med)
    );
    println!(
        "    verify/iterator {} verify/sock_diag {} verify/ss -tan {}",
        ratio(vf_med, it_med),
        ratio(vf_med, sd_med),
        ratio(vf_med, ss.1)
    );
    println!(
        "    ratios of medians: iterator/sock_diag {} ({} without tcp_info), iterator/ss -tan {}, sock_diag/ss -tan {} (ss -tan median {})",
        ratio(it_med, sd_med),
        ratio(nit_med, nsd_med),
        ratio(it_med, ss.1),
        ratio(sd_med, ss.1),
        ms(ss.1)
    );
}

fn measure(
    conns: usize,
    sd: &mut SockDiag,
    empty: &mut SockDiag,
    it: &mut SockIter,
    empty_it: &mut SockIter,
) {
    let mut buf = Vec::new();
    sd.dump(&mut buf).expect("warm-up dump");
    let sockets = buf.len();
    let mut dumps = Vec::new();
    let mut diffs = Vec::new();
    let mut table = FlowTable::new(FlowTableConfig {
        netns: sd.netns(),
        ..FlowTableConfig::default()
    });
    let t = Instant::now();
    let ev = table.reconcile(&buf, Instant::now());
    let first_diff = t.elapsed();
    assert_eq!(ev.len(), sockets);
    drop(ev);
    let (a0, b0) = allocs();
    let hwm0 = vm_hwm_kib();
    let mut dump_allocs = (0, 0);
    for i in 0..RUNS {
        let started = Instant::now();
        let (a, b) = allocs();
        sd.dump(&mut buf).expect("dump");
        let d = started.elapsed();
        let (a2, b2) = allocs();
        if i == 0 {
            dump_allocs = (a2 - a, b2 - b);
        }
        let t = Instant::now();
        let ev = table.reconcile(&buf, started);
        diffs.push(t.elapsed());
        dumps.push(d);
        assert!(ev.is_empty(), "steady state: no events, got {}", ev.len());
        assert_eq!(buf.len(), sockets);
    }
    let (a1, b1) = allocs();
    let st = *sd.stats();
    let mut noinfo = Vec::new();
    sd.set_tcp_info(false);
    for _ in 0..RUNS {
        let t = Instant::now();
        sd.dump(&mut buf).expect("dump");
        noinfo.push(t.elapsed());
    }
    sd.set_tcp_info(true);
    let (nmin, nmed) = stats(noinfo);
    let totals: Vec<Duration> = dumps.iter().zip(&diffs).map(|(a, b)| *a + *b).collect();
    let (dmin, dmed) = stats(dumps);
    let (fmin, fmed) = stats(diffs);
    let (tmin, tmed) = stats(totals);
    let mut nothing = Vec::new();
    let mut none = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        empty.dump(&mut none).expect("empty dump");
        nothing.push(t.elapsed());
    }
    let (emin, emed) = stats(nothing);
    let (ss_min, ss_med) = time_cmd(&["ss", "-tan"]);
    // The same walk with a kernel-side filter (INET_DIAG_REQ_BYTECODE) that matches
    // nothing: what filtering in the kernel can save at best.
    let (ssf_min, ssf_med) = time_cmd(&["ss", "-tan", "sport = :1"]);
    let (ssi_min, ssi_med) = time_cmd(&["ss", "-tin"]);
    println!("== {conns} established connections ({sockets} sockets in the dump) ==");
    println!(
        "  dump (TCP+UDP, v4+v6, tcp_info): min {} median {}",
        ms(dmin),
        ms(dmed)
    );
    println!(
        "    of which in recv (kernel): {} over {} recvs, {} KiB",
        ms(st.last_dump_io),
        st.last_dump_recvs,
        st.last_dump_bytes / 1024
    );
    println!(
        "  dump without tcp_info:            min {} median {}",
        ms(nmin),
        ms(nmed)
    );
    println!(
        "  diff (steady-state reconcile):    min {} median {}",
        ms(fmin),
        ms(fmed)
    );
    println!(
        "  dump + diff:                      min {} median {}",
        ms(tmin),
        ms(tmed)
    );
    println!(
        "  dump of an empty namespace (these sockets elsewhere): min {} median {}",
        ms(emin),
        ms(emed)
    );
    println!(
        "  reconcile CPU, dump+diff median per interval: every 5 s {:.3} % of a core, every 60 s {:.4} %",
        tmed.as_secs_f64() / 5.0 * 100.0,
        tmed.as_secs_f64() / 60.0 * 100.0
    );
    println!(
        "  first reconcile (adopt all, {sockets} Started events): {}",
        ms(first_diff)
    );
    println!(
        "  ss -tan: min {} median {}   ss -tin: min {} median {}   ss -tan with a kernel filter matching nothing: min {} median {}",
        ms(ss_min),
        ms(ss_med),
        ms(ssi_min),
        ms(ssi_med),
        ms(ssf_min),
        ms(ssf_med)
    );
    println!(
        "  allocations in one steady dump: {} ({} bytes); in {RUNS} dumps+diffs: {} ({} bytes)",
        dump_allocs.0,
        dump_allocs.1,
        a1 - a0,
        b1 - b0
    );
    println!(
        "  observation Vec: {} bytes ({} B each); VmHWM {} -> {} KiB",
        buf.capacity() * std::mem::size_of_val(&buf[0]),
        std::mem::size_of_val(&buf[0]),
        hwm0,
        vm_hwm_kib()
    );
    compare_sources(sockets, sd, it, empty_it, (ss_min, ss_med));
}

/// Connections per helper process: the hard RLIMIT_NOFILE here is 20 000 and
/// CAP_SYS_RESOURCE is not granted, so sockets are spread over helper processes (each
/// holds both ends of its connections) in the same namespace.
const PER_HELPER: usize = 9_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .skip_while(|a| *a != name)
            .nth(1)
            .and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(n) = arg("--hold") {
        return hold(n);
    }
    let max = arg("--max").unwrap_or(100_000);
    if !common::privileged() {
        return;
    }
    // An empty namespace: its dump walks the same global hash and finds nothing.
    let empty = common::Netns::new("sde");
    let mut empty_sd = SockDiag::in_netns(empty.path()).expect("sock_diag in the empty netns");
    let mut empty_it =
        SockIter::in_netns(empty.path()).expect("socket iterator in the empty netns");
    common::Netns::new("sdb").enter(move || run(max, &mut empty_sd, &mut empty_it));
    drop(empty);
}

/// Helper mode: open `n` loopback connections to a private listener, say "ready",
/// hold them until stdin closes.
fn hold(n: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    let l = TcpListener::bind("127.0.0.1:0").expect("helper listener");
    let dst = l.local_addr().unwrap();
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        // std listens with a backlog of 128: stay below it.
        let batch = (n - conns.len()).min(100);
        let clients: Vec<TcpStream> = (0..batch)
            .map(|_| TcpStream::connect(dst).expect("connect"))
            .collect();
        for c in clients {
            conns.push((c, l.accept().expect("accept").0));
        }
    }
    println!("ready");
    let mut sink = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
}

fn run(max: usize, empty: &mut SockDiag, empty_it: &mut SockIter) {
    use std::io::BufRead;
    // Per-namespace sysctls: a wide ephemeral range and a deep accept queue.
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000").expect("port range");
    let _ = std::fs::write("/proc/sys/net/core/somaxconn", "8192");
    let exe = std::env::current_exe().expect("own path");
    let mut helpers = Vec::new();
    let mut total = 0;
    let mut sd = SockDiag::new().expect("sock_diag socket");
    let mut it = SockIter::new().expect("loading the socket iterators");
    for target in [5_000, 10_000, 50_000, 100_000]
        .into_iter()
        .filter(|t| *t <= max)
    {
        let t = Instant::now();
        let mut started = Vec::new();
        while total < target {
            let n = (target - total).min(PER_HELPER);
            // Spawned from this thread, so the child starts in this namespace.
            let mut child = Command::new(&exe)
                .args(["--hold", &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn helper");
            let out = child.stdout.take().unwrap();
            started.push((child, out));
            total += n;
        }
        for (child, out) in started {
            let mut line = String::new();
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .expect("helper output");
            assert_eq!(line.trim(), "ready", "helper failed");
            helpers.push(child);
        }
        eprintln!(
            "set up {target} connections in {:?} ({} helpers)",
            t.elapsed(),
            helpers.len()
        );
        measure(target, &mut sd, empty, &mut it, empty_it);
    }
    let t = Instant::now();
    for mut h in helpers {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    eprintln!("teardown in {:?}", t.elapsed());
}
