//! Explicit announcements: flows an application (or a script) names, with their tag,
//! the way the peers take them. XRootD, StoRM and FTS announce their transfers to
//! flowd/flowd-go through a named pipe (`start tcp SRC SPORT DST DPORT EXP ACT`) or
//! by sending fireflies to the local host; flowd-rs takes both, so a site can swap
//! daemons without touching its storage configuration.
//!
//! An announcement overrides the policy for the flow it names: the application knows
//! the activity of each transfer, a policy only guesses it from addresses and ports.
//! [`Announcements`] (on the engine task) keeps them by 5-tuple until the flow ends,
//! an `end` withdraws them, or, for a flow discovery never finds, a grace period
//! passes. [`pipe`] and [`listener`] are the inputs; they hand [`Announcement`]s to
//! the engine through its command channel.
//!
//! A flow announced through an input of `announcements.fireflies_for` that has no
//! local socket (another host's transfer, a proxy's) gets its start firefly at once
//! when a targeted sock_diag lookup finds none ([`Announcements::unseen_now`]), or
//! when a full dump begun after the announcement did not find it, or the tracker has
//! not reported it 10 s on ([`Announcements::unseen`]); its end goes at the `end`
//! announcement, as flowd-go sends one for every event, socket or not.

pub mod auth;
pub mod http;
pub mod listener;
pub mod pipe;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;

use crate::api::view::{AnnouncementCounters, ANNOUNCED_RULE_FILE};
use crate::config::AnnounceInput;
use crate::model::announcement::{Announcement, Origin};
use crate::model::socket::FlowKey;
use crate::model::tag::Tag;
use crate::policy::{RuleRef, Verdict};

#[derive(Debug, Clone)]
struct Held {
    verdict: Verdict,
    since: Instant,
    /// A live flow has used it: it now lasts until that flow ends.
    matched: bool,
    /// Applies only to flows whose local socket this uid owns.
    only_for_uid: Option<u32>,
    /// This daemon announces the flow with fireflies (config
    /// `announcements.fireflies_for` names its input).
    ours: bool,
    /// When it was announced, the `start-time` of fireflies sent without a socket.
    at: SystemTime,
    /// No local socket was found for it: its fireflies were started from the
    /// announcement itself, and its end goes the same way.
    unseen: bool,
}

impl Held {
    /// Ours to send fireflies for, not yet matched by a socket nor started
    /// without one, and not a local user's (who may speak only of its own sockets).
    fn awaits_socket(&self) -> bool {
        self.ours && !self.matched && !self.unseen && self.only_for_uid.is_none()
    }
}

/// `h` found to have no socket: its start firefly, once.
fn start_unseen(counters: &mut AnnouncementCounters, key: FlowKey, h: &mut Held) -> Option<Unseen> {
    if !h.awaits_socket() {
        return None;
    }
    h.unseen = true;
    counters.unseen += 1;
    Some(Unseen {
        key,
        tag: h.verdict.tag,
        start: h.at,
    })
}

/// A firefly the announcements call for themselves, for a flow with no socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unseen {
    pub key: FlowKey,
    pub tag: Tag,
    pub start: SystemTime,
}

/// How long an announcement for a flow without a socket is kept when its `end`
/// never comes (an application that crashed): then its end firefly is sent.
pub const UNSEEN_MAX: Duration = Duration::from_secs(24 * 3600);

/// The announcements in force, by the key they were announced under.
pub struct Announcements {
    held: FxHashMap<FlowKey, Held>,
    grace: Duration,
    /// At most this many held; a new key beyond is dropped.
    max_held: usize,
    counters: AnnouncementCounters,
    /// Refusals counted by the inputs, which run on their own tasks.
    refused: Arc<AtomicU64>,
    /// One rule per origin rather than one allocation per announcement.
    rules: FxHashMap<String, Arc<RuleRef>>,
    fireflies_for: Vec<AnnounceInput>,
    /// Ends of flows without a socket, for the engine to send ([`Self::take_ended`]).
    ended: Vec<Unseen>,
}

