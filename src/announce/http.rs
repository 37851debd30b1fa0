//! flowd-go's HTTP API (its `api` plugin) as an announcement input: `POST /flow`
//! with its JSON flow (`State` 0 start, 1 end, 2 ongoing; `Protocol` 0 tcp, 1 udp;
//! `Src`/`Dst` `{IP, Port}`; `Experiment`, `Activity`; timestamps ignored) has the
//! effect of the equivalent named-pipe line; `GET /` lists the routes, `GET
//! /dummy/start` and `/dummy/end` echo flowd-go's fixed test flow. Answers are
//! flowd-go's: the flow echoed as indented JSON with 200, 400 for a body that is
//! not such a flow. Off by default, loopback by default (127.0.0.1:7777).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::auth::{AuthRule, Authenticator, Scope};
use crate::model::announcement::{Announcement, Origin};
use crate::model::socket::{FlowKey, Protocol};
use crate::model::tag::Tag;

/// A flow body is a few hundred bytes; anything far larger is refused unread.
const BODY_MAX: usize = 16 << 10;

#[derive(Debug, Deserialize)]
struct Endpoint {
    #[serde(rename = "IP")]
    ip: IpAddr,
    #[serde(rename = "Port")]
    port: u16,
}

/// flowd-go's `FlowID` as its API binds it (unknown fields ignored, as Go does).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlowBody {
    state: u8,
    protocol: u8,
    src: Endpoint,
    dst: Endpoint,
    experiment: u32,
    activity: u32,
}

/// What a `POST /flow` body announces, or why it cannot.
pub fn parse_flow(body: &[u8], from: SocketAddr) -> Result<Announcement, String> {
    let f: FlowBody = serde_json::from_slice(body).map_err(|e| format!("flow body: {e}"))?;
    let proto = match f.protocol {
        0 => Protocol::Tcp,
        1 => Protocol::Udp,
        p => return Err(format!("Protocol {p}: 0 (tcp) or 1 (udp)")),
    };
    let src = SocketAddr::new(f.src.ip, f.src.port);
    let dst = SocketAddr::new(f.dst.ip, f.dst.port);
    if src.is_ipv4() != dst.is_ipv4() || src.port() == 0 || dst.port() == 0 {
        return Err(format!("{src} -> {dst} is not a flow"));
    }
    let tag = match f.state {
        // START and ONGOING tag the flow; END withdraws it.
        0 | 2 => {
            let exp = u16::try_from(f.experiment).map_err(|_| "Experiment out of range")?;
            let act = u8::try_from(f.activity).map_err(|_| "Activity out of range")?;
            Some(Tag::new(exp, act).map_err(|e| e.to_string())?)
        }
        1 => None,
        s => return Err(format!("State {s}: 0 (start), 1 (end) or 2 (ongoing)")),
    };
    Ok(Announcement {
        key: FlowKey::new(proto, src, dst),
        tag,
        origin: Origin::Http(from),
        only_for_uid: None,
    })
}

/// flowd-go's fixed test flow (ids 65535, out of the SciTags range: echoed, never
/// announced).
fn dummy(state: u8) -> Value {
    let now = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let zero = "0001-01-01T00:00:00Z";
    let (start, end) = if state == 0 {
        (now.as_str(), zero)
    } else {
        (zero, now.as_str())
    };
    serde_json::json!({
        "State": state, "Protocol": 0, "Family": 10,
        "Src": {"IP": "::1", "Port": 2345}, "Dst": {"IP": "::1", "Port": 5777},
        "Experiment": 65535, "Activity": 65535,
        "StartTs": start, "EndTs": end, "CurrentTs": zero,
    })
}

fn json(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(
    req: Request<Incoming>,
    from: SocketAddr,
    scope: Result<Scope, String>,
    tx: mpsc::Sender<Announcement>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let route = |m: &str, p: &str, n: &str| serde_json::json!({"method": m, "path": p, "name": n});
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => json(
            StatusCode::OK,
            &serde_json::json!({"ApiRoutes": [
                route("GET", "/", "root"),
                route("GET", "/dummy/start", "dummy start"),
                route("GET", "/dummy/end", "dummy end"),
                route("POST", "/flow", "flow event"),
            ]}),
        ),
        (&Method::GET, "/dummy/start") => json(StatusCode::OK, &dummy(0)),
        (&Method::GET, "/dummy/end") => json(StatusCode::OK, &dummy(1)),
        (&Method::POST, "/flow") => {
            let body = match Limited::new(req.into_body(), BODY_MAX).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(json(StatusCode::BAD_REQUEST, &Value::String(e.to_string()))),
            };
            // The same rule as for fireflies: a local peer is known by its socket's
            // owner, who may name any flow (root), its own flows, or none.
            let scope = match scope {
                Ok(scope) => scope,
                Err(why) => {
                    debug!(from = %from, reason = %why, "HTTP flow event refused");
                    return Ok(json(
                        StatusCode::FORBIDDEN,
                        &serde_json::json!({"message": why}),
                    ));
                }
            };
            match parse_flow(&body, from) {
                Ok(mut a) => {
                    a.only_for_uid = scope.only_for_uid();
                    let echo: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if tx.send(a).await.is_err() {
                        return Ok(json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &Value::String("the daemon is stopping".into()),
                        ));
                    }
                    json(StatusCode::OK, &echo)
                }
                Err(e) => {
                    debug!(from = %from, error = %e, "HTTP flow event refused");
                    json(StatusCode::BAD_REQUEST, &serde_json::json!({"message": e}))
                }
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"message": "Not Found"}),
        ),
    })
}

