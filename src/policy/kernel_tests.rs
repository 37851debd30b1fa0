use std::net::SocketAddrV6;
use std::path::PathBuf;

use super::*;
use crate::policy::{Policy, Registry, StaticAccounts};

fn policy(text: &str) -> Policy {
    let accounts = StaticAccounts::new(&[("root", 0), ("xrootd", 996)], &[("root", 0)]);
    Policy::from_sources_with(
        &[(
            PathBuf::from("atlas.toml"),
            format!("experiment = \"atlas\"\n{text}"),
        )],
        &Registry::bundled(),
        &accounts,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Bit of the rule named `name`.
fn b(p: &Policy, name: &str) -> RuleBits {
    let i = p.rules().position(|r| &*r.id.name == name).unwrap();
    1 << i
}

fn rule(name: &str, body: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nactivity = \"Debug\"\n{body}\n")
}

fn sock(proto: Protocol, local: &str, remote: &str, uid: Option<u32>) -> KernelSocket {
    KernelSocket {
        proto,
        direction: Direction::Outbound,
        local: local.parse::<SocketAddrV6>().unwrap(),
        remote: remote.parse::<SocketAddrV6>().unwrap(),
        uid,
    }
}

fn addr_entry(k: &KernelPolicy, side: Side, net: &str) -> RuleBits {
    let net: Ipv6Net = net.parse().unwrap();
    k.addrs
        .iter()
        .find(|e| e.0 == side && e.1 == net)
        .unwrap_or_else(|| panic!("no entry for {net}"))
        .2
}

#[test]
fn negated_cidr_inside_a_positive_one_removes_the_rule_from_that_region_only() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "wide",
            "remote_cidrs = [\"2001:db8::/32\", \"!2001:db8:1::/48\"]"
        ),
        rule("hole", "remote_cidrs = [\"2001:db8:1::/48\"]\npriority = 1"),
    ));
    let k = KernelPolicy::compile(p.rules());
    let (wide, hole) = (b(&p, "wide"), b(&p, "hole"));
    assert_eq!(addr_entry(&k, Side::Remote, "::/0"), 0);
    assert_eq!(addr_entry(&k, Side::Remote, "2001:db8::/32"), wide);
    assert_eq!(addr_entry(&k, Side::Remote, "2001:db8:1::/48"), hole);
    // Neither rule constrains the local side: every local address accepts both.
    assert_eq!(addr_entry(&k, Side::Local, "::/0"), wide | hole);
}

#[test]
fn nested_positive_prefixes_accumulate_and_a_negation_only_list_covers_the_rest() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "outer",
            "remote_cidrs = [\"2001:db8::/32\"]\nremote_ports = [1]"
        ),
        rule(
            "inner",
            "remote_cidrs = [\"2001:db8:5::/48\"]\nremote_ports = [2]"
        ),
        rule(
            "not-inner",
            "remote_cidrs = [\"!2001:db8:5::/48\"]\nremote_ports = [3]"
        ),
    ));
    let k = KernelPolicy::compile(p.rules());
    let (o, i, n) = (b(&p, "outer"), b(&p, "inner"), b(&p, "not-inner"));
    assert_eq!(addr_entry(&k, Side::Remote, "::/0"), n);
    assert_eq!(addr_entry(&k, Side::Remote, "2001:db8::/32"), o | n);
    assert_eq!(addr_entry(&k, Side::Remote, "2001:db8:5::/48"), o | i);
}

#[test]
fn ipv4_cidrs_never_accept_ipv6_addresses() {
    let p = policy(&rule("v4", "remote_cidrs = [\"10.0.0.0/8\"]"));
    let k = KernelPolicy::compile(p.rules());
    assert_eq!(addr_entry(&k, Side::Remote, "::/0"), 0);
    assert_eq!(k.addrs.len(), 2, "only the two defaults: {:?}", k.addrs);
}

