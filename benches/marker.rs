//! Per-packet cost of the TC marker, measured with BPF_PROG_TEST_RUN (the kernel runs
//! the program `REPEAT` times on one packet and reports the mean), beside, in the same
//! run, an empty TC program (the harness floor) and a reference program shaped like
//! flowd-go's marker (benches/bpf/flowd_go_ref.bpf.c: its 24-byte key, LRU hash and
//! logic). Needs root.
//!
//! `cargo bench --bench marker` prints a table: ns per packet (median of `ROUNDS`
//! rounds; the rounds visit every case in turn, so slow phases of a noisy machine hit
//! all cases alike), the cost above the floor, and that cost as a ratio to the
//! reference's for the same path. Every map holds 65 535 flows (hash buckets with
//! neighbours, as on a busy node). Frames are 74 bytes (Ethernet, IPv6, TCP ACK).

use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddr};

use flowd::config::Strategy;
use flowd::marker::maps::bpf_key;
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::Tag;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput, ProgramMut};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
mod reference {
    include!(concat!(env!("OUT_DIR"), "/flowd_go_ref.skel.rs"));
}

const ROUNDS: usize = 9;
const FLOWS: u32 = 65_535;

fn repeat() -> u32 {
    std::env::var("FLOWD_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}

const LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// How the IPv6 header is reached.
#[derive(Clone, Copy)]
enum Shape {
    Plain,
    /// One 802.1Q tag.
    Vlan,
    /// An 8-byte destination-options header before TCP.
    ExtHeader,
    Ipv4,
}

fn frame(shape: Shape, sport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&5201u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    if let Shape::Ipv4 = shape {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend(tcp);
        return f;
    }
    if let Shape::Vlan = shape {
        f.extend_from_slice(&[0x81, 0x00, 0, 42]);
    }
    let (next, ext): (u8, &[u8]) = match shape {
        // Next header TCP, length 0 (8 bytes), PadN of 4 bytes.
        Shape::ExtHeader => (60, &[6, 0, 1, 4, 0, 0, 0, 0]),
        _ => (6, &[]),
    };
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&((ext.len() + tcp.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&LOCAL.octets());
    f.extend_from_slice(&PEER.octets());
    f.extend_from_slice(ext);
    f.extend(tcp);
    f
}

fn key(sport: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new(LOCAL.into(), sport),
        SocketAddr::new(PEER.into(), 5201),
    )
}

/// Mean ns per run of one BPF_PROG_TEST_RUN of `repeat` runs.
fn cost(prog: &ProgramMut<'_>, data: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; data.len() + 64];
    let input = ProgramInput {
        data_in: Some(data),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    prog.test_run(input)
        .expect("BPF_PROG_TEST_RUN")
        .duration
        .as_nanos() as f64
}

/// flowd-go's key for (daddr, sport, dport): the address as two host-order u64
/// halves, the ports as host-order u32 (dport first).
fn ref_key24(daddr: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let o = daddr.octets();
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&u64::from_be_bytes(o[..8].try_into().unwrap()).to_ne_bytes());
    k.extend_from_slice(&u64::from_be_bytes(o[8..].try_into().unwrap()).to_ne_bytes());
    k.extend_from_slice(&u32::from(dport).to_ne_bytes());
    k.extend_from_slice(&u32::from(sport).to_ne_bytes());
    k
}

/// The 5-tuple keys of the option programs: 36 bytes (no family, padding or
/// protocol) or flowd_flow_key's 40.
fn ref_key_wide(f: &FlowKey, with_head: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    if with_head {
        k.extend_from_slice(&[10, 6, 0, 0]);
    }
    k.extend_from_slice(&f.local().port().to_be_bytes());
    k.extend_from_slice(&f.remote().port().to_be_bytes());
    for a in [f.local().ip(), f.remote().ip()] {
        let std::net::IpAddr::V6(a) = a else {
            unreachable!()
        };
        k.extend_from_slice(&a.octets());
    }
    if !with_head {
        // saddr, daddr, then the ports.
        k.rotate_left(4);
    }
    k
}

/// A flow of the filler set: other peers of the same local address.
fn filler(p: u32) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new(LOCAL.into(), 1094),
        SocketAddr::new(
            Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, (p >> 16) as u16, p as u16).into(),
            40000,
        ),
    )
}

