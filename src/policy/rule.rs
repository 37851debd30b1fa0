//! Compiled rules: what a socket must look like to match, how specific a rule is, and
//! whether two rules can match the same socket. Each match field is defined once, in
//! `fields`; the methods of [`Match`] here loop over them.

use std::cmp::Reverse;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use super::fields::{Field, Match};
use super::kernel;
use crate::model::facts::OwnerFacts;
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
    /// The owning process's facts (gid, comm, exe, cgroup), as the fact sources
    /// found them.
    pub owner: OwnerFacts,
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

/// How specific a rule is; greater = more specific = wins. Compared field by field:
/// 1. `fields`: number of constrained match fields;
/// 2. `prefix`: sum over `local_cidrs`/`remote_cidrs` of `CidrSet::prefix_score`;
/// 3. `ports`: sum over `local_ports`/`remote_ports` of (65536 - ports in the set), so a
///    single port scores 65535 and `1-65535` scores 1.
///
/// Each field states its share of 2 and 3 in its `MatchField::narrowness`.
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

impl Match {
    /// The first field that rejects `s`, or `None` if `s` matches. Never allocates: this
    /// is the evaluation hot path.
    pub fn first_failure(&self, s: &SocketAttrs) -> Option<Field> {
        self.first_rejecting(s)
    }

    pub fn matches(&self, s: &SocketAttrs) -> bool {
        self.first_failure(s).is_none()
    }

    /// Why `field` rejects `s`, e.g. `remote 10.0.0.1 not in [2001:db8::/32]`.
    pub fn describe_failure(&self, field: Field, s: &SocketAttrs) -> String {
        self.field_failure(field, s)
            .unwrap_or_else(|| format!("`{}` is not constrained", field.key()))
    }

    /// Can one socket match both? Exact for every field (see `sets`): each field that
    /// both constrain must intersect.
    pub fn overlaps(&self, o: &Match) -> bool {
        Field::ALL.into_iter().all(|f| self.field_overlaps(o, f))
    }

    pub fn specificity(&self) -> Specificity {
        Field::ALL
            .into_iter()
            .filter_map(|f| self.field_narrowness(f))
            .fold(Specificity::default(), |acc, n| Specificity {
                fields: acc.fields + 1,
                prefix: acc.prefix + n.prefix,
                ports: acc.ports + n.ports,
            })
    }

    /// Decidable by the BPF first-packet path: every field the rule constrains is one
    /// the kernel decides (`kernel::decides`).
    pub fn kernel_decidable(&self) -> bool {
        Field::ALL
            .into_iter()
            .all(|f| !self.constrains(f) || kernel::decides(f))
    }

    pub fn heap_bytes(&self) -> usize {
        Field::ALL
            .into_iter()
            .map(|f| self.field_heap_bytes(f))
            .sum()
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
    /// `match_all = true`: the host's fallback (perfSONAR hosts). Below every other
    /// rule whatever their priority; in the kernel it also labels the IPv6 packets
    /// that no flow entry covers (ICMPv6 included).
    pub match_all: bool,
    /// Index of the file (sorted by name) and of the rule within it.
    pub file_index: usize,
    pub rule_index: usize,
}

impl Rule {
    /// The sort key of precedence: the smallest key wins. A match-all rule is the
    /// least specific of all, below any priority.
    pub fn precedence_key(&self) -> (bool, Reverse<i32>, Reverse<Specificity>, usize, usize) {
        (
            self.match_all,
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