#[test]
fn port_blocks_partition_the_port_space_and_carry_the_rules_of_each_port() {
    let p = policy(&format!(
        "{}{}",
        rule("range", "local_ports = [\"1000-2000\", \"5\"]"),
        rule("any", "priority = -1"),
    ));
    let k = KernelPolicy::compile(p.rules());
    let (range, any) = (b(&p, "range"), b(&p, "any"));
    for side in [Side::Local, Side::Remote] {
        let mut covered = vec![0u8; 65536];
        for &(s, start, len, _) in &k.ports {
            if s == side {
                for port in 0..=65535u16 {
                    if block_contains(start, len, port) {
                        covered[port as usize] += 1;
                    }
                }
            }
        }
        assert!(covered.iter().all(|c| *c == 1), "{side:?} not a partition");
    }
    for (port, want) in [
        (0, any),
        (4, any),
        (5, range | any),
        (6, any),
        (999, any),
        (1000, range | any),
        (1537, range | any),
        (2000, range | any),
        (2001, any),
        (65535, any),
    ] {
        assert_eq!(k.port_bits(Side::Local, port), want, "port {port}");
        assert_eq!(
            k.port_bits(Side::Remote, port),
            range | any,
            "remote {port}"
        );
    }
}

#[test]
fn blocks_are_aligned_and_exact() {
    for (lo, end) in [
        (0, 65536),
        (1, 65536),
        (1000, 2001),
        (5, 6),
        (65535, 65536),
        (0, 1),
    ] {
        let bl = blocks(lo, end);
        let mut next = lo;
        for (start, len) in bl {
            let size = 1u32 << (16 - u32::from(len));
            assert_eq!(u32::from(start), next);
            assert_eq!(u32::from(start) % size, 0, "unaligned block {start}/{len}");
            next += size;
        }
        assert_eq!(next, end);
    }
}

#[test]
fn the_lowest_matching_bit_is_the_rule_of_highest_precedence() {
    let p = policy(&format!(
        "{}{}{}",
        rule("low", "remote_ports = [\"1-65535\"]"),
        rule("high", "remote_ports = [443]\npriority = 5"),
        rule(
            "udp",
            "protocol = \"udp\"\nremote_ports = [443]\npriority = 9"
        ),
    ));
    let k = KernelPolicy::compile(p.rules());
    let pos = |n: &str| p.rules().position(|r| &*r.id.name == n).unwrap();
    let tcp443 = sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:443", Some(0));
    let tcp80 = sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:80", Some(0));
    let udp443 = sock(Protocol::Udp, "[fd00::1]:4000", "[fd00::2]:443", None);
    assert_eq!(k.evaluate(&tcp443), KernelVerdict::Rule(pos("high")));
    assert_eq!(k.evaluate(&tcp80), KernelVerdict::Rule(pos("low")));
    assert_eq!(k.evaluate(&udp443), KernelVerdict::Rule(pos("udp")));
}

#[test]
fn a_userspace_rule_that_could_win_stops_the_kernel_and_one_that_cannot_does_not() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "proc",
            "process = [\"xrootd\"]\nremote_ports = [1094]\npriority = 5"
        ),
        rule("port", "remote_ports = [\"1000-2000\"]"),
    ));
    let k = KernelPolicy::compile(p.rules());
    assert_eq!(k.stop, b(&p, "proc"));
    let s1094 = sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:1094", Some(0));
    let s1095 = sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:1095", Some(0));
    assert_eq!(k.evaluate(&s1094), KernelVerdict::Userspace);
    assert_eq!(
        k.evaluate(&s1095),
        KernelVerdict::Rule(p.rules().position(|r| &*r.id.name == "port").unwrap())
    );
    let ex: Vec<bool> = k.exactness.iter().map(Exactness::is_exact).collect();
    assert_eq!(ex, [false, true]);
    assert_eq!(
        k.exactness[1],
        Exactness::ExactUnless(vec!["atlas.toml:proc".into()])
    );
}

#[test]
fn uids_select_rules_and_an_unknown_uid_defers_rules_with_users() {
    let p = policy(&format!(
        "{}{}",
        rule("xrootd", "users = [\"xrootd\"]\npriority = 5"),
        rule("rest", ""),
    ));
    let k = KernelPolicy::compile(p.rules());
    assert_eq!(k.uids, vec![(996, b(&p, "xrootd"))]);
    assert_eq!(k.any_uid, b(&p, "rest"));
    let s = |uid| sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:80", uid);
    assert_eq!(k.evaluate(&s(Some(996))), KernelVerdict::Rule(0));
    assert_eq!(k.evaluate(&s(Some(0))), KernelVerdict::Rule(1));
    assert_eq!(k.evaluate(&s(None)), KernelVerdict::Userspace);
}