struct Case<'a> {
    name: String,
    prog: &'a ProgramMut<'a>,
    data: Vec<u8>,
    /// Index of the case whose cost above the floor this one is compared to.
    versus: Option<usize>,
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the marker bench loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let repeat = repeat();
    // As the daemon runs by default (marker.in_kernel_decisions = true): the decision
    // sits on the miss path only. The socket cache (marker.socket_cache, default on)
    // serves a socket's packets after its first; BPF_PROG_TEST_RUN gives every run
    // one dummy socket, so repeats hit it. The second object has it off: every packet
    // is looked up in the map, as a flow's first packet, or a packet with no local
    // socket (forwarded), is.
    // The third has the flow index (marker.flow_index) off too: every lookup is a
    // flowd_marks hash lookup, as before the index.
    let load_with = |socket_cache: bool, flow_index: bool| {
        load(&LoadOptions {
            strategy: Strategy::LABEL,
            map_capacity: FLOWS + 1,
            with_empty_program: true,
            in_kernel: true,
            socket_cache,
            flow_index,
            ..Default::default()
        })
        .expect("load marker")
    };
    let cached = load_with(true, true);
    let uncached = load_with(false, true);
    let hashed = load_with(false, false);
    let maps = [
        maps_of(&cached, FLOWS + 1).unwrap(),
        maps_of(&uncached, FLOWS + 1).unwrap(),
        maps_of(&hashed, FLOWS + 1).unwrap(),
    ];
    let tag = Tag::new(2, 4).unwrap();

    let mut open_object = MaybeUninit::uninit();
    let refskel = reference::FlowdGoRefSkelBuilder::default()
        .open(&mut open_object)
        .expect("open reference")
        .load()
        .expect("load reference");
    let tagval = 0x12345u32.to_ne_bytes();
    let put = |m: &dyn MapCore, k: &[u8]| m.update(k, &tagval, MapFlags::ANY).unwrap();
    let fill = |f: &FlowKey| {
        let std::net::IpAddr::V6(d) = f.remote().ip() else {
            unreachable!()
        };
        put(
            &refskel.maps.ref_lru24,
            &ref_key24(d, f.local().port(), f.remote().port()),
        );
        put(
            &refskel.maps.ref_hash24,
            &ref_key24(d, f.local().port(), f.remote().port()),
        );
        put(&refskel.maps.ref_hash36, &ref_key_wide(f, false));
        put(&refskel.maps.ref_hash40, &ref_key_wide(f, true));
    };
    for m in &maps {
        m.insert(&key(40000), tag, 7).unwrap();
    }
    fill(&key(40000));
    for p in 1..FLOWS {
        let k = filler(p);
        for m in &maps {
            m.insert(&k, tag, 1).unwrap();
        }
        fill(&k);
    }

    // At a full map some buckets of the flow index overflow (their extra flows stay
    // in flowd_marks alone), and a miss landing in one asks flowd_marks too. The
    // unmatched rows use a port whose bucket does not; the "overflowing" row one
    // whose bucket does: the worst case.
    let ix = maps[1].index().expect("flow index on");
    let overflowing = |port: u16| ix.unindexed_in(ix.bucket(&bpf_key(&key(port)).unwrap())) > 0;
    let miss_port = (40001..).find(|p| !overflowing(*p)).unwrap();
    let crowded_port = (40001..).find(|p| overflowing(*p)).unwrap();
    println!(
        "flow index: {} of {FLOWS} flows not indexed (their bucket full)",
        ix.unindexed()
    );
    let hit = frame(Shape::Plain, 40000);
    let miss = frame(Shape::Plain, miss_port);
    let r = &refskel.progs;
    let (c, u) = (&cached.progs.flowd_mark, &uncached.progs.flowd_mark);
    let mut cases: Vec<Case<'_>> = Vec::new();
    let mut add = |name: &str, prog, data: &[u8], versus: Option<usize>| {
        cases.push(Case {
            name: name.into(),
            prog,
            data: data.to_vec(),
            versus,
        });
        cases.len() - 1
    };
    add(
        "empty TC program (floor)",
        &cached.progs.flowd_empty,
        &hit,
        None,
    );
    let ref_hit = add(
        "reference (flowd-go shape), matched",
        &r.ref_flowd_go,
        &hit,
        None,
    );
    let ref_miss = add("reference, unmatched", &r.ref_flowd_go, &miss, None);
    let ref_vlan = add(
        "reference, matched, 802.1Q tag",
        &r.ref_flowd_go,
        &frame(Shape::Vlan, 40000),
        None,
    );
    add(
        "reference, ext header (passes: TCP only behind IPv6)",
        &r.ref_flowd_go,
        &frame(Shape::ExtHeader, 40000),
        None,
    );
    add(
        "option: reference on a plain hash",
        &r.ref_hash24_prog,
        &hit,
        Some(ref_hit),
    );
    add(
        "option: 36-byte 5-tuple key (plain hash)",
        &r.ref_hash36_prog,
        &hit,
        Some(ref_hit),
    );
    add(
        "option: 40-byte flowd_flow_key (plain hash)",
        &r.ref_hash40_prog,
        &hit,
        Some(ref_hit),
    );
    add("marker matched, socket cache", c, &hit, Some(ref_hit));
    add("marker unmatched, socket cache", c, &miss, Some(ref_miss));
    add(
        "marker matched, map lookup (flow index)",
        u,
        &hit,
        Some(ref_hit),
    );
    add(
        "marker unmatched, map lookup (flow index)",
        u,
        &miss,
        Some(ref_miss),
    );
    add(
        "marker unmatched, flow index, bucket overflowing",
        u,
        &frame(Shape::Plain, crowded_port),
        Some(ref_miss),
    );
    let h = &hashed.progs.flowd_mark;
    add("marker matched, hash map only", h, &hit, Some(ref_hit));
    add("marker unmatched, hash map only", h, &miss, Some(ref_miss));
    add(
        "marker matched, 802.1Q tag",
        c,
        &frame(Shape::Vlan, 40000),
        Some(ref_vlan),
    );
    add(
        "marker matched, 802.1Q tag, hash map only",
        h,
        &frame(Shape::Vlan, 40000),
        Some(ref_vlan),
    );
    add(
        "marker matched, dest-options header",
        c,
        &frame(Shape::ExtHeader, 40000),
        Some(ref_hit),
    );
    add(
        "marker matched, dest-options header, hash map only",
        h,
        &frame(Shape::ExtHeader, 40000),
        Some(ref_hit),
    );
    add("marker IPv4 TCP", c, &frame(Shape::Ipv4, 40000), None);

    let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            samples[i].push(cost(case.prog, &case.data, repeat));
        }
    }
    let med: Vec<f64> = samples
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[ROUNDS / 2]
        })
        .collect();
    let floor = med[0];
    println!(
        "TC marker cost per packet (BPF_PROG_TEST_RUN, {repeat} repeats, median of {ROUNDS} \
         interleaved rounds), {FLOWS} flows per map, {} cores",
        num_cpus()
    );
    println!(
        "{:<58} {:>8} {:>8} {:>8} {:>10}",
        "case", "ns/pkt", "-floor", "x floor", "x ref"
    );
    for (i, case) in cases.iter().enumerate() {
        let above = med[i] - floor;
        let versus = case
            .versus
            .map(|v| format!("{:.2}", above / (med[v] - floor)))
            .unwrap_or_default();
        println!(
            "{:<58} {:>8.1} {:>8.1} {:>8.2} {:>10}",
            case.name,
            med[i],
            above,
            med[i] / floor,
            versus
        );
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
