//! `process`: the process's `comm`, compared exactly.

use super::{list, MatchField, Narrowness};
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::SocketAttrs;

/// The kernel keeps `TASK_COMM_LEN` = 16 bytes of a command name, including the NUL.
const COMM_MAX: usize = 15;

pub struct Process;

impl MatchField for Process {
    type Raw = SpannedList<String>;
    type Value = Vec<String>;
    const COST: u8 = 4;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<Vec<String>> {
        let items = cx.items(key, list)?;
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

    #[inline]
    fn accepts(v: &Vec<String>, s: &SocketAttrs) -> bool {
        s.owner.comm.as_ref().is_some_and(|c| v.contains(c))
    }

    fn describe_failure(v: &Vec<String>, s: &SocketAttrs) -> String {
        match &s.owner.comm {
            None => "process name unknown".to_owned(),
            Some(c) => {
                let quoted: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
                format!("process {c:?} not in {}", list(&quoted))
            }
        }
    }

    fn overlaps(a: &Vec<String>, b: &Vec<String>) -> bool {
        a.iter().any(|x| b.contains(x))
    }

    fn narrowness(_: &Vec<String>) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(v: &Vec<String>) -> usize {
        v.capacity() * std::mem::size_of::<String>() + v.iter().map(String::capacity).sum::<usize>()
    }
}
