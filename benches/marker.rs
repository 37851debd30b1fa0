//! Per-packet cost of the TC marker, measured with BPF_PROG_TEST_RUN (the kernel runs
//! the program `REPEAT` times on one packet and reports the mean), beside an empty TC
//! program measured in the same run: the harness floor. Needs root.
//!
//! `cargo bench --bench marker` prints a table; numbers are ns per packet, median of
//! `ROUNDS` rounds.

use std::net::{Ipv6Addr, SocketAddr};

use flowd::config::Strategy;
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::Tag;
use libbpf_rs::{ProgramInput, ProgramMut};

const REPEAT: u32 = 2_000_000;
const ROUNDS: usize = 7;

fn frame(v6: bool, sport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&5201u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend(std::iter::repeat_n(0x5a, 1400));
    if v6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets());
        f.extend_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets());
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    }
    f.extend(tcp);
    f
}

fn key(sport: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(), sport),
        SocketAddr::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into(), 5201),
    )
}

/// Median ns per run over ROUNDS rounds of REPEAT runs.
fn cost(prog: &ProgramMut<'_>, data: &[u8]) -> f64 {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let mut out = vec![0u8; data.len() + 64];
            let input = ProgramInput {
                data_in: Some(data),
                data_out: Some(&mut out),
                repeat: REPEAT,
                ..Default::default()
            };
            prog.test_run(input)
                .expect("BPF_PROG_TEST_RUN")
                .duration
                .as_nanos() as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[ROUNDS / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the marker bench loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let capacity = 65_536;
    // As the daemon runs by default (marker.in_kernel_decisions = true): the decision
    // sits on the miss path only, the hit path must not pay for it. The socket cache
    // (marker.socket_cache, default on) serves a socket's packets after its first;
    // BPF_PROG_TEST_RUN gives every run one dummy socket, so repeats hit it. The
    // second object has it off: every packet is looked up in the map, as a flow's
    // first packet, or a packet with no local socket (forwarded), is.
    let load_with = |socket_cache: bool| {
        load(&LoadOptions {
            strategy: Strategy::LABEL,
            map_capacity: capacity,
            with_empty_program: true,
            in_kernel: true,
            socket_cache,
            ..Default::default()
        })
        .expect("load marker")
    };
    let cached = load_with(true);
    let uncached = load_with(false);
    let maps = [
        maps_of(&cached, capacity).unwrap(),
        maps_of(&uncached, capacity).unwrap(),
    ];
    let tag = Tag::new(2, 4).unwrap();
    for m in &maps {
        m.insert(&key(40000), tag, 7).unwrap();
    }

    let empty = &cached.progs.flowd_empty;
    let v6_hit = frame(true, 40000);
    let v6_miss = frame(true, 40001);
    let v4 = frame(false, 40000);

    println!("TC marker cost per packet (BPF_PROG_TEST_RUN, {REPEAT} repeats, median of {ROUNDS}), {} cores", num_cpus());
    println!("{:<58} {:>9} {:>14}", "case", "ns/pkt", "above floor");
    let floor = cost(empty, &v6_hit);
    let row = |name: &str, ns: f64| println!("{name:<58} {ns:>9.1} {:>14.1}", ns - floor);
    let rows = |flows: usize| {
        for (skel, how) in [(&cached, "socket cache"), (&uncached, "map lookup")] {
            let mark = &skel.progs.flowd_mark;
            row(
                &format!("matched IPv6 TCP, {how}, {flows} flows in map"),
                cost(mark, &v6_hit),
            );
            row(
                &format!("unmatched IPv6 TCP, {how}, {flows} flows in map"),
                cost(mark, &v6_miss),
            );
        }
    };
    row("empty TC program (floor)", floor);
    rows(maps[0].len());
    row("IPv4 TCP", cost(&cached.progs.flowd_mark, &v4));
    // A full-ish map: hash buckets with neighbours, as on a busy node.
    for p in 1..(capacity - 1) {
        let k = FlowKey::new(
            Protocol::Tcp,
            SocketAddr::new(
                Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, (p >> 16) as u16, p as u16).into(),
                1094,
            ),
            SocketAddr::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into(), 40000),
        );
        for m in &maps {
            m.insert(&k, tag, 1).unwrap();
        }
    }
    rows(maps[0].len());
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
