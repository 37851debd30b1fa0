//! Who may announce, and which flows: the one rule every announcement input
//! applies (the firefly listener; any input that knows its peer's address and the
//! address it was reached on can call [`Authenticator::authorize`]).
//!
//! An announcement re-tags traffic, so a local user must not re-tag another user's
//! flows. A sender on this host is identified by its socket: the kernel's
//! sock_diag names the owner of the socket bound to the peer address. Root may
//! name any flow; a user in `announcements.allow_users` (or a member of a group in
//! `allow_groups`) only flows whose local socket is its own; anyone else is
//! refused. A sender not on this host is trusted by address alone
//! (`announcements.firefly_allow`, loopback only by default).
//!
//! The named pipe carries no credentials per line: whoever may open it for writing
//! (root and `control.group`, mode 0620) may name any flow.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use nix::unistd::{Gid, Group, Uid, User};

use crate::discovery::peer_owner::PeerOwners;
use crate::model::socket::Protocol;

/// Which flows an authorized announcer may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    AnyFlow,
    /// Only flows whose local socket this uid owns.
    OwnFlows(u32),
}

impl Scope {
    /// As carried by [`crate::model::announcement::Announcement::only_for_uid`].
    pub fn only_for_uid(self) -> Option<u32> {
        match self {
            Scope::AnyFlow => None,
            Scope::OwnFlows(uid) => Some(uid),
        }
    }
}

/// The users and groups allowed besides root, resolved once at start.
#[derive(Debug, Clone, Default)]
pub struct AuthRule {
    users: HashSet<u32>,
    groups: HashSet<u32>,
}

impl AuthRule {
    /// Names or numeric ids; an unknown name is an error naming the key.
    pub fn new(users: &[String], groups: &[String]) -> Result<AuthRule> {
        let mut rule = AuthRule::default();
        for u in users {
            let uid = match u.parse::<u32>() {
                Ok(id) => id,
                Err(_) => match User::from_name(u)? {
                    Some(user) => user.uid.as_raw(),
                    None => bail!("announcements.allow_users: no user {u:?} on this host"),
                },
            };
            rule.users.insert(uid);
        }
        for g in groups {
            let gid = match g.parse::<u32>() {
                Ok(id) => id,
                Err(_) => match Group::from_name(g)? {
                    Some(group) => group.gid.as_raw(),
                    None => bail!("announcements.allow_groups: no group {g:?} on this host"),
                },
            };
            rule.groups.insert(gid);
        }
        Ok(rule)
    }

    /// The scope of a local announcer `uid` whose groups are `gids`.
    pub fn judge(&self, uid: u32, gids: &[u32]) -> Result<Scope, String> {
        if uid == 0 {
            return Ok(Scope::AnyFlow);
        }
        if self.users.contains(&uid) || gids.iter().any(|g| self.groups.contains(g)) {
            return Ok(Scope::OwnFlows(uid));
        }
        Err(format!(
            "sender uid {uid} is not root and not in announcements.allow_users or allow_groups"
        ))
    }
}

/// The rule with what it needs to apply it: a sock_diag socket and a cache of the
/// announcers' groups.
pub struct Authenticator {
    rule: AuthRule,
    owners: PeerOwners,
    /// uid -> groups, looked up once per uid (bounded: cleared when full).
    groups: HashMap<u32, Vec<u32>>,
}

impl Authenticator {
    pub fn new(rule: AuthRule) -> std::io::Result<Authenticator> {
        Ok(Authenticator {
            rule,
            owners: PeerOwners::new()?,
            groups: HashMap::new(),
        })
    }

    /// Whether the `proto` peer at `peer`, which reached this daemon at `local`, may
    /// announce, and which flows.
    pub fn authorize(
        &mut self,
        proto: Protocol,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Scope, String> {
        let owner = self
            .owners
            .owner(proto, peer, local)
            .map_err(|e| format!("cannot identify the sender's socket (sock_diag: {e})"))?;
        let Some(uid) = owner else {
            if is_local(peer.ip()) {
                // A local sender whose socket is gone (or in another namespace
                // using a local address): nobody to check, so nobody to trust.
                return Err("sender is local but its socket is not found".into());
            }
            return Ok(Scope::AnyFlow);
        };
        if uid == 0 {
            return Ok(Scope::AnyFlow);
        }
        if self.groups.len() > 4096 {
            self.groups.clear();
        }
        let gids = self.groups.entry(uid).or_insert_with(|| groups_of(uid));
        self.rule.judge(uid, gids)
    }
}

/// The primary and supplementary groups of `uid` (none if it has no passwd entry).
fn groups_of(uid: u32) -> Vec<u32> {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return vec![user.gid.as_raw()];
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .unwrap_or_else(|_| vec![user.gid])
        .into_iter()
        .map(Gid::as_raw)
        .collect()
}

/// Loopback, or an address of one of this host's interfaces.
fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.address.is_some_and(|s| {
                s.as_sockaddr_in().map(|v4| IpAddr::from(v4.ip())) == Some(ip)
                    || s.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())) == Some(ip)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_names_any_flow_listed_users_and_groups_their_own_others_none() {
        let rule = AuthRule::new(&["1000".into()], &["2000".into()]).unwrap();
        assert_eq!(rule.judge(0, &[]), Ok(Scope::AnyFlow));
        assert_eq!(rule.judge(1000, &[1000]), Ok(Scope::OwnFlows(1000)));
        assert_eq!(rule.judge(1001, &[1001, 2000]), Ok(Scope::OwnFlows(1001)));
        let e = rule.judge(65534, &[65534]).unwrap_err();
        assert!(e.contains("uid 65534") && e.contains("allow_users"), "{e}");
        let e = AuthRule::new(&["no-such-user-x".into()], &[]).unwrap_err();
        assert!(e.to_string().contains("announcements.allow_users"), "{e}");
        assert_eq!(Scope::OwnFlows(7).only_for_uid(), Some(7));
    }

    #[test]
    fn a_local_sender_is_judged_by_its_socket_and_a_vanished_one_refused() {
        let me = nix::unistd::geteuid().as_raw();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (local, peer) = (rx.local_addr().unwrap(), tx.local_addr().unwrap());
        let mut auth = Authenticator::new(AuthRule::new(&[me.to_string()], &[]).unwrap()).unwrap();
        let want = if me == 0 {
            Scope::AnyFlow
        } else {
            Scope::OwnFlows(me)
        };
        assert_eq!(auth.authorize(Protocol::Udp, peer, local), Ok(want));
        drop(tx);
        let e = auth.authorize(Protocol::Udp, peer, local).unwrap_err();
        assert!(e.contains("not found"), "{e}");
        // Not on this host: trusted by firefly_allow alone.
        assert_eq!(
            auth.authorize(Protocol::Udp, "[fd00:dead::1]:5000".parse().unwrap(), local),
            Ok(Scope::AnyFlow)
        );
    }
}
