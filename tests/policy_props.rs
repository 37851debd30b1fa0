//! Property tests: the parser never panics, and the indexed matcher agrees with a naive
//! reference evaluator written straight from the documented semantics.

#[path = "common/policy.rs"]
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flowd::model::socket::{Direction, Protocol};
use flowd::policy::{ErrorKind, SocketAttrs};
use ipnet::IpNet;
use proptest::prelude::*;

use common::{render, Spec, SpecShape};

const EXAMPLES: &[&str] = &[
    include_str!("../policies/atlas.toml"),
    include_str!("../policies/cms.toml"),
    include_str!("../policies/lhcb.toml"),
    include_str!("../policies/perfsonar.toml"),
];

proptest! {
    #[test]
    fn parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = common::load(&[("p/x.toml", &text)]);
    }

    #[test]
    fn parser_never_panics_on_toml_like_text(text in "[a-z_=\\[\\]\"'\\-!/.:0-9 \n,{}#@*]{0,200}") {
        let _ = common::load(&[("p/x.toml", &text)]);
    }

    #[test]
    fn parser_never_panics_on_mutated_examples(
        which in 0..EXAMPLES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..4, any::<char>()), 1..6),
    ) {
        let mut text: Vec<char> = EXAMPLES[which].chars().collect();
        for (at, op, c) in edits {
            if text.is_empty() { break; }
            let i = at.index(text.len());
            match op {
                0 => { text.remove(i); }
                1 => text.insert(i, c),
                2 => text[i] = c,
                _ => { let end = (i + 12).min(text.len()); text.drain(i..end); }
            }
        }
        let text: String = text.into_iter().collect();
        let _ = common::load(&[("p/x.toml", &text)]);
    }
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..16, 28u8..=32).prop_map(|(x, l)| IpNet::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, x)),
            l
        )
        .unwrap()
        .trunc()),
        (0u8..16, 124u8..=128).prop_map(|(x, l)| IpNet::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x.into())),
            l
        )
        .unwrap()
        .trunc()),
    ]
}

fn ports() -> impl Strategy<Value = Vec<(u16, u16)>> {
    prop::collection::vec((1u16..=4, 0u16..2).prop_map(|(lo, w)| (lo, lo + w)), 1..3)
}

fn spec() -> impl Strategy<Value = Spec> {
    common::spec(&SpecShape {
        net: net().boxed(),
        ports: ports().boxed(),
        weight: 0.3,
        process_weight: 0.3,
        max_activity: 2,
    })
}

// The reference: the documented semantics, written the obvious way.
fn ref_cidr(v: &[(bool, IpNet)], ip: IpAddr) -> bool {
    let pos: Vec<_> = v.iter().filter(|e| !e.0).collect();
    (pos.is_empty() || pos.iter().any(|e| e.1.contains(&ip)))
        && !v.iter().any(|e| e.0 && e.1.contains(&ip))
}

fn ref_ports(v: &[(u16, u16)], p: u16) -> bool {
    v.iter().any(|&(a, b)| a <= p && p <= b)
}

fn ref_matches(s: &Spec, x: &SocketAttrs) -> bool {
    s.proto.is_none_or(|p| p == x.proto)
        && s.direction.is_none_or(|d| d == x.direction)
        && s.local_ports
            .as_ref()
            .is_none_or(|v| ref_ports(v, x.local.port()))
        && s.remote_ports
            .as_ref()
            .is_none_or(|v| ref_ports(v, x.remote.port()))
        && s.local_cidrs
            .as_ref()
            .is_none_or(|v| ref_cidr(v, x.local.ip()))
        && s.remote_cidrs
            .as_ref()
            .is_none_or(|v| ref_cidr(v, x.remote.ip()))
        && s.users
            .as_ref()
            .is_none_or(|v| x.uid.is_some_and(|u| v.contains(&u)))
        && s.process
            .as_ref()
            .is_none_or(|v| x.owner.comm.as_ref().is_some_and(|c| v.contains(c)))
}

