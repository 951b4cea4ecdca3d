//! kedge's kernel edge: classify new TCP connections to the proxy ports by source
//! CIDR, admit or drop them (deny classes, class and source buckets, admission
//! ratio, blocked tenants), tag admitted SYNs for userspace, count everything.
//!
//! One core ([`decide`]) and two attach points: tc/TCX ingress (can set
//! `skb->mark`) and XDP (cheapest drop). The maps are the contract with the
//! daemon; their layouts live in `kedge-common` and are described in `docs/maps.md`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod edge;

/// Host builds (e.g. `cargo clippy --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
