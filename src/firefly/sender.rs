//! The task that owns the firefly sockets: takes [`Firefly`] messages off the queue,
//! encodes each once and sends it to every collector and, when configured, to the
//! flow's remote host.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{resolve, stun, Firefly, FireflyCounters, State};
use crate::config::{Collector, FireflyConfig};
use crate::enrich::{render, Mode, TcpInfoQuery};

/// Fireflies waiting to be sent: a burst of this many new flows is absorbed while
/// the sender is busy; beyond it they are dropped and counted.
pub const QUEUE: usize = 16_384;

/// How long the first fireflies wait for the first lookup of collector names (they
/// queue meanwhile); a resolver slower than this leaves them to the literal
/// collectors.
const FIRST_LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Where each firefly goes and how it is framed.
#[derive(Debug, Clone)]
struct Destinations {
    collectors: Vec<SocketAddr>,
    /// fireflies.public_addresses, longest prefix first.
    public: Vec<(ipnet::IpNet, std::net::IpAddr)>,
    /// What STUN discovered (local address -> public), for sources `public` does
    /// not map: the operator's map wins over discovery.
    discovered: stun::Mapping,
    /// The port on the flow's remote host, when fireflies go there too.
    remote_port: Option<u16>,
    /// The syslog HOSTNAME, when the RFC 5424 header is on.
    syslog_host: Option<String>,
}

impl Destinations {
    /// The firefly as it goes out: its source (the local end) replaced by the public
    /// address its prefix maps to, else by the one STUN discovered for it, if any.
    /// Only the wire changes: the flow's own key still names the socket (for its
    /// tcp_info) and the remote host.
    fn on_the_wire(&self, f: &Firefly) -> Option<Firefly> {
        let local = f.key.local();
        let public = self
            .public
            .iter()
            .find(|(n, _)| n.contains(&local.ip()))
            .map(|(_, p)| p)
            .or_else(|| {
                let found = self.discovered.iter().find(|(l, _)| *l == local.ip());
                found.map(|(_, p)| p)
            })?;
        let mut out = f.clone();
        out.key = crate::model::socket::FlowKey::new(
            f.key.proto,
            SocketAddr::new(*public, local.port()),
            f.key.remote(),
        );
        Some(out)
    }

    /// Where one flow's firefly goes: every collector, then the flow's remote host
    /// unless it is a collector already or this host itself (loopback: a firefly
    /// about a local connection sent to our own port would only come back to us).
    fn for_flow(&self, remote: SocketAddr) -> impl Iterator<Item = SocketAddr> + '_ {
        let remote = self
            .remote_port
            .map(|port| SocketAddr::new(remote.ip(), port))
            .filter(|r| !r.ip().is_loopback() && !self.collectors.contains(r));
        self.collectors.iter().copied().chain(remote)
    }
}

/// One socket per address family; a family the host lacks (IPv6 disabled) is `None`
/// and its sends count as errors.
struct Sockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

impl Sockets {
    fn bind() -> Result<Sockets> {
        let bind = |addr: SocketAddr| -> std::io::Result<UdpSocket> {
            let s = std::net::UdpSocket::bind(addr)?;
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        };
        let v4 = bind((Ipv4Addr::UNSPECIFIED, 0).into());
        let v6 = bind((Ipv6Addr::UNSPECIFIED, 0).into());
        if let (Err(e4), Err(e6)) = (&v4, &v6) {
            anyhow::bail!("fireflies: no UDP socket could be opened (IPv4: {e4}; IPv6: {e6})");
        }
        for (family, r) in [("IPv4", v4.as_ref().err()), ("IPv6", v6.as_ref().err())] {
            if let Some(e) = r {
                warn!(family, error = %e, "fireflies: no UDP socket for this family; its fireflies are counted as send errors");
            }
        }
        Ok(Sockets {
            v4: v4.ok(),
            v6: v6.ok(),
        })
    }

    /// The local ports fireflies leave from.
    fn local_ports(&self) -> Vec<u16> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }

    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        let socket = match to {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        };
        let socket = socket.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no socket of this address family",
            )
        })?;
        socket.send_to(datagram, to).await.map(|_| ())
    }
}

/// A started sender.
pub struct Sender {
    pub queue: mpsc::Sender<Firefly>,
    /// Ends once every clone of `queue` is dropped and the queue is drained.
    pub task: tokio::task::JoinHandle<()>,
    /// The local ports fireflies leave from, so the announcement listener can tell
    /// this daemon's own fireflies from an application's.
    pub local_ports: Vec<u16>,
}

