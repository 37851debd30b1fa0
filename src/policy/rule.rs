//! Compiled rules: what a socket must look like to match, how specific a rule is, and
//! whether two rules can match the same socket.

use std::cmp::Reverse;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::sets::{CgroupPrefix, CidrSet, PortSet};
use crate::model::socket::{Direction, Protocol};
use crate::model::tag::Tag;

/// What the policy knows about one socket. Unknown facts are `None`; a rule that
/// constrains an unknown fact does not match (a tag must never be a guess).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAttrs {
    pub proto: Protocol,
    /// Already unmapped: IPv4-mapped IPv6 addresses arrive as IPv4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The kernel's `comm` (at most 15 bytes).
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    /// cgroup v2 path, as in `/proc/PID/cgroup` after `0::`.
    pub cgroup: Option<String>,
}

/// Names a rule for humans: Display is `atlas.toml:xrootd-data`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// File name within the policy directory.
    pub file: Arc<str>,
    pub name: Arc<str>,
    pub line: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.name)
    }
}

/// The match fields, in the order they are tested (cheapest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Protocol,
    Direction,
    LocalPorts,
    RemotePorts,
    LocalCidrs,
    RemoteCidrs,
    Users,
    Groups,
    Process,
    Exe,
    Cgroup,
}

impl Field {
    /// The TOML key.
    pub fn key(self) -> &'static str {
        match self {
            Field::Protocol => "protocol",
            Field::Direction => "direction",
            Field::LocalPorts => "local_ports",
            Field::RemotePorts => "remote_ports",
            Field::LocalCidrs => "local_cidrs",
            Field::RemoteCidrs => "remote_cidrs",
            Field::Users => "users",
            Field::Groups => "groups",
            Field::Process => "process",
            Field::Exe => "exe",
            Field::Cgroup => "cgroup",
        }
    }
}

/// A uid or gid with the name it was written as, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: u32,
    pub name: Option<String>,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}({})", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// The constraints of one rule; `None` = unconstrained (matches anything, even unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    pub protocol: Option<Protocol>,
    pub direction: Option<Direction>,
    pub local_cidrs: Option<CidrSet>,
    pub remote_cidrs: Option<CidrSet>,
    pub local_ports: Option<PortSet>,
    pub remote_ports: Option<PortSet>,
    /// Sorted by id.
    pub users: Option<Vec<Account>>,
    pub groups: Option<Vec<Account>>,
    pub process: Option<Vec<String>>,
    pub exe: Option<Vec<PathBuf>>,
    pub cgroup: Option<Vec<CgroupPrefix>>,
}

/// How specific a rule is; greater = more specific = wins. Compared field by field:
/// 1. `fields`: number of constrained match fields (0..=11);
/// 2. `prefix`: sum over `local_cidrs`/`remote_cidrs` of [`CidrSet::prefix_score`];
/// 3. `ports`: sum over `local_ports`/`remote_ports` of (65536 - ports in the set), so a
///    single port scores 65535 and `1-65535` scores 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Specificity {
    pub fields: u8,
    pub prefix: u16,
    pub ports: u32,
}

impl fmt::Display for Specificity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fields {}, prefix {}, ports {}",
            self.fields, self.prefix, self.ports
        )
    }
}

fn any_eq<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.iter().any(|x| b.contains(x))
}

/// Both constrain the field => they must intersect; otherwise it overlaps trivially.
fn both<T>(a: &Option<T>, b: &Option<T>, f: impl Fn(&T, &T) -> bool) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => f(a, b),
        _ => true,
    }
}

impl Match {
    /// The first field that rejects `s`, or `None` if `s` matches. Never allocates: this
    /// is the evaluation hot path.
    pub fn first_failure(&self, s: &SocketAttrs) -> Option<Field> {
        if self.protocol.is_some_and(|p| p != s.proto) {
            return Some(Field::Protocol);
        }
        if self.direction.is_some_and(|d| d != s.direction) {
            return Some(Field::Direction);
        }
        if self
            .local_ports
            .as_ref()
            .is_some_and(|p| !p.contains(s.local.port()))
        {
            return Some(Field::LocalPorts);
        }
        if self
            .remote_ports
            .as_ref()
            .is_some_and(|p| !p.contains(s.remote.port()))
        {
            return Some(Field::RemotePorts);
        }
        if self
            .local_cidrs
            .as_ref()
            .is_some_and(|c| !c.contains(s.local.ip()))
        {
            return Some(Field::LocalCidrs);
        }
        if self
            .remote_cidrs
            .as_ref()
            .is_some_and(|c| !c.contains(s.remote.ip()))
        {
            return Some(Field::RemoteCidrs);
        }
        let in_accounts = |v: &Vec<Account>, id: Option<u32>| {
            id.is_some_and(|id| v.binary_search_by_key(&id, |a| a.id).is_ok())
        };
        if self.users.as_ref().is_some_and(|v| !in_accounts(v, s.uid)) {
            return Some(Field::Users);
        }
        if self.groups.as_ref().is_some_and(|v| !in_accounts(v, s.gid)) {
            return Some(Field::Groups);
        }
        if let Some(v) = &self.process {
            if !s.comm.as_ref().is_some_and(|c| v.contains(c)) {
                return Some(Field::Process);
            }
        }
        if let Some(v) = &self.exe {
            if !s.exe.as_ref().is_some_and(|e| v.contains(e)) {
                return Some(Field::Exe);
            }
        }
        if let Some(v) = &self.cgroup {
            if !s
                .cgroup
                .as_ref()
                .is_some_and(|c| v.iter().any(|p| p.matches(c)))
            {
                return Some(Field::Cgroup);
            }
        }
        None
    }

