//! The match fields of a rule, each defined once.
//!
//! A match field is a type implementing [`MatchField`]: how its TOML value is checked and
//! compiled, whether a socket satisfies it, how it explains a rejection, whether two
//! constraints can both hold (conflict detection), how narrow it is (precedence) and what
//! it owns on the heap. [`match_fields!`] lists the fields once; from that list come the
//! [`Field`] enum, the [`Match`] struct, the rule table of the file format (`RawRule`,
//! `RULE_FIELDS` in `file`) and the per-field dispatch that `Match`'s methods (`rule`)
//! loop over. Nothing else names every field.
//!
//! # Adding a match field
//! 1. Write its definition, usually one file here: a type implementing [`MatchField`].
//!    The trait has no default methods, so the compiler refuses a field that does not say
//!    how it is compiled, matched, explained, intersected, ranked and measured.
//! 2. Declare the file's `mod` and add one line to [`match_fields!`], where the
//!    documentation order of the rule table puts it (the order of `RULE_FIELDS` and of
//!    the "allowed fields" error). Its `COST` places it in the evaluation order, which
//!    `tests::fields_are_tested_cheapest_first` pins (it no longer builds: add the field).
//! 3. Say in `kernel::decides` whether the BPF first-packet decision can decide it (an
//!    exhaustive match: the build fails until it does). `true` needs the tables in
//!    `kernel` and bpf/flowd.h that decide it; `kernel_tests::only` (also exhaustive)
//!    gives a rule on the field alone and, if the kernel decides it, a socket it rejects,
//!    and the test there checks that the tables agree with `decides`.
//! 4. If it needs a fact of the owning process that is not known yet, add it to
//!    [`crate::model::facts::OwnerFacts`] (which `SocketAttrs::owner` carries) and
//!    fill it in its source (`discovery::procfs` today); show it in
//!    `explain::describe_socket`. Nothing between the source and the field changes.
//! 5. Test its error messages (tests/policy_errors.rs), matching and explanation
//!    (tests/policy_evaluate.rs), and add its row to the table in policies/README.md.

pub(super) mod cgroup;
pub(super) mod cidrs;
pub(super) mod direction;
pub(super) mod exe;
pub(super) mod ids;
pub(super) mod ports;
pub(super) mod process;
pub(super) mod protocol;

use std::fmt;
use std::net::SocketAddr;

use super::accounts::Accounts;
use super::compile::Ctx;
use super::file::RawRule;
use super::rule::SocketAttrs;

/// One match field of a rule. A rule that leaves the field out is unconstrained by it
/// (matches anything, even an unknown fact); the methods here see only constrained
/// fields.
pub trait MatchField {
    /// The TOML value as parsed, with spans for error locations.
    type Raw;
    /// The compiled constraint.
    type Value: fmt::Debug + Clone + PartialEq + Eq;
    /// How expensive [`MatchField::accepts`] is relative to the other fields: a rule
    /// tests its fields cheapest first (ties in list order), so this is also which
    /// failing field `explain` names.
    const COST: u8;

    /// Checks and compiles the raw value, reporting every bad element through `cx` at its
    /// own position; `None` if anything was wrong. `key` is the TOML key.
    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        raw: &Self::Raw,
        accounts: &dyn Accounts,
    ) -> Option<Self::Value>;

    /// Does the socket satisfy the constraint? A fact the socket lacks never does (a tag
    /// must never be a guess). The evaluation hot path: must not allocate (and its
    /// implementations are `#[inline]`).
    fn accepts(v: &Self::Value, s: &SocketAttrs) -> bool;

    /// Why `v` rejects `s`, e.g. `remote 10.0.0.1 not in [2001:db8::/32]`.
    fn describe_failure(v: &Self::Value, s: &SocketAttrs) -> String;

    /// Can one socket satisfy both constraints? Must be exact: a false "no" hides a
    /// conflict, a false "yes" refuses a valid policy.
    fn overlaps(a: &Self::Value, b: &Self::Value) -> bool;

    /// The precedence tie-breakers this field contributes (see `Specificity`); the
    /// count of constrained fields is kept by `Match`.
    fn narrowness(v: &Self::Value) -> Narrowness;

    /// Heap bytes owned by `v`, for memory accounting.
    fn heap_bytes(v: &Self::Value) -> usize;
}

