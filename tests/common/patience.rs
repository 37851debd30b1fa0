//! Deadlines of the test helpers, stretched on slow machines.
//!
//! A deadline here bounds a wait for something that takes milliseconds on real
//! hardware (a daemon attaching, tcpdump starting, a tracker event arriving). Under
//! an emulated CPU (vmtests/ runs the tests in qemu without KVM) the same steps take
//! seconds, so `FLOWD_TEST_PATIENCE=N` multiplies every such deadline by N.
use std::time::Duration;

pub fn patient(d: Duration) -> Duration {
    let factor = std::env::var("FLOWD_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}
