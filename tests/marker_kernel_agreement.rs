//! One policy, two evaluators: the compiled policy as the kernel runs it
//! (`flowd_kdecide_test`, the same `kdecide` the TC and sockops programs call,
//! through BPF_PROG_TEST_RUN) agrees with `Policy::evaluate`. Privileged (loads BPF).

mod common;
#[path = "common/policy.rs"]
mod policy_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use flowd::bpf::marker::types::{flowd_ksock, flowd_ktest};
use flowd::bpf::marker::MarkerSkel;
use flowd::marker::maps::{as_bytes, bpf_key, from_bytes, MarkMaps};
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{Direction, FlowKey, Protocol};
use flowd::model::tag::decode;
use flowd::policy::kernel::{KernelPolicy, KernelSocket, KernelVerdict};
use flowd::policy::{ErrorKind, Policy, SocketAttrs};
use ipnet::IpNet;
use libbpf_rs::{MapCore, MapFlags, ProgramInput};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use policy_common::{render, Spec, SpecShape};

struct Kernel {
    skel: MarkerSkel<'static>,
    maps: MarkMaps,
}

fn kernel() -> Kernel {
    let skel = load(&LoadOptions {
        in_kernel: true,
        with_test_program: true,
        map_capacity: 16,
        ..Default::default()
    })
    .expect("load marker with the decision test program");
    let maps = maps_of(&skel, 16).unwrap();
    Kernel { skel, maps }
}

/// The verdict of the kernel's `kdecide`, as rule index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    NoMatch,
    Rule(usize, u16, u8),
    Userspace,
    Off,
}

impl Kernel {
    fn decide(&self, s: &KernelSocket) -> Got {
        let t = flowd_ktest {
            sock: flowd_ksock {
                laddr: s.local.ip().octets(),
                raddr: s.remote.ip().octets(),
                lport: s.local.port(),
                rport: s.remote.port(),
                proto: match s.proto {
                    Protocol::Tcp => 6,
                    Protocol::Udp => 17,
                },
                direction: if s.direction == Direction::Outbound {
                    1
                } else {
                    2
                },
                uid_known: u8::from(s.uid.is_some()),
                pad: 0,
                uid: s.uid.unwrap_or(0),
            },
            ..Default::default()
        };
        let r = self.run(&t);
        match r.verdict {
            0 => Got::NoMatch,
            1 => {
                assert_eq!(
                    decode(r.mark.label).entropy,
                    0,
                    "rule marks carry no entropy"
                );
                Got::Rule(r.rule as usize, r.mark.experiment, r.mark.activity)
            }
            2 => Got::Userspace,
            3 => Got::Off,
            v => panic!("verdict {v}"),
        }
    }

    /// The entropy bits the kernel's flow_entropy gives `flow`.
    fn entropy(&self, flow: &FlowKey) -> u8 {
        let t = flowd_ktest {
            key: bpf_key(flow).unwrap(),
            ..Default::default()
        };
        let r = self.run(&t);
        assert_eq!(r.entropy & !0xC0103, 0, "entropy outside its label bits");
        decode(r.entropy).entropy
    }

    /// Runs flowd_kdecide_test on `t`, returns what it wrote back.
    fn run(&self, t: &flowd_ktest) -> flowd_ktest {
        let map = &self.skel.maps.flowd_ktest_map;
        map.update(&0u32.to_ne_bytes(), as_bytes(t), MapFlags::ANY)
            .unwrap();
        // Any frame will do: the program reads its input from the map.
        let mut frame = vec![0u8; 14 + 40];
        frame[12] = 0x86;
        frame[13] = 0xdd;
        frame[14] = 0x60;
        let out = self
            .skel
            .progs
            .flowd_kdecide_test
            .test_run(ProgramInput {
                data_in: Some(&frame),
                ..Default::default()
            })
            .expect("test_run");
        assert_eq!(out.return_value, 0);
        let raw = map
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .unwrap()
            .unwrap();
        from_bytes::<flowd_ktest>(&raw)
    }
}

fn v6(x: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x)
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        // Nested IPv6 prefixes around a small address space, so that rules overlap.
        6 => (0u16..32, 120u8..=128).prop_map(|(x, l)| IpNet::new(IpAddr::V6(v6(x)), l).unwrap().trunc()),
        1 => (0u16..32).prop_map(|x| IpNet::new(IpAddr::V6(v6(x)), 64).unwrap().trunc()),
        1 => (0u8..16, 28u8..=32).prop_map(|(x, l)| IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, x)), l).unwrap().trunc()),
    ]
}

