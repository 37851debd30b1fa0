//! Compiles the kernel-decidable part of a policy into the bitmaps the BPF decision
//! reads (bpf/flowd.h, "In-kernel policy decisions"), so matched flows are marked from
//! their first packet.
//!
//! Rule `i` in precedence order is bit `i` of every bitmap (at most [`MAX_RULES`]).
//! For each field the compiler answers "which rules accept this value":
//! - addresses: an LPM trie per side whose entry for prefix `L` holds the rules that
//!   contain every address whose longest listed prefix is `L`. Since every prefix any
//!   rule names is in the trie, the prefixes containing such an address are exactly
//!   those containing `L`, so a rule accepts it iff some positive entry contains `L`
//!   (or it has none) and no negated entry contains `L`. `::/0` is the default entry;
//! - ports: the port space cut at every range boundary into intervals with one rule
//!   set each, each interval split into aligned power-of-two blocks for an LPM trie;
//! - uids: a hash map uid -> rules listing it, plus `any_uid` (rules without `users`);
//! - protocol and direction: one mask per value.
//!
//! A rule that needs userspace facts (process, exe, cgroup, groups) keeps its bit,
//! with its kernel-checkable fields, and is also a `stop` bit: when it is the lowest
//! set bit, userspace might match it, so the kernel leaves the flow to userspace.
//! Rules past [`MAX_RULES`] are not compiled: the kernel then finds no match for
//! sockets only they match, and userspace decides those flows.
//!
//! Only IPv6 is compiled: IPv4 has no flow label, so the kernel never decides it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv6Net};

use super::rule::{Field, Rule};
use super::sets::{CidrSet, PortSet};
use crate::model::socket::{Direction, Protocol};

/// Rules the kernel evaluates (FLOWD_KRULES_MAX in bpf/flowd.h).
pub const MAX_RULES: usize =
    crate::bpf::marker::types::flowd_krule_limits::FLOWD_KRULES_MAX.0 as usize;

/// A set of rules, bit `i` = rule `i` in precedence order.
pub type RuleBits = u128;

/// Which side of the flow a trie entry is for (FLOWD_KSIDE_* in bpf/flowd.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Local = 0,
    Remote = 1,
}

/// One compiled rule: the tag it gives, and whether userspace must decide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    pub experiment: u16,
    pub activity: u8,
    /// Needs process facts: a stop bit.
    pub userspace_only: bool,
}

/// Whether a rule's flows are marked from their first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exactness {
    /// Decided in the kernel before the first packet leaves.
    Exact,
    /// Exact, except for sockets that a higher-precedence rule needing process
    /// facts could also match (named here): those wait for userspace.
    ExactUnless(Vec<String>),
    /// Needs process, exe, cgroup or group: decided in userspace after the tracker
    /// reports the socket, so the first packets go out unmarked.
    NeedsProcessFacts,
    /// Past the kernel's rule limit: decided in userspace.
    BeyondLimit,
}

impl Exactness {
    pub fn is_exact(&self) -> bool {
        matches!(self, Exactness::Exact | Exactness::ExactUnless(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Exactness::Exact => "first-packet exact (decided in the kernel)".into(),
            Exactness::ExactUnless(v) => format!(
                "first-packet exact, except for sockets {} could match (userspace decides those)",
                v.join(", ")
            ),
            Exactness::NeedsProcessFacts => {
                "needs process facts: decided in userspace, first packets unmarked".into()
            }
            Exactness::BeyondLimit => format!(
                "beyond the kernel's {MAX_RULES}-rule limit: decided in userspace, first packets unmarked"
            ),
        }
    }
}

/// The compiled policy, ready to be written into the BPF maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Compiled rules, index = bit.
    pub rules: Vec<KernelRule>,
    pub tcp: RuleBits,
    pub udp: RuleBits,
    pub outbound: RuleBits,
    pub inbound: RuleBits,
    pub any_uid: RuleBits,
    pub stop: RuleBits,
    /// LPM entries: (side, prefix, rules). Each side has a `::/0` entry.
    pub addrs: Vec<(Side, Ipv6Net, RuleBits)>,
    /// LPM entries: (side, block start, block prefix length 0..=16, rules). The
    /// blocks of one side partition 0..=65535.
    pub ports: Vec<(Side, u16, u8, RuleBits)>,
    pub uids: Vec<(u32, RuleBits)>,
    /// Per rule of the whole policy, in precedence order.
    pub exactness: Vec<Exactness>,
    /// The tag (experiment, activity) of a `match_all` rule, when it was compiled
    /// (within [`MAX_RULES`]; it is always the last rule): the marker labels with it
    /// every IPv6 packet that no flow entry, socket cache or decision covers.
    pub match_all: Option<(u16, u8)>,
}

/// A socket as the kernel sees it (for [`KernelPolicy::evaluate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSocket {
    pub proto: Protocol,
    pub direction: Direction,
    pub local: std::net::SocketAddrV6,
    pub remote: std::net::SocketAddrV6,
    pub uid: Option<u32>,
}