/// A field's contribution to the `prefix` and `ports` components of `Specificity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Narrowness {
    pub prefix: u16,
    pub ports: u32,
}

impl Narrowness {
    /// Fields that only count as constrained.
    pub const NONE: Narrowness = Narrowness {
        prefix: 0,
        ports: 0,
    };
}

/// Which end of the flow an address or port field constrains.
pub trait Side {
    /// As in explanations: `local port 80 not in [...]`.
    const NAME: &'static str;
    fn addr(s: &SocketAttrs) -> SocketAddr;
}

/// This host's end.
#[derive(Debug)]
pub enum Local {}
/// The peer's end.
#[derive(Debug)]
pub enum Remote {}

impl Side for Local {
    const NAME: &'static str = "local";
    #[inline]
    fn addr(s: &SocketAttrs) -> SocketAddr {
        s.local
    }
}

impl Side for Remote {
    const NAME: &'static str = "remote";
    #[inline]
    fn addr(s: &SocketAttrs) -> SocketAddr {
        s.remote
    }
}

/// THE list of match fields, in documentation order: `key: Variant = module::Type`,
/// where `key` is the TOML key, `Variant` the [`Field`] variant and `module::Type` (in
/// this module) the field's [`MatchField`] implementation. Calls `$then!` with the list,
/// so each consumer generates its own code from it (an "X macro").
macro_rules! match_fields {
    ($then:ident) => {
        $then! {
            protocol: Protocol = protocol::ProtocolField,
            direction: Direction = direction::DirectionField,
            local_cidrs: LocalCidrs = cidrs::LocalCidrs,
            remote_cidrs: RemoteCidrs = cidrs::RemoteCidrs,
            local_ports: LocalPorts = ports::LocalPorts,
            remote_ports: RemotePorts = ports::RemotePorts,
            users: Users = ids::Users,
            groups: Groups = ids::Groups,
            process: Process = process::Process,
            exe: Exe = exe::Exe,
            cgroup: Cgroup = cgroup::Cgroup,
        }
    };
}
pub(super) use match_fields;

