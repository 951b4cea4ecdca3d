//! Empty on purpose: the programs live in `main.rs` (a `[[bin]]` built for
//! `bpfel-unknown-none`); this library only lets `userspace` name the crate as a
//! build-dependency so cargo rebuilds the embedded object when it changes.
#![no_std]
