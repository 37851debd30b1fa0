//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use proptest::prelude::*;

use flowd::model::socket::{Direction, Protocol};
use flowd::policy::{Policy, PolicyErrors, Registry, SocketAttrs, StaticAccounts};

/// Accounts of a typical storage node, independent of the test machine's /etc/passwd.
pub fn accounts() -> StaticAccounts {
    StaticAccounts::new(
        &[
            ("root", 0),
            ("xrootd", 996),
            ("dcache", 997),
            ("fts3", 998),
            ("globus", 999),
            ("pscheduler", 995),
            ("owamp", 994),
        ],
        &[
            ("root", 0),
            ("xrootd", 996),
            ("dcache", 997),
            ("atlas", 5000),
        ],
    )
}

pub fn load(files: &[(&str, &str)]) -> Result<Policy, PolicyErrors> {
    let sources: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    Policy::from_sources_with(&sources, &Registry::bundled(), &accounts())
}

pub fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match load(files) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

pub fn sock(proto: Protocol, local: &str, remote: &str, direction: Direction) -> SocketAttrs {
    SocketAttrs {
        proto,
        local: local.parse::<SocketAddr>().expect("test address"),
        remote: remote.parse::<SocketAddr>().expect("test address"),
        direction,
        uid: None,
        owner: flowd::model::facts::OwnerFacts {
            gid: None,
            comm: None,
            exe: None,
            cgroup: None,
        },
    }
}

/// A randomly generated rule for property tests (tests/policy_props.rs,
/// tests/marker_kernel_agreement.rs), rendered to TOML by [`render`].
#[derive(Debug, Clone)]
pub struct Spec {
    pub priority: i32,
    pub activity: u8,
    pub proto: Option<Protocol>,
    pub direction: Option<Direction>,
    pub local_ports: Option<Vec<(u16, u16)>>,
    pub remote_ports: Option<Vec<(u16, u16)>>,
    pub local_cidrs: Option<Vec<(bool, IpNet)>>,
    pub remote_cidrs: Option<Vec<(bool, IpNet)>>,
    pub users: Option<Vec<u32>>,
    pub process: Option<Vec<String>>,
}

/// How [`spec`] distributes rules: the address and port domains, how often a field is
/// constrained, and how many activities there are (fewer = more conflicts).
pub struct SpecShape {
    pub net: BoxedStrategy<IpNet>,
    pub ports: BoxedStrategy<Vec<(u16, u16)>>,
    /// Probability that a rule constrains each field but `process`.
    pub weight: f64,
    pub process_weight: f64,
    pub max_activity: u8,
}

/// Random rules over small domains with sparse constraints, so that rules often match
/// the same sockets and precedence and conflict detection are exercised.
pub fn spec(shape: &SpecShape) -> impl Strategy<Value = Spec> {
    let net = shape.net.clone();
    let cidrs = move || prop::collection::vec((prop::bool::weighted(0.3), net.clone()), 1..4);
    let w = shape.weight;
    (
        (-1i32..=1, 1u8..=shape.max_activity),
        prop::option::weighted(w, prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]),
        prop::option::weighted(
            w,
            prop_oneof![Just(Direction::Inbound), Just(Direction::Outbound)],
        ),
        (
            prop::option::weighted(w, shape.ports.clone()),
            prop::option::weighted(w, shape.ports.clone()),
        ),
        (
            prop::option::weighted(w, cidrs()),
            prop::option::weighted(w, cidrs()),
        ),
        prop::option::weighted(w, prop::collection::vec(0u32..3, 1..3)),
        prop::option::weighted(
            shape.process_weight,
            prop::collection::vec(
                prop_oneof![Just("a".to_owned()), Just("b".to_owned())],
                1..2,
            ),
        ),
    )
        .prop_map(
            |((priority, activity), proto, direction, (lp, rp), (lc, rc), users, process)| Spec {
                priority,
                activity,
                proto,
                direction,
                local_ports: lp,
                remote_ports: rp,
                local_cidrs: lc,
                remote_cidrs: rc,
                users,
                process,
            },
        )
}

/// One policy file (experiment 2) holding `specs` as rules r0, r1, ...
pub fn render(specs: &[Spec]) -> String {
    let mut t = String::from("experiment = 2\n");
    let ports = |v: &[(u16, u16)]| {
        v.iter()
            .map(|(a, b)| format!("\"{a}-{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cidrs = |v: &[(bool, IpNet)]| {
        v.iter()
            .map(|(n, c)| format!("\"{}{c}\"", if *n { "!" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, s) in specs.iter().enumerate() {
        t += &format!(
            "[[rule]]\nname = \"r{i}\"\nactivity = {}\npriority = {}\n",
            s.activity, s.priority
        );
        if let Some(p) = s.proto {
            t += &format!("protocol = \"{}\"\n", p.as_str());
        }
        if let Some(d) = s.direction {
            t += &format!(
                "direction = \"{}\"\n",
                if d == Direction::Inbound {
                    "inbound"
                } else {
                    "outbound"
                }
            );
        }
        if let Some(v) = &s.local_ports {
            t += &format!("local_ports = [{}]\n", ports(v));
        }
        if let Some(v) = &s.remote_ports {
            t += &format!("remote_ports = [{}]\n", ports(v));
        }
        if let Some(v) = &s.local_cidrs {
            t += &format!("local_cidrs = [{}]\n", cidrs(v));
        }
        if let Some(v) = &s.remote_cidrs {
            t += &format!("remote_cidrs = [{}]\n", cidrs(v));
        }
        if let Some(v) = &s.users {
            t += &format!("users = {v:?}\n");
        }
        if let Some(v) = &s.process {
            t += &format!("process = {v:?}\n");
        }
    }
    t
}
