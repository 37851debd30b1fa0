//! BPF_PROG_TEST_RUN tests of the TC marker: crafted frames in, exact bytes out.
//! Privileged (loads BPF); see common::privileged.

mod common;

use std::net::{Ipv6Addr, SocketAddr};

use flowd::bpf::marker::MarkerSkel;
use flowd::config::Strategy;
use flowd::marker::maps::{MarkMaps, OUTCOMES};
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::Tag;
use libbpf_rs::ProgramInput;
use proptest::prelude::*;

const SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const DST: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const SPORT: u16 = 40000;
const DPORT: u16 = 1094;

struct Marker {
    skel: MarkerSkel<'static>,
    maps: MarkMaps,
}

fn marker(strategy: &str) -> Marker {
    marker_with(strategy, true)
}

fn marker_with(strategy: &str, socket_cache: bool) -> Marker {
    let skel = load(&LoadOptions {
        strategy: strategy.parse::<Strategy>().unwrap(),
        map_capacity: 16,
        socket_cache,
        ..Default::default()
    })
    .expect("load marker");
    let maps = maps_of(&skel, 16).unwrap();
    Marker { skel, maps }
}

fn flow(proto: Protocol) -> FlowKey {
    FlowKey::new(
        proto,
        SocketAddr::new(SRC.into(), SPORT),
        SocketAddr::new(DST.into(), DPORT),
    )
}

impl Marker {
    /// Runs the program once; `None` when the kernel's test harness itself refuses
    /// the frame (it rejects IPv4/IPv6/VLAN frames shorter than their L3 header, so
    /// such frames never reach a TC program).
    fn try_run_ctx(&self, frame: &[u8], ctx: Option<&mut [u8]>) -> Option<Vec<u8>> {
        let mut out = vec![0u8; frame.len() + 64];
        let input = ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            context_in: ctx,
            ..Default::default()
        };
        match self.skel.progs.flowd_mark.test_run(input) {
            Ok(o) => {
                assert_eq!(o.return_value, 0, "the marker must always return TC_ACT_OK");
                Some(o.data.expect("data out").to_vec())
            }
            Err(e) if e.kind() == libbpf_rs::ErrorKind::InvalidInput && frame.len() < 14 + 40 => {
                None
            }
            Err(e) => panic!("test_run of {} bytes: {e}", frame.len()),
        }
    }

    fn run_ctx(&self, frame: &[u8], ctx: Option<&mut [u8]>) -> Vec<u8> {
        self.try_run_ctx(frame, ctx)
            .unwrap_or_else(|| panic!("kernel refused a {}-byte frame", frame.len()))
    }

    fn run(&self, frame: &[u8]) -> Vec<u8> {
        self.run_ctx(frame, None)
    }

    /// Runs the program `repeat` times on `frame` in one BPF_PROG_TEST_RUN: the
    /// kernel hands every repeat the same dummy socket, as a real socket's packets
    /// share theirs. Returns the last output.
    fn run_repeated(&self, frame: &[u8], repeat: u32) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + 64];
        let input = ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let o = self
            .skel
            .progs
            .flowd_mark
            .test_run(input)
            .expect("test_run");
        assert_eq!(o.return_value, 0);
        o.data.expect("data out").to_vec()
    }

    /// Packets counted in the flow's map entry (not those served by a socket cache).
    /// Packets counted by lookups of `f` (in flowd_marks or the flow index), as
    /// opposed to those counted through a socket's cache.
    fn map_packets(&self, f: &FlowKey) -> u64 {
        let in_map = self.maps.get(f).unwrap().expect("flow has a mark").packets;
        let in_index = self
            .maps
            .index()
            .and_then(|ix| ix.count(&flowd::marker::maps::bpf_key(f).unwrap()))
            .map_or(0, |(p, _)| p);
        in_map + in_index
    }

    fn outcome(&self, name: &str) -> u64 {
        let i = OUTCOMES.iter().position(|n| *n == name).unwrap();
        self.maps.counters().unwrap().outcomes[i]
    }
}

