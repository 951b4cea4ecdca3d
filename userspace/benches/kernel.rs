//! `cargo xtask bench kernel`: what the kernel edge costs per packet.
//!
//! BPF_PROG_TEST_RUN runs a program `Plan::repeat` times on one frame and reports the
//! mean time per run. We measure the real programs (`kedge_tc`, `kedge_xdp`) on
//! an established packet (ACK) and on a new connection (SYN taking the full
//! path: classification, tenant, both buckets charged, mark), next to the empty
//! baselines (`kedge_tc_empty`, `kedge_xdp_empty`) in the same rounds, so the
//! ratios cancel the test-run harness's own cost and the machine's noise. Then
//! the SYN again with 10, 10 000 and 1 000 000 IPv4 CIDRs in `NETS_V4`.
//!
//! A SYN is measured twice: from a repeat source (its classification in the
//! per-CPU cache `SRC_CLASSES`, as for every run after the first on one frame)
//! and as from a new source (`SETTINGS_NO_CLASS_CACHE`: every run misses the
//! cache, walks the LPM trie and refills the cache entry, as a SYN flood from
//! distinct addresses would).
//!
//! A plain binary (`harness = false`), not a test: it needs root and takes a
//! while, and its output is a table for docs/benchmarks.md, not a verdict.
//!
//! `--smoke` (what `cargo xtask test` runs, in the debug profile): 10 000 runs
//! per call, one round, 10 and 10 000 CIDRs only. The figures are printed but
//! mean little; the point is that every path still runs and every SYN is
//! still admitted. Without root it prints `skipped:` and succeeds.

#[path = "../../tests/support/packet.rs"]
mod packet;

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use kedge::{
    clock::clock_ns,
    kernel::{EdgeMaps, load_unpinned},
};
use kedge_common::{
    Bucket, MAX_CLASSES, NetEntry, Reason, SETTINGS_NO_CLASS_CACHE, Settings, SourceBucket,
    SourceKey, counter_slot, source_bucket_slots,
};
use packet::{ACK, Packet};

/// How much to measure: the full benchmark or the smoke run.
#[derive(Clone, Copy)]
struct Plan {
    /// Runs per BPF_PROG_TEST_RUN call.
    repeat: u32,
    /// Rounds per figure; the median is reported.
    rounds: usize,
    /// IPv4 CIDRs in NETS_V4 for the scale table.
    scale: &'static [u32],
}

const FULL: Plan = Plan {
    repeat: 1_000_000,
    rounds: 7,
    scale: &[10, 10_000, 1_000_000],
};

const SMOKE: Plan = Plan {
    repeat: 10_000,
    rounds: 1,
    scale: &[10, 10_000],
};
const PORT: u16 = 8080;

/// One class whose SYNs take every check and are admitted: a tenant, and class
/// and source buckets (1e6/s, burst 1e6; refilled before every call, so
/// all `Plan::repeat` runs of a call conform and charge both buckets).
const CONFIG: &str = r#"
[listen]
addr = "0.0.0.0:8080"

[kernel]
interface = "lo"
attach = "tc"
default_class = "standard"

[[class]]
name = "interactive"
priority = 0
conn_rate = 1000000
conn_burst = 1000000
source_conn_rate = 1000000
source_conn_burst = 1000000

[[class]]
name = "standard"
priority = 2

[[network]]
cidr = "10.1.0.0/16"
class = "interactive"
tenant = "product"

[[network]]
cidr = "10.2.0.0/16"
class = "standard"
tenant = "lab"

[[backend]]
name = "local"
url = "http://127.0.0.1:9"
"#;

/// The source of the measured packets: inside 10.1.0.0/16.
const SOURCE: &str = "10.1.2.9";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.iter().find(|a| !a.starts_with('-'));
    if which.is_some_and(|w| w != "kernel") {
        return Ok(());
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let plan = if smoke { SMOKE } else { FULL };
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        if smoke {
            println!("skipped: the kernel benchmark loads BPF programs (needs root)");
            return Ok(());
        }
        bail!("the kernel benchmark loads BPF programs: run it as root");
    }
    println!(
        "kedge kernel benchmark{}: BPF_PROG_TEST_RUN, {} runs per call (thread CPU time / runs), median of {} rounds",
        if smoke { " (smoke run)" } else { "" },
        plan.repeat,
        plan.rounds
    );
    println!("kernel {}", uname());
    println!();
    paths(plan)?;
    println!();
    scale(plan)?;
    Ok(())
}

