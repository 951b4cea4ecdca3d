//! Builds `kedge-ebpf` for `bpfel-unknown-none` and leaves the object in OUT_DIR,
//! where `kernel.rs` embeds it.
//!
//! Toolchain choice (see shared/TOOLCHAIN.md and `cargo xtask setup`):
//! `KEDGE_EBPF_TOOLCHAIN` if set; else Debian's `rustc-web` linked to rustup as
//! `debian-web` (a stable compiler with library sources, so `-Z build-std=core`
//! needs `RUSTC_BOOTSTRAP=1`); else `nightly` (needs the rust-src component).
use std::process::Command;

fn toolchain_works(name: &str) -> bool {
    Command::new("rustup")
        .args(["run", name, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-env-changed=KEDGE_EBPF_TOOLCHAIN");
    let name = std::env::var("KEDGE_EBPF_TOOLCHAIN")
        .ok()
        .unwrap_or_else(|| {
            if toolchain_works("debian-web") {
                "debian-web".to_string()
            } else {
                "nightly".to_string()
            }
        });
    if name != "nightly" {
        // SAFETY: build scripts are single-threaded here; the variable is read by
        // aya-build and inherited by the cargo it spawns.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let toolchain = if name == "nightly" {
        aya_build::Toolchain::Nightly
    } else {
        aya_build::Toolchain::Custom(Box::leak(name.into_boxed_str()))
    };
    let package = aya_build::Package {
        name: "kedge-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/kedge-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], toolchain)
}
