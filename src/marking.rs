//! From flows to marks: evaluates the policy for each live flow and keeps the marker
//! map in step with the flow table, so a mark never outlives its socket.
//!
//! The entropy bits of a flow's label are drawn once, when it is tagged, and kept
//! across policy reloads: a label that changed mid-flow could move the flow
//! to another ECMP path (the entropy bits exist to spread flows, not to move them:
//! [`crate::model::tag`]).
//!
//! With in-kernel decisions the kernel may have marked a flow before userspace hears
//! of it (bpf/marker.bpf.c): userspace then adopts that mark's entropy, and keeps the
//! map free of kernel-written marks nobody tracks (flow end, and [`Marking::sweep`]).

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use tracing::{debug, warn};

use crate::flows::{Flow, Lifecycle};
use crate::marker::maps::{Counters, ExistingMark, MapError, MarkMaps};
use crate::model::facts::ProcessInfo;
use crate::model::socket::{FlowKey, SockState};
use crate::model::tag::Tag;
use crate::policy::kernel::KernelPolicy;
use crate::policy::{Policy, RuleRef, SocketAttrs, Verdict};

/// Where marks go; the BPF map in the daemon, a recorder in tests.
pub trait MarkSink {
    /// Writes (or replaces) the mark of `key`.
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError>;
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError>;
    /// Writes the mark of `key` unless it has one; then returns that one. (The
    /// defaults describe a sink no kernel writes to.)
    fn insert_new(
        &self,
        key: &FlowKey,
        tag: Tag,
        entropy: u8,
    ) -> Result<Option<ExistingMark>, MapError> {
        self.insert(key, tag, entropy).map(|()| None)
    }
    fn existing(&self, _key: &FlowKey) -> Result<Option<ExistingMark>, MapError> {
        Ok(None)
    }
    /// Flows whose current mark the kernel wrote.
    fn kernel_marked(&self) -> Vec<FlowKey> {
        Vec::new()
    }
    /// The entropy bits for `key`'s label.
    fn entropy(&self, _key: &FlowKey) -> u8 {
        rand::random::<u8>() & 0x1f
    }
    /// How many marks the kernel has written so far, if the sink can tell.
    fn kernel_inserts(&self) -> Option<u64> {
        None
    }
}

impl MarkSink for MarkMaps {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        MarkMaps::insert(self, key, tag, entropy)
    }
    fn insert_new(
        &self,
        key: &FlowKey,
        tag: Tag,
        entropy: u8,
    ) -> Result<Option<ExistingMark>, MapError> {
        MarkMaps::insert_new(self, key, tag, entropy)
    }
    fn existing(&self, key: &FlowKey) -> Result<Option<ExistingMark>, MapError> {
        MarkMaps::existing(self, key)
    }
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError> {
        MarkMaps::remove(self, key)
    }
    fn kernel_marked(&self) -> Vec<FlowKey> {
        MarkMaps::kernel_marked(self)
    }
    fn entropy(&self, key: &FlowKey) -> u8 {
        MarkMaps::entropy(self, key)
    }
    fn kernel_inserts(&self) -> Option<u64> {
        self.kernel().and_then(|k| k.inserts().ok())
    }
}

/// Everything the engine needs of the marker's maps: the sink marks go to, plus
/// what it reads back (counts, capacity) and the in-kernel policy it installs.
/// The BPF maps in the daemon; a recorder in the engine's unit tests, so the whole
/// engine runs without BPF.
pub trait MarkStore: MarkSink + Send + Sync {
    fn capacity(&self) -> u32;
    /// Marks the flow index lacks; `None` without an index.
    fn unindexed(&self) -> Option<u64> {
        None
    }
    /// What the TC program counted, summed over CPUs.
    fn counters(&self) -> Result<Counters, MapError>;
    /// Packets and bytes marked per flow.
    fn flow_counts(&self) -> Result<HashMap<FlowKey, (u64, u64)>, MapError>;
    fn flow_count(&self, key: &FlowKey) -> Result<Option<(u64, u64)>, MapError>;
    /// Compiles `k` into the kernel's decision maps (a no-op where there are none).
    fn install_policy(&self, k: &KernelPolicy) -> Result<(), MapError>;
    /// Stops the kernel from deciding new flows (userspace decides every flow).
    fn disable_kernel_decisions(&self);
}

