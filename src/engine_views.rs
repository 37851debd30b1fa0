//! What the engine shows of its state: the views `inspect` and `status` get, and
//! the snapshot metrics publish. Built from the engine's own fields, read only.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::*;

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
        view::flow(f, d, &self.registry, self.shape, user, counts, with_events)
    }

    /// Per tag: names, flows holding it now, and the marker's cumulative counts.
    /// Per tag: names and the flows holding it now; with `counters`, also the
    /// marker's cumulative packets and bytes (and rows for tags no flow holds now).
    pub fn tag_totals(&self, counters: Option<&Counters>) -> Vec<TagTotals> {
        let mut rows: BTreeMap<(u16, u8), TagTotals> = BTreeMap::new();
        for d in self.marking.decisions() {
            let (e, a) = (d.tag.experiment, d.tag.activity);
            rows.entry((e, a))
                .or_insert_with(|| view::tag_row(e, a, &self.registry))
                .flows += 1;
        }
        let mut rows: Vec<TagTotals> = rows.into_values().collect();
        if let Some(c) = counters {
            view::add_tag_counts(&mut rows, &c.per_tag, &self.registry);
        }
        rows
    }

    pub(super) fn status(&self) -> StatusView {
        let fc = self.table.counters();
        let mc = self.marking.counters();
        let counters = self.maps.counters().ok();
        let outcomes = counters
            .as_ref()
            .map(|c| {
                OUTCOMES
                    .iter()
                    .map(|n| n.to_string())
                    .zip(c.outcomes)
                    .collect()
            })
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
            outcomes,
            per_tag: self.tag_totals(counters.as_ref()),
            ringbuf_drops: self.tracker.drops.load(Ordering::Relaxed),
            reconcile_added: fc.reconcile_added,
            reconcile_ended: fc.reconcile_ended,
            last_poll_ms: self.last_poll.as_secs_f64() * 1000.0,
            policy_reloads_ok: self.reloads_ok,
            policy_reloads_failed: self.reloads_failed,
            flows_started: fc.flows_started,
            flows_ended: fc.flows_ended,
            flows_tagged_total: mc.tagged_total,
            map_full_total: mc.map_full,
            dump_errors: fc.dump_errors,
            in_kernel_decisions: self.in_kernel,
            policy_first_packet_exact_rules: self.exactness.iter().filter(|e| e.is_exact()).count(),
            fireflies: self.fireflies.as_ref().map(Fireflies::status),
            announcements: self.announcements.as_ref().map(Announcements::counters),
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
            ringbuf_drops: self.tracker.drops.load(Ordering::Relaxed),
            reconcile_added: fc.reconcile_added,
            reconcile_ended: fc.reconcile_ended,
            policy_reloads_ok: self.reloads_ok,
            policy_reloads_failed: self.reloads_failed,
            fireflies: self.fireflies.as_ref().map(Fireflies::status),
            announcements: self.announcements.as_ref().map(Announcements::counters),
            facts_denied: {
                let st = self.procs.stats();
                Fact::ALL.map(|f| (f.name(), st.denied(f))).to_vec()
            },
        }
    }
}