/// Opens the sockets and starts the sender.
pub fn spawn(cfg: &FireflyConfig, counters: Arc<FireflyCounters>) -> Result<Sender> {
    let sockets = Sockets::bind().context("starting the firefly sender")?;
    let local_ports = sockets.local_ports();
    let literal: Vec<SocketAddr> = cfg
        .collectors
        .iter()
        .filter_map(|c| match c {
            Collector::Addr(a) => Some(*a),
            Collector::Name { .. } => None,
        })
        .collect();
    // Names are resolved on a task of their own; the sender picks up each round.
    let resolver = resolve::has_names(&cfg.collectors).then(|| {
        let (tx, rx) = watch::channel(literal.clone());
        let task = resolve::spawn(
            cfg.collectors.clone(),
            Duration::from_secs(cfg.resolve_interval_s),
            counters.clone(),
            tx,
        );
        (rx, task)
    });
    // STUN runs on a task of its own too; the sender takes each round's result.
    let stun = (!cfg.stun.servers.is_empty()).then(|| {
        let (tx, rx) = watch::channel(stun::Mapping::new());
        let task = stun::spawn(
            cfg.stun.servers.clone(),
            Duration::from_secs(cfg.stun.refresh_interval_s),
            counters.clone(),
            tx,
        );
        (rx, task)
    });
    let dest = Destinations {
        discovered: stun::Mapping::new(),
        collectors: literal,
        public: cfg
            .address_map()
            .map_err(|e| anyhow::anyhow!("fireflies.public_addresses: {e}"))?,
        remote_port: cfg.to_remote.then_some(cfg.remote_port),
        syslog_host: cfg.syslog_header.then(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default()
        }),
    };
    // Opened here, in the daemon's namespace; a failure leaves fireflies plain.
    let enrich = cfg.enrich.and_then(|mode| match TcpInfoQuery::new() {
        Ok(q) => Some((q, mode)),
        Err(e) => {
            warn!(error = %e, "fireflies.enrich: no sock_diag socket; ongoing fireflies go without TCP facts");
            None
        }
    });
    let (queue, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(run(rx, sockets, dest, counters, resolver, stun, enrich));
    Ok(Sender {
        queue,
        task,
        local_ports,
    })
}

async fn run(
    mut rx: mpsc::Receiver<Firefly>,
    sockets: Sockets,
    dest: Destinations,
    counters: Arc<FireflyCounters>,
    resolver: Option<(
        watch::Receiver<Vec<SocketAddr>>,
        tokio::task::JoinHandle<()>,
    )>,
    stun: Option<(watch::Receiver<stun::Mapping>, tokio::task::JoinHandle<()>)>,
    mut enrich: Option<(TcpInfoQuery, Mode)>,
) {
    let (mut discovered, stun_task) = stun.unzip();
    // As for names: the first fireflies wait (queued) for the first STUN round, so
    // a flow that starts with the daemon is not reported with its private address.
    let mut first_stun = discovered.is_some();
    let mut dest = dest;
    let (mut names, resolver_task) = resolver.unzip();
    // The first fireflies may wait (queued) for the first lookup, not longer.
    let mut first_round = names.is_some();
    while let Some(f) = rx.recv().await {
        if let Some(names) = &mut names {
            if first_round {
                first_round = false;
                // `changed` marks what it saw as seen: take it here.
                let _ = tokio::time::timeout(FIRST_LOOKUP_WAIT, names.changed()).await;
                dest.collectors = names.borrow_and_update().clone();
            } else if names.has_changed().unwrap_or(false) {
                dest.collectors = names.borrow_and_update().clone();
            }
        }
        if let Some(d) = &mut discovered {
            if first_stun {
                first_stun = false;
                let _ = tokio::time::timeout(FIRST_LOOKUP_WAIT, d.changed()).await;
                dest.discovered = d.borrow_and_update().clone();
            } else if d.has_changed().unwrap_or(false) {
                dest.discovered = d.borrow_and_update().clone();
            }
        }
        let netlink = match &mut enrich {
            Some((q, mode)) if f.state == State::Ongoing => enrichment(q, *mode, &f, &counters),
            _ => None,
        };
        let mapped = dest.on_the_wire(&f);
        let datagram = mapped
            .as_ref()
            .unwrap_or(&f)
            .datagram_with(dest.syslog_host.as_deref(), netlink.as_deref());
        for to in dest.for_flow(f.key.remote()) {
            match sockets.send_to(&datagram, to).await {
                Ok(()) => {
                    counters.sent[f.state as usize].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let n = counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    // The first failure is worth an operator's eye; a collector that
                    // stays unreachable must not flood the journal.
                    if n.is_power_of_two() || n == 0 {
                        warn!(to = %to, error = %e, errors = n + 1, "firefly not sent");
                    } else {
                        debug!(to = %to, error = %e, "firefly not sent");
                    }
                }
            }
        }
    }
    for t in resolver_task.into_iter().chain(stun_task) {
        t.abort();
    }
}

