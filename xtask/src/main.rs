//! `cargo xtask <command>`: everything a developer or CI does to kedge.
//!
//! - `setup`: install what the eBPF build and the tests need (idempotent; says what it did).
//! - `build`: release build of the daemon with the embedded eBPF object.
//! - `test`: the test command of the README (unit + end-to-end; root for the kernel tests),
//!   then a smoke run of each benchmark on the debug build the tests used.
//! - `run [CONFIG]`: build and run the daemon.
//! - `lint`: rustfmt and clippy, warnings denied.
//! - `bench kernel`: per-packet cost of the eBPF programs (BPF_PROG_TEST_RUN; root).
//! - `bench proxy`, `bench flood`: proxy overhead; connection flood (root).
//! - `bench instructions`: user-space instructions per request (callgrind).
//! - `bench <kernel|proxy|flood|instructions> --smoke`: the short run `test` does
//!   (debug build, writes nothing, fails when the pipeline does not work).
//! - `bench <proxy|flood> --from-json`: the docs' report again from the rounds in
//!   docs/bench-*.json, after a change to how they are summarised (no measuring).
//!
//! Every command but `setup` first checks the toolchain and stops with one clear
//! sentence when something is missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

mod bench_flood;
mod bench_instructions;
mod bench_proxy;
mod demo;
mod host;

/// The recipe of shared/TOOLCHAIN.md: the versions that build together here.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const DEBIAN_TOOLCHAIN: &str = "debian-web";
/// Debian's rustc 1.96 with its library sources: a stable compiler that can
/// `-Z build-std=core` under RUSTC_BOOTSTRAP=1.
const DEBIAN_RUST_PACKAGES: &[&str] = &["rustc-web", "rust-web-src", "cargo-web"];
/// What the tests and tools use besides the Rust toolchain.
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "curl",
    "iputils-ping",
    "netcat-openbsd",
    "sqlite3",
    "gcc",
    // The smoke runs of the benchmarks in the test command: nginx is the
    // proxy baseline, nftables the flood bench's alternative.
    "nginx-light",
    "nftables",
    // `bench instructions` counts with callgrind.
    "valgrind",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => check().and_then(|_| build()),
        Some("test") => check().and_then(|_| test(&args[1..])),
        Some("run") => check().and_then(|_| run(args.get(1).map(String::as_str))),
        Some("lint") => check().and_then(|_| lint()),
        Some("bench") => check().and_then(|_| bench(&args[1..])),
        Some("install") => check().and_then(|_| install()),
        Some("demo") => setup().and_then(|_| demo(&args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|build|test|run [CONFIG]|lint|install|demo [SECONDS]|bench <kernel|proxy|flood|instructions> [SECONDS|--smoke|--from-json]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed ({s})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn deb_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .contains("install ok installed")
}

fn nightly_has_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .lines()
    .any(|l| l.starts_with("rust-src"))
}

fn debian_toolchain_linked() -> bool {
    succeeds(Command::new("rustup").args(["run", DEBIAN_TOOLCHAIN, "rustc", "--version"]))
}

fn python_has_openai() -> bool {
    succeeds(Command::new("python3").args(["-c", "import openai"]))
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION)
}

/// Which compiler builds the eBPF side: nightly with rust-src if the machine has
/// it, else Debian's rustc-web (the route verified in shared/TOOLCHAIN.md).
fn use_nightly() -> bool {
    nightly_has_rust_src()
}

fn setup() -> Result<()> {
    let mut did = Vec::new();
    let nightly = use_nightly();
    let mut packages: Vec<&str> = TOOL_PACKAGES.to_vec();
    packages.push(LLVM_PACKAGE);
    if !nightly {
        packages.extend_from_slice(DEBIAN_RUST_PACKAGES);
    }
    let missing: Vec<&str> = packages.into_iter().filter(|p| !deb_installed(p)).collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        apt_install(&missing)?;
        did.push(format!("installed {}", missing.join(" ")));
    }

    if !bpf_linker_ok() {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 90 s)");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path),
        )
        .context("building bpf-linker")?;
        did.push(format!("installed bpf-linker {BPF_LINKER_VERSION}"));
    }

    if !python_has_openai() {
        println!(
            "setup: installing the Python `openai` package (the SDK test drives kedge with it)"
        );
        status(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ]))
        .context("pip install openai")?;
        did.push("installed the Python openai package".to_string());
    }

    if nightly {
        println!("setup: using nightly with rust-src for the eBPF build");
    } else if !debian_toolchain_linked() {
        status(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))
            .context("linking Debian's rustc into rustup")?;
        did.push(format!(
            "linked rustup toolchain {DEBIAN_TOOLCHAIN} -> /usr"
        ));
    }

    if did.is_empty() {
        println!("setup: everything was already in place");
    } else {
        for d in did {
            println!("setup: {d}");
        }
    }
    check()
}

