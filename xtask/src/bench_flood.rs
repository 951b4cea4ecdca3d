//! `cargo xtask bench flood`: a low-priority namespace floods the proxy port
//! with new connections while a high-priority namespace measures its own
//! requests. One run compares: no flood (baseline), no shaping, shaping in
//! userspace only (a per-tenant request limit: 429s), kedge's kernel program
//! (tc and XDP: per-source connection buckets), and an nftables per-source
//! connection limit (the usual alternative), in interleaved rounds. Everything
//! runs in namespaces created here and removed afterwards; kedge is pinned to
//! CPU 1, the clients to CPU 0.
//!
//! `smoke` (`cargo xtask test`, `cargo xtask bench flood --smoke`): the same
//! scenarios, one short round, writing nothing; it fails unless every scenario
//! ran, the high-priority client was served where it must be, and the kernel
//! program dropped most of the flood within its per-source budget.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    Proc,
    host::{self, HostTicks, STEAL_DISTURBED_PCT},
    sh,
};
use serde_json::{Value, json};

struct Net {
    namespaces: Vec<String>,
    bridge: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "kedge_bench"])
            .stderr(Stdio::null())
            .status();
    }
}

const HIGH: &str = "198.18.250.2";
const FLOOD: &str = "198.18.251.2";
const HOST: &str = "198.18.250.1";
const PORT: u16 = 18980;

struct Scenario {
    name: &'static str,
    flood: bool,
    attach: &'static str,
    userspace_limit: bool,
    nftables: bool,
}

