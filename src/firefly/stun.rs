//! STUN discovery of this host's public addresses (`fireflies.stun`): an RFC 5389
//! Binding request to each configured server, off the send path, at start and
//! every `refresh_interval_s`. The answer's XOR-MAPPED-ADDRESS is the public
//! address of the local address the request left from; fireflies whose source is
//! that local address carry the public one instead (after `public_addresses`,
//! which wins). A round that gets no answer for a family keeps that family's last
//! result, logged and counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{resolve, FireflyCounters};
use crate::config::Collector;

const MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// How long one server gets to answer one request; a request is sent twice (RFC
/// 5389 retransmits over UDP).
const WAIT: Duration = Duration::from_millis(1500);

/// Local address -> public address, as discovered.
pub type Mapping = Vec<(IpAddr, IpAddr)>;

/// A Binding request with transaction id `tx` (no attributes).
pub fn request(tx: [u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC.to_be_bytes());
    m[8..20].copy_from_slice(&tx);
    m
}

/// The mapped address of a Binding success response to `tx`: XOR-MAPPED-ADDRESS,
/// else the older MAPPED-ADDRESS.
pub fn mapped_address(msg: &[u8], tx: [u8; 12]) -> Result<SocketAddr, String> {
    if msg.len() < 20 {
        return Err("shorter than a STUN header".into());
    }
    let kind = u16::from_be_bytes([msg[0], msg[1]]);
    let len = u16::from_be_bytes([msg[2], msg[3]]) as usize;
    if u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC || msg[8..20] != tx {
        return Err("not the answer to our request".into());
    }
    if kind != BINDING_SUCCESS {
        return Err(format!("not a Binding success (type {kind:#06x})"));
    }
    let body = msg.get(20..20 + len).ok_or("truncated")?;
    let (mut xored, mut plain) = (None, None);
    let mut at = 0;
    while at + 4 <= body.len() {
        let t = u16::from_be_bytes([body[at], body[at + 1]]);
        let l = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let v = body.get(at + 4..at + 4 + l).ok_or("truncated attribute")?;
        match t {
            XOR_MAPPED_ADDRESS => xored = Some(address(v, Some(&msg[4..20]))?),
            MAPPED_ADDRESS => plain = Some(address(v, None)?),
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        at += 4 + l.div_ceil(4) * 4;
    }
    xored.or(plain).ok_or_else(|| "no mapped address".into())
}

/// An address attribute's value; `xor` is the cookie and transaction id the
/// XOR-MAPPED form is masked with.
fn address(v: &[u8], xor: Option<&[u8]>) -> Result<SocketAddr, String> {
    let mask = |i: usize| xor.map_or(0, |x| x[i]);
    let family = *v.get(1).ok_or("short address")?;
    let port = u16::from_be_bytes([v[2] ^ mask(0), v[3] ^ mask(1)]);
    let n = match family {
        1 => 4,
        2 => 16,
        f => return Err(format!("unknown address family {f}")),
    };
    let raw = v.get(4..4 + n).ok_or("short address")?;
    let b: Vec<u8> = raw.iter().enumerate().map(|(i, b)| b ^ mask(i)).collect();
    let ip = match n {
        4 => IpAddr::from(<[u8; 4]>::try_from(&b[..]).expect("4 bytes")),
        _ => IpAddr::from(<[u8; 16]>::try_from(&b[..]).expect("16 bytes")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Asks `server` for this host's address as it sees it: (the local address the
/// request left from, the mapped address).
pub async fn query(server: SocketAddr) -> Result<(IpAddr, IpAddr), String> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((any, 0)).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?.ip();
    let tx: [u8; 12] = rand::random();
    let mut buf = [0u8; 1024];
    for _ in 0..2 {
        sock.send(&request(tx)).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + WAIT;
        // Datagrams that are not our answer (a late one to an earlier id) are skipped.
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let n = r.map_err(|e| e.to_string())?;
            if let Ok(mapped) = mapped_address(&buf[..n], tx) {
                return Ok((local, mapped.ip()));
            }
        }
    }
    Err("no answer".into())
}

/// One round: the first server of each family that answers sets that family's
/// mapping; a family with no answer keeps `last`'s.
pub async fn round(servers: &[SocketAddr], last: &Mapping, counters: &FireflyCounters) -> Mapping {
    let mut out: Mapping = Vec::new();
    for v4 in [true, false] {
        let family: Vec<_> = servers.iter().filter(|s| s.is_ipv4() == v4).collect();
        if family.is_empty() {
            continue;
        }
        let mut found = None;
        for s in family {
            match query(*s).await {
                Ok(m) => {
                    counters.stun_ok.fetch_add(1, Ordering::Relaxed);
                    found = Some(m);
                    break;
                }
                Err(e) => {
                    counters.stun_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(server = %s, error = %e, "fireflies.stun: no answer; trying the next server");
                }
            }
        }
        match found {
            Some((local, public)) => {
                if !last.contains(&(local, public)) {
                    info!(local = %local, public = %public, "fireflies.stun: public address discovered");
                }
                // A host that is its own public address needs no rewrite.
                if local != public {
                    out.push((local, public));
                }
            }
            None => {
                let kept: Vec<_> = last
                    .iter()
                    .filter(|(l, _)| l.is_ipv4() == v4)
                    .copied()
                    .collect();
                warn!(family = if v4 { "IPv4" } else { "IPv6" }, kept = ?kept, "fireflies.stun: no server answered; keeping the last result");
                out.extend(kept);
            }
        }
    }
    out
}

/// Resolves the servers' names and runs a round now and every `every`, publishing
/// each result on `tx`; ends when the sender (the receiver) is gone.
pub fn spawn(
    servers: Vec<Collector>,
    every: Duration,
    counters: Arc<FireflyCounters>,
    tx: watch::Sender<Mapping>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = Mapping::new();
        loop {
            let mut addrs = Vec::new();
            for s in &servers {
                match s {
                    Collector::Addr(a) => addrs.push(*a),
                    Collector::Name { host, port } => {
                        match resolve::system_lookup(host.clone(), *port).await {
                            Ok(a) => addrs.extend(a),
                            Err(e) => {
                                warn!(server = %s, error = %e, "fireflies.stun: server name not resolved")
                            }
                        }
                    }
                }
            }
            last = round(&addrs, &last, &counters).await;
            if tx.send(last.clone()).is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 2.2: a sample IPv4 response, XOR-MAPPED-ADDRESS 192.0.2.1:32853
    /// (its SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT attributes are skipped).
    #[test]
    fn rfc5769_ipv4_response() {
        let tx = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        #[rustfmt::skip]
        let msg: Vec<u8> = vec![
            0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42,
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
            0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
            0x74, 0x6f, 0x72, 0x20,
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
            0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
            0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7,
            0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
        ];
        assert_eq!(
            mapped_address(&msg, tx).unwrap(),
            "192.0.2.1:32853".parse().unwrap()
        );
        assert!(
            mapped_address(&msg, [0; 12]).is_err(),
            "another transaction"
        );
    }

    #[test]
    fn a_request_is_a_bare_binding_header() {
        let r = request([7; 12]);
        assert_eq!(&r[..8], &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&r[8..], &[7; 12]);
    }
}
