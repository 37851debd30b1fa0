//! `exe`: absolute executable paths, compared exactly with `/proc/PID/exe`.

use std::path::PathBuf;

use super::{list, MatchField, Narrowness};
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::SocketAttrs;

pub struct Exe;

impl MatchField for Exe {
    type Raw = SpannedList<String>;
    type Value = Vec<PathBuf>;
    const COST: u8 = 5;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<Vec<PathBuf>> {
        let items = cx.items(key, list)?;
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

    #[inline]
    fn accepts(v: &Vec<PathBuf>, s: &SocketAttrs) -> bool {
        s.owner.exe.as_ref().is_some_and(|e| v.contains(e))
    }

    fn describe_failure(v: &Vec<PathBuf>, s: &SocketAttrs) -> String {
        match &s.owner.exe {
            None => "exe unknown".to_owned(),
            Some(e) => {
                let paths: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
                format!("exe {} not in {}", e.display(), list(&paths))
            }
        }
    }

    fn overlaps(a: &Vec<PathBuf>, b: &Vec<PathBuf>) -> bool {
        a.iter().any(|x| b.contains(x))
    }

    fn narrowness(_: &Vec<PathBuf>) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(v: &Vec<PathBuf>) -> usize {
        v.capacity() * std::mem::size_of::<PathBuf>()
            + v.iter().map(|p| p.as_os_str().len()).sum::<usize>()
    }
}