struct Bench {
    ebpf: Ebpf,
    maps: EdgeMaps,
    plan: Plan,
    /// Kernel id of NETS_V4, to open a second handle on it (EdgeMaps owns the first).
    nets_v4_id: u32,
    /// A second handle on SETTINGS, to turn the classification cache off.
    settings: Array<MapData, Settings>,
    tenant_slot: u32,
}

impl Bench {
    fn new(plan: Plan, nets_v4_entries: Option<u32>) -> Result<Bench> {
        let mut loader = EbpfLoader::new();
        if let Some(n) = nets_v4_entries {
            loader.map_max_entries("NETS_V4", n);
        }
        let mut ebpf = load_unpinned(&mut loader)?;
        let nets_v4_id = match ebpf.map("NETS_V4").context("NETS_V4")? {
            Map::LpmTrie(data) => data.info()?.id(),
            _ => bail!("NETS_V4 is not an LPM trie"),
        };
        let settings_id = match ebpf.map("SETTINGS").context("SETTINGS")? {
            Map::Array(data) => data.info()?.id(),
            _ => bail!("SETTINGS is not an array"),
        };
        let settings = Map::from_map_data(MapData::from_id(settings_id)?)?.try_into()?;
        let mut maps = EdgeMaps::take(&mut ebpf, true)?;
        let cfg = kedge::config::parse(Path::new("bench.toml"), CONFIG)?;
        maps.sync(&cfg)?;
        let tenant_slot = maps
            .tenant_slot(kedge::config::tenant_id("product"))
            .context("tenant product has a slot")?;
        for name in ["kedge_tc", "kedge_tc_empty"] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        for name in ["kedge_xdp", "kedge_xdp_empty"] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        Ok(Bench {
            ebpf,
            maps,
            plan,
            nets_v4_id,
            settings,
            tenant_slot,
        })
    }

    /// `false`: every SYN classifies afresh, as a SYN from a new source does.
    fn class_cache(&mut self, on: bool) -> Result<()> {
        let mut s = self.settings.get(&0, 0)?;
        if on {
            s.flags &= !SETTINGS_NO_CLASS_CACHE;
        } else {
            s.flags |= SETTINGS_NO_CLASS_CACHE;
        }
        self.settings.set(0, s, 0)?;
        Ok(())
    }

    /// Mean nanoseconds per run of `program` on `frame`, measured again
    /// when the kernel stopped the repeated run with EINTR (a signal pending
    /// between iterations; the admissions are counted afresh each time).
    fn once(&mut self, program: &str, frame: &[u8], syn: bool) -> Result<f64> {
        let interrupted = |e: &anyhow::Error| {
            matches!(
                e.downcast_ref::<aya::programs::ProgramError>(),
                Some(aya::programs::ProgramError::SyscallError(s))
                    if s.io_error.kind() == std::io::ErrorKind::Interrupted
            )
        };
        let mut tries = 0;
        loop {
            match self.attempt(program, frame, syn) {
                Err(e) if interrupted(&e) && tries < 5 => tries += 1,
                result => return result,
            }
        }
    }

