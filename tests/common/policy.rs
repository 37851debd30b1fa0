//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;

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
        gid: None,
        comm: None,
        exe: None,
        cgroup: None,
    }
}

/// A randomly generated rule for property tests (tests/policy_props.rs,
/// tests/kernel_agreement.rs), rendered to TOML by [`render`].
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