/// Fails with one sentence when the eBPF build cannot work on this machine.
fn check() -> Result<()> {
    if !bpf_linker_ok() {
        bail!("bpf-linker {BPF_LINKER_VERSION} is missing: run `cargo xtask setup`");
    }
    if !use_nightly() && !debian_toolchain_linked() {
        bail!(
            "no compiler for the eBPF side: neither nightly with rust-src nor Debian's rustc-web \
             linked as `{DEBIAN_TOOLCHAIN}`; run `cargo xtask setup`"
        );
    }
    Ok(())
}

/// `apt-get install` of packages not yet installed (after one `apt-get update`).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    status(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (are you root?)")?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))
}

/// Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in
/// `path` (appending the section when it is not there yet).
/// A bench's raw figures as it wrote them, `docs/bench-NAME.json`.
fn read_bench_json(root: &Path, name: &str) -> Result<serde_json::Value> {
    let path = root.join(format!("docs/bench-{name}.json"));
    let raw =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&raw).with_context(|| format!("{}", path.display()))
}

fn replace_section(path: &Path, name: &str, content: &str) -> Result<()> {
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{open}\n{content}\n{close}");
    let text = match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &text[..a], &text[b + close.len()..])
        }
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn bench(args: &[String]) -> Result<()> {
    let smoke = args.iter().any(|a| a == "--smoke");
    let seconds = |default: f64| -> Result<f64> {
        args.iter()
            .skip(1)
            .find(|a| !a.starts_with("--"))
            .map_or(Ok(default), |s| s.parse())
            .context("SECONDS")
    };
    let name = args.first().map(String::as_str);
    if smoke {
        return match name {
            Some(name @ ("kernel" | "proxy" | "flood" | "instructions")) => {
                if name != "kernel" {
                    // The debug binaries, built exactly as `cargo test` builds
                    // them (same packages and features: a no-op after it).
                    status(ebpf_toolchain_env(&mut cargo()).args(["test", "--no-run"]))?;
                }
                smoke_one(name)
            }
            _ => bail!("usage: cargo xtask bench <kernel|proxy|flood|instructions> --smoke"),
        };
    }
    match name {
        // BPF_PROG_TEST_RUN figures for the eBPF programs (userspace/benches/kernel.rs).
        Some("kernel") => status(
            ebpf_toolchain_env(&mut cargo())
                .args(["bench", "-p", "kedge", "--bench", "kernel", "--", "kernel"]),
        ),
        Some("proxy") if args.iter().any(|a| a == "--from-json") => {
            bench_proxy::rerender(&root(), seconds(2.0)?)
        }
        Some("flood") if args.iter().any(|a| a == "--from-json") => bench_flood::rerender(&root()),
        Some("proxy") => {
            let seconds = seconds(2.0)?;
            build_bins()?;
            bench_proxy::run(&root(), &target_dir().join("release"), seconds, false)
        }
        Some("flood") => {
            // Seconds per window: short, so that a flooded window and its
            // unflooded partner meet the same host weather; long enough that
            // most of it is counted (not its first 0.5 s nor its last 0.25).
            let seconds = seconds(2.5)?;
            build_bins()?;
            bench_flood::run(&root(), &target_dir().join("release"), seconds, false)
        }
        Some("instructions") => {
            build_bins()?;
            bench_instructions::run(&root(), &target_dir().join("release"), false)
        }
        _ => bail!(
            "usage: cargo xtask bench <kernel|proxy|flood|instructions> [SECONDS|--smoke|--from-json]"
        ),
    }
}

/// Seconds per proxy cell and per flood window in a smoke run.
const SMOKE_PROXY_SECONDS: f64 = 0.5;
const SMOKE_FLOOD_SECONDS: f64 = 1.5;

/// The smoke run of one benchmark on the debug build (`cargo test`'s): short,
/// writes nothing, fails when the pipeline does not work. Without root it
/// prints `skipped:` and succeeds where root is needed.
fn smoke_one(name: &str) -> Result<()> {
    let debug = target_dir().join("debug");
    match name {
        // The bench binary in the test profile: same dependencies as the tests
        // (no -p: the same packages, hence features, as `cargo test`), so only
        // the bench itself is compiled. It prints `skipped:` without root.
        "kernel" => status(
            ebpf_toolchain_env(&mut cargo())
                .args(["test", "--bench", "kernel", "--", "kernel", "--smoke"]),
        ),
        "proxy" => {
            if !is_root() && !Path::new("/usr/sbin/nginx").exists() {
                println!(
                    "skipped: bench proxy smoke: nginx is not installed and installing it needs root"
                );
                return Ok(());
            }
            bench_proxy::run(&root(), &debug, SMOKE_PROXY_SECONDS, true)
        }
        "flood" => {
            if !is_root() {
                println!("skipped: bench flood smoke: network namespaces and eBPF need root");
                return Ok(());
            }
            bench_flood::run(&root(), &debug, SMOKE_FLOOD_SECONDS, true)
        }
        "instructions" => {
            if !is_root() && Command::new("valgrind").arg("--version").output().is_err() {
                println!(
                    "skipped: bench instructions smoke: valgrind is not installed and installing it needs root"
                );
                return Ok(());
            }
            bench_instructions::run(&root(), &debug, true)
        }
        _ => bail!("no benchmark {name}"),
    }
}

