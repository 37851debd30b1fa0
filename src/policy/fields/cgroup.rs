//! `cgroup`: cgroup v2 path prefixes, matched on whole components.

use super::{list, MatchField, Narrowness};
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::SocketAttrs;
use crate::policy::sets::CgroupPrefix;

pub struct Cgroup;

impl MatchField for Cgroup {
    type Raw = SpannedList<String>;
    type Value = Vec<CgroupPrefix>;
    const COST: u8 = 6;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<Vec<CgroupPrefix>> {
        let items = cx.items(key, list)?;
        let mut out = Vec::new();
        for item in items {
            match CgroupPrefix::parse(item.get_ref()) {
                Ok(c) => out.push(c),
                Err(msg) => cx.err(item.span(), ErrorKind::BadCgroup, msg),
            }
        }
        (out.len() == items.len()).then_some(out)
    }

    #[inline]
    fn accepts(v: &Vec<CgroupPrefix>, s: &SocketAttrs) -> bool {
        s.owner
            .cgroup
            .as_ref()
            .is_some_and(|c| v.iter().any(|p| p.matches(c)))
    }

    fn describe_failure(v: &Vec<CgroupPrefix>, s: &SocketAttrs) -> String {
        match &s.owner.cgroup {
            None => "cgroup unknown".to_owned(),
            Some(c) => format!("cgroup {c} not under {}", list(v)),
        }
    }

    fn overlaps(a: &Vec<CgroupPrefix>, b: &Vec<CgroupPrefix>) -> bool {
        a.iter().any(|x| b.iter().any(|y| x.overlaps(y)))
    }

    fn narrowness(_: &Vec<CgroupPrefix>) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(v: &Vec<CgroupPrefix>) -> usize {
        v.capacity() * std::mem::size_of::<CgroupPrefix>()
            + v.iter().map(CgroupPrefix::heap_bytes).sum::<usize>()
    }
}
