//! How the daemon's state looks from outside, in one place: the views of
//! [`crate::api::view`] that `inspect` and `status` get (the stable, documented
//! shapes of the control protocol), and the snapshot metrics publish. Built from
//! the engine's own fields, flows and decisions, read only.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::*;
use crate::api::view::{FlowEventView, TcpView};
use crate::marker::maps::{Counters, TagCount};
use crate::marking::Decision;
use crate::model::socket::{Direction, SockState};

impl Engine {
    /// Fills the uid -> name cache for the owners in the table, so that building
    /// views never waits on NSS per row.
    pub(super) fn cache_user_names(&mut self) {
        let uids: Vec<u32> = self
            .table
            .iter()
            .filter_map(|f| f.owner.uid)
            .filter(|u| !self.users.contains_key(u))
            .collect();
        for uid in uids {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name);
            self.users.insert(uid, name);
        }
    }

    pub(super) fn flow_view(
        &self,
        f: &Flow,
        counts: Option<(u64, u64)>,
        with_events: bool,
    ) -> FlowView {
        let user = f
            .owner
            .uid
            .and_then(|u| self.users.get(&u).cloned().flatten());
        let d = self.marking.decision(f.cookie);
        // Counts belong to the mark: a flow whose mark is gone shows none.
        let counts = counts.filter(|_| d.is_some_and(|d| d.in_map));
        flow(f, d, &self.registry, self.shape, user, counts, with_events)
    }

    /// Per tag: names, flows holding it now, and the marker's cumulative counts.
    /// Per tag: names and the flows holding it now; with `counters`, also the
    /// marker's cumulative packets and bytes (and rows for tags no flow holds now).
    pub fn tag_totals(&self, counters: Option<&Counters>) -> Vec<TagTotals> {
        let mut rows: BTreeMap<(u16, u8), TagTotals> = BTreeMap::new();
        for d in self.marking.decisions() {
            let (e, a) = (d.tag.experiment, d.tag.activity);
            rows.entry((e, a))
                .or_insert_with(|| tag_row(e, a, &self.registry))
                .flows += 1;
        }
        let mut rows: Vec<TagTotals> = rows.into_values().collect();
        if let Some(c) = counters {
            add_tag_counts(&mut rows, &c.per_tag, &self.registry);
        }
        rows
    }

    pub(super) fn status(&self) -> StatusView {
        let fc = self.table.counters();
        let mc = self.marking.counters();
        let counters = self.maps.counters().ok();
        let outcomes = counters
            .as_ref()
            .map(|c| c.outcome_counts().into_iter().collect())
            .unwrap_or_default();
        let files: std::collections::BTreeSet<_> =
            self.policy.rules().map(|r| r.id.file.clone()).collect();
        StatusView {
            version: self.info.version.to_string(),
            pid: self.info.pid,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            strategy: self.info.strategy.clone(),
            attached: self
                .info
                .attached
                .iter()
                .map(|(i, m)| (i.clone(), m.to_string()))
                .collect(),
            policy_version: self.policy.version().to_string(),
            policy_files: files.len(),
            policy_rules: self.policy.rules().len(),
            flows_total: self.table.len(),
            flows_tagged: mc.tagged,
            map_entries: mc.in_map,
            map_capacity: self.maps.capacity(),
            map_unindexed: self.maps.unindexed(),
            outcomes,
            per_tag: self.tag_totals(counters.as_ref()),
            ringbuf_drops: self.tracker.drops.load(Ordering::Relaxed),
            tracker_recursion_misses: self.tracker.recursion_misses_total(),
            tracker_state_cb_events: self.tracker.state_cb_events.load(Ordering::Relaxed),
            reconcile_dumps_requested: self.tracker.dumps_requested.load(Ordering::Relaxed),
            reconcile_added: fc.reconcile_added,
            reconcile_ended: fc.reconcile_ended,
            last_poll_ms: self.last_poll.as_secs_f64() * 1000.0,
            full_dumps: self.full_dumps,
            dump_source: self
                .last_dump_source
                .map(|(s, _)| s.as_str().to_string())
                .unwrap_or_default(),
            dump_source_fallbacks: self.last_dump_source.map_or(0, |(_, n)| n),
            verify_walks: verify_view(fc.verify, self.last_verify),
            policy_reloads_ok: self.reloads_ok,
            policy_reloads_failed: self.reloads_failed,
            flows_started: fc.flows_started,
            flows_ended: fc.flows_ended,
            flows_tagged_total: mc.tagged_total,
            map_full_total: mc.map_full,
            dump_errors: fc.dump_errors,
            in_kernel_decisions: self.in_kernel,
            policy_first_packet_exact_rules: self.exactness.iter().filter(|e| e.is_exact()).count(),
            policy_match_all: self
                .policy
                .rules()
                .find(|r| r.match_all)
                .map(|r| format!("{} ({}/{})", r.id, r.experiment, r.activity)),
            fireflies: self.fireflies.as_ref().map(Fireflies::status),
            announcements: self.announcements.as_ref().map(Announcements::counters),
            control: self.control_view(),
            flows_first_packet_exact: self
                .marking
                .decisions()
                .filter(|d| d.first_packet_exact)
                .count(),
            kernel_marks: if self.in_kernel {
                self.maps.kernel_marked().len()
            } else {
                0
            },
            kernel_decided_total: mc.kernel_decided_total,
            kernel_overridden: mc.kernel_overridden,
            kernel_swept: mc.kernel_swept,
        }
    }

    /// The facts metrics need from this task, published after each batch.
    pub fn snapshot(&self) -> Snapshot {
        let fc = self.table.counters();
        let mc = self.marking.counters();
        Snapshot {
            flows_tracked: self.table.len() as u64,
            // Packet counts are read by the scrape itself (daemon::metrics_for): no
            // BPF reads here, on every batch of flow events.
            tags: self.tag_totals(None),
            outcomes: Vec::new(),
            map_entries: mc.in_map as u64,
            map_capacity: u64::from(self.maps.capacity()),
            // Read by the scrape (daemon::metrics_for), as the packet counts.
            map_unindexed: None,
            ringbuf_drops: self.tracker.drops.load(Ordering::Relaxed),
            reconcile_added: fc.reconcile_added,
            reconcile_ended: fc.reconcile_ended,
            policy_reloads_ok: self.reloads_ok,
            policy_reloads_failed: self.reloads_failed,
            map_full: mc.map_full,
            dump_errors: fc.dump_errors,
            kernel_overridden: mc.kernel_overridden,
            fireflies: self.fireflies.as_ref().map(Fireflies::status),
            announcements: self.announcements.as_ref().map(Announcements::counters),
            facts_denied: {
                let st = self.procs.stats();
                Fact::ALL.map(|f| (f.name(), st.denied(f))).to_vec()
            },
            recursion_misses: self
                .tracker
                .recursion_misses
                .lock()
                .unwrap()
                .iter()
                .flatten()
                // "flowd_tcp_state (tp_btf/...)": the function name is the label.
                .map(|(p, n)| (p.split(' ').next().unwrap_or(p), *n))
                .collect(),
            state_cb_events: self.tracker.state_cb_events.load(Ordering::Relaxed),
            dumps_requested: self.tracker.dumps_requested.load(Ordering::Relaxed),
            dump_source_fallbacks: self.last_dump_source.map_or(0, |(_, n)| n),
            verify_walks: fc.verify,
            control: self.control_view(),
            per_flow: self.per_flow.as_ref().map(|p| p.published.clone()),
        }
    }

    fn control_view(&self) -> crate::api::view::ControlConnections {
        self.connections
            .as_ref()
            .map(|c| c.view())
            .unwrap_or_default()
    }
}