/// The smoke runs of all benchmarks, timed.
fn smoke_all() -> Result<()> {
    let started = std::time::Instant::now();
    let mut times = Vec::new();
    for name in ["kernel", "proxy", "flood", "instructions"] {
        println!("xtask: benchmark smoke run: {name}");
        let t = std::time::Instant::now();
        smoke_one(name).with_context(|| format!("benchmark smoke run `{name}`"))?;
        times.push(format!("{name} {:.1} s", t.elapsed().as_secs_f64()));
    }
    println!(
        "xtask: benchmark smoke runs passed in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        times.join(", ")
    );
    Ok(())
}

/// Where cargo puts its builds.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
}

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc_geteuid() == 0 }
}

/// Release build of kedge, kedge-sim and kedge-load (demo and benchmarks).
fn build_bins() -> Result<()> {
    status(ebpf_toolchain_env(&mut cargo()).args(["build", "--release", "-p", "kedge", "--bins"]))
}

/// Runs a command that must succeed; its stderr becomes the error.
fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("{cmd} {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A plain HTTP/1.0 GET of a local admin endpoint; the body, or None.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: kedge\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A child process killed when dropped (benchmarks and demo clean up on error).
struct Proc(std::process::Child);

impl Proc {
    /// SIGTERM, then up to `grace` for the process to exit on its own (a
    /// program under valgrind writes its counts on the way out), then SIGKILL.
    fn stop(&mut self, grace: std::time::Duration) {
        // Gone and reaped already: its pid may be another process's now.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc_kill(self.0.id() as i32, 15) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    /// SIGTERM first, so a master process (nginx) takes its workers down with
    /// it; SIGKILL only if it has not gone within two seconds. (A SIGKILLed
    /// nginx master leaves orphaned workers holding its inherited files.)
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(2));
    }
}

fn ebpf_toolchain_env(cmd: &mut Command) -> &mut Command {
    if use_nightly() {
        cmd.env("KEDGE_EBPF_TOOLCHAIN", "nightly")
    } else {
        cmd.env("KEDGE_EBPF_TOOLCHAIN", DEBIAN_TOOLCHAIN)
    }
}

fn build() -> Result<()> {
    status(ebpf_toolchain_env(&mut cargo()).args(["build", "--release", "-p", "kedge"]))
}

fn test(extra: &[String]) -> Result<()> {
    if !is_root() {
        println!("xtask: not root: the kernel and namespace tests will skip");
    }
    status(ebpf_toolchain_env(&mut cargo()).arg("test").args(extra))?;
    if !extra.is_empty() {
        // A filter or other profile: the smoke runs need the plain debug build.
        println!(
            "xtask: arguments given to cargo test: benchmark smoke runs left out \
             (`cargo xtask bench <kernel|proxy|flood> --smoke` runs one)"
        );
        return Ok(());
    }
    smoke_all()
}

fn run(config: Option<&str>) -> Result<()> {
    build()?;
    let config = config.unwrap_or("config/kedge.toml");
    status(
        Command::new(root().join("target/release/kedge"))
            .args(["run", "--config", config])
            .current_dir(root()),
    )
}

/// Puts the binary, the systemd unit and (if none is there yet) the config in
/// place; an existing /etc/kedge/kedge.toml is never overwritten.
fn install() -> Result<()> {
    build()?;
    let root = root();
    let copy = |from: &str, to: &str| -> Result<()> {
        if let Some(dir) = Path::new(to).parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(root.join(from), to).with_context(|| format!("copying {from} to {to}"))?;
        println!("install: {to}");
        Ok(())
    };
    copy("target/release/kedge", "/usr/local/bin/kedge")?;
    copy("config/kedge.service", "/etc/systemd/system/kedge.service")?;
    if Path::new("/etc/kedge/kedge.toml").exists() {
        println!("install: /etc/kedge/kedge.toml exists, left as it is");
    } else {
        copy("config/kedge.toml", "/etc/kedge/kedge.toml")?;
    }
    if Path::new("/run/systemd/system").exists() {
        status(Command::new("systemctl").arg("daemon-reload"))?;
        println!(
            "install: systemd reloaded; edit /etc/kedge/kedge.toml, then `systemctl enable --now kedge`"
        );
    } else {
        println!(
            "install: systemd is not running here; start with `kedge run --config /etc/kedge/kedge.toml`"
        );
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    let seconds = args
        .first()
        .map_or(Ok(60), |s| s.parse())
        .context("SECONDS")?;
    build_bins()?;
    demo::run(&root(), seconds)
}

fn lint() -> Result<()> {
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(ebpf_toolchain_env(&mut cargo()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}
