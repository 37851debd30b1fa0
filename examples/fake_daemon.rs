//! A fake control socket with canned flows, to try `inspect` by hand:
//! `cargo run --example fake_daemon -- /tmp/flowd.sock 200`, then point the CLI at
//! it through a config file:
//! `printf '[control]\nsocket = "/tmp/flowd.sock"\n' > /tmp/fake.toml` and
//! `cargo run -- -c /tmp/fake.toml inspect`. Ctrl-C to stop.

#[path = "../tests/support/fake_daemon.rs"]
mod fake_daemon;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/flowd-fake.sock".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let _d = fake_daemon::FakeDaemon::start(path.as_ref(), fake_daemon::flows(n));
    println!("fake flowd-rs control socket at {path} with {n} flows; Ctrl-C to stop");
    loop {
        std::thread::park();
    }
}
