//! Shared pieces of the end-to-end tests: network namespaces joined by veth
//! pairs, a tiny upstream that speaks HTTP/1.1, and the real `kedge` binary.
//! Every piece cleans up in `Drop`, so a failing assertion leaves nothing behind.
#![allow(dead_code)]

pub mod openai;
pub mod packet;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A unique small number per test in this process (names, subnets, pin dirs).
pub fn unique_id() -> usize {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    (std::process::id() as usize * 7 + n) % 200 + 20
}

/// Why this machine cannot run kernel tests, if it cannot.
pub fn kernel_tests_unavailable() -> Option<&'static str> {
    // SAFETY: no arguments, no side effects.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel has no BTF");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (`ip`) is not installed");
    }
    None
}

/// Skips the calling test (returns from it) when kernel tests cannot run here.
#[macro_export]
macro_rules! require_kernel {
    () => {
        if let Some(why) = support::kernel_tests_unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A client namespace joined to the host by a veth pair on 198.18.<id>.0/24
/// (RFC 2544 test range; no traffic leaves the pair). The host end is
/// `.1`; the client has `.2`, `.3`, … as asked.
pub struct TestNet {
    pub id: usize,
    pub ns: String,
    pub host_if: String,
    pub host_ip: String,
}

impl TestNet {
    pub fn new(client_hosts: &[u8]) -> TestNet {
        let id = unique_id();
        let pid = std::process::id() % 100_000;
        let net = TestNet {
            id,
            ns: format!("kedge-t{pid}-{id}"),
            host_if: format!("kh{pid}-{id}"),
            host_ip: format!("198.18.{id}.1"),
        };
        let peer = format!("kc{pid}-{id}");
        let _ = Command::new("ip").args(["netns", "del", &net.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_if])
            .output();
        run("ip", &["netns", "add", &net.ns]);
        run(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        );
        run("ip", &["link", "set", &peer, "netns", &net.ns]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.host_ip),
                "dev",
                &net.host_if,
            ],
        );
        run("ip", &["link", "set", &net.host_if, "up"]);
        for h in client_hosts {
            let addr = format!("198.18.{id}.{h}/24");
            run("ip", &["-n", &net.ns, "addr", "add", &addr, "dev", &peer]);
        }
        run("ip", &["-n", &net.ns, "link", "set", &peer, "up"]);
        run("ip", &["-n", &net.ns, "link", "set", "lo", "up"]);
        net
    }

    pub fn client_ip(&self, host: u8) -> String {
        format!("198.18.{}.{host}", self.id)
    }

    /// `curl` GET from the namespace with a chosen source address: (exit code,
    /// response head + body + curl's own messages).
    pub fn curl(&self, source_host: u8, url: &str, connect_timeout_s: u32) -> (i32, String) {
        self.curl_with(source_host, url, connect_timeout_s, &[])
    }

    /// `curl` POST of a JSON body, otherwise like [`TestNet::curl`].
    pub fn curl_post(
        &self,
        source_host: u8,
        url: &str,
        body: &str,
        connect_timeout_s: u32,
    ) -> (i32, String) {
        let args = ["-H", "content-type: application/json", "-d", body];
        self.curl_with(source_host, url, connect_timeout_s, &args)
    }

    fn curl_with(
        &self,
        source_host: u8,
        url: &str,
        connect_timeout_s: u32,
        extra: &[&str],
    ) -> (i32, String) {
        let src = self.client_ip(source_host);
        let timeout = connect_timeout_s.to_string();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-sS",
                "-i",
                "--interface",
                &src,
            ])
            .args(["--connect-timeout", &timeout, "--max-time", "10"])
            .args(extra)
            .arg(url)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// A minimal HTTP/1.1 upstream on loopback: answers every request with a small
/// OpenAI-style JSON body naming the path, and counts requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || serve_upstream(stream, &counter));
            }
        });
        Upstream { addr, hits }
    }
}