fn ref_specificity(s: &Spec) -> (u32, u32, u32) {
    let fields = [
        s.proto.is_some(),
        s.direction.is_some(),
        s.local_ports.is_some(),
        s.remote_ports.is_some(),
        s.local_cidrs.is_some(),
        s.remote_cidrs.is_some(),
        s.users.is_some(),
        s.process.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count() as u32;
    let prefix = |v: &Option<Vec<(bool, IpNet)>>| {
        v.as_ref().map_or(0, |v| {
            v.iter()
                .filter(|e| !e.0)
                .map(|e| u32::from(e.1.prefix_len()) + if e.1.addr().is_ipv4() { 96 } else { 0 })
                .min()
                .unwrap_or(0)
        })
    };
    let ports = |v: &Option<Vec<(u16, u16)>>| {
        v.as_ref().map_or(0, |v| {
            65536
                - v.iter()
                    .flat_map(|&(a, b)| a..=b)
                    .collect::<BTreeSet<_>>()
                    .len() as u32
        })
    };
    (
        fields,
        prefix(&s.local_cidrs) + prefix(&s.remote_cidrs),
        ports(&s.local_ports) + ports(&s.remote_ports),
    )
}

fn addr(v6: bool, x: u8, port: u16) -> SocketAddr {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x.into()))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, x))
    };
    SocketAddr::new(ip, port)
}

fn socket() -> impl Strategy<Value = SocketAttrs> {
    (
        any::<bool>(),
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
        (0u8..16, 1u16..=5, 0u8..16, 1u16..=5),
        prop_oneof![
            Just(Direction::Inbound),
            Just(Direction::Outbound),
            Just(Direction::Unknown)
        ],
        prop::option::of(0u32..3),
        prop::option::of(prop_oneof![Just("a".to_owned()), Just("b".to_owned())]),
    )
        .prop_map(
            |(v6, proto, (la, lp, ra, rp), direction, uid, comm)| SocketAttrs {
                proto,
                local: addr(v6, la, lp),
                remote: addr(v6, ra, rp),
                direction,
                uid,
                owner: flowd::model::facts::OwnerFacts {
                    gid: None,
                    comm,
                    exe: None,
                    cgroup: None,
                },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matcher_agrees_with_naive_reference(
        specs in prop::collection::vec(spec(), 1..10),
        sockets in prop::collection::vec(socket(), 1..20),
    ) {
        let text = render(&specs);
        let policy = match common::load(&[("p/atlas.toml", &text)]) {
            Ok(p) => p,
            Err(e) => {
                // Generated files are valid, so conflicts are the only acceptable errors.
                prop_assert!(e.0.iter().all(|e| e.kind == ErrorKind::Conflict), "{e}\n{text}");
                return Ok(());
            }
        };
        for x in &sockets {
            let matching: Vec<usize> = (0..specs.len()).filter(|&i| ref_matches(&specs[i], x)).collect();
            let best = matching.iter().copied().max_by(|&a, &b| {
                (specs[a].priority, ref_specificity(&specs[a])).cmp(&(specs[b].priority, ref_specificity(&specs[b])))
                    .then(b.cmp(&a))
            });
            let got = policy.evaluate(x);
            prop_assert_eq!(got.as_ref().map(|v| v.rule.name.to_string()), best.map(|i| format!("r{i}")), "{}\n{:?}", text, x);
            prop_assert_eq!(&policy.explain(x).verdict, &got);
            // No conflict was reported, so rules tied with the winner agree on the tag.
            if let Some(b) = best {
                let key = (specs[b].priority, ref_specificity(&specs[b]));
                for &i in &matching {
                    if (specs[i].priority, ref_specificity(&specs[i])) == key {
                        prop_assert_eq!(specs[i].activity, specs[b].activity, "undetected conflict r{} / r{}\n{}", i, b, text);
                    }
                }
            }
        }
    }
}
