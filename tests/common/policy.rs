//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use flowd::discovery::types::{Direction, Protocol};
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
