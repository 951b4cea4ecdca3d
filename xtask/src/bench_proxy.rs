//! `cargo xtask bench proxy`: the same load sent directly to a simulated
//! upstream that answers instantly, through nginx as a plain reverse proxy, and
//! through kedge — in one run, so the ratios compare like with like.
//!
//! Placement on the 2-core machine (`taskset`): the load generator on CPU 0,
//! the proxy under test and the upstream on CPU 1. Results go to
//! docs/benchmarks.md (table) and docs/bench-proxy.json (raw).
//!
//! Memory: kedge's RSS idle and at its peak under load, and what an idle
//! keep-alive connection costs each proxy (RSS growth per connection while
//! 2 000 connections that each made one request rest, after 200 to warm up),
//! measured on the fresh processes before the load.
//!
//! `smoke` (`cargo xtask test`, `cargo xtask bench proxy --smoke`): concurrency
//! 1 and 16 only, writes nothing, and fails unless every target served every
//! request of every cell: the pipeline works, whatever the figures.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    Proc,
    host::{self, HostTicks, STEAL_DISTURBED_PCT},
};
use serde_json::{Value, json};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn pinned(cpu: &str, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", cpu]).arg(program);
    c
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Raises this process's open-file limit to its hard limit (inherited by the
/// proxies it starts): the idle-connection measurement holds thousands.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// RSS growth per idle keep-alive connection to `port` (KiB), the RSS of
/// `pids` summed: `warm` connections first (lazy state, pools), then `n`
/// more, each after one plain request answered in full; all kept open until
/// the second reading, then closed.
fn idle_connection_kib(port: u16, pids: &[u32], warm: usize, n: usize) -> Result<f64> {
    let body = r#"{"model":"sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let rss = || pids.iter().map(|p| rss_kib(*p)).sum::<u64>();
    let open = |count: usize, held: &mut Vec<TcpStream>| -> Result<()> {
        for _ in 0..count {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            read_answer(&mut s)?;
            held.push(s);
        }
        Ok(())
    };
    let mut held = Vec::with_capacity(warm + n);
    open(warm, &mut held)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = rss();
    open(n, &mut held)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = rss();
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Reads one content-length framed answer off `s`; fails on anything else.
fn read_answer(s: &mut TcpStream) -> Result<()> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("closed before the answer ended");
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("answered {}", head.lines().next().unwrap_or(""));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("an answer without content-length")?;
        if got.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

/// CPU time (user + system, every thread) `pid` has used, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name: utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The kernel reports clock ticks of 1/100 s (USER_HZ) on every Linux ABI.
    (ticks(11) + ticks(12)) * 10_000
}

/// `pid` and its children (nginx's master and its worker).
fn family(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// kedge on CPU 1 with `config`, its ledger in `state`, serving `port`.
fn start_kedge(bin: &Path, config: &Path, state: &Path, port: u16) -> Result<Proc> {
    let kedge = Proc(
        pinned("1", &bin.join("kedge"))
            .args(["run", "--config"])
            .arg(config)
            .env("KEDGE_LOG", "warn")
            .env("STATE_DIRECTORY", state)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting kedge with {}", config.display()))?,
    );
    wait_port(port)?;
    Ok(kedge)
}

/// The simulated upstream on CPU 1, answering at once, `slots` at a time.
pub fn start_upstream(bin: &Path, port: u16, slots: u32) -> Result<Proc> {
    let upstream = Proc(
        pinned("1", &bin.join("kedge-sim"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--slots", &slots.to_string()])
            .args([
                "--ttft-ms",
                "0",
                "--prefill-us-per-token",
                "0",
                "--decode-ms-per-token",
                "0",
            ])
            .stderr(Stdio::null())
            .spawn()
            .context("starting kedge-sim")?,
    );
    wait_port(port)?;
    Ok(upstream)
}

/// nginx as a plain reverse proxy to the upstream; `master` off runs the
/// one process that serves (for valgrind).
pub fn nginx_config(work: &Path, port: u16, up_port: u16, master: bool) -> String {
    format!(
        "daemon off; master_process {}; worker_processes 1; pid {pid}; error_log stderr error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off;\n\
           upstream up {{ server 127.0.0.1:{up_port}; keepalive 128; }}\n\
           server {{ listen 127.0.0.1:{port};\n\
             location / {{ proxy_pass http://up; proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
        if master { "on" } else { "off" },
        pid = work.join("nginx.pid").display()
    )
}

/// kedge with everything on: classification, a routed model, DRR
/// scheduling, a tenant budget (and so the ledger) and metrics.
pub fn kedge_config(port: u16, up_port: u16, admin_port: u16) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[kernel]\nattach = \"off\"\n\
         [[class]]\nname = \"standard\"\npriority = 2\n\
         [[network]]\ncidr = \"127.0.0.0/8\"\nclass = \"standard\"\ntenant = \"bench\"\n\
         [[backend]]\nname = \"sim\"\nurl = \"http://127.0.0.1:{up_port}\"\n\
         [[route]]\nmodel = \"sim\"\n[[route.arm]]\nbackend = \"sim\"\nkind = \"local\"\nmax_context = 32768\n\
         [schedule]\npolicy = \"drr\"\nmax_in_flight = 1024\nmax_queue = 4096\n\
         [gpu]\nsource = \"none\"\n\
         [budget]\n[[budget.tenant]]\nname = \"bench\"\ntokens_per_minute = {{ max = 1000000000 }}\n\
         requests_per_minute = {{ max = 100000000 }}\n\
         [metrics]\naddr = \"127.0.0.1:{admin_port}\"\n"
    )
}

pub fn ensure_nginx() -> Result<PathBuf> {
    let nginx = PathBuf::from("/usr/sbin/nginx");
    if !nginx.exists() {
        println!("bench: installing nginx (Debian package) for the baseline");
        crate::apt_install(&["nginx-light"]).or_else(|_| crate::apt_install(&["nginx"]))?;
    }
    Ok(nginx)
}

/// Rounds per cell in a full run (each target once per round).
const ROUNDS: usize = 5;

/// One run of `kedge-load` against `port`, with the CPU time `pids` spent.
fn measure(
    bin: &Path,
    port: u16,
    pids: &[u32],
    concurrency: usize,
    stream: bool,
    seconds: f64,
) -> Result<Value> {
    let cpu_before: u64 = pids.iter().map(|p| cpu_us(*p)).sum();
    let host_before = HostTicks::now();
    let mut load = pinned("0", &bin.join("kedge-load"));
    load.args([
        "--url",
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
    ])
    .args(["--concurrency", &concurrency.to_string()])
    .args(["--duration-s", &seconds.to_string(), "--max-tokens", "16"]);
    if stream {
        load.arg("--stream");
    }
    let out = load.output().context("running kedge-load")?;
    let mut result: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "kedge-load output: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let cpu = pids.iter().map(|p| cpu_us(*p)).sum::<u64>() - cpu_before;
    result["host_steal_pct"] = json!(HostTicks::now().since(host_before).steal_pct);
    let served = result["ok"].as_u64().unwrap_or(0).max(1);
    result["cpu_us_per_request"] = json!(cpu as f64 / served as f64);
    Ok(result)
}

/// The runs of one target in one cell as one result: the median of each
/// figure (throughput, p50, p99, CPU) over the `counted` rounds, so a single
/// disturbed round neither makes nor breaks a ratio, and the sums of the
/// counts over every round (an error in a left-out round still shows).
fn median_of(runs: &[Value], counted: &[usize]) -> Value {
    let median = |f: &dyn Fn(&Value) -> f64| {
        host::median(counted.iter().map(|&r| f(&runs[r])).collect()).unwrap_or(0.0)
    };
    let sum = |key: &str| {
        runs.iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    json!({
        "throughput_rps": median(&|r| r["throughput_rps"].as_f64().unwrap_or(0.0)),
        "latency_ms": {
            "p50": median(&|r| r["latency_ms"]["p50"].as_f64().unwrap_or(0.0)),
            "p99": median(&|r| r["latency_ms"]["p99"].as_f64().unwrap_or(0.0)),
        },
        "cpu_us_per_request": median(&|r| r["cpu_us_per_request"].as_f64().unwrap_or(0.0)),
        "ok": sum("ok"),
        "responses": sum("responses"),
        "connect_failures": sum("connect_failures"),
        "timeouts": sum("timeouts"),
        "other_errors": sum("other_errors"),
    })
}

/// The targets, in the order of a round.
const TARGETS: [&str; 4] = ["direct", "nginx", "kedge", "kedge-plain"];

/// One cell's rows (one per target, `runs[t]` its rounds): only the rounds
/// the hypervisor left alone count, if any did.
fn cell_rows(runs: Vec<Vec<Value>>, stream: bool, concurrency: usize) -> Vec<Value> {
    let rounds = runs.first().map_or(0, Vec::len);
    let steal: Vec<f64> = (0..rounds)
        .map(|r| {
            runs.iter()
                .map(|t| t[r]["host_steal_pct"].as_f64().unwrap_or(0.0))
                .fold(0.0, f64::max)
        })
        .collect();
    let counted = host::counted_rounds(&steal);
    TARGETS
        .iter()
        .zip(runs)
        .map(|(name, runs)| {
            let result = median_of(&runs, &counted.rounds);
            println!(
                "bench proxy: {:>11} stream={stream:<5} c={concurrency:<3} {:>8.0} req/s p50 {:>7.3} ms p99 {:>7.3} ms {:>6.1} us CPU/request (median of {} of {rounds} rounds, {} calm)",
                name,
                result["throughput_rps"].as_f64().unwrap_or(0.0),
                result["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                result["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
                result["cpu_us_per_request"].as_f64().unwrap_or(0.0),
                counted.rounds.len(),
                counted.calm,
            );
            json!({
                "target": name, "stream": stream, "concurrency": concurrency, "result": result,
                "rounds": runs, "counted_rounds": counted.rounds, "calm_rounds": counted.calm,
            })
        })
        .collect()
}

/// Writes the report of a measured run to docs/ (table and raw JSON).
fn publish(root: &Path, report: &Value, seconds: f64) -> Result<()> {
    let docs = root.join("docs");
    let md = summarise(report, seconds);
    println!("{md}");
    std::fs::write(
        docs.join("bench-proxy.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    crate::replace_section(&docs.join("benchmarks.md"), "proxy", &md)
}

/// `cargo xtask bench proxy --from-json`: the report again from the rounds
/// in docs/bench-proxy.json (after a change to how they are summarised;
/// nothing is measured).
pub fn rerender(root: &Path, seconds: f64) -> Result<()> {
    let mut report = crate::read_bench_json(root, "proxy")?;
    let old = report["rows"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for cell in old.chunks(TARGETS.len()) {
        let runs = cell
            .iter()
            .map(|r| r["rounds"].as_array().cloned().unwrap_or_default())
            .collect();
        let (stream, c) = (&cell[0]["stream"], &cell[0]["concurrency"]);
        rows.extend(cell_rows(
            runs,
            stream.as_bool().unwrap_or(false),
            c.as_u64().unwrap_or(0) as usize,
        ));
    }
    report["rows"] = json!(rows);
    let seconds = report["seconds"].as_f64().unwrap_or(seconds);
    publish(root, &report, seconds)
}

/// `bin`: the directory holding kedge, kedge-sim and kedge-load.
pub fn run(root: &Path, bin: &Path, seconds: f64, smoke: bool) -> Result<()> {
    let concurrencies: &[usize] = if smoke { &[1, 16] } else { &[1, 16, 64] };
    raise_open_files();
    let nginx = ensure_nginx()?;
    let work = std::env::temp_dir().join(format!("kedge-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    let up_port = free_port();
    let upstream = start_upstream(bin, up_port, 1024)?;

    let nginx_port = free_port();
    let nginx_conf = work.join("nginx.conf");
    std::fs::write(&nginx_conf, nginx_config(&work, nginx_port, up_port, true))?;
    let nginx_proc = Proc(
        pinned("1", &nginx)
            .args(["-c"])
            .arg(&nginx_conf)
            .args(["-p"])
            .arg(&work)
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?,
    );
    wait_port(nginx_port)?;

    let kedge_port = free_port();
    let admin_port = free_port();
    let kedge_conf = work.join("kedge.toml");
    std::fs::write(&kedge_conf, kedge_config(kedge_port, up_port, admin_port))?;
    let kedge = start_kedge(bin, &kedge_conf, &work, kedge_port)?;
    let kedge_idle_rss = rss_kib(kedge.0.id());
    let (warm, idle_n) = if smoke { (20, 100) } else { (200, 2000) };
    // Not worth the whole run: a failure (too few file descriptors) is
    // reported and the figure left out.
    let idle_kib = |port: u16, pids: &[u32]| match idle_connection_kib(port, pids, warm, idle_n) {
        Ok(kib) => Some(kib),
        Err(e) => {
            println!("bench proxy: idle connections not measured: {e:#}");
            None
        }
    };
    let idle_connection = json!({
        "connections": idle_n,
        "nginx_kib": idle_kib(nginx_port, &family(nginx_proc.0.id())),
        "kedge_kib": idle_kib(kedge_port, &[kedge.0.id()]),
    });

    // The same proxy without the governance config (no routes, no tenant
    // budget, the default scheduler): what that config costs on top of the
    // base request path, ledger and metrics included.
    let plain_port = free_port();
    let plain_conf = work.join("kedge-plain.toml");
    let plain_state = work.join("plain");
    std::fs::create_dir_all(&plain_state)?;
    std::fs::write(
        &plain_conf,
        format!(
            "[listen]\naddr = \"127.0.0.1:{plain_port}\"\n[kernel]\nattach = \"off\"\n\
             [[class]]\nname = \"standard\"\npriority = 2\n\
             [[network]]\ncidr = \"127.0.0.0/8\"\nclass = \"standard\"\ntenant = \"bench\"\n\
             [[backend]]\nname = \"sim\"\nurl = \"http://127.0.0.1:{up_port}\"\n\
             [gpu]\nsource = \"none\"\n\
             [metrics]\naddr = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )?;
    let plain = start_kedge(bin, &plain_conf, &plain_state, plain_port)?;

    // Each target (in the order of `TARGETS`), and the processes whose CPU
    // time it costs.
    let targets = [
        (up_port, vec![upstream.0.id()]),
        (nginx_port, family(nginx_proc.0.id())),
        (kedge_port, vec![kedge.0.id()]),
        (plain_port, vec![plain.0.id()]),
    ];
    let rounds = if smoke { 1 } else { ROUNDS };
    let mut rows = Vec::new();
    let run_start = HostTicks::now();
    let mut kedge_peak_rss = kedge_idle_rss;
    for stream in [false, true] {
        for &concurrency in concurrencies {
            // Rounds of every target back to back, so drift on a shared
            // machine hits all of them alike; each figure is the median of
            // its rounds.
            let mut runs: Vec<Vec<Value>> = vec![Vec::new(); targets.len()];
            for _ in 0..rounds {
                for (t, (port, pids)) in targets.iter().enumerate() {
                    let result = measure(bin, *port, pids, concurrency, stream, seconds)?;
                    if t == 2 {
                        kedge_peak_rss = kedge_peak_rss.max(rss_kib(kedge.0.id()));
                    }
                    runs[t].push(result);
                }
            }
            rows.extend(cell_rows(runs, stream, concurrency));
        }
    }
    let report = json!({
        "rows": rows,
        "kedge_rss_kib": {"idle": kedge_idle_rss, "under_load": kedge_peak_rss},
        "idle_connection": idle_connection,
        "host_steal_pct": HostTicks::now().since(run_start).steal_pct,
        "seconds": seconds,
    });
    let _ = std::fs::remove_dir_all(&work);
    if smoke {
        println!("{}", summarise(&report, seconds));
        return check_smoke(&rows);
    }
    publish(root, &report, seconds)
}

/// Every cell: requests answered, all 2xx, none failed or timed out.
fn check_smoke(rows: &[Value]) -> Result<()> {
    let mut bad = Vec::new();
    for r in rows {
        let v = &r["result"];
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let failed = n("connect_failures") + n("timeouts") + n("other_errors");
        if n("ok") == 0 || n("ok") != n("responses") || failed > 0 {
            bad.push(format!(
                "{} stream={} c={}: {v}",
                r["target"], r["stream"], r["concurrency"]
            ));
        }
    }
    if !bad.is_empty() {
        bail!(
            "bench proxy smoke: cells with errors or nothing served:\n{}",
            bad.join("\n")
        );
    }
    println!(
        "bench proxy smoke: ok ({} cells, every request answered 2xx)",
        rows.len()
    );
    Ok(())
}

fn summarise(report: &Value, seconds: f64) -> String {
    let rows = report["rows"].as_array().map_or(&[][..], Vec::as_slice);
    let mut concurrencies: Vec<usize> = rows
        .iter()
        .filter_map(|r| r["concurrency"].as_u64())
        .map(|c| c as usize)
        .collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    let row = |target: &str, stream: bool, c: usize| {
        rows.iter()
            .find(|r| r["target"] == target && r["stream"] == stream && r["concurrency"] == c)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let get = |target: &str, stream: bool, c: usize| row(target, stream, c)["result"].clone();
    // Every round of one cell, target by target (same order in each).
    let all_rounds = |target: &str, stream: bool, c: usize| -> Vec<Value> {
        row(target, stream, c)["rounds"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let counted = |stream: bool, c: usize| -> Vec<usize> {
        row("kedge", stream, c)["counted_rounds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_u64())
                    .map(|r| r as usize)
                    .collect()
            })
            .unwrap_or_default()
    };
    // The rounds that count: the calm ones, or all when none was.
    let rounds = |target: &str, stream: bool, c: usize| -> Vec<Value> {
        let all = all_rounds(target, stream, c);
        counted(stream, c)
            .into_iter()
            .filter_map(|r| all.get(r).cloned())
            .collect()
    };
    // A ratio of kedge to nginx taken within each round (the two ran seconds
    // apart, on the same machine state), then the median over the counted
    // rounds: the machine's drift between rounds cancels instead of adding
    // noise. None when nginx's figure was not positive in most counted rounds
    // (an added latency where the direct baseline was the slower one: no
    // ratio to take).
    let ratio = |stream: bool, c: usize, f: &dyn Fn(&Value, &Value) -> Option<f64>| {
        let (d, n, k) = (
            rounds("direct", stream, c),
            rounds("nginx", stream, c),
            rounds("kedge", stream, c),
        );
        let r: Vec<f64> = d
            .iter()
            .zip(&n)
            .zip(&k)
            .filter_map(|((d, n), k)| {
                let (kv, nv) = (f(k, d)?, f(n, d)?);
                (nv > 0.0).then_some(kv / nv)
            })
            .collect();
        if 2 * r.len() > d.len() {
            host::median(r)
        } else {
            None
        }
    };
    let cell_steal = |stream: bool, c: usize| {
        host::median(
            TARGETS
                .iter()
                .flat_map(|t| all_rounds(t, stream, c))
                .filter_map(|r| r["host_steal_pct"].as_f64())
                .collect(),
        )
        .unwrap_or(0.0)
    };
    let round_count = rows
        .first()
        .and_then(|r| r["rounds"].as_array())
        .map_or(0, Vec::len);
    let idle_rss = report["kedge_rss_kib"]["idle"].as_u64().unwrap_or(0);
    let peak_rss = report["kedge_rss_kib"]["under_load"].as_u64().unwrap_or(0);
    let run_steal = report["host_steal_pct"].as_f64().unwrap_or(0.0);
    let idle = &report["idle_connection"];
    let shown = |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{r:.2}"));
    let throughput = |v: &Value, _: &Value| v["throughput_rps"].as_f64();
    let added_p99 = |v: &Value, d: &Value| {
        Some(v["latency_ms"]["p99"].as_f64()? - d["latency_ms"]["p99"].as_f64()?)
    };
    let p99 = |v: &Value, _: &Value| v["latency_ms"]["p99"].as_f64();
    let cpu_of = |v: &Value, _: &Value| v["cpu_us_per_request"].as_f64();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Proxy overhead (`cargo xtask bench proxy`)\n\n\
         Simulated upstream answering instantly (`kedge-sim`, 16 output tokens); {round_count} \
         rounds of {seconds} s, each round running all four targets back to back; every figure \
         but the host steal is the median of a cell's calm rounds (`calm`: how many of its rounds \
         had the host steal at most {STEAL_DISTURBED_PCT} % of the CPU time in each run; at 0, \
         every round counts), of an even count the mean of the middle two; \
         kedge with classification, a routed model, DRR scheduling, a tenant budget (reserve and commit \
         on every request, SQLite ledger) and metrics all on. \
         load generator `kedge-load` pinned to CPU 0, proxy and upstream on CPU 1. Added latency = \
         proxied p50/p99 minus direct p50/p99 at the same concurrency. The kedge/nginx columns are \
         the median over those rounds of the ratio within a round (nginx and kedge seconds apart), \
         not the ratio of the medians; `n/a` where the direct baseline's p99 was above nginx's in \
         most of them (no added latency to compare; the total p99 ratio still is).\n\n\
         | stream | conc. | direct req/s | nginx req/s | kedge req/s | kedge/nginx throughput | nginx added p50/p99 ms | kedge added p50/p99 ms | kedge/nginx added p99 | kedge/nginx p99 | calm |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for stream in [false, true] {
        for &c in &concurrencies {
            let (d, n, k) = (
                get("direct", stream, c),
                get("nginx", stream, c),
                get("kedge", stream, c),
            );
            let rps = |v: &Value| v["throughput_rps"].as_f64().unwrap_or(0.0);
            let lat = |v: &Value, p: &str| v["latency_ms"][p].as_f64().unwrap_or(0.0);
            let added = |v: &Value, p: &str| (lat(v, p) - lat(&d, p)).max(0.0);
            let _ = writeln!(
                md,
                "| {stream} | {c} | {:.0} | {:.0} | {:.0} | {} | {:.3} / {:.3} | {:.3} / {:.3} | {} | {} | {}/{} |",
                rps(&d),
                rps(&n),
                rps(&k),
                shown(ratio(stream, c, &throughput)),
                added(&n, "p50"),
                added(&n, "p99"),
                added(&k, "p50"),
                added(&k, "p99"),
                shown(ratio(stream, c, &added_p99)),
                shown(ratio(stream, c, &p99)),
                row("kedge", stream, c)["calm_rounds"].as_u64().unwrap_or(0),
                all_rounds("kedge", stream, c).len(),
            );
        }
    }
    let _ = writeln!(
        md,
        "\nCPU time per request of each process (user + system, all threads, from `/proc/PID/stat` \
         around each cell): the upstream's own when sent directly, the proxy's own otherwise. \
         `kedge plain` is the same binary with the governance config left out: no routes, no \
         tenant budget, the default scheduler; it still classifies, counts metrics, reserves and \
         commits against an empty budget and writes every request to the ledger. Host steal: \
         the share of the machine's CPU time the hypervisor gave to other guests during the \
         cell's rounds (median over all of them, from `/proc/stat`).\n\n\
         | stream | conc. | upstream µs | nginx µs | kedge µs | kedge/nginx CPU | kedge plain µs | kedge plain req/s | kedge plain added p99 ms | host steal % |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for stream in [false, true] {
        for &c in &concurrencies {
            let (d, n, k, p) = (
                get("direct", stream, c),
                get("nginx", stream, c),
                get("kedge", stream, c),
                get("kedge-plain", stream, c),
            );
            let cpu = |v: &Value| v["cpu_us_per_request"].as_f64().unwrap_or(0.0);
            let lat = |v: &Value, q: &str| v["latency_ms"][q].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                md,
                "| {stream} | {c} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.0} | {:.3} | {:.1} |",
                cpu(&d),
                cpu(&n),
                cpu(&k),
                shown(ratio(stream, c, &cpu_of)),
                cpu(&p),
                p["throughput_rps"].as_f64().unwrap_or(0.0),
                (lat(&p, "p99") - lat(&d, "p99")).max(0.0),
                cell_steal(stream, c),
            );
        }
    }
    let _ = writeln!(
        md,
        "\nkedge RSS: {idle_rss} KiB idle, {peak_rss} KiB peak under load.{} Host steal over \
         the whole run: {run_steal:.1} % of the machine's CPU time{}.",
        match (idle["kedge_kib"].as_f64(), idle["nginx_kib"].as_f64()) {
            (Some(k), Some(n)) => format!(
                " An idle keep-alive connection (RSS growth per connection over {} of them, \
                 each after one request): kedge {k:.1} KiB, nginx {n:.1} KiB.",
                idle["connections"]
            ),
            // A report from before this was measured.
            _ => String::new(),
        },
        if run_steal > STEAL_DISTURBED_PCT {
            " — a disturbed run: a cell's figures come from its calm rounds (column `calm`), \
             and a cell with none (0) is as noisy as its host"
        } else {
            ""
        }
    );
    md
}