/// The flow's TCP facts as flowd-go's `netlink` object; None for UDP, a socket
/// closed since, or a failed request (counted).
fn enrichment(
    q: &mut TcpInfoQuery,
    mode: Mode,
    f: &Firefly,
    counters: &FireflyCounters,
) -> Option<String> {
    match q.query(&f.key) {
        Ok(facts) => facts.map(|facts| render(&facts, mode)),
        Err(e) => {
            let n = counters.enrich_errors.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                warn!(flow = ?f.key, error = %e, errors = n + 1, "tcp_info for an ongoing firefly not read");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_source_goes_out_public_the_manual_map_first_and_the_rest_unchanged() {
        let cfg: FireflyConfig = toml::from_str(
            "[public_addresses]\n\"10.0.0.0/8\" = \"192.0.2.7\"\n\"10.1.0.0/16\" = \"192.0.2.8\"\n",
        )
        .unwrap();
        let dest = Destinations {
            collectors: Vec::new(),
            public: cfg.address_map().unwrap(),
            discovered: vec![
                ("10.9.0.1".parse().unwrap(), "203.0.113.5".parse().unwrap()),
                (
                    "172.16.0.1".parse().unwrap(),
                    "203.0.113.6".parse().unwrap(),
                ),
            ],
            remote_port: None,
            syslog_host: None,
        };
        let firefly = |local: &str| Firefly {
            state: State::Start,
            key: crate::model::socket::FlowKey::new(
                crate::model::socket::Protocol::Tcp,
                local.parse().unwrap(),
                "198.51.100.9:1094".parse().unwrap(),
            ),
            tag: crate::model::tag::Tag::new(2, 4).unwrap(),
            start: std::time::SystemTime::UNIX_EPOCH,
            now: std::time::SystemTime::UNIX_EPOCH,
            end: None,
            usage: None,
            application: None,
        };
        let wire = |local: &str| -> serde_json::Value {
            let f = firefly(local);
            let out = dest.on_the_wire(&f).unwrap_or(f);
            serde_json::from_slice(&out.json()).unwrap()
        };
        let v = wire("10.1.2.3:40000");
        assert_eq!(v["flow-id"]["src-ip"], "192.0.2.8", "longest prefix: {v}");
        assert_eq!(v["flow-id"]["src-port"], 40000);
        assert_eq!(v["flow-id"]["dst-ip"], "198.51.100.9");
        // public_addresses wins over what STUN discovered for the same source.
        assert_eq!(wire("10.9.0.1:40000")["flow-id"]["src-ip"], "192.0.2.7");
        assert_eq!(wire("172.16.0.1:40000")["flow-id"]["src-ip"], "203.0.113.6");
        assert_eq!(wire("172.16.0.2:40000")["flow-id"]["src-ip"], "172.16.0.2");
    }

    #[test]
    fn a_firefly_goes_to_every_collector_and_the_remote_host_once_never_to_loopback() {
        let dest = Destinations {
            collectors: vec!["[fd00::9]:10514".parse().unwrap()],
            public: Vec::new(),
            discovered: Vec::new(),
            remote_port: Some(10514),
            syslog_host: None,
        };
        let to = |remote: &str| -> Vec<String> {
            dest.for_flow(remote.parse().unwrap())
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(to("10.0.0.2:1094"), ["[fd00::9]:10514", "10.0.0.2:10514"]);
        assert_eq!(
            to("[fd00::9]:1094"),
            ["[fd00::9]:10514"],
            "a collector once"
        );
        assert_eq!(to("127.0.0.1:1094"), ["[fd00::9]:10514"]);
        assert_eq!(to("[::1]:1094"), ["[fd00::9]:10514"]);
        let only_collectors = Destinations {
            remote_port: None,
            ..dest.clone()
        };
        assert_eq!(
            only_collectors
                .for_flow("10.0.0.2:1094".parse().unwrap())
                .count(),
            1
        );
    }
}