/// Default of `announcements.max_held`.
pub const DEFAULT_MAX_HELD: usize = 16_384;

impl Announcements {
    /// `grace`: how long an announcement waits for discovery to find its flow.
    pub fn new(grace: Duration) -> Self {
        Self::with_limit(grace, DEFAULT_MAX_HELD)
    }

    /// As [`Announcements::new`], holding at most `max_held`.
    pub fn with_limit(grace: Duration, max_held: usize) -> Self {
        Announcements {
            held: FxHashMap::default(),
            grace,
            max_held,
            counters: AnnouncementCounters::default(),
            refused: Arc::default(),
            rules: FxHashMap::default(),
            fireflies_for: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// The inputs whose flows this daemon announces with its own fireflies.
    pub fn with_fireflies_for(mut self, inputs: &[AnnounceInput]) -> Self {
        self.fireflies_for = inputs.to_vec();
        self
    }

    /// Whether this daemon sends the fireflies of the announced flow with this key
    /// (either orientation); false for a flow not announced.
    pub fn fireflies_ours(&self, key: &FlowKey) -> bool {
        self.held
            .get(key)
            .or_else(|| self.held.get(&key.reversed()))
            .is_some_and(|h| h.ours && !h.unseen)
    }

    /// The announcements of `fireflies_for` inputs that no flow has matched though a
    /// full dump begun at `dump_started`, after them, found no socket: they get their
    /// start firefly now. Not those of a local user, who may speak only of sockets
    /// of its own.
    pub fn unseen(&mut self, dump_started: Instant) -> Vec<Unseen> {
        let counters = &mut self.counters;
        self.held
            .iter_mut()
            .filter(|(_, h)| h.since < dump_started)
            .filter_map(|(key, h)| start_unseen(counters, *key, h))
            .collect()
    }

    /// The announcement held under `key`, when the kernel has just said that no
    /// socket of this host has that 5-tuple (either way round): as
    /// [`Announcements::unseen`], without waiting for a dump.
    pub fn unseen_now(&mut self, key: &FlowKey) -> Option<Unseen> {
        let h = self.held.get_mut(key)?;
        start_unseen(&mut self.counters, *key, h)
    }

    /// Whether the announcement under `key` waits to learn if it has a socket.
    pub fn awaits_socket(&self, key: &FlowKey) -> bool {
        self.held.get(key).is_some_and(Held::awaits_socket)
    }

    /// The flows without a socket whose end is due (withdrawn, replaced, or held
    /// [`UNSEEN_MAX`]).
    pub fn take_ended(&mut self) -> Vec<Unseen> {
        std::mem::take(&mut self.ended)
    }

    /// `h`, just removed: a flow without a socket ends with it.
    fn gone(&mut self, key: FlowKey, h: Option<Held>) {
        if let Some(h) = h.filter(|h| h.unseen) {
            self.ended.push(Unseen {
                key,
                tag: h.verdict.tag,
                start: h.at,
            });
        }
    }

    /// Where the inputs count what they refuse (shown with the counters).
    pub fn refusals(&self) -> Arc<AtomicU64> {
        self.refused.clone()
    }

    pub fn counters(&self) -> AnnouncementCounters {
        AnnouncementCounters {
            held: self.held.len(),
            refused: self.refused.load(Ordering::Relaxed),
            ..self.counters
        }
    }

    /// Records `a`; returns the keys (both orientations) whose flows must be
    /// re-decided.
    pub fn apply(&mut self, a: Announcement) -> [FlowKey; 2] {
        let input = match a.origin {
            Origin::Firefly(_) => {
                self.counters.received_firefly += 1;
                AnnounceInput::Firefly
            }
            Origin::Pipe => {
                self.counters.received_pipe += 1;
                AnnounceInput::Pipe
            }
            Origin::Http(_) => {
                self.counters.received_http += 1;
                AnnounceInput::Http
            }
        };
        let keys = [a.key, a.key.reversed()];
        match a.tag {
            Some(tag) => {
                let exists =
                    self.held.contains_key(&a.key) || self.held.contains_key(&a.key.reversed());
                if !exists && self.held.len() >= self.max_held {
                    self.counters.dropped_full += 1;
                    return keys;
                }
                if self.rules.len() >= self.max_held {
                    self.rules.clear();
                }
                let origin = a.origin.to_string();
                let rule = self
                    .rules
                    .entry(origin)
                    .or_insert_with_key(|origin| {
                        Arc::new(RuleRef {
                            file: ANNOUNCED_RULE_FILE.into(),
                            name: origin.as_str().into(),
                            line: 0,
                        })
                    })
                    .clone();
                let held = Held {
                    verdict: Verdict { tag, rule },
                    since: Instant::now(),
                    matched: false,
                    only_for_uid: a.only_for_uid,
                    ours: self.fireflies_for.contains(&input),
                    at: SystemTime::now(),
                    unseen: false,
                };
                // The latest word on a connection wins, whichever end it names first.
                let reversed = self.held.remove(&a.key.reversed());
                let forward = self.held.insert(a.key, held);
                for (k, before) in [(a.key.reversed(), reversed), (a.key, forward)] {
                    match before {
                        // A restatement of the same tag (ongoing) continues the flow.
                        Some(b) if b.unseen && b.verdict.tag == tag => {
                            let h = self.held.get_mut(&a.key).expect("just inserted");
                            h.unseen = true;
                            h.at = b.at;
                        }
                        b => self.gone(k, b),
                    }
                }
            }
            None => {
                let forward = self.held.remove(&a.key);
                let reverse = self.held.remove(&a.key.reversed());
                if forward.is_some() || reverse.is_some() {
                    self.counters.withdrawn += 1;
                }
                self.gone(a.key, forward);
                self.gone(a.key.reversed(), reverse);
            }
        }
        keys
    }

    /// The announced verdict for a live flow whose local socket `owner` owns, if
    /// any (marking it as matched). An announcement from a user names only that
    /// user's flows.
    pub fn verdict_for(&mut self, key: &FlowKey, owner: Option<u32>) -> Option<Verdict> {
        if self.held.is_empty() {
            return None;
        }
        let held = match self.held.get_mut(key) {
            Some(h) => h,
            None => self.held.get_mut(&key.reversed())?,
        };
        if held.only_for_uid.is_some_and(|uid| owner != Some(uid)) {
            self.counters.foreign_flow += 1;
            return None;
        }
        held.matched = true;
        Some(held.verdict.clone())
    }

    /// The flow with this key ended: its announcement goes with it.
    pub fn forget(&mut self, key: &FlowKey) {
        if self.held.is_empty() {
            return;
        }
        match self.held.remove(key) {
            Some(h) => self.gone(*key, Some(h)),
            None => {
                let h = self.held.remove(&key.reversed());
                self.gone(key.reversed(), h);
            }
        }
    }

    /// Drops announcements no flow has matched within the grace period (a typo in
    /// an address, a flow of another host).
    pub fn expire(&mut self) {
        let grace = self.grace;
        let before = self.held.len();
        let ended = &mut self.ended;
        self.held.retain(|key, h| {
            if h.unseen {
                let keep = h.since.elapsed() < UNSEEN_MAX;
                if !keep {
                    ended.push(Unseen {
                        key: *key,
                        tag: h.verdict.tag,
                        start: h.at,
                    });
                }
                return keep;
            }
            h.matched || h.since.elapsed() < grace
        });
        self.counters.expired += (before - self.held.len()) as u64;
        // After a flood the table would keep its peak size: give the memory back.
        if self.held.capacity() > 64 && self.held.len() < self.held.capacity() / 4 {
            self.held.shrink_to_fit();
        }
        if self.held.is_empty() {
            self.rules = FxHashMap::default();
        }
    }
}

#[cfg(test)]
mod tests;
