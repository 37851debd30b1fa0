//! Socket inode -> owning process, the way `ss -p` finds it: walk `/proc/*/fd` and read
//! the `socket:[INODE]` links. Done lazily, only for the inodes asked about (a flow that
//! policy needs to attribute), with one walk for a whole batch, and cached.
//!
//! Processes come and go during a walk; every per-process failure (ENOENT, ESRCH) is
//! skipped, never an error. A refusal (EACCES, EPERM: the daemon lacks
//! CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH for another user's process) is skipped too,
//! but counted per [`Fact`], so the engine can say which rules cannot see it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::facts::{OwnerFacts, ProcessInfo};

/// What the daemon reads of a socket's owner that the kernel may refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fact {
    /// The process's fd table (/proc/PID/fd): which process holds a socket at all.
    Owner,
    /// /proc/PID/exe.
    Exe,
    /// /proc/PID/cgroup.
    Cgroup,
}

impl Fact {
    pub const ALL: [Fact; 3] = [Fact::Owner, Fact::Exe, Fact::Cgroup];

    pub fn name(self) -> &'static str {
        match self {
            Fact::Owner => "owner",
            Fact::Exe => "exe",
            Fact::Cgroup => "cgroup",
        }
    }
}

fn refused(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM)
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot list {path}: {source}")]
    ListProc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolverStats {
    pub scans: u64,
    pub hits: u64,
    pub misses: u64,
    pub vanished: u64,
    pub evictions: u64,
    /// Reads refused (EACCES/EPERM), per fact: sockets whose owner was not found
    /// while some process's fd table was refused (owner); executables; cgroups.
    pub denied_owner: u64,
    pub denied_exe: u64,
    pub denied_cgroup: u64,
}

impl ResolverStats {
    pub fn denied(&self, fact: Fact) -> u64 {
        match fact {
            Fact::Owner => self.denied_owner,
            Fact::Exe => self.denied_exe,
            Fact::Cgroup => self.denied_cgroup,
        }
    }
}

#[derive(Debug)]
struct Cached {
    info: Option<Arc<ProcessInfo>>,
    at: Instant,
}

/// Bounded cache of inode -> process. Negative answers (no process holds the inode: a
/// TIME_WAIT remnant, a socket held only by the kernel) expire after `negative_ttl`.
#[derive(Debug)]
pub struct ProcResolver {
    root: PathBuf,
    capacity: usize,
    negative_ttl: Duration,
    cache: HashMap<u64, Cached>,
    /// Insertion order, for FIFO eviction. May hold inodes already forgotten.
    order: VecDeque<u64>,
    stats: ResolverStats,
}

impl ProcResolver {
    pub fn new(capacity: usize) -> Self {
        Self::with_root("/proc", capacity)
    }

    /// For tests: a directory laid out like /proc.
    pub fn with_root(root: impl Into<PathBuf>, capacity: usize) -> Self {
        ProcResolver {
            root: root.into(),
            capacity: capacity.max(1),
            negative_ttl: Duration::from_secs(10),
            cache: HashMap::new(),
            order: VecDeque::new(),
            stats: ResolverStats::default(),
        }
    }

    pub fn stats(&self) -> ResolverStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Drop an inode (its flow ended).
    pub fn forget(&mut self, inode: u64) {
        self.cache.remove(&inode);
    }

    /// The process holding `inode`, scanning /proc if it is not cached.
    pub fn lookup(&mut self, inode: u64) -> Result<Option<Arc<ProcessInfo>>, ProcError> {
        self.resolve([inode])?;
        Ok(self.cache.get(&inode).and_then(|c| c.info.clone()))
    }

