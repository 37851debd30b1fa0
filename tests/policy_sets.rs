//! Overlap tests of the value sets, checked exhaustively against brute force over small
//! universes, so that conflict detection neither misses nor invents overlaps.

use std::net::{IpAddr, Ipv4Addr};

use flowd::policy::{CgroupPrefix, CidrSet, PortSet};
use ipnet::IpNet;
use proptest::prelude::*;

/// Sets inside 10.0.0.0/24 (plus the occasional whole-family entry), small enough to
/// enumerate: every address outside 10.0.0.0/24 behaves like one representative.
fn cidr_set() -> impl Strategy<Value = CidrSet> {
    let entry = prop_oneof![
        8 => (any::<u8>(), 24u8..=32).prop_map(|(x, l)| IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, x)), l).unwrap().trunc()),
        1 => Just("0.0.0.0/0".parse::<IpNet>().unwrap()),
        1 => Just("::/0".parse::<IpNet>().unwrap()),
    ];
    (
        prop::collection::vec(entry.clone(), 0..4),
        prop::collection::vec(entry, 0..4),
    )
        .prop_map(|(pos, neg)| CidrSet { pos, neg })
}

fn universe() -> impl Iterator<Item = IpAddr> {
    (0..=255u8)
        .map(|x| IpAddr::V4(Ipv4Addr::new(10, 0, 0, x)))
        .chain(["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn cidr_overlap_is_exact(a in cidr_set(), b in cidr_set()) {
        let brute = universe().any(|ip| a.contains(ip) && b.contains(ip));
        prop_assert_eq!(a.overlaps(&b), brute, "{} vs {}", a, b);
    }

    #[test]
    fn port_overlap_is_exact(
        a in prop::collection::vec((1u16..40, 0u16..5), 1..4),
        b in prop::collection::vec((1u16..40, 0u16..5), 1..4),
    ) {
        let a = PortSet::new(a.into_iter().map(|(l, w)| (l, l + w)).collect());
        let b = PortSet::new(b.into_iter().map(|(l, w)| (l, l + w)).collect());
        let brute = (1u16..50).any(|p| a.contains(p) && b.contains(p));
        prop_assert_eq!(a.overlaps(&b), brute);
        prop_assert_eq!(a.count() as usize, (1u16..50).filter(|p| a.contains(*p)).count());
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn cgroup_overlap_is_exact(
        a in "(/[ab]{1,2}){1,3}\\*?",
        b in "(/[ab]{1,2}){1,3}\\*?",
    ) {
        let (pa, pb) = (CgroupPrefix::parse(&a).unwrap(), CgroupPrefix::parse(&b).unwrap());
        // Every path of 1 to 4 components over the entries' alphabet.
        let comps = ["a", "b", "aa", "ab", "ba", "bb", "aaa"];
        let mut paths: Vec<String> = Vec::new();
        let mut level = vec![String::new()];
        for _ in 0..4 {
            level = level.iter().flat_map(|p| comps.iter().map(move |c| format!("{p}/{c}"))).collect();
            paths.extend(level.iter().cloned());
        }
        let brute = paths.iter().any(|p| pa.matches(p) && pb.matches(p));
        prop_assert_eq!(pa.overlaps(&pb), brute, "{} vs {}", a, b);
    }
}

#[test]
fn port_sets_merge_adjacent_ranges() {
    let p = PortSet::new(vec![(5, 9), (1, 3), (4, 4), (20, 20)]);
    assert_eq!(p.ranges, [(1, 9), (20, 20)]);
    assert_eq!(p.to_string(), "[1-9, 20]");
    assert_eq!(
        PortSet::new(vec![(1, 65535), (65535, 65535)]).count(),
        65535
    );
}