/// `bin`: the directory holding kedge, kedge-sim and kedge-load.
pub fn run(root: &Path, bin: &Path, seconds: f64, smoke: bool) -> Result<()> {
    crate::apt_install(&["nftables"])?;
    let id = std::process::id() % 10_000;
    let work = std::env::temp_dir().join(format!("kedge-bench-flood-{id}"));
    std::fs::create_dir_all(&work)?;
    let net = Net {
        namespaces: vec![format!("kbh{id}"), format!("kbf{id}")],
        bridge: format!("kbbr{id}"),
    };
    sh("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
    sh(
        "ip",
        &["addr", "add", &format!("{HOST}/16"), "dev", &net.bridge],
    )?;
    sh("ip", &["link", "set", &net.bridge, "up"])?;
    for (ns, ip) in net.namespaces.iter().zip([HIGH, FLOOD]) {
        let (host, peer) = (format!("{ns}h"), format!("{ns}c"));
        sh("ip", &["netns", "add", ns])?;
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        )?;
        sh("ip", &["link", "set", &peer, "netns", ns])?;
        sh("ip", &["link", "set", &host, "master", &net.bridge])?;
        sh("ip", &["link", "set", &host, "up"])?;
        sh(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/16"), "dev", &peer],
        )?;
        sh("ip", &["-n", ns, "link", "set", &peer, "up"])?;
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        // The clients' own ports must not run out: the unshaped flood leaves
        // ~20 000 connections in TIME_WAIT in its namespace, and with the
        // default range and no reuse every later connect() failed at once
        // with EADDRNOTAVAIL (0 served, in every scenario after it), which
        // measures the load generator, not what is under test.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
        )?;
    }

    let up_port = 18981;
    let _upstream = crate::bench_proxy::start_upstream(bin, up_port, 4096)?;

    let scenarios = [
        Scenario {
            name: "baseline (no flood)",
            flood: false,
            attach: "off",
            userspace_limit: false,
            nftables: false,
        },
        Scenario {
            name: "flood, no shaping",
            flood: true,
            attach: "off",
            userspace_limit: false,
            nftables: false,
        },
        Scenario {
            name: "flood, kedge userspace only",
            flood: true,
            attach: "off",
            userspace_limit: true,
            nftables: false,
        },
        Scenario {
            name: "flood, kedge kernel (tc)",
            flood: true,
            attach: "tc",
            userspace_limit: false,
            nftables: false,
        },
        Scenario {
            name: "flood, kedge kernel (xdp)",
            flood: true,
            attach: "xdp",
            userspace_limit: false,
            nftables: false,
        },
        Scenario {
            name: "flood, nftables per-source limit",
            flood: true,
            attach: "off",
            userspace_limit: false,
            nftables: true,
        },
    ];
    // Rounds of every scenario back to back, so the host's drift (other
    // guests' load comes and goes by the minute) hits all of them alike.
    let rounds = if smoke { 1 } else { ROUNDS };
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); scenarios.len()];
    for round in 1..=rounds {
        for (sc, runs) in scenarios.iter().zip(&mut runs) {
            println!("bench flood: round {round}/{rounds}: {} ...", sc.name);
            runs.push(run_scenario(sc, bin, &work, &net, up_port, seconds, id)?);
        }
    }
    let rows = combine(&runs);
    if smoke {
        println!("{}", summarise(&rows, seconds, rounds));
        let _ = std::fs::remove_dir_all(&work);
        return check_smoke(&scenarios, &rows);
    }
    publish(root, &rows, seconds, rounds)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn run_scenario(
    sc: &Scenario,
    bin: &Path,
    work: &Path,
    net: &Net,
    up_port: u16,
    seconds: f64,
    id: u32,
) -> Result<Value> {
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/kedge-bench-{id}"));
    let kernel = if sc.attach == "off" {
        "[kernel]\nattach = \"off\"".to_string()
    } else {
        format!(
            "[kernel]\ninterface = \"{}\"\nattach = \"{}\"\npin_root = \"{}\"",
            net.bridge,
            sc.attach,
            pin_root.display()
        )
    };
    let budget = if sc.userspace_limit {
        "[budget]\n[[budget.tenant]]\nname = \"flood\"\nrequests_per_minute = { max = 1200 }\n"
    } else {
        ""
    };
    let config = format!(
        "[listen]\naddr = \"0.0.0.0:{PORT}\"\n{kernel}\n\
         [[class]]\nname = \"high\"\npriority = 0\n\
         [[class]]\nname = \"flood\"\npriority = 4\nsource_conn_rate = 20\nsource_conn_burst = 20\n\
         [[network]]\ncidr = \"{HIGH}/32\"\nclass = \"high\"\ntenant = \"high\"\n\
         [[network]]\ncidr = \"{FLOOD}/32\"\nclass = \"flood\"\ntenant = \"flood\"\n\
         [[backend]]\nname = \"sim\"\nurl = \"http://127.0.0.1:{up_port}\"\n\
         [schedule]\nmax_in_flight = 512\n[gpu]\nsource = \"none\"\n{budget}\n\
         [metrics]\naddr = \"127.0.0.1:18982\"\n"
    );
    let path = work.join("kedge.toml");
    let state = work.join(format!(
        "state-{}",
        sc.name.replace([' ', ',', '(', ')'], "_")
    ));
    std::fs::create_dir_all(&state)?;
    std::fs::write(&path, config)?;
    if sc.nftables {
        let rules = format!(
            "table inet kedge_bench {{ chain input {{ type filter hook input priority 0; policy accept;\n\
               tcp dport {PORT} ct state new meter flood {{ ip saddr limit rate over 20/second burst 20 packets }} drop\n}}\n}}\n"
        );
        let file = work.join("rules.nft");
        std::fs::write(&file, rules)?;
        sh("nft", &["-f", file.to_str().unwrap()])?;
    }
    let kedge = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(bin.join("kedge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("KEDGE_LOG", "warn")
            // A fresh ledger per scenario: budgets survive restarts, and the
            // previous scenario's flood would count against this one's.
            .env("STATE_DIRECTORY", &state)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let ready = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", 18982)).is_err() {
        if Instant::now() > ready {
            bail!("kedge did not start for {}", sc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let load = |ns: &str, args: &[&str]| -> Result<Child> {
        Ok(Command::new("ip")
            .args(["netns", "exec", ns, "taskset", "-c", "0"])
            .arg(bin.join("kedge-load"))
            .args([
                "--url",
                &format!("http://{HOST}:{PORT}/v1/chat/completions"),
            ])
            .args([
                "--duration-s",
                &seconds.to_string(),
                "--max-tokens",
                "4",
                "--new-connection",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?)
    };
    let host_before = HostTicks::now();
    let flood = if sc.flood {
        Some(load(
            &net.namespaces[1],
            &[
                "--concurrency",
                "64",
                "--connect-timeout-ms",
                "200",
                "--request-timeout-ms",
                "2000",
            ],
        )?)
    } else {
        None
    };
    let high = load(
        &net.namespaces[0],
        &[
            "--concurrency",
            "2",
            "--rate",
            "50",
            "--connect-timeout-ms",
            "1000",
            "--request-timeout-ms",
            "5000",
        ],
    )?;
    let high: Value =
        serde_json::from_slice(&high.wait_with_output()?.stdout).unwrap_or(Value::Null);
    let flood: Value = match flood {
        Some(f) => serde_json::from_slice(&f.wait_with_output()?.stdout).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let host = HostTicks::now().since(host_before);
    let metrics = crate::http_get("127.0.0.1:18982", "/metrics").unwrap_or_default();
    let kernel: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kedge_kernel_packets_total{") && l.contains("class=\"flood\""))
        .collect();
    drop(kedge);
    if sc.nftables {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "kedge_bench"])
            .status();
    }
    let _ = std::fs::remove_dir_all(&pin_root);
    Ok(
        json!({ "scenario": sc.name, "high": high, "flood": flood, "host_cpu_busy_pct": host.busy_pct, "host_steal_pct": host.steal_pct, "kernel_flood_counters": kernel }),
    )
}

/// The config's per-source limit for the flood class: 20 new connections/s, burst 20.
const FLOOD_SOURCE_RATE: f64 = 20.0;
const FLOOD_SOURCE_BURST: f64 = 20.0;

/// What a smoke run must show. The bounds hold whatever the machine's speed:
/// the kernel's source bucket admits at most burst + rate × time, and a dropped
/// SYN holds a flood worker for its whole 200 ms connect timeout, so 64
/// workers make several times more attempts than the bucket lets through.
fn check_smoke(scenarios: &[Scenario], rows: &[Value]) -> Result<()> {
    let n = |v: &Value| v.as_u64().unwrap_or(0) as f64;
    let attempts = |v: &Value| {
        n(&v["responses"]) + n(&v["connect_failures"]) + n(&v["timeouts"]) + n(&v["other_errors"])
    };
    let mut bad = Vec::new();
    for (sc, r) in scenarios.iter().zip(rows) {
        let (high, flood) = (&r["high"], &r["flood"]);
        if n(&high["ok"]) == 0.0 {
            bad.push(format!(
                "{}: the high-priority client got no answer: {high}",
                sc.name
            ));
            continue;
        }
        if sc.flood && attempts(flood) == 0.0 {
            bad.push(format!("{}: the flood made no attempt: {flood}", sc.name));
            continue;
        }
        // Without a flood, or with the kernel program, the high-priority client is served.
        if (!sc.flood || sc.attach != "off") && n(&high["ok"]) < 0.9 * attempts(high) {
            bad.push(format!(
                "{}: the high-priority client was served {} of {} times: {high}",
                sc.name,
                n(&high["ok"]),
                attempts(high)
            ));
        }
        if sc.attach != "off" {
            let served = n(&flood["ok"]);
            let elapsed = flood["elapsed_s"].as_f64().unwrap_or(0.0);
            let cap = FLOOD_SOURCE_BURST + FLOOD_SOURCE_RATE * (elapsed + 1.0);
            let dropped = 1.0 - served / attempts(flood);
            if served > cap || dropped < 0.5 {
                bad.push(format!(
                    "{}: the kernel let {served} of {} flood attempts through \
                     (at most {cap:.0} and under half expected): {flood}",
                    sc.name,
                    attempts(flood)
                ));
            }
        }
    }
    if !bad.is_empty() {
        bail!("bench flood smoke:\n{}", bad.join("\n"));
    }
    println!(
        "bench flood smoke: ok ({} scenarios; the kernel program dropped most of the flood)",
        rows.len()
    );
    Ok(())
}

/// Rounds per scenario in a full run.
const ROUNDS: usize = 3;

/// Each scenario's rounds as one row, from its counted rounds (the calm
/// ones: the host stole little during both the scenario and that round's
/// baseline; every round when none was calm): the counted round whose
/// high-priority p99 is their median, the slower of the middle two of an
/// even count (one real measurement, every column from the same run), its p99
/// against the baseline as the median of the ratio within a round (baseline
/// and scenario up to two minutes apart), and every round. `runs[0]` is the
/// baseline's.
fn combine(runs: &[Vec<Value>]) -> Vec<Value> {
    let p99 = |r: &Value| r["high"]["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
    let steal = |r: &Value| r["host_steal_pct"].as_f64().unwrap_or(0.0);
    runs.iter()
        .map(|rounds| {
            // What decides a round's calm: the scenario's steal or its
            // baseline's, whichever is worse.
            let worst: Vec<f64> = rounds
                .iter()
                .zip(&runs[0])
                .map(|(r, base)| steal(r).max(steal(base)))
                .collect();
            let counted = host::counted_rounds(&worst);
            let mut order = counted.rounds.clone();
            order.sort_by(|&a, &b| p99(&rounds[a]).total_cmp(&p99(&rounds[b])));
            let shown = order[order.len() / 2];
            let mut row = rounds[shown].clone();
            let vs_baseline = counted
                .rounds
                .iter()
                .filter(|&&r| p99(&runs[0][r]) > 0.0)
                .map(|&r| p99(&rounds[r]) / p99(&runs[0][r]))
                .collect();
            row["p99_vs_baseline"] = json!(host::median(vs_baseline));
            row["round_steal_pct"] = json!(worst[shown]);
            row["counted_rounds"] = json!(counted.rounds);
            row["calm_rounds"] = json!(counted.calm);
            row["rounds"] = json!(rounds);
            row
        })
        .collect()
}

/// Writes the report of a measured run to docs/ (table and raw JSON).
fn publish(root: &Path, rows: &[Value], seconds: f64, rounds: usize) -> Result<()> {
    let md = summarise(rows, seconds, rounds);
    println!("{md}");
    let docs = root.join("docs");
    std::fs::write(
        docs.join("bench-flood.json"),
        serde_json::to_string_pretty(&json!({ "rows": rows, "seconds": seconds }))?,
    )?;
    crate::replace_section(&docs.join("benchmarks.md"), "flood", &md)
}

/// `cargo xtask bench flood --from-json`: the report again from the rounds in
/// docs/bench-flood.json (after a change to how they are summarised; nothing
/// is measured).
pub fn rerender(root: &Path, seconds: f64) -> Result<()> {
    let report = crate::read_bench_json(root, "flood")?;
    let runs: Vec<Vec<Value>> = report["rows"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|r| r["rounds"].as_array().cloned().unwrap_or_default())
        .collect();
    if runs.is_empty() || runs[0].is_empty() {
        bail!("docs/bench-flood.json has no rounds to summarise");
    }
    let rounds = runs[0].len();
    let seconds = report["seconds"].as_f64().unwrap_or(seconds);
    publish(root, &combine(&runs), seconds, rounds)
}

fn summarise(rows: &[Value], seconds: f64, rounds: usize) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Connection flood (`cargo xtask bench flood`)\n\n\
         {rounds} round{} of {seconds} s per scenario, each round running every scenario back \
         to back. A round counts when it was calm (the host stole at most {STEAL_DISTURBED_PCT} % \
         of the CPU time during both the scenario and that round's baseline; `calm`: how many \
         were; at 0, every round counts). Each row is the scenario's counted round at the median \
         of the high-priority p99 (of an even count, the slower of the middle two), and `p99 vs \
         baseline` the median over the counted rounds of the ratio to the round's baseline (of \
         an even count, the mean of the middle two). High-priority client: 2 workers, 50 new \
         connections a second, one request each. Flood: 64 workers opening new connections as fast as they can (200 ms connect \
         timeout) from another CIDR. Kernel and nftables limits: 20 new connections/s per source. \
         Userspace-only: the flood tenant is limited to 1200 requests/min (429s after accepting). \
         kedge pinned to CPU 1, clients to CPU 0. Host CPU busy: the share of all CPUs' time \
         spent on this guest's work during the scenario (stolen time not counted); host steal: \
         the share the hypervisor gave to other guests instead, during the scenario or its \
         round's baseline, whichever lost more (from `/proc/stat`).\n\n\
         | scenario | high ok % | high p50 ms | high p99 ms | p99 vs baseline | flood attempts | flood served | flood refused/dropped % | host CPU busy % | host steal % | calm |\n\
         |---|---|---|---|---|---|---|---|---|---|---|",
        if rounds == 1 { "" } else { "s" }
    );
    for r in rows {
        let h = &r["high"];
        let f = &r["flood"];
        let n = |v: &Value| v.as_u64().unwrap_or(0) as f64;
        let high_total = n(&h["responses"])
            + n(&h["connect_failures"])
            + n(&h["timeouts"])
            + n(&h["other_errors"]);
        let high_ok = if high_total > 0.0 {
            n(&h["ok"]) / high_total * 100.0
        } else {
            0.0
        };
        let p99 = h["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
        let flood_total = n(&f["responses"])
            + n(&f["connect_failures"])
            + n(&f["timeouts"])
            + n(&f["other_errors"]);
        let flood_refused = flood_total - n(&f["ok"]);
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {}/{} |",
            r["scenario"].as_str().unwrap_or(""),
            high_ok,
            h["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            p99,
            r["p99_vs_baseline"]
                .as_f64()
                .map_or("n/a".to_owned(), |v| format!("{v:.2}x")),
            flood_total,
            n(&f["ok"]),
            if flood_total > 0.0 {
                flood_refused / flood_total * 100.0
            } else {
                0.0
            },
            r["host_cpu_busy_pct"].as_f64().unwrap_or(0.0),
            r["round_steal_pct"].as_f64().unwrap_or(0.0),
            r["calm_rounds"].as_u64().unwrap_or(0),
            rounds,
        );
    }
    md
}