    /// One measurement for [`Bench::once`].
    /// `syn`: the frame is a SYN the real program must admit on every run.
    fn attempt(&mut self, program: &str, frame: &[u8], syn: bool) -> Result<f64> {
        self.refill_buckets()?;
        let admitted_before = self.admitted()?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: self.plan.repeat,
            ..Default::default()
        };
        let prog = self.ebpf.program(program).context("program")?;
        let cpu_before = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        let r = if program.starts_with("kedge_tc") {
            let p: &SchedClassifier = prog.try_into()?;
            p.test_run(opts)?
        } else {
            let p: &Xdp = prog.try_into()?;
            p.test_run(opts)?
        };
        let cpu = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - cpu_before;
        // Every SYN the real program saw must have taken the admitted path,
        // or we would be timing an early drop.
        let admitted = self.admitted()? - admitted_before;
        if program.ends_with("_empty") || !syn {
            if admitted != 0 {
                bail!("{program}: {admitted} admissions from a non-SYN or the baseline");
            }
        } else if admitted != u64::from(self.plan.repeat) {
            bail!(
                "{program}: only {admitted} of {} SYNs admitted",
                self.plan.repeat
            );
        }
        // The kernel's own timer gives the mean per run in whole nanoseconds
        // (truncated: one count is a fifth of the empty program). This thread's
        // CPU time over the call has the same scope (the test run loops in this
        // thread, and time spent rescheduled is not ours) to a fraction of a
        // nanosecond; the call's own setup, a few microseconds, is spread over
        // `Plan::repeat` runs. The two agree to about a nanosecond (interrupts taken
        // during the loop may count in one and not the other): say when not.
        let per_run = cpu as f64 / f64::from(self.plan.repeat);
        let kernel = r.duration.as_nanos() as f64;
        if (per_run - kernel).abs() > 1.5 {
            eprintln!(
                "note: {program}: CPU time {per_run:.2} ns per run, kernel timer {kernel} ns"
            );
        }
        Ok(per_run)
    }

    /// Admitted SYNs, all classes.
    fn admitted(&self) -> Result<u64> {
        let counters = self.maps.counters()?;
        Ok((0..MAX_CLASSES)
            .map(|class| counters[counter_slot(class, Reason::Admitted) as usize])
            .sum())
    }

    /// Empties both buckets: the next call's SYNs have the whole burst.
    fn refill_buckets(&mut self) -> Result<()> {
        let mut class: Array<_, Bucket> = Array::try_from(
            self.ebpf
                .map_mut("CLASS_BUCKETS")
                .context("CLASS_BUCKETS")?,
        )?;
        class.set(0, Bucket { tat_ns: 0 }, 0)?;
        // Only the measured source ever charges a per-source bucket.
        let keys = self.settings.get(&0, 0)?.source_keys;
        let mut sources: Array<_, SourceBucket> =
            Array::try_from(self.ebpf.map_mut("SRC_BUCKETS").context("SRC_BUCKETS")?)?;
        for slot in source_bucket_slots(&source_key(SOURCE)?, &keys) {
            sources.set(slot, SourceBucket::default(), 0)?;
        }
        Ok(())
    }

    /// Median over rounds; every round measures all `cases` back to back,
    /// each with the classification cache on (`true`) or off.
    fn measure(&mut self, cases: &[(&str, &[u8], bool, bool)]) -> Result<Vec<f64>> {
        let mut samples = vec![Vec::new(); cases.len()];
        for _ in 0..self.plan.rounds {
            for (i, (program, frame, syn, cached)) in cases.iter().enumerate() {
                self.class_cache(*cached)?;
                samples[i].push(self.once(program, frame, *syn)?);
            }
        }
        self.class_cache(true)?;
        Ok(samples.into_iter().map(median).collect())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn paths(plan: Plan) -> Result<()> {
    let mut bench = Bench::new(plan, None)?;
    let est = Packet::tcp(SOURCE, PORT, ACK).bytes();
    let syn = Packet::syn(SOURCE, PORT).bytes();
    println!(
        "| attach | empty program | established (ACK) | ratio | new connection (SYN) | ratio | SYN, new source | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (attach, prog, empty) in [
        ("tc", "kedge_tc", "kedge_tc_empty"),
        ("xdp", "kedge_xdp", "kedge_xdp_empty"),
    ] {
        let m = bench.measure(&[
            (empty, &est, false, true),
            (prog, &est, false, true),
            (prog, &syn, true, true),
            (prog, &syn, true, false),
        ])?;
        println!(
            "| {attach} | {:.1} ns | {:.1} ns | {:.2}x | {:.1} ns | {:.2}x | {:.1} ns | {:.2}x |",
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0],
            m[3],
            m[3] / m[0]
        );
    }
    println!();
    println!("Where a SYN's time goes (each row adds work to the one above):");
    println!();
    println!("| SYN from | work | tc | xdp | tc, new source | xdp, new source |");
    println!("|---|---|---|---|---|---|");
    let rows = [
        (
            "10.9.9.9",
            "default class (LPM miss), no tenant, no bucket, mark",
        ),
        ("10.2.0.9", "+ a /16 with a tenant (tenant slot read)"),
        (
            SOURCE,
            "+ source bucket (two sketch slots) and class bucket, tick read",
        ),
    ];
    for (src, work) in rows {
        let syn = Packet::syn(src, PORT).bytes();
        let m = bench.measure(&[
            ("kedge_tc", &syn, true, true),
            ("kedge_xdp", &syn, true, true),
            ("kedge_tc", &syn, true, false),
            ("kedge_xdp", &syn, true, false),
        ])?;
        println!(
            "| {src} | {work} | {:.1} ns | {:.1} ns | {:.1} ns | {:.1} ns |",
            m[0], m[1], m[2], m[3]
        );
    }
    Ok(())
}

