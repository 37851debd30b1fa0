//! Sources of socket facts: the eBPF tracker (ring buffer), the sock_diag poller
//! (netlink dumps) and the /proc resolver. They all speak [`types`]; only this module
//! talks to netlink and the tracker's BPF objects.

pub mod cgroup2;
pub mod feeds;
pub mod full_dump;
pub mod peer_owner;
pub mod procfs;
pub mod sockdiag;
pub mod sockiter;
pub mod tracker;
pub mod tracker_event;
mod tracker_progs;
pub mod walk_digest;
