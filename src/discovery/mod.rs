//! Sources of socket facts.
pub mod types;
