//! The flow table: the single owner of the truth about which sockets are alive.
//!
//! Two sources feed it: the eBPF tracker through [`FlowTable::apply_observation`]
//! (fast, event by event, may miss events) and the periodic sock_diag dump through
//! [`FlowTable::reconcile`] (slow, complete, corrects what the tracker missed). Flows
//! are keyed by socket cookie, which both sources report and which is unique across
//! network namespaces. Every change a consumer cares about comes out as a
//! [`FlowEvent`]; the daemon forwards them to channels.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;

use crate::model::socket::{
    Comm, Direction, FlowKey, SockState, SocketObservation, Source, TcpStats,
};

/// Where a flow is in its life. Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lifecycle {
    /// Handshake in progress (SYN_SENT, SYN_RECV).
    New,
    /// Data can flow (ESTABLISHED; also CLOSE_WAIT: the peer closed, we may still send).
    Established,
    /// Shutting down (FIN_WAIT*, CLOSING, LAST_ACK, TIME_WAIT): little or no data left.
    Closing,
    /// Ended; only seen in [`FlowEvent::Ended`] snapshots.
    Gone,
}

impl Lifecycle {
    /// `None` for states that are not flows (LISTEN).
    pub fn of(state: SockState) -> Option<Self> {
        use SockState::*;
        Some(match state {
            SynSent | SynRecv | NewSynRecv => Lifecycle::New,
            Established | CloseWait => Lifecycle::Established,
            FinWait1 | FinWait2 | Closing | LastAck | TimeWait => Lifecycle::Closing,
            Close => Lifecycle::Gone,
            Listen => return None,
        })
    }
}

/// Who owns the socket, as far as the sources know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub cgroup_id: Option<u64>,
}

/// Which sources have reported this flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeenBy {
    pub tracker: bool,
    pub sockdiag: bool,
}

/// A live socket (or, in an `Ended` event, the last view of one).
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub key: FlowKey,
    pub cookie: u64,
    pub netns: u64,
    pub state: SockState,
    pub lifecycle: Lifecycle,
    pub direction: Direction,
    pub inode: u64,
    pub owner: Owner,
    pub first_seen: Instant,
    pub last_seen: Instant,
    pub tcp: Option<TcpStats>,
    pub seen_by: SeenBy,
}

impl Flow {
    /// Wall-clock time of `first_seen` (for fireflies and displays); derived rather
    /// than stored, to keep the per-flow footprint small.
    pub fn first_seen_wall(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.first_seen.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The tracker reported the transition to CLOSE.
    Closed,
    /// A complete dump no longer lists it (a missed close: a correction).
    Vanished,
    /// It sat in TIME_WAIT longer than the configured grace.
    TimeWaitExpired,
}

/// What consumers (policy, marker, inspect, fireflies) subscribe to. `Updated` is sent
/// when the lifecycle, state class, direction, key, owner or sources change, not for
/// every refresh of `tcp`/`last_seen` (read those from the table).
#[derive(Debug, Clone)]
pub enum FlowEvent {
    Started(Arc<Flow>),
    Updated(Arc<Flow>),
    Ended(Arc<Flow>, EndReason),
}

/// How long a closing socket of another namespace may go without news before it is
/// ended (the kernel's default tcp_fin_timeout).
const FOREIGN_CLOSING_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct FlowTableConfig {
    /// Inode of the daemon's network namespace: the one [`FlowTable::reconcile`] covers.
    pub netns: u64,
    /// How long a flow may stay in TIME_WAIT before it is ended.
    pub time_wait_grace: Duration,
    /// How long an ended cookie is remembered so that a dump taken before its end (or
    /// its TIME_WAIT remnant, which keeps the cookie) does not bring it back. Longer
    /// than TIME_WAIT (60 s) plus one reconcile interval.
    pub tombstone_ttl: Duration,
}

impl Default for FlowTableConfig {
    fn default() -> Self {
        FlowTableConfig {
            netns: 0,
            time_wait_grace: Duration::from_secs(5),
            tombstone_ttl: Duration::from_secs(120),
        }
    }
}

/// Counters for metrics. Plain fields: the table is owned by one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub flows_started: u64,
    pub flows_ended: u64,
    pub reconcile_added: u64,
    pub reconcile_ended: u64,
    pub dump_errors: u64,
    pub last_dump_duration: Duration,
    /// Verify walks (`flows/verify.rs`) by outcome.
    pub verify: VerifyCounters,
}

