//! The kernel edge under real TCP: the real `kedge` binary attached to the
//! host end of a veth, client namespaces on different CIDRs behind it.
//!
//! - A low class flooding connection attempts is held to its configured rate
//!   while a high class keeps connecting, and the kernel's counters match what
//!   the clients saw.
//! - Killed with SIGKILL, the daemon leaves its program enforcing through the
//!   pinned link; a restarted daemon reuses that link and the pinned state.

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use kedge_common::{Admission, Bucket, MAPS_ABI_VERSION, Reason, counter_slot};
use support::{Kedge, SwitchedNet, TestNet, Upstream, free_port, in_netns};

const FLOOD_CONFIG: &str = r#"
[listen]
addr = "0.0.0.0:{port}"

[kernel]
interface = "{iface}"
attach = "{attach}"
pin_root = "{pin_root}"
default_class = "high"

[[class]]
name = "high"
priority = 0

[[class]]
name = "low"
priority = 3
conn_rate = 20
conn_burst = 5

[[network]]
cidr = "{net}.0/26"
class = "high"

[[network]]
cidr = "{net}.64/26"
class = "low"

[[backend]]
name = "local"
url = "http://{upstream}"

[metrics]
addr = "{admin}"
"#;

const LOW_RATE: f64 = 20.0;
const LOW_BURST: f64 = 5.0;
/// Shorter than TCP's initial SYN retransmission timeout (1 s): an attempt that
/// fails sent exactly one SYN, so drops and failed attempts can be compared 1:1.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Default, Debug)]
struct Attempts {
    connected: u64,
    timed_out: u64,
    /// Refused or any other error: none expected.
    other: Vec<String>,
    /// From the first attempt to the last attempt's start.
    window: Duration,
}

/// `count` connection attempts to `target`, one every `every`, each given
/// `ATTEMPT_TIMEOUT`; run inside namespace `ns`.
fn attempts(ns: &str, target: SocketAddr, count: u32, every: Duration) -> Attempts {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..count {
                tokio::time::sleep_until((started + every * i).into()).await;
                tasks.push(tokio::spawn(tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    tokio::net::TcpStream::connect(target),
                )));
            }
            let window = started.elapsed();
            let mut out = Attempts {
                window,
                ..Default::default()
            };
            for t in tasks {
                match t.await.unwrap() {
                    Ok(Ok(_stream)) => out.connected += 1,
                    Err(_elapsed) => out.timed_out += 1,
                    Ok(Err(e)) => out.other.push(e.to_string()),
                }
            }
            out
        })
    })
}

