//! What `inspect` shows, as the daemon sends it over the control socket.
//!
//! These types are the contract between the daemon and the CLI, and they are also
//! what `flowd-rs inspect --json` prints for scripts, so they only ever grow: a field
//! is never renamed or removed within protocol version 1, and readers ignore members
//! they do not know (no `deny_unknown_fields` here, on purpose). Every member is
//! always written (`null` when unknown), so a script can rely on the keys.
//!
//! Reading is lenient the other way too: members a daemon does not send (an older
//! one, or one that cannot count something) read as their default (`0`, `null`,
//! empty), so a version-skewed `inspect` still shows what it can.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One socket the daemon knows about, with the tag policy gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    /// The kernel's socket cookie: the id to ask for one flow with `{"op":"flow"}`.
    pub cookie: u64,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Our end (the source of the packets we send); IPv4-mapped addresses are shown as IPv4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel socket state in kebab case: `established`, `syn-sent`, `time-wait`, ...
    pub state: String,
    /// `outbound` (we connected), `inbound` (we accepted) or `unknown`.
    pub direction: String,
    /// Inode of the socket's network namespace.
    pub netns: u64,
    pub pid: Option<u32>,
    /// The owning process's command name (`/proc/PID/comm`, at most 15 bytes).
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// SciTags experiment id (1..=511); `None` when no rule tagged the flow.
    pub experiment: Option<u16>,
    pub experiment_name: Option<String>,
    /// SciTags activity id (0..=63).
    pub activity: Option<u8>,
    pub activity_name: Option<String>,
    /// The 20-bit flow label written on the flow's packets, entropy included.
    pub label: Option<u32>,
    /// Extension header written besides (or instead of) the label: `hop-by-hop`,
    /// `destination` or `hop-by-hop+destination`.
    pub header: Option<String>,
    /// The rule that decided the tag, `FILE:RULE` (e.g. `atlas.toml:xrootd-data`).
    pub rule: Option<String>,
    /// Whether the flow's first packet already carried the tag (known when the tracker
    /// saw the connect; `None` for sockets adopted from a dump).
    pub first_packet_exact: Option<bool>,
    /// Packets and bytes the marker counted for this flow (tagged flows only; 0 when
    /// the daemon does not count per flow).
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Seconds since the daemon first saw the socket.
    pub age_secs: f64,
    /// TCP statistics from the kernel's `tcp_info` (TCP only, when available).
    pub tcp: Option<TcpView>,
    /// The flow's history, newest last; only filled in the reply to `{"op":"flow"}`,
    /// empty in `flows` listings.
    #[serde(default)]
    pub events: Vec<FlowEventView>,
}

/// A subset of the kernel's `struct tcp_info` (the daemon's `TcpStats`).
/// Verify walks by outcome, and the last one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyWalksView {
    pub verified: u64,
    /// A difference no tracker event explained; a full dump followed.
    pub mismatch: u64,
    /// The table held flows a dump had to complete; a full dump followed.
    pub inconclusive: u64,
    pub failed: u64,
    /// Differing partitions explained by tracker events during the walk.
    pub excused_parts: u64,
    /// `verified`, `mismatch`, `inconclusive` or `failed`; empty before the first.
    pub last_outcome: String,
    /// Connections the last verify walk counted in the kernel (verified walks).
    pub last_connections: u64,
    pub last_ms: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpView {
    pub rtt_us: u32,
    pub rttvar_us: u32,
    pub snd_cwnd: u32,
    pub total_retrans: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
}

/// One thing that happened to a flow (seen, tagged, retagged, ended, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowEventView {
    pub at_secs_ago: f64,
    /// Free text for people, e.g. `tagged atlas/datachallenge by atlas.toml:dc`.
    pub what: String,
}

