//! The control protocol: the contract between the daemon and every client (the CLI,
//! `inspect`, operators' scripts). Pure types and the client; the server side lives
//! in [`crate::control`], and what the daemon puts in the views in
//! [`crate::engine`].
//!
//! Version 1. JSON lines over the control socket (a Unix socket, mode 0660, root and
//! the configured group), one request per line, one reply line per request:
//! ```text
//! -> {"v":1,"op":"status"}
//! <- {"v":1,"ok":true,"result":{...}}
//! -> {"v":1,"op":"flows","filter":{"experiment":"atlas"}}
//! <- {"v":1,"ok":false,"error":"..."}
//! ```
//!
//! ```text
//! envelope -- the line format and its version check, both directions
//! request  -- what a client may ask
//! view     -- what the daemon answers with: stable shapes for scripts
//! filter   -- which flows a listing asks for
//! client   -- the blocking client the CLI uses
//! ```

pub mod client;
pub mod envelope;
pub mod filter;
pub mod request;
pub mod view;

/// The protocol version both ends speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted; longer ones get an error and the connection closes.
pub const MAX_LINE: usize = 64 * 1024;