fn serve_upstream(stream: TcpStream, hits: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let payload = format!(r#"{{"object":"list","data":[],"upstream_path":"{path}"}}"#);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
            payload.len()
        );
        if writer.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A port nothing listens on, for a server the test starts next.
///
/// Picked below the kernel's ephemeral range (`ip_local_port_range`, 32768 and
/// up by default), not with `bind(0)`: a port from that range can be taken by
/// any outgoing connection of a concurrent test (curl, kedge's upstream pool)
/// between this check and the server's own bind, and was ("address in use").
/// Within the process a counter keeps tests on different ports; the process id
/// spreads test binaries apart.
pub fn free_port(ip: &str) -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (FIRST + base.wrapping_add(n) % SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{} on {ip}", FIRST + SPAN);
}

/// The real `kedge` binary, run with a config written for the test. On drop it
/// is killed and its pin root removed.
pub struct Kedge {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pin_root: String,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Kedge {
    /// Writes `config` (with `{pin_root}` and `{admin}` filled in) and starts kedge.
    pub fn start(config: &str) -> Kedge {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("kedge-test-{}-{id}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pin_root = format!("/sys/fs/bpf/kedge-test-{}-{id}", std::process::id());
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let text = config
            .replace("{pin_root}", &pin_root)
            .replace("{admin}", &admin.to_string());
        let config = dir.join("kedge.toml");
        std::fs::write(&config, text).unwrap();
        let mut k = Kedge {
            child: None,
            dir: dir.clone(),
            config,
            pin_root,
            admin,
            log: dir.join("kedge.log"),
        };
        k.spawn();
        k
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kedge"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("KEDGE_LOG", "info")
            // The usage ledger's default home, as systemd's StateDirectory= sets it.
            .env("STATE_DIRECTORY", &self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kedge starts");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kedge exited early ({status}); log:\n{}", self.log_text());
            }
            if http_get(self.admin, "/healthz").is_some_and(|r| r.contains("ok")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kedge not ready in 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean anything up (the restart tests want that).
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Sends `signal` (e.g. SIGHUP) to the running daemon.
    pub fn signal(&self, signal: i32) {
        let c = self.child.as_ref().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, signal) };
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("metrics answer")
    }

    /// Value of the first sample whose line starts with `name{` and contains
    /// every label pair in `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Kedge {
    fn drop(&mut self) {
        self.kill_hard();
        let _ = std::fs::remove_dir_all(&self.pin_root);
        if std::thread::panicking() {
            eprintln!("--- kedge log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking HTTP/1.0 GET; the body and headers as text, or None on failure.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nhost: kedge\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Builds the fake `libnvidia-ml.so.1` (tests/fake_nvml) into `dir`, reading its
/// numbers from `state`. Returns the library path, or None when no C compiler.
pub fn build_fake_nvml(dir: &std::path::Path, state: &std::path::Path) -> Option<PathBuf> {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fake_nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let define = format!("-DFAKE_NVML_STATE=\"{}\"", state.display());
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", &define, "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "building fake NVML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(lib)
}

/// `kedge-sim`, the simulated OpenAI-compatible GPU server, on a free port.
pub struct Sim {
    pub addr: SocketAddr,
    child: Child,
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let port = free_port("127.0.0.1");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kedge-sim"))
            .args(["--listen", &addr.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .expect("kedge-sim starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "kedge-sim did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sim { addr, child }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking HTTP/1.0 POST of JSON; returns status line + headers + body.
pub fn http_post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    try_http_post(addr, path, headers, body).expect("kedge accepts the connection")
}

/// Like [`http_post`], but `None` when the connection is refused or breaks.
pub fn try_http_post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nhost: kedge\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
}

/// Several client namespaces behind one host interface (where kedge attaches):
/// the host's veth peer sits in a switch namespace on a bridge, and each client
/// namespace hangs off that bridge with its own veth pair. All on
/// 198.18.<id>.0/24; the host end is `.1`.
pub struct SwitchedNet {
    pub id: usize,
    pub host_if: String,
    pub host_ip: String,
    switch: String,
    /// Client namespace names, in the order given to `new`.
    pub clients: Vec<String>,
}

impl SwitchedNet {
    /// One client namespace per entry of `clients`, holding those host numbers.
    pub fn new(clients: &[&[u8]]) -> SwitchedNet {
        let id = unique_id();
        let pid = std::process::id() % 100_000;
        let mut net = SwitchedNet {
            id,
            host_if: format!("kh{pid}-{id}"),
            host_ip: format!("198.18.{id}.1"),
            switch: format!("kedge-s{pid}-{id}"),
            clients: Vec::new(),
        };
        let uplink = format!("ks{pid}-{id}");
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_if])
            .output();
        run("ip", &["netns", "add", &net.switch]);
        run(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &uplink,
            ],
        );
        run("ip", &["link", "set", &uplink, "netns", &net.switch]);
        let host_addr = format!("{}/24", net.host_ip);
        run("ip", &["addr", "add", &host_addr, "dev", &net.host_if]);
        run("ip", &["link", "set", &net.host_if, "up"]);
        let sw = net.switch.clone();
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &["-n", &sw, "link", "set", &uplink, "master", "br0", "up"],
        );
        run("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        for (i, hosts) in clients.iter().enumerate() {
            let ns = format!("kedge-c{pid}-{id}-{i}");
            let (port, nic) = (format!("kb{pid}-{id}{i}"), format!("kc{pid}-{id}{i}"));
            run("ip", &["netns", "add", &ns]);
            net.clients.push(ns.clone());
            run(
                "ip",
                &["link", "add", &port, "type", "veth", "peer", "name", &nic],
            );
            run("ip", &["link", "set", &port, "netns", &sw]);
            run("ip", &["link", "set", &nic, "netns", &ns]);
            run(
                "ip",
                &["-n", &sw, "link", "set", &port, "master", "br0", "up"],
            );
            for h in *hosts {
                let addr = format!("198.18.{id}.{h}/24");
                run("ip", &["-n", &ns, "addr", "add", &addr, "dev", &nic]);
            }
            run("ip", &["-n", &ns, "link", "set", &nic, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn client_ip(&self, host: u8) -> String {
        format!("198.18.{}.{host}", self.id)
    }
}

impl Drop for SwitchedNet {
    fn drop(&mut self) {
        for ns in self.clients.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates
/// belong to that namespace) and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}
