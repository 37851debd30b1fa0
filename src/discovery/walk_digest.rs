//! The verify walk's digest: what the socket iterators fold the namespace's
//! connections into when no record is wanted (bpf/sockiter.bpf.c, `digest_socket`),
//! and the same fold over the flow table.
//!
//! Why: a reconcile that finds the table already right (the tracker saw every
//! change, the usual case) spends most of a full walk copying and decoding a
//! record per socket only to change nothing. Folding each connection into a
//! 64-bit digest in the kernel costs the walk alone; the daemon folds its table
//! the same way, and equal digests mean the same connections in the same states.
//! Any difference sends the daemon to a full dump, which names the sockets.
//!
//! The digests are split into [`PARTS`] partitions by cookie, so that a
//! partition a tracker event touched while the kernel walked can be told apart
//! from one where the table is wrong.

use crate::bpf::sockiter::types::flowd_digest_limits;
use crate::model::socket::{FlowKey, Protocol, SockState};

pub const PARTS: usize = flowd_digest_limits::FLOWD_DIGEST_PARTS.0 as usize;
const PART_BITS: u32 = flowd_digest_limits::FLOWD_DIGEST_PART_BITS.0;
const TCP_STATES: u32 = flowd_digest_limits::FLOWD_DIGEST_TCP_STATES.0;
const UDP_STATES: u32 = flowd_digest_limits::FLOWD_DIGEST_UDP_STATES.0;
const BOUND_STATES: u32 = flowd_digest_limits::FLOWD_DIGEST_BOUND_STATES.0;
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// One partition: how many connections, and the wrapping sum of their digests
/// (a sum, so the order of the walk does not matter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Part {
    pub count: u64,
    pub sum: u64,
}

/// The digest of a namespace's connections (from a walk) or of a flow table.
#[derive(Clone, PartialEq, Eq)]
pub struct WalkDigest {
    pub seed: u64,
    pub parts: Box<[Part; PARTS]>,
}

impl std::fmt::Debug for WalkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalkDigest")
            .field("connections", &self.connections())
            .finish()
    }
}

impl WalkDigest {
    pub fn new(seed: u64) -> Self {
        WalkDigest {
            seed,
            // Built on the heap: 64 KiB.
            parts: vec![Part::default(); PARTS]
                .into_boxed_slice()
                .try_into()
                .expect("PARTS elements"),
        }
    }

    /// Folds in one connection, if it is one the walk counts ([`counted`]);
    /// `inode` 0 for a socket without a struct socket (not yet accepted).
    pub fn add(&mut self, cookie: u64, key: &FlowKey, state: SockState, inode: u64) {
        if !counted(key.proto, state) {
            return;
        }
        let p = &mut self.parts[part_of(self.seed, cookie)];
        p.count += 1;
        let d = socket_digest(self.seed, cookie, key, state, inode != 0);
        p.sum = p.sum.wrapping_add(d);
    }

    pub fn connections(&self) -> u64 {
        self.parts.iter().map(|p| p.count).sum()
    }

    /// The partitions where `self` and `other` differ.
    pub fn differing<'a>(&'a self, other: &'a WalkDigest) -> impl Iterator<Item = usize> + 'a {
        (0..PARTS).filter(move |&i| self.parts[i] != other.parts[i])
    }
}

/// Whether a walk counts a socket of this protocol and state: TCP connections
/// past the handshake's first step and not yet in TIME_WAIT (request and
/// TIME_WAIT sockets are not full sockets; the tracker reports the close of the
/// socket they replace), and connected UDP sockets.
pub fn counted(proto: Protocol, state: SockState) -> bool {
    let states = match proto {
        Protocol::Tcp => TCP_STATES,
        Protocol::Udp => UDP_STATES,
    };
    states & (1 << state as u32) != 0
}

/// The partition of a cookie.
pub fn part_of(seed: u64, cookie: u64) -> usize {
    ((cookie ^ seed).wrapping_mul(K) >> (64 - PART_BITS)) as usize & (PARTS - 1)
}

fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(K);
    h ^ (h >> 32)
}

