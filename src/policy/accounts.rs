//! User and group name resolution, behind a trait so that tests and offline validation
//! (`flowd-rs check` on a build host) do not depend on the machine's accounts.

use std::collections::HashMap;

/// Resolves account names to ids at policy load time.
pub trait Accounts {
    fn uid_of(&self, name: &str) -> Option<u32>;
    fn gid_of(&self, name: &str) -> Option<u32>;
}

/// The host's accounts through NSS (`getpwnam_r`/`getgrnam_r`), so that LDAP or SSSD
/// accounts common on storage nodes resolve like local ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn uid_of(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn gid_of(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// A fixed table of accounts.
#[derive(Debug, Clone, Default)]
pub struct StaticAccounts {
    pub users: HashMap<String, u32>,
    pub groups: HashMap<String, u32>,
}

impl StaticAccounts {
    pub fn new(users: &[(&str, u32)], groups: &[(&str, u32)]) -> Self {
        StaticAccounts {
            users: users.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
            groups: groups.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
        }
    }
}

impl Accounts for StaticAccounts {
    fn uid_of(&self, name: &str) -> Option<u32> {
        self.users.get(name).copied()
    }
    fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.get(name).copied()
    }
}

/// For checking policies on a machine that lacks the accounts they name (a CI job
/// of a policy repository): names the host knows resolve as usual, unknown names get
/// a synthetic id from the top of the id space, the same for the same name, so
/// overlap and conflict checks still work.
#[derive(Debug, Default)]
pub struct OfflineAccounts {
    synthetic: std::sync::Mutex<HashMap<String, u32>>,
}

impl OfflineAccounts {
    fn synthetic(&self, kind: &str, name: &str) -> u32 {
        let mut m = self.synthetic.lock().unwrap();
        let next = u32::MAX - 1 - m.len() as u32;
        *m.entry(format!("{kind}:{name}")).or_insert(next)
    }
}

impl Accounts for OfflineAccounts {
    fn uid_of(&self, name: &str) -> Option<u32> {
        SystemAccounts
            .uid_of(name)
            .or_else(|| Some(self.synthetic("u", name)))
    }
    fn gid_of(&self, name: &str) -> Option<u32> {
        SystemAccounts
            .gid_of(name)
            .or_else(|| Some(self.synthetic("g", name)))
    }
}
