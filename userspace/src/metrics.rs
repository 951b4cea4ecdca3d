//! Prometheus metrics and the admin listener (`/metrics`, `/healthz`).
//!
//! Label sets are bounded by the config (class, tenant, status code): never
//! request ids or keys.

use std::{
    collections::HashMap,
    convert::Infallible,
    hash::Hash,
    sync::{Arc, Mutex, RwLock},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kedge_common::{GLOBAL_SLOT, REASONS, Reason};
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
    core::{MetricVec, MetricVecBuilder},
};
use tokio::{net::TcpListener, sync::watch};

use crate::{config::Loaded, idhash::IdHasher, kernel::KernelEdge, proxy::ProxySlot};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    /// Tokens by direction (input = prompt, output = completion), class, tenant.
    pub tokens: IntCounterVec,
    /// Tenant/class headers that arrived from untrusted sources and were ignored.
    pub untrusted_headers: IntCounter,
    kernel_packets: IntCounterVec,
    /// Last kernel counter values seen, to turn totals into counter increments.
    kernel_seen: Mutex<Vec<u64>>,
    /// Routing decisions by route, first arm tried and reason.
    pub route_decisions: IntCounterVec,
    /// Attempts that failed over to another arm, by route, arm and cause.
    pub route_failovers: IntCounterVec,
    /// Requests answered by an arm, by route and arm kind (local, cloud).
    pub route_served: IntCounterVec,
    /// Share of answered requests served by local arms.
    pub local_ratio: Gauge,
    served_local: std::sync::atomic::AtomicU64,
    served_cloud: std::sync::atomic::AtomicU64,
    pub queue_wait: HistogramVec,
    /// From a validated request to its settlement (stream end included).
    pub request_duration: HistogramVec,
    /// From a validated request to the upstream's response headers.
    pub first_byte: HistogramVec,
    /// Money spent, in dollars, by tenant and backend.
    pub spend: prometheus::CounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_in_flight: IntGaugeVec,
    pub queue_admitted: IntCounterVec,
    pub queue_rejected: IntCounterVec,
    pub gpu_utilization: GaugeVec,
    pub gpu_memory_used: GaugeVec,
    pub gpu_memory_total: GaugeVec,
    /// Per-class admission ratio written to the kernel, per mille.
    pub admission: IntGaugeVec,
    /// Used share of each budget limit (in-flight reservations included).
    pub budget_used: GaugeVec,
    /// Budget alerts fired, by scope, limit and threshold (per mille).
    pub budget_alerts: IntCounterVec,
    pub ledger_last_commit: GaugeVec,
    pub ledger_rows: GaugeVec,
    pub ledger_transactions: GaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric");
    m
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric");
    m
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric");
    m
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let untrusted_headers = IntCounter::new(
            "kedge_untrusted_header_total",
            "Requests whose tenant/class headers came from an untrusted source and were ignored.",
        )
        .expect("valid metric");
        r.register(Box::new(untrusted_headers.clone()))
            .expect("unique metric");
        let local_ratio = Gauge::new(
            "kedge_route_local_ratio",
            "Share of requests answered by local (GPU) arms since start.",
        )
        .expect("valid metric");
        r.register(Box::new(local_ratio.clone()))
            .expect("unique metric");
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "kedge_queue_wait_seconds",
                "Time requests waited for a backend slot.",
            )
            .buckets(vec![
                0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["backend", "class"],
        )
        .expect("valid metric");
        r.register(Box::new(queue_wait.clone()))
            .expect("unique metric");
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "kedge_request_duration_seconds",
                "Validated request to settlement, streams included.",
            )
            .buckets(latency_buckets.clone()),
            &["class", "model"],
        )
        .expect("valid metric");
        r.register(Box::new(request_duration.clone()))
            .expect("unique metric");
        let first_byte = HistogramVec::new(
            HistogramOpts::new(
                "kedge_time_to_first_byte_seconds",
                "Validated request to the upstream's response headers (queueing included).",
            )
            .buckets(latency_buckets),
            &["class", "backend"],
        )
        .expect("valid metric");
        r.register(Box::new(first_byte.clone()))
            .expect("unique metric");
        let spend = prometheus::CounterVec::new(
            Opts::new(
                "kedge_spend_dollars_total",
                "Money spent on upstreams at the configured prices, in dollars.",
            ),
            &["tenant", "backend"],
        )
        .expect("valid metric");
        r.register(Box::new(spend.clone())).expect("unique metric");
        Metrics {
            requests: counter(
                &r,
                "kedge_requests_total",
                "Proxied requests by class, tenant and status.",
                &["class", "tenant", "status"],
            ),
            tokens: counter(
                &r,
                "kedge_tokens_total",
                "Tokens of settled requests, by direction (input, output), class and tenant.",
                &["direction", "class", "tenant"],
            ),
            untrusted_headers,
            kernel_packets: counter(
                &r,
                "kedge_kernel_packets_total",
                "Packets to the proxy ports seen by the kernel program, by class and verdict.",
                &["class", "verdict", "action"],
            ),
            kernel_seen: Mutex::new(Vec::new()),
            route_decisions: counter(
                &r,
                "kedge_route_decisions_total",
                "Routing decisions by route, first arm and reason.",
                &["route", "arm", "reason"],
            ),
            route_failovers: counter(
                &r,
                "kedge_route_failovers_total",
                "Failed attempts that moved on to the next arm, by route, arm and cause.",
                &["route", "arm", "cause"],
            ),
            route_served: counter(
                &r,
                "kedge_route_served_total",
                "Requests answered, by route and arm kind.",
                &["route", "kind"],
            ),
            local_ratio,
            served_local: Default::default(),
            served_cloud: Default::default(),
            queue_wait,
            request_duration,
            first_byte,
            spend,
            queue_depth: int_gauge(
                &r,
                "kedge_queue_depth",
                "Requests waiting for a slot, by backend and class.",
                &["backend", "class"],
            ),
            queue_in_flight: int_gauge(
                &r,
                "kedge_queue_in_flight",
                "Requests holding a slot, by backend.",
                &["backend"],
            ),
            queue_admitted: counter(
                &r,
                "kedge_queue_admitted_total",
                "Requests that got a backend slot, by backend and class.",
                &["backend", "class"],
            ),
            queue_rejected: counter(
                &r,
                "kedge_queue_rejected_total",
                "Requests refused by the scheduler, by backend, class and reason.",
                &["backend", "class", "reason"],
            ),
            gpu_utilization: gauge(
                &r,
                "kedge_gpu_utilization_ratio",
                "GPU utilization, 0..1, by GPU index (or backend for vLLM metrics).",
                &["gpu"],
            ),
            gpu_memory_used: gauge(
                &r,
                "kedge_gpu_memory_used_bytes",
                "GPU memory in use.",
                &["gpu"],
            ),
            gpu_memory_total: gauge(
                &r,
                "kedge_gpu_memory_total_bytes",
                "GPU memory in all.",
                &["gpu"],
            ),
            budget_used: gauge(
                &r,
                "kedge_budget_used_ratio",
                "Used share of a budget limit, in-flight reservations included.",
                &["scope", "limit"],
            ),
            budget_alerts: counter(
                &r,
                "kedge_budget_alerts_total",
                "Budget alerts fired (once per window per threshold).",
                &["scope", "limit", "threshold_permille"],
            ),
            ledger_last_commit: gauge(
                &r,
                "kedge_ledger_last_commit_seconds",
                "Time the usage ledger's last group commit took (fsync included).",
                &[],
            ),
            ledger_rows: gauge(
                &r,
                "kedge_ledger_rows",
                "Usage rows this process has written to the ledger.",
                &[],
            ),
            ledger_transactions: gauge(
                &r,
                "kedge_ledger_transactions",
                "Group-commit transactions this process has written.",
                &[],
            ),
            admission: int_gauge(
                &r,
                "kedge_admission_permille",
                "Share of new connections the kernel admits per class, per mille.",
                &["class"],
            ),
            registry: r,
        }
    }

    /// Counts one answered request by arm kind in the local ratio (the
    /// per-route count is the caller's, through its `route_served` children).
    pub fn count_served(&self, local: bool) {
        let counter = if local {
            &self.served_local
        } else {
            &self.served_cloud
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let (local_n, cloud_n) = (load(&self.served_local), load(&self.served_cloud));
        if local_n + cloud_n > 0 {
            self.local_ratio
                .set(local_n as f64 / (local_n + cloud_n) as f64);
        }
    }

    /// Folds the kernel's per-slot totals into `kedge_kernel_packets_total`.
    pub fn observe_kernel(&self, totals: &[u64], cfg: &Loaded) {
        let mut seen = self.kernel_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.resize(totals.len(), 0);
        for (slot, (&now, last)) in totals.iter().zip(seen.iter_mut()).enumerate() {
            if now == *last {
                continue;
            }
            // A smaller total means the maps were recreated: count from zero.
            let delta = if now > *last { now - *last } else { now };
            *last = now;
            let class = slot as u32 / REASONS;
            let reason = Reason::ALL[(slot as u32 % REASONS) as usize];
            let class_label = if class == GLOBAL_SLOT {
                "unclassified"
            } else {
                cfg.class_name(class)
            };
            let action = if reason.is_drop() { "drop" } else { "pass" };
            self.kernel_packets
                .with_label_values(&[class_label, reason.label(), action])
                .inc_by(delta);
        }
    }

    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Finds a family's child by its label values.
type Resolver<M> = Box<dyn Fn(&[&str]) -> M + Send + Sync>;

/// The children of one metric family by a key of ids (class, tenant,
/// backend, status...): prometheus hashes and compares the label strings on
/// every `with_label_values`, which on the request path costs more than the
/// increment; here a key is resolved to its child once and found again by a
/// read-locked lookup of a few integers. Ids mean something only within one
/// config, so a cache belongs to one `Proxy` and goes with it on reload.
pub struct Children<K, M> {
    resolve: Resolver<M>,
    known: RwLock<HashMap<K, M, IdHasher>>,
}

impl<K: Copy + Eq + Hash, M> Children<K, M> {
    pub fn of<T: MetricVecBuilder<M = M> + 'static>(family: &MetricVec<T>) -> Self
    where
        M: Send + Sync,
    {
        let family = family.clone();
        Children {
            resolve: Box::new(move |labels| family.with_label_values(labels)),
            known: RwLock::new(HashMap::default()),
        }
    }

    /// Runs `f` on the child of `key`; `labels` names it the first time.
    pub fn with<'a, const N: usize, R>(
        &self,
        key: K,
        labels: impl FnOnce() -> [&'a str; N],
        f: impl FnOnce(&M) -> R,
    ) -> R {
        if let Some(child) = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return f(child);
        }
        let child = (self.resolve)(&labels());
        let r = f(&child);
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, child);
        r
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What the admin listener reads on each scrape.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub kernel: Option<Arc<Mutex<KernelEdge>>>,
    pub proxy: Arc<ProxySlot>,
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/status" => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(
                    crate::feedback::status(&self.proxy.get()).to_string(),
                )))
                .expect("valid response"),
            "/metrics" => {
                let proxy = self.proxy.get();
                crate::feedback::observe_queues(&proxy, &self.metrics);
                if let Some(kernel) = &self.kernel {
                    let totals = kernel.lock().unwrap_or_else(|p| p.into_inner()).counters();
                    match totals {
                        Ok(t) => self.metrics.observe_kernel(&t, proxy.config()),
                        Err(e) => tracing::warn!(error = %e, "reading kernel counters"),
                    }
                }
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(self.metrics.encode())))
                    .expect("valid response")
            }
            "/healthz" => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"not found\n")))
                .expect("valid response"),
        }
    }

    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move {
                        // Counters are read with blocking syscalls: keep them off the reactor.
                        let resp = tokio::task::spawn_blocking(move || admin.respond(&req)).await;
                        Ok::<_, Infallible>(resp.unwrap_or_else(|_| {
                            Response::builder()
                                .status(StatusCode::INTERNAL_SERVER_ERROR)
                                .body(Full::new(Bytes::new()))
                                .expect("valid response")
                        }))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}