/// Generates [`Field`], [`Match`] and the per-field dispatch `Match`'s methods use.
macro_rules! define_fields {
    ($($key:ident: $V:ident = $m:ident::$T:ident,)*) => {
        /// A match field, named in explanations.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Field {
            $($V,)*
        }

        /// Number of match fields.
        const COUNT: usize = [$(stringify!($key),)*].len();

        impl Field {
            /// Every field, in documentation order.
            pub const ALL: [Field; COUNT] = [$(Field::$V,)*];

            /// Every field, in the order a rule tests them (cheapest first).
            pub const EVAL_ORDER: [Field; COUNT] =
                by_cost([$((Field::$V, <$m::$T as MatchField>::COST),)*]);

            /// The TOML key.
            pub fn key(self) -> &'static str {
                match self {
                    $(Field::$V => stringify!($key),)*
                }
            }
        }

        /// The constraints of one rule; `None` = unconstrained (matches anything, even
        /// unknown). Each field's value type is its [`MatchField::Value`].
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Match {
            $(pub $key: Option<<$m::$T as MatchField>::Value>,)*
        }

        impl Match {
            /// Compiles every match field of a parsed rule; errors go to `cx`.
            pub(in crate::policy) fn compile(
                cx: &mut Ctx,
                raw: &RawRule,
                accounts: &dyn Accounts,
            ) -> Match {
                Match {
                    $($key: raw.$key.as_ref().and_then(|r| {
                        <$m::$T as MatchField>::compile(cx, stringify!($key), r, accounts)
                    }),)*
                }
            }

            /// Does the rule constrain `f`?
            pub fn constrains(&self, f: Field) -> bool {
                match f {
                    $(Field::$V => self.$key.is_some(),)*
                }
            }

            /// The first field, in [`Field::EVAL_ORDER`], that rejects `s`. Straight-line
            /// code for the evaluation hot path: block `i` tests `EVAL_ORDER[i]`, a
            /// constant, so each `field_accepts` folds to that one field's test (a loop
            /// over the fields would dispatch on every field of every rule).
            #[inline]
            pub(in crate::policy) fn first_rejecting(&self, s: &SocketAttrs) -> Option<Field> {
                $({
                    // `Field::$V as usize` only numbers the blocks 0, 1, 2, ...
                    const F: Field = Field::EVAL_ORDER[Field::$V as usize];
                    if !self.field_accepts(F, s) {
                        return Some(F);
                    }
                })*
                None
            }

            /// Does `f` let `s` through (an unconstrained field always does)?
            #[inline(always)]
            pub(in crate::policy) fn field_accepts(&self, f: Field, s: &SocketAttrs) -> bool {
                match f {
                    $(Field::$V => self.$key.as_ref().is_none_or(|v| {
                        <$m::$T as MatchField>::accepts(v, s)
                    }),)*
                }
            }

            /// Why `f` rejects `s`; `None` if the rule does not constrain `f`.
            pub(in crate::policy) fn field_failure(&self, f: Field, s: &SocketAttrs) -> Option<String> {
                match f {
                    $(Field::$V => self.$key.as_ref().map(|v| {
                        <$m::$T as MatchField>::describe_failure(v, s)
                    }),)*
                }
            }

            /// Can one socket pass `f` of both rules? Trivially so unless both constrain it.
            pub(in crate::policy) fn field_overlaps(&self, o: &Match, f: Field) -> bool {
                match f {
                    $(Field::$V => match (&self.$key, &o.$key) {
                        (Some(a), Some(b)) => <$m::$T as MatchField>::overlaps(a, b),
                        _ => true,
                    },)*
                }
            }

            /// What `f` adds to the specificity; `None` if unconstrained.
            pub(in crate::policy) fn field_narrowness(&self, f: Field) -> Option<Narrowness> {
                match f {
                    $(Field::$V => self.$key.as_ref().map(<$m::$T as MatchField>::narrowness),)*
                }
            }

            pub(in crate::policy) fn field_heap_bytes(&self, f: Field) -> usize {
                match f {
                    $(Field::$V => self.$key.as_ref().map_or(0, <$m::$T as MatchField>::heap_bytes),)*
                }
            }
        }
    };
}

match_fields!(define_fields);

/// Stable sort by cost, at compile time.
const fn by_cost<const N: usize>(mut v: [(Field, u8); N]) -> [Field; N] {
    let mut i = 1;
    while i < N {
        let mut j = i;
        while j > 0 && v[j - 1].1 > v[j].1 {
            let t = v[j - 1];
            v[j - 1] = v[j];
            v[j] = t;
            j -= 1;
        }
        i += 1;
    }
    let mut out = [v[0].0; N];
    let mut k = 0;
    while k < N {
        out[k] = v[k].0;
        k += 1;
    }
    out
}

/// `[a, b]`, for explanations.
fn list<T: fmt::Display>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::Field::{self, *};

    #[test]
    fn fields_are_tested_cheapest_first() {
        // Pinned: which failing field `explain` names depends on this order.
        assert_eq!(
            Field::EVAL_ORDER,
            [
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
                Cgroup
            ]
        );
    }

    #[test]
    fn every_field_has_a_distinct_key_in_the_rule_table() {
        let keys: std::collections::BTreeSet<&str> = Field::ALL.iter().map(|f| f.key()).collect();
        assert_eq!(keys.len(), Field::ALL.len());
        let table = &crate::policy::RULE_FIELDS;
        assert!(table.ends_with(&Field::ALL.map(Field::key)), "{table:?}");
    }
}
