//! What an application says when it names one of its flows and the tag it should
//! carry: the one type every announcement input (named pipe, received fireflies, the
//! HTTP API) produces, so inputs depend on this and not on the engine that applies it.

use std::fmt;
use std::net::SocketAddr;

use super::socket::FlowKey;
use super::tag::Tag;

/// Where an announcement came from (shown as the flow's "rule").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A firefly received from this address.
    Firefly(SocketAddr),
    /// A line written to the named pipe.
    Pipe,
    /// A `POST /flow` of the HTTP API from this address.
    Http(SocketAddr),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Firefly(from) => write!(f, "firefly from {from}"),
            Origin::Pipe => f.write_str("named pipe"),
            Origin::Http(from) => write!(f, "HTTP API from {from}"),
        }
    }
}

/// One flow named by an application. `tag: None` withdraws it (an `end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The flow as the announcer describes it: source first. The flow table's key
    /// has the local end first; either orientation is matched.
    pub key: FlowKey,
    pub tag: Option<Tag>,
    pub origin: Origin,
    /// `Some(uid)`: the announcer is the local user `uid`, who may name only flows
    /// whose local socket is its own; `None`: it may name any flow (root, the named
    /// pipe, whose group decides who writes, or a remote host in
    /// `announcements.firefly_allow`).
    pub only_for_uid: Option<u32>,
}
