//! Checkers for the list-valued match fields of a rule: each turns the raw TOML list
//! into its compiled set, reporting every bad element at its own position.

use std::path::PathBuf;

use toml::Value;

use super::compile::{type_name, Ctx};
use super::error::ErrorKind;
use super::file::SpannedList;
use super::rule::Account;
use super::sets::{check_port, CgroupPrefix, CidrSet, PortSet};

/// The kernel keeps `TASK_COMM_LEN` = 16 bytes of a command name, including the NUL.
const COMM_MAX: usize = 15;

pub(super) fn cidrs(cx: &mut Ctx, key: &str, list: &SpannedList<String>) -> Option<CidrSet> {
    let items = cx.items(key, list)?;
    let mut set = CidrSet {
        pos: Vec::new(),
        neg: Vec::new(),
    };
    let mut ok = true;
    for item in items {
        match CidrSet::parse_entry(item.get_ref()) {
            Ok((false, net)) => set.pos.push(net),
            Ok((true, net)) => set.neg.push(net),
            Err(msg) => {
                cx.err(item.span(), ErrorKind::BadCidr, msg);
                ok = false;
            }
        }
    }
    ok.then_some(set)
}

pub(super) fn ports(cx: &mut Ctx, key: &str, list: &SpannedList<Value>) -> Option<PortSet> {
    let items = cx.items(key, list)?;
    let mut ranges = Vec::new();
    let mut ok = true;
    for item in items {
        let r = match item.get_ref() {
            Value::Integer(n) => check_port(*n).map(|p| (p, p)),
            Value::String(s) => PortSet::parse_range(s),
            other => Err(format!(
                "expected a port number or a \"lo-hi\" range string, not {}",
                type_name(other)
            )),
        };
        match r {
            Ok(r) => ranges.push(r),
            Err(msg) => {
                cx.err(item.span(), ErrorKind::BadPort, msg);
                ok = false;
            }
        }
    }
    ok.then(|| PortSet::new(ranges))
}

pub(super) fn ids(
    cx: &mut Ctx,
    key: &str,
    list: &SpannedList<Value>,
    resolve: impl Fn(&str) -> Option<u32>,
) -> Option<Vec<Account>> {
    let (what, kind) = if key == "users" {
        ("user", ErrorKind::UnknownUser)
    } else {
        ("group", ErrorKind::UnknownGroup)
    };
    let items = cx.items(key, list)?;
    let mut out = Vec::new();
    let mut ok = true;
    for item in items {
        match item.get_ref() {
            Value::Integer(n) => match u32::try_from(*n) {
                Ok(id) if id != u32::MAX => out.push(Account { id, name: None }),
                _ => {
                    cx.err(
                        item.span(),
                        ErrorKind::InvalidValue,
                        format!("{what} id {n} is out of range; ids are 0-4294967294"),
                    );
                    ok = false;
                }
            },
            Value::String(s) => match resolve(s) {
                Some(id) => out.push(Account {
                    id,
                    name: Some(s.clone()),
                }),
                None => {
                    cx.err(
                        item.span(),
                        kind,
                        format!("unknown {what} {s:?}: no such {what} on this host; fix the name, create the account, or give the numeric id"),
                    );
                    ok = false;
                }
            },
            other => {
                cx.err(
                    item.span(),
                    ErrorKind::InvalidValue,
                    format!(
                        "expected a {what} name or a numeric id, not {}",
                        type_name(other)
                    ),
                );
                ok = false;
            }
        }
    }
    out.sort_by_key(|a| a.id);
    out.dedup_by_key(|a| a.id);
    ok.then_some(out)
}

pub(super) fn process(cx: &mut Ctx, list: &SpannedList<String>) -> Option<Vec<String>> {
    let items = cx.items("process", list)?;
    let mut ok = true;
    for item in items {
        let name = item.get_ref();
        if name.is_empty() {
            cx.err(
                item.span(),
                ErrorKind::InvalidValue,
                "process name must not be empty",
            );
            ok = false;
        } else if name.len() > COMM_MAX {
            let mut cut = COMM_MAX;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            cx.err(
                item.span(),
                ErrorKind::ProcessTooLong,
                format!(
                    "process name {name:?} is {} bytes long, but the kernel keeps only the first {COMM_MAX} bytes of a command name, so it can never match; write {:?} or match on `exe` instead",
                    name.len(),
                    &name[..cut]
                ),
            );
            ok = false;
        }
    }
    ok.then(|| items.iter().map(|i| i.get_ref().clone()).collect())
}

pub(super) fn exe(cx: &mut Ctx, list: &SpannedList<String>) -> Option<Vec<PathBuf>> {
    let items = cx.items("exe", list)?;
    let mut ok = true;
    for item in items {
        let p = item.get_ref();
        if !p.starts_with('/') {
            cx.err(
                item.span(),
                ErrorKind::RelativeExe,
                format!("exe path {p:?} is not absolute; write the full path of the executable as /proc/PID/exe shows it, e.g. \"/usr/bin/xrootd\""),
            );
            ok = false;
        }
    }
    ok.then(|| items.iter().map(|i| PathBuf::from(i.get_ref())).collect())
}

pub(super) fn cgroup(cx: &mut Ctx, list: &SpannedList<String>) -> Option<Vec<CgroupPrefix>> {
    let items = cx.items("cgroup", list)?;
    let mut out = Vec::new();
    for item in items {
        match CgroupPrefix::parse(item.get_ref()) {
            Ok(c) => out.push(c),
            Err(msg) => cx.err(item.span(), ErrorKind::BadCgroup, msg),
        }
    }
    (out.len() == items.len()).then_some(out)
}
