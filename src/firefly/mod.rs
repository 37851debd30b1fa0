//! Fireflies: one UDP datagram of JSON per tagged flow at its start and end (and,
//! optionally, periodically while it lasts), so collectors learn of flows the flow
//! label cannot carry (IPv4) or that a network does not look into
//! (README, "Fireflies").
//!
//! [`Fireflies`] lives on the engine task and turns flow events plus the marking
//! decisions into [`Firefly`] messages; [`sender`] owns the UDP sockets on a task of
//! its own, so a slow or unreachable collector never holds the engine up. Between
//! them is a bounded queue, never waited for. A burst of new flows (the first dump
//! of a busy host) or a round of `ongoing` would outrun the sender: starts and
//! ongoings use at most half the queue and wait their turn beyond that
//! ([`Fireflies::flush`]), keeping room for ends; an end that finds the queue full
//! is dropped and counted.

pub mod message;
pub mod resolve;
pub mod sender;
pub mod stun;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use crate::api::view::FireflyStatus;
use crate::flows::{Flow, Lifecycle};
use crate::marking::Decision;
use crate::model::socket::Protocol;
use crate::model::tag::Tag;
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
    /// `ongoing` fireflies sent without their TCP facts (the targeted sock_diag
    /// request failed).
    pub enrich_errors: AtomicU64,
    /// Lookups of collector names that answered, and that failed.
    pub resolve_ok: AtomicU64,
    pub resolve_errors: AtomicU64,
    /// STUN Binding requests answered, and unanswered (fireflies.stun).
    pub stun_ok: AtomicU64,
    pub stun_errors: AtomicU64,
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
        status.enrich_errors = self.enrich_errors.load(Ordering::Relaxed);
        status.collector_lookups_ok = self.resolve_ok.load(Ordering::Relaxed);
        status.collector_lookups_failed = self.resolve_errors.load(Ordering::Relaxed);
        status.stun_ok = self.stun_ok.load(Ordering::Relaxed);
        status.stun_failed = self.stun_errors.load(Ordering::Relaxed);
    }
}

/// What was announced for a flow: its `end` must repeat the tag and start time
/// (stored: recomputing the wall-clock start from the flow's monotonic one would
/// drift by the microseconds between the two computations).
#[derive(Debug, Clone, Copy)]
struct Announced {
    tag: Tag,
    start: SystemTime,
    /// Its start is queued; false while it waits in `deferred`.
    started: bool,
}

