//! `direction`: `"outbound"` (this host connected) or `"inbound"` (this host accepted).

use toml::Spanned;

use super::{MatchField, Narrowness};
use crate::model::socket::Direction;
use crate::policy::accounts::Accounts;
use crate::policy::compile::Ctx;
use crate::policy::error::ErrorKind;
use crate::policy::rule::{direction_str, SocketAttrs};

pub struct DirectionField;

impl MatchField for DirectionField {
    type Raw = Spanned<String>;
    type Value = Direction;
    const COST: u8 = 0;

    fn compile(
        cx: &mut Ctx,
        _: &'static str,
        raw: &Self::Raw,
        _: &dyn Accounts,
    ) -> Option<Direction> {
        match raw.get_ref().to_ascii_lowercase().as_str() {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            other => {
                cx.err(
                    raw.span(),
                    ErrorKind::InvalidValue,
                    format!("unknown direction {other:?}; expected \"outbound\" (this host connected) or \"inbound\" (this host accepted)"),
                );
                None
            }
        }
    }

    /// A socket of unknown direction never matches: the value compiled is never `Unknown`.
    #[inline]
    fn accepts(v: &Direction, s: &SocketAttrs) -> bool {
        *v == s.direction
    }

    fn describe_failure(v: &Direction, s: &SocketAttrs) -> String {
        match s.direction {
            Direction::Unknown => "direction unknown".to_owned(),
            d => format!(
                "direction {} is not {}",
                direction_str(d),
                direction_str(*v)
            ),
        }
    }

    fn overlaps(a: &Direction, b: &Direction) -> bool {
        a == b
    }

    fn narrowness(_: &Direction) -> Narrowness {
        Narrowness::NONE
    }

    fn heap_bytes(_: &Direction) -> usize {
        0
    }
}
