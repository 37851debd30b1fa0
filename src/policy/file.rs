//! The on-disk policy format: TOML parsed into span-carrying raw structs.
//!
//! Only syntax and shape are checked here (serde with `deny_unknown_fields`); meaning
//! (names, CIDRs, ports, accounts) is checked in `compile`, which needs the spans kept
//! here to point at the offending value. Fields that accept several types (a name or an
//! id) are kept as `toml::Value` so that `compile` can say exactly what is accepted,
//! instead of serde's "did not match any variant".

use std::path::Path;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::error::{ErrorKind, LineIndex, PolicyError};
use super::fields::{self, MatchField};

/// Top-level fields, in documentation order (also used for "did you mean").
pub const FILE_FIELDS: &[&str] = &["experiment", "enabled", "description", "rule"];

pub type SpannedList<T> = Spanned<Vec<Spanned<T>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub experiment: Spanned<Value>,
    pub enabled: Option<bool>,
    #[allow(dead_code)] // documentation for humans; kept so that it is an allowed field
    pub description: Option<String>,
    #[serde(default)]
    pub rule: Vec<Spanned<RawRule>>,
}

/// Generates [`RawRule`] and [`RULE_FIELDS`]: the rule's own keys, then the match
/// fields (`fields::match_fields!`), each parsed as its `MatchField::Raw`.
macro_rules! raw_rule {
    ($($key:ident: $V:ident = $m:ident::$T:ident,)*) => {
        /// Rule fields, in documentation order.
        pub const RULE_FIELDS: &[&str] = &[
            "name",
            "description",
            "activity",
            "scitag",
            "priority",
            "match_all",
            $(stringify!($key),)*
        ];

        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawRule {
            pub name: Spanned<String>,
            #[allow(dead_code)]
            pub description: Option<String>,
            pub activity: Option<Spanned<Value>>,
            pub scitag: Option<Spanned<i64>>,
            pub priority: Option<Spanned<i64>>,
            /// The host's fallback tag: every socket and every IPv6 packet no other
            /// rule claims (perfSONAR hosts). Takes no match field and no priority.
            pub match_all: Option<Spanned<bool>>,
            $(pub $key: Option<<fields::$m::$T as MatchField>::Raw>,)*
        }
    };
}

fields::match_fields!(raw_rule);

/// Parses one file's text; on failure returns the single error serde stops at.
pub fn parse(path: &Path, text: &str, lines: &LineIndex) -> Result<RawFile, PolicyError> {
    toml::from_str::<RawFile>(text).map_err(|e| {
        let (line, col) = lines.locate(text, e.span().map_or(0, |s| s.start));
        let at = e.span().map_or("", |s| text.get(s).unwrap_or(""));
        let (kind, message) = explain_toml_error(e.message(), at);
        PolicyError {
            path: path.to_owned(),
            line,
            col,
            kind,
            message,
        }
    })
}

/// Rewrites serde/toml messages into ones that say what to do.
fn explain_toml_error(msg: &str, at: &str) -> (ErrorKind, String) {
    let msg = msg.trim_end();
    if msg == "invalid type: map, expected a sequence" && at.starts_with("[rule") {
        return (
            ErrorKind::InvalidValue,
            "rules are an array of tables: write `[[rule]]`, not `[rule]`".to_owned(),
        );
    }
    if let Some(head) = msg.strip_suffix(", expected a sequence") {
        return (
            ErrorKind::InvalidValue,
            format!("{head}, expected a list: write the value in brackets, e.g. `[\"value\"]`"),
        );
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let (field, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let name = field.trim_matches('`');
        let allowed: Vec<&str> = expected
            .trim_start_matches("one of ")
            .split(['`', ',', ' '])
            .filter(|s| !s.is_empty() && *s != "or")
            .collect();
        let hint = allowed
            .iter()
            .map(|a| (strsim::jaro_winkler(name, a), *a))
            .filter(|(s, _)| *s >= 0.85)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, a)| format!("did you mean `{a}`? "))
            .unwrap_or_default();
        let list = allowed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>();
        return (
            ErrorKind::UnknownField,
            format!(
                "unknown field `{name}`; {hint}allowed fields here: {}",
                list.join(", ")
            ),
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return (
            ErrorKind::MissingField,
            format!("missing required field {rest}"),
        );
    }
    if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        let msg = msg
            .replace("expected i64", "expected an integer")
            .replace("expected a boolean", "expected true or false");
        return (ErrorKind::InvalidValue, msg);
    }
    if msg == "duplicate key" && !at.is_empty() {
        return (
            ErrorKind::Syntax,
            format!(
                "TOML syntax error: duplicate key `{at}`; a key may appear only once per table"
            ),
        );
    }
    (ErrorKind::Syntax, format!("TOML syntax error: {msg}"))
}