/// One connection's digest, word for word as `digest_socket` in
/// bpf/sockiter.bpf.c (native byte order: the program runs on this host).
/// `has_socket` (an inode) counts only in states an orphan cannot be in.
pub fn socket_digest(
    seed: u64,
    cookie: u64,
    key: &FlowKey,
    state: SockState,
    has_socket: bool,
) -> u64 {
    let bound = has_socket && BOUND_STATES & (1 << state as u32) != 0;
    let (local, remote) = key.ip_octets();
    let word = |b: &[u8; 16], i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let meta = u64::from(key.proto.ip_proto())
        | u64::from(state as u8) << 8
        | u64::from(key.local().port()) << 16
        | u64::from(key.remote().port()) << 32
        | u64::from(bound) << 48;
    [
        cookie,
        meta,
        word(&local, 0),
        word(&local, 1),
        word(&remote, 0),
        word(&remote, 1),
    ]
    .into_iter()
    .fold(seed, mix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn key(l: &str, r: &str) -> FlowKey {
        FlowKey::new(
            Protocol::Tcp,
            l.parse::<SocketAddr>().unwrap(),
            r.parse().unwrap(),
        )
    }

    #[test]
    fn counts_connections_not_listeners_time_wait_or_unconnected_udp() {
        use SockState::*;
        for s in [
            Established,
            SynSent,
            FinWait1,
            FinWait2,
            CloseWait,
            LastAck,
            Closing,
        ] {
            assert!(counted(Protocol::Tcp, s), "{s:?}");
        }
        for s in [SynRecv, TimeWait, Close, Listen, NewSynRecv] {
            assert!(!counted(Protocol::Tcp, s), "{s:?}");
        }
        assert!(counted(Protocol::Udp, Established));
        assert!(!counted(Protocol::Udp, Close));
    }

    /// The kernel side's IPv4 words: 0, then 0xffff0000 | address << 32.
    #[test]
    fn ipv4_is_folded_as_mapped_address_words() {
        let k = key("10.1.2.3:40000", "10.9.8.7:1094");
        let (l, r) = k.ip_octets();
        let addr = u32::from_ne_bytes([10, 1, 2, 3]);
        assert_eq!(u64::from_ne_bytes(l[..8].try_into().unwrap()), 0);
        assert_eq!(
            u64::from_ne_bytes(l[8..].try_into().unwrap()),
            0xffff_0000 | u64::from(addr) << 32
        );
        assert_eq!(r[12..], [10, 9, 8, 7]);
    }

    #[test]
    fn any_field_changes_the_digest_and_order_does_not_matter() {
        let k = key("[fd00::1]:40000", "[fd00::2]:1094");
        let est = SockState::Established;
        let base = socket_digest(7, 42, &k, est, true);
        assert_ne!(base, socket_digest(8, 42, &k, est, true));
        assert_ne!(base, socket_digest(7, 43, &k, est, true));
        assert_ne!(base, socket_digest(7, 42, &k, SockState::CloseWait, true));
        assert_ne!(base, socket_digest(7, 42, &k, est, false), "accepted since");
        // Above the remote port's bits, whatever the port (bit 8 of 41262 is set).
        let high_port = key("[fd00::1]:6001", "[fd00::2]:41262");
        assert_ne!(
            socket_digest(7, 42, &high_port, est, true),
            socket_digest(7, 42, &high_port, est, false)
        );
        let other_port = key("[fd00::1]:40001", "[fd00::2]:1094");
        assert_ne!(base, socket_digest(7, 42, &other_port, est, true));
        let other_peer = key("[fd00::1]:40000", "[fd00::3]:1094");
        assert_ne!(base, socket_digest(7, 42, &other_peer, est, true));
        // An orphan (closed by its owner, no socket any more) is no difference.
        let fw1 = SockState::FinWait1;
        assert_eq!(
            socket_digest(7, 42, &k, fw1, true),
            socket_digest(7, 42, &k, fw1, false)
        );
        let (mut a, mut b) = (WalkDigest::new(7), WalkDigest::new(7));
        let k2 = key("[fd00::1]:40002", "[fd00::2]:1094");
        a.add(1, &k, SockState::Established, 11);
        a.add(2, &k2, SockState::Established, 12);
        b.add(2, &k2, SockState::Established, 12);
        b.add(1, &k, SockState::Established, 11);
        assert_eq!(a, b);
        assert_eq!(a.connections(), 2);
        b.add(3, &k2, SockState::Listen, 13);
        assert_eq!(a, b, "a listener is not counted");
        b.add(3, &k2, SockState::FinWait1, 13);
        assert_eq!(a.differing(&b).collect::<Vec<_>>(), vec![part_of(7, 3)]);
    }

    #[test]
    fn cookies_spread_over_the_partitions() {
        let mut used = vec![0u32; PARTS];
        for cookie in 4096..4096 + 64 * PARTS as u64 {
            used[part_of(0x1234_5678_9abc_def1, cookie)] += 1;
        }
        // 64 per partition on average: consecutive cookies (a kernel counter)
        // must not pile up.
        assert!(used.iter().all(|&n| (32..=96).contains(&n)), "{used:?}");
    }
}
