//! Serves `/metrics` with a synthetic, growing snapshot, to look at with curl:
//! `cargo run --example metrics_demo -- 127.0.0.1:9617` then
//! `curl -s 127.0.0.1:9617/metrics`. Ctrl-C to stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flowd::api::view::TagTotals;
use flowd::metrics::{self, BuildInfo, Metrics, Snapshot};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| flowd::config::DEFAULT_METRICS_LISTEN.into())
        .parse()?;
    let scrapes = Arc::new(AtomicU64::new(0));
    let source = {
        let scrapes = scrapes.clone();
        move || {
            let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
            Snapshot {
                flows_tracked: 12,
                tags: vec![TagTotals {
                    experiment: 2,
                    experiment_name: Some("atlas".into()),
                    activity: 3,
                    activity_name: Some("datachallenge".into()),
                    flows: 4,
                    packets: 1000 * n,
                    bytes: 1_500_000 * n,
                }],
                outcomes: [
                    "marked",
                    "unmarked",
                    "skipped_mtu",
                    "not_ipv6",
                    "not_tcp_udp",
                    "malformed",
                    "skipped_header",
                ]
                .iter()
                .map(|o| (o.to_string(), if *o == "marked" { 1000 * n } else { 0 }))
                .collect(),
                map_entries: 4,
                map_capacity: 65536,
                ..Default::default()
            }
        }
    };
    let m = Arc::new(Metrics::new(
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            strategy: "flow-label".into(),
        },
        source,
    ));
    m.observe_poll(Duration::from_micros(2400));
    println!("serving http://{listen}/metrics; Ctrl-C to stop");
    metrics::serve(listen, m, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