/// Decides which fireflies the flow events call for.
pub struct Fireflies {
    announced: FxHashMap<u64, Announced>,
    /// Starts and ongoings waiting for room in the queue, oldest first (may name
    /// flows since ended, or starts since sent: skipped).
    deferred: VecDeque<(u64, State)>,
    /// Entries of `announced` whose start has not gone out: kept as a count rather
    /// than counted, since metrics read it after every batch of flow events.
    starts_waiting: usize,
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
            deferred: VecDeque::new(),
            starts_waiting: 0,
            queue,
            counters,
            ongoing_every,
            last_ongoing: Instant::now(),
        }
    }

    pub fn status(&self) -> FireflyStatus {
        debug_assert_eq!(
            self.starts_waiting,
            self.announced.values().filter(|a| !a.started).count()
        );
        let mut s = FireflyStatus {
            announced: self.announced.len(),
            starts_waiting: self.starts_waiting,
            ..Default::default()
        };
        self.counters.fill(&mut s);
        s
    }

    /// A flow started or changed; `decision` is the marking's verdict for it now.
    /// A TCP flow is announced once its handshake completes (a refused or timed-out
    /// connect carried no data and gets no firefly); a UDP flow at once. A tag that
    /// changes (policy reload) ends the old announcement and starts a new one; a tag
    /// that goes away ends it. A flow its application announced is the
    /// application's to announce (see [`Self::on_flow_with`]).
    pub fn on_flow(&mut self, flow: &Flow, decision: Option<&Decision>) {
        self.on_flow_with(flow, decision, decision.is_some_and(|d| d.announced));
    }

    /// Like [`Self::on_flow`]; `app_speaks`: the application sends this flow's
    /// fireflies itself (it announced the flow by firefly), so this daemon stays
    /// quiet about it. A flow announced through the pipe gets ours, as flowd-go
    /// sends one for every flow event its plugins receive.
    pub fn on_flow_with(&mut self, flow: &Flow, decision: Option<&Decision>, app_speaks: bool) {
        let ready = flow.key.proto == Protocol::Udp || flow.lifecycle >= Lifecycle::Established;
        let wanted = decision.filter(|_| ready && !app_speaks && flow.lifecycle != Lifecycle::Gone);
        let had = self.announced.get(&flow.cookie).copied();
        match (had, wanted) {
            (Some(a), Some(d)) if a.tag == d.tag => {}
            (_, wanted) => {
                let now = SystemTime::now();
                if let Some(a) = self.forget(flow.cookie) {
                    if a.started {
                        self.send(self.message(State::End, &a, flow, now));
                    }
                }
                if let Some(d) = wanted {
                    let mut a = Announced {
                        tag: d.tag,
                        start: flow.first_seen_wall(),
                        started: false,
                    };
                    if self.deferred.is_empty() && self.room_for_starts() {
                        self.send(self.message(State::Start, &a, flow, now));
                        a.started = true;
                    } else {
                        self.deferred.push_back((flow.cookie, State::Start));
                        self.starts_waiting += 1;
                    }
                    self.announced.insert(flow.cookie, a);
                }
            }
        }
    }

    /// A flow ended: its `end` firefly, if its start went out (one still waiting is
    /// simply forgotten: nothing was said of it).
    pub fn on_end(&mut self, flow: &Flow) {
        if let Some(a) = self.forget(flow.cookie) {
            if a.started {
                self.send(self.message(State::End, &a, flow, SystemTime::now()));
            }
        }
    }

    /// Queues the waiting starts and ongoings while the queue has room for them,
    /// oldest first; `live` finds a flow's current state by cookie. Called after
    /// every batch.
    pub fn flush<'a>(&mut self, live: impl Fn(u64) -> Option<&'a Flow>) {
        let now = SystemTime::now();
        while let Some(&(cookie, state)) = self.deferred.front() {
            // A start is due while it has not gone out, an ongoing once it has.
            let due = self
                .announced
                .get(&cookie)
                .filter(|a| a.started == (state == State::Ongoing))
                .copied();
            if let Some(a) = due {
                match live(cookie) {
                    Some(flow) => {
                        if !self.room_for_starts() {
                            return;
                        }
                        self.send(self.message(state, &a, flow, now));
                        if !a.started {
                            self.starts_waiting -= 1;
                            if let Some(a) = self.announced.get_mut(&cookie) {
                                a.started = true;
                            }
                        }
                    }
                    // Gone without an end event reaching us: nothing to announce.
                    None => {
                        self.forget(cookie);
                    }
                }
            }
            self.deferred.pop_front();
        }
    }

    /// Removes a flow's announcement, keeping `starts_waiting` in step.
    fn forget(&mut self, cookie: u64) -> Option<Announced> {
        let a = self.announced.remove(&cookie)?;
        if !a.started {
            self.starts_waiting -= 1;
        }
        Some(a)
    }

    /// Whether fireflies wait for room in the queue (then [`Self::flush`] is due).
    pub fn has_waiting(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Starts and ongoings may fill half the queue: the rest is kept for ends.
    fn room_for_starts(&self) -> bool {
        self.queue.capacity() > self.queue.max_capacity() / 2
    }

    /// When the next round of `ongoing` is due, if they are on.
    pub fn next_ongoing(&self) -> Option<Instant> {
        self.ongoing_every.map(|every| self.last_ongoing + every)
    }

    /// Queues `ongoing` for every announced flow when the configured interval has
    /// passed since the last round, paced like a burst of starts; `live` finds a
    /// flow's current state by cookie.
    pub fn ongoing<'a>(&mut self, live: impl Fn(u64) -> Option<&'a Flow>) {
        let Some(every) = self.ongoing_every else {
            return;
        };
        if self.last_ongoing.elapsed() < every {
            return;
        }
        self.last_ongoing = Instant::now();
        let due = self.announced.iter().filter(|(_, a)| a.started);
        self.deferred
            .extend(due.map(|(cookie, _)| (*cookie, State::Ongoing)));
        self.flush(live);
    }

    /// A firefly for an announced flow that has no local socket (see
    /// [`crate::announce::Announcements::unseen`]): what the announcement says, no
    /// usage nor application, which only a socket tells.
    pub fn for_unseen(
        &mut self,
        state: State,
        key: crate::model::socket::FlowKey,
        tag: Tag,
        start: SystemTime,
    ) {
        let now = SystemTime::now();
        self.send(Firefly {
            state,
            key,
            tag,
            start,
            now,
            end: (state == State::End).then_some(now),
            usage: None,
            application: None,
        });
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
