//! kedge: a privileged host daemon that shapes LLM traffic at the kernel edge.
//!
//! One concern per module; a request's path reads top to bottom:
//! [`config`] → [`kernel`] (load, attach, pin, maps) → [`proxy`] (accept, tag,
//! forward) → [`metrics`]. [`daemon`] wires them together for `kedge run`.

pub mod budget;
pub mod cidr;
pub mod config;
pub mod daemon;
pub mod kernel;
pub mod ledger;
pub mod metrics;
pub mod proxy;
