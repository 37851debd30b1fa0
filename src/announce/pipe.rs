//! The named-pipe input of flowd and flowd-go: one flow event per line,
//! `start|end tcp|udp SRC_IP SRC_PORT DST_IP DST_PORT EXPERIMENT ACTIVITY`
//! (whitespace-separated, case-insensitive keywords; ids as the peers take them,
//! or registry names without spaces, e.g. `atlas data-consolidation`).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::model::announcement::{Announcement, Origin};
use crate::model::socket::{FlowKey, Protocol};
use crate::model::tag::Tag;
use crate::policy::Registry;

/// Longer lines are not flow events (the longest real one is under 120 bytes).
const MAX_LINE: usize = 512;

/// Parses one line; the error says what is wrong with it.
pub fn parse_line(line: &str, registry: &Registry) -> Result<Announcement, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [state, proto, src, sport, dst, dport, exp, act] = words[..] else {
        return Err(format!(
            "expected 8 fields (start|end tcp|udp SRC SPORT DST DPORT EXPERIMENT ACTIVITY), got {}",
            words.len()
        ));
    };
    let start = match state.to_ascii_lowercase().as_str() {
        "start" => true,
        "end" => false,
        s => return Err(format!("state {s:?}: start or end")),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        p => return Err(format!("protocol {p:?}: tcp or udp")),
    };
    let addr = |ip: &str, port: &str| -> Result<SocketAddr, String> {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port (1..=65535)"))?;
        Ok(SocketAddr::new(ip, port))
    };
    let (src, dst) = (addr(src, sport)?, addr(dst, dport)?);
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!("{src} and {dst} are of different address families"));
    }
    let tag = if start {
        Some(tag(exp, act, registry)?)
    } else {
        None
    };
    Ok(Announcement {
        key: FlowKey::new(proto, src, dst),
        tag,
        origin: Origin::Pipe,
        only_for_uid: None,
    })
}

/// Ids, or names the registry knows.
fn tag(exp: &str, act: &str, registry: &Registry) -> Result<Tag, String> {
    let experiment = match exp.parse::<u16>() {
        Ok(id) => id,
        Err(_) => registry.experiment(exp).map_err(|e| e.to_string())?.id,
    };
    let activity = match act.parse::<u8>() {
        Ok(id) => id,
        Err(_) => {
            registry
                .activity(experiment, act)
                .map_err(|e| e.to_string())?
                .id
        }
    };
    Tag::new(experiment, activity).map_err(|e| e.to_string())
}

/// The FIFO, created at start (mode 0620: root writes, and the control group when
/// configured) and removed at exit.
pub struct Pipe {
    path: PathBuf,
}

impl Pipe {
    /// Creates the FIFO at `path`; an existing FIFO (a crashed instance's) is reused,
    /// anything else there is an error.
    pub fn create(path: &Path, group: Option<&str>) -> Result<Pipe> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_fifo() => {}
            Ok(_) => bail!(
                "announcements.pipe {}: exists and is not a named pipe; remove it or choose another path",
                path.display()
            ),
            Err(_) => nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o620))
                .with_context(|| format!("announcements.pipe {}: cannot create", path.display()))?,
        }
        crate::endpoint::restrict_to_group(path, 0o620, group)
            .with_context(|| format!("announcements.pipe {}", path.display()))?;
        Ok(Pipe {
            path: path.to_path_buf(),
        })
    }

    /// Reads lines until the command channel closes. Opened read-write, so the
    /// pipe never reports end-of-file when a writer closes it.
    pub fn spawn(
        &self,
        registry: Registry,
        announced: mpsc::Sender<Announcement>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let receiver = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&self.path)
            .with_context(|| format!("announcements.pipe {}: cannot open", self.path.display()))?;
        let path = self.path.clone();
        info!(pipe = %path.display(), "announcements: reading flow events from the named pipe");
        Ok(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(receiver);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut lines)
                    .take(MAX_LINE as u64 + 1)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        warn!(pipe = %path.display(), error = %e, "announcements: reading the named pipe failed; no more pipe events");
                        break;
                    }
                }
                if buf.len() > MAX_LINE && !buf.ends_with(b"\n") {
                    warn!(pipe = %path.display(), "announcements: line over {MAX_LINE} bytes ignored");
                    // Skip to the end of that line, a bounded piece at a time.
                    loop {
                        buf.clear();
                        match (&mut lines)
                            .take(MAX_LINE as u64)
                            .read_until(b'\n', &mut buf)
                            .await
                        {
                            Ok(n) if n > 0 && !buf.ends_with(b"\n") => continue,
                            _ => break,
                        }
                    }
                    continue;
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match parse_line(line, &registry) {
                    Ok(a) => {
                        if announced.send(a).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(pipe = %path.display(), line, error = %e, "announcements: line ignored")
                    }
                }
            }
        }))
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Announcement, String> {
        parse_line(line, &Registry::bundled())
    }

    #[test]
    fn the_peers_lines_parse_in_either_family_and_case() {
        let a = parse("start tcp 192.168.0.1 2345 127.0.0.1 5777 1 2").unwrap();
        assert_eq!(a.key.local(), "192.168.0.1:2345".parse().unwrap());
        assert_eq!(a.key.remote(), "127.0.0.1:5777".parse().unwrap());
        assert_eq!(a.tag, Some(Tag::new(1, 2).unwrap()));
        assert_eq!(a.origin, Origin::Pipe);
        // flowd-go's own example pads with spaces.
        let a = parse("END  TCP          ::1 2345       ::1 5777 1 2").unwrap();
        assert_eq!(a.tag, None);
        assert_eq!(a.key.proto, Protocol::Tcp);
        assert!(a.key.is_ipv6());
        let a =
            parse("start udp 2001:db8::1 1094 2001:db8::2 40000 atlas data-consolidation").unwrap();
        assert_eq!(a.tag, Some(Tag::new(2, 4).unwrap()));
        assert_eq!(a.key.proto, Protocol::Udp);
    }

    #[test]
    fn a_bad_line_says_which_field_is_wrong() {
        for (line, want) in [
            ("start tcp 10.0.0.1 1 10.0.0.2 2 2", "expected 8 fields"),
            ("begin tcp 10.0.0.1 1 10.0.0.2 2 2 4", "state \"begin\""),
            ("start sctp 10.0.0.1 1 10.0.0.2 2 2 4", "protocol \"sctp\""),
            (
                "start tcp 10.0.0.300 1 10.0.0.2 2 2 4",
                "\"10.0.0.300\" is not an IP",
            ),
            ("start tcp 10.0.0.1 0 10.0.0.2 2 2 4", "\"0\" is not a port"),
            (
                "start tcp 10.0.0.1 1 ::2 2 2 4",
                "different address families",
            ),
            ("start tcp 10.0.0.1 1 10.0.0.2 2 600 4", "experiment id 600"),
            (
                "start tcp 10.0.0.1 1 10.0.0.2 2 atlsa 4",
                "unknown experiment \"atlsa\"",
            ),
            (
                "start tcp 10.0.0.1 1 10.0.0.2 2 2 nosuch",
                "unknown activity \"nosuch\"",
            ),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        // An end needs no valid tag: the peers write the start's fields again.
        assert!(parse("end tcp 10.0.0.1 1 10.0.0.2 2 0 0").is_ok());
    }
}
