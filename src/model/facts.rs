//! What is known about the process that owns a socket, beyond what the kernel reports
//! with the socket itself: the facts policies match on (`process`, `exe`, `cgroup`,
//! `groups`). Today one source finds them, the /proc walk of
//! [`crate::discovery::procfs`]; another source (a BPF program, a container runtime)
//! would fill the same struct, so policy and views never learn where a fact came
//! from.

//!
//! Adding a fact is one field of [`OwnerFacts`], filled by its source, plus the
//! policy field that matches on it (`policy::fields`): the struct travels unchanged
//! from the source through marking into `SocketAttrs`.

use std::path::PathBuf;

/// What is known of a socket's owning process. Unknown facts are `None`: a rule on
/// an unknown fact does not match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerFacts {
    /// Effective gid (the second field of `Gid:` in /proc/PID/status).
    pub gid: Option<u32>,
    /// The kernel's `comm` (at most 15 bytes).
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    /// cgroup v2 path (the `0::` line of /proc/PID/cgroup).
    pub cgroup: Option<String>,
}

/// The process holding a socket (the first found, lowest pid first is not guaranteed:
/// a socket shared after fork() belongs to several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub facts: OwnerFacts,
}
