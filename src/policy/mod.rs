//! Policies: which (experiment, activity) tag a socket gets.
//!
//! A policy directory holds one TOML file per experiment (format:
//! policies/README.md). Loading parses every file, resolves names through the [`Registry`] and
//! accounts, compiles rules, orders them by precedence and rejects rule pairs that could
//! tag the same socket differently at equal precedence. Evaluation then picks, for one
//! socket, the first matching rule in precedence order.

mod accounts;
mod compile;
mod error;
mod explain;
mod fields;
mod file;
mod index;
pub mod kernel;
pub mod registry;
mod rule;
mod sets;
mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use accounts::{Accounts, OfflineAccounts, StaticAccounts, SystemAccounts};
pub use error::{ErrorKind, PolicyError, PolicyErrors};
pub use explain::{ExplainEntry, Explanation, Outcome};
pub use file::{FILE_FIELDS, RULE_FIELDS};
pub use registry::{Registry, TagName};
pub use rule::{Account, Field, Match, Rule, RuleRef, SocketAttrs, Specificity};
pub use sets::{CgroupPrefix, CidrSet, PortSet};

use error::LineIndex;
use index::Index;

use crate::model::tag::Tag;

/// The decision for one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub tag: Tag,
    pub rule: Arc<RuleRef>,
}

/// A validated, compiled policy set.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Sorted by precedence: the first matching rule wins.
    rules: Vec<Rule>,
    index: Index,
    version: String,
    registry: Registry,
}

impl Policy {
    /// Loads every `*.toml` file of `dir` (hidden files skipped), resolving account names
    /// through the host's NSS.
    pub fn load_dir(dir: &Path, reg: &Registry) -> Result<Policy, PolicyErrors> {
        Policy::load_dir_with(dir, reg, &SystemAccounts)
    }

