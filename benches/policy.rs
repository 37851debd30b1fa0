//! Matching cost per socket with 1 000 rules, and memory per compiled rule.
//!
//! Run: `cargo run --release --example bench`. Rules are a realistic mix (service ports,
//! peer networks with port ranges, wide port ranges with networks, cgroup/process only)
//! spread over 10 files; sockets are a mix of hits and misses.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use flowd::model::socket::{Direction, Protocol};
use flowd::policy::{Policy, Registry, SocketAttrs, StaticAccounts};

/// Small deterministic PRNG (xorshift64*) so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rules_text(rng: &mut Rng, file: usize, n: usize) -> String {
    let exps = [
        "atlas", "cms", "lhcb", "alice", "belleii", "ska", "dune", "lsst", "ilc", "auger",
    ];
    let mut t = format!("experiment = \"{}\"\n", exps[file]);
    for i in 0..n {
        // Distinct priorities: the bench measures matching, not conflict resolution.
        let prio = (file * n + i) as i64;
        t += &format!(
            "[[rule]]\nname = \"r{i}\"\nactivity = {}\npriority = {prio}\n",
            1 + rng.below(4)
        );
        match rng.below(10) {
            0..=3 => {
                t += &format!(
                    "protocol = \"tcp\"\ndirection = \"inbound\"\nlocal_ports = [{}]\nusers = [{}]\n",
                    1000 + rng.below(2000),
                    rng.below(50)
                );
            }
            4..=6 => {
                let lo = 2000 + rng.below(1000);
                t += &format!(
                    "remote_cidrs = [\"10.{}.{}.0/24\", \"2001:db8:{:x}::/48\"]\nremote_ports = [\"{lo}-{}\"]\n",
                    rng.below(256),
                    rng.below(256),
                    rng.below(65536),
                    lo + rng.below(16)
                );
            }
            7..=8 => {
                t += &format!(
                    "local_ports = [\"20000-25000\"]\nremote_cidrs = [\"10.{}.0.0/16\", \"!10.{}.1.0/24\"]\n",
                    rng.below(256),
                    rng.below(256)
                );
            }
            _ => {
                t += &format!(
                    "cgroup = [\"/system.slice/svc{}@*\"]\nprocess = [\"proc{}\"]\n",
                    rng.below(100),
                    rng.below(100)
                );
            }
        }
    }
    t
}

fn sockets(rng: &mut Rng, n: usize) -> Vec<SocketAttrs> {
    (0..n)
        .map(|_| {
            let v6 = rng.below(4) == 0;
            let remote_ip = if v6 {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    rng.below(65536) as u16,
                    0,
                    0,
                    0,
                    0,
                    1,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    10,
                    rng.below(256) as u8,
                    rng.below(256) as u8,
                    7,
                ))
            };
            let local_ip = if v6 {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            } else {
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
            };
            let lport = match rng.below(3) {
                0 => 1000 + rng.below(2000),
                1 => 20000 + rng.below(5000),
                _ => 30000 + rng.below(30000),
            } as u16;
            SocketAttrs {
                proto: if rng.below(8) == 0 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                local: SocketAddr::new(local_ip, lport),
                remote: SocketAddr::new(remote_ip, 1024 + rng.below(3000) as u16),
                direction: if rng.below(2) == 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                uid: Some(rng.below(60) as u32),
                owner: flowd::model::facts::OwnerFacts {
                    gid: None,
                    comm: Some(format!("proc{}", rng.below(120))),
                    exe: None,
                    cgroup: Some(format!("/system.slice/svc{}@x.service", rng.below(120))),
                },
            }
        })
        .collect()
}

fn run(title: &str, sources: &[(PathBuf, String)], socks: &[SocketAttrs]) {
    let t0 = Instant::now();
    let policy =
        Policy::from_sources_with(sources, &Registry::bundled(), &StaticAccounts::default())
            .unwrap_or_else(|e| panic!("{e}"));
    let load = t0.elapsed();
    let n_rules = policy.rules().len();

    let rounds = 50;
    let t0 = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for s in socks {
            hits += black_box(policy.evaluate(black_box(s))).is_some() as usize;
        }
    }
    let indexed = t0.elapsed().as_nanos() as f64 / (rounds * socks.len()) as f64;

    let t0 = Instant::now();
    let mut linear_hits = 0usize;
    for _ in 0..rounds / 10 {
        for s in socks {
            linear_hits += black_box(policy.rules().find(|r| r.matcher.matches(black_box(s))))
                .is_some() as usize;
        }
    }
    let linear = t0.elapsed().as_nanos() as f64 / (rounds / 10 * socks.len()) as f64;
    assert_eq!(
        hits / rounds,
        linear_hits / (rounds / 10),
        "index and linear scan disagree"
    );

    let mem = policy.memory_bytes();
    println!("== {title}");
    println!(
        "rules: {n_rules} in {} files, load+validate: {:.1} ms",
        sources.len(),
        load.as_secs_f64() * 1e3
    );
    println!(
        "sockets: {}, matched: {:.1}%",
        socks.len(),
        100.0 * (hits / rounds) as f64 / socks.len() as f64
    );
    println!("evaluate (indexed): {indexed:.0} ns/socket");
    println!("linear scan:        {linear:.0} ns/socket");
    println!(
        "memory: {mem} bytes total, {} bytes/rule (incl. index; the Rule struct itself is {} bytes)",
        mem / n_rules,
        std::mem::size_of::<flowd::policy::Rule>()
    );
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let sources: Vec<(PathBuf, String)> = (0..10)
        .map(|f| {
            (
                PathBuf::from(format!("p/{f:02}.toml")),
                rules_text(&mut rng, f, 100),
            )
        })
        .collect();
    let socks = sockets(&mut rng, 10_000);
    run(
        "realistic mix (ports, networks, processes)",
        &sources,
        &socks,
    );

    // Worst case for the index: no rule pins a port, a narrow network or a process.
    let worst: Vec<(PathBuf, String)> = (0..10)
        .map(|f| {
            let mut t = format!("experiment = {}\n", f + 1);
            for i in 0..100 {
                t += &format!(
                    "[[rule]]\nname = \"r{i}\"\nactivity = 1\npriority = {}\ndirection = \"{}\"\nremote_cidrs = [\"10.0.0.0/8\", \"!10.{}.0.0/16\"]\nremote_ports = [\"1024-65535\"]\n",
                    f * 100 + i,
                    if rng.below(2) == 0 { "inbound" } else { "outbound" },
                    rng.below(256)
                );
            }
            (PathBuf::from(format!("w/{f:02}.toml")), t)
        })
        .collect();
    run(
        "worst case (every rule in the wildcard list)",
        &worst,
        &socks,
    );
}
