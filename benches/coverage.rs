//! First-packet coverage: N short TCP connections (~10 packets each) from namespace A
//! to a server in namespace B, with the daemon in A tagging them by policy; tcpdump on
//! B's end counts which of A's packets carry the right SciTags label. Run with
//! in-kernel decisions on and off (`marker.in_kernel_decisions`).
//!
//! `cargo bench --bench coverage [-- CONNECTIONS]` as root (skips otherwise). Traffic
//! stays inside the namespace pair it creates.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Capture, Daemon, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::model::tag::{decode, Tag};

const PORT: u16 = 5201;
const POLICY: &str = "experiment = \"atlas\"\n[[rule]]\nname = \"bench\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP coverage: needs root");
        return;
    }
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let want = Tag::new(
        2,
        flowd::policy::Registry::bundled()
            .activity(2, "Data Consolidation")
            .expect("bundled registry")
            .id,
    )
    .expect("tag");
    println!("coverage: {n} TCP connections of ~10 packets, policy remote_ports = [{PORT}]");
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "in_kernel_decisions", "packets", "labelled", "fraction", "SYNs ok", "seconds"
    );
    for in_kernel in [true, false] {
        run(n, in_kernel, want);
    }
}

fn run(n: usize, in_kernel: bool, want: Tag) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies.d");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("atlas.toml"), POLICY).unwrap();
    let pair = Pair::new();
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[marker]\nin_kernel_decisions = {in_kernel}\n",
            policies.display()
        ),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    // One connection more than measured: the first resolves B's link-layer address
    // (a SYN waiting on neighbour discovery would give userspace extra time).
    let server = pair.b.run(move || {
        let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), PORT)).unwrap();
        tx.send(()).unwrap();
        for _ in 0..=n {
            let (mut c, _) = l.accept().unwrap();
            let _ = c.read_to_end(&mut Vec::new());
            let _ = c.write_all(b"ok");
        }
    });
    rx.recv().unwrap();
    let one = || {
        let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), PORT)).unwrap();
        s.set_nodelay(true).unwrap();
        for _ in 0..4 {
            s.write_all(&[0x42; 100]).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    };
    pair.a.run(one).join().unwrap();
    let cap = Capture::start(
        &pair.b,
        IF_B,
        &format!("ip6 and tcp dst port {PORT}"),
        dir.path(),
    );
    let t0 = Instant::now();
    pair.a
        .run(move || {
            for _ in 0..n {
                one();
            }
        })
        .join()
        .unwrap();
    let took = t0.elapsed();
    server.join().unwrap();
    let pkts = cap.finish();
    // Let the daemon see the last closes before it is stopped.
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    let ours: Vec<_> = pkts
        .iter()
        .filter(|p| p.src.ip() == std::net::IpAddr::V6(ADDR_A) && p.dst.port() == PORT)
        .collect();
    let labelled = ours
        .iter()
        .filter(|p| decode(p.flow_label).tag == Some(want))
        .count();
    let syns: Vec<_> = ours
        .iter()
        .filter(|p| p.l3.get(40 + 13).is_some_and(|f| f & 0x12 == 0x02))
        .collect();
    let syns_ok = syns
        .iter()
        .filter(|p| decode(p.flow_label).tag == Some(want))
        .count();
    println!(
        "{:<22} {:>9} {:>9} {:>8.2}% {:>5}/{:<4} {:>10.2}",
        in_kernel,
        ours.len(),
        labelled,
        100.0 * labelled as f64 / ours.len().max(1) as f64,
        syns_ok,
        syns.len(),
        took.as_secs_f64()
    );
}