    pub fn matches(&self, s: &SocketAttrs) -> bool {
        self.first_failure(s).is_none()
    }

    /// Why `field` rejects `s`, e.g. `remote 10.0.0.1 not in [2001:db8::/32]`.
    pub fn describe_failure(&self, field: Field, s: &SocketAttrs) -> String {
        fn list<T: fmt::Display>(v: &[T]) -> String {
            let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("[{}]", items.join(", "))
        }
        fn quoted(v: &[String]) -> String {
            list(&v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>())
        }
        let cidr = |side: &str, set: &CidrSet, ip| match set.excluded_by(ip) {
            Some(n) => format!("{side} {ip} is excluded by !{n}"),
            None => format!("{side} {ip} not in {set}"),
        };
        let accounts = |what: &str, v: &[Account], id: Option<u32>| match id {
            None => format!("{what} unknown"),
            Some(id) => format!("{what} {id} not in {}", list(v)),
        };
        match field {
            Field::Protocol => format!(
                "protocol {} is not {}",
                s.proto.as_str(),
                self.protocol.map_or("?", |p| p.as_str())
            ),
            Field::Direction => match s.direction {
                Direction::Unknown => "direction unknown".to_owned(),
                d => format!(
                    "direction {} is not {}",
                    direction_str(d),
                    self.direction.map_or("?", direction_str)
                ),
            },
            Field::LocalPorts => format!(
                "local port {} not in {}",
                s.local.port(),
                self.local_ports
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ),
            Field::RemotePorts => format!(
                "remote port {} not in {}",
                s.remote.port(),
                self.remote_ports
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ),
            Field::LocalCidrs => cidr(
                "local",
                self.local_cidrs.as_ref().expect("constrained"),
                s.local.ip(),
            ),
            Field::RemoteCidrs => cidr(
                "remote",
                self.remote_cidrs.as_ref().expect("constrained"),
                s.remote.ip(),
            ),
            Field::Users => accounts("uid", self.users.as_deref().unwrap_or_default(), s.uid),
            Field::Groups => accounts("gid", self.groups.as_deref().unwrap_or_default(), s.gid),
            Field::Process => match &s.comm {
                None => "process name unknown".to_owned(),
                Some(c) => format!(
                    "process {c:?} not in {}",
                    quoted(self.process.as_deref().unwrap_or_default())
                ),
            },
            Field::Exe => match &s.exe {
                None => "exe unknown".to_owned(),
                Some(e) => {
                    let v: Vec<String> = self
                        .exe
                        .iter()
                        .flatten()
                        .map(|p| p.display().to_string())
                        .collect();
                    format!("exe {} not in {}", e.display(), list(&v))
                }
            },
            Field::Cgroup => match &s.cgroup {
                None => "cgroup unknown".to_owned(),
                Some(c) => format!(
                    "cgroup {c} not under {}",
                    list(self.cgroup.as_deref().unwrap_or_default())
                ),
            },
        }
    }

    /// Can one socket match both? Exact for every field (see `sets`): each field that
    /// both constrain must intersect.
    pub fn overlaps(&self, o: &Match) -> bool {
        both(&self.protocol, &o.protocol, |a, b| a == b)
            && both(&self.direction, &o.direction, |a, b| a == b)
            && both(&self.local_ports, &o.local_ports, PortSet::overlaps)
            && both(&self.remote_ports, &o.remote_ports, PortSet::overlaps)
            && both(&self.local_cidrs, &o.local_cidrs, CidrSet::overlaps)
            && both(&self.remote_cidrs, &o.remote_cidrs, CidrSet::overlaps)
            && both(&self.users, &o.users, |a, b| {
                a.iter().any(|x| b.iter().any(|y| x.id == y.id))
            })
            && both(&self.groups, &o.groups, |a, b| {
                a.iter().any(|x| b.iter().any(|y| x.id == y.id))
            })
            && both(&self.process, &o.process, |a, b| any_eq(a, b))
            && both(&self.exe, &o.exe, |a, b| any_eq(a, b))
            && both(&self.cgroup, &o.cgroup, |a, b| {
                a.iter().any(|x| b.iter().any(|y| x.overlaps(y)))
            })
    }

