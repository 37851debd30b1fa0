//! What the engine does with the discovery feeds: tracker events and dump parts
//! go to the flow table; a complete full dump, or a verify walk that found the
//! table right, is a reconcile, after which what needs a complete view runs
//! (kernel marks no flow claims, announcements without a socket, adopted marks).

use std::time::Instant;

use tracing::{debug, info, warn};

use super::{release_free_memory, Engine};
use crate::discovery::feeds::Discovery;
use crate::flows::FlowEvent;

impl Engine {
    /// Removes the adopted marks of flows the first dump did not find (their
    /// sockets closed while no daemon ran); those of live flows stay, so they are
    /// marked without a gap, and are not written (or counted) twice.
    fn sweep_adopted(&mut self, adopted: std::collections::HashSet<crate::model::socket::FlowKey>) {
        let live: std::collections::HashSet<_> = self.table.iter().map(|f| f.key).collect();
        let mut swept = 0usize;
        for key in adopted {
            if !live.contains(&key) && self.maps.remove(&key).unwrap_or(false) {
                swept += 1;
            }
        }
        info!(
            swept,
            "adopted marks of flows that ended while no daemon ran removed"
        );
    }

    pub(super) fn on_discovery(&mut self, d: Discovery) {
        let events = match d {
            Discovery::Observed(obs, at) => self.table.apply_observation_at(obs, at),
            Discovery::DumpPart(part) => self.table.dump_part(&part),
            Discovery::Dumped(dump) => {
                self.last_poll = dump.stats.last_dump_duration;
                self.last_dump_source = Some((dump.source, dump.fallbacks));
                if let Some((m, _)) = &self.metrics {
                    m.observe_poll(self.last_poll);
                }
                match dump.result {
                    Ok(()) => {
                        self.table.note_dump_duration(dump.stats.last_dump_duration);
                        self.full_dumps += 1;
                        let events = self.table.dump_complete(dump.started);
                        self.reconciled(dump.started, events);
                        self.publish_incomplete_flows();
                        return;
                    }
                    Err(e) => {
                        self.table.dump_abandoned();
                        self.table.note_dump_error();
                        warn!(error = %e, "full dump incomplete: not reconciling this round");
                        Vec::new()
                    }
                }
            }
            Discovery::VerifyBegun { seed } => self.table.verify_begin(seed),
            Discovery::Verified(v) => {
                let digest = match &v.digest {
                    Ok(d) => Some(d),
                    Err(e) => {
                        warn!(error = %e, "verify walk failed: asking for a full dump");
                        None
                    }
                };
                let outcome = self.table.verify_end(digest);
                self.last_verify = Some((outcome, v.duration));
                if outcome.verified() {
                    debug!(
                        ?outcome,
                        duration_us = v.duration.as_micros() as u64,
                        "verify walk: the table holds what the kernel has"
                    );
                    self.reconciled(v.started, Vec::new());
                } else {
                    if matches!(outcome, crate::flows::VerifyOutcome::Mismatch { .. }) {
                        info!(?outcome, "verify walk: the table differs from the kernel's sockets: asking for a full dump");
                    }
                    if let Some(d) = &self.dumps {
                        d.request();
                    }
                }
                self.publish_incomplete_flows();
                return;
            }
        };
        self.apply(events);
        self.publish_incomplete_flows();
    }

    fn publish_incomplete_flows(&mut self) {
        if let Some(d) = &self.dumps {
            d.set_incomplete_flows(self.table.incomplete_flows());
        }
    }

    /// The table now holds what the kernel has (a complete dump, or a verify walk
    /// that found it so) as of `started`: what may only be done then.
    fn reconciled(&mut self, started: Instant, events: Vec<FlowEvent>) {
        self.apply(events);
        self.marking.retry_unmapped(self.maps.as_ref());
        // After the table has caught up with a complete dump: any
        // kernel mark still unclaimed belongs to no live flow we know.
        if self.in_kernel {
            self.marking.sweep(self.maps.as_ref());
        }
        if let Some(a) = &mut self.announcements {
            a.expire();
            // The dump saw every socket: announced flows it did not
            // find have none here (only worth knowing with fireflies).
            if self.fireflies.is_some() {
                let unseen = a.unseen(started);
                self.unseen_fireflies(unseen);
            }
        }
        self.refresh_per_flow();
        if self.per_flow.is_some() {
            if let Some((_, published)) = &self.metrics {
                published.set(self.snapshot());
            }
        }
        if let Some(adopted) = self.adopted_marks.take() {
            self.sweep_adopted(adopted);
        }
        if let Some(tx) = self.first_dump.take() {
            let _ = tx.send(());
        }
        release_free_memory();
    }
}
