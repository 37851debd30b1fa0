//! Which flows a `flows` request (and `inspect`'s filter line) asks for: the same
//! filter runs in the daemon, which sends only the matching flows, and in the CLI.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::view::FlowView;

/// Which flows to show. Every set member must match (AND); an empty filter matches all.
///
/// Sent as the `filter` of `{"op":"flows"}`; the daemon answers with the flows for
/// which [`FlowFilter::matches`] is true, and the CLI applies it again locally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowFilter {
    /// Experiment name (case-insensitive) or id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// User name or uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Substring of the process command name (case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// An IP address or a CIDR prefix, matched against both ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Free text, case-insensitive, found in any shown column (process, user,
    /// experiment, activity, addresses, state, rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Only flows that carry a tag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tagged_only: bool,
}

/// Why a filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "address filter `{0}` is neither an IP address nor a CIDR prefix (e.g. 2001:db8::/32)"
    )]
    Address(String),
    #[error("unknown filter key `{0}:`: use exp:, user:, proc:, addr: or tagged")]
    Key(String),
}

impl FlowFilter {
    /// Parses the TUI's filter line: `exp:atlas user:xrootd proc:xrd addr:2001:db8::/32
    /// tagged`, with any other words taken as free text (all must match).
    pub fn parse(line: &str) -> Result<FlowFilter, FilterError> {
        let mut f = FlowFilter::default();
        let mut text = Vec::new();
        for word in line.split_whitespace() {
            // `addr:` values contain colons themselves: split at the first one only.
            match word.split_once(':') {
                Some(("exp" | "experiment", v)) => f.experiment = Some(v.to_string()),
                Some(("user" | "uid", v)) => f.user = Some(v.to_string()),
                Some(("proc" | "process" | "comm", v)) => f.process = Some(v.to_string()),
                Some(("addr" | "address", v)) => f.address = Some(v.to_string()),
                Some((k, _)) if k.chars().all(|c| c.is_ascii_alphabetic()) && !k.is_empty() => {
                    return Err(FilterError::Key(k.to_string()))
                }
                _ if word == "tagged" => f.tagged_only = true,
                _ => text.push(word),
            }
        }
        if !text.is_empty() {
            f.text = Some(text.join(" "));
        }
        f.validate()?;
        Ok(f)
    }

    /// Checks what [`FlowFilter::matches`] would otherwise treat as "matches nothing".
    pub fn validate(&self) -> Result<(), FilterError> {
        match &self.address {
            Some(a) if parse_net(a).is_none() => Err(FilterError::Address(a.clone())),
            _ => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }

    /// Whether `flow` passes every condition set. Pure; an invalid address matches nothing.
    pub fn matches(&self, flow: &FlowView) -> bool {
        if self.tagged_only && flow.experiment.is_none() {
            return false;
        }
        if let Some(e) = &self.experiment {
            let ok = match e.parse::<u16>() {
                Ok(id) => flow.experiment == Some(id),
                Err(_) => flow
                    .experiment_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(e)),
            };
            if !ok {
                return false;
            }
        }
        if let Some(u) = &self.user {
            let ok = match u.parse::<u32>() {
                Ok(uid) => flow.uid == Some(uid),
                Err(_) => flow.user.as_deref() == Some(u.as_str()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(p) = &self.process {
            if !flow.comm.as_deref().is_some_and(|c| contains_ci(c, p)) {
                return false;
            }
        }
        if let Some(a) = &self.address {
            let Some(net) = parse_net(a) else {
                return false;
            };
            if !net.contains(&flow.local.ip()) && !net.contains(&flow.remote.ip()) {
                return false;
            }
        }
        if let Some(t) = &self.text {
            if !t.split_whitespace().all(|w| text_matches(flow, w)) {
                return false;
            }
        }
        true
    }
}

/// An address (as a host prefix) or a CIDR prefix.
fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack
        .to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

fn text_matches(f: &FlowView, word: &str) -> bool {
    let opt = |o: &Option<String>| o.as_deref().is_some_and(|s| contains_ci(s, word));
    opt(&f.comm)
        || opt(&f.user)
        || opt(&f.experiment_name)
        || opt(&f.activity_name)
        || opt(&f.rule)
        || contains_ci(&f.state, word)
        || contains_ci(&f.proto, word)
        || contains_ci(&f.local.to_string(), word)
        || contains_ci(&f.remote.to_string(), word)
}
