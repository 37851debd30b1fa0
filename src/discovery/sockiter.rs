//! The socket-iterator dump: every TCP and UDP socket of one network namespace from
//! the kernel's `iter/tcp` and `iter/udp` BPF iterators (bpf/sockiter.bpf.c), as
//! the same [`SocketObservation`]s a sock_diag dump gives (same cookies, uids,
//! inodes, states, directions).
//!
//! Why: a sock_diag dump spends most of its time building and parsing one netlink
//! message per socket. Here each socket is one fixed 112-byte record, read in
//! 32 KiB batches (the iterator's seq_file buffer), no per-socket syscall.
//!
//! Network namespace: the kernel walks the namespace of the thread that creates
//! the iterator's file (`bpf_iter_create`), whoever reads it later. For a namespace
//! given by path, a short-lived thread enters it and creates the two files.
//!
//! As with sock_diag, a dump that may be partial (read error mid-walk, a record the
//! reader cannot name, a socket without a cookie) is an error, never a shorter list;
//! the caller then dumps with sock_diag (see `full_dump`).

mod reader;
mod record;

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, OpenObject};

pub use record::{RecordError, RECORD_SIZE};

use super::sockdiag::{netns_inode, take_socket, Listeners, PollerStats, SockDiagError};
use super::walk_digest::{self, WalkDigest};
use crate::bpf::sockiter::{SockiterSkel, SockiterSkelBuilder};
use crate::model::socket::{Protocol, SocketObservation};

