//! `cargo xtask bench instructions`: user-space instructions per proxied
//! request, kedge (everything on) against nginx, counted by valgrind's
//! callgrind. Unlike the timed benches this is repeatable to a fraction of
//! a percent on a shared machine, whatever else runs (valgrind counts
//! instructions, not time), so it shows what a change to the request path
//! costs. Kernel work (the loopback TCP both proxies pay) is not counted.
//!
//! Each proxy serves `N` and then `3N` requests at concurrency 16 in two
//! fresh processes; the difference over `2N` requests cancels start-up and
//! shutdown. The upstream and load generator run natively.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    Proc,
    bench_proxy::{
        ensure_nginx, free_port, kedge_config, nginx_config, pinned, start_upstream, wait_port,
    },
};

/// Requests of the shorter run (a smoke run: `SMOKE_REQUESTS`).
const REQUESTS: u64 = 2000;
const SMOKE_REQUESTS: u64 = 25;

/// `smoke`: a few requests, nothing written; fails unless every count came out.
pub fn run(root: &Path, bin: &Path, smoke: bool) -> Result<()> {
    let requests = if smoke { SMOKE_REQUESTS } else { REQUESTS };
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("bench instructions: installing valgrind (Debian package)");
        crate::apt_install(&["valgrind"])?;
    }
    let nginx = ensure_nginx()?;
    let work = std::env::temp_dir().join(format!("kedge-bench-instr-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let up_port = free_port();
    let _upstream = start_upstream(bin, up_port, 1024)?;

    let mut rows = Vec::new();
    // A smoke run on the debug build (tens of times slower under valgrind)
    // counts plain requests only.
    let modes: &[bool] = if smoke { &[false] } else { &[false, true] };
    for &stream in modes {
        let per_request = |target: &str| -> Result<f64> {
            let count = |n: u64| -> Result<u64> {
                let port = free_port();
                let mut cmd = Command::new("valgrind");
                cmd.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"]);
                match target {
                    "kedge" => {
                        let conf = work.join("kedge.toml");
                        std::fs::write(&conf, kedge_config(port, up_port, free_port()))?;
                        let state = work.join(format!("state-{n}-{stream}"));
                        std::fs::create_dir_all(&state)?;
                        cmd.arg(bin.join("kedge"))
                            .args(["run", "--config"])
                            .arg(conf)
                            .env("KEDGE_LOG", "warn")
                            .env("STATE_DIRECTORY", state);
                    }
                    _ => {
                        let conf = work.join("nginx.conf");
                        std::fs::write(&conf, nginx_config(&work, port, up_port, false))?;
                        cmd.arg(&nginx).arg("-c").arg(conf).arg("-p").arg(&work);
                    }
                }
                let log = work.join(format!("valgrind-{target}-{n}.log"));
                let mut proxy = Proc(
                    cmd.stdout(Stdio::null())
                        .stderr(std::fs::File::create(&log)?)
                        .spawn()
                        .context("starting valgrind")?,
                );
                wait_port(port)?;
                let mut load = pinned("0", &bin.join("kedge-load"));
                load.args([
                    "--url",
                    &format!("http://127.0.0.1:{port}/v1/chat/completions"),
                ])
                .args(["--concurrency", "16", "--duration-s", "1000"])
                .args(["--requests", &n.to_string(), "--max-tokens", "16"]);
                if stream {
                    load.arg("--stream");
                }
                let out = load.output().context("running kedge-load")?;
                let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
                if report["ok"].as_u64() != Some(n) {
                    bail!("{target}: {n} requests sent, answered: {report}");
                }
                // valgrind writes its totals at exit, which a debug build on a
                // busy machine may take a while to reach.
                proxy.stop(std::time::Duration::from_secs(120));
                let text = std::fs::read_to_string(&log)?;
                text.lines()
                    .find_map(|l| l.split("Collected : ").nth(1))
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| format!("no instruction total in {}", log.display()))
            };
            let (short, long) = (count(requests)?, count(3 * requests)?);
            if long <= short {
                bail!(
                    "{target}: {long} instructions for {} requests, {short} for {requests}",
                    3 * requests
                );
            }
            Ok((long - short) as f64 / (2 * requests) as f64)
        };
        let kedge = per_request("kedge")?;
        let nginx = per_request("nginx")?;
        println!(
            "bench instructions: stream={stream:<5} kedge {kedge:>8.0} nginx {nginx:>8.0} instructions/request ({:.2}x)",
            kedge / nginx
        );
        rows.push((stream, kedge, nginx));
    }
    if smoke {
        let _ = std::fs::remove_dir_all(&work);
        println!("bench instructions smoke: ok (both proxies counted)");
        return Ok(());
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Instructions per request (`cargo xtask bench instructions`)\n\n\
         User-space instructions each proxy executes per request (valgrind's callgrind; the \
         difference between a run of {REQUESTS} and one of {} requests at concurrency 16, over \
         {} requests; kernel work not counted). Same upstream and load generator as the proxy \
         bench, kedge configured as there. Plain requests repeat to well under 1 % on a busy \
         machine; a stream's count also depends on how its events fall into reads (timing), \
         and has varied by up to 3 % between runs.\n\n\
         | stream | kedge | nginx | kedge/nginx |\n|---|---|---|---|",
        3 * REQUESTS,
        2 * REQUESTS
    );
    for (stream, kedge, nginx) in rows {
        let _ = writeln!(
            md,
            "| {stream} | {kedge:.0} | {nginx:.0} | {:.2} |",
            kedge / nginx
        );
    }
    println!("{md}");
    crate::replace_section(&root.join("docs/benchmarks.md"), "instructions", &md)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