#[derive(Debug)]
struct Entry {
    flow: Flow,
    /// Reconcile generation that last saw it in a dump.
    generation: u64,
    /// Last time the tracker created or updated it.
    tracker_at: Option<Instant>,
    /// When it was first seen in TIME_WAIT.
    time_wait_since: Option<Instant>,
}

#[derive(Debug)]
pub struct FlowTable {
    config: FlowTableConfig,
    /// Fx hashing: cookies come from a kernel counter, not from peers.
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a flow.
    flows: FxHashMap<u64, Box<Entry>>,
    /// Recently ended cookies -> when they ended.
    tombstones: FxHashMap<u64, Instant>,
    generation: u64,
    /// A dump's parts are arriving: `generation` is that dump's.
    dump_open: bool,
    /// A verify walk is under way: the table's digest when it began.
    verify: Option<Box<verify::OpenVerify>>,
    /// Flows a sweep removed, until they are ended.
    ending: Vec<(Flow, EndReason)>,
    /// Cookies of the daemon's namespace's flows a full dump would complete
    /// (see [`FlowTable::incomplete_flows`]).
    incomplete: rustc_hash::FxHashSet<u64>,
    counters: FlowCounters,
}

impl FlowTable {
    pub fn new(config: FlowTableConfig) -> Self {
        FlowTable {
            config,
            flows: FxHashMap::default(),
            tombstones: FxHashMap::default(),
            generation: 0,
            dump_open: false,
            verify: None,
            ending: Vec::new(),
            incomplete: Default::default(),
            counters: FlowCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.flows.get(&cookie).map(|e| &e.flow)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values().map(|e| &e.flow)
    }

    pub fn counters(&self) -> FlowCounters {
        self.counters
    }

    /// Number of remembered ended cookies (bounded by `tombstone_ttl`).
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    pub fn note_dump_error(&mut self) {
        self.counters.dump_errors += 1;
    }

    pub fn note_dump_duration(&mut self, d: Duration) {
        self.counters.last_dump_duration = d;
    }

    /// Apply one event-driven observation (normally from the tracker). A transition to
    /// CLOSE ends the flow; LISTEN sockets are not flows and are ignored.
    pub fn apply_observation(&mut self, obs: SocketObservation) -> Vec<FlowEvent> {
        self.apply_observation_at(obs, Instant::now())
    }

    /// Like [`Self::apply_observation`], for an event that happened at `at` (the
    /// tracker's kernel timestamp). The reconcile race rule then compares when events
    /// happened, not when a busy daemon got round to them: a backlog of old events
    /// cannot keep a vanished socket alive.
    pub fn apply_observation_at(&mut self, obs: SocketObservation, at: Instant) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        self.apply_at(&obs, Clock { mono: at }, &mut events);
        events
    }

