//! Tracker throughput: N loopback TCP connections (connect, accept, close) in a
//! private network namespace while a dedicated thread drains the ring buffer with
//! `Tracker::run_until` (the daemon's wiring). Reports, per ring size, the
//! connection rate reached, observations received vs. expected, and drops. Then the
//! cost of another namespace's churn to a reader that wants only its own namespace:
//! filtered in userspace (as before `only_netns`) or in the programs. Last, what
//! the tracker costs every other process: a 1-byte write() to /dev/null timed
//! with no tracker, the tracepoint-only tracker, the full tracker without and with
//! the UDP hooks (their tp_btf/sys_exit runs at every syscall exit of the host).
//!
//! `cargo bench --bench tracker_rate [-- CONNECTIONS]` as root (skips otherwise);
//! `-- syscalls` for the last part alone.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::Netns;
use flowd::discovery::tracker::{Tracker, TrackerConfig, TrackerMode};

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP tracker_rate: needs root");
        return;
    }
    if std::env::args().any(|a| a == "syscalls") {
        return syscall_cost();
    }
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let ns = Netns::new("trk");
    println!("tracker_rate: {n} connections per run, netns {}", ns.name);
    println!("-- as fast as possible, by ring size");
    header();
    for ring in [4096u32, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        run(&ns, ring, n, None);
    }
    for ring in [64u32 << 10, 256 << 10] {
        println!("-- paced, ring {ring} bytes: where do drops start?");
        header();
        for rate in [1000.0, 2000.0, 5000.0, 10000.0, 15000.0, 20000.0] {
            run(&ns, ring, n, Some(rate));
        }
    }
    let ours = Netns::new("trk");
    println!(
        "-- {n} connections in another namespace, the reader wanting only its own \
         (ring 1 MiB)"
    );
    println!(
        "{:<28} {:>10} {:>8} {:>14}",
        "filter", "records", "drops", "reader CPU ms"
    );
    for in_kernel in [false, true] {
        foreign(&ns, &ours, n, in_kernel);
    }
    syscall_cost();
}

/// Nanoseconds per 1-byte write() to /dev/null, the best of 5 rounds of 2M.
fn write_ns() -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let n = 2_000_000u32;
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                // SAFETY: a valid fd and a 1-byte buffer that outlives the call.
                unsafe { libc::write(f.as_raw_fd(), b"x".as_ptr().cast(), 1) };
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::MAX, f64::min)
}

/// What each tracker setting adds to every syscall of the host, against the same
/// run's floor (no tracker).
fn syscall_cost() {
    println!("-- a 1-byte write() to /dev/null, ns (best of 5 x 2M), with the tracker attached");
    let floor = write_ns();
    println!("{:<44} {:>8.1} {:>8}", "no tracker (floor)", floor, "1.00x");
    for (name, mode, udp) in [
        ("tracepoint-only", TrackerMode::TracepointOnly, false),
        ("full, udp = false (no sys_exit)", TrackerMode::Full, false),
        (
            "full, udp = true (sys_exit: UDP, accept)",
            TrackerMode::Full,
            true,
        ),
    ] {
        let t = Tracker::start(&TrackerConfig {
            mode,
            udp,
            ..TrackerConfig::default()
        })
        .expect("Tracker::start");
        let ns = write_ns();
        drop(t);
        println!(
            "{:<44} {:>8.1} {:>7.2}x (+{:.1} ns)",
            name,
            ns,
            ns / floor,
            ns - floor
        );
    }
    let again = write_ns();
    println!(
        "{:<44} {:>8.1} {:>7.2}x",
        "no tracker, again",
        again,
        again / floor
    );
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Churn in `churn`, a reader interested in `ours` only: with `in_kernel` the
/// programs drop the other namespace's sockets (`only_netns`), without it the
/// reader does, record by record.
fn foreign(churn: &Netns, ours: &Netns, n: usize, in_kernel: bool) {
    let mut t = Tracker::start(&TrackerConfig {
        ring_bytes: 1 << 20,
        only_netns: in_kernel.then(|| u32::try_from(ours.inode()).unwrap()),
        ..TrackerConfig::default()
    })
    .expect("Tracker::start");
    let stop = Arc::new(AtomicBool::new(false));
    let netns = ours.inode();
    let poller = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let cpu0 = thread_cpu();
            let (mut records, mut kept) = (0u64, 0u64);
            t.run_until(&stop, Duration::from_millis(20), &mut |o| {
                records += 1;
                kept += u64::from(o.netns == netns);
            })
            .expect("run_until");
            while t
                .poll(Duration::from_millis(50), &mut |o| {
                    records += 1;
                    kept += u64::from(o.netns == netns);
                })
                .expect("poll")
                > 0
            {}
            (
                records,
                kept,
                t.drops().expect("drops"),
                thread_cpu() - cpu0,
            )
        })
    };
    common::tracker::burst(churn, n);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (records, kept, drops, cpu) = poller.join().expect("poller thread");
    assert_eq!(kept, 0, "the churn is in another namespace");
    println!(
        "{:<28} {:>10} {:>8} {:>14.1}",
        if in_kernel {
            "in the programs (only_netns)"
        } else {
            "in userspace"
        },
        records,
        drops,
        cpu.as_secs_f64() * 1000.0
    );
}

fn header() {
    println!(
        "{:>10} {:>10} {:>12} {:>10} {:>10} {:>8} {:>10}",
        "ring", "conn/s", "obs/s", "obs", "expected", "drops", "obs/conn"
    );
}

fn run(ns: &Netns, ring_bytes: u32, n: usize, rate: Option<f64>) {
    let mut t = Tracker::start(&TrackerConfig {
        ring_bytes,
        ..TrackerConfig::default()
    })
    .expect("Tracker::start");
    let stop = Arc::new(AtomicBool::new(false));
    let netns = ns.inode();
    let poller = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = 0u64;
            t.run_until(&stop, Duration::from_millis(20), &mut |o| {
                if o.netns == netns {
                    seen += 1;
                }
            })
            .expect("run_until");
            // Drain what is left after the producer stopped.
            while t
                .poll(Duration::from_millis(50), &mut |o| {
                    if o.netns == netns {
                        seen += 1;
                    }
                })
                .expect("poll")
                > 0
            {}
            (seen, t.drops().expect("drops"))
        })
    };
    let elapsed = ns.enter(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        let start = Instant::now();
        for i in 0..n {
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / r);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let c = TcpStream::connect(to).unwrap();
            let (a, _) = l.accept().unwrap();
            drop((c, a));
        }
        start.elapsed()
    });
    // Let the last closes (FIN handshakes) happen before stopping.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (seen, drops) = poller.join().expect("poller thread");
    // Full-tuple observations per graceful connection: sockops connect, active
    // and passive established (3), tracepoint SYN_SENT->EST, LISTEN->SYN_RECV,
    // SYN_RECV->EST, EST->FIN_WAIT1, EST->CLOSE_WAIT, FIN_WAIT1->FIN_WAIT2,
    // CLOSE_WAIT->LAST_ACK, FIN_WAIT2->CLOSE, LAST_ACK->CLOSE (9): 12.
    let expected = 12 * n as u64;
    let secs = elapsed.as_secs_f64();
    println!(
        "{:>10} {:>10.0} {:>12.0} {:>10} {:>10} {:>8} {:>10.2}",
        ring_bytes,
        n as f64 / secs,
        seen as f64 / secs,
        seen,
        expected,
        drops,
        seen as f64 / n as f64
    );
}
