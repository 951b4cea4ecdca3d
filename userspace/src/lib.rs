//! kedge: a privileged host daemon that shapes LLM traffic at the kernel edge.
//!
//! One concern per module; a request's path reads top to bottom:
//! [`config`] → [`kernel`] (load, attach, pin, maps) → [`proxy`] (accept, tag,
//! [`classify`], route, forward, [`openai`] protocol, [`sse`] streams, [`tokens`])
//! → [`metrics`]. [`daemon`] wires them together for `kedge run`.

pub mod allocator;
pub mod budget;
pub mod cidr;
pub mod classify;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod feedback;
pub mod gpu;
pub mod idhash;
pub mod kernel;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod openai;
pub mod probe;
pub mod proxy;
pub mod route;
pub mod schedule;
pub mod sse;
pub mod status;
#[cfg(test)]
mod test_support;
pub mod tokens;
pub mod webhook;
