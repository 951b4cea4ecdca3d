//! The kernel edge under real TCP: the real `kedge` binary attached to the
//! host end of a veth, client namespaces on different CIDRs behind it.
//!
//! - A low class flooding connection attempts is held to its configured rate
//!   while a high class keeps connecting, and the kernel's counters match what
//!   the clients saw.
//! - Killed with SIGKILL, the daemon leaves its program enforcing through the
//!   pinned link; a restarted daemon reuses that link and the pinned state.
//! - On a tun interface (no Ethernet header, as WireGuard), SYNs written into
//!   the device are judged from their IP header: one answered by the kernel's
//!   TCP stack, one dropped.

mod support;

use std::{
    fs::File,
    io::{Read, Write},
    net::SocketAddr,
    os::fd::AsRawFd,
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

const TUN_CONFIG: &str = r#"
[listen]
addr = "0.0.0.0:{port}"

[kernel]
interface = "{iface}"
attach = "{attach}"
pin_root = "{pin_root}"
default_class = "open"

[[class]]
name = "open"
priority = 0

[[class]]
name = "shut"
priority = 3
deny = true

[[network]]
cidr = "{net}.64/26"
class = "shut"

[[backend]]
name = "local"
url = "http://{upstream}"

[metrics]
addr = "{admin}"
"#;

/// A tun interface this test reads and writes: the device lives as long as
/// the file (not persistent), so it is gone when the test ends, however.
struct TunDevice {
    file: File,
    name: String,
}

impl TunDevice {
    fn open(name: &str) -> std::io::Result<TunDevice> {
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TunDevice {
            file,
            name: name.to_string(),
        })
    }

    /// The first packet the kernel sends out of the device within `wait`
    /// that `want` accepts.
    fn receive(&mut self, wait: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut poll = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            let n = self.file.read(&mut buf).unwrap();
            if want(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
}

/// The ones' complement sum of RFC 1071, folded.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += word as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN with valid checksums (the stack checks them on a tun).
fn syn_v4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst_port.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0x30, 0x39, 0, 0, 0, 0]); // seq 12345, ack 0
    tcp.extend_from_slice(&[5 << 4, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]); // SYN, window
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Whether `packet` is the SYN-ACK from `server` answering `client`'s SYN.
fn is_syn_ack(packet: &[u8], server: ([u8; 4], u16), client: ([u8; 4], u16)) -> bool {
    packet.len() >= 40
        && packet[0] == 0x45
        && packet[9] == 6
        && packet[12..16] == server.0
        && packet[16..20] == client.0
        && packet[20..22] == server.1.to_be_bytes()
        && packet[22..24] == client.1.to_be_bytes()
        && packet[33] & 0x12 == 0x12
}

fn ip_only_interface_is_parsed_from_the_ip_header(attach: &str, subnet: u8) {
    require_kernel!();
    let name = format!("ktn{}{attach}", std::process::id() % 100_000);
    let mut tun = match TunDevice::open(&name) {
        Ok(tun) => tun,
        Err(e) => {
            eprintln!("skipped: cannot create a tun device: {e}");
            return;
        }
    };
    let net = format!("198.18.{subnet}");
    support::run(
        "ip",
        &["addr", "add", &format!("{net}.1/24"), "dev", &tun.name],
    );
    support::run("ip", &["link", "set", &tun.name, "up"]);
    let upstream = Upstream::start();
    let port = free_port("0.0.0.0");
    let kedge = Kedge::start(
        &TUN_CONFIG
            .replace("{port}", &port.to_string())
            .replace("{iface}", &tun.name)
            .replace("{attach}", attach)
            .replace("{net}", &net)
            .replace("{upstream}", &upstream.addr.to_string()),
    );
    let server = ([198, 18, subnet, 1], port);

    // An open source: the kernel's TCP stack sees the SYN and answers it.
    let open = ([198, 18, subnet, 2], 40_002);
    tun.file
        .write_all(&syn_v4(open.0, server.0, open.1, port))
        .unwrap();
    let answered = tun.receive(Duration::from_secs(3), |p| is_syn_ack(p, server, open));
    assert!(
        answered.is_some(),
        "{attach}: no SYN-ACK for the open source"
    );

    // A denied source: dropped by the program before the stack sees it.
    let shut = ([198, 18, subnet, 66], 40_066);
    tun.file
        .write_all(&syn_v4(shut.0, server.0, shut.1, port))
        .unwrap();
    let answered = tun.receive(Duration::from_millis(700), |p| is_syn_ack(p, server, shut));
    assert!(
        answered.is_none(),
        "{attach}: the denied source was answered"
    );

    let counter = |class: &str, reason: Reason| {
        kedge.metric(
            "kedge_kernel_packets_total",
            &[("class", class), ("verdict", reason.label())],
        ) as u64
    };
    assert_eq!(counter("open", Reason::Admitted), 1);
    assert_eq!(counter("shut", Reason::Denied), 1);
    assert_eq!(counter("unclassified", Reason::Malformed), 0);
}

#[test]
fn tc_on_a_tun_interface_reads_packets_from_their_ip_header() {
    ip_only_interface_is_parsed_from_the_ip_header("tc", 251);
}

#[test]
fn xdp_on_a_tun_interface_reads_packets_from_their_ip_header() {
    ip_only_interface_is_parsed_from_the_ip_header("xdp", 252);
}