fn flood_is_held_to_its_rate_while_high_keeps_connecting(attach: &str) {
    require_kernel!();
    // Namespace 0: a high-class client (.2); namespace 1: a low-class one (.66).
    let net = SwitchedNet::new(&[&[2], &[66]]);
    let upstream = Upstream::start();
    let port = free_port("0.0.0.0");
    let config = FLOOD_CONFIG
        .replace("{port}", &port.to_string())
        .replace("{iface}", &net.host_if)
        .replace("{attach}", attach)
        .replace("{net}", &format!("198.18.{}", net.id))
        .replace("{upstream}", &upstream.addr.to_string());
    let kedge = Kedge::start(&config);
    let target: SocketAddr = format!("{}:{port}", net.host_ip).parse().unwrap();

    // Low: 300 attempts at 200/s for 1.5 s, ten times its rate. High: one
    // attempt every 25 ms over the same time, in parallel.
    let low_ns = net.clients[1].clone();
    let flood =
        std::thread::spawn(move || attempts(&low_ns, target, 300, Duration::from_millis(5)));
    let high = attempts(&net.clients[0], target, 60, Duration::from_millis(25));
    let low = flood.join().unwrap();

    assert!(
        high.other.is_empty() && low.other.is_empty(),
        "{high:?} {low:?}"
    );
    assert_eq!(high.connected, 60, "high class lost connections: {high:?}");

    let counter = |class: &str, reason: Reason| {
        kedge.metric(
            "kedge_kernel_packets_total",
            &[("class", class), ("verdict", reason.label())],
        ) as u64
    };
    // What the clients saw is what the kernel counted: every connection that
    // succeeded was one admitted SYN, every attempt that timed out one dropped
    // SYN (no retransmission within ATTEMPT_TIMEOUT).
    assert_eq!(counter("high", Reason::Admitted), high.connected);
    assert_eq!(counter("low", Reason::Admitted), low.connected, "{low:?}");
    assert_eq!(counter("low", Reason::ClassRate), low.timed_out, "{low:?}");
    for reason in [
        Reason::Denied,
        Reason::ClassRate,
        Reason::SourceRate,
        Reason::Shed,
    ] {
        assert_eq!(counter("high", reason), 0, "{}", reason.label());
    }

    // Held to its rate: at most the burst plus 20/s over the flood's window
    // (+2: an unsynchronised bucket admits at most one extra per racing CPU),
    // and, flooded ten times over, at least half of that.
    let allowed = LOW_BURST + LOW_RATE * low.window.as_secs_f64();
    let admitted = low.connected as f64;
    eprintln!("{attach}: high {high:?}; low {low:?}, bound {allowed:.1}");
    assert!(
        admitted <= allowed + 2.0,
        "low admitted {admitted} in {:?}, more than {allowed:.1}",
        low.window
    );
    assert!(
        admitted >= allowed / 2.0,
        "low admitted only {admitted} in {:?}",
        low.window
    );
    assert_eq!(low.connected + low.timed_out, 300);
}

#[test]
fn tc_flood_is_held_to_its_rate_while_high_keeps_connecting() {
    flood_is_held_to_its_rate_while_high_keeps_connecting("tc");
}

#[test]
fn xdp_flood_is_held_to_its_rate_while_high_keeps_connecting() {
    flood_is_held_to_its_rate_while_high_keeps_connecting("xdp");
}

const RESTART_CONFIG: &str = r#"
[listen]
addr = "0.0.0.0:{port}"

[kernel]
interface = "{iface}"
attach = "{attach}"
pin_root = "{pin_root}"
default_class = "standard"

[[class]]
name = "interactive"
priority = 0
conn_rate = 1000
conn_burst = 1000

[[class]]
name = "standard"
priority = 2

[[class]]
name = "blocked"
priority = 4
deny = true

[[network]]
cidr = "{net}.0/24"
class = "interactive"

[[network]]
cidr = "{net}.3/32"
class = "blocked"

[[backend]]
name = "local"
url = "http://{upstream}"

[metrics]
addr = "{admin}"
"#;

const INTERACTIVE: u32 = 0;
const STANDARD: u32 = 1;
const BLOCKED: u32 = 2;

/// The pinned state, read straight from bpffs as an operator would.
struct Pinned {
    dir: PathBuf,
    link: PathBuf,
}

impl Pinned {
    fn map(&self, name: &str) -> Map {
        Map::from_map_data(MapData::from_pin(self.dir.join(name)).unwrap()).unwrap()
    }

    fn counter(&self, class: u32, reason: Reason) -> u64 {
        let c: PerCpuArray<_, u64> = self.map("COUNTERS").try_into().unwrap();
        c.get(&counter_slot(class, reason), 0).unwrap().iter().sum()
    }

    fn class_tat(&self, class: u32) -> u64 {
        let a: Array<_, Bucket> = self.map("CLASS_BUCKETS").try_into().unwrap();
        a.get(&class, 0).unwrap().tat_ns
    }

    fn admission(&self, class: u32) -> u32 {
        let a: Array<_, Admission> = self.map("ADMISSION").try_into().unwrap();
        a.get(&class, 0).unwrap().admit_permille
    }

    fn set_admission(&self, class: u32, admit_permille: u32) {
        let mut a: Array<_, Admission> = self.map("ADMISSION").try_into().unwrap();
        a.set(class, Admission { admit_permille }, 0).unwrap();
    }