fn scale(plan: Plan) -> Result<()> {
    println!(
        "| IPv4 CIDRs in NETS_V4 | tc empty | tc SYN | ratio | tc SYN, new source | ratio | xdp empty | xdp SYN | ratio | xdp SYN, new source | ratio | fill time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in plan.scale {
        let mut bench = Bench::new(plan, Some(n + 16))?;
        let started = std::time::Instant::now();
        fill_nets_v4(bench.nets_v4_id, bench.tenant_slot, n)?;
        let fill = started.elapsed();
        let syn = Packet::syn(SOURCE, PORT).bytes();
        let m = bench.measure(&[
            ("kedge_tc_empty", &syn, true, true),
            ("kedge_tc", &syn, true, true),
            ("kedge_tc", &syn, true, false),
            ("kedge_xdp_empty", &syn, true, true),
            ("kedge_xdp", &syn, true, true),
            ("kedge_xdp", &syn, true, false),
        ])?;
        println!(
            "| {n} | {:.1} ns | {:.1} ns | {:.2}x | {:.1} ns | {:.2}x | {:.1} ns | {:.1} ns | {:.2}x | {:.1} ns | {:.2}x | {:.1} s |",
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0],
            m[3],
            m[4],
            m[4] / m[3],
            m[5],
            m[5] / m[3],
            fill.as_secs_f64()
        );
    }
    Ok(())
}

/// Adds `n` distinct prefixes (lengths 8 to 32, spread over the address space
/// by a fixed pseudo-random sequence) around the config's 10.1.0.0/16, plus a
/// /24 and a /32 on the path to `SOURCE`, so its lookup walks a deep trie.
fn fill_nets_v4(id: u32, tenant_slot: u32, n: u32) -> Result<()> {
    let mut trie: LpmTrie<MapData, [u8; 4], NetEntry> =
        Map::from_map_data(MapData::from_id(id)?)?.try_into()?;
    // The config's class and tenant for SOURCE, so its path stays the same.
    let entry = NetEntry {
        class: 0,
        tenant: kedge::config::tenant_id("product"),
        tenant_slot,
    };
    trie.insert(&Key::new(24, [10, 1, 2, 0]), entry, 0)?;
    trie.insert(&Key::new(32, [10, 1, 2, 9]), entry, 0)?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    // Exact keys already in: the trie's `get` is a longest-prefix lookup.
    let mut seen = std::collections::HashSet::new();
    while (seen.len() as u32) < n {
        // xorshift64: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 8 + (state >> 59) as u32 % 25;
        let addr = ((state >> 16) as u32) & (u32::MAX << (32 - len));
        if seen.insert((len, addr)) {
            trie.insert(&Key::new(len, addr.to_be_bytes()), entry, 0)?;
        }
    }
    Ok(())
}

fn uname() -> String {
    std::process::Command::new("uname")
        .args(["-srm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// An IPv4 address as the per-source buckets key it: `::ffff:a.b.c.d`.
fn source_key(v4: &str) -> Result<SourceKey> {
    let a: std::net::Ipv4Addr = v4.parse()?;
    Ok(SourceKey {
        addr: a.to_ipv6_mapped().octets(),
    })
}
