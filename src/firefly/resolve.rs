//! Collector host names to addresses, on a task of their own: a slow or failing
//! resolver never holds up a firefly, and the daemon starts without DNS. Names are
//! looked up at start and every `fireflies.resolve_interval_s`; a lookup that fails
//! (or answers nothing) keeps the address last resolved, logged and counted.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::FireflyCounters;
use crate::config::Collector;

/// A lookup that takes longer is a failure of that round.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What each name resolved to last.
#[derive(Debug, Default)]
pub struct Resolved {
    last: HashMap<(String, u16), SocketAddr>,
}

impl Resolved {
    /// One round: every collector's address, names looked up through `lookup`.
    /// One address per name (the resolver's first, in its RFC 6724 order): a
    /// collector with both an A and an AAAA record must get each firefly once.
    pub async fn round<F, Fut>(
        &mut self,
        collectors: &[Collector],
        lookup: &F,
        counters: &FireflyCounters,
    ) -> Vec<SocketAddr>
    where
        F: Fn(String, u16) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>>,
    {
        let mut out = Vec::with_capacity(collectors.len());
        for c in collectors {
            let addr = match c {
                Collector::Addr(a) => Some(*a),
                Collector::Name { host, port } => {
                    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, lookup(host.clone(), *port))
                        .await
                        .unwrap_or_else(|_| {
                            Err(io::Error::new(io::ErrorKind::TimedOut, "lookup timed out"))
                        });
                    let key = (host.clone(), *port);
                    match answer.map(|a| a.into_iter().next()) {
                        Ok(Some(a)) => {
                            counters.resolve_ok.fetch_add(1, Ordering::Relaxed);
                            let before = self.last.insert(key.clone(), a);
                            if before != Some(a) {
                                info!(collector = %c, address = %a, previous = ?before, "firefly collector resolved");
                            }
                        }
                        failed => {
                            counters.resolve_errors.fetch_add(1, Ordering::Relaxed);
                            let error = match failed {
                                Err(e) => e.to_string(),
                                Ok(_) => "no address".into(),
                            };
                            let kept = self.last.get(&key);
                            warn!(collector = %c, %error, kept = ?kept,
                                "fireflies.collectors: name not resolved; keeping the last address (none: not sent there)");
                        }
                    }
                    self.last.get(&key).copied()
                }
            };
            if let Some(a) = addr.filter(|a| !out.contains(a)) {
                out.push(a);
            }
        }
        out
    }
}

/// The system resolver (getaddrinfo: /etc/hosts, then DNS, as nsswitch.conf says).
pub async fn system_lookup(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host((host.as_str(), port))
        .await?
        .collect())
}

/// Whether any collector needs a lookup.
pub fn has_names(collectors: &[Collector]) -> bool {
    collectors
        .iter()
        .any(|c| matches!(c, Collector::Name { .. }))
}

/// Resolves `collectors` now and every `every`, publishing each round's addresses
/// on `tx`; ends when the sender (the receiver) is gone.
pub fn spawn(
    collectors: Vec<Collector>,
    every: Duration,
    counters: Arc<FireflyCounters>,
    tx: watch::Sender<Vec<SocketAddr>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut resolved = Resolved::default();
        loop {
            let addrs = resolved.round(&collectors, &system_lookup, &counters).await;
            if tx.send(addrs).is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An /etc/hosts of the test's own, changed between rounds.
    fn hosts(
        table: &Mutex<HashMap<String, Vec<&'static str>>>,
        host: String,
        port: u16,
    ) -> io::Result<Vec<SocketAddr>> {
        match table.lock().unwrap().get(&host) {
            Some(ips) => Ok(ips
                .iter()
                .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
                .collect()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "unknown host")),
        }
    }

    #[tokio::test]
    async fn names_resolve_each_round_and_a_failed_lookup_keeps_the_last_address() {
        let table = Mutex::new(HashMap::from([(
            "collector.test".to_string(),
            vec!["fd00::9", "10.0.0.9"],
        )]));
        let lookup = |h: String, p: u16| std::future::ready(hosts(&table, h, p));
        let collectors: Vec<Collector> =
            ["collector.test:10514", "[fd00::7]:10514", "other.test:9"]
                .iter()
                .map(|c| c.parse().unwrap())
                .collect();
        let counters = FireflyCounters::default();
        let mut r = Resolved::default();
        let addrs =
            |v: &[&str]| -> Vec<SocketAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };

        // other.test is unknown: counted, and no address for it yet.
        let got = r.round(&collectors, &lookup, &counters).await;
        assert_eq!(
            got,
            addrs(&["[fd00::9]:10514", "[fd00::7]:10514"]),
            "first answer only"
        );
        assert_eq!(counters.resolve_errors.load(Ordering::Relaxed), 1);

        table
            .lock()
            .unwrap()
            .insert("collector.test".into(), vec!["fd00::10"]);
        table
            .lock()
            .unwrap()
            .insert("other.test".into(), vec!["10.0.0.5"]);
        let got = r.round(&collectors, &lookup, &counters).await;
        assert_eq!(
            got,
            addrs(&["[fd00::10]:10514", "[fd00::7]:10514", "10.0.0.5:9"])
        );

        // The resolver fails (or answers nothing): the last addresses stay.
        table.lock().unwrap().clear();
        table.lock().unwrap().insert("other.test".into(), vec![]);
        let got = r.round(&collectors, &lookup, &counters).await;
        assert_eq!(
            got,
            addrs(&["[fd00::10]:10514", "[fd00::7]:10514", "10.0.0.5:9"])
        );
        assert_eq!(counters.resolve_errors.load(Ordering::Relaxed), 3);
        assert_eq!(counters.resolve_ok.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn only_names_need_the_resolver() {
        let c: Vec<Collector> = vec!["[fd00::7]:10514".parse().unwrap()];
        assert!(!has_names(&c));
        assert!(has_names(&["x.test:1".parse().unwrap()]));
    }
}
