//! The flow table's side of a verify walk (discovery/walk_digest.rs): fold the
//! table as the kernel folds the namespace, then compare.
//!
//! The table is folded when the walk begins ([`FlowTable::verify_begin`]); the
//! kernel walks while the engine goes on applying tracker events. A partition
//! that differs is explained when an event about one of its cookies arrived while
//! the walk was open (the kernel may have seen the socket before or after it);
//! that is the race rule of a full dump, partition by partition. A difference no
//! event explains means the tracker missed something: the daemon then asks for a
//! full dump, which names the sockets.

use std::time::Instant;

use super::{Flow, FlowEvent, FlowTable};
use crate::discovery::walk_digest::{self, WalkDigest, PARTS};
use crate::model::socket::{Direction, SockState};

#[derive(Debug)]
pub(super) struct OpenVerify {
    table: WalkDigest,
    /// Partitions with a tracker event since the walk began.
    touched: Box<[bool]>,
    /// Flows of the namespace a digest cannot vouch for.
    unverifiable: usize,
}

/// Verify walks by outcome (status `verify_walks`, metric
/// `flowd_reconcile_verify_walks_total`; `Churn` counts as inconclusive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyCounters {
    pub verified: u64,
    pub mismatched: u64,
    pub inconclusive: u64,
    pub failed: u64,
    /// Differing partitions explained by events during the walk.
    pub excused_parts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The table holds the connections the kernel has, in the same states
    /// (partitions that events touched during the walk excepted).
    Verified { connections: u64, excused: usize },
    /// Partitions differ that no event explains: the tracker missed something.
    Mismatch {
        parts: usize,
        kernel: u64,
        table: u64,
    },
    /// The table holds flows a digest cannot vouch for: request sockets a dump
    /// saw, or flows a dump would complete (owner, direction unknown).
    Inconclusive { flows: usize },
    /// Events touched so many partitions during the walk (over a quarter) that
    /// excusing them could hide what the tracker missed.
    Churn { excused: usize },
    /// The walk failed, or none was open.
    Failed,
}

impl VerifyOutcome {
    /// Whether the table is as a complete dump would leave it.
    pub fn verified(self) -> bool {
        matches!(self, VerifyOutcome::Verified { .. })
    }
}

/// A flow a full dump would tell more about: its owner's uid or cgroup, or its
/// direction. (A missing inode the digest itself shows, as a socket that has
/// one now.)
pub(super) fn incomplete(flow: &Flow) -> bool {
    flow.owner.uid.is_none()
        || flow.owner.cgroup_id.is_none()
        || flow.direction == Direction::Unknown
}

impl FlowTable {
    /// A verify walk of the daemon's namespace begins, its digests seeded with
    /// `seed`: ends what expired, as a complete dump would (TIME_WAIT past its
    /// grace, other namespaces' silent closing sockets), and folds the table.
    /// O(table), while the kernel walks: the walk's end then costs nothing more.
    pub fn verify_begin(&mut self, seed: u64) -> Vec<FlowEvent> {
        let now = Instant::now();
        self.sweep(None, now);
        let ended = self.take_ended(now);
        let mut table = WalkDigest::new(seed);
        let mut unverifiable = 0;
        for e in self.flows.values() {
            let f = &e.flow;
            if f.netns != self.config.netns {
                continue;
            }
            if matches!(f.state, SockState::SynRecv | SockState::NewSynRecv) || incomplete(f) {
                unverifiable += 1;
            }
            table.add(f.cookie, &f.key, f.state, f.inode);
        }
        self.verify = Some(Box::new(OpenVerify {
            table,
            touched: vec![false; PARTS].into_boxed_slice(),
            unverifiable,
        }));
        ended
    }

    /// An event about `cookie`: while a walk is open, its partition may differ.
    pub(super) fn touch(&mut self, cookie: u64) {
        if let Some(v) = &mut self.verify {
            v.touched[walk_digest::part_of(v.table.seed, cookie)] = true;
        }
    }

    /// The walk begun by [`Self::verify_begin`] ended with `kernel` (`None`: it
    /// failed): compares and counts the outcome. O(partitions).
    pub fn verify_end(&mut self, kernel: Option<&WalkDigest>) -> VerifyOutcome {
        let open = self.verify.take();
        let outcome = match (open, kernel) {
            (Some(v), Some(k)) if k.seed == v.table.seed => judge(&v, k),
            _ => VerifyOutcome::Failed,
        };
        let c = &mut self.counters.verify;
        match outcome {
            VerifyOutcome::Verified { excused, .. } => {
                c.verified += 1;
                c.excused_parts += excused as u64;
            }
            VerifyOutcome::Mismatch { .. } => c.mismatched += 1,
            VerifyOutcome::Inconclusive { .. } | VerifyOutcome::Churn { .. } => c.inconclusive += 1,
            VerifyOutcome::Failed => c.failed += 1,
        }
        outcome
    }

    /// Flows of the daemon's namespace that lack what a full dump would fill in
    /// (owner's uid or cgroup, direction): while there are any, a periodic
    /// reconcile is a full dump rather than a verify walk. A later event that
    /// completes a flow takes it off.
    pub fn incomplete_flows(&self) -> usize {
        self.incomplete.len()
    }
}

fn judge(v: &OpenVerify, kernel: &WalkDigest) -> VerifyOutcome {
    let (mut unexplained, mut excused) = (0, 0);
    for p in v.table.differing(kernel) {
        if v.touched[p] {
            excused += 1;
        } else {
            unexplained += 1;
        }
    }
    if unexplained == 0 && excused * 4 > PARTS {
        return VerifyOutcome::Churn { excused };
    }
    if unexplained > 0 {
        VerifyOutcome::Mismatch {
            parts: unexplained,
            kernel: kernel.connections(),
            table: v.table.connections(),
        }
    } else if v.unverifiable > 0 {
        VerifyOutcome::Inconclusive {
            flows: v.unverifiable,
        }
    } else {
        VerifyOutcome::Verified {
            connections: kernel.connections(),
            excused,
        }
    }
}
