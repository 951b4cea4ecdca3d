//! `cargo xtask demo [SECONDS]`: kedge in front of a simulated GPU server, with
//! three client networks in their own namespaces — a priority team, a batch
//! team, and an abusive source flooding connections — driven for about a
//! minute, shown live and summarised at the end. Everything it creates
//! (namespaces, veths, pins, processes, files) is removed when it ends, even on
//! Ctrl-C or error.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{http_get, sh};
use serde_json::Value;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The three client networks: name, namespace, subnet byte, load arguments.
struct Team {
    name: &'static str,
    class: &'static str,
    third_octet: u8,
    load: Vec<String>,
}

struct Demo {
    work: PathBuf,
    children: Vec<Child>,
    namespaces: Vec<String>,
    links: Vec<String>,
    pin_root: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for l in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", l])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Sums samples of `name` whose labels contain every `k="v"` pair.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// All label values of `label` seen on `name`.
fn label_values(text: &str, name: &str, label: &str) -> Vec<String> {
    let key = format!("{label}=\"");
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let start = l.find(&key)? + key.len();
            Some(l[start..start + l[start..].find('"')?].to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn run(root: &Path, seconds: u64) -> Result<()> {
    // SAFETY: installing a handler that only sets an atomic flag.
    unsafe {
        libc_signal(2, on_signal as *const () as usize);
        libc_signal(15, on_signal as *const () as usize);
    }
    let bin = root.join("target/release");
    let id = std::process::id() % 10_000;
    let work = std::env::temp_dir().join(format!("kedge-demo-{id}"));
    std::fs::create_dir_all(&work)?;
    let mut demo = Demo {
        work: work.clone(),
        children: Vec::new(),
        namespaces: Vec::new(),
        links: Vec::new(),
        pin_root: PathBuf::from(format!("/sys/fs/bpf/kedge-demo-{id}")),
    };

    // The fake GPU: a simulated model server whose busy slots are the GPU's
    // utilization, read by kedge through the real NVML client and a fake driver.
    let gpu_state = work.join("gpu-state");
    std::fs::write(&gpu_state, "0 0 85899345920\n")?;
    let nvml = work.join("libnvidia-ml.so.1");
    sh(
        "cc",
        &[
            "-shared",
            "-fPIC",
            "-O2",
            &format!("-DFAKE_NVML_STATE=\"{}\"", gpu_state.display()),
            "-o",
            nvml.to_str().unwrap(),
            root.join("tests/fake_nvml/fake_nvml.c").to_str().unwrap(),
        ],
    )
    .context("building the fake NVML library (needs a C compiler)")?;
    let spawn = |demo: &mut Demo, cmd: &mut Command, log: &str| -> Result<()> {
        let log = std::fs::File::create(work.join(log))?;
        demo.children
            .push(cmd.stdout(Stdio::null()).stderr(log).spawn()?);
        Ok(())
    };
    spawn(
        &mut demo,
        Command::new(bin.join("kedge-sim"))
            .args([
                "--listen",
                "127.0.0.1:18700",
                "--slots",
                "6",
                "--ttft-ms",
                "60",
            ])
            .args(["--decode-ms-per-token", "12", "--model", "llama-local"])
            .arg("--gpu-state")
            .arg(&gpu_state),
        "gpu-server.log",
    )?;
    spawn(
        &mut demo,
        Command::new(bin.join("kedge-sim"))
            .args([
                "--listen",
                "127.0.0.1:18701",
                "--slots",
                "64",
                "--ttft-ms",
                "250",
            ])
            .args(["--decode-ms-per-token", "8", "--model", "gpt-cloud"]),
        "cloud.log",
    )?;

    // Three client networks, each its own namespace, joined by a bridge on the
    // host: kedge's program watches the bridge's ingress.
    let teams = [
        Team {
            name: "product team",
            class: "interactive",
            third_octet: 1,
            load: args("--concurrency 3 --stream --max-tokens 24"),
        },
        Team {
            name: "batch team",
            class: "batch",
            third_octet: 2,
            load: args("--concurrency 12 --max-tokens 48 --prompt-repeat 40"),
        },
        Team {
            name: "abusive source",
            class: "standard",
            third_octet: 3,
            load: args("--concurrency 16 --new-connection --max-tokens 4 --connect-timeout-ms 300"),
        },
    ];
    let bridge = format!("kdbr{id}");
    sh("ip", &["link", "add", &bridge, "type", "bridge"])?;
    demo.links.push(bridge.clone());
    sh("ip", &["addr", "add", "198.19.0.1/16", "dev", &bridge])?;
    sh("ip", &["link", "set", &bridge, "up"])?;
    for t in &teams {
        let ns = format!("kdemo{id}-{}", t.third_octet);
        let host = format!("kdh{id}-{}", t.third_octet);
        let peer = format!("kdc{id}-{}", t.third_octet);
        sh("ip", &["netns", "add", &ns])?;
        demo.namespaces.push(ns.clone());
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        )?;
        demo.links.push(host.clone());
        sh("ip", &["link", "set", &peer, "netns", &ns])?;
        sh("ip", &["link", "set", &host, "master", &bridge])?;
        sh("ip", &["link", "set", &host, "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.19.{}.2/16", t.third_octet),
                "dev",
                &peer,
            ],
        )?;
        sh("ip", &["-n", &ns, "link", "set", &peer, "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
    }
    let ifaces = vec![bridge];
    let config = work.join("kedge.toml");
    std::fs::write(&config, demo_config(&ifaces, &demo.pin_root, &nvml))?;
    spawn(
        &mut demo,
        Command::new(bin.join("kedge"))
            .args(["run", "--config"])
            .arg(&config)
            .env("KEDGE_LOG", "warn"),
        "kedge.log",
    )?;
    let admin = "127.0.0.1:18790";
    let ready = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/healthz").is_none() {
        if Instant::now() > ready || demo.children.last_mut().unwrap().try_wait()?.is_some() {
            bail!(
                "kedge did not start: {}",
                std::fs::read_to_string(work.join("kedge.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Drive the traffic; each team's generator writes its totals once a second.
    for t in &teams {
        let ns = format!("kdemo{id}-{}", t.third_octet);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(bin.join("kedge-load"))
            .args(["--url", "http://198.19.0.1:18780/v1/chat/completions"])
            .args(["--model", "llama", "--duration-s", &seconds.to_string()])
            .args([
                "--progress",
                work.join(format!("load-{}.json", t.third_octet))
                    .to_str()
                    .unwrap(),
            ])
            .args(&t.load);
        spawn(&mut demo, &mut cmd, &format!("load-{}.log", t.third_octet))?;
    }

    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(seconds + 3)
        && !INTERRUPTED.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_secs(1));
        let metrics = http_get(admin, "/metrics").unwrap_or_default();
        last = render(&teams, &work, &metrics, started.elapsed(), seconds);
        print!("\x1b[2J\x1b[H{last}");
        let _ = std::io::stdout().flush();
    }
    println!("\x1b[2J\x1b[H== kedge demo: final ==\n{last}");
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("interrupted; cleaning up");
    }
    println!("cleaned up: namespaces, veths, pinned maps and processes removed");
    Ok(())
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn render(teams: &[Team], work: &Path, m: &str, elapsed: Duration, seconds: u64) -> String {
    let mut out = String::new();
    let done = (elapsed.as_secs_f64() / seconds as f64).min(1.0);
    let bar = "#".repeat((done * 40.0) as usize);
    out += &format!(
        "kedge demo  [{bar:<40}] {:>3.0}%  {:.0}/{seconds} s\n\n",
        done * 100.0,
        elapsed.as_secs_f64().min(seconds as f64)
    );
    out += &format!(
        "{:<16} {:<12} {:>8} {:>9} {:>9} {:>10} {:>9}\n",
        "CLIENTS", "CLASS", "SERVED", "REFUSED", "NO CONN", "KERNEL DROP", "p99 ms"
    );
    for t in teams {
        let load: Value =
            std::fs::read_to_string(work.join(format!("load-{}.json", t.third_octet)))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(Value::Null);
        let refused: u64 = load["statuses"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| !k.starts_with('2'))
                    .map(|(_, v)| v.as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        let kernel_drops = metric_sum(
            m,
            "kedge_kernel_packets_total",
            &[("class", t.class), ("action", "drop")],
        );
        out += &format!(
            "{:<16} {:<12} {:>8} {:>9} {:>9} {:>10} {:>9.1}\n",
            t.name,
            t.class,
            load["ok"].as_u64().unwrap_or(0),
            refused,
            load["connect_failures"].as_u64().unwrap_or(0),
            kernel_drops,
            load["latency_ms"]["p99"].as_f64().unwrap_or(0.0)
        );
    }
    out += "\nrouting decisions: ";
    let reasons = label_values(m, "kedge_route_decisions_total", "reason");
    let mut parts = BTreeMap::new();
    for r in &reasons {
        parts.insert(
            r.clone(),
            metric_sum(m, "kedge_route_decisions_total", &[("reason", r)]),
        );
    }
    out += &parts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("  ");
    out += &format!(
        "\nGPU utilization: {:.0}%   admission (batch class): {:.0}‰   queued now: {:.0}\n",
        metric_sum(m, "kedge_gpu_utilization_ratio", &[]) * 100.0,
        metric_sum(m, "kedge_admission_permille", &[("class", "batch")]),
        metric_sum(m, "kedge_queue_depth", &[]),
    );
    for scope in label_values(m, "kedge_budget_used_ratio", "scope") {
        for limit in label_values(m, "kedge_budget_used_ratio", "limit") {
            let used = metric_sum(
                m,
                "kedge_budget_used_ratio",
                &[("scope", &scope), ("limit", &limit)],
            );
            if used > 0.0 {
                out += &format!("budget {scope} {limit}: {:.0}% used\n", used * 100.0);
            }
        }
    }
    out += &format!(
        "served locally: {:.0}%   spend: ${:.4}\n",
        metric_sum(m, "kedge_route_local_ratio", &[]) * 100.0,
        metric_sum(m, "kedge_spend_dollars_total", &[])
    );
    out
}

/// The demo's config: kedge guards the three host-side veths.
fn demo_config(ifaces: &[String], pin_root: &Path, nvml: &Path) -> String {
    include_str!("../../config/demo.toml")
        .replace("{interface}", &ifaces[0])
        .replace("{pin_root}", &pin_root.display().to_string())
        .replace("{nvml}", &nvml.display().to_string())
}

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

unsafe extern "C" {
    #[link_name = "signal"]
    fn libc_signal(signum: i32, handler: usize) -> usize;
}