    /// Make sure every inode in `inodes` is cached, with at most one /proc walk.
    /// Inode 0 (TIME_WAIT, request sockets) is never looked up.
    pub fn resolve(&mut self, inodes: impl IntoIterator<Item = u64>) -> Result<(), ProcError> {
        let now = Instant::now();
        let ttl = self.negative_ttl;
        let mut wanted = HashSet::new();
        for inode in inodes {
            if inode == 0 {
                continue;
            }
            match self.cache.get(&inode) {
                Some(c) if c.info.is_some() || now.duration_since(c.at) < ttl => {
                    self.stats.hits += 1;
                }
                _ => {
                    self.stats.misses += 1;
                    wanted.insert(inode);
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let found = self.scan(&wanted)?;
        for inode in wanted {
            let info = found.get(&inode).cloned();
            self.insert(inode, Cached { info, at: now });
        }
        Ok(())
    }

    fn insert(&mut self, inode: u64, c: Cached) {
        if self.cache.insert(inode, c).is_none() {
            self.order.push_back(inode);
        }
        while self.cache.len() > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.cache.remove(&old).is_some() {
                self.stats.evictions += 1;
            }
        }
        // Forgotten inodes leave stale order entries; compact when they dominate.
        if self.order.len() > 2 * self.capacity {
            let cache = &self.cache;
            self.order.retain(|i| cache.contains_key(i));
        }
    }

    /// One walk of /proc/*/fd for the wanted inodes.
    fn scan(&mut self, wanted: &HashSet<u64>) -> Result<HashMap<u64, Arc<ProcessInfo>>, ProcError> {
        self.stats.scans += 1;
        let mut found = HashMap::new();
        // Some process's fd table could not be read: an inode not found may be its.
        let mut refused_any = false;
        let dir = fs::read_dir(&self.root).map_err(|source| ProcError::ListProc {
            path: self.root.clone(),
            source,
        })?;
        for ent in dir.flatten() {
            let name = ent.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let pid_dir = ent.path();
            let fds = match fs::read_dir(pid_dir.join("fd")) {
                Ok(fds) => fds,
                Err(e) if refused(&e) => {
                    refused_any = true;
                    continue;
                }
                Err(_) => {
                    self.stats.vanished += 1;
                    continue;
                }
            };
            let mut info: Option<Arc<ProcessInfo>> = None;
            for fd in fds.flatten() {
                let target = match fs::read_link(fd.path()) {
                    Ok(t) => t,
                    Err(e) if refused(&e) => {
                        // The directory listed, the links do not: no ptrace access.
                        refused_any = true;
                        break;
                    }
                    Err(_) => continue,
                };
                let Some(inode) = socket_inode(&target) else {
                    continue;
                };
                if !wanted.contains(&inode) || found.contains_key(&inode) {
                    continue;
                }
                let stats = &mut self.stats;
                let info = info
                    .get_or_insert_with(|| Arc::new(process_info(&pid_dir, pid, stats)))
                    .clone();
                found.insert(inode, info);
            }
            if found.len() == wanted.len() {
                break;
            }
        }
        if refused_any {
            // Owners not found while some fd table was refused: unknown, not absent.
            self.stats.denied_owner += (wanted.len() - found.len()) as u64;
        }
        tracing::debug!(
            wanted = wanted.len(),
            found = found.len(),
            "scanned /proc for socket owners"
        );
        Ok(found)
    }
}

/// `socket:[12345]` -> 12345.
pub fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn process_info(pid_dir: &Path, pid: u32, stats: &mut ResolverStats) -> ProcessInfo {
    let comm = fs::read_to_string(pid_dir.join("comm"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_default();
    // Kernel threads have no exe (ENOENT): only a refusal is counted.
    let exe = fs::read_link(pid_dir.join("exe"))
        .inspect_err(|e| stats.denied_exe += u64::from(refused(e)))
        .ok();
    let cgroup = fs::read_to_string(pid_dir.join("cgroup"))
        .inspect_err(|e| stats.denied_cgroup += u64::from(refused(e)))
        .ok()
        .and_then(|s| cgroup_v2_path(&s).map(str::to_owned));
    let gid = fs::read_to_string(pid_dir.join("status"))
        .ok()
        .and_then(|s| effective_gid(&s));
    ProcessInfo {
        pid,
        facts: OwnerFacts {
            gid,
            comm: Some(comm),
            exe,
            cgroup,
        },
    }
}

/// `Gid:\treal\teffective\tsaved\tfs` -> effective.
pub fn effective_gid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Gid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The unified-hierarchy line of /proc/PID/cgroup (`0::/path`); hybrid hosts also
/// list v1 controllers, which are ignored.
pub fn cgroup_v2_path(contents: &str) -> Option<&str> {
    contents.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("flowd-procfs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            FakeProc(p)
        }
        fn process(&self, pid: u32, comm: &str, sockets: &[u64]) {
            let d = self.0.join(pid.to_string());
            fs::create_dir_all(d.join("fd")).unwrap();
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(
                d.join("cgroup"),
                "1:name=systemd:/x\n0::/system.slice/xrootd.service\n",
            )
            .unwrap();
            symlink("/usr/bin/xrootd", d.join("exe")).unwrap();
            symlink("/dev/null", d.join("fd/0")).unwrap();
            for (i, s) in sockets.iter().enumerate() {
                symlink(format!("socket:[{s}]"), d.join(format!("fd/{}", i + 3))).unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolves_inodes_to_processes_in_one_scan() {
        let p = FakeProc::new("one-scan");
        p.process(100, "xrootd", &[555, 556]);
        p.process(200, "curl", &[777]);
        fs::create_dir_all(p.0.join("self")).unwrap(); // non-numeric entries are skipped
        let mut r = ProcResolver::with_root(&p.0, 100);
        r.resolve([555, 777, 999, 0]).unwrap();
        assert_eq!(r.stats().scans, 1);
        let a = r.lookup(555).unwrap().unwrap();
        assert_eq!((a.pid, a.facts.comm.as_deref()), (100, Some("xrootd")));
        assert_eq!(a.facts.exe.as_deref(), Some(Path::new("/usr/bin/xrootd")));
        assert_eq!(
            a.facts.cgroup.as_deref(),
            Some("/system.slice/xrootd.service")
        );
        assert_eq!(r.lookup(777).unwrap().unwrap().pid, 200);
        assert_eq!(r.lookup(999).unwrap(), None, "negative answer cached");
        assert_eq!(r.stats().scans, 1, "lookups after resolve hit the cache");
    }

    #[test]
    fn vanished_process_is_skipped() {
        let p = FakeProc::new("vanished");
        p.process(100, "a", &[1]);
        fs::create_dir_all(p.0.join("300")).unwrap(); // no fd dir: exited mid-scan
        let mut r = ProcResolver::with_root(&p.0, 10);
        assert_eq!(r.lookup(1).unwrap().unwrap().pid, 100);
    }

    #[test]
    fn cache_is_bounded() {
        let p = FakeProc::new("bounded");
        let socks: Vec<u64> = (1..=50).collect();
        p.process(100, "a", &socks);
        let mut r = ProcResolver::with_root(&p.0, 10);
        for s in &socks {
            r.lookup(*s).unwrap();
        }
        assert_eq!(r.len(), 10);
        assert_eq!(r.stats().evictions, 40);
        r.forget(50);
        assert_eq!(r.len(), 9);
    }

    #[test]
    fn missing_proc_root_is_an_error_naming_it() {
        let mut r = ProcResolver::with_root("/nonexistent-proc", 10);
        let e = r.lookup(1).unwrap_err().to_string();
        assert!(e.contains("/nonexistent-proc"), "{e}");
    }

    #[test]
    fn parses_socket_links_and_cgroup_lines() {
        assert_eq!(socket_inode(Path::new("socket:[42]")), Some(42));
        assert_eq!(socket_inode(Path::new("pipe:[42]")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
        assert_eq!(cgroup_v2_path("0::/user.slice\n"), Some("/user.slice"));
        assert_eq!(cgroup_v2_path("3:cpu:/a\n"), None);
        assert_eq!(
            effective_gid("Name:\tx\nGid:\t10\t20\t10\t10\nGroups:\n"),
            Some(20)
        );
        assert_eq!(effective_gid("Name:\tx\n"), None);
    }

    #[test]
    fn finds_own_socket_in_real_proc() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let link = fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
        let inode = socket_inode(&link).unwrap();
        let mut r = ProcResolver::new(16);
        let info = r.lookup(inode).unwrap().unwrap();
        assert_eq!(info.pid, std::process::id());
    }
}
