//! `local_ports`, `remote_ports`: port numbers and `"lo-hi"` ranges.

use std::marker::PhantomData;

use toml::Value;

use super::{MatchField, Narrowness, Side};
use crate::policy::accounts::Accounts;
use crate::policy::compile::{type_name, Ctx};
use crate::policy::error::ErrorKind;
use crate::policy::file::SpannedList;
use crate::policy::rule::SocketAttrs;
use crate::policy::sets::{check_port, PortSet};

pub struct Ports<S>(PhantomData<S>);
pub type LocalPorts = Ports<super::Local>;
pub type RemotePorts = Ports<super::Remote>;

impl<S: Side> MatchField for Ports<S> {
    type Raw = SpannedList<Value>;
    type Value = PortSet;
    const COST: u8 = 1;

    fn compile(
        cx: &mut Ctx,
        key: &'static str,
        list: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<PortSet> {
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

    #[inline]
    fn accepts(v: &PortSet, s: &SocketAttrs) -> bool {
        v.contains(S::addr(s).port())
    }

    fn describe_failure(v: &PortSet, s: &SocketAttrs) -> String {
        format!("{} port {} not in {v}", S::NAME, S::addr(s).port())
    }

    fn overlaps(a: &PortSet, b: &PortSet) -> bool {
        a.overlaps(b)
    }

    /// 65536 - ports in the set: a single port scores 65535, `1-65535` scores 1.
    fn narrowness(v: &PortSet) -> Narrowness {
        Narrowness {
            prefix: 0,
            ports: 65536 - v.count(),
        }
    }

    fn heap_bytes(v: &PortSet) -> usize {
        v.heap_bytes()
    }
}
