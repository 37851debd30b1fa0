//! flowd-rs: tags the network traffic of scientific data transfers (SciTags) with no
//! help from the applications that make it.

pub mod bpf;
pub mod config;
pub mod control;
pub mod daemon;
pub mod discovery;
pub mod marker;