/// The daemon as a whole: the reply to `{"op":"status"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: f64,
    /// Marking strategy: `flow-label`, `hop-by-hop`, ...
    pub strategy: String,
    /// (interface, attach mode), e.g. `("eth0", "tcx")`.
    pub attached: Vec<(String, String)>,
    /// Identifies the compiled policy in force (changes on every successful reload).
    pub policy_version: String,
    pub policy_files: usize,
    pub policy_rules: usize,
    pub flows_total: usize,
    pub flows_tagged: usize,
    /// Flows in the marker's BPF map, and the map's size.
    pub map_entries: usize,
    pub map_capacity: u32,
    /// Marks the flow index lacks (a full bucket, or decided in the kernel and not
    /// yet met by userspace); their packets take the hash-map lookup. `null`: the
    /// index is off.
    #[serde(default)]
    pub map_unindexed: Option<u64>,
    /// Packets per marker outcome (`marked`, `unmarked`, `skipped_mtu`, ...), cumulative.
    #[serde(deserialize_with = "null_as_default")]
    pub outcomes: BTreeMap<String, u64>,
    /// Cumulative marker counters per tag, plus the flows currently holding the tag.
    #[serde(deserialize_with = "null_as_default")]
    pub per_tag: Vec<TagTotals>,
    pub ringbuf_drops: u64,
    /// Tracker program runs the kernel skipped (a softirq nesting into the same
    /// program on one CPU), summed over programs; each is an event lost without a
    /// ring drop, corrected by the next dump. `null` where the kernel does not count
    /// them (before Linux 5.12) or the tracker is off.
    pub tracker_recursion_misses: Option<u64>,
    /// TCP state changes that nesting would have lost, reported through the
    /// sockops STATE_CB instead (all namespaces).
    pub tracker_state_cb_events: u64,
    /// Full sock_diag dumps the tracker asked for after losing events (ring drop,
    /// a skipped run STATE_CB did not cover), besides the periodic ones.
    pub reconcile_dumps_requested: u64,
    /// Corrections the sock_diag reconciliation made to what the tracker reported.
    pub reconcile_added: u64,
    pub reconcile_ended: u64,
    /// Duration of the last full dump (reconcile poll), in milliseconds.
    pub last_poll_ms: f64,
    /// Complete full dumps since start (the first, after losses, after a verify
    /// walk's difference, and the periodic ones verify walks do not replace).
    pub full_dumps: u64,
    /// Source of the last full dump: `bpf_iterator` or `sock_diag`
    /// (`discovery.dump_source`); empty before the first dump.
    pub dump_source: String,
    /// Iterator dumps that failed and were made again with sock_diag.
    pub dump_source_fallbacks: u64,
    /// Periodic reconciles made as verify walks (`discovery.verify_walks`).
    pub verify_walks: VerifyWalksView,
    pub policy_reloads_ok: u64,
    pub policy_reloads_failed: u64,
    /// Flows the table ever started and ended, tags ever given.
    pub flows_started: u64,
    pub flows_ended: u64,
    pub flows_tagged_total: u64,
    /// Tags that found the marker map full (raise `marker.map_capacity`).
    pub map_full_total: u64,
    /// sock_diag dumps that failed (not reconciled).
    pub dump_errors: u64,
    /// Config `marker.in_kernel_decisions`.
    pub in_kernel_decisions: bool,
    /// Rules of the policy the kernel decides before a flow's first packet leaves.
    pub policy_first_packet_exact_rules: usize,
    /// The policy's `match_all` rule and its tag, `perfsonar.toml:everything (1/2)`.
    #[serde(default)]
    pub policy_match_all: Option<String>,
    /// Live flows the kernel had already marked, with userspace's tag, when
    /// userspace first decided them.
    pub flows_first_packet_exact: usize,
    /// Entries of the marker map written by the kernel's decision (walks the map).
    pub kernel_marks: usize,
    /// Flows whose first-packet kernel mark userspace adopted, replaced (its
    /// decision differed) or swept (no live flow), cumulative.
    pub kernel_decided_total: u64,
    pub kernel_overridden: u64,
    pub kernel_swept: u64,
    /// Present when `fireflies.enabled`.
    pub fireflies: Option<FireflyStatus>,
    /// Present when an announcement input (named pipe, firefly listener) is on.
    pub announcements: Option<AnnouncementCounters>,
    /// The control socket's connections.
    #[serde(default)]
    pub control: ControlConnections,
}

