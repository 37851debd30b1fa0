//! Fireflies: one UDP datagram of JSON per tagged flow at its start and end (and,
//! optionally, periodically while it lasts), so collectors learn of flows the flow
//! label cannot carry (IPv4) or that a network does not look into
//! (shared/spec/scitags.md, "Fireflies").
//!
//! [`Fireflies`] lives on the engine task and turns flow events plus the marking
//! decisions into [`Firefly`] messages; [`sender`] owns the UDP sockets on a task of
//! its own, so a slow or unreachable collector never holds the engine up. Between
//! them is a bounded queue: when it is full a firefly is dropped and counted, never
//! waited for.

pub mod message;
pub mod sender;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use crate::discovery::types::Protocol;
use crate::flows::{Flow, Lifecycle};
use crate::inspect::view::FireflyStatus;
use crate::marker::label::Tag;
use crate::marking::Decision;
pub use message::{Firefly, State, Usage};

/// What happened to fireflies since the daemon started (read by metrics and
/// `status`).
#[derive(Debug, Default)]
pub struct FireflyCounters {
    /// Datagrams sent, per [`State`] (start, ongoing, end).
    pub sent: [AtomicU64; 3],
    /// Fireflies dropped because the send queue was full.
    pub queue_full: AtomicU64,
    /// Datagrams the kernel refused (no route, no socket of that family, ...).
    pub send_errors: AtomicU64,
}

impl FireflyCounters {
    /// Copies the counts into `status` (its `announced` is the engine's to say).
    pub fn fill(&self, status: &mut FireflyStatus) {
        let sent = |s: State| self.sent[s as usize].load(Ordering::Relaxed);
        status.sent_start = sent(State::Start);
        status.sent_ongoing = sent(State::Ongoing);
        status.sent_end = sent(State::End);
        status.queue_full = self.queue_full.load(Ordering::Relaxed);
        status.send_errors = self.send_errors.load(Ordering::Relaxed);
    }
}

/// What was announced for a flow: its `end` must repeat the tag and start time
/// (stored: recomputing the wall-clock start from the flow's monotonic one would
/// drift by the microseconds between the two computations).
#[derive(Debug, Clone, Copy)]
struct Announced {
    tag: Tag,
    start: SystemTime,
}

/// Decides which fireflies the flow events call for.
pub struct Fireflies {
    announced: FxHashMap<u64, Announced>,
    queue: mpsc::Sender<Firefly>,
    counters: Arc<FireflyCounters>,
    ongoing_every: Option<Duration>,
    last_ongoing: Instant,
}

impl Fireflies {
    pub fn new(
        queue: mpsc::Sender<Firefly>,
        counters: Arc<FireflyCounters>,
        ongoing_every: Option<Duration>,
    ) -> Self {
        Fireflies {
            announced: FxHashMap::default(),
            queue,
            counters,
            ongoing_every,
            last_ongoing: Instant::now(),
        }
    }

    pub fn status(&self) -> FireflyStatus {
        let mut s = FireflyStatus {
            announced: self.announced.len(),
            ..Default::default()
        };
        self.counters.fill(&mut s);
        s
    }

    /// A flow started or changed; `decision` is the marking's verdict for it now.
    /// A TCP flow is announced once its handshake completes (a refused or timed-out
    /// connect carried no data and gets no firefly); a UDP flow at once. A tag that
    /// changes (policy reload) ends the old announcement and starts a new one; a tag
    /// that goes away ends it. A flow its application announced (named pipe,
    /// firefly) is the application's to announce: that one sends its own fireflies.
    pub fn on_flow(&mut self, flow: &Flow, decision: Option<&Decision>) {
        let ready = flow.key.proto == Protocol::Udp || flow.lifecycle >= Lifecycle::Established;
        let wanted =
            decision.filter(|d| ready && !d.announced && flow.lifecycle != Lifecycle::Gone);
        let had = self.announced.get(&flow.cookie).copied();
        match (had, wanted) {
            (Some(a), Some(d)) if a.tag == d.tag => {}
            (had, wanted) => {
                let now = SystemTime::now();
                if let Some(a) = had {
                    self.announced.remove(&flow.cookie);
                    self.send(self.message(State::End, &a, flow, now));
                }
                if let Some(d) = wanted {
                    let a = Announced {
                        tag: d.tag,
                        start: flow.first_seen_wall(),
                    };
                    self.announced.insert(flow.cookie, a);
                    self.send(self.message(State::Start, &a, flow, now));
                }
            }
        }
    }

    /// A flow ended: its `end` firefly, if it was announced.
    pub fn on_end(&mut self, flow: &Flow) {
        if let Some(a) = self.announced.remove(&flow.cookie) {
            self.send(self.message(State::End, &a, flow, SystemTime::now()));
        }
    }

    /// Sends `ongoing` for every announced flow when the configured interval has
    /// passed since the last round; `live` finds a flow's current state by cookie.
    pub fn ongoing<'a>(&mut self, live: impl Fn(u64) -> Option<&'a Flow>) {
        let Some(every) = self.ongoing_every else {
            return;
        };
        if self.last_ongoing.elapsed() < every {
            return;
        }
        self.last_ongoing = Instant::now();
        let now = SystemTime::now();
        let due: Vec<Firefly> = self
            .announced
            .iter()
            .filter_map(|(cookie, a)| Some(self.message(State::Ongoing, a, live(*cookie)?, now)))
            .collect();
        for f in due {
            self.send(f);
        }
    }

    fn message(&self, state: State, a: &Announced, flow: &Flow, now: SystemTime) -> Firefly {
        Firefly {
            state,
            key: flow.key,
            tag: a.tag,
            start: a.start,
            now,
            end: (state == State::End).then_some(now),
            usage: flow.tcp.map(|t| Usage {
                received: t.bytes_received,
                sent: t.bytes_acked,
            }),
            application: flow.owner.comm.map(|c| c.to_string()),
        }
    }

    fn send(&self, f: Firefly) {
        if self.queue.try_send(f).is_err() {
            self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