/// The kernel's answer (enum flowd_kverdict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelVerdict {
    /// No compiled rule matches.
    NoMatch,
    /// Compiled rule `i` wins.
    Rule(usize),
    /// Userspace must decide.
    Userspace,
}

/// Whether the BPF decision can decide `f`, from the packet and the socket's uid
/// alone. Userspace resolves process, exe and cgroup from /proc, and a socket carries
/// only its owner's uid (`sk->sk_uid`), not a gid. Exhaustive on purpose: a new match
/// field does not build until it is classified here, and `true` needs tables below
/// and in bpf/flowd.h that decide it, or the kernel would mark flows the field rejects.
pub fn decides(f: Field) -> bool {
    match f {
        // The `tcp`/`udp` masks.
        Field::Protocol => true,
        // The `outbound`/`inbound` masks.
        Field::Direction => true,
        // The per-side address tries.
        Field::LocalCidrs | Field::RemoteCidrs => true,
        // The per-side port tries.
        Field::LocalPorts | Field::RemotePorts => true,
        // The uid map and `any_uid`.
        Field::Users => true,
        Field::Groups | Field::Process | Field::Exe | Field::Cgroup => false,
    }
}

fn bit(i: usize) -> RuleBits {
    1u128 << i
}

impl KernelPolicy {
    /// Compiles `rules` (sorted by precedence, as `Policy::rules` yields them).
    pub fn compile<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> KernelPolicy {
        let all: Vec<&Rule> = rules.into_iter().collect();
        let compiled = &all[..all.len().min(MAX_RULES)];
        let mut k = KernelPolicy::default();
        for (i, r) in compiled.iter().enumerate() {
            let m = &r.matcher;
            let b = bit(i);
            k.rules.push(KernelRule {
                experiment: r.experiment,
                activity: r.activity,
                userspace_only: !r.kernel_decidable(),
            });
            if m.protocol.is_none_or(|p| p == Protocol::Tcp) {
                k.tcp |= b;
            }
            if m.protocol.is_none_or(|p| p == Protocol::Udp) {
                k.udp |= b;
            }
            if m.direction.is_none_or(|d| d == Direction::Outbound) {
                k.outbound |= b;
            }
            if m.direction.is_none_or(|d| d == Direction::Inbound) {
                k.inbound |= b;
            }
            if m.users.is_none() {
                k.any_uid |= b;
            }
            if !r.kernel_decidable() {
                k.stop |= b;
            }
        }
        for side in [Side::Local, Side::Remote] {
            let cidrs: Vec<Option<&CidrSet>> = compiled
                .iter()
                .map(|r| match side {
                    Side::Local => r.matcher.local_cidrs.as_ref(),
                    Side::Remote => r.matcher.remote_cidrs.as_ref(),
                })
                .collect();
            k.addrs
                .extend(addr_entries(&cidrs).into_iter().map(|(n, b)| (side, n, b)));
            let ports: Vec<Option<&PortSet>> = compiled
                .iter()
                .map(|r| match side {
                    Side::Local => r.matcher.local_ports.as_ref(),
                    Side::Remote => r.matcher.remote_ports.as_ref(),
                })
                .collect();
            k.ports.extend(
                port_entries(&ports)
                    .into_iter()
                    .map(|(p, l, b)| (side, p, l, b)),
            );
        }
        k.match_all = compiled
            .iter()
            .find(|r| r.match_all)
            .map(|r| (r.experiment, r.activity));
        let uids: BTreeSet<u32> = compiled
            .iter()
            .filter_map(|r| r.matcher.users.as_ref())
            .flatten()
            .map(|a| a.id)
            .collect();
        for uid in uids {
            let bits = compiled
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.matcher
                        .users
                        .as_ref()
                        .is_some_and(|v| v.iter().any(|a| a.id == uid))
                })
                .fold(0, |acc, (i, _)| acc | bit(i));
            k.uids.push((uid, bits));
        }
        k.exactness = all
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if i >= MAX_RULES {
                    Exactness::BeyondLimit
                } else if !r.kernel_decidable() {
                    Exactness::NeedsProcessFacts
                } else {
                    let blockers: Vec<String> = all[..i]
                        .iter()
                        .filter(|h| !h.kernel_decidable() && h.matcher.overlaps(&r.matcher))
                        .map(|h| h.id.to_string())
                        .collect();
                    if blockers.is_empty() {
                        Exactness::Exact
                    } else {
                        Exactness::ExactUnless(blockers)
                    }
                }
            })
            .collect();
        k
    }

    /// What the BPF decision computes, evaluated from the compiled tables the same
    /// way (longest-prefix lookups, AND, lowest bit, stop bits): the compiler's
    /// own check, and the reference the kernel is tested against.
    pub fn evaluate(&self, s: &KernelSocket) -> KernelVerdict {
        let mut m = match s.proto {
            Protocol::Tcp => self.tcp,
            Protocol::Udp => self.udp,
        };
        m &= match s.direction {
            Direction::Outbound => self.outbound,
            _ => self.inbound,
        };
        let mut stop = self.stop;
        match s.uid {
            Some(uid) => {
                let listed = self
                    .uids
                    .iter()
                    .find(|(u, _)| *u == uid)
                    .map_or(0, |(_, b)| *b);
                m &= self.any_uid | listed;
            }
            None => stop |= !self.any_uid,
        }
        m &= self.port_bits(Side::Local, s.local.port());
        m &= self.port_bits(Side::Remote, s.remote.port());
        m &= self.addr_bits(Side::Local, *s.local.ip());
        m &= self.addr_bits(Side::Remote, *s.remote.ip());
        if m == 0 {
            return KernelVerdict::NoMatch;
        }
        let low = m & m.wrapping_neg();
        if stop & low != 0 {
            KernelVerdict::Userspace
        } else {
            KernelVerdict::Rule(low.trailing_zeros() as usize)
        }
    }

    fn port_bits(&self, side: Side, port: u16) -> RuleBits {
        self.ports
            .iter()
            .filter(|(s, start, len, _)| *s == side && block_contains(*start, *len, port))
            .max_by_key(|e| e.2)
            .map_or(0, |e| e.3)
    }

    fn addr_bits(&self, side: Side, ip: std::net::Ipv6Addr) -> RuleBits {
        self.addrs
            .iter()
            .filter(|(s, n, _)| *s == side && n.contains(&ip))
            .max_by_key(|e| e.1.prefix_len())
            .map_or(0, |e| e.2)
    }
}

