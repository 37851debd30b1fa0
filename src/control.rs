//! The control socket: a local Unix socket speaking JSON lines, through which the
//! CLI (and operators' scripts) talk to the running daemon.
//!
//! Protocol version 1. One request per line, one response line per request:
//! ```text
//! -> {"v":1,"op":"status"}
//! <- {"v":1,"ok":true,"result":{...}}
//! -> {"v":1,"op":"mark-add","flow":{"proto":"tcp","local":"[fd00::1]:40000","remote":"[fd00::2]:5201"},"experiment":2,"activity":3}
//! <- {"v":1,"ok":false,"error":"..."}
//! ```
//! `mark-add`/`mark-del` are the internal, test-only way to mark a flow by hand until
//! discovery and policy decide marks themselves. The socket is mode 0660, owned by
//! root and the configured group: nobody else can connect.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::discovery::types::{FlowKey, Protocol};
use crate::engine::{Command, ControlCall};
use crate::inspect::client::Client;
use crate::inspect::view::FlowFilter;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted; longer ones get an error and the connection closes.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSpec {
    pub proto: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FlowSpec {
    pub fn key(&self) -> Result<FlowKey, String> {
        let proto = match self.proto.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            p => return Err(format!("unknown protocol `{p}`: use tcp or udp")),
        };
        Ok(FlowKey::new(proto, self.local, self.remote))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Counters {},
    MarkAdd {
        flow: FlowSpec,
        experiment: u16,
        activity: u8,
        /// The 5 entropy bits; drawn at random when absent.
        #[serde(default)]
        entropy: Option<u8>,
    },
    MarkDel {
        flow: FlowSpec,
    },
    /// Every live flow, optionally filtered.
    Flows {
        #[serde(default)]
        filter: Option<FlowFilter>,
    },
    /// One flow by socket cookie.
    Flow {
        cookie: u64,
    },
    /// Reload the policy directory (as SIGHUP does).
    Reload {},
}

/// What the daemon reports about itself in `status`, fixed at start.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonInfo {
    pub version: &'static str,
    pub pid: u32,
    pub strategy: String,
    /// Option headers written besides the label, if any (`hop-by-hop`, ...).
    pub header: Option<&'static str>,
    /// (interface, attach mode)
    pub attached: Vec<(String, &'static str)>,
    /// What the running kernel offers (the table `flowd-rs check` prints).
    pub kernel_features: Vec<crate::features::FeatureLine>,
    /// Fallbacks taken because the kernel lacks a feature, one line each.
    pub fallbacks: Vec<String>,
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

/// Gives `path` (one of the daemon's local entry points: the control socket, the
/// announcement pipe) to the daemon's user and `group` (config `control.group`) with
/// `mode`, so only root and that group may use it; a file found in place (a stale
/// pipe) is taken over whoever made it.
pub fn restrict_to_group(path: &Path, mode: u32, group: Option<&str>) -> Result<()> {
    let gid = match group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .with_context(|| format!("looking up group {g}"))?
                .with_context(|| format!("control.group: no group named `{g}`"))?
                .gid,
        ),
        None => None,
    };
    nix::unistd::chown(path, Some(nix::unistd::geteuid()), gid)
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
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
                wr.write_all(
                    format!("{{\"v\":{PROTOCOL_VERSION},\"ok\":true,\"result\":").as_bytes(),
                )
                .await?;
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

fn error_line(msg: String) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": PROTOCOL_VERSION, "ok": false, "error": msg}))
        .unwrap_or_default()
}

/// Parses one request line; every way a client can get it wrong is an error string.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not a JSON request: {e}"))?;
    match v.get("v").and_then(Value::as_u64) {
        Some(1) => {}
        Some(other) => {
            return Err(format!(
                "unsupported protocol version {other}: this daemon speaks 1"
            ))
        }
        None => return Err("missing protocol version: send {\"v\":1,...}".into()),
    }
    let mut body = v;
    if let Some(o) = body.as_object_mut() {
        o.remove("v");
    }
    serde_json::from_value(body).map_err(|e| format!("bad request: {e}"))
}

/// Sends one request to the daemon at `path` and returns its `result`; the errors
/// (not running, permission denied, refused) read the same for every command.
pub fn request(path: &Path, req: &Request) -> Result<Value> {
    Ok(Client::new(path).request(serde_json::to_value(req)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_documented_json() {
        let r: Request = serde_json::from_str(
            r#"{"op":"mark-add","flow":{"proto":"tcp","local":"[fd00::1]:40000","remote":"[fd00::2]:5201"},"experiment":2,"activity":3}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::MarkAdd {
                experiment: 2,
                activity: 3,
                entropy: None,
                ..
            }
        ));
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status {});
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).is_err());
    }

    #[test]
    fn flow_spec_rejects_unknown_protocol() {
        let f = FlowSpec {
            proto: "sctp".into(),
            local: "[::1]:1".parse().unwrap(),
            remote: "[::1]:2".parse().unwrap(),
        };
        assert_eq!(
            f.key().unwrap_err(),
            "unknown protocol `sctp`: use tcp or udp"
        );
    }
}
