//! `explain`: why a socket got (or did not get) its tag, rule by rule.
//!
//! Walks every rule in precedence order without the index, because the point is to show
//! the rules that did not match and the first field that rejected the socket.

use std::fmt;

use super::registry::{Registry, TagName};
use super::rule::{direction_str, Field, Rule, RuleRef, SocketAttrs, Specificity};
use super::Verdict;

/// What one rule made of the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Matched and has the highest precedence among the matches.
    Chosen,
    /// Matched, but `by` comes first in precedence order.
    Shadowed { by: RuleRef },
    /// `field` rejected the socket; `reason` says how.
    Failed { field: Field, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainEntry {
    pub rule: RuleRef,
    pub tag: TagName,
    pub priority: i32,
    pub specificity: Specificity,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// One line describing the socket.
    pub socket: String,
    pub verdict: Option<Verdict>,
    /// Every rule, in precedence order.
    pub entries: Vec<ExplainEntry>,
}

pub(super) fn explain(rules: &[Rule], reg: &Registry, s: &SocketAttrs) -> Explanation {
    let mut chosen: Option<&Rule> = None;
    let entries = rules
        .iter()
        .map(|r| {
            let outcome = match r.matcher.first_failure(s) {
                Some(field) => Outcome::Failed {
                    field,
                    reason: r.matcher.describe_failure(field, s),
                },
                None => match chosen {
                    Some(c) => Outcome::Shadowed {
                        by: (*c.id).clone(),
                    },
                    None => {
                        chosen = Some(r);
                        Outcome::Chosen
                    }
                },
            };
            ExplainEntry {
                rule: (*r.id).clone(),
                tag: reg.name_of(r.experiment, r.activity),
                priority: r.priority,
                specificity: r.specificity,
                outcome,
            }
        })
        .collect();
    Explanation {
        socket: describe_socket(s),
        verdict: chosen.map(|r| Verdict {
            tag: r.tag(),
            rule: r.id.clone(),
        }),
        entries,
    }
}

fn describe_socket(s: &SocketAttrs) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".to_owned());
    format!(
        "{} {} -> {} {} uid={} gid={} comm={} exe={} cgroup={}",
        s.proto.as_str(),
        s.local,
        s.remote,
        direction_str(s.direction),
        opt(s.uid.map(|u| u.to_string())),
        opt(s.owner.gid.map(|g| g.to_string())),
        opt(s.owner.comm.clone()),
        opt(s.owner.exe.as_ref().map(|e| e.display().to_string())),
        opt(s.owner.cgroup.clone()),
    )
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Chosen => write!(f, "matched (chosen)"),
            Outcome::Shadowed { by } => write!(f, "matched but lower precedence than {by}"),
            Outcome::Failed { field, reason } => write!(f, "no match: {}: {reason}", field.key()),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "socket: {}", self.socket)?;
        match (
            &self.verdict,
            self.entries.iter().find(|e| e.outcome == Outcome::Chosen),
        ) {
            (Some(v), Some(e)) => writeln!(
                f,
                "verdict: {} ({}/{}) by {}",
                e.tag, v.tag.experiment, v.tag.activity, v.rule
            )?,
            _ => writeln!(f, "verdict: untagged (no rule matched)")?,
        }
        for (i, e) in self.entries.iter().enumerate() {
            writeln!(
                f,
                "{:>3}. {} [{}, priority {}]: {}",
                i + 1,
                e.rule,
                e.tag,
                e.priority,
                e.outcome
            )?;
        }
        Ok(())
    }
}
