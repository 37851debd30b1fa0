//! Parser tests on replies captured on a 6.18 kernel by `examples/capture.rs` (fixed
//! ports in a private netns; cookies in tests/data/capture.txt).

use super::*;
use crate::model::socket::{Direction, Protocol, SockState};
use proptest::prelude::*;

const TCP4: &[u8] = include_bytes!("../../../tests/data/tcp4.bin");
const TCP6: &[u8] = include_bytes!("../../../tests/data/tcp6.bin");
const UDP4: &[u8] = include_bytes!("../../../tests/data/udp4.bin");
const UDP6: &[u8] = include_bytes!("../../../tests/data/udp6.bin");
const CAPTURE: &str = include_str!("../../../tests/data/capture.txt");

fn meta(name: &str) -> u64 {
    CAPTURE
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from capture.txt"))
}

fn req(proto: Protocol, seq: u32) -> Request {
    Request {
        proto,
        seq,
        netns: meta("netns"),
    }
}

struct Parsed {
    out: Vec<SocketObservation>,
    listeners: Listeners,
    stats: ParseStats,
}

fn parse_all(inputs: &[(&[u8], Request)]) -> Parsed {
    let mut p = Parsed {
        out: Vec::new(),
        listeners: Listeners::default(),
        stats: ParseStats::default(),
    };
    for (bytes, r) in inputs {
        let progress = parse_replies(bytes, r, &mut p.out, &mut p.listeners, &mut p.stats);
        assert_eq!(progress, Ok(Progress::Done));
    }
    for o in p.out.iter_mut() {
        o.direction = p.listeners.direction(&o.key);
    }
    p
}

fn find(out: &[SocketObservation], cookie: u64) -> &SocketObservation {
    out.iter()
        .find(|o| o.cookie == cookie)
        .unwrap_or_else(|| panic!("cookie {cookie} not in dump"))
}

fn key(proto: Protocol, l: &str, r: &str) -> FlowKey {
    FlowKey::new(proto, l.parse().unwrap(), r.parse().unwrap())
}

/// Byte ranges of each netlink message in a capture.
fn frames(buf: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        v.push(off..off + len);
        off += (len + 3) & !3;
    }
    v
}

fn all_four() -> Parsed {
    parse_all(&[
        (TCP4, req(Protocol::Tcp, 1)),
        (TCP6, req(Protocol::Tcp, 2)),
        (UDP4, req(Protocol::Udp, 3)),
        (UDP6, req(Protocol::Udp, 4)),
    ])
}

#[test]
fn captured_tcp4_gives_exact_tuples_states_and_cookies() {
    let p = all_four();
    let c4 = find(&p.out, meta("c4"));
    assert_eq!(
        c4.key,
        key(Protocol::Tcp, "127.0.0.1:40000", "127.0.0.1:5000")
    );
    assert_eq!(c4.state, SockState::Established);
    assert_eq!(c4.direction, Direction::Outbound);
    assert_eq!(c4.uid, Some(0));
    assert_ne!(c4.inode, 0);
    assert_eq!(c4.netns, meta("netns"));
    assert!(c4.tcp.is_some_and(|t| t.snd_cwnd > 0 && t.segs_out > 0));
    assert!(c4.cgroup_id.is_some_and(|c| c != 0));
    let s4 = find(&p.out, meta("s4"));
    assert_eq!(
        s4.key,
        key(Protocol::Tcp, "127.0.0.1:5000", "127.0.0.1:40000")
    );
    assert_eq!(s4.direction, Direction::Inbound);
}

#[test]
fn time_wait_has_no_owner_inode_or_tcp_info() {
    let p = all_four();
    let tw = find(&p.out, meta("tw"));
    assert_eq!(
        tw.key,
        key(Protocol::Tcp, "127.0.0.1:40003", "127.0.0.1:5000")
    );
    assert_eq!(tw.state, SockState::TimeWait);
    assert_eq!((tw.inode, tw.uid, tw.tcp), (0, None, None));
}

#[test]
fn captured_tcp6_and_v4_mapped_are_normalised() {
    let p = all_four();
    let c6 = find(&p.out, meta("c6"));
    assert_eq!(c6.key, key(Protocol::Tcp, "[::1]:40001", "[::1]:5001"));
    assert_eq!(c6.direction, Direction::Outbound);
    assert_eq!(find(&p.out, meta("s6")).direction, Direction::Inbound);
    let cm = find(&p.out, meta("cm"));
    assert_eq!(
        cm.key,
        key(Protocol::Tcp, "127.0.0.1:40004", "127.0.0.1:5003")
    );
    assert!(!cm.key.is_ipv6());
    assert_eq!(cm.direction, Direction::Outbound);
    // Accepted by the dual-stack [::]:5003 listener.
    assert_eq!(find(&p.out, meta("sm")).direction, Direction::Inbound);
}

#[test]
fn udp_unconnected_is_skipped_connected_is_a_flow() {
    let p = all_four();
    let uc = find(&p.out, meta("uc"));
    assert_eq!(
        uc.key,
        key(Protocol::Udp, "127.0.0.1:40002", "127.0.0.1:5002")
    );
    assert_eq!(uc.state, SockState::Established);
    assert_eq!(uc.tcp, None);
    assert_eq!(uc.direction, Direction::Outbound);
    assert!(p.out.iter().all(|o| o.cookie != meta("us")));
    assert_eq!(p.out.len(), 8, "{:#?}", p.out);
    assert!(p.stats.unconnected >= 1);
    assert_eq!(p.stats.listeners, 3);
}

#[test]
fn done_only_reply_completes_with_nothing() {
    let p = parse_all(&[(UDP6, req(Protocol::Udp, 4))]);
    assert!(p.out.is_empty());
}

