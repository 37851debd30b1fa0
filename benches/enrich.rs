//! Bench: the cost of enriching `ongoing` fireflies, per flow per interval, at
//! 10 000 tagged flows: one targeted sock_diag request per flow (its 5-tuple, no
//! dump) for tcp_info and the congestion control, and rendering flowd-go's `netlink`
//! object (lean and full). Compared with one full sock_diag dump of the same
//! namespace, the alternative a dump-based enrichment would pay each interval.
//!
//! Run as root: `cargo bench --bench enrich` (`-- --flows N`). Everything lives in a
//! private network namespace that dies with the process. The 10 000 server ends wait
//! in the listener's accept queue, so the process holds only the client fds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use flowd::discovery::sockdiag::SockDiag;
use flowd::enrich::{render, Mode, TcpInfoQuery};
use flowd::model::socket::{FlowKey, Protocol};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flows = args
        .iter()
        .position(|a| a == "--flows")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000usize);
    if !common::privileged() {
        eprintln!("enrich bench: needs root (FLOWD_PRIVILEGED_TESTS=1)");
        return;
    }
    common::Netns::new("enb").enter(move || run(flows));
}

fn run(n: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    // Per namespace: room for every connection in the accept queue.
    std::fs::write("/proc/sys/net/core/somaxconn", format!("{}", n + 1024)).unwrap();
    std::fs::write(
        "/proc/sys/net/ipv4/tcp_max_syn_backlog",
        format!("{}", n + 1024),
    )
    .unwrap();
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    l.listen(n as i32 + 1024).unwrap();
    let dst = l.local_addr().unwrap().as_socket().unwrap();
    let conns: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(dst).expect("connect"))
        .collect();
    let keys: Vec<FlowKey> = conns
        .iter()
        .map(|c| FlowKey::new(Protocol::Tcp, c.local_addr().unwrap(), dst))
        .collect();
    println!("{n} established loopback connections (client ends queried)");

    let mut q = TcpInfoQuery::new().unwrap();
    let mut found = 0;
    for k in &keys {
        found += q.query(k).unwrap().is_some() as usize;
    }
    assert_eq!(found, n, "every flow answers");
    let rounds = 5;
    let t = Instant::now();
    let mut facts = Vec::with_capacity(n);
    for _ in 0..rounds {
        facts.clear();
        for k in &keys {
            facts.push(q.query(k).unwrap().unwrap());
        }
    }
    let query = t.elapsed().as_secs_f64() / (rounds * n) as f64;
    let mut sizes = [0usize; 2];
    let mut per = [0f64; 2];
    for (i, mode) in [Mode::Lean, Mode::Full].into_iter().enumerate() {
        let t = Instant::now();
        for _ in 0..rounds {
            for f in &facts {
                sizes[i] = render(f, mode).len();
            }
        }
        per[i] = t.elapsed().as_secs_f64() / (rounds * n) as f64;
    }
    let mut dump = SockDiag::new().unwrap();
    let mut out = Vec::new();
    let t = Instant::now();
    for _ in 0..rounds {
        dump.dump(&mut out).unwrap();
    }
    let dump_s = t.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "targeted request (tcp_info + cong): {:.2} us per flow; {:.1} ms per interval for {n} flows",
        query * 1e6,
        query * n as f64 * 1e3
    );
    println!(
        "render lean: {:.2} us per flow ({} bytes); full: {:.2} us per flow ({} bytes)",
        per[0] * 1e6,
        sizes[0],
        per[1] * 1e6,
        sizes[1]
    );
    println!(
        "total lean per flow per interval: {:.2} us; one full dump of the namespace ({} sockets): {:.1} ms",
        (query + per[0]) * 1e6,
        out.len(),
        dump_s * 1e3
    );
    // The floor: what one socket's facts cost when the kernel hands them all over in
    // one dump (the cheapest way to read tcp_info), against which a targeted request
    // per flow is compared.
    let floor = dump_s / out.len().max(1) as f64;
    println!(
        "floor (dump cost per socket): {:.2} us; lean enrichment per flow = {:.1} x floor",
        floor * 1e6,
        (query + per[0]) / floor
    );
}
