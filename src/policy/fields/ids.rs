//! `users`, `groups`: account names (resolved at load time) or numeric ids.

use std::marker::PhantomData;

use toml::Value;

use super::{list, MatchField, Narrowness};
use crate::policy::accounts::Accounts;
use crate::policy::compile::{type_name, Ctx};
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::{Account, SocketAttrs};

/// Which id of the socket's owner a field lists.
pub trait IdKind {
    /// "user" or "group", in error messages.
    const WHAT: &'static str;
    /// "uid" or "gid", in explanations.
    const ID: &'static str;
    const UNKNOWN: ErrorKind;
    fn resolve(accounts: &dyn Accounts, name: &str) -> Option<u32>;
    fn of(s: &SocketAttrs) -> Option<u32>;
}

#[derive(Debug)]
pub enum Uid {}
#[derive(Debug)]
pub enum Gid {}

impl IdKind for Uid {
    const WHAT: &'static str = "user";
    const ID: &'static str = "uid";
    const UNKNOWN: ErrorKind = ErrorKind::UnknownUser;
    fn resolve(accounts: &dyn Accounts, name: &str) -> Option<u32> {
        accounts.uid_of(name)
    }
    fn of(s: &SocketAttrs) -> Option<u32> {
        s.uid
    }
}

impl IdKind for Gid {
    const WHAT: &'static str = "group";
    const ID: &'static str = "gid";
    const UNKNOWN: ErrorKind = ErrorKind::UnknownGroup;
    fn resolve(accounts: &dyn Accounts, name: &str) -> Option<u32> {
        accounts.gid_of(name)
    }
    fn of(s: &SocketAttrs) -> Option<u32> {
        s.owner.gid
    }
}

pub struct Ids<K>(PhantomData<K>);
pub type Users = Ids<Uid>;
pub type Groups = Ids<Gid>;

impl<K: IdKind> MatchField for Ids<K> {
    type Raw = SpannedList<Value>;
    /// Sorted by id, without duplicates.
    type Value = Vec<Account>;
    const COST: u8 = 3;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        accounts: &dyn Accounts,
    ) -> Option<Vec<Account>> {
        let what = K::WHAT;
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
                Value::String(s) => match K::resolve(accounts, s) {
                    Some(id) => out.push(Account {
                        id,
                        name: Some(s.clone()),
                    }),
                    None => {
                        cx.err(
                            item.span(),
                            K::UNKNOWN,
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

    #[inline]
    fn accepts(v: &Vec<Account>, s: &SocketAttrs) -> bool {
        K::of(s).is_some_and(|id| v.binary_search_by_key(&id, |a| a.id).is_ok())
    }

    fn describe_failure(v: &Vec<Account>, s: &SocketAttrs) -> String {
        match K::of(s) {
            None => format!("{} unknown", K::ID),
            Some(id) => format!("{} {id} not in {}", K::ID, list(v)),
        }
    }

    fn overlaps(a: &Vec<Account>, b: &Vec<Account>) -> bool {
        a.iter().any(|x| b.iter().any(|y| x.id == y.id))
    }

    fn narrowness(_: &Vec<Account>) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(v: &Vec<Account>) -> usize {
        v.capacity() * std::mem::size_of::<Account>()
            + v.iter()
                .filter_map(|a| a.name.as_ref())
                .map(String::capacity)
                .sum::<usize>()
    }
}
