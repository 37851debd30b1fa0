//! Value sets a rule field can hold: address sets with negation, port ranges, cgroup
//! prefixes. Each set answers three questions: does it contain a value (evaluation),
//! can it intersect another set (conflict detection), and how narrow is it (precedence).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A list of CIDRs where `!` entries subtract: an address matches if it is in some
/// positive entry (or there are none) and in no negated entry. Family-exact: an IPv4
/// entry never matches an IPv6 address (callers unmap `::ffff:a.b.c.d` first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrSet {
    pub pos: Vec<IpNet>,
    pub neg: Vec<IpNet>,
}

impl CidrSet {
    /// Parses one list entry: `[!]addr[/len]`. The error is the message for the user.
    pub fn parse_entry(raw: &str) -> Result<(bool, IpNet), String> {
        let (negated, body) = match raw.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, raw),
        };
        let net = match body.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match body.parse::<IpAddr>() {
                Ok(a) => IpNet::from(a),
                Err(_) => {
                    return Err(format!(
                        "invalid CIDR {raw:?}: expected an address or address/prefix such as \
                         \"192.0.2.0/24\" or \"2001:db8::/32\", optionally preceded by \"!\" to exclude it"
                    ))
                }
            },
        };
        if net.trunc() != net {
            let bang = if negated { "!" } else { "" };
            return Err(format!(
                "CIDR {raw:?} has bits set after the prefix length; did you mean \"{bang}{}\"?",
                net.trunc()
            ));
        }
        Ok((negated, net))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        (self.pos.is_empty() || self.pos.iter().any(|n| n.contains(&ip)))
            && !self.neg.iter().any(|n| n.contains(&ip))
    }

    /// The negated entry that excludes `ip`, for explanations.
    pub fn excluded_by(&self, ip: IpAddr) -> Option<&IpNet> {
        self.neg.iter().find(|n| n.contains(&ip))
    }

    /// Exact test: is some address in both sets?
    pub fn overlaps(&self, other: &CidrSet) -> bool {
        let everything = [
            "0.0.0.0/0".parse::<IpNet>().expect("literal"),
            "::/0".parse::<IpNet>().expect("literal"),
        ];
        let a = if self.pos.is_empty() {
            &everything[..]
        } else {
            &self.pos[..]
        };
        let b = if other.pos.is_empty() {
            &everything[..]
        } else {
            &other.pos[..]
        };
        let negs: Vec<IpNet> = self.neg.iter().chain(&other.neg).copied().collect();
        a.iter().any(|p| {
            b.iter().any(|q| {
                // Two CIDRs intersect only if one contains the other; the intersection
                // is then the narrower one.
                let common = if p.contains(q) {
                    *q
                } else if q.contains(p) {
                    *p
                } else {
                    return false;
                };
                !covered(common, &negs)
            })
        })
    }

    /// Precedence tie-breaker: the prefix length of the widest positive entry, on the
    /// IPv6 scale (an IPv4 /24 counts 120) so that a host route is 128 in both families.
    /// A list of only exclusions counts 0: it is nearly as broad as no constraint.
    pub fn prefix_score(&self) -> u16 {
        self.pos
            .iter()
            .map(|n| match n {
                IpNet::V4(n) => u16::from(n.prefix_len()) + 96,
                IpNet::V6(n) => u16::from(n.prefix_len()),
            })
            .min()
            .unwrap_or(0)
    }

    pub fn heap_bytes(&self) -> usize {
        (self.pos.capacity() + self.neg.capacity()) * std::mem::size_of::<IpNet>()
    }
}

/// Is every address of `net` inside the union of `negs`? Splits `net` in halves only
/// where an exclusion lies strictly inside it, so the cost is bounded by
/// (number of exclusions) x (prefix depth).
fn covered(net: IpNet, negs: &[IpNet]) -> bool {
    if negs.iter().any(|n| n.contains(&net)) {
        return true;
    }
    let inner: Vec<IpNet> = negs.iter().filter(|n| net.contains(*n)).copied().collect();
    if inner.is_empty() {
        return false;
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(mut halves) => halves.all(|h| covered(h, &inner)),
        Err(_) => false,
    }
}

impl fmt::Display for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .pos
            .iter()
            .map(|n| n.to_string())
            .chain(self.neg.iter().map(|n| format!("!{n}")))
            .collect();
        write!(f, "[{}]", items.join(", "))
    }
}

