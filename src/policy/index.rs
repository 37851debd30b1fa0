//! An index that narrows, for one socket, the rules worth testing.
//!
//! Each rule is filed under one key it pins, chosen in this order: the local or remote
//! port (whichever set is smaller, if it has at most 64 ports), the remote network (if
//! every positive `remote_cidrs` entry is at least an IPv4 /16 or IPv6 /32), the process
//! name; rules pinning none of these stay in a per-protocol wildcard list. Every list
//! holds rule positions in precedence order, so merging the few lists that apply to a
//! socket visits candidates in precedence order and the first match is the answer. The
//! index only skips rules that cannot match, so it is exact.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::rule::{Rule, SocketAttrs};
use super::sets::PortSet;
use crate::model::socket::Protocol;

/// Rules pinning more ports than this are not filed by port, to bound index size.
const MAX_INDEXED_PORTS: u32 = 64;
/// Network keys: the top 16 bits of an IPv4 address, the top 32 of an IPv6 one.
const V4_KEY_BITS: u8 = 16;
const V6_KEY_BITS: u8 = 32;

fn addr_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => (4 << 32) | u64::from(u32::from(a) >> (32 - V4_KEY_BITS)),
        IpAddr::V6(a) => (6 << 32) | (u128::from(a) >> (128 - V6_KEY_BITS)) as u64,
    }
}

/// The network key of a CIDR, if it is narrow enough to have exactly one.
fn net_key(net: &IpNet) -> Option<u64> {
    let min = if net.addr().is_ipv4() {
        V4_KEY_BITS
    } else {
        V6_KEY_BITS
    };
    (net.prefix_len() >= min).then(|| addr_key(net.addr()))
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    by_local_port: HashMap<u16, Vec<u32>>,
    by_remote_port: HashMap<u16, Vec<u32>>,
    by_remote_net: HashMap<u64, Vec<u32>>,
    by_process: HashMap<String, Vec<u32>>,
    by_uid: HashMap<u32, Vec<u32>>,
    rest: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct Index {
    tcp: Bucket,
    udp: Bucket,
}

fn file_ports(map: &mut HashMap<u16, Vec<u32>>, ports: &PortSet, pos: u32) {
    for &(lo, hi) in &ports.ranges {
        for port in lo..=hi {
            map.entry(port).or_default().push(pos);
        }
    }
}

impl Bucket {
    fn file(&mut self, r: &Rule, pos: u32) {
        let m = &r.matcher;
        let count = |p: &Option<PortSet>| p.as_ref().map_or(u32::MAX, PortSet::count);
        let (lc, rc) = (count(&m.local_ports), count(&m.remote_ports));
        if lc <= rc && lc <= MAX_INDEXED_PORTS {
            return file_ports(
                &mut self.by_local_port,
                m.local_ports.as_ref().expect("counted"),
                pos,
            );
        }
        if rc <= MAX_INDEXED_PORTS {
            return file_ports(
                &mut self.by_remote_port,
                m.remote_ports.as_ref().expect("counted"),
                pos,
            );
        }
        if let Some(c) = m.remote_cidrs.as_ref().filter(|c| !c.pos.is_empty()) {
            let keys: Option<Vec<u64>> = c.pos.iter().map(net_key).collect();
            if let Some(mut keys) = keys {
                keys.sort_unstable();
                keys.dedup();
                for k in keys {
                    self.by_remote_net.entry(k).or_default().push(pos);
                }
                return;
            }
        }
        if let Some(names) = &m.process {
            for n in names {
                let list = self.by_process.entry(n.clone()).or_default();
                if list.last() != Some(&pos) {
                    list.push(pos);
                }
            }
            return;
        }
        if let Some(users) = m
            .users
            .as_ref()
            .filter(|u| u.len() <= MAX_INDEXED_PORTS as usize)
        {
            // Accounts are sorted and deduplicated at compile time.
            for a in users {
                self.by_uid.entry(a.id).or_default().push(pos);
            }
            return;
        }
        self.rest.push(pos);
    }

    fn memory_bytes(&self) -> usize {
        fn map<K>(m: &HashMap<K, Vec<u32>>) -> usize {
            m.capacity() * (std::mem::size_of::<(K, Vec<u32>)>() + 1)
                + m.values().map(|v| v.capacity() * 4).sum::<usize>()
        }
        map(&self.by_local_port)
            + map(&self.by_remote_port)
            + map(&self.by_remote_net)
            + map(&self.by_process)
            + map(&self.by_uid)
            + self.by_process.keys().map(String::capacity).sum::<usize>()
            + self.rest.capacity() * 4
    }
}

impl Index {
    /// `rules` must be sorted by precedence.
    pub fn build(rules: &[Rule]) -> Index {
        let mut idx = Index::default();
        for (pos, r) in rules.iter().enumerate() {
            for (proto, bucket) in [(Protocol::Tcp, &mut idx.tcp), (Protocol::Udp, &mut idx.udp)] {
                if r.matcher.protocol.is_none_or(|p| p == proto) {
                    bucket.file(r, pos as u32);
                }
            }
        }
        idx
    }

    /// Position of the first rule (in precedence order) matching `s`.
    pub fn first_match(&self, rules: &[Rule], s: &SocketAttrs) -> Option<usize> {
        let b = match s.proto {
            Protocol::Tcp => &self.tcp,
            Protocol::Udp => &self.udp,
        };
        let empty: &[u32] = &[];
        let lists = [
            b.by_local_port
                .get(&s.local.port())
                .map_or(empty, Vec::as_slice),
            b.by_remote_port
                .get(&s.remote.port())
                .map_or(empty, Vec::as_slice),
            b.by_remote_net
                .get(&addr_key(s.remote.ip()))
                .map_or(empty, Vec::as_slice),
            match &s.owner.comm {
                Some(c) if !b.by_process.is_empty() => {
                    b.by_process.get(c.as_str()).map_or(empty, Vec::as_slice)
                }
                _ => empty,
            },
            s.uid
                .and_then(|u| b.by_uid.get(&u))
                .map_or(empty, Vec::as_slice),
            b.rest.as_slice(),
        ];
        let mut at = [0usize; 6];
        loop {
            let mut best: Option<(usize, u32)> = None;
            for (k, list) in lists.iter().enumerate() {
                if let Some(&p) = list.get(at[k]) {
                    if best.is_none_or(|(_, bp)| p < bp) {
                        best = Some((k, p));
                    }
                }
            }
            let (k, p) = best?;
            at[k] += 1;
            if rules[p as usize].matcher.matches(s) {
                return Some(p as usize);
            }
        }
    }

    pub fn memory_bytes(&self) -> usize {
        self.tcp.memory_bytes() + self.udp.memory_bytes()
    }
}
