//! `TcpFacts` as flowd-go's `netlink` object: `{"tcpInfo": {...}, "cong":
//! {"algorithm": "..."}}`, with its field names.

use std::fmt::Write;

use super::TcpFacts;
pub use crate::config::EnrichMode as Mode;

/// How a field is read from `struct tcp_info`.
#[derive(Clone, Copy)]
enum At {
    U8(usize),
    /// A bit field of one byte: offset, shift, width.
    Bits(usize, u8, u8),
    U32(usize),
    U64(usize),
}

/// flowd-go's name, where the field is, and whether `lean` keeps it. Offsets from
/// include/uapi/linux/tcp.h (the same the dump parser reads).
const FIELDS: &[(&str, At, bool)] = &[
    ("state", At::U8(0), false),
    ("caState", At::U8(1), false),
    ("retransmits", At::U8(2), false),
    ("probes", At::U8(3), false),
    ("backoff", At::U8(4), false),
    ("options", At::U8(5), false),
    ("sndWscale", At::Bits(6, 0, 4), false),
    ("rcvdWscale", At::Bits(6, 4, 4), false),
    ("deliveryRateAppLimited", At::Bits(7, 0, 1), false),
    ("fastOpenClientFail", At::Bits(7, 1, 2), false),
    ("rto", At::U32(8), false),
    ("ato", At::U32(12), false),
    ("sndMss", At::U32(16), true),
    ("rcvMss", At::U32(20), false),
    ("unAcked", At::U32(24), false),
    ("sAcked", At::U32(28), false),
    ("lost", At::U32(32), false),
    ("retrans", At::U32(36), false),
    ("fAckets", At::U32(40), false),
    ("lastDataSent", At::U32(44), false),
    ("lastAckSent", At::U32(48), false),
    ("lastDataRecv", At::U32(52), false),
    ("lastAckRecv", At::U32(56), false),
    ("pMtu", At::U32(60), true),
    ("rcvSsThresh", At::U32(64), false),
    ("rtt", At::U32(68), true),
    ("rttVar", At::U32(72), true),
    ("sndSsThresh", At::U32(76), true),
    ("sndCwnd", At::U32(80), true),
    ("advMss", At::U32(84), true),
    ("reordering", At::U32(88), false),
    ("rcvRtt", At::U32(92), false),
    ("rcvSpace", At::U32(96), false),
    ("totalRetrans", At::U32(100), false),
    ("pacingRate", At::U64(104), false),
    ("maxPacingRate", At::U64(112), false),
    ("bytesAcked", At::U64(120), false),
    ("bytesRecv", At::U64(128), false),
    ("segsOut", At::U32(136), false),
    ("segsIn", At::U32(140), false),
    ("notsentBytes", At::U32(144), false),
    ("minRtt", At::U32(148), true),
    ("dataSegsIn", At::U32(152), false),
    ("dataSegsOut", At::U32(156), false),
    ("deliveryRate", At::U64(160), true),
    ("busyTime", At::U64(168), false),
    ("rwndLimited", At::U64(176), false),
    ("sndBufLimited", At::U64(184), false),
    ("delivered", At::U32(192), false),
    ("deliveredCe", At::U32(196), false),
    ("bytesSent", At::U64(200), true),
    ("bytesRetrans", At::U64(208), false),
    ("dsAckDups", At::U32(216), false),
    ("reordSeen", At::U32(220), false),
    ("rcvOooPack", At::U32(224), false),
    ("sndWnd", At::U32(228), false),
];

impl At {
    /// The value, or None past the end of an older kernel's shorter struct.
    fn read(self, b: &[u8]) -> Option<u64> {
        Some(match self {
            At::U8(o) => u64::from(*b.get(o)?),
            At::Bits(o, shift, width) => u64::from((*b.get(o)? >> shift) & ((1 << width) - 1)),
            At::U32(o) => u64::from(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?)),
            At::U64(o) => u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?),
        })
    }
}

/// The `netlink` object, as JSON text.
pub fn render(facts: &TcpFacts, mode: Mode) -> String {
    let mut out = String::with_capacity(if mode == Mode::Lean { 256 } else { 1400 });
    out.push_str("{\"tcpInfo\":{");
    let mut first = true;
    // flowd-go's lean variant keeps the retransmit count under its Go field name.
    if mode == Mode::Lean {
        if let Some(v) = At::U8(2).read(&facts.info) {
            let _ = write!(out, "\"Retransmits\":{v}");
            first = false;
        }
    }
    for (name, at, lean) in FIELDS {
        if mode == Mode::Lean && !lean {
            continue;
        }
        if let Some(v) = at.read(&facts.info) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "\"{name}\":{v}");
        }
    }
    out.push('}');
    if let Some(c) = &facts.cong {
        out.push_str(",\"cong\":{\"algorithm\":");
        out.push_str(&serde_json::to_string(c).unwrap_or_else(|_| "\"\"".into()));
        out.push('}');
    }
    out.push('}');
    out
}
