//! The control socket's server: binds it, reads request lines and hands each to
//! the engine, and writes the engine's answer back. The protocol itself (lines,
//! requests, views) is [`crate::api`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::api::envelope::{error_line, ok_prefix, parse_request};
use crate::api::request::Request;
use crate::api::MAX_LINE;
use crate::endpoint::{restrict_to_group, ConnectionStats};
use crate::engine::{Command, ControlCall};

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    group: Option<String>,
}

/// How often the server checks that its socket still exists.
const SOCKET_CHECK: Duration = Duration::from_secs(2);

impl Server {
    /// Binds the socket at `path` (replacing a stale one), mode 0660, group `group`.
    pub fn bind(path: &Path, group: Option<&str>) -> Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{}: another flowd-rs daemon is serving this control socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        restrict_to_group(path, 0o660, group)?;
        info!(socket = %path.display(), "control socket listening");
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            group: group.map(str::to_string),
        })
    }

    /// Serves connections until the task is dropped; each request is answered by the
    /// engine behind `engine`. A user other than root holds at most
    /// `limits.per_user` connections (so that root's `status` always answers and
    /// the daemon keeps file descriptors for its own work), and a connection idle
    /// for `limits.idle` is closed; both are counted in `stats`.
    pub async fn serve(
        self,
        engine: mpsc::Sender<Command>,
        limits: Limits,
        stats: Arc<ConnectionStats>,
    ) {
        let per_user: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
        let mut listener = self.listener;
        let mut check = tokio::time::interval(SOCKET_CHECK);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = check.tick() => {
                    // The state directory (or the socket) deleted under us: the
                    // daemon would run on, unreachable. Make the socket again.
                    if !self.path.exists() {
                        match Server::bind(&self.path, self.group.as_deref()) {
                            Ok(s) => {
                                warn!(socket = %self.path.display(), "control socket was removed: made it again");
                                listener = s.listener;
                            }
                            Err(e) => warn!(error = %format!("{e:#}"), "control socket was removed and cannot be made again"),
                        }
                    }
                    continue;
                }
            };
            match accepted {
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().ok().map(|c| c.uid());
                    let Some(slot) = Slot::take(uid, &limits, &per_user, &stats) else {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            uid,
                            cap = limits.per_user,
                            "control: connection refused, this user holds the most allowed"
                        );
                        tokio::spawn(async move {
                            let mut stream = stream;
                            let line = error_line(format!(
                                "too many connections from uid {}: at most {} (control.max_connections_per_user)",
                                uid.unwrap_or(u32::MAX),
                                limits.per_user
                            ));
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                stream.write_all(&line).await?;
                                stream.write_all(b"\n").await
                            })
                            .await;
                        });
                        continue;
                    };
                    let engine = engine.clone();
                    let stats = stats.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        match serve_conn(stream, &engine, uid, limits.idle).await {
                            Ok(Ended::Idle) => {
                                stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                                debug!(uid, "control connection closed: idle");
                            }
                            Ok(Ended::Client) => {}
                            Err(e) => debug!(error = %e, "control connection ended"),
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Connection limits of the control socket (config `[control]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_user: usize,
    pub idle: Duration,
}

/// One connection counted against its user, given back when dropped.
struct Slot {
    uid: Option<u32>,
    per_user: Arc<Mutex<HashMap<u32, usize>>>,
    stats: Arc<ConnectionStats>,
}

impl Slot {
    /// Root is not capped: its connections are the operator's. A client whose
    /// credentials the kernel does not give counts as one user.
    fn take(
        uid: Option<u32>,
        limits: &Limits,
        per_user: &Arc<Mutex<HashMap<u32, usize>>>,
        stats: &Arc<ConnectionStats>,
    ) -> Option<Slot> {
        let key = uid.unwrap_or(u32::MAX);
        if key != 0 {
            let mut m = per_user.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(key).or_default();
            if *n >= limits.per_user {
                return None;
            }
            *n += 1;
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            uid: Some(key),
            per_user: per_user.clone(),
            stats: stats.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.uid.filter(|k| *k != 0) {
            let mut m = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&key);
                }
            }
        }
    }
}

enum Ended {
    Client,
    Idle,
}

async fn serve_conn(
    stream: UnixStream,
    engine: &mpsc::Sender<Command>,
    peer_uid: Option<u32>,
    idle: Duration,
) -> std::io::Result<Ended> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = AsyncBufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(idle, limited.read_until(b'\n', &mut line)).await {
            Ok(n) => n?,
            Err(_) => return Ok(Ended::Idle),
        };
        if n == 0 {
            return Ok(Ended::Client);
        }
        let too_long = line.len() > MAX_LINE;
        let answer = if too_long {
            Err(error_line(format!("request longer than {MAX_LINE} bytes")))
        } else {
            match parse_request(&line) {
                Err(e) => Err(error_line(e)),
                Ok(request) => ask(engine, request, peer_uid).await,
            }
        };
        match answer {
            // The result arrives serialized: it is written between the envelope's
            // two halves rather than copied into one more buffer (a listing of
            // 100 000 flows is tens of MiB).
            Ok(result) => {
                wr.write_all(ok_prefix().as_bytes()).await?;
                wr.write_all(result.get().as_bytes()).await?;
                wr.write_all(b"}\n").await?;
            }
            Err(mut out) => {
                out.push(b'\n');
                wr.write_all(&out).await?;
            }
        }
        if too_long {
            return Ok(Ended::Client);
        }
    }
}

/// The engine's answer: its serialized result, or an error line.
async fn ask(
    engine: &mpsc::Sender<Command>,
    request: Request,
    peer_uid: Option<u32>,
) -> Result<Box<serde_json::value::RawValue>, Vec<u8>> {
    let (reply, answer) = oneshot::channel();
    if engine
        .send(Command::Control(ControlCall {
            request,
            peer_uid,
            reply,
        }))
        .await
        .is_err()
    {
        return Err(error_line("the daemon is shutting down".into()));
    }
    match answer.await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(error_line(e)),
        Err(_) => Err(error_line("the daemon is shutting down".into())),
    }
}
