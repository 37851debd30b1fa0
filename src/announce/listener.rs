//! The firefly input: a UDP socket on which applications (XRootD's `pmark`, for one)
//! send a firefly at each transfer's start and end. Only sources inside
//! `announcements.firefly_allow` are heard (loopback by default): an announcement
//! changes how the host's traffic is marked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::auth::{AuthRule, Authenticator};
use crate::firefly::{message, State};
use crate::model::announcement::{Announcement, Origin};
use crate::model::socket::Protocol;

/// Counts refused datagrams; logged at warn for the first and then at powers of
/// two, so a misconfigured sender does not flood the journal.
#[derive(Default)]
struct Refusals(u64);

impl Refusals {
    fn note(&mut self, from: SocketAddr, why: &dyn std::fmt::Display) {
        self.0 += 1;
        if self.0.is_power_of_two() {
            warn!(from = %from, reason = %why, refused = self.0, "announcements: firefly ignored");
        } else {
            debug!(from = %from, reason = %why, "announcements: firefly ignored");
        }
    }
}

/// What an accepted firefly announces: a start or ongoing (re)states the tag, an
/// end withdraws it.
pub fn announcement(
    datagram: &[u8],
    from: SocketAddr,
) -> Result<Announcement, message::ParseError> {
    let r = message::parse(datagram)?;
    Ok(Announcement {
        key: r.key,
        tag: (r.state != State::End).then_some(r.tag),
        origin: Origin::Firefly(from),
        only_for_uid: None,
    })
}

/// Whether a datagram from `from` is heard: from an allowed source, and not this
/// daemon's own firefly (sent from `own_ports` on this host) coming back to it.
pub fn heard(from: SocketAddr, allow: &[IpNet], own_ports: &[u16]) -> Result<(), &'static str> {
    let ip = from.ip().to_canonical();
    if ip.is_loopback() && own_ports.contains(&from.port()) {
        return Err("this daemon's own firefly");
    }
    if !allow.iter().any(|net| net.contains(&ip)) {
        return Err("source outside announcements.firefly_allow");
    }
    Ok(())
}

/// Binds every address in `listen` (all or nothing) and forwards what allowed
/// sources announce until the command channel closes; `own_ports` are those of
/// this daemon's firefly sender. A local sender is judged by `rule`
/// ([`super::auth`]); what is refused is counted in `refused`.
pub async fn spawn(
    listen: &[SocketAddr],
    allow: Vec<IpNet>,
    own_ports: Vec<u16>,
    rule: AuthRule,
    refused: Arc<AtomicU64>,
    announced: mpsc::Sender<Announcement>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut sockets = Vec::new();
    for addr in listen {
        let s = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("announcements.firefly_listen {addr}: cannot bind"))?;
        sockets.push(s);
    }
    let mut tasks = Vec::new();
    for socket in sockets {
        let (allow, own_ports, announced) = (allow.clone(), own_ports.clone(), announced.clone());
        let refused = refused.clone();
        let local = socket
            .local_addr()
            .context("announcements.firefly_listen")?;
        let mut auth = Authenticator::new(rule.clone())
            .context("announcements: cannot open sock_diag to identify local senders")?;
        info!(listen = %socket.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "announcements: listening for fireflies");
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut refusals = Refusals::default();
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "announcements: firefly socket failed; no more fireflies heard on it");
                        break;
                    }
                };
                if let Err(why) = heard(from, &allow, &own_ports) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    refusals.note(from, &why);
                    continue;
                }
                // Judged before parsing: a refused sender costs one lookup.
                let scope = match auth.authorize(Protocol::Udp, from, local) {
                    Ok(scope) => scope,
                    Err(why) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        refusals.note(from, &why);
                        continue;
                    }
                };
                match announcement(&buf[..n], from) {
                    Ok(mut a) => {
                        a.only_for_uid = scope.only_for_uid();
                        if announced.send(a).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => refusals.note(from, &e),
                }
            }
        }));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::firefly::Firefly;
    use crate::model::socket::FlowKey;
    use crate::model::tag::Tag;

    fn datagram(state: State) -> Vec<u8> {
        Firefly {
            state,
            key: FlowKey::new(
                Protocol::Tcp,
                "[fd00::1]:1094".parse().unwrap(),
                "[fd00::2]:40000".parse().unwrap(),
            ),
            tag: Tag::new(2, 4).unwrap(),
            start: SystemTime::now(),
            now: SystemTime::now(),
            end: None,
            usage: None,
            application: None,
        }
        .datagram(Some("se01"))
    }

    #[test]
    fn start_and_ongoing_tag_the_flow_and_end_withdraws_it() {
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        for (state, tagged) in [
            (State::Start, true),
            (State::Ongoing, true),
            (State::End, false),
        ] {
            let a = announcement(&datagram(state), from).unwrap();
            assert_eq!(a.tag.is_some(), tagged, "{state:?}");
            assert_eq!(a.key.local(), "[fd00::1]:1094".parse().unwrap());
            assert_eq!(a.origin, Origin::Firefly(from));
        }
        assert!(announcement(b"<134>1 not json", from).is_err());
    }

    #[test]
    fn allowed_sources_are_heard_and_the_daemons_own_fireflies_never() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let own = [40404];
        let from = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(heard(from("127.0.0.1:5000"), &allow, &own), Ok(()));
        assert_eq!(heard(from("[::ffff:127.0.0.1]:5000"), &allow, &own), Ok(()));
        assert!(heard(from("127.0.0.1:40404"), &allow, &own)
            .unwrap_err()
            .contains("own"));
        assert!(heard(from("[::1]:40404"), &allow, &own)
            .unwrap_err()
            .contains("own"));
        assert!(heard(from("[fd00::2]:5000"), &allow, &own)
            .unwrap_err()
            .contains("firefly_allow"));
    }
}
