//! The reconcile's full dump of the daemon's network namespace, from the source the
//! configuration (`discovery.dump_source`) and the kernel allow: the BPF socket
//! iterator ([`SockIter`], several times cheaper) or sock_diag ([`SockDiag`]).
//!
//! sock_diag stays open either way: when an iterator walk fails (read error, a
//! record it cannot name, a socket without a cookie on Linux < 5.12) the same dump
//! is made again with sock_diag, so a failed walk never ends a flow and never costs
//! a reconcile round. The parts the failed walk emitted were live sockets; the flow
//! table takes them twice without harm (a dump stamps a flow once per generation).

use tracing::{info, warn};

use super::sockdiag::{PollerStats, SockDiag, SockDiagError};
use super::sockiter::{SockIter, SockIterError};
use super::walk_digest::WalkDigest;
use crate::config::DumpSourceSetting;
use crate::features::{Feature, KernelFeatures};
use crate::model::socket::SocketObservation;

/// Which source made a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpSource {
    Iterator,
    SockDiag,
}

impl DumpSource {
    /// As `flowd-rs status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            DumpSource::Iterator => "bpf_iterator",
            DumpSource::SockDiag => "sock_diag",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FullDumpError {
    #[error("opening the sock_diag netlink socket: {0}")]
    SockDiag(#[source] SockDiagError),
    #[error("discovery.dump_source = \"iterator\": {0}")]
    Iterator(#[source] SockIterError),
}

pub struct FullDump {
    iter: Option<SockIter>,
    sock_diag: SockDiag,
    last: DumpSource,
    /// Iterator walks that failed and were made again with sock_diag.
    fallbacks: u64,
}

impl FullDump {
    /// Opens the sources `setting` asks for, in the calling thread's namespace.
    /// `auto` takes the iterator when its programs load and the kernel can give a
    /// socket its cookie from one (Linux 5.12): before, every socket nothing asked a
    /// cookie of (accepted ones, until a sock_diag dump) would make the walk fail.
    pub fn open(setting: DumpSourceSetting) -> Result<Self, FullDumpError> {
        let sock_diag = SockDiag::new().map_err(FullDumpError::SockDiag)?;
        let iter = match setting {
            DumpSourceSetting::SockDiag => None,
            DumpSourceSetting::Iterator => Some(SockIter::new().map_err(FullDumpError::Iterator)?),
            DumpSourceSetting::Auto if !KernelFeatures::detect().has(Feature::TracingCookie) => {
                info!(
                    "full dumps: sock_diag (the socket iterator needs {}, Linux {})",
                    Feature::TracingCookie.name(),
                    Feature::TracingCookie.since()
                );
                None
            }
            DumpSourceSetting::Auto => match SockIter::new() {
                Ok(it) => Some(it),
                Err(e) => {
                    warn!(error = %e, "full dumps: sock_diag (the socket iterator did not load)");
                    None
                }
            },
        };
        let last = if iter.is_some() {
            info!("full dumps: BPF socket iterator (sock_diag when a walk fails)");
            DumpSource::Iterator
        } else {
            if setting == DumpSourceSetting::SockDiag {
                info!("full dumps: sock_diag (discovery.dump_source)");
            }
            DumpSource::SockDiag
        };
        Ok(FullDump {
            iter,
            sock_diag,
            last,
            fallbacks: 0,
        })
    }

    pub fn netns(&self) -> u64 {
        self.sock_diag.netns()
    }

    /// The source of the last dump (before the first: the one it will use).
    pub fn source(&self) -> DumpSource {
        self.last
    }

    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    pub fn set_tcp_info(&mut self, on: bool) {
        if let Some(it) = &mut self.iter {
            it.set_tcp_info(on);
        }
        self.sock_diag.set_tcp_info(on);
    }

    /// Whether [`FullDump::verify`] can walk (the socket iterator is in use).
    pub fn can_verify(&self) -> bool {
        self.iter.is_some()
    }

    pub fn digest_seed(&self) -> u64 {
        self.iter.as_ref().map_or(0, SockIter::digest_seed)
    }

    /// A verify walk ([`SockIter::verify`]). A failure costs nothing but the
    /// full dump the daemon then asks for.
    pub fn verify(&mut self) -> Result<WalkDigest, SockIterError> {
        match &mut self.iter {
            Some(it) => it.verify(),
            None => Err(SockIterError::NoDigest),
        }
    }

    /// The statistics of the source that made the last dump.
    pub fn stats(&self) -> &PollerStats {
        match (&self.iter, self.last) {
            (Some(it), DumpSource::Iterator) => it.stats(),
            _ => self.sock_diag.stats(),
        }
    }

    /// As `SockDiag::dump_chunked`, from the iterator if there is one, else (or
    /// when its walk fails) from sock_diag.
    pub fn dump_chunked(
        &mut self,
        chunk: usize,
        emit: &mut dyn FnMut(&mut Vec<SocketObservation>),
    ) -> Result<(), SockDiagError> {
        if let Some(it) = &mut self.iter {
            match it.dump_chunked(chunk, emit) {
                Ok(()) => {
                    self.last = DumpSource::Iterator;
                    return Ok(());
                }
                Err(e) => {
                    self.fallbacks += 1;
                    warn!(error = %e, fallbacks = self.fallbacks, "socket iterator dump failed: dumping with sock_diag instead");
                }
            }
        }
        self.last = DumpSource::SockDiag;
        self.sock_diag.dump_chunked(chunk, emit)
    }
}
