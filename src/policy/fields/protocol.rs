//! `protocol`: `"tcp"` or `"udp"`.

use toml::Spanned;

use super::{MatchField, Narrowness};
use crate::model::socket::Protocol;
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::rule::SocketAttrs;

pub struct ProtocolField;

impl MatchField for ProtocolField {
    type Raw = Spanned<String>;
    type Value = Protocol;
    const COST: u8 = 0;

    fn compile(
        cx: &mut Ctx,
        _: &'static str,
        raw: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<Protocol> {
        match raw.get_ref().to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            other => {
                cx.err(
                    raw.span(),
                    ErrorKind::InvalidValue,
                    format!("unknown protocol {other:?}; expected \"tcp\" or \"udp\""),
                );
                None
            }
        }
    }

    #[inline]
    fn accepts(v: &Protocol, s: &SocketAttrs) -> bool {
        *v == s.proto
    }

    fn describe_failure(v: &Protocol, s: &SocketAttrs) -> String {
        format!("protocol {} is not {}", s.proto.as_str(), v.as_str())
    }

    fn overlaps(a: &Protocol, b: &Protocol) -> bool {
        a == b
    }

    fn narrowness(_: &Protocol) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(_: &Protocol) -> usize {
        0
    }
}
