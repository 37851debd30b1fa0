//! The named-pipe input of flowd and flowd-go: one flow event per line,
//! `start|end tcp|udp SRC_IP SRC_PORT DST_IP DST_PORT EXPERIMENT ACTIVITY`
//! (whitespace-separated, case-insensitive keywords; ids as the peers take them,
//! or registry names without spaces, e.g. `atlas data-consolidation`).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
///
/// A line carries no credentials: whoever may open the FIFO for writing may name
/// any flow, so its group (`control.group`) decides who may announce through it.
/// That is why the daemon never adopts a file it did not create: a FIFO made first
/// by a user in a shared directory would keep that user's write access.
pub struct Pipe {
    path: PathBuf,
}

impl Pipe {
    /// Creates the FIFO at `path`. A FIFO this daemon's user left behind (a crashed
    /// instance's) is replaced; anything else there (a symlink, another user's
    /// file, a file of another type) is an error.
    pub fn create(path: &Path, group: Option<&str>) -> Result<Pipe> {
        let me = nix::unistd::geteuid().as_raw();
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_fifo() && m.uid() == me => std::fs::remove_file(path)
                .with_context(|| {
                    format!("announcements.pipe {}: cannot remove the stale FIFO", path.display())
                })?,
            Ok(m) => bail!(
                "announcements.pipe {}: exists ({}, owner uid {}); the daemon creates the FIFO itself \
                 and never adopts one it did not make: remove it or choose another path",
                path.display(),
                kind(&m),
                m.uid()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("announcements.pipe {}: {e}", path.display()),
        }
        // mkfifo fails if anything appeared at the path meanwhile.
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("announcements.pipe {}: cannot create", path.display()))?;
        let m = std::fs::symlink_metadata(path)
            .with_context(|| format!("announcements.pipe {}", path.display()))?;
        if !m.file_type().is_fifo() || m.uid() != me {
            bail!(
                "announcements.pipe {}: replaced while being created ({}, owner uid {})",
                path.display(),
                kind(&m),
                m.uid()
            );
        }
        crate::endpoint::restrict_to_group(path, 0o620, group)
            .with_context(|| format!("announcements.pipe {}", path.display()))?;
        Ok(Pipe {
            path: path.to_path_buf(),
        })
    }

    /// Reads lines until the command channel closes. The daemon holds no write end:
    /// when the last writer closes, the read ends, a line left without its newline
    /// is dropped (it must not be glued to the next writer's first line), and the
    /// FIFO is opened again for the next writer. Writers open at the same time
    /// share one stream; a line of up to PIPE_BUF bytes written at once is never
    /// interleaved with another's, and the fragment of one that closed inside a line
    /// is cut from the front of the next writer's line.
    pub fn spawn(
        &self,
        registry: Registry,
        announced: mpsc::Sender<Announcement>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let open = {
            let path = self.path.clone();
            move || {
                tokio::net::unix::pipe::OpenOptions::new()
                    .open_receiver(&path)
                    .with_context(|| format!("announcements.pipe {}: cannot open", path.display()))
            }
        };
        let first = open()?;
        let path = self.path.clone();
        info!(pipe = %path.display(), "announcements: reading flow events from the named pipe");
        Ok(tokio::spawn(async move {
            let mut receiver = Some(first);
            loop {
                let r = match receiver.take() {
                    Some(r) => r,
                    None => match open() {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "announcements: no more pipe events");
                            return;
                        }
                    },
                };
                if !read_session(r, &path, &registry, &announced).await {
                    return;
                }
            }
        }))
    }
}

/// Reads one writer session (until every writer has closed); false when the
/// engine is gone or the pipe failed.
async fn read_session(
    receiver: tokio::net::unix::pipe::Receiver,
    path: &Path,
    registry: &Registry,
    announced: &mpsc::Sender<Announcement>,
) -> bool {
    let mut lines = tokio::io::BufReader::new(receiver);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                warn!(pipe = %path.display(), error = %e, "announcements: reading the named pipe failed; no more pipe events");
                return false;
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
                    Ok(0) => return true,
                    _ => break,
                }
            }
            continue;
        }
        if !buf.ends_with(b"\n") {
            // End of file inside a line: its writer closed without finishing it.
            warn!(pipe = %path.display(), partial = %String::from_utf8_lossy(&buf), "announcements: a writer closed the pipe inside a line; partial line dropped");
            return true;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = parse_line(line, registry).or_else(|e| -> Result<Announcement, String> {
            let (fragment, a) = after_foreign_fragment(line, registry).ok_or(e)?;
            warn!(pipe = %path.display(), fragment, "announcements: another writer's unfinished line was glued in front of this one; fragment dropped");
            Ok(a)
        });
        match parsed {
            Ok(a) => {
                if announced.send(a).await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                warn!(pipe = %path.display(), line, error = %e, "announcements: line ignored")
            }
        }
    }
}