    /// (link id, id of the program the link runs).
    fn link(&self) -> (u32, u32) {
        let link = FdLink::from(PinnedLink::from_pin(&self.link).expect("link is pinned"));
        let info = link.info().unwrap();
        (info.id(), info.program_id())
    }
}

fn survives_kill_9_and_restart(attach: &str) {
    require_kernel!();
    let net = TestNet::new(&[2, 3]);
    let upstream = Upstream::start();
    let port = free_port("0.0.0.0");
    let config = RESTART_CONFIG
        .replace("{port}", &port.to_string())
        .replace("{iface}", &net.host_if)
        .replace("{attach}", attach)
        .replace("{net}", &format!("198.18.{}", net.id))
        .replace("{upstream}", &upstream.addr.to_string());
    let mut kedge = Kedge::start(&config);
    let dir = Path::new(&kedge.pin_root).join(format!("v{MAPS_ABI_VERSION}"));
    let pinned = Pinned {
        link: dir.join(format!("link_{attach}_{}", net.host_if)),
        dir,
    };
    let url = format!("http://{}:{port}/v1/models", net.host_ip);

    let (code, text) = net.curl(2, &url, 3);
    assert_eq!(code, 0, "{text}");
    let (code, text) = net.curl(3, &url, 1);
    assert_eq!(code, 28, "denied must time out: {text}");
    let denied_before = pinned.counter(BLOCKED, Reason::Denied);
    let admitted_before = pinned.counter(INTERACTIVE, Reason::Admitted);
    assert!(denied_before >= 1 && admitted_before == 1);
    let tat_before = pinned.class_tat(INTERACTIVE);
    assert!(tat_before > 0, "the class bucket was charged");
    let (link_id, prog_id) = pinned.link();

    kedge.kill_hard();

    // Down: the pinned link keeps the same program attached.
    assert_eq!(pinned.link(), (link_id, prog_id));
    let (code, text) = net.curl(3, &url, 1);
    assert_eq!(code, 28, "denied while down must still time out: {text}");
    // An allowed SYN passes the program and meets a closed port: refused.
    let (code, text) = net.curl(2, &url, 3);
    assert_eq!(code, 7, "allowed while down is refused by TCP: {text}");
    let denied_down = pinned.counter(BLOCKED, Reason::Denied);
    assert!(
        denied_down > denied_before,
        "the program counted while down"
    );
    assert_eq!(pinned.counter(INTERACTIVE, Reason::Admitted), 2);
    let tat_down = pinned.class_tat(INTERACTIVE);
    assert!(tat_down > tat_before, "the bucket kept charging while down");
    // What the budget/GPU layers last wrote must survive the restart too.
    pinned.set_admission(STANDARD, 250);

    kedge.spawn();

    let (new_link_id, new_prog_id) = pinned.link();
    assert_eq!(
        new_link_id, link_id,
        "the restarted daemon reuses the pinned link"
    );
    assert_ne!(
        new_prog_id, prog_id,
        "its new program was swapped into the link"
    );
    assert!(
        pinned.counter(BLOCKED, Reason::Denied) >= denied_down,
        "counters kept"
    );
    assert!(pinned.class_tat(INTERACTIVE) >= tat_down, "bucket kept");
    assert_eq!(pinned.admission(STANDARD), 250, "admission kept");
    assert_eq!(pinned.admission(INTERACTIVE), 1000);

    let (code, text) = net.curl(3, &url, 1);
    assert_eq!(code, 28, "{text}");
    let (code, text) = net.curl(2, &url, 3);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(pinned.counter(INTERACTIVE, Reason::Admitted), 3);
}

#[test]
fn tc_enforcement_survives_kill_9_and_restart() {
    survives_kill_9_and_restart("tc");
}

#[test]
fn xdp_enforcement_survives_kill_9_and_restart() {
    survives_kill_9_and_restart("xdp");
}
