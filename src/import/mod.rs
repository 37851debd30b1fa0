//! `flowd-rs import flowd-go|flowd CONF`: a flowd-rs configuration, policy files and
//! a report of what has no equivalent, from a flowd-go (YAML) or flowd (key=value)
//! configuration. A site moving over keeps its settings; nothing is dropped
//! silently: every key is either mapped or named in the report with the reason.

mod flowd;
mod flowd_go;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

pub use flowd::import as from_flowd;
pub use flowd_go::import as from_flowd_go;

/// The report's file name in the output directory.
pub const REPORT_FILE: &str = "import-report.txt";
/// The policy directory under the output directory, as `policy.dir` expects it.
pub const POLICY_DIR: &str = "policies.d";

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// `flowd-rs.toml`'s tables; keys left at flowd-rs's defaults are not written.
    pub config: toml::Table,
    /// One policy file per experiment: (file name, table).
    pub policies: Vec<(String, toml::Table)>,
    /// Keys without an equivalent, in the order met.
    pub unmapped: Vec<Unmapped>,
    /// Things the operator should know about a mapped key (a default that differs).
    pub notes: Vec<String>,
}

/// A key of the source configuration that flowd-rs cannot carry over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    pub key: String,
    pub why: String,
}

impl Imported {
    pub(crate) fn unmapped(&mut self, key: impl Into<String>, why: impl Into<String>) {
        self.unmapped.push(Unmapped {
            key: key.into(),
            why: why.into(),
        });
    }

    pub(crate) fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Sets `section.key` in the configuration.
    pub(crate) fn set(&mut self, section: &str, key: &str, value: impl Into<toml::Value>) {
        let t = self
            .config
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = t {
            t.insert(key.to_owned(), value.into());
        }
    }

    pub(crate) fn get(&self, section: &str, key: &str) -> Option<&toml::Value> {
        self.config.get(section)?.get(key)
    }

    /// The report: every unmapped key with its reason, then the notes.
    pub fn report(&self, source: &str) -> String {
        let mut r = String::new();
        let _ = writeln!(
            r,
            "{source}: {} key(s) without an equivalent in flowd-rs",
            self.unmapped.len()
        );
        for u in &self.unmapped {
            let _ = writeln!(r, "  {}: {}", u.key, u.why);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(r, "notes:");
            for n in &self.notes {
                let _ = writeln!(r, "  {n}");
            }
        }
        r
    }

    /// Writes `flowd-rs.toml`, `policies.d/*.toml` and the report into `dir`, which
    /// must not hold a previous import (nothing is overwritten).
    pub fn write(&self, dir: &Path, source: &str) -> Result<String> {
        std::fs::create_dir_all(dir.join(POLICY_DIR))
            .with_context(|| format!("creating {}", dir.join(POLICY_DIR).display()))?;
        let header = format!(
            "# Imported from {source} by `flowd-rs import`; see {REPORT_FILE} for what has no\n\
             # equivalent. Keys not written here keep flowd-rs's defaults (the packaged\n\
             # flowd-rs.toml documents them all). Install the policies of {POLICY_DIR}/\n\
             # in policy.dir (/etc/flowd-rs/policies.d by default).\n\n"
        );
        let mut files = vec![(
            dir.join("flowd-rs.toml"),
            header + &toml::to_string(&self.config)?,
        )];
        for (name, table) in &self.policies {
            files.push((
                dir.join(POLICY_DIR).join(name),
                format!("# Imported from {source}.\n") + &toml::to_string(table)?,
            ));
        }
        let report = self.report(source);
        files.push((dir.join(REPORT_FILE), report.clone()));
        for (path, _) in &files {
            if path.exists() {
                anyhow::bail!("{} exists: import into an empty directory", path.display());
            }
        }
        for (path, text) in files {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(report)
    }
}

/// A policy file tagging with `experiment`/`activity` (ids, as both peers give them).
pub(crate) fn policy(
    experiment: i64,
    description: &str,
    rules: Vec<toml::Table>,
) -> (String, toml::Table) {
    let mut t = toml::Table::new();
    t.insert("experiment".into(), experiment.into());
    t.insert("description".into(), description.into());
    t.insert(
        "rule".into(),
        toml::Value::Array(rules.into_iter().map(toml::Value::Table).collect()),
    );
    (format!("experiment-{experiment}.toml"), t)
}

/// A rule table from (key, value) pairs.
pub(crate) fn rule<const N: usize>(fields: [(&str, toml::Value); N]) -> toml::Table {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// An experiment id a policy accepts (1-511; 0 is "no experiment").
pub(crate) fn experiment_ok(id: i64) -> bool {
    (1..=511).contains(&id)
}

/// An activity id a policy accepts.
pub(crate) fn activity_ok(id: i64) -> bool {
    (0..=63).contains(&id)
}

/// `host:port` as a socket address string, IPv6 hosts bracketed.
pub(crate) fn host_port(host: &str, port: i64) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests;
