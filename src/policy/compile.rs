//! Turns one parsed policy file into compiled rules, checking every value against the
//! registry and the accounts database. Collects all errors of the file rather than
//! stopping at the first.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use toml::{Spanned, Value};

use super::accounts::Accounts;
use super::error::{ErrorKind, LineIndex, PolicyError};
use super::file::{RawFile, RawRule, SpannedList};
use super::registry::{self, LookupError, Registry};
use super::rule::{Match, Rule, RuleRef};

/// The result of compiling one file.
pub struct CompiledFile {
    pub rules: Vec<Rule>,
    pub enabled: bool,
}

/// Where a file's errors are collected while it compiles. `pub` only because
/// `MatchField::compile` takes it; `compile` is private, so it is not nameable
/// outside `policy`.
pub struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
    lines: &'a LineIndex,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    pub(super) fn err(&mut self, span: Range<usize>, kind: ErrorKind, message: impl Into<String>) {
        let (line, col) = self.lines.locate(self.text, span.start);
        self.errors.push(PolicyError {
            path: self.path.to_owned(),
            line,
            col,
            kind,
            message: message.into(),
        });
    }

    fn lookup_err(&mut self, span: Range<usize>, e: LookupError) {
        let kind = match e {
            LookupError::Unknown { .. } => ErrorKind::UnknownName,
            LookupError::Ambiguous { .. } => ErrorKind::AmbiguousName,
        };
        self.err(span, kind, e.to_string());
    }

    /// Items of a list field, or an error if the list is empty (an empty list would
    /// match nothing, which is never what the author meant).
    pub(super) fn items<'v, T>(
        &mut self,
        key: &str,
        list: &'v SpannedList<T>,
    ) -> Option<&'v [Spanned<T>]> {
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                ErrorKind::InvalidValue,
                format!("`{key}` is an empty list, which matches nothing; remove the field to match any value"),
            );
            return None;
        }
        Some(list.get_ref())
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Compiles one file; errors are appended to `errors`.
#[allow(clippy::too_many_arguments)]
pub fn compile_file(
    path: &Path,
    text: &str,
    lines: &LineIndex,
    raw: &RawFile,
    file_index: usize,
    reg: &Registry,
    accounts: &dyn Accounts,
    errors: &mut Vec<PolicyError>,
) -> CompiledFile {
    let mut cx = Ctx {
        path,
        text,
        lines,
        errors: Vec::new(),
    };
    let experiment = experiment(&mut cx, &raw.experiment, reg);
    let file: Arc<str> = path
        .file_name()
        .map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
        .into();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut rules = Vec::new();
    for (rule_index, r) in raw.rule.iter().enumerate() {
        let (line, col) = lines.locate(text, r.span().start);
        let name = &r.get_ref().name;
        if name.get_ref().trim().is_empty() {
            cx.err(
                name.span(),
                ErrorKind::InvalidValue,
                "rule `name` must not be empty",
            );
        } else if let Some(first) = seen.insert(name.get_ref(), line) {
            cx.err(
                name.span(),
                ErrorKind::DuplicateRule,
                format!(
                    "duplicate rule name {:?} (first used by the rule at line {first}); rule names must be unique within a file",
                    name.get_ref()
                ),
            );
        }
        let rule = compile_rule(&mut cx, r, experiment, reg, accounts);
        if let (Some(exp), Some((activity, priority, matcher, match_all))) = (experiment, rule) {
            let specificity = matcher.specificity();
            rules.push(Rule {
                id: Arc::new(RuleRef {
                    file: file.clone(),
                    name: name.get_ref().as_str().into(),
                    line,
                }),
                col,
                experiment: exp,
                activity,
                priority,
                matcher,
                specificity,
                match_all,
                file_index,
                rule_index,
            });
        }
    }
    errors.append(&mut cx.errors);
    CompiledFile {
        rules,
        enabled: raw.enabled.unwrap_or(true),
    }
}

