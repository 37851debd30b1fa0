//! The CLI side of the control socket: one request line out, one reply line back.
//!
//! Blocking on purpose: `inspect` asks once a second from its own thread, and a
//! runtime would buy nothing. Each request opens its own connection (a Unix socket
//! connect costs microseconds), so a daemon restart between two refreshes is just
//! a failed refresh, not a broken session.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::envelope::parse_reply;
use super::filter::FlowFilter;
use super::request::Request;
use super::view::{FlowView, StatusView};
use super::PROTOCOL_VERSION;

/// A daemon that does not answer within this time is reported as stuck.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Flows per page of a listing: ~3 MiB of JSON, a few ms of the daemon's time each,
/// so a listing of 100 000 flows neither holds the daemon long nor inflates it.
pub const FLOWS_PAGE: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file, or nobody listening on it.
    #[error("the daemon is not running (no control socket at {}). Start it with: systemctl start flowd-rs (or flowd-rs run)", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on the control socket {}: run as root or as a member of the group set in [control] group", .0.display())]
    PermissionDenied(PathBuf),
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon sent a malformed reply ({reason}): {snippet:?}")]
    Malformed { reason: String, snippet: String },
    /// The daemon understood the request and said no.
    #[error("daemon refused: {0}")]
    Refused(String),
    /// Writing out what the daemon sent failed (e.g. stdout closed).
    #[error("writing the listing: {0}")]
    Output(#[source] std::io::Error),
}

impl ClientError {
    /// True when the daemon is absent (as opposed to present and misbehaving).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::NotRunning(_))
    }
}

/// Talks to one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `{"op":"status"}`.
    pub fn status(&self) -> Result<StatusView, ClientError> {
        self.call(json!({"op": "status"}))
    }

    /// `{"op":"flows","filter":{...}}`: the flows the filter lets through.
    pub fn flows(&self, filter: &FlowFilter) -> Result<Vec<FlowView>, ClientError> {
        let mut out = Vec::new();
        self.flow_pages(filter, |page| {
            out.extend(page);
            Ok(())
        })?;
        Ok(out)
    }

    /// The listing page by page, in the daemon's order (socket cookie), each handed
    /// to `page` as it arrives: memory for one page, whatever the table's size. An
    /// error from `page` (a closed pipe) ends the listing.
    pub fn flow_pages(
        &self,
        filter: &FlowFilter,
        mut page: impl FnMut(Vec<FlowView>) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        #[derive(serde::Deserialize)]
        struct Flows {
            flows: Vec<FlowView>,
            #[serde(default)]
            next: Option<u64>,
        }
        let mut after = None;
        loop {
            let mut req = json!({"op": "flows", "filter": filter, "limit": FLOWS_PAGE});
            if let Some(a) = after {
                req["after"] = json!(a);
            }
            let r: Flows = match self.call(req) {
                Ok(r) => r,
                // A daemon from before paging: one listing of everything.
                Err(ClientError::Refused(e)) if after.is_none() && e.contains("unknown field") => {
                    let all = self.call::<Flows>(json!({"op": "flows", "filter": filter}))?;
                    return page(all.flows).map_err(ClientError::Output);
                }
                Err(e) => return Err(e),
            };
            page(r.flows).map_err(ClientError::Output)?;
            match r.next {
                Some(n) => after = Some(n),
                None => return Ok(()),
            }
        }
    }

    /// `{"op":"flow","cookie":N}`: one flow with its events.
    pub fn flow(&self, cookie: u64) -> Result<FlowView, ClientError> {
        self.call(json!({"op": "flow", "cookie": cookie}))
    }

    /// `{"op":"reload"}`: re-reads the policy files; the new policy version.
    pub fn reload(&self) -> Result<String, ClientError> {
        #[derive(serde::Deserialize)]
        struct Reloaded {
            policy_version: String,
        }
        let r: Reloaded = self.call(json!({"op": "reload"}))?;
        Ok(r.policy_version)
    }

    /// Sends `request` (an object; `"v"` is added) and decodes the `result` as `T`.
    pub fn call<T: DeserializeOwned>(&self, request: Value) -> Result<T, ClientError> {
        parse_reply(&self.exchange(request)?)
    }

    /// Sends one request and returns the raw `result` of an `ok` reply.
    pub fn request(&self, request: Value) -> Result<Value, ClientError> {
        self.call(request)
    }

    /// Writes one request line and reads one reply line.
    fn exchange(&self, mut request: Value) -> Result<Vec<u8>, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.path).map_err(|e| match e.kind() {
            // No file, or a stale file nobody listens on: the daemon is not running.
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.path.clone())
            }
            ErrorKind::PermissionDenied => ClientError::PermissionDenied(self.path.clone()),
            _ => io(e),
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        if let Some(o) = request.as_object_mut() {
            o.insert("v".into(), json!(PROTOCOL_VERSION));
        }
        let mut line = serde_json::to_vec(&request).expect("a JSON value always serializes");
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut reply = Vec::new();
        BufReader::new(&stream)
            .read_until(b'\n', &mut reply)
            .map_err(io)?;
        Ok(reply)
    }
}

/// Sends one request to the daemon at `path` and returns its `result`; the errors
/// (not running, permission denied, refused) read the same for every command.
pub fn request(path: &Path, req: &Request) -> anyhow::Result<Value> {
    Ok(Client::new(path).request(serde_json::to_value(req)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_reads_as_daemon_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let err = Client::new(&path).status().unwrap_err();
        assert!(err.is_not_running());
        assert_eq!(
            err.to_string(),
            format!(
                "the daemon is not running (no control socket at {}). Start it with: systemctl start flowd-rs (or flowd-rs run)",
                path.display()
            )
        );
    }

    #[test]
    fn stale_socket_file_reads_as_daemon_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(Client::new(&path).status().unwrap_err().is_not_running());
    }

    #[test]
    fn reply_parsing_separates_result_and_error() {
        assert_eq!(
            parse_reply::<Value>(br#"{"v":1,"ok":true,"result":{"a":1}}"#).unwrap(),
            json!({"a":1})
        );
        let e = parse_reply::<Value>(br#"{"v":1,"ok":false,"error":"no such flow"}"#).unwrap_err();
        assert_eq!(e.to_string(), "daemon refused: no such flow");
        assert!(matches!(
            parse_reply::<Value>(br#"{"v":2,"ok":true}"#),
            Err(ClientError::Malformed { .. })
        ));
        assert!(matches!(
            parse_reply::<Value>(b""),
            Err(ClientError::Malformed { .. })
        ));
        // A result of the wrong shape is malformed, not a refusal.
        let e = parse_reply::<StatusView>(br#"{"v":1,"ok":true,"result":{"pid":"not a number"}}"#)
            .unwrap_err();
        assert!(matches!(e, ClientError::Malformed { .. }), "{e}");
    }
}