fn eth(vlans: &[u16], proto: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    for tpid in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&[0x00, 0x2a]); // VLAN 42
    }
    f.extend_from_slice(&proto.to_be_bytes());
    f
}

/// IPv6 header + L4 header (20-byte TCP or 8-byte UDP) + `payload` bytes.
fn ipv6_packet(next: u8, label: u32, payload: usize) -> Vec<u8> {
    let l4: Vec<u8> = match next {
        6 => {
            let mut t = Vec::new();
            t.extend_from_slice(&SPORT.to_be_bytes());
            t.extend_from_slice(&DPORT.to_be_bytes());
            t.extend_from_slice(&[
                0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0xab, 0xcd, 0, 0,
            ]);
            t
        }
        17 => {
            let mut u = Vec::new();
            u.extend_from_slice(&SPORT.to_be_bytes());
            u.extend_from_slice(&DPORT.to_be_bytes());
            u.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
            u.extend_from_slice(&[0x12, 0x34]);
            u
        }
        _ => vec![128, 0, 0x12, 0x34, 0, 1, 0, 1], // ICMPv6 echo request
    };
    let plen = (l4.len() + payload) as u16;
    // Version 6, traffic class 0xb8 (EF), so tests see the label write keeps it.
    let first = (6u32 << 28) | (0xb8 << 20) | (label & 0xfffff);
    let mut p = first.to_be_bytes().to_vec();
    p.extend_from_slice(&plen.to_be_bytes());
    p.push(next);
    p.push(64);
    p.extend_from_slice(&SRC.octets());
    p.extend_from_slice(&DST.octets());
    p.extend_from_slice(&l4);
    p.extend((0..payload).map(|i| i as u8));
    p
}

fn frame(vlans: &[u16], next: u8, label: u32, payload: usize) -> Vec<u8> {
    let mut f = eth(vlans, 0x86dd);
    f.extend(ipv6_packet(next, label, payload));
    f
}

fn with_label(mut f: Vec<u8>, l3: usize, label: u32) -> Vec<u8> {
    let w = u32::from_be_bytes(f[l3..l3 + 4].try_into().unwrap());
    let w = (w & 0xfff0_0000) | label;
    f[l3..l3 + 4].copy_from_slice(&w.to_be_bytes());
    f
}

/// The frame as the spec says it must leave with option headers inserted.
fn with_headers(f: &[u8], kinds: &[u8], tag: Tag) -> Vec<u8> {
    let l3 = 14;
    let mut out = f[..l3 + 40].to_vec();
    let orig_next = out[l3 + 6];
    let plen = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + 8 * kinds.len() as u16;
    out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
    out[l3 + 6] = kinds[0];
    for (i, _) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(orig_next);
        let v = tag.option_value().to_be_bytes();
        out.extend_from_slice(&[next, 0, 0x1e, 3, v[1], v[2], v[3], 0]);
    }
    out.extend_from_slice(&f[l3 + 40..]);
    out
}

const TAG: Tag = Tag {
    experiment: 2,
    activity: 3,
};

#[test]
fn label_strategy_writes_exactly_the_label_of_a_matched_tcp_flow() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0b10110).unwrap();
    let f = frame(&[], 6, 0xabcde, 100);
    let out = m.run(&f);
    assert_eq!(out, with_label(f.clone(), 14, TAG.label(0b10110)));
    assert_eq!(m.outcome("marked"), 1);
    let c = m.maps.counters().unwrap();
    assert_eq!(c.per_tag.len(), 1);
    assert_eq!(
        (c.per_tag[0].packets, c.per_tag[0].bytes),
        (1, f.len() as u64)
    );
}

