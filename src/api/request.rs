//! The requests a client sends (`{"v":1,"op":...}`), and what the daemon reports
//! about itself that never changes while it runs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::filter::FlowFilter;
use crate::model::socket::{FlowKey, Protocol};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSpec {
    pub proto: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FlowSpec {
    pub fn key(&self) -> Result<FlowKey, String> {
        let proto = match self.proto.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            p => return Err(format!("unknown protocol `{p}`: use tcp or udp")),
        };
        Ok(FlowKey::new(proto, self.local, self.remote))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Counters {},
    MarkAdd {
        flow: FlowSpec,
        experiment: u16,
        activity: u8,
        /// The 5 entropy bits; drawn at random when absent.
        #[serde(default)]
        entropy: Option<u8>,
    },
    MarkDel {
        flow: FlowSpec,
    },
    /// Every live flow, optionally filtered. With `limit`, one page: at most
    /// `limit` flows with a cookie above `after`, in cookie order, and `next` in
    /// the reply (the cookie to pass as `after` for the following page; `null` on
    /// the last). A listing of 100 000 flows then never sits whole in the daemon.
    /// Daemons before paging refuse the two members (unknown field): a client
    /// falls back to one listing.
    Flows {
        #[serde(default)]
        filter: Option<FlowFilter>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// One flow by socket cookie.
    Flow {
        cookie: u64,
    },
    /// Reload the policy directory (as SIGHUP does).
    Reload {},
}

impl Request {
    /// `mark-add` and `mark-del` set a kernel mark directly, bypassing policy and
    /// announcements: they would let any member of `control.group` re-tag any
    /// flow, so the daemon takes them from root (SO_PEERCRED uid 0) only.
    pub fn root_only(&self) -> bool {
        matches!(self, Request::MarkAdd { .. } | Request::MarkDel { .. })
    }
}

/// What the daemon reports about itself in `status`, fixed at start.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonInfo {
    pub version: &'static str,
    pub pid: u32,
    pub strategy: String,
    /// Option headers written besides the label, if any (`hop-by-hop`, ...).
    pub header: Option<&'static str>,
    /// (interface, attach mode)
    pub attached: Vec<(String, &'static str)>,
    /// What the running kernel offers (the table `flowd-rs check` prints).
    pub kernel_features: Vec<crate::features::FeatureLine>,
    /// Fallbacks taken because the kernel lacks a feature, one line each.
    pub fallbacks: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_documented_json() {
        let r: Request = serde_json::from_str(
            r#"{"op":"mark-add","flow":{"proto":"tcp","local":"[fd00::1]:40000","remote":"[fd00::2]:5201"},"experiment":2,"activity":3}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::MarkAdd {
                experiment: 2,
                activity: 3,
                entropy: None,
                ..
            }
        ));
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status {});
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).is_err());
    }

    #[test]
    fn flow_spec_rejects_unknown_protocol() {
        let f = FlowSpec {
            proto: "sctp".into(),
            local: "[::1]:1".parse().unwrap(),
            remote: "[::1]:2".parse().unwrap(),
        };
        assert_eq!(
            f.key().unwrap_err(),
            "unknown protocol `sctp`: use tcp or udp"
        );
    }
}
