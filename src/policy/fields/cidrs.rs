//! `local_cidrs`, `remote_cidrs`: address sets with `!` exclusions.

use std::marker::PhantomData;

use super::{MatchField, Narrowness, Side};
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::SocketAttrs;
use crate::policy::sets::CidrSet;

pub struct Cidrs<S>(PhantomData<S>);
pub type LocalCidrs = Cidrs<super::Local>;
pub type RemoteCidrs = Cidrs<super::Remote>;

impl<S: Side> MatchField for Cidrs<S> {
    type Raw = SpannedList<String>;
    type Value = CidrSet;
    const COST: u8 = 2;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<CidrSet> {
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

    #[inline]
    fn accepts(v: &CidrSet, s: &SocketAttrs) -> bool {
        v.contains(S::addr(s).ip())
    }

    fn describe_failure(v: &CidrSet, s: &SocketAttrs) -> String {
        let (side, ip) = (S::NAME, S::addr(s).ip());
        match v.excluded_by(ip) {
            Some(n) => format!("{side} {ip} is excluded by !{n}"),
            None => format!("{side} {ip} not in {v}"),
        }
    }

    fn overlaps(a: &CidrSet, b: &CidrSet) -> bool {
        a.overlaps(b)
    }

    fn narrowness(v: &CidrSet) -> Narrowness {
        Narrowness {
            prefix: v.prefix_score(),
            ports: 0,
        }
    }

    fn heap_bytes(v: &CidrSet) -> usize {
        v.heap_bytes()
    }
}