fn experiment(cx: &mut Ctx, v: &Spanned<Value>, reg: &Registry) -> Option<u16> {
    match v.get_ref() {
        Value::Integer(i) if (1..=i64::from(registry::EXPERIMENT_ID_MAX)).contains(i) => {
            Some(*i as u16)
        }
        Value::Integer(i) => {
            cx.err(
                v.span(),
                ErrorKind::InvalidValue,
                format!("experiment id {i} is out of range; experiment ids are 1-511"),
            );
            None
        }
        Value::String(s) => match reg.experiment(s) {
            Ok(e) => Some(e.id),
            Err(e) => {
                cx.lookup_err(v.span(), e);
                None
            }
        },
        other => {
            cx.err(
                v.span(),
                ErrorKind::InvalidValue,
                format!(
                    "`experiment` must be a name such as \"atlas\" or an id such as 2, not {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

/// Returns (activity, priority, match, match_all) if the rule is valid.
fn compile_rule(
    cx: &mut Ctx,
    r: &Spanned<RawRule>,
    experiment: Option<u16>,
    reg: &Registry,
    accounts: &dyn Accounts,
) -> Option<(u8, i32, Match, bool)> {
    let before = cx.errors.len();
    let raw = r.get_ref();
    let activity = activity(cx, r, experiment, reg);
    let priority = match &raw.priority {
        None => 0,
        Some(p) => i32::try_from(*p.get_ref()).unwrap_or_else(|_| {
            cx.err(
                p.span(),
                ErrorKind::InvalidValue,
                format!(
                    "priority {} is out of range; use a value between -2147483648 and 2147483647",
                    p.get_ref()
                ),
            );
            0
        }),
    };
    let m = Match::compile(cx, raw, accounts);
    let match_all = raw.match_all.as_ref().is_some_and(|b| *b.get_ref());
    if let Some(b) = raw.match_all.as_ref().filter(|b| *b.get_ref()) {
        // The fallback of every other rule: a field or a priority would make it
        // something else than "everything nobody else claims".
        if m.specificity().fields > 0 || raw.priority.is_some() {
            cx.err(
                b.span(),
                ErrorKind::InvalidValue,
                "a `match_all = true` rule tags everything no other rule matches: it takes no match field and no `priority`; remove them, or remove `match_all` for an ordinary rule",
            );
        }
    }
    (cx.errors.len() == before).then_some(())?;
    Some((activity?, priority, m, match_all))
}

fn activity(
    cx: &mut Ctx,
    r: &Spanned<RawRule>,
    experiment: Option<u16>,
    reg: &Registry,
) -> Option<u8> {
    let raw = r.get_ref();
    match (&raw.activity, &raw.scitag) {
        (None, None) => {
            cx.err(
                r.span(),
                ErrorKind::MissingField,
                format!(
                    "rule {:?} has no tag; add `activity = \"...\"` (a name or an id) or `scitag = N`",
                    raw.name.get_ref()
                ),
            );
            None
        }
        (Some(_), Some(s)) => {
            cx.err(
                s.span(),
                ErrorKind::InvalidValue,
                "give either `activity` or `scitag`, not both",
            );
            None
        }
        (Some(a), None) => match a.get_ref() {
            Value::Integer(i) if (0..=i64::from(registry::ACTIVITY_ID_MAX)).contains(i) => {
                Some(*i as u8)
            }
            Value::Integer(i) => {
                cx.err(
                    a.span(),
                    ErrorKind::InvalidValue,
                    format!("activity id {i} is out of range; activity ids are 0-63"),
                );
                None
            }
            Value::String(s) => {
                let exp = experiment?;
                match reg.experiment_by_id(exp) {
                    None => {
                        cx.err(
                            a.span(),
                            ErrorKind::UnknownName,
                            format!("experiment {exp} is not in the registry, so activity names cannot be resolved; give the activity id (0-63)"),
                        );
                        None
                    }
                    Some(e) => match e.activity(s) {
                        Ok(act) => Some(act.id),
                        Err(err) => {
                            cx.lookup_err(a.span(), err);
                            None
                        }
                    },
                }
            }
            other => {
                cx.err(
                    a.span(),
                    ErrorKind::InvalidValue,
                    format!("`activity` must be a name such as \"Production Input\" or an id such as 15, not {}", type_name(other)),
                );
                None
            }
        },
        (None, Some(s)) => {
            let n = *s.get_ref();
            let Some((exp, act)) = u32::try_from(n).ok().and_then(registry::split_scitag) else {
                cx.err(
                    s.span(),
                    ErrorKind::InvalidValue,
                    format!("scitag {n} is not a valid tag; a scitag is experiment id (1-511) * 64 + activity id (0-63), i.e. 64-32767"),
                );
                return None;
            };
            let file_exp = experiment?;
            if exp != file_exp {
                let name = |id| {
                    reg.experiment_by_id(id)
                        .map_or_else(|| id.to_string(), |e| format!("{id} ({})", e.name))
                };
                cx.err(
                    s.span(),
                    ErrorKind::ScitagMismatch,
                    format!(
                        "scitag {n} is experiment {}, activity {act}, but this file is for experiment {}; use `activity = {act}` or move the rule to that experiment's file",
                        name(exp),
                        name(file_exp)
                    ),
                );
                return None;
            }
            Some(act)
        }
    }
}