/// Read buffer: the kernel hands out at most one seq_file buffer (8 pages) per
/// read(); twice that leaves room for a kernel that raises it.
const READ_BUF_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SockIterError {
    #[error("socket iterator: cannot load bpf/sockiter.bpf.c{refusal}: {source}")]
    Load {
        refusal: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("socket iterator {program}: cannot attach: {source}")]
    Attach {
        program: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("socket iterator: {0}")]
    Netns(#[source] SockDiagError),
    #[error("socket iterator {iter}: cannot open it in network namespace {netns}: {source}")]
    Create {
        iter: &'static str,
        netns: u64,
        #[source]
        source: io::Error,
    },
    #[error("socket iterator {iter}: read failed after {bytes} bytes: {source}; dump incomplete")]
    Read {
        iter: &'static str,
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("socket iterator {iter}: the walk ended inside a record ({left} bytes left); dump incomplete")]
    Truncated { iter: &'static str, left: usize },
    #[error("socket iterator: the programs' globals are not mapped, so no verify walk")]
    NoDigest,
    #[error("socket iterator {iter}: {source}; dump incomplete")]
    Record {
        iter: &'static str,
        #[source]
        source: RecordError,
    },
}

/// Receives the parts of a dump (as `SockDiag::dump_chunked`).
type Emit<'a> = &'a mut dyn FnMut(&mut Vec<SocketObservation>);

/// The loaded iterator programs, their links, and the buffers reused across dumps.
pub struct SockIter {
    /// Owns the programs the links run; dropped after them (field order).
    tcp: Link,
    udp: Link,
    skel: SockiterSkel<'static>,
    netns_path: Option<PathBuf>,
    netns: u64,
    buf: Vec<u8>,
    /// Every listener, and those of AF_INET TCP sockets alone: sock_diag dumps tcp4
    /// before tcp6 and classifies each family's connections when its part ends, so
    /// an AF_INET connection is judged by AF_INET listeners only. The same here, so
    /// both sources give a socket the same direction.
    listeners: Listeners,
    listeners_tcp4: Listeners,
    pending_tcp4: Vec<SocketObservation>,
    pending_tcp6: Vec<SocketObservation>,
    pending_udp: Vec<SocketObservation>,
    tcp_info: bool,
    /// For the verify walk's digests ([`SockIter::verify`]), drawn once.
    digest_seed: u64,
    /// Progress records the last verify walk read.
    verify_progress: usize,
    stats: PollerStats,
}

/// Which pending part a socket goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Tcp4,
    Tcp6,
    Udp,
}

impl SockIter {
    /// Loads and attaches the iterators; dumps the calling thread's namespace.
    pub fn new() -> Result<Self, SockIterError> {
        let netns =
            netns_inode(Path::new("/proc/thread-self/ns/net")).map_err(SockIterError::Netns)?;
        Self::load(None, netns)
    }

    /// Dumps the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn in_netns(path: impl AsRef<Path>) -> Result<Self, SockIterError> {
        let path = path.as_ref().to_path_buf();
        let netns = netns_inode(&path).map_err(SockIterError::Netns)?;
        Self::load(Some(path), netns)
    }

    fn load(netns_path: Option<PathBuf>, netns: u64) -> Result<Self, SockIterError> {
        use crate::features::{Feature, KernelFeatures};
        // One leaked pointer-sized slot per load, as for the tracker
        // (tracker_progs.rs): the skeleton borrows it for its whole life.
        let slot: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let load_error = |source| SockIterError::Load {
            refusal: crate::bpf::refusal()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            source,
        };
        crate::bpf::clear_refusals();
        let mut open = SockiterSkelBuilder::default()
            .open(slot)
            .map_err(load_error)?;
        if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
            ro.flowd_tracing_cookie =
                u32::from(KernelFeatures::detect().has(Feature::TracingCookie));
        }
        let skel = open.load().map_err(load_error)?;
        let attach = |program: &'static str, r: libbpf_rs::Result<Link>| {
            r.map_err(|source| SockIterError::Attach { program, source })
        };
        let tcp = attach("flowd_iter_tcp", skel.progs.flowd_iter_tcp.attach())?;
        let udp = attach("flowd_iter_udp", skel.progs.flowd_iter_udp.attach())?;
        Ok(SockIter {
            tcp,
            udp,
            skel,
            netns_path,
            netns,
            buf: vec![0; READ_BUF_BYTES],
            listeners: Listeners::default(),
            listeners_tcp4: Listeners::default(),
            pending_tcp4: Vec::new(),
            pending_tcp6: Vec::new(),
            pending_udp: Vec::new(),
            tcp_info: true,
            digest_seed: rand::random::<u64>(),
            verify_progress: 0,
            stats: PollerStats::default(),
        })
    }

    /// Inode of the network namespace this source dumps.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    /// Fill `tcp` (default on), as `SockDiag::set_tcp_info`. Off, the programs
    /// skip the tcp_sock's counters (cache lines a walk otherwise need not touch).
    pub fn set_tcp_info(&mut self, on: bool) {
        // Without a writable .data map (no mmap), the programs keep reading them.
        if let Some(data) = self.skel.maps.data_data.as_deref_mut() {
            data.flowd_tcp_info = u32::from(on);
        }
        self.tcp_info = on;
    }

    pub fn stats(&self) -> &PollerStats {
        &self.stats
    }

    /// Makes [`SockIter::verify`] write a progress record every `every` sockets
    /// (a power of two; 2^19 by default) instead: for tests of the reader.
    pub fn set_digest_progress_every(&mut self, every: u64) {
        assert!(every.is_power_of_two(), "{every}");
        if let Some(data) = self.skel.maps.data_data.as_deref_mut() {
            data.flowd_digest_progress_mask = every - 1;
        }
    }

    /// The seed of [`SockIter::verify`]'s digests.
    pub fn digest_seed(&self) -> u64 {
        self.digest_seed
    }

    /// The verify walk: the namespace's connections folded into a [`WalkDigest`]
    /// by the programs, no record read. Costs the kernel's walk alone.
    pub fn verify(&mut self) -> Result<WalkDigest, SockIterError> {
        let started = Instant::now();
        let seed = self.digest_seed;
        let Some(bss) = self.skel.maps.bss_data.as_deref_mut() else {
            return Err(SockIterError::NoDigest);
        };
        bss.flowd_digest_seed = seed;
        bss.flowd_digest_visited = 0;
        for p in bss.flowd_digest.iter_mut() {
            p.count = 0;
            p.sum = 0;
        }
        bss.flowd_walk_digest = 1;
        let result = self.verify_walks();
        let bss = self
            .skel
            .maps
            .bss_data
            .as_deref_mut()
            .expect("checked above");
        bss.flowd_walk_digest = 0;
        result?;
        let mut digest = WalkDigest::new(seed);
        for (out, p) in digest.parts.iter_mut().zip(bss.flowd_digest.iter()) {
            *out = walk_digest::Part {
                count: p.count,
                sum: p.sum,
            };
        }
        tracing::debug!(
            netns = self.netns,
            connections = digest.connections(),
            duration_us = started.elapsed().as_micros() as u64,
            "socket iterator verify walk complete"
        );
        Ok(digest)
    }

    fn verify_walks(&mut self) -> Result<(), SockIterError> {
        let (tcp, udp) = self.create_iters()?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut tally = reader::ReadTally::default();
        let mut result = Ok(());
        for (fd, iter) in [(tcp, "tcp"), (udp, "udp")] {
            // A digest walk writes nothing but all-zero progress records; another
            // would be a program that ignored the mode.
            result = reader::read_records(fd.as_fd(), &mut buf, iter, &mut tally, &mut |b| {
                if b.iter().all(|&x| x == 0) {
                    return Ok(());
                }
                Err(SockIterError::Record {
                    iter,
                    source: RecordError::Unexpected,
                })
            });
            if result.is_err() {
                break;
            }
        }
        self.buf = buf;
        self.verify_progress = tally.bytes / RECORD_SIZE;
        result
    }

    /// Progress records the last verify walk read.
    pub fn verify_progress_records(&self) -> usize {
        self.verify_progress
    }

    /// Dump every TCP and connected UDP socket into `out` (cleared first), as
    /// `SockDiag::dump`.
    pub fn dump(&mut self, out: &mut Vec<SocketObservation>) -> Result<(), SockIterError> {
        out.clear();
        self.dump_chunked(usize::MAX, &mut |part| out.append(part))
    }

    /// Dump as `SockDiag::dump_chunked`: parts of about `chunk` sockets, TCP ones
    /// as soon as they are full (the kernel walks every listener before the
    /// connections), UDP ones at the end. On error, the parts already emitted are
    /// real sockets, but the dump is incomplete.
    pub fn dump_chunked(&mut self, chunk: usize, emit: Emit<'_>) -> Result<(), SockIterError> {
        let started = Instant::now();
        self.listeners.clear();
        self.listeners_tcp4.clear();
        self.pending_tcp4.clear();
        self.pending_tcp6.clear();
        self.pending_udp.clear();
        self.stats.dump_started();
        let result = self.dump_all(chunk.max(1), emit);
        self.stats.dump_ended(started, result.is_ok());
        if let Err(e) = &result {
            tracing::debug!(netns = self.netns, error = %e, "socket iterator dump failed");
            return result;
        }
        tracing::debug!(
            netns = self.netns,
            sockets = self.stats.last_dump_sockets,
            duration_us = self.stats.last_dump_duration.as_micros() as u64,
            "socket iterator dump complete"
        );
        Ok(())
    }

    fn dump_all(&mut self, chunk: usize, emit: Emit<'_>) -> Result<(), SockIterError> {
        let (tcp, udp) = self.create_iters()?;
        self.walk(tcp, "tcp", chunk, emit)?;
        self.flush(Part::Tcp4, emit);
        self.flush(Part::Tcp6, emit);
        self.walk(udp, "udp", chunk, emit)?;
        self.flush(Part::Udp, emit);
        Ok(())
    }

    /// One iterator file per walk (a walk reads one to its end), created in the
    /// namespace to dump.
    fn create_iters(&self) -> Result<(OwnedFd, OwnedFd), SockIterError> {
        let links = (self.tcp.as_fd().as_raw_fd(), self.udp.as_fd().as_raw_fd());
        let netns = self.netns;
        let create = move || -> Result<(OwnedFd, OwnedFd), SockIterError> {
            Ok((
                create_iter(links.0, "tcp", netns)?,
                create_iter(links.1, "udp", netns)?,
            ))
        };
        let Some(path) = &self.netns_path else {
            return create();
        };
        let file = std::fs::File::open(path).map_err(|source| {
            SockIterError::Netns(SockDiagError::Netns {
                path: path.clone(),
                source,
            })
        })?;
        // setns affects only the calling thread: do it in a throwaway one.
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    SockIterError::Netns(SockDiagError::Netns {
                        path: path.clone(),
                        source: io::Error::from(e),
                    })
                })?;
                create()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(SockIterError::Create {
                    iter: "tcp",
                    netns,
                    source: io::Error::other("netns helper thread panicked"),
                })
            })
        })
    }

    /// Reads one iterator to its end, classifying each record.
    fn walk(
        &mut self,
        fd: OwnedFd,
        iter: &'static str,
        chunk: usize,
        emit: Emit<'_>,
    ) -> Result<(), SockIterError> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut tally = reader::ReadTally::default();
        let result = reader::read_records(fd.as_fd(), &mut buf, iter, &mut tally, &mut |batch| {
            for bytes in batch.chunks_exact(RECORD_SIZE) {
                self.take(&record::read(bytes), iter)?;
            }
            for part in [Part::Tcp4, Part::Tcp6] {
                if self.pending(part).len() >= chunk {
                    self.flush(part, emit);
                }
            }
            Ok(())
        });
        self.buf = buf;
        self.stats.last_dump_io += tally.io;
        self.stats.last_dump_bytes += tally.bytes;
        self.stats.last_dump_recvs += tally.reads;
        self.stats.eintr_retries += tally.eintr;
        result
    }

    fn take(&mut self, raw: &record::RawRecord, iter: &'static str) -> Result<(), SockIterError> {
        let facts = record::decode(raw, self.tcp_info)
            .map_err(|source| SockIterError::Record { iter, source })?;
        self.stats.parse.messages += 1;
        let ipv4 =
            u32::from(raw.family) == crate::bpf::sockiter::types::flowd_family::FLOWD_AF_INET.0;
        let part = match facts.proto {
            Protocol::Tcp if ipv4 => Part::Tcp4,
            Protocol::Tcp => Part::Tcp6,
            Protocol::Udp => Part::Udp,
        };
        if part == Part::Tcp4 && facts.state == crate::model::socket::SockState::Listen as u8 {
            self.listeners_tcp4.insert(Protocol::Tcp, facts.local);
        }
        let out = match part {
            Part::Tcp4 => &mut self.pending_tcp4,
            Part::Tcp6 => &mut self.pending_tcp6,
            Part::Udp => &mut self.pending_udp,
        };
        // decode() checked the state, which is all take_socket can refuse.
        take_socket(
            &facts,
            self.netns,
            out,
            &mut self.listeners,
            &mut self.stats.parse,
        )
        .ok_or(SockIterError::Record {
            iter,
            source: RecordError::State(facts.state),
        })
    }

    fn pending(&self, part: Part) -> &Vec<SocketObservation> {
        match part {
            Part::Tcp4 => &self.pending_tcp4,
            Part::Tcp6 => &self.pending_tcp6,
            Part::Udp => &self.pending_udp,
        }
    }

    /// Hands out the pending observations of `part`, their direction set.
    fn flush(&mut self, part: Part, emit: Emit<'_>) {
        let (obs, listeners) = match part {
            Part::Tcp4 => (&mut self.pending_tcp4, &self.listeners_tcp4),
            Part::Tcp6 => (&mut self.pending_tcp6, &self.listeners),
            Part::Udp => (&mut self.pending_udp, &self.listeners),
        };
        if obs.is_empty() {
            return;
        }
        for o in obs.iter_mut() {
            o.direction = listeners.direction(&o.key);
        }
        self.stats.last_dump_sockets += obs.len();
        emit(obs);
        obs.clear();
    }
}

/// `bpf_iter_create`: a file whose reads run the iterator link's program over the
/// sockets of the calling thread's network namespace.
fn create_iter(link: RawFd, iter: &'static str, netns: u64) -> Result<OwnedFd, SockIterError> {
    // SAFETY: plain syscall wrapper on a link fd we own (borrowed for the call).
    let fd = unsafe { libbpf_sys::bpf_iter_create(link) };
    if fd < 0 {
        return Err(SockIterError::Create {
            iter,
            netns,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh fd the kernel just gave us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
