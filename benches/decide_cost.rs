//! What in-kernel decisions cost the TC program, through BPF_PROG_TEST_RUN (repeat):
//! the hit path (a marked flow) and the miss path of a non-SYN TCP packet with the
//! decision compiled in and out (`marker.in_kernel_decisions`), and one evaluation
//! of a 64-rule compiled policy (`flowd_kdecide_test`, the same `kdecide`).
//!
//! `cargo bench --bench decide_cost` as root (skips otherwise).

use std::net::{Ipv6Addr, SocketAddr};

use flowd::bpf::marker::types::{flowd_ksock, flowd_ktest};
use flowd::bpf::marker::MarkerSkel;
use flowd::marker::maps::{as_bytes, MarkMaps};
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::Tag;
use flowd::policy::kernel::KernelPolicy;
use flowd::policy::{Policy, Registry};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};

const SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const DST: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const REPEAT: u32 = 2_000_000;

fn frame(sport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
    f.extend_from_slice(&(6u32 << 28).to_be_bytes());
    f.extend_from_slice(&(20u16 + 100).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&SRC.octets());
    f.extend_from_slice(&DST.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&1094u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(&[0x42; 100]);
    f
}

fn ns_per_run(skel: &MarkerSkel<'_>, frame: &[u8]) -> f64 {
    let mut out = vec![0u8; frame.len() + 64];
    (0..3)
        .map(|_| {
            let o = skel
                .progs
                .flowd_mark
                .test_run(ProgramInput {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    repeat: REPEAT,
                    ..Default::default()
                })
                .expect("test_run");
            o.duration.as_nanos() as f64
        })
        .fold(f64::MAX, f64::min)
}

fn policy(rules: usize) -> Policy {
    let mut text = String::from("experiment = \"atlas\"\n");
    for i in 0..rules {
        text += &format!(
            "[[rule]]\nname = \"r{i}\"\nactivity = \"Debug\"\nremote_ports = [{}]\nremote_cidrs = [\"2001:db8:{i:x}::/48\", \"!2001:db8:{i:x}:1::/64\"]\n",
            2000 + i
        );
    }
    Policy::from_sources(&[("atlas.toml".into(), text)], &Registry::bundled()).expect("policy")
}

fn marker(in_kernel: bool) -> (MarkerSkel<'static>, MarkMaps) {
    let skel = load(&LoadOptions {
        in_kernel,
        with_test_program: true,
        map_capacity: 1024,
        // BPF_PROG_TEST_RUN gives every repeat one socket: with the socket cache
        // the repeats after the first would never reach the decision.
        socket_cache: false,
        ..Default::default()
    })
    .expect("load");
    let maps = maps_of(&skel, 1024).expect("maps");
    (skel, maps)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP decide_cost: needs root");
        return;
    }
    let p = policy(64);
    let flow = FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new(SRC.into(), 40000),
        SocketAddr::new(DST.into(), 1094),
    );
    println!("decide_cost: ns per packet (best of 3 x {REPEAT} BPF_PROG_TEST_RUN repeats)");
    println!("{:<44} {:>10} {:>10}", "", "decide off", "decide on");
    let (off, off_maps) = marker(false);
    let (on, on_maps) = marker(true);
    on_maps
        .install_policy(&KernelPolicy::compile(p.rules()))
        .unwrap();
    for m in [&off_maps, &on_maps] {
        m.insert(&flow, Tag::new(2, 9).unwrap(), 3).unwrap();
    }
    let row = |name: &str, f: &[u8]| {
        println!(
            "{:<44} {:>10.1} {:>10.1}",
            name,
            ns_per_run(&off, f),
            ns_per_run(&on, f)
        );
    };
    row("hit: marked flow, TCP ACK+PSH", &frame(40000, 0x18));
    row("miss: unmarked flow, TCP ACK+PSH", &frame(40001, 0x18));
    // BPF_PROG_TEST_RUN gives the skb a dummy socket (no request sock, no tcp_sock):
    // the SYN-ACK miss path evaluates the policy with an unknown uid.
    row("miss: unmarked SYN-ACK (evaluates)", &frame(40002, 0x12));

    // One evaluation (64 rules: 4 LPM lookups, a hash and two array lookups).
    let t = flowd_ktest {
        sock: flowd_ksock {
            laddr: SRC.octets(),
            raddr: "2001:db8:20::5".parse::<Ipv6Addr>().unwrap().octets(),
            lport: 40000,
            rport: 2032,
            proto: 6,
            direction: 1,
            uid_known: 1,
            pad: 0,
            uid: 0,
        },
        ..Default::default()
    };
    on.maps
        .flowd_ktest_map
        .update(&0u32.to_ne_bytes(), as_bytes(&t), MapFlags::ANY)
        .unwrap();
    let f = frame(40000, 0x18);
    let eval = (0..3)
        .map(|_| {
            on.progs
                .flowd_kdecide_test
                .test_run(ProgramInput {
                    data_in: Some(&f),
                    repeat: REPEAT / 4,
                    ..Default::default()
                })
                .unwrap()
                .duration
                .as_nanos() as f64
        })
        .fold(f64::MAX, f64::min);
    println!(
        "{:<44} {:>10} {:>10.1}",
        "one evaluation, 64 rules (kdecide_test)", "-", eval
    );
}