    fn apply_at(&mut self, obs: &SocketObservation, clock: Clock, events: &mut Vec<FlowEvent>) {
        let now = clock.mono;
        self.touch(obs.cookie);
        let Some(lifecycle) = Lifecycle::of(obs.state) else {
            return;
        };
        let from_tracker = obs.source == Source::Tracker;
        if lifecycle == Lifecycle::Gone {
            if let Some(e) = self.flows.remove(&obs.cookie) {
                let mut flow = e.flow;
                merge(&mut flow, obs, clock);
                self.end(flow, EndReason::Closed, now, events);
            } else {
                self.tombstones.insert(obs.cookie, now);
            }
            return;
        }
        match self.flows.get_mut(&obs.cookie) {
            Some(e) => {
                if from_tracker {
                    e.tracker_at = Some(now);
                }
                if merge(&mut e.flow, obs, clock) {
                    events.push(FlowEvent::Updated(Arc::new(e.flow.clone())));
                    if !verify::incomplete(&e.flow) {
                        self.incomplete.remove(&obs.cookie);
                    }
                }
                if obs.state == SockState::TimeWait && e.time_wait_since.is_none() {
                    e.time_wait_since = Some(now);
                }
            }
            None => {
                if self.tombstones.contains_key(&obs.cookie) {
                    return;
                }
                let flow = new_flow(obs, lifecycle, clock);
                events.push(FlowEvent::Started(Arc::new(flow.clone())));
                self.counters.flows_started += 1;
                if flow.netns == self.config.netns && verify::incomplete(&flow) {
                    self.incomplete.insert(flow.cookie);
                }
                self.flows.insert(
                    obs.cookie,
                    Box::new(Entry {
                        flow,
                        generation: self.generation,
                        tracker_at: from_tracker.then_some(now),
                        time_wait_since: (obs.state == SockState::TimeWait).then_some(now),
                    }),
                );
            }
        }
    }

    /// Correct the table against a complete dump of the daemon's namespace
    /// (`config.netns`) started at `dump_started`: [`Self::dump_part`] then
    /// [`Self::dump_complete`].
    pub fn reconcile(
        &mut self,
        dump: &[SocketObservation],
        dump_started: Instant,
    ) -> Vec<FlowEvent> {
        let scope = [self.config.netns];
        self.reconcile_scoped(dump, &scope, dump_started)
    }

    /// As [`Self::reconcile`], for complete dumps of the namespaces in `scope`.
    pub fn reconcile_scoped(
        &mut self,
        dump: &[SocketObservation],
        scope: &[u64],
        dump_started: Instant,
    ) -> Vec<FlowEvent> {
        let mut events = self.dump_part(dump);
        events.extend(self.dump_complete_scoped(scope, dump_started));
        events
    }

    /// The generation of the dump in progress; the first part of a dump opens one.
    fn open_dump(&mut self, now: Instant) -> u64 {
        if self.dump_open {
            return self.generation;
        }
        self.generation += 1;
        self.dump_open = true;
        let ttl = self.config.tombstone_ttl;
        self.tombstones
            .retain(|_, ended| now.duration_since(*ended) < ttl);
        self.generation
    }

    /// One part of a sock_diag dump (parts let a dump of 100 000 sockets flow through
    /// without being held whole):
    /// - a socket not in the table is added (`reconcile_added`), unless it is in
    ///   TIME_WAIT (it sends no data) or its cookie ended recently;
    /// - a socket in the table is updated and stamped as seen by this dump.
    pub fn dump_part(&mut self, part: &[SocketObservation]) -> Vec<FlowEvent> {
        let clock = Clock::now();
        let now = clock.mono;
        let mut events = Vec::new();
        let generation = self.open_dump(now);

        for obs in part {
            let Some(lifecycle) = Lifecycle::of(obs.state) else {
                continue;
            };
            if let Some(e) = self.flows.get_mut(&obs.cookie) {
                e.generation = generation;
                if merge(&mut e.flow, obs, clock) {
                    events.push(FlowEvent::Updated(Arc::new(e.flow.clone())));
                    if !verify::incomplete(&e.flow) {
                        self.incomplete.remove(&obs.cookie);
                    }
                }
                if obs.state == SockState::TimeWait && e.time_wait_since.is_none() {
                    e.time_wait_since = Some(now);
                }
                continue;
            }
            if lifecycle == Lifecycle::Gone
                || obs.state == SockState::TimeWait
                || self.tombstones.contains_key(&obs.cookie)
            {
                continue;
            }
            let flow = new_flow(obs, lifecycle, clock);
            events.push(FlowEvent::Started(Arc::new(flow.clone())));
            self.counters.flows_started += 1;
            self.counters.reconcile_added += 1;
            tracing::debug!(cookie = obs.cookie, key = ?obs.key, "reconcile: adopted socket the tracker missed");
            self.flows.insert(
                obs.cookie,
                Box::new(Entry {
                    flow,
                    generation,
                    tracker_at: None,
                    time_wait_since: None,
                }),
            );
        }
        events
    }