fn block_contains(start: u16, len: u8, port: u16) -> bool {
    let shift = 16 - u32::from(len);
    shift == 16 || (u32::from(start) >> shift) == (u32::from(port) >> shift)
}

fn v6(n: &IpNet) -> Option<Ipv6Net> {
    match n {
        IpNet::V6(n) => Some(*n),
        IpNet::V4(_) => None,
    }
}

/// Trie entries of one side: every IPv6 prefix some rule names, plus `::/0`.
fn addr_entries(cidrs: &[Option<&CidrSet>]) -> Vec<(Ipv6Net, RuleBits)> {
    let everything = Ipv6Net::default();
    let mut prefixes: BTreeSet<Ipv6Net> = BTreeSet::from([everything]);
    for c in cidrs.iter().flatten() {
        prefixes.extend(c.pos.iter().chain(&c.neg).filter_map(v6));
    }
    prefixes
        .into_iter()
        .map(|l| {
            let bits = cidrs
                .iter()
                .enumerate()
                .filter(|(_, c)| match c {
                    None => true,
                    Some(c) => {
                        let covers = |n: &IpNet| v6(n).is_some_and(|n| n.contains(&l));
                        (c.pos.is_empty() || c.pos.iter().any(covers)) && !c.neg.iter().any(covers)
                    }
                })
                .fold(0, |acc, (i, _)| acc | bit(i));
            (l, bits)
        })
        .collect()
}

/// Trie entries of one side: (block start, prefix length, rules), partitioning the
/// port space.
fn port_entries(ports: &[Option<&PortSet>]) -> Vec<(u16, u8, RuleBits)> {
    let mut cuts: BTreeSet<u32> = BTreeSet::from([0, 65536]);
    for p in ports.iter().flatten() {
        for &(lo, hi) in &p.ranges {
            cuts.insert(u32::from(lo));
            cuts.insert(u32::from(hi) + 1);
        }
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    // Intervals with one rule set each; neighbours with equal sets merged.
    let mut intervals: Vec<(u32, u32, RuleBits)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, end) = (w[0], w[1]);
        let bits = ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none_or(|p| p.contains(lo as u16)))
            .fold(0, |acc, (i, _)| acc | bit(i));
        match intervals.last_mut() {
            Some(last) if last.2 == bits => last.1 = end,
            _ => intervals.push((lo, end, bits)),
        }
    }
    let mut out = Vec::new();
    for (lo, end, bits) in intervals {
        for (start, len) in blocks(lo, end) {
            out.push((start, len, bits));
        }
    }
    out
}

/// Splits `[lo, end)` (within 0..=65536) into aligned power-of-two blocks, as
/// (start, prefix length over 16 bits).
fn blocks(mut lo: u32, end: u32) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    while lo < end {
        let align = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        let mut size_log = align;
        while (1u32 << size_log) > end - lo {
            size_log -= 1;
        }
        out.push((lo as u16, (16 - size_log) as u8));
        lo += 1 << size_log;
    }
    out
}

/// Unmapped IPv6 of a socket address, for callers building [`KernelSocket`]s.
pub fn as_v6(ip: IpAddr) -> Option<std::net::Ipv6Addr> {
    match ip {
        IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => Some(a),
        _ => None,
    }
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