#[test]
fn rules_past_the_limit_stay_in_userspace_and_say_so() {
    let text: String = (0..MAX_RULES + 2)
        .map(|i| rule(&format!("r{i}"), &format!("remote_ports = [{}]", i + 1)))
        .collect();
    let p = policy(&text);
    let k = KernelPolicy::compile(p.rules());
    assert_eq!(k.rules.len(), MAX_RULES);
    assert_eq!(k.exactness.len(), MAX_RULES + 2);
    assert!(k.exactness[..MAX_RULES].iter().all(Exactness::is_exact));
    assert_eq!(k.exactness[MAX_RULES], Exactness::BeyondLimit);
    // A socket only rule MAX_RULES matches: the kernel finds nothing, userspace decides.
    let port = p
        .rules()
        .nth(MAX_RULES)
        .unwrap()
        .matcher
        .remote_ports
        .clone()
        .unwrap();
    let s = sock(
        Protocol::Tcp,
        "[fd00::1]:4000",
        &format!("[fd00::2]:{}", port.ranges[0].0),
        Some(0),
    );
    assert_eq!(k.evaluate(&s), KernelVerdict::NoMatch);
    assert!(p
        .evaluate(&crate::policy::SocketAttrs {
            proto: Protocol::Tcp,
            local: s.local.into(),
            remote: s.remote.into(),
            direction: Direction::Outbound,
            uid: Some(0),
            owner: crate::model::facts::OwnerFacts {
                gid: None,
                comm: None,
                exe: None,
                cgroup: None,
            },
        })
        .is_some());
}

/// A rule constraining only `f`, and, if the kernel decides `f`, a socket that `f`
/// rejects; [`base`] passes every one of these rules.
fn only(f: Field) -> (&'static str, Option<KernelSocket>) {
    let s = base();
    let with = |local: &str, remote: &str, uid| Some(sock(Protocol::Tcp, local, remote, uid));
    match f {
        Field::Protocol => (
            "protocol = \"tcp\"",
            Some(KernelSocket {
                proto: Protocol::Udp,
                ..s
            }),
        ),
        Field::Direction => (
            "direction = \"outbound\"",
            Some(KernelSocket {
                direction: Direction::Inbound,
                ..s
            }),
        ),
        Field::LocalCidrs => (
            "local_cidrs = [\"fd00::1\"]",
            with("[fd00::3]:4000", "[fd00::2]:1094", Some(996)),
        ),
        Field::RemoteCidrs => (
            "remote_cidrs = [\"fd00::2\"]",
            with("[fd00::1]:4000", "[fd00::3]:1094", Some(996)),
        ),
        Field::LocalPorts => (
            "local_ports = [4000]",
            with("[fd00::1]:4001", "[fd00::2]:1094", Some(996)),
        ),
        Field::RemotePorts => (
            "remote_ports = [1094]",
            with("[fd00::1]:4000", "[fd00::2]:1095", Some(996)),
        ),
        Field::Users => (
            "users = [\"xrootd\"]",
            with("[fd00::1]:4000", "[fd00::2]:1094", Some(0)),
        ),
        Field::Groups => ("groups = [\"root\"]", None),
        Field::Process => ("process = [\"xrootd\"]", None),
        Field::Exe => ("exe = [\"/usr/bin/xrootd\"]", None),
        Field::Cgroup => ("cgroup = [\"/system.slice\"]", None),
    }
}

fn base() -> KernelSocket {
    sock(Protocol::Tcp, "[fd00::1]:4000", "[fd00::2]:1094", Some(996))
}

/// `decides` is what the tables do: a field the kernel claims is compiled into them
/// (a socket it rejects finds no rule), every other field defers to userspace.
#[test]
fn every_field_the_kernel_decides_is_in_its_tables_and_every_other_defers() {
    let s = base();
    for f in Field::ALL {
        let (body, rejected) = only(f);
        let p = policy(&rule("r", body));
        let k = KernelPolicy::compile(p.rules());
        assert_eq!(decides(f), rejected.is_some(), "{f:?}");
        match rejected {
            Some(r) => {
                assert_eq!(
                    k.evaluate(&s),
                    KernelVerdict::Rule(0),
                    "{f:?} accepts {s:?}"
                );
                assert_eq!(
                    k.evaluate(&r),
                    KernelVerdict::NoMatch,
                    "{f:?} rejects {r:?}"
                );
            }
            None => assert_eq!(k.evaluate(&s), KernelVerdict::Userspace, "{f:?}"),
        }
    }
}