    /// The dump whose parts came since the last complete (or abandoned) one listed
    /// every socket of the daemon's namespace: see [`Self::dump_complete_scoped`].
    pub fn dump_complete(&mut self, dump_started: Instant) -> Vec<FlowEvent> {
        let scope = [self.config.netns];
        self.dump_complete_scoped(&scope, dump_started)
    }

    /// The dump was incomplete: its parts stand (they are live sockets), but it ends
    /// nothing.
    pub fn dump_abandoned(&mut self) {
        self.dump_open = false;
    }

    /// Ends what a complete dump of the namespaces in `scope` did not list: a flow
    /// of such a namespace is ended (`reconcile_ended`) unless the tracker created
    /// or updated it after `dump_started` (it may have been born after the kernel
    /// walked its bucket). Flows of namespaces outside `scope` (seen only by the
    /// tracker) are left alone. O(table): one generation stamp per entry instead of a
    /// seen-set.
    pub fn dump_complete_scoped(&mut self, scope: &[u64], dump_started: Instant) -> Vec<FlowEvent> {
        let now = Instant::now();
        let generation = self.open_dump(now);
        self.dump_open = false;
        self.sweep(Some((scope, generation, dump_started)), now);
        self.take_ended(now)
    }

    /// Ends what expired (TIME_WAIT past its grace; closing sockets of other
    /// namespaces silent past the FIN timeout) and, after a complete dump
    /// (`(scope, generation, started)`), what it did not list: a flow of a
    /// namespace in `scope` is ended (`reconcile_ended`) unless the tracker created
    /// or updated it after `started` (it may have been born after the kernel walked
    /// its bucket). Flows of namespaces outside `scope` (seen only by the tracker)
    /// are left alone. O(table): one generation stamp per entry instead of a
    /// seen-set. The ended flows wait in `self.ending` for [`Self::take_ended`];
    /// the set of flows a dump would complete is made again.
    fn sweep(&mut self, complete: Option<(&[u64], u64, Instant)>, now: Instant) {
        let grace = self.config.time_wait_grace;
        let netns = self.config.netns;
        let ending = &mut self.ending;
        let incomplete = &mut self.incomplete;
        incomplete.clear();
        self.flows.retain(|_, e| {
            let in_scope = complete.map_or(e.flow.netns == netns, |(scope, _, _)| {
                scope.contains(&e.flow.netns)
            });
            let vanished = complete.is_some_and(|(_, generation, started)| {
                in_scope && e.generation != generation && e.tracker_at.is_none_or(|t| t < started)
            });
            // Other namespaces are never reconciled, so a lost close event would keep
            // their closing sockets forever: a closing socket is gone within the
            // kernel's FIN timeout (60 s), so end them after that much silence.
            let foreign_closing = !in_scope
                && e.flow.lifecycle == Lifecycle::Closing
                && now.duration_since(e.flow.last_seen) >= FOREIGN_CLOSING_TTL;
            let expired = foreign_closing
                || e.time_wait_since
                    .is_some_and(|t| now.duration_since(t) >= grace);
            if vanished || expired {
                let reason = if vanished {
                    EndReason::Vanished
                } else {
                    EndReason::TimeWaitExpired
                };
                ending.push((e.flow.clone(), reason));
                false
            } else {
                if e.flow.netns == netns && verify::incomplete(&e.flow) {
                    incomplete.insert(e.flow.cookie);
                }
                true
            }
        });
    }

    /// Ends the flows [`Self::sweep`] removed.
    fn take_ended(&mut self, now: Instant) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        for (flow, reason) in std::mem::take(&mut self.ending) {
            if reason == EndReason::Vanished {
                self.counters.reconcile_ended += 1;
            }
            self.end(flow, reason, now, &mut events);
        }
        events
    }

    fn end(
        &mut self,
        mut flow: Flow,
        reason: EndReason,
        now: Instant,
        events: &mut Vec<FlowEvent>,
    ) {
        flow.lifecycle = Lifecycle::Gone;
        self.incomplete.remove(&flow.cookie);
        self.tombstones.insert(flow.cookie, now);
        self.counters.flows_ended += 1;
        tracing::debug!(cookie = flow.cookie, key = ?flow.key, ?reason, "flow ended");
        events.push(FlowEvent::Ended(Arc::new(flow), reason));
    }
}