impl MarkStore for MarkMaps {
    fn capacity(&self) -> u32 {
        MarkMaps::capacity(self)
    }
    fn unindexed(&self) -> Option<u64> {
        self.index().map(|ix| ix.unindexed())
    }
    fn counters(&self) -> Result<Counters, MapError> {
        MarkMaps::counters(self)
    }
    fn flow_counts(&self) -> Result<HashMap<FlowKey, (u64, u64)>, MapError> {
        MarkMaps::flow_counts(self)
    }
    fn flow_count(&self, key: &FlowKey) -> Result<Option<(u64, u64)>, MapError> {
        MarkMaps::flow_count(self, key)
    }
    fn install_policy(&self, k: &KernelPolicy) -> Result<(), MapError> {
        MarkMaps::install_policy(self, k)
    }
    fn disable_kernel_decisions(&self) {
        if let Some(km) = self.kernel() {
            let _ = km.disable();
        }
    }
}

/// What the policy decided for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub tag: Tag,
    pub rule: Arc<RuleRef>,
    pub entropy: u8,
    /// The key the mark was written under (IPv6 flows only).
    pub key: FlowKey,
    /// Whether the marker map holds it. IPv4 flows are tagged but never in the map;
    /// a full map leaves IPv6 flows out too (counted).
    pub in_map: bool,
    pub tagged_at: std::time::Instant,
    /// Whether the mark was in place before the flow's first packet left (decided
    /// in the kernel); userspace decisions come after the first packets.
    pub first_packet_exact: bool,
    /// The tag came from an application's announcement, not from the policy.
    pub announced: bool,
}

