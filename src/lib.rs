//! flowd-rs: tags the network traffic of scientific data transfers (SciTags) with no
//! help from the applications that make it.
//!
//! Data flows one way: [`discovery`] -> [`flows`] -> [`policy`] (or an
//! [`announce`]ment) -> [`marker`] / [`firefly`] / [`metrics`] / [`control`].

pub mod announce;
pub mod api;
pub mod bpf;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod discovery;
pub mod endpoint;
pub mod engine;
pub mod enrich;
pub mod features;
pub mod firefly;
pub mod flows;
pub mod import;
pub mod inspect;
pub mod marker;
pub mod marking;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
