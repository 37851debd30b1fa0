//! The control socket's server: binds it, reads request lines and hands each to
//! the engine, and writes the engine's answer back. The protocol itself (lines,
//! requests, views) is [`crate::api`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::api::envelope::{error_line, ok_prefix, parse_request};
use crate::api::request::Request;
use crate::api::MAX_LINE;
use crate::endpoint::restrict_to_group;
use crate::engine::{Command, ControlCall};

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

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
        })
    }

    /// Serves connections until the task is dropped; each request is answered by the
    /// engine behind `engine`.
    pub async fn serve(self, engine: mpsc::Sender<Command>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_conn(stream, &engine).await {
                            debug!(error = %e, "control connection ended");
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

async fn serve_conn(stream: UnixStream, engine: &mpsc::Sender<Command>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = AsyncBufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_LINE;
        let answer = if too_long {
            Err(error_line(format!("request longer than {MAX_LINE} bytes")))
        } else {
            match parse_request(&line) {
                Err(e) => Err(error_line(e)),
                Ok(request) => ask(engine, request).await,
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
            return Ok(());
        }
    }
}

/// The engine's answer: its serialized result, or an error line.
async fn ask(
    engine: &mpsc::Sender<Command>,
    request: Request,
) -> Result<Box<serde_json::value::RawValue>, Vec<u8>> {
    let (reply, answer) = oneshot::channel();
    if engine
        .send(Command::Control(ControlCall { request, reply }))
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