#[test]
fn a_sockets_later_packets_come_from_its_cache_and_are_all_counted() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0b00011).unwrap();
    let f = frame(&[], 6, 0, 100);
    let out = m.run_repeated(&f, 50);
    assert_eq!(out, with_label(f.clone(), 14, TAG.label(0b00011)));
    assert_eq!(m.outcome("marked"), 50);
    let c = m.maps.counters().unwrap();
    assert_eq!(
        (c.per_tag[0].packets, c.per_tag[0].bytes),
        (50, 50 * f.len() as u64)
    );
    // Only the first packet looked the flow up; the other 49 were counted in the
    // socket's cache entry.
    assert_eq!(m.map_packets(&flow(Protocol::Tcp)), 1);
    // Unmatched packets are cached too (as unmarked), and still counted.
    let mut other = f.clone();
    other[14 + 40..14 + 42].copy_from_slice(&(SPORT + 1).to_be_bytes());
    assert_eq!(m.run_repeated(&other, 30), other);
    assert_eq!(m.outcome("unmarked"), 30);
}

#[test]
fn without_the_socket_cache_or_with_unusual_headers_every_packet_is_looked_up() {
    if !common::privileged() {
        return;
    }
    let m = marker_with("label", false);
    m.maps.insert(&flow(Protocol::Tcp), TAG, 1).unwrap();
    let f = frame(&[], 6, 0, 100);
    assert_eq!(
        m.run_repeated(&f, 20),
        with_label(f.clone(), 14, TAG.label(1))
    );
    assert_eq!(m.map_packets(&flow(Protocol::Tcp)), 20);

    // The cache only reads untagged IPv6 with TCP/UDP right behind the header.
    let m = marker("label");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 1).unwrap();
    let vlan = frame(&[0x8100], 6, 0, 100);
    assert_eq!(
        m.run_repeated(&vlan, 20),
        with_label(vlan.clone(), 18, TAG.label(1))
    );
    assert_eq!(m.map_packets(&flow(Protocol::Tcp)), 20);
    // An unconnected UDP socket (the test harness's dummy socket is not connected)
    // sends to many peers: never cached.
    m.maps.insert(&flow(Protocol::Udp), TAG, 1).unwrap();
    let udp = frame(&[], 17, 0, 64);
    assert_eq!(
        m.run_repeated(&udp, 20),
        with_label(udp.clone(), 14, TAG.label(1))
    );
    assert_eq!(m.map_packets(&flow(Protocol::Udp)), 20);
}

#[test]
fn udp_flows_are_marked_and_protocol_is_part_of_the_key() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    m.maps.insert(&flow(Protocol::Udp), TAG, 0).unwrap();
    let udp = frame(&[], 17, 0, 64);
    assert_eq!(m.run(&udp), with_label(udp.clone(), 14, 0x1000c));
    // Same addresses and ports over TCP: not the marked flow.
    let tcp = frame(&[], 6, 0, 64);
    assert_eq!(m.run(&tcp), tcp);
    assert_eq!(m.outcome("unmarked"), 1);
}

#[test]
fn unmatched_ipv6_passes_byte_for_byte() {
    if !common::privileged() {
        return;
    }
    let m = marker("label+hop-by-hop+destination");
    let f = frame(&[], 6, 0x12345, 10);
    assert_eq!(m.run(&f), f);
    assert_eq!(m.outcome("unmarked"), 1);
    assert_eq!(m.outcome("marked"), 0);
}

#[test]
fn ipv4_passes_untouched_and_is_counted() {
    if !common::privileged() {
        return;
    }
    let m = marker("label+hop-by-hop");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    let mut f = eth(&[], 0x0800);
    f.extend_from_slice(&[
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f.extend_from_slice(&[
        0x9c, 0x40, 0x04, 0x46, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    assert_eq!(m.run(&f), f);
    assert_eq!(m.outcome("not_ipv6"), 1);
}

#[test]
fn vlan_and_qinq_frames_get_the_label() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 31).unwrap();
    let single = frame(&[0x8100], 6, 0, 20);
    assert_eq!(
        m.run(&single),
        with_label(single.clone(), 18, TAG.label(31))
    );
    let qinq = frame(&[0x88a8, 0x8100], 6, 0, 20);
    assert_eq!(m.run(&qinq), with_label(qinq.clone(), 22, TAG.label(31)));
    assert_eq!(m.outcome("marked"), 2);
}

#[test]
fn icmpv6_is_not_marked() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    let f = frame(&[], 58, 0, 8);
    assert_eq!(m.run(&f), f);
    assert_eq!(m.outcome("not_tcp_udp"), 1);
}

#[test]
fn hop_by_hop_strategy_inserts_the_spec_header() {
    if !common::privileged() {
        return;
    }
    let m = marker("hop-by-hop");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 7).unwrap();
    let f = frame(&[], 6, 0x11111, 33);
    let out = m.run(&f);
    // Label untouched (strategy has no label), header 00 00 1e 03 000203 00 inserted.
    assert_eq!(out, with_headers(&f, &[0], TAG));
    assert_eq!(&out[54..62], &[6, 0, 0x1e, 3, 0, 2, 3, 0]);
    assert_eq!(m.outcome("marked"), 1);
}

