//! From flows to marks: evaluates the policy for each live flow and keeps the marker
//! map in step with the flow table, so a mark never outlives its socket.
//!
//! The entropy bits of a flow's label are drawn once, the first time it is tagged,
//! and kept across policy reloads: a label that changed mid-flow could move the flow
//! to another ECMP path (shared/spec/scitags.md).

use std::sync::Arc;

use rustc_hash::FxHashMap;
use tracing::{debug, info, warn};

use crate::discovery::procfs::ProcessInfo;
use crate::discovery::types::FlowKey;
use crate::flows::{Flow, Lifecycle};
use crate::marker::label::Tag;
use crate::marker::maps::{MapError, MarkMaps};
use crate::policy::{Policy, RuleRef, SocketAttrs};

/// Where marks go; the BPF map in the daemon, a recorder in tests.
pub trait MarkSink {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError>;
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError>;
}

impl MarkSink for MarkMaps {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        MarkMaps::insert(self, key, tag, entropy)
    }
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError> {
        MarkMaps::remove(self, key)
    }
}

/// What the policy decided for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub tag: Tag,
    pub rule: RuleRef,
    pub entropy: u8,
    /// The key the mark was written under (IPv6 flows only).
    pub key: FlowKey,
    /// Whether the marker map holds it. IPv4 flows are tagged but never in the map;
    /// a full map leaves IPv6 flows out too (counted).
    pub in_map: bool,
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
    /// Tags that could not be written because the marker map was full.
    pub map_full: u64,
    /// Other map write failures.
    pub map_errors: u64,
}

/// Process facts for policy rules that need them (process, exe, cgroup).
pub type ProcLookup<'a> = &'a mut dyn FnMut(&Flow) -> Option<Arc<ProcessInfo>>;

pub struct Marking {
    /// The daemon's own network namespace: only its flows pass our TC program.
    local_netns: u64,
    decisions: FxHashMap<u64, Decision>,
    entropy: FxHashMap<u64, u8>,
    counters: MarkingCounters,
}

impl Marking {
    pub fn new(local_netns: u64) -> Self {
        Marking {
            local_netns,
            decisions: FxHashMap::default(),
            entropy: FxHashMap::default(),
            counters: MarkingCounters::default(),
        }
    }

    pub fn decision(&self, cookie: u64) -> Option<&Decision> {
        self.decisions.get(&cookie)
    }

    pub fn counters(&self) -> MarkingCounters {
        MarkingCounters {
            tagged: self.decisions.len(),
            ..self.counters
        }
    }

    /// Builds what the policy sees of a flow.
    pub fn attrs(flow: &Flow, proc: Option<&ProcessInfo>) -> SocketAttrs {
        SocketAttrs {
            proto: flow.key.proto,
            local: flow.key.local,
            remote: flow.key.remote,
            direction: flow.direction,
            uid: flow.owner.uid,
            gid: None,
            comm: flow
                .owner
                .comm
                .clone()
                .or_else(|| proc.map(|p| p.comm.clone())),
            exe: proc.and_then(|p| p.exe.clone()),
            cgroup: proc.and_then(|p| p.cgroup.clone()),
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
        if flow.lifecycle == Lifecycle::Gone {
            self.on_end(flow, sink);
            return;
        }
        // Sockets of other namespaces leave through other interfaces: not ours to mark.
        // An unbound client (local port 0) is completed by a later event.
        if flow.netns != self.local_netns || flow.key.local.port() == 0 {
            return;
        }
        let info = if policy.needs_process_facts() {
            proc(flow)
        } else {
            None
        };
        let verdict = policy.evaluate(&Self::attrs(flow, info.as_deref()));
        let Some(v) = verdict else {
            if let Some(old) = self.decisions.remove(&flow.cookie) {
                remove_from_map(&old, sink, &mut self.counters);
                info!(flow = %flow_text(flow), "flow no longer matches any rule: mark removed");
            }
            return;
        };
        let tag = Tag {
            experiment: v.experiment,
            activity: v.activity,
        };
        let entropy = *self
            .entropy
            .entry(flow.cookie)
            .or_insert_with(|| rand::random::<u8>() & 0x1f);
        let mut next = Decision {
            tag,
            rule: v.rule.clone(),
            entropy,
            key: flow.key,
            in_map: false,
        };
        if let Some(old) = self.decisions.get(&flow.cookie) {
            if old.tag == next.tag && old.key == next.key && old.in_map {
                if old.rule != next.rule {
                    self.decisions.insert(flow.cookie, next);
                }
                return;
            }
            if old.key != next.key {
                remove_from_map(old, sink, &mut self.counters);
            }
        }
        if flow.key.is_ipv6() {
            match sink.insert(&flow.key, tag, entropy) {
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
        info!(flow = %flow_text(flow), tag = %tag, rule = %v.rule, label = ?next.label().map(|l| format!("{l:#07x}")), "flow tagged");
        if self.decisions.insert(flow.cookie, next).is_none() {
            self.counters.tagged_total += 1;
        }
    }

    /// Removes the mark of an ended flow.
    pub fn on_end(&mut self, flow: &Flow, sink: &dyn MarkSink) {
        self.entropy.remove(&flow.cookie);
        if let Some(old) = self.decisions.remove(&flow.cookie) {
            remove_from_map(&old, sink, &mut self.counters);
            debug!(flow = %flow_text(flow), "flow ended: mark removed");
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
        f.key.local,
        f.key.remote
    )
}