#[test]
fn reply_without_done_asks_for_more() {
    let fr = frames(TCP4);
    let first = &TCP4[..fr[0].end];
    let mut p = parse_all(&[]);
    let r = parse_replies(
        first,
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(r, Ok(Progress::More));
}

#[test]
fn unknown_attribute_from_newer_kernel_is_ignored() {
    let fr = frames(TCP4);
    // Find a socket message (type 20) and append an attribute of type 999.
    let r = fr
        .iter()
        .find(|r| {
            u16::from_ne_bytes([TCP4[r.start + 4], TCP4[r.start + 5]]) == 20
                && TCP4[r.start + 17] == 1
        })
        .unwrap()
        .clone();
    let mut msg = TCP4[r.clone()].to_vec();
    msg.resize((msg.len() + 3) & !3, 0);
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&999u16.to_ne_bytes());
    msg.extend_from_slice(&[1, 2, 3, 4]);
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    let mut plain = parse_all(&[]);
    let res = parse_replies(
        &TCP4[r],
        &req(Protocol::Tcp, 1),
        &mut plain.out,
        &mut plain.listeners,
        &mut plain.stats,
    );
    assert_eq!(res, Ok(Progress::More));
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &msg,
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(res, Ok(Progress::More));
    assert_eq!(p.stats.unknown_attrs, plain.stats.unknown_attrs + 1);
    assert_eq!(p.stats.malformed, 0);
    assert_eq!(p.out, plain.out);
}

fn nlmsg_error(seq: u32, errno: i32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&36u32.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(-errno).to_ne_bytes());
    m.extend_from_slice(&[0u8; 16]); // the request's header, echoed
    m
}

#[test]
fn nlmsg_error_is_a_typed_kernel_error() {
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &nlmsg_error(7, libc::EPERM),
        &req(Protocol::Tcp, 7),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(
        res,
        Err(ParseError::Kernel {
            offset: 0,
            errno: libc::EPERM
        })
    );
    let msg = res.unwrap_err().to_string();
    assert!(msg.contains("offset 0"), "{msg}");
}

#[test]
fn truncated_nlmsg_error_is_typed() {
    let mut m = nlmsg_error(7, libc::EPERM);
    m.truncate(18);
    m[..4].copy_from_slice(&18u32.to_ne_bytes());
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &m,
        &req(Protocol::Tcp, 7),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(res, Err(ParseError::TruncatedError { offset: 0 }));
}

#[test]
fn messages_of_another_sequence_are_skipped() {
    let mut p = parse_all(&[]);
    let res = parse_replies(
        TCP4,
        &req(Protocol::Tcp, 99),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(res, Ok(Progress::More));
    assert!(p.out.is_empty());
    assert_eq!(p.stats.foreign_seq as usize, frames(TCP4).len());
}

#[test]
fn short_inet_diag_msg_is_skipped_and_counted_then_parsing_goes_on() {
    let fr = frames(TCP4);
    let mut buf = Vec::new();
    // A 40-byte socket message (header + 24 bytes), then the full capture.
    buf.extend_from_slice(&TCP4[fr[0].start..fr[0].start + 40]);
    buf[..4].copy_from_slice(&40u32.to_ne_bytes());
    buf.extend_from_slice(TCP4);
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &buf,
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert_eq!(res, Ok(Progress::Done));
    assert_eq!(p.stats.malformed, 1);
    assert_eq!(p.stats.sockets as usize, p.out.len());
    assert!(p.out.iter().any(|o| o.cookie == meta("c4")));
}

#[test]
fn truncated_frame_is_an_error_naming_the_offset() {
    let fr = frames(TCP4);
    let cut = fr[1].start + 30;
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &TCP4[..cut],
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert!(
        matches!(res, Err(ParseError::BadLength { offset, .. }) if offset == fr[1].start),
        "{res:?}"
    );
    let res = parse_replies(
        &TCP4[..fr[1].start + 5],
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert!(
        matches!(res, Err(ParseError::TruncatedHeader { left: 5, .. })),
        "{res:?}"
    );
}

#[test]
fn zero_length_field_is_an_error_not_a_loop() {
    let mut buf = TCP4[..16].to_vec();
    buf[..4].copy_from_slice(&0u32.to_ne_bytes());
    let mut p = parse_all(&[]);
    let res = parse_replies(
        &buf,
        &req(Protocol::Tcp, 1),
        &mut p.out,
        &mut p.listeners,
        &mut p.stats,
    );
    assert!(
        matches!(res, Err(ParseError::BadLength { claimed: 0, .. })),
        "{res:?}"
    );
}

proptest! {
    #[test]
    fn any_prefix_never_panics(cut in 0usize..2484) {
        let mut p = parse_all(&[]);
        let buf = &TCP6[..cut.min(TCP6.len())];
        let _ = parse_replies(buf, &req(Protocol::Tcp, 2), &mut p.out, &mut p.listeners, &mut p.stats);
    }

    #[test]
    fn corrupted_bytes_never_panic(flips in proptest::collection::vec((0usize..1340, any::<u8>()), 1..16)) {
        let mut buf = TCP4.to_vec();
        for (i, b) in flips {
            buf[i % TCP4.len()] = b;
        }
        let mut p = parse_all(&[]);
        let _ = parse_replies(&buf, &req(Protocol::Tcp, 1), &mut p.out, &mut p.listeners, &mut p.stats);
    }

    #[test]
    fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut p = parse_all(&[]);
        let _ = parse_replies(&buf, &req(Protocol::Udp, 0), &mut p.out, &mut p.listeners, &mut p.stats);
    }
}