#[test]
fn destination_strategy_inserts_a_destination_options_header() {
    if !common::privileged() {
        return;
    }
    let m = marker("destination");
    let big = Tag::new(511, 63).unwrap();
    m.maps.insert(&flow(Protocol::Udp), big, 0).unwrap();
    let f = frame(&[], 17, 0, 12);
    assert_eq!(m.run(&f), with_headers(&f, &[60], big));
}

#[test]
fn both_headers_go_hop_by_hop_first_and_combine_with_the_label() {
    if !common::privileged() {
        return;
    }
    let m = marker("label+hop-by-hop+destination");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    let f = frame(&[], 6, 0, 40);
    let expected = with_label(with_headers(&f, &[0, 60], TAG), 14, 0x1000c);
    assert_eq!(m.run(&f), expected);
    assert_eq!(expected[14 + 6], 0);
    assert_eq!(expected[54], 60);
    assert_eq!(expected[62], 6);
}

#[test]
fn header_is_not_stacked_on_existing_extension_headers_or_vlan_frames() {
    if !common::privileged() {
        return;
    }
    let m = marker("label+hop-by-hop");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    // A packet that already carries a hop-by-hop header (router alert style).
    let mut f = eth(&[], 0x86dd);
    let mut ip = ipv6_packet(6, 0, 4);
    let l4 = ip.split_off(40);
    ip[6] = 0;
    let plen = (l4.len() + 8) as u16;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    ip.extend_from_slice(&[6, 0, 5, 2, 0, 0, 1, 0]);
    ip.extend(l4);
    f.extend(ip);
    // Found through the existing header, labelled, but no second HBH header.
    assert_eq!(m.run(&f), with_label(f.clone(), 14, 0x1000c));
    let v = frame(&[0x8100], 6, 0, 4);
    assert_eq!(m.run(&v), with_label(v.clone(), 18, 0x1000c));
    assert_eq!(m.outcome("skipped_header"), 2);
}

#[test]
fn truncated_and_malformed_frames_pass_through() {
    if !common::privileged() {
        return;
    }
    let m = marker("label+hop-by-hop");
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    let full = frame(&[], 6, 0, 0);
    // IPv6 header without ports, with half of them.
    for len in [14 + 40, 14 + 40 + 2] {
        let f = &full[..len];
        assert_eq!(m.run(f), f, "truncated to {len}");
    }
    // VLAN-tagged, cut inside the ports. Shorter frames (cut inside the IPv6 header)
    // are refused by the test harness itself; if it runs them, they must pass too.
    let vlan = frame(&[0x8100], 6, 0, 0);
    assert_eq!(m.run(&vlan[..18 + 40 + 3]), &vlan[..18 + 40 + 3]);
    let mut ran = 3;
    for len in [14, 16, 18 + 20] {
        if let Some(out) = m.try_run_ctx(&vlan[..len], None) {
            assert_eq!(out, &vlan[..len]);
            ran += 1;
        }
    }
    // An extension header whose length points past the end.
    let mut f = frame(&[], 6, 0, 0);
    f[14 + 6] = 60;
    f[54] = 6;
    f[55] = 200;
    assert_eq!(m.run(&f), f);
    assert_eq!(m.outcome("malformed"), ran + 1);
    assert_eq!(m.outcome("marked"), 0);
}