/// Writers whose sessions overlap share one stream, and a FIFO says nothing about
/// who wrote what: a writer that closed inside a line leaves its fragment in front of
/// the next line another writer sends. A line of up to PIPE_BUF bytes written at
/// once is never split, so the complete event is the line's tail from one of its
/// `start`/`end` keywords on; at most one such tail has the 8 fields of an event.
fn after_foreign_fragment<'a>(
    line: &'a str,
    registry: &Registry,
) -> Option<(&'a str, Announcement)> {
    // ASCII lowering keeps byte offsets, so they index `line` too.
    let lower = line.to_ascii_lowercase();
    lower
        .match_indices("start")
        .chain(lower.match_indices("end"))
        .filter(|(at, _)| *at > 0)
        .find_map(|(at, _)| Some((&line[..at], parse_line(&line[at..], registry).ok()?)))
}

fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
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

    #[test]
    fn the_fifo_is_made_by_the_daemon_and_never_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowd.pipe");
        // A symlink (to anything), a regular file: refused, and left alone.
        std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        let e = format!("{:#}", Pipe::create(&path, None).err().unwrap());
        assert!(
            e.contains("a symbolic link") && e.contains("never adopts"),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "").unwrap();
        let e = format!("{:#}", Pipe::create(&path, None).err().unwrap());
        assert!(e.contains("a regular file"), "{e}");
        std::fs::remove_file(&path).unwrap();
        // Another user's FIFO (made first in a shared directory): refused.
        if nix::unistd::geteuid().is_root() {
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = format!("{:#}", Pipe::create(&path, None).err().unwrap());
            assert!(e.contains("owner uid 65534"), "{e}");
            std::fs::remove_file(&path).unwrap();
        }
        // Its own stale FIFO is replaced by a fresh one with the daemon's mode.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let p = Pipe::create(&path, None).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_fifo());
        assert_eq!(m.mode() & 0o777, 0o620);
        drop(p);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_writer_closing_inside_a_line_does_not_spoil_the_next_writers_line() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowd.pipe");
        let pipe = Pipe::create(&path, None).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = pipe.spawn(Registry::bundled(), tx).unwrap();
        let write = |text: &'static str| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.write_all(text.as_bytes()).unwrap();
            })
            .join()
            .unwrap();
        };
        write("start tcp 10.0.0.1 1 10.0.0.2 2 2");
        // Let the reader see the first writer's close before the second opens.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        write("start tcp 10.0.0.1 3 10.0.0.2 4 3 12\n");
        let a = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the second writer's line arrives")
            .unwrap();
        assert_eq!(a.key.local(), "10.0.0.1:3".parse().unwrap());
        assert_eq!(a.tag, Some(Tag::new(3, 12).unwrap()));
        task.abort();
    }

    #[tokio::test]
    async fn overlapping_writers_lose_only_the_unfinished_line() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowd.pipe");
        let pipe = Pipe::create(&path, None).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = pipe.spawn(Registry::bundled(), tx).unwrap();
        let open = || std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A writes half a line; B opens before A closes, so both are one session
        // for the reader, and B's line arrives right behind A's fragment.
        let mut a = open();
        a.write_all(b"start tcp 10.0.0.1 1 10.0.0.2 2 atl").unwrap();
        let mut b = open();
        drop(a);
        b.write_all(b"START tcp 10.0.0.1 3 10.0.0.2 4 3 12\n")
            .unwrap();
        b.write_all(b"end tcp 10.0.0.1 3 10.0.0.2 4 3 12\n")
            .unwrap();
        drop(b);
        let mut got = Vec::new();
        for _ in 0..2 {
            let a = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("B's lines arrive")
                .unwrap();
            got.push((a.key.local().port(), a.tag));
        }
        assert_eq!(got, [(3, Some(Tag::new(3, 12).unwrap())), (3, None)]);
        assert!(rx.try_recv().is_err(), "A's fragment announced nothing");
        task.abort();
    }

    #[test]
    fn a_fragment_is_cut_only_where_a_whole_event_follows() {
        let r = Registry::bundled();
        let (fragment, a) =
            after_foreign_fragment("end udp ::1 5 ::2 6 2 4start tcp ::1 1 ::2 2 2 4", &r).unwrap();
        assert_eq!(fragment, "end udp ::1 5 ::2 6 2 4");
        assert_eq!(a.key.proto, Protocol::Tcp);
        // A keyword inside a word, with no event after it: nothing recovered.
        assert!(after_foreign_fragment("start tcp ::1 1 ::2 2 2 backend x", &r).is_none());
        assert!(after_foreign_fragment("garbage", &r).is_none());
    }
}