/// One reading of both clocks per batch: a reconcile of 100 000 flows should not
/// read the wall clock 100 000 times.
#[derive(Debug, Clone, Copy)]
struct Clock {
    mono: Instant,
}

impl Clock {
    fn now() -> Self {
        Clock {
            mono: Instant::now(),
        }
    }
}

fn new_flow(obs: &SocketObservation, lifecycle: Lifecycle, clock: Clock) -> Flow {
    let now = clock.mono;
    Flow {
        key: obs.key,
        cookie: obs.cookie,
        netns: obs.netns,
        state: obs.state,
        lifecycle,
        direction: obs.direction,
        inode: obs.inode,
        owner: Owner {
            uid: obs.uid,
            pid: obs.pid,
            comm: obs.comm,
            cgroup_id: obs.cgroup_id,
        },
        first_seen: now,
        last_seen: now,
        tcp: obs.tcp,
        seen_by: SeenBy {
            tracker: obs.source == Source::Tracker,
            sockdiag: obs.source == Source::SockDiag,
        },
    }
}

/// Fold an observation into a flow. Returns true if a consumer-visible field changed.
fn merge(flow: &mut Flow, obs: &SocketObservation, clock: Clock) -> bool {
    let mut changed = false;
    flow.last_seen = clock.mono;
    if obs.tcp.is_some() {
        flow.tcp = obs.tcp;
    }
    if let Some(b) = obs.tcp_bytes {
        // The counters only grow: a dump read before this close must not undo it.
        let t = flow.tcp.get_or_insert_with(TcpStats::default);
        t.bytes_acked = t.bytes_acked.max(b.acked);
        t.bytes_received = t.bytes_received.max(b.received);
    }
    // The tracker's first event of an unbound client has local port 0.
    if flow.key != obs.key && obs.key.local().port() != 0 {
        flow.key = obs.key;
        changed = true;
    }
    if let Some(l) = Lifecycle::of(obs.state) {
        if l >= flow.lifecycle && flow.state != obs.state {
            changed |= l != flow.lifecycle;
            flow.state = obs.state;
            flow.lifecycle = l;
        }
    }
    // The tracker saw the connect()/accept(); the dump only guesses.
    let better = match (flow.direction, obs.direction) {
        (_, Direction::Unknown) => false,
        (Direction::Unknown, _) => true,
        (d, o) => obs.source == Source::Tracker && d != o,
    };
    if better {
        flow.direction = obs.direction;
        changed = true;
    }
    if flow.inode == 0 && obs.inode != 0 {
        flow.inode = obs.inode;
    }
    changed |= fill(&mut flow.owner.uid, obs.uid);
    changed |= fill(&mut flow.owner.pid, obs.pid);
    changed |= fill(&mut flow.owner.cgroup_id, obs.cgroup_id);
    if flow.owner.comm.is_none() && obs.comm.is_some() {
        flow.owner.comm = obs.comm;
        changed = true;
    }
    let seen = match obs.source {
        Source::Tracker => &mut flow.seen_by.tracker,
        Source::SockDiag => &mut flow.seen_by.sockdiag,
    };
    changed |= !*seen;
    *seen = true;
    changed
}

/// Set a missing owner field; known values are not overwritten (the first reporter
/// saw the socket at its birth).
fn fill<T: Copy>(slot: &mut Option<T>, v: Option<T>) -> bool {
    if slot.is_none() && v.is_some() {
        *slot = v;
        true
    } else {
        false
    }
}

mod verify;
pub use verify::{VerifyCounters, VerifyOutcome};

#[cfg(test)]
#[path = "flows_tests.rs"]
mod tests;