/// Serves the API on `listener` until the task is dropped. Each connection's peer
/// is judged once, by `rule`, when it connects; refusals are counted in `refused`.
pub async fn serve(
    listener: TcpListener,
    tx: mpsc::Sender<Announcement>,
    rule: AuthRule,
    refused: Arc<AtomicU64>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "HTTP announcement API: no local address");
            return;
        }
    };
    info!(listen = %local, "HTTP announcement API listening (flowd-go's api plugin)");
    let mut auth = match Authenticator::new(rule) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "HTTP announcement API: cannot open sock_diag to identify local peers; not serving");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "HTTP announcement API: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let scope = auth.authorize(Protocol::Tcp, peer, local);
        if scope.is_err() {
            refused.fetch_add(1, Ordering::Relaxed);
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| answer(req, peer, scope.clone(), tx.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "HTTP announcement connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// flowd-go's plugins/api/testdata/start.json layout, with SciTags-valid ids.
    const START: &str = r#"{
    "State": 0,
    "Protocol": 0,
    "Family": 2,
    "Src": {
        "IP": "127.0.0.1",
        "Port": 2345
    },
    "Dst": {
        "IP": "127.0.0.1",
        "Port": 5777
    },
    "Experiment": 2,
    "Activity": 4,
    "StartTs": "0001-01-01T00:00:00Z",
    "EndTs": "2025-02-06T13:21:30.893064962+01:00",
    "CurrentTs": "0001-01-01T00:00:00Z"
}"#;

    /// One request on a fresh connection, as curl sends it; the status and body.
    async fn exchange(addr: SocketAddr, request: String) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    fn post(body: &str) -> String {
        format!(
            "POST /flow HTTP/1.1\r\nHost: 127.0.0.1:7777\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn a_posted_flow_announces_what_the_equivalent_pipe_line_does() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        // This test's own user may announce (its own flows, or any as root).
        let me = nix::unistd::getuid().as_raw().to_string();
        let rule = AuthRule::new(&[me], &[]).unwrap();
        let refused = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(serve(listener, tx, rule, refused.clone()));
        let registry = crate::policy::Registry::bundled();

        let (status, body) = exchange(addr, post(START)).await;
        assert_eq!(status, 200, "{body}");
        let echoed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echoed, serde_json::from_str::<Value>(START).unwrap());
        let got = rx.recv().await.unwrap();
        let piped = super::super::pipe::parse_line(
            "start tcp 127.0.0.1 2345 127.0.0.1 5777 2 4",
            &registry,
        )
        .unwrap();
        assert_eq!((got.key, got.tag), (piped.key, piped.tag));
        assert!(matches!(got.origin, Origin::Http(a) if a.ip().is_loopback()));

        let end = START.replace("\"State\": 0", "\"State\": 1");
        assert_eq!(exchange(addr, post(&end)).await.0, 200);
        let got = rx.recv().await.unwrap();
        let piped =
            super::super::pipe::parse_line("end tcp 127.0.0.1 2345 127.0.0.1 5777 2 4", &registry)
                .unwrap();
        assert_eq!((got.key, got.tag), (piped.key, None));

        // flowd-go's own testdata ids (65535) are outside SciTags' range: refused,
        // nothing announced. Broken JSON likewise.
        let theirs = START
            .replace("\"Experiment\": 2", "\"Experiment\": 65535")
            .replace("\"Activity\": 4", "\"Activity\": 65535");
        assert_eq!(exchange(addr, post(&theirs)).await.0, 400);
        assert_eq!(exchange(addr, post("{\"State\": ")).await.0, 400);
        let get =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, body) = exchange(addr, get("/dummy/start")).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["State"].as_u64(), v["Src"]["Port"].as_u64()),
            (Some(0), Some(2345))
        );
        let (status, body) = exchange(addr, get("/")).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"/flow\""), "{body}");
        assert_eq!(exchange(addr, get("/nope")).await.0, 404);
        assert_eq!(refused.load(Ordering::Relaxed), 0);
        assert!(
            rx.try_recv().is_err(),
            "only the two valid flows were announced"
        );
        server.abort();
    }

    /// A local peer outside `allow_users` (and not root) is refused with 403 and
    /// counted; nothing is announced.
    #[tokio::test]
    async fn a_local_peer_not_allowed_to_announce_gets_403() {
        if nix::unistd::getuid().is_root() {
            // Root may always announce; the refusal needs another user
            // (tests/announce_auth.rs covers it with real uids).
            let rule = AuthRule::new(&[], &[]).unwrap();
            assert_eq!(rule.judge(0, &[]), Ok(Scope::AnyFlow));
            assert!(rule.judge(4242, &[4242]).is_err());
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let refused = Arc::new(AtomicU64::new(0));
        let rule = AuthRule::new(&[], &[]).unwrap();
        let server = tokio::spawn(serve(listener, tx, rule, refused.clone()));
        let (status, body) = exchange(addr, post(START)).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_err());
        server.abort();
    }
}
