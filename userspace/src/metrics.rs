//! Prometheus metrics and the admin listener (`/metrics`, `/healthz`).
//!
//! Label sets are bounded by the config (class, tenant, status code): never
//! request ids or keys.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kedge_common::{GLOBAL_SLOT, REASONS, Reason};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, sync::watch};

use crate::{config::Loaded, kernel::KernelEdge};

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
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kedge_requests_total",
                "Proxied requests by class, tenant and status.",
            ),
            &["class", "tenant", "status"],
        )
        .expect("valid metric");
        let kernel_packets = IntCounterVec::new(
            Opts::new(
                "kedge_kernel_packets_total",
                "Packets to the proxy ports seen by the kernel program, by class and verdict.",
            ),
            &["class", "verdict", "action"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "kedge_tokens_total",
                "Tokens of settled requests, by direction (input, output), class and tenant.",
            ),
            &["direction", "class", "tenant"],
        )
        .expect("valid metric");
        let untrusted_headers = IntCounter::new(
            "kedge_untrusted_header_total",
            "Requests whose tenant/class headers came from an untrusted source and were ignored.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(tokens.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(untrusted_headers.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(kernel_packets.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            requests,
            tokens,
            untrusted_headers,
            kernel_packets,
            kernel_seen: Mutex::new(Vec::new()),
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What the admin listener reads on each scrape.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub kernel: Option<Arc<Mutex<KernelEdge>>>,
    pub config: Arc<Loaded>,
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/metrics" => {
                if let Some(kernel) = &self.kernel {
                    let totals = kernel.lock().unwrap_or_else(|p| p.into_inner()).counters();
                    match totals {
                        Ok(t) => self.metrics.observe_kernel(&t, &self.config),
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