fn ports() -> impl Strategy<Value = Vec<(u16, u16)>> {
    prop::collection::vec(
        prop_oneof![
            4 => (1u16..=8, 0u16..3).prop_map(|(lo, w)| (lo, lo + w)),
            1 => (1u16..=65535).prop_map(|p| (p, p)),
            1 => (1u16..=60000, 0u16..5000).prop_map(|(lo, w)| (lo, lo + w)),
        ],
        1..4,
    )
}

fn spec() -> impl Strategy<Value = Spec> {
    policy_common::spec(&SpecShape {
        net: net().boxed(),
        ports: ports().boxed(),
        weight: 0.35,
        process_weight: 0.15,
        max_activity: 4,
    })
}

fn socket() -> impl Strategy<Value = (KernelSocket, Option<String>)> {
    let port = || prop_oneof![4 => 1u16..=10, 1 => any::<u16>()];
    (
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
        prop_oneof![Just(Direction::Inbound), Just(Direction::Outbound)],
        (0u16..40, port(), 0u16..40, port()),
        prop::option::weighted(0.8, 0u32..4),
        prop::option::of(prop_oneof![Just("a".to_owned()), Just("b".to_owned())]),
    )
        .prop_map(|(proto, direction, (la, lp, ra, rp), uid, comm)| {
            (
                KernelSocket {
                    proto,
                    direction,
                    local: SocketAddrV6::new(v6(la), lp, 0, 0),
                    remote: SocketAddrV6::new(v6(ra), rp, 0, 0),
                    uid,
                },
                comm,
            )
        })
}

fn attrs(s: &KernelSocket, comm: Option<String>) -> SocketAttrs {
    SocketAttrs {
        proto: s.proto,
        local: SocketAddr::V6(s.local),
        remote: SocketAddr::V6(s.remote),
        direction: s.direction,
        uid: s.uid,
        owner: flowd::model::facts::OwnerFacts {
            gid: None,
            comm,
            exe: None,
            cgroup: None,
        },
    }
}

/// Checks one policy against a batch of sockets; the error names what disagreed.
fn check(
    k: &Kernel,
    policy: &Policy,
    sockets: &[(KernelSocket, Option<String>)],
) -> Result<(), String> {
    let compiled = KernelPolicy::compile(policy.rules());
    k.maps
        .install_policy(&compiled)
        .map_err(|e| e.to_string())?;
    let rules: Vec<_> = policy.rules().collect();
    let userspace_rules = rules.iter().any(|r| !r.kernel_decidable());
    for (s, comm) in sockets {
        let got = k.decide(s);
        // 1. The BPF decision is the compiled tables' decision, bit for bit.
        let model = match compiled.evaluate(s) {
            KernelVerdict::NoMatch => Got::NoMatch,
            KernelVerdict::Userspace => Got::Userspace,
            KernelVerdict::Rule(i) => Got::Rule(i, rules[i].experiment, rules[i].activity),
        };
        if got != model {
            return Err(format!(
                "kernel {got:?} != compiled model {model:?} for {s:?}"
            ));
        }
        // 2. Whatever the process facts, a kernel decision is the userspace one.
        for c in [
            None,
            Some("a".to_owned()),
            Some("b".to_owned()),
            comm.clone(),
        ] {
            let want = policy.evaluate(&attrs(s, c.clone()));
            let ok = match got {
                Got::Rule(i, e, a) => want.as_ref().is_some_and(|v| {
                    v.rule == rules[i].id && (v.tag.experiment, v.tag.activity) == (e, a)
                }),
                Got::NoMatch => want.is_none(),
                Got::Userspace => true,
                Got::Off => false,
            };
            if !ok {
                return Err(format!(
                    "kernel {got:?} but userspace {want:?} for {s:?} comm {c:?}"
                ));
            }
        }
        // 3. And the kernel only defers when it must: with every rule decidable in
        // the kernel and the uid known, it always decides.
        if !userspace_rules && s.uid.is_some() && got == Got::Userspace {
            return Err(format!("kernel deferred a decidable socket {s:?}"));
        }
    }
    Ok(())
}

