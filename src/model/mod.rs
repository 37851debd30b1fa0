//! The vocabulary every layer shares, at the bottom of the module graph: what a
//! socket is ([`socket`]), what a tag and a flow label are ([`tag`]), what is known
//! about the process that owns a socket ([`facts`]), and what an application says
//! when it announces a flow ([`announcement`]). Nothing here imports another module
//! of the crate, so any module may use it.

pub mod announcement;
pub mod facts;
pub mod socket;
pub mod tag;