/// Sorted, merged, inclusive port ranges within 1..=65535.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet {
    pub ranges: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn new(mut ranges: Vec<(u16, u16)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        merged.shrink_to_fit();
        PortSet { ranges: merged }
    }

    /// Parses `"lo-hi"` or `"n"`; the error is the message for the user.
    pub fn parse_range(s: &str) -> Result<(u16, u16), String> {
        let parse = |p: &str| -> Result<u16, String> {
            let n: i64 = p.trim().parse().map_err(|_| {
                format!(
                    "invalid port range {s:?}: expected a port number or a \"lo-hi\" range such as \"20000-25000\""
                )
            })?;
            check_port(n)
        };
        match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if lo > hi {
                    return Err(format!("port range {s:?} is reversed; write \"{hi}-{lo}\""));
                }
                Ok((lo, hi))
            }
            None => parse(s).map(|p| (p, p)),
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        // Few ranges per rule in practice: a scan beats a binary search here.
        self.ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    pub fn overlaps(&self, other: &PortSet) -> bool {
        self.ranges
            .iter()
            .any(|&(a, b)| other.ranges.iter().any(|&(c, d)| a <= d && c <= b))
    }

    /// Number of ports in the set (1..=65535).
    pub fn count(&self) -> u32 {
        self.ranges
            .iter()
            .map(|&(lo, hi)| u32::from(hi) - u32::from(lo) + 1)
            .sum()
    }

    pub fn heap_bytes(&self) -> usize {
        self.ranges.capacity() * std::mem::size_of::<(u16, u16)>()
    }
}

pub fn check_port(n: i64) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!(
            "port {n} is out of range; ports are 1-65535 (omit the field to match any port)"
        ))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .ranges
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        write!(f, "[{}]", items.join(", "))
    }
}

/// A cgroup v2 path prefix matched on whole components: `/system.slice/xrootd.service`
/// matches that cgroup and everything below it, not `/system.slice/xrootd.service2`.
/// The last component may end in `*` to match every component starting with the text
/// before it: templated units (`xrootd@clustered.service`) need `/system.slice/xrootd@*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPrefix {
    comps: Vec<String>,
    wildcard: bool,
}

impl CgroupPrefix {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err(format!(
                "cgroup {raw:?} is not absolute; write the cgroup v2 path as in /proc/PID/cgroup, e.g. \"/system.slice/xrootd.service\""
            ));
        }
        let mut comps: Vec<String> = raw
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut wildcard = false;
        if let Some(last) = comps.last_mut() {
            if let Some(stem) = last.strip_suffix('*') {
                *last = stem.to_owned();
                wildcard = true;
            } else if last.ends_with('@') {
                return Err(format!(
                    "cgroup {raw:?} ends in '@', which matches whole path components only and so never matches a unit instance; write \"{raw}*\" to match every instance"
                ));
            }
        }
        if comps.iter().any(|c| c.contains('*')) {
            return Err(format!(
                "cgroup {raw:?}: '*' is allowed only at the end of the last component"
            ));
        }
        Ok(CgroupPrefix { comps, wildcard })
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut it = path.split('/').filter(|c| !c.is_empty());
        let n = self.comps.len();
        for (i, want) in self.comps.iter().enumerate() {
            let Some(have) = it.next() else { return false };
            let ok = if self.wildcard && i + 1 == n {
                have.starts_with(want.as_str())
            } else {
                have == want
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Can some cgroup path match both prefixes?
    pub fn overlaps(&self, other: &CgroupPrefix) -> bool {
        let (a, b) = (&self.comps, &other.comps);
        let n = a.len().min(b.len());
        (0..n).all(|i| {
            let aw = self.wildcard && i + 1 == a.len();
            let bw = other.wildcard && i + 1 == b.len();
            match (aw, bw) {
                (false, false) => a[i] == b[i],
                (true, false) => b[i].starts_with(a[i].as_str()),
                (false, true) => a[i].starts_with(b[i].as_str()),
                (true, true) => a[i].starts_with(b[i].as_str()) || b[i].starts_with(a[i].as_str()),
            }
        })
    }

    pub fn heap_bytes(&self) -> usize {
        self.comps.capacity() * std::mem::size_of::<String>()
            + self.comps.iter().map(String::capacity).sum::<usize>()
    }
}

impl fmt::Display for CgroupPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.comps.join("/"))?;
        if self.wildcard {
            write!(f, "*")?;
        }
        Ok(())
    }
}