    pub fn load_dir_with(
        dir: &Path,
        reg: &Registry,
        accounts: &dyn Accounts,
    ) -> Result<Policy, PolicyErrors> {
        let io_err = |path: &Path, e: std::io::Error| PolicyError {
            path: path.to_owned(),
            line: 1,
            col: 1,
            kind: ErrorKind::Io,
            message: format!("cannot read: {e}"),
        };
        let entries = std::fs::read_dir(dir).map_err(|e| PolicyErrors(vec![io_err(dir, e)]))?;
        if let Some(w) = std::fs::metadata(dir)
            .ok()
            .and_then(|m| source::world_writable(&m, "policy directory"))
        {
            tracing::warn!(dir = %dir.display(), "{w}");
        }
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for entry in entries {
            let path = match entry {
                Ok(e) => e.path(),
                Err(e) => {
                    errors.push(io_err(dir, e));
                    continue;
                }
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // A directory named *.toml is read (and refused) too: skipping it
            // silently hides a policy the admin meant to install.
            if name.starts_with('.') || path.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            match source::read_policy_file(&path) {
                Ok((text, warning)) => {
                    if let Some(w) = warning {
                        tracing::warn!(file = %path.display(), "{w}");
                    }
                    sources.push((path, text))
                }
                Err(message) => errors.push(PolicyError {
                    message,
                    ..io_err(&path, std::io::Error::other(""))
                }),
            }
        }
        match Policy::from_sources_with(&sources, reg, accounts) {
            Ok(p) if errors.is_empty() => Ok(p),
            Ok(_) => Err(PolicyErrors(errors)),
            Err(PolicyErrors(more)) => {
                errors.extend(more);
                Err(PolicyErrors(errors))
            }
        }
    }

    /// Compiles in-memory sources (path, text), resolving accounts through NSS.
    pub fn from_sources(
        sources: &[(PathBuf, String)],
        reg: &Registry,
    ) -> Result<Policy, PolicyErrors> {
        Policy::from_sources_with(sources, reg, &SystemAccounts)
    }

    pub fn from_sources_with(
        sources: &[(PathBuf, String)],
        reg: &Registry,
        accounts: &dyn Accounts,
    ) -> Result<Policy, PolicyErrors> {
        // File order is byte order of the file names (documented precedence rule).
        let mut order: Vec<&(PathBuf, String)> = sources.iter().collect();
        order.sort_by(|a, b| {
            a.0.as_os_str()
                .as_encoded_bytes()
                .cmp(b.0.as_os_str().as_encoded_bytes())
        });
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        for (file_index, (path, text)) in order.iter().enumerate() {
            let lines = LineIndex::new(text);
            let raw = match file::parse(path, text, &lines) {
                Ok(raw) => raw,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let compiled = compile::compile_file(
                path,
                text,
                &lines,
                &raw,
                file_index,
                reg,
                accounts,
                &mut errors,
            );
            if compiled.enabled {
                rules.extend(compiled.rules);
            }
        }
        rules.sort_by_key(|r| r.precedence_key());
        let paths: Vec<&Path> = order.iter().map(|s| s.0.as_path()).collect();
        errors.extend(conflicts(&rules, &paths, reg));
        if !errors.is_empty() {
            errors.sort_by(|a, b| {
                (a.path.as_os_str().as_encoded_bytes(), a.line, a.col).cmp(&(
                    b.path.as_os_str().as_encoded_bytes(),
                    b.line,
                    b.col,
                ))
            });
            return Err(PolicyErrors(errors));
        }
        let index = Index::build(&rules);
        Ok(Policy {
            rules,
            index,
            version: content_hash(&order),
            registry: reg.clone(),
        })
    }

    /// The tag for `s`, from the first matching rule in precedence order.
    pub fn evaluate(&self, s: &SocketAttrs) -> Option<Verdict> {
        self.index.first_match(&self.rules, s).map(|i| {
            let r = &self.rules[i];
            Verdict {
                tag: r.tag(),
                rule: r.id.clone(),
            }
        })
    }

    /// Every rule, in precedence order, and what it made of `s`.
    pub fn explain(&self, s: &SocketAttrs) -> Explanation {
        explain::explain(&self.rules, &self.registry, s)
    }

    /// Content hash of all sources (names and texts), for status displays: equal
    /// versions mean identical policy files. FNV-1a 64, not a security measure.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether some rule needs facts only /proc can give (process name, executable,
    /// cgroup, group): only then is the owner of a socket looked up.
    pub fn needs_process_facts(&self) -> bool {
        self.rules.iter().any(|r| !r.kernel_decidable())
    }

    /// Rules in precedence order.
    pub fn rules(&self) -> impl ExactSizeIterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Approximate heap and inline bytes of the compiled rules and their index.
    pub fn memory_bytes(&self) -> usize {
        self.rules.iter().map(Rule::memory_bytes).sum::<usize>() + self.index.memory_bytes()
    }
}

fn content_hash(sources: &[&(PathBuf, String)]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (path, text) in sources {
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        // Lengths delimit the fields so that moving bytes between them changes the hash.
        feed(&(name.len() as u64).to_le_bytes());
        feed(name);
        feed(&(text.len() as u64).to_le_bytes());
        feed(text.as_bytes());
    }
    format!("{h:016x}")
}

/// Pairs of rules that could tag one socket differently with nothing to choose between
/// them. `rules` is sorted by precedence, so rules of equal priority and specificity are
/// adjacent and only those runs need pairwise checks.
fn conflicts(rules: &[Rule], paths: &[&Path], reg: &Registry) -> Vec<PolicyError> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rules.len() {
        let key = (
            rules[start].match_all,
            rules[start].priority,
            rules[start].specificity,
        );
        let end = start
            + rules[start..]
                .iter()
                .take_while(|r| (r.match_all, r.priority, r.specificity) == key)
                .count();
        let run = &rules[start..end];
        for (j, b) in run.iter().enumerate() {
            for a in &run[..j] {
                if a.tag() == b.tag() || !(b.match_all || a.matcher.overlaps(&b.matcher)) {
                    continue;
                }
                let (b_rule, a_rule) = (
                    format!(
                        "rule {:?} ({})",
                        &*b.id.name,
                        reg.name_of(b.experiment, b.activity)
                    ),
                    format!(
                        "rule {:?} ({})",
                        &*a.id.name,
                        reg.name_of(a.experiment, a.activity)
                    ),
                );
                let at = format!("{}:{}:{}", paths[a.file_index].display(), a.id.line, a.col);
                let message = if b.match_all {
                    format!(
                        "{b_rule} and {a_rule} at {at} are both `match_all` with different tags; a host has one fallback tag, keep one of them"
                    )
                } else {
                    format!(
                        "{b_rule} can match the same sockets as {a_rule} at {at}, with equal priority {} and equal specificity ({}); give one of them a higher `priority` or narrow one so that they cannot overlap",
                        a.priority, a.specificity,
                    )
                };
                out.push(PolicyError {
                    path: paths[b.file_index].to_owned(),
                    line: b.id.line,
                    col: b.col,
                    kind: ErrorKind::Conflict,
                    message,
                });
            }
        }
        start = end;
    }
    out
}
