//! One line each way: a request is `{"v":1,"op":...}`, a reply
//! `{"v":1,"ok":true,"result":...}` or `{"v":1,"ok":false,"error":"..."}`. Both ends
//! check the version here, so a mismatch reads the same from either side.

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::client::ClientError;
use super::request::Request;
use super::PROTOCOL_VERSION;

/// What a successful reply line starts with; the serialized result and `}` follow.
/// Written in halves by the server so a large result is never copied again.
pub fn ok_prefix() -> String {
    format!("{{\"v\":{PROTOCOL_VERSION},\"ok\":true,\"result\":")
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

/// A complete error reply line, without its newline.
pub fn error_line(msg: String) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": PROTOCOL_VERSION, "ok": false, "error": msg}))
        .unwrap_or_default()
}

/// A reply line, decoded straight into the expected result type: going through a
/// `serde_json::Value` first costs 3x the time and memory on a 10 000-flow listing.
#[derive(serde::Deserialize)]
struct Envelope<T> {
    v: Option<u64>,
    ok: Option<bool>,
    result: Option<T>,
    error: Option<String>,
}

/// Splits a reply line into the `result` of `ok` (as `T`) or the daemon's error.
pub fn parse_reply<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
    let malformed = |reason: String| ClientError::Malformed {
        reason,
        snippet: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
    };
    if line.is_empty() {
        return Err(malformed("connection closed without a reply".into()));
    }
    let env: Envelope<T> = serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
    if env.v != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(malformed(format!(
            "protocol version {:?}, this client speaks {PROTOCOL_VERSION}",
            env.v
        )));
    }
    match (env.ok, env.result) {
        (Some(true), Some(r)) => Ok(r),
        // `"result": null` or absent: fine when T accepts null (e.g. Value, Option).
        (Some(true), None) => {
            serde_json::from_value(Value::Null).map_err(|e| malformed(format!("no result: {e}")))
        }
        _ => Err(ClientError::Refused(
            env.error.unwrap_or_else(|| "no reason given".into()),
        )),
    }
}