impl Decision {
    pub fn label(&self) -> Option<u32> {
        self.in_map.then(|| self.tag.label(self.entropy))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MarkingCounters {
    /// Flows currently tagged by policy.
    pub tagged: usize,
    /// Flows ever tagged.
    pub tagged_total: u64,
    /// Tagged flows whose mark is in the marker map now.
    pub in_map: usize,
    /// Tags that could not be written because the marker map was full.
    pub map_full: u64,
    /// Other map write failures.
    pub map_errors: u64,
    /// Flows whose first packet the kernel had already marked, as userspace decided.
    pub kernel_decided_total: u64,
    /// Kernel marks userspace replaced because its decision (with facts the kernel
    /// lacks, e.g. an unknown uid) differed.
    pub kernel_overridden: u64,
    /// Kernel marks of flows userspace never tracked, removed by the sweep.
    pub kernel_swept: u64,
}

/// Process facts for policy rules that need them (process, exe, cgroup).
pub type ProcLookup<'a> = &'a mut dyn FnMut(&Flow) -> Option<Arc<ProcessInfo>>;

pub struct Marking {
    /// The daemon's own network namespace: only its flows pass our TC program.
    local_netns: u64,
    decisions: FxHashMap<u64, Decision>,
    counters: MarkingCounters,
    /// Kernel marks no decision covered at the last sweep: removed if still so at
    /// the next (two strikes, so a flow born between a dump and its sweep stays).
    unclaimed: rustc_hash::FxHashSet<FlowKey>,
    /// The kernel's insert count when the last sweep walked the map.
    swept_at_inserts: Option<u64>,
    /// Tagged TCP flows that closed first (FIN_WAIT*, CLOSING, TIME_WAIT seen): their
    /// socket lives on in TIME_WAIT and still sends (the last ACK, answers to a
    /// retransmitted FIN) after its close event.
    active_closers: rustc_hash::FxHashSet<u64>,
    /// Marks of ended active closers, kept until their TIME_WAIT socket is surely
    /// gone: key -> when to remove it.
    lingering: FxHashMap<FlowKey, std::time::Instant>,
    /// How long a closed socket may still send: tcp_fin_timeout (the FIN_WAIT2 part
    /// of an orphan) plus TIME_WAIT's fixed 60 s.
    linger: std::time::Duration,
}

/// TCP_TIMEWAIT_LEN in the kernel: fixed, not a sysctl.
const TIME_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// tcp_fin_timeout of the calling thread's network namespace (60 s by default).
fn fin_timeout() -> std::time::Duration {
    let secs = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(60);
    std::time::Duration::from_secs(secs)
}

impl Marking {
    pub fn new(local_netns: u64) -> Self {
        Marking {
            local_netns,
            decisions: FxHashMap::default(),
            counters: MarkingCounters::default(),
            unclaimed: Default::default(),
            swept_at_inserts: None,
            active_closers: Default::default(),
            lingering: FxHashMap::default(),
            linger: fin_timeout() + TIME_WAIT,
        }
    }

    /// Sets how long the mark of a flow that closed first outlives its close event.
    pub fn with_linger(mut self, linger: std::time::Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Marks kept for sockets in TIME_WAIT.
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    pub fn decisions(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.values()
    }

    pub fn decision(&self, cookie: u64) -> Option<&Decision> {
        self.decisions.get(&cookie)
    }

    pub fn counters(&self) -> MarkingCounters {
        MarkingCounters {
            tagged: self.decisions.len(),
            in_map: self.decisions.values().filter(|d| d.in_map).count(),
            ..self.counters
        }
    }

    /// Builds what the policy sees of a flow.
    pub fn attrs(flow: &Flow, proc: Option<&ProcessInfo>) -> SocketAttrs {
        SocketAttrs {
            proto: flow.key.proto,
            local: flow.key.local(),
            remote: flow.key.remote(),
            direction: flow.direction,
            uid: flow.owner.uid,
            owner: {
                let mut facts = proc.map(|p| p.facts.clone()).unwrap_or_default();
                // The tracker's comm is the task's at the socket's birth: it wins.
                if let Some(c) = flow.owner.comm {
                    facts.comm = Some(c.to_string());
                }
                facts
            },
        }
    }

    /// Re-decides `flow` (started or updated) and brings the map in line.
    pub fn on_flow(
        &mut self,
        flow: &Flow,
        policy: &Policy,
        sink: &dyn MarkSink,
        proc: ProcLookup<'_>,
    ) {
        self.on_flow_with(flow, policy, sink, proc, None);
    }

    /// Like [`Self::on_flow`]; an `announced` verdict (an application named this
    /// flow) takes the place of the policy's.
    pub fn on_flow_with(
        &mut self,
        flow: &Flow,
        policy: &Policy,
        sink: &dyn MarkSink,
        proc: ProcLookup<'_>,
        announced: Option<Verdict>,
    ) {
        if flow.lifecycle == Lifecycle::Gone {
            self.on_end(flow, sink);
            return;
        }
        // Sockets of other namespaces leave through other interfaces: not ours to mark.
        // An unbound client (local port 0) is completed by a later event.
        if flow.netns != self.local_netns || flow.key.local().port() == 0 {
            return;
        }
        if flow.key.proto == crate::model::socket::Protocol::Tcp
            && matches!(
                flow.state,
                SockState::FinWait1
                    | SockState::FinWait2
                    | SockState::Closing
                    | SockState::TimeWait
            )
        {
            self.active_closers.insert(flow.cookie);
        }
        let from_announcement = announced.is_some();
        let verdict = announced.or_else(|| {
            let info = if policy.needs_process_facts() {
                proc(flow)
            } else {
                None
            };
            policy.evaluate(&Self::attrs(flow, info.as_deref()))
        });
        let Some(v) = verdict else {
            if let Some(old) = self.decisions.remove(&flow.cookie) {
                remove_from_map(&old, sink, &mut self.counters);
                debug!(flow = %flow_text(flow), "flow no longer matches any rule: mark removed");
            } else {
                self.drop_kernel_mark(flow, sink);
            }
            return;
        };
        let tag = v.tag;
        // Kept for as long as the flow stays tagged; a flow that stops matching and
        // matches again later was unlabelled in between, so a new draw changes nothing.
        let entropy = self
            .decisions
            .get(&flow.cookie)
            .map_or_else(|| sink.entropy(&flow.key), |d| d.entropy);
        let mut next = Decision {
            tag,
            rule: v.rule.clone(),
            entropy,
            key: flow.key,
            in_map: false,
            tagged_at: std::time::Instant::now(),
            first_packet_exact: false,
            announced: from_announcement,
        };
        // Whether we already own this key's entry; if not, the kernel may have
        // written one first. A lingering mark of an earlier flow on the same tuple
        // is ours to overwrite.
        let mut owned = self.lingering.remove(&flow.key).is_some();
        if let Some(old) = self.decisions.get(&flow.cookie) {
            next.first_packet_exact = old.first_packet_exact;
            if old.tag == next.tag && old.key == next.key && old.in_map {
                if old.rule != next.rule {
                    next.in_map = true;
                    next.tagged_at = old.tagged_at;
                    self.decisions.insert(flow.cookie, next);
                }
                return;
            }
            if old.key != next.key {
                remove_from_map(old, sink, &mut self.counters);
            } else {
                owned = old.in_map;
            }
        }
        if flow.key.is_ipv6() {
            let written = if owned {
                sink.insert(&flow.key, tag, entropy)
            } else {
                match sink.insert_new(&flow.key, tag, entropy) {
                    Ok(None) => Ok(()),
                    Ok(Some(existing)) => self.adopt(flow, &mut next, existing, sink),
                    Err(e) => Err(e),
                }
            };
            match written {
                Ok(()) => next.in_map = true,
                Err(e @ MapError::Full { .. }) => {
                    self.counters.map_full += 1;
                    warn!(error = %e, "marker map full: raise marker.map_capacity");
                }
                Err(e) => {
                    self.counters.map_errors += 1;
                    warn!(error = %e, flow = %flow_text(flow), "writing mark failed");
                }
            }
        }
        debug!(flow = %flow_text(flow), tag = %tag, rule = %v.rule, label = ?next.label().map(|l| format!("{l:#07x}")), "flow tagged");
        if self.decisions.insert(flow.cookie, next).is_none() {
            self.counters.tagged_total += 1;
        }
    }

    /// Retries the IPv6 flows a full map left out (called after each reconcile), so
    /// that room made by ended flows is used without waiting for their next event.
    pub fn retry_unmapped(&mut self, sink: &dyn MarkSink) {
        if self.counters.map_full == 0 {
            return;
        }
        for d in self
            .decisions
            .values_mut()
            .filter(|d| !d.in_map && d.key.is_ipv6())
        {
            match sink.insert(&d.key, d.tag, d.entropy) {
                Ok(()) => d.in_map = true,
                Err(MapError::Full { .. }) => return,
                Err(e) => warn!(error = %e, "writing mark failed"),
            }
        }
    }

    /// The flow already had a mark when userspace came to write one (the kernel's
    /// first-packet decision, or a racing write): keep its entropy, so the label
    /// never changes, and its tag unless userspace decided otherwise.
    fn adopt(
        &mut self,
        flow: &Flow,
        next: &mut Decision,
        existing: ExistingMark,
        sink: &dyn MarkSink,
    ) -> Result<(), MapError> {
        next.entropy = existing.entropy;
        if existing.tag == Some(next.tag) {
            next.first_packet_exact = existing.kernel;
            if existing.kernel {
                self.counters.kernel_decided_total += 1;
            }
            return Ok(());
        }
        if existing.kernel {
            self.counters.kernel_overridden += 1;
            debug!(flow = %flow_text(flow), kernel_tag = ?existing.tag, tag = %next.tag, "userspace decision replaces the kernel's (entropy kept)");
        }
        sink.insert(&flow.key, next.tag, next.entropy)
    }

    /// A flow userspace does not tag must not keep a mark the kernel wrote.
    fn drop_kernel_mark(&mut self, flow: &Flow, sink: &dyn MarkSink) {
        if !flow.key.is_ipv6() {
            return;
        }
        if let Ok(Some(m)) = sink.existing(&flow.key) {
            if m.kernel {
                let _ = sink.remove(&flow.key);
                self.counters.kernel_overridden += 1;
                debug!(flow = %flow_text(flow), "kernel mark removed: userspace finds no matching rule");
            }
        }
    }

    /// Removes the mark of an ended flow, including one only the kernel wrote. A TCP
    /// flow that closed first keeps its mark while its TIME_WAIT socket may still
    /// send (see [`Self::sweep`]): every packet of a tagged flow carries the tag.
    pub fn on_end(&mut self, flow: &Flow, sink: &dyn MarkSink) {
        let active_closer = self.active_closers.remove(&flow.cookie);
        if let Some(old) = self.decisions.remove(&flow.cookie) {
            if active_closer && old.in_map {
                // Rewritten as userspace's own if the kernel wrote it: a lingering
                // mark is no kernel mark waiting to be claimed.
                if let Ok(Some(m)) = sink.existing(&old.key) {
                    if m.kernel {
                        let _ = sink.insert(&old.key, old.tag, old.entropy);
                    }
                }
                self.lingering
                    .insert(old.key, std::time::Instant::now() + self.linger);
                debug!(flow = %flow_text(flow), "flow ended: mark kept through TIME_WAIT");
                return;
            }
            remove_from_map(&old, sink, &mut self.counters);
            debug!(flow = %flow_text(flow), "flow ended: mark removed");
        } else if flow.key.is_ipv6() && flow.netns == self.local_netns {
            // Only our namespace's flows can have a kernel mark in our map.
            if let Ok(Some(m)) = sink.existing(&flow.key) {
                if m.kernel {
                    let _ = sink.remove(&flow.key);
                }
            }
        }
    }

    /// Removes kernel-written marks that no decision covers two sweeps in a row:
    /// flows whose sockets userspace never saw (a handshake that never completed, a
    /// missed tracker event). Run after each reconcile.
    pub fn sweep(&mut self, sink: &dyn MarkSink) {
        self.expire_lingering(sink, std::time::Instant::now());
        // Nothing to walk the map for: no kernel mark written since the last sweep
        // and none waiting for its second strike.
        let inserts = sink.kernel_inserts();
        if inserts.is_some() && inserts == self.swept_at_inserts && self.unclaimed.is_empty() {
            return;
        }
        self.swept_at_inserts = inserts;
        let owned: rustc_hash::FxHashSet<FlowKey> = self
            .decisions
            .values()
            .filter(|d| d.in_map)
            .map(|d| d.key)
            .chain(self.lingering.keys().copied())
            .collect();
        let mut unclaimed = rustc_hash::FxHashSet::default();
        for key in sink.kernel_marked() {
            if owned.contains(&key) {
                continue;
            }
            if self.unclaimed.contains(&key) {
                if let Ok(true) = sink.remove(&key) {
                    self.counters.kernel_swept += 1;
                    debug!(flow = %format!("{} {} -> {}", key.proto.as_str(), key.local(), key.remote()), "stale kernel mark swept");
                }
            } else {
                unclaimed.insert(key);
            }
        }
        self.unclaimed = unclaimed;
    }
}

impl Marking {
    /// Removes the lingering marks whose TIME_WAIT is over at `now`.
    pub fn expire_lingering(&mut self, sink: &dyn MarkSink, now: std::time::Instant) {
        let counters = &mut self.counters;
        self.lingering.retain(|key, until| {
            if *until > now {
                return true;
            }
            if let Err(e) = sink.remove(key) {
                counters.map_errors += 1;
                warn!(error = %e, "removing mark failed");
            }
            false
        });
    }

    /// Removes every lingering mark now (the daemon stops marking).
    pub fn release_lingering(&mut self, sink: &dyn MarkSink) {
        for key in std::mem::take(&mut self.lingering).into_keys() {
            let _ = sink.remove(&key);
        }
    }
}

fn remove_from_map(d: &Decision, sink: &dyn MarkSink, counters: &mut MarkingCounters) {
    if d.in_map {
        if let Err(e) = sink.remove(&d.key) {
            counters.map_errors += 1;
            warn!(error = %e, "removing mark failed");
        }
    }
}

pub fn flow_text(f: &Flow) -> String {
    format!(
        "{} {} -> {}",
        f.key.proto.as_str(),
        f.key.local(),
        f.key.remote()
    )
}

#[cfg(test)]
#[path = "marking_policy_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "marking_tests.rs"]
mod kernel_tests;
