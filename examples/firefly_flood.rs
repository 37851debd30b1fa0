//! Floods a running daemon's firefly listener with `start` fireflies, each naming
//! a different flow, and reports the daemon's RSS before, right after, and once
//! the grace time has passed (issue 14: a flood must not keep memory).
//!
//! `cargo run --example firefly_flood -- PID [COUNT] [TO] [WAIT_S]`
//! (defaults: 600000, 127.0.0.1:10514, 45 s). Run as root (or an allowed user).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use flowd::firefly::{Firefly, State};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::Tag;

fn rss_kib(pid: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon pid");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid = args
        .first()
        .expect("usage: firefly_flood PID [COUNT] [TO] [WAIT_S]");
    let count: u32 = args.get(1).map_or(600_000, |c| c.parse().unwrap());
    let to: SocketAddr = args
        .get(2)
        .map_or("127.0.0.1:10514".parse().unwrap(), |a| a.parse().unwrap());
    let wait: u64 = args.get(3).map_or(45, |w| w.parse().unwrap());
    println!("before: RSS {} KiB", rss_kib(pid, "VmRSS:"));
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tag = Tag::new(2, 4).unwrap();
    for i in 0..count {
        let key = FlowKey::new(
            Protocol::Tcp,
            SocketAddr::new(
                [10, 200, (i >> 16) as u8, (i >> 8) as u8].into(),
                1024 + (i & 0xff) as u16,
            ),
            "10.9.9.9:1094".parse().unwrap(),
        );
        let d = Firefly {
            state: State::Start,
            key,
            tag,
            start: SystemTime::now(),
            now: SystemTime::now(),
            end: None,
            usage: None,
            application: None,
        }
        .datagram(None);
        let _ = s.send_to(&d, to);
        // Let the receiver keep up a little, or the kernel drops most of them.
        if i % 256 == 255 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    println!(
        "after {count} fireflies: RSS {} KiB (peak {} KiB)",
        rss_kib(pid, "VmRSS:"),
        rss_kib(pid, "VmHWM:")
    );
    std::thread::sleep(Duration::from_secs(wait));
    println!("after {wait} s: RSS {} KiB", rss_kib(pid, "VmRSS:"));
}