#[test]
fn packet_too_big_for_the_header_is_sent_unmarked_not_dropped() {
    if !common::privileged() {
        return;
    }
    // BPF_PROG_TEST_RUN takes the MTU from the device named in the context: give it
    // a dummy link with MTU 1280 in a namespace of our own.
    let ns = common::Netns::new("mtu");
    ns.sh("ip link add fmtu mtu 1280 type veth peer name fmtup && ip link set fmtu up");
    let ifindex = ns.ifindex("fmtu");
    let m = std::sync::Arc::new(marker("label+hop-by-hop"));
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    let m2 = m.clone();
    let (fits, too_big) = ns
        .run(move || {
            // The context as bytes, built from zeros: the generated struct has
            // padding that a struct literal leaves undefined (garbage in release
            // builds), and the kernel refuses a context with stray bytes (EINVAL).
            type SkBuff = flowd::bpf::marker::types::__sk_buff;
            let mut ctx = vec![0u8; std::mem::size_of::<SkBuff>()];
            let at = std::mem::offset_of!(SkBuff, ifindex);
            ctx[at..at + 4].copy_from_slice(&ifindex.to_ne_bytes());
            let ctx_bytes = |c: &mut Vec<u8>| c.clone();
            // IPv6 packet of 1272 bytes: +8 = 1280, fits. 1273: does not.
            let fits = frame(&[], 6, 0, 1272 - 60);
            let too_big = frame(&[], 6, 0, 1273 - 60);
            let a = m2.run_ctx(&fits, Some(&mut ctx_bytes(&mut ctx)));
            let b = m2.run_ctx(&too_big, Some(&mut ctx_bytes(&mut ctx)));
            ((fits, a), (too_big, b))
        })
        .join()
        .unwrap();
    assert_eq!(
        fits.1,
        with_label(with_headers(&fits.0, &[0], TAG), 14, 0x1000c)
    );
    assert_eq!(too_big.1, with_label(too_big.0.clone(), 14, 0x1000c));
    assert_eq!(m.outcome("skipped_mtu"), 1);
    assert_eq!(m.outcome("marked"), 1);
}

#[test]
fn removing_a_mark_stops_marking() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    let f = frame(&[], 6, 0, 8);
    m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap();
    assert_ne!(m.run(&f), f);
    assert!(m.maps.remove(&flow(Protocol::Tcp)).unwrap());
    assert_eq!(m.run(&f), f);
    assert!(!m.maps.remove(&flow(Protocol::Tcp)).unwrap());
}

#[test]
fn a_full_map_is_reported_not_silent() {
    if !common::privileged() {
        return;
    }
    let m = marker("label");
    for port in 0..16u16 {
        let f = FlowKey::new(
            Protocol::Tcp,
            SocketAddr::new(SRC.into(), 1000 + port),
            SocketAddr::new(DST.into(), DPORT),
        );
        m.maps.insert(&f, TAG, 0).unwrap();
    }
    let err = m.maps.insert(&flow(Protocol::Tcp), TAG, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "marker map is full (16 flows): flow tcp [fd00::1]:40000 -> [fd00::2]:1094 left unmarked"
    );
    assert_eq!(m.maps.len(), 16);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever arrives, the program returns TC_ACT_OK and, with nothing to mark,
    /// changes no byte.
    #[test]
    fn arbitrary_frames_never_change_without_a_mark(
        ethertype in prop_oneof![Just(0x86ddu16), Just(0x8100), Just(0x0800), any::<u16>()],
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        if !common::privileged() {
            return Ok(());
        }
        thread_local!(static M: Marker = marker("label+hop-by-hop+destination"));
        let mut f = eth(&[], ethertype);
        f.extend(body);
        if let Some(out) = M.with(|m| m.try_run_ctx(&f, None)) {
            prop_assert_eq!(out, f);
        }
    }
}