    pub fn specificity(&self) -> Specificity {
        let fields = [
            self.protocol.is_some(),
            self.direction.is_some(),
            self.local_cidrs.is_some(),
            self.remote_cidrs.is_some(),
            self.local_ports.is_some(),
            self.remote_ports.is_some(),
            self.users.is_some(),
            self.groups.is_some(),
            self.process.is_some(),
            self.exe.is_some(),
            self.cgroup.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count() as u8;
        let prefix = [&self.local_cidrs, &self.remote_cidrs]
            .iter()
            .filter_map(|c| c.as_ref())
            .map(CidrSet::prefix_score)
            .sum();
        let ports = [&self.local_ports, &self.remote_ports]
            .iter()
            .filter_map(|p| p.as_ref())
            .map(|p| 65536 - p.count())
            .sum();
        Specificity {
            fields,
            prefix,
            ports,
        }
    }

    /// Decidable from the packet, the socket's uid and who opened it, i.e. by the BPF
    /// first-packet path: no process, exe, cgroup (resolved in userspace) and no gid
    /// (a socket carries only its owner's uid, `sk->sk_uid`).
    pub fn kernel_decidable(&self) -> bool {
        self.process.is_none()
            && self.exe.is_none()
            && self.cgroup.is_none()
            && self.groups.is_none()
    }

    pub fn heap_bytes(&self) -> usize {
        let strings = |v: &Option<Vec<String>>| {
            v.as_ref().map_or(0, |v| {
                v.capacity() * std::mem::size_of::<String>()
                    + v.iter().map(String::capacity).sum::<usize>()
            })
        };
        let accounts = |v: &Option<Vec<Account>>| {
            v.as_ref().map_or(0, |v| {
                v.capacity() * std::mem::size_of::<Account>()
                    + v.iter()
                        .filter_map(|a| a.name.as_ref())
                        .map(String::capacity)
                        .sum::<usize>()
            })
        };
        self.local_cidrs.as_ref().map_or(0, CidrSet::heap_bytes)
            + self.remote_cidrs.as_ref().map_or(0, CidrSet::heap_bytes)
            + self.local_ports.as_ref().map_or(0, PortSet::heap_bytes)
            + self.remote_ports.as_ref().map_or(0, PortSet::heap_bytes)
            + accounts(&self.users)
            + accounts(&self.groups)
            + strings(&self.process)
            + self.exe.as_ref().map_or(0, |v| {
                v.capacity() * std::mem::size_of::<PathBuf>()
                    + v.iter().map(|p| p.as_os_str().len()).sum::<usize>()
            })
            + self.cgroup.as_ref().map_or(0, |v| {
                v.capacity() * std::mem::size_of::<CgroupPrefix>()
                    + v.iter().map(CgroupPrefix::heap_bytes).sum::<usize>()
            })
    }
}

pub fn direction_str(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
        Direction::Unknown => "unknown",
    }
}

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Shared: every flow's decision refers to its rule.
    pub id: Arc<RuleRef>,
    /// Column of the `[[rule]]` header, for error locations.
    pub col: usize,
    pub experiment: u16,
    pub activity: u8,
    pub priority: i32,
    pub matcher: Match,
    pub specificity: Specificity,
    /// Index of the file (sorted by name) and of the rule within it.
    pub file_index: usize,
    pub rule_index: usize,
}

impl Rule {
    /// The sort key of precedence: the smallest key wins.
    pub fn precedence_key(&self) -> (Reverse<i32>, Reverse<Specificity>, usize, usize) {
        (
            Reverse(self.priority),
            Reverse(self.specificity),
            self.file_index,
            self.rule_index,
        )
    }

    /// The tag this rule gives (its experiment and activity were range-checked
    /// when the file was loaded).
    pub fn tag(&self) -> Tag {
        Tag {
            experiment: self.experiment,
            activity: self.activity,
        }
    }

    pub fn kernel_decidable(&self) -> bool {
        self.matcher.kernel_decidable()
    }

    /// Approximate memory of this rule: the struct plus what it owns on the heap.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Rule>() + self.matcher.heap_bytes() + self.id.name.len()
    }
}
