//! `kedge-load`: a small, honest load generator for OpenAI-style endpoints, used
//! by the demo and the benchmarks. Bounded by count and time, it reports what
//! the clients saw: statuses, connect failures, latency percentiles and (for
//! streams) time to first byte, as JSON.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn::http1};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpSocket;

#[derive(Parser, Clone)]
#[command(about = "Bounded HTTP load for OpenAI-compatible endpoints; prints JSON results")]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Stop after this long.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Stop after this many requests in total (0 = only the duration bounds it).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Total request rate per second across workers (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value = "sim")]
    model: String,
    #[arg(long, default_value_t = 16)]
    max_tokens: u64,
    #[arg(long)]
    stream: bool,
    /// Prompt text (repeated `--prompt-repeat` times).
    #[arg(long, default_value = "Say hello to the kedge demo.")]
    prompt: String,
    #[arg(long, default_value_t = 1)]
    prompt_repeat: usize,
    #[arg(long)]
    api_key: Option<String>,
    /// Open a new TCP connection for every request (what a connection flood
    /// does); each request's latency then counts its connect, as its client
    /// waits for both.
    #[arg(long)]
    new_connection: bool,
    /// Bind this source address.
    #[arg(long)]
    source: Option<IpAddr>,
    #[arg(long, default_value_t = 2000)]
    connect_timeout_ms: u64,
    /// Spread the workers' first attempts evenly over this many ms, so that
    /// workers held by equal timeouts do not then act in step (a flood's
    /// SYNs as a stream, not as bursts of one per worker).
    #[arg(long, default_value_t = 0)]
    spread_start_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Write running totals here once a second (for live displays).
    #[arg(long)]
    progress: Option<PathBuf>,
    /// Also print every attempt as `[start, latency, outcome]` (`timeline`:
    /// start in µs since the Unix epoch, latency in µs, outcome the HTTP
    /// status or 0 connect failure, 1 timeout, 2 other error), so that a
    /// caller can split one run into windows by time.
    #[arg(long)]
    timeline: bool,
    /// Also stop (finishing the requests under way) when standard input is
    /// closed: the caller ends the run when its windows are done.
    #[arg(long)]
    until_stdin_closes: bool,
    /// A label copied into the output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u64>,
    timeline: Vec<[u64; 3]>,
    first_byte_us: Vec<u64>,
    statuses: std::collections::BTreeMap<u16, u64>,
}

struct Shared {
    args: Args,
    target: SocketAddr,
    host: String,
    path: String,
    body: Bytes,
    started: Instant,
    issued: AtomicU64,
    connect_failures: AtomicU64,
    timeouts: AtomicU64,
    other_errors: AtomicU64,
    stopped: AtomicBool,
    stats: Mutex<Stats>,
}

/// `timeline` outcomes that are not HTTP statuses.
const CONNECT_FAILURE: u64 = 0;
const TIMEOUT: u64 = 1;
const OTHER_ERROR: u64 = 2;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (target, host, path) = match parse_url(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kedge-load: {e}");
            std::process::exit(2);
        }
    };
    let endpoint_is_chat = path.ends_with("/chat/completions");
    let prompt = vec![args.prompt.as_str(); args.prompt_repeat.max(1)].join(" ");
    let mut body = if endpoint_is_chat {
        json!({"model": args.model, "max_tokens": args.max_tokens,
               "messages": [{"role": "user", "content": prompt}]})
    } else if path.ends_with("/embeddings") {
        json!({"model": args.model, "input": prompt})
    } else {
        json!({"model": args.model, "max_tokens": args.max_tokens, "prompt": prompt})
    };
    if args.stream {
        body["stream"] = json!(true);
    }
    let shared = Arc::new(Shared {
        body: Bytes::from(body.to_string()),
        target,
        host,
        path,
        started: Instant::now(),
        issued: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        other_errors: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        stats: Mutex::new(Stats::default()),
        args,
    });
    if let Some(path) = shared.args.progress.clone() {
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = std::fs::write(&path, s.report().to_string());
            }
        });
    }
    if shared.args.until_stdin_closes {
        let s = shared.clone();
        // A thread, not a task: a blocking read of stdin is all it does.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            s.stopped.store(true, Ordering::SeqCst);
        });
    }
    let workers: Vec<_> = (0..shared.args.concurrency.max(1))
        .map(|i| tokio::spawn(worker(shared.clone(), i)))
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let report = shared.report();
    if let Some(path) = &shared.args.progress {
        let _ = std::fs::write(path, report.to_string());
    }
    println!("{report}");
}

fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = hostport
        .parse::<SocketAddr>()
        .map_err(|e| format!("{hostport}: {e} (use ip:port)"))?;
    Ok((
        addr,
        hostport.to_string(),
        if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
    ))
}