/// The control socket's connections: open now, refused over the per-user cap
/// (`control.max_connections_per_user`), closed after `control.idle_timeout_secs`
/// without a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlConnections {
    pub open: usize,
    pub refused: u64,
    pub closed_idle: u64,
}

/// What the firefly sender has done, cumulative but for `announced`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FireflyStatus {
    /// Flows announced with a start and not yet ended.
    pub announced: usize,
    /// Of those, starts still waiting for room in the send queue.
    pub starts_waiting: usize,
    /// Datagrams sent, by state (one firefly to two destinations is two).
    pub sent_start: u64,
    pub sent_ongoing: u64,
    pub sent_end: u64,
    /// Dropped because the send queue was full.
    pub queue_full: u64,
    pub send_errors: u64,
    /// `ongoing` fireflies sent without their TCP facts (sock_diag request failed).
    pub enrich_errors: u64,
    /// Lookups of collector host names, answered and failed.
    pub collector_lookups_ok: u64,
    pub collector_lookups_failed: u64,
    /// STUN Binding requests answered and unanswered (fireflies.stun).
    pub stun_ok: u64,
    pub stun_failed: u64,
}

/// Counters of one tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TagTotals {
    pub experiment: u16,
    pub experiment_name: Option<String>,
    pub activity: u8,
    pub activity_name: Option<String>,
    /// Flows holding this tag now.
    pub flows: u64,
    /// Packets and bytes marked with this tag since the daemon started.
    pub packets: u64,
    pub bytes: u64,
}

/// `null` reads as the default: a daemon whose BPF counters could not be read sends
/// `"outcomes": null`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl FlowView {
    /// `atlas/datachallenge`, falling back to ids where names are unknown; `-` untagged.
    pub fn tag_text(&self) -> String {
        match (self.experiment, self.activity) {
            (Some(e), a) => {
                let exp = self
                    .experiment_name
                    .clone()
                    .unwrap_or_else(|| e.to_string());
                let act = match (&self.activity_name, a) {
                    (Some(n), _) => n.clone(),
                    (None, Some(a)) => a.to_string(),
                    (None, None) => "?".into(),
                };
                format!("{exp}/{act}")
            }
            (None, _) => "-".into(),
        }
    }

    /// The experiment's display name, `untagged` when there is none.
    pub fn experiment_text(&self) -> String {
        match (self.experiment, &self.experiment_name) {
            (_, Some(n)) => n.clone(),
            (Some(e), None) => e.to_string(),
            (None, None) => "untagged".into(),
        }
    }
}

/// The file name shown as the rule of an announced flow (`inspect`, `status`).
pub const ANNOUNCED_RULE_FILE: &str = "(announced)";

/// What the announcement inputs did, for `status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AnnouncementCounters {
    pub received_firefly: u64,
    pub received_pipe: u64,
    pub received_http: u64,
    /// Withdrawn by an `end`.
    pub withdrawn: u64,
    /// Dropped because no live flow matched them within the grace period.
    pub expired: u64,
    /// Held now (matched or still waiting for their flow).
    pub held: usize,
    /// Dropped because `announcements.max_held` were already held.
    pub dropped_full: u64,
    /// Refused before parsing: a local sender not allowed to announce.
    pub refused: u64,
    /// Times an announcement named a flow of another user than its sender and
    /// was not applied to it.
    pub foreign_flow: u64,
    /// Announced flows no local socket was found for, given fireflies of their own
    /// (inputs of `announcements.fireflies_for`).
    pub unseen: u64,
}

#[cfg(test)]
#[path = "view_tests.rs"]
pub(crate) mod tests;
