pub mod fake_daemon;

use std::path::Path;

/// `flowd-rs` pointed at the control socket `socket`, as a shell command prefix
/// (the only place that knows how the binary is told where the socket is).
///
/// The socket comes from the configuration: this writes `[control] socket = SOCKET`
/// to `SOCKET.toml` and returns `flowd-rs -c SOCKET.toml`.
pub fn flowd_rs(socket: &Path) -> String {
    let config = socket.with_extension("toml");
    std::fs::write(
        &config,
        format!("[control]\nsocket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    format!("{} -c {}", env!("CARGO_BIN_EXE_flowd-rs"), config.display())
}