impl Shared {
    /// Claims the next request slot, pacing to the configured rate.
    async fn next_slot(&self) -> bool {
        if self.stopped.load(Ordering::SeqCst) {
            return false;
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        if self.args.requests > 0 && n >= self.args.requests {
            return false;
        }
        let deadline = self.started + Duration::from_secs_f64(self.args.duration_s);
        if self.args.rate > 0.0 {
            let due = self.started + Duration::from_secs_f64(n as f64 / self.args.rate);
            if due >= deadline {
                return false;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        Instant::now() < deadline && !self.stopped.load(Ordering::SeqCst)
    }

    /// Notes one attempt on the timeline (when asked for one).
    fn record(&self, stats: &mut Stats, began: Began, outcome: u64) {
        if self.args.timeline {
            let start = began
                .wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            stats
                .timeline
                .push([start, began.at.elapsed().as_micros() as u64, outcome]);
        }
    }

    /// Counts a failed attempt by its outcome and notes it on the timeline.
    fn failed(&self, began: Began, outcome: u64) {
        let counter = match outcome {
            CONNECT_FAILURE => &self.connect_failures,
            TIMEOUT => &self.timeouts,
            _ => &self.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        self.record(&mut st, began, outcome);
    }

    /// A new connection, or the outcome that ended the attempt.
    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, u64> {
        let socket = if self.target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|_| CONNECT_FAILURE)?;
        if let Some(src) = self.args.source {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|_| CONNECT_FAILURE)?;
        }
        let timeout = Duration::from_millis(self.args.connect_timeout_ms);
        let stream = match tokio::time::timeout(timeout, socket.connect(self.target)).await {
            Ok(Ok(s)) => s,
            _ => return Err(CONNECT_FAILURE),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| OTHER_ERROR)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    fn report(&self) -> serde_json::Value {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut lat = stats.latencies_us.clone();
        let mut fb = stats.first_byte_us.clone();
        lat.sort_unstable();
        fb.sort_unstable();
        let pct = |v: &[u64], p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1000.0
        };
        let done: u64 = stats.statuses.values().sum();
        let ok: u64 = stats
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut report = json!({
            "label": self.args.label,
            "elapsed_s": elapsed,
            "responses": done,
            "ok": ok,
            "statuses": stats.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "connect_failures": self.connect_failures.load(Ordering::Relaxed),
            "timeouts": self.timeouts.load(Ordering::Relaxed),
            "other_errors": self.other_errors.load(Ordering::Relaxed),
            "throughput_rps": if elapsed > 0.0 { ok as f64 / elapsed } else { 0.0 },
            "latency_ms": {"p50": pct(&lat, 0.50), "p90": pct(&lat, 0.90), "p99": pct(&lat, 0.99), "max": pct(&lat, 1.0)},
            "first_byte_ms": {"p50": pct(&fb, 0.50), "p99": pct(&fb, 0.99)},
        });
        if self.args.timeline {
            report["timeline"] = json!(stats.timeline);
        }
        report
    }
}

/// When an attempt began, by the wall clock (for the timeline) and the monotonic one.
#[derive(Clone, Copy)]
struct Began {
    wall: SystemTime,
    at: Instant,
}

impl Began {
    fn now() -> Began {
        Began {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }
}

async fn worker(s: Arc<Shared>, index: usize) {
    let spread = Duration::from_millis(s.args.spread_start_ms);
    tokio::time::sleep(spread * index as u32 / s.args.concurrency.max(1) as u32).await;
    let mut conn: Option<http1::SendRequest<Full<Bytes>>> = None;
    while s.next_slot().await {
        let mut began = Began::now();
        if s.args.new_connection || conn.as_ref().is_none_or(|c| c.is_closed()) {
            match s.connect().await {
                Ok(c) => conn = Some(c),
                Err(outcome) => {
                    s.failed(began, outcome);
                    conn = None;
                    continue;
                }
            }
        }
        let Some(sender) = conn.as_mut() else {
            continue;
        };
        if sender.ready().await.is_err() {
            conn = None;
            s.failed(began, OTHER_ERROR);
            continue;
        }
        let mut req = Request::post(s.path.as_str())
            .header("host", s.host.as_str())
            .header("content-type", "application/json");
        if let Some(key) = &s.args.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Full::new(s.body.clone())).expect("valid request");
        // A reused connection's setup belongs to an earlier request.
        if !s.args.new_connection {
            began = Began::now();
        }
        let start = began.at;
        let timeout = Duration::from_millis(s.args.request_timeout_ms);
        let result = tokio::time::timeout(timeout, async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut first = None;
            while let Some(frame) = body.frame().await {
                frame?;
                first.get_or_insert_with(|| start.elapsed());
            }
            Ok::<_, hyper::Error>((status, first))
        })
        .await;
        match result {
            Ok(Ok((status, first))) => {
                let mut st = s.stats.lock().unwrap_or_else(|p| p.into_inner());
                st.latencies_us.push(start.elapsed().as_micros() as u64);
                if let Some(f) = first {
                    st.first_byte_us.push(f.as_micros() as u64);
                }
                *st.statuses.entry(status).or_default() += 1;
                s.record(&mut st, began, u64::from(status));
            }
            Ok(Err(_)) => {
                s.failed(began, OTHER_ERROR);
                conn = None;
            }
            Err(_) => {
                s.failed(began, TIMEOUT);
                conn = None;
            }
        }
    }
}