fn verify_view(
    c: crate::flows::VerifyCounters,
    last: Option<(crate::flows::VerifyOutcome, std::time::Duration)>,
) -> crate::api::view::VerifyWalksView {
    use crate::flows::VerifyOutcome as O;
    let (last_outcome, last_connections, last_ms) = match last {
        None => ("", 0, 0.0),
        Some((o, d)) => {
            let name = match o {
                O::Verified { .. } => "verified",
                O::Mismatch { .. } => "mismatch",
                O::Inconclusive { .. } => "inconclusive",
                O::Churn { .. } => "churn",
                O::Failed => "failed",
            };
            let n = match o {
                O::Verified { connections, .. } => connections,
                _ => 0,
            };
            (name, n, d.as_secs_f64() * 1000.0)
        }
    };
    crate::api::view::VerifyWalksView {
        verified: c.verified,
        mismatch: c.mismatched,
        inconclusive: c.inconclusive,
        failed: c.failed,
        excused_parts: c.excused_parts,
        last_outcome: last_outcome.to_string(),
        last_connections,
        last_ms,
    }
}

pub fn state_name(s: SockState) -> &'static str {
    use SockState::*;
    match s {
        Established => "established",
        SynSent => "syn-sent",
        SynRecv => "syn-recv",
        FinWait1 => "fin-wait-1",
        FinWait2 => "fin-wait-2",
        TimeWait => "time-wait",
        Close => "close",
        CloseWait => "close-wait",
        LastAck => "last-ack",
        Listen => "listen",
        Closing => "closing",
        NewSynRecv => "new-syn-recv",
    }
}