#[test]
fn kernel_decisions_agree_with_policy_evaluate_on_random_policies() {
    if !common::privileged() {
        return;
    }
    let k = kernel();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        ..Config::default()
    });
    let decided = std::cell::RefCell::new([0usize; 3]);
    runner
        .run(
            &(
                prop::collection::vec(spec(), 1..12),
                prop::collection::vec(socket(), 1..24),
            ),
            |(specs, sockets)| {
                let text = render(&specs);
                let policy = match policy_common::load(&[("p/atlas.toml", &text)]) {
                    Ok(p) => p,
                    Err(e) => {
                        prop_assert!(
                            e.0.iter().all(|e| e.kind == ErrorKind::Conflict),
                            "{e}\n{text}"
                        );
                        return Ok(());
                    }
                };
                if let Err(e) = check(&k, &policy, &sockets) {
                    prop_assert!(false, "{e}\npolicy:\n{text}");
                }
                for (s, _) in &sockets {
                    let i = match k.decide(s) {
                        Got::Rule(..) => 0,
                        Got::NoMatch => 1,
                        _ => 2,
                    };
                    decided.borrow_mut()[i] += 1;
                }
                Ok(())
            },
        )
        .unwrap();
    let decided = decided.into_inner();
    eprintln!(
        "kernel verdicts: {} rule, {} no match, {} userspace",
        decided[0], decided[1], decided[2]
    );
    assert!(
        decided[0] > 100 && decided[1] > 100 && decided[2] > 10,
        "{decided:?}"
    );
}

#[test]
fn a_policy_reload_switches_slots_and_the_new_policy_alone_decides() {
    if !common::privileged() {
        return;
    }
    let k = kernel();
    let s = KernelSocket {
        proto: Protocol::Tcp,
        direction: Direction::Outbound,
        local: SocketAddrV6::new(v6(1), 40000, 0, 0),
        remote: SocketAddrV6::new(v6(2), 1094, 0, 0),
        uid: Some(0),
    };
    assert_eq!(k.decide(&s), Got::Off, "no policy yet");
    let gen0 = k.maps.kernel().unwrap().generation().unwrap();
    for (round, (ports, want_act)) in [
        ("[1094]", 3u8),
        ("[1095]", 0),
        ("[\"1000-2000\"]", 7),
        ("[1094]", 3),
    ]
    .into_iter()
    .enumerate()
    {
        let text = format!(
            "experiment = 2\n[[rule]]\nname = \"x\"\nactivity = {}\nremote_ports = {ports}\n",
            if want_act == 0 { 1 } else { want_act }
        );
        let p = policy_common::load(&[("p/atlas.toml", &text)]).unwrap();
        k.maps
            .install_policy(&KernelPolicy::compile(p.rules()))
            .unwrap();
        let got = k.decide(&s);
        if want_act == 0 {
            assert_eq!(got, Got::NoMatch, "round {round}");
        } else {
            assert_eq!(got, Got::Rule(0, 2, want_act), "round {round}");
        }
        assert_eq!(
            k.maps.kernel().unwrap().generation().unwrap(),
            gen0 + round as u32 + 1
        );
    }
    k.maps.kernel().unwrap().disable().unwrap();
    assert_eq!(k.decide(&s), Got::Off);
}

/// A flow's entropy bits are a keyed hash of its 5-tuple, computed in the kernel
/// (flow_entropy) and in userspace (MarkMaps::entropy): both must give every flow the
/// same bits, or its label would change when the other side writes its mark.
#[test]
fn kernel_and_userspace_give_a_flow_the_same_entropy() {
    if !common::privileged() {
        return;
    }
    let k = kernel();
    let seen = std::cell::RefCell::new([0u32; 32]);
    let mut runner = TestRunner::new(Config {
        cases: 500,
        ..Config::default()
    });
    runner
        .run(
            &(
                prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u16>(),
            ),
            |(proto, la, lp, ra, rp)| {
                let flow = FlowKey::new(
                    proto,
                    SocketAddr::new(Ipv6Addr::from(la).into(), lp),
                    SocketAddr::new(Ipv6Addr::from(ra).into(), rp),
                );
                if !flow.is_ipv6() {
                    return Ok(());
                }
                let kernel = k.entropy(&flow);
                prop_assert_eq!(kernel, k.maps.entropy(&flow), "{:?}", flow);
                seen.borrow_mut()[usize::from(kernel)] += 1;
                Ok(())
            },
        )
        .unwrap();
    // Spread over all 32 values, as random bits would be.
    let seen = seen.into_inner();
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
}