pub fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
        Direction::Unknown => "unknown",
    }
}

/// What the marker writes besides the label, for display.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkerShape {
    pub header: Option<&'static str>,
}

/// The view of one flow; `events` only when asked for one flow.
pub fn flow(
    f: &Flow,
    d: Option<&Decision>,
    reg: &Registry,
    shape: MarkerShape,
    user: Option<String>,
    counts: Option<(u64, u64)>,
    with_events: bool,
) -> FlowView {
    let names = d.map(|d| reg.name_of(d.tag.experiment, d.tag.activity));
    let mut events = Vec::new();
    if with_events {
        let by = match (f.seen_by.tracker, f.seen_by.sockdiag) {
            (true, true) => "the tracker, confirmed by sock_diag",
            (true, false) => "the tracker",
            _ => "a sock_diag dump",
        };
        events.push(FlowEventView {
            at_secs_ago: f.first_seen.elapsed().as_secs_f64(),
            what: format!("seen by {by}"),
        });
        if let (Some(d), Some(n)) = (d, &names) {
            events.push(FlowEventView {
                at_secs_ago: d.tagged_at.elapsed().as_secs_f64(),
                what: format!("tagged {n} by {}", d.rule),
            });
        }
    }
    FlowView {
        cookie: f.cookie,
        proto: f.key.proto.as_str().to_string(),
        local: f.key.local(),
        remote: f.key.remote(),
        state: state_name(f.state).to_string(),
        direction: direction_name(f.direction).to_string(),
        netns: f.netns,
        pid: f.owner.pid,
        comm: f.owner.comm.map(|c| c.to_string()),
        uid: f.owner.uid,
        user,
        experiment: d.map(|d| d.tag.experiment),
        experiment_name: names.as_ref().map(|n| n.experiment.clone()),
        activity: d.map(|d| d.tag.activity),
        activity_name: names.as_ref().map(|n| n.activity.clone()),
        label: d.and_then(|d| d.label()),
        header: d.filter(|d| d.in_map).and(shape.header).map(str::to_string),
        rule: d.map(|d| d.rule.to_string()),
        first_packet_exact: d.map(|d| d.first_packet_exact),
        packets: counts.map_or(0, |c| c.0),
        bytes: counts.map_or(0, |c| c.1),
        age_secs: f.first_seen.elapsed().as_secs_f64(),
        tcp: f.tcp.map(|t| TcpView {
            rtt_us: t.rtt_us,
            rttvar_us: t.rttvar_us,
            snd_cwnd: t.snd_cwnd,
            total_retrans: t.total_retrans,
            bytes_acked: t.bytes_acked,
            bytes_received: t.bytes_received,
            segs_out: t.segs_out,
            segs_in: t.segs_in,
        }),
        events,
    }
}

/// An empty row for a tag, named from the registry.
pub fn tag_row(experiment: u16, activity: u8, reg: &Registry) -> TagTotals {
    let n = reg.name_of(experiment, activity);
    TagTotals {
        experiment,
        experiment_name: Some(n.experiment),
        activity,
        activity_name: Some(n.activity),
        ..Default::default()
    }
}

/// Puts the marker's cumulative per-tag counts into `rows`, adding a row for a tag no
/// live flow holds any more (its counts stay visible), and keeps rows in tag order.
pub fn add_tag_counts(rows: &mut Vec<TagTotals>, per_tag: &[TagCount], reg: &Registry) {
    for t in per_tag {
        match rows
            .iter_mut()
            .find(|r| (r.experiment, r.activity) == (t.experiment, t.activity))
        {
            Some(r) => {
                r.packets = t.packets;
                r.bytes = t.bytes;
            }
            None => rows.push(TagTotals {
                packets: t.packets,
                bytes: t.bytes,
                ..tag_row(t.experiment, t.activity, reg)
            }),
        }
    }
    rows.sort_by_key(|r| (r.experiment, r.activity));
}

/// Serializes an iterator's items as a sequence, each built only when written.
pub struct SeqOf<I>(std::cell::Cell<Option<I>>);

impl<I> SeqOf<I> {
    pub fn new(items: I) -> Self {
        SeqOf(std::cell::Cell::new(Some(items)))
    }
}

impl<I, T> serde::Serialize for SeqOf<I>
where
    I: Iterator<Item = T>,
    T: serde::Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.take().into_iter().flatten())
    }
}
