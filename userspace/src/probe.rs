//! `kedge probe-capacity --backend NAME`: how much a real backend sustains.
//!
//! It sends the same small chat completion at doubling concurrency (1, 2, 4, …)
//! for a few seconds per step, through the backend's own configured client
//! (TLS, auth, timeouts). The median latency at concurrency 1 is the baseline;
//! the last step whose median stays within `latency_bound` × baseline and whose
//! errors stay under 1% is the capacity. It prints every step and the
//! `max_in_flight` and rate to put in the config.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;

use crate::{
    config::Loaded,
    proxy::{headers::Forwarded, upstream},
};

pub struct ProbeOptions {
    pub backend: String,
    /// Model name the backend serves (default: the first route arm on it, else "default").
    pub model: Option<String>,
    pub max_tokens: u64,
    /// Median latency may grow to this multiple of the single-request median.
    pub latency_bound: f64,
    pub max_concurrency: usize,
    pub step: Duration,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub rps: f64,
}

pub struct Report {
    pub steps: Vec<Step>,
    /// The recommended step (within the bound), if even concurrency 1 worked.
    pub capacity: Option<Step>,
}

pub async fn probe(cfg: &Loaded, opts: &ProbeOptions) -> Result<Report> {
    let backends = upstream::backends(cfg)?;
    let Some(backend) = backends.into_iter().find(|b| *b.name == *opts.backend) else {
        let known: Vec<_> = cfg
            .raw
            .backends
            .iter()
            .map(|b| b.name.get_ref().as_str())
            .collect();
        bail!(
            "no backend `{}` (defined: {})",
            opts.backend,
            known.join(", ")
        );
    };
    let model = opts.model.clone().unwrap_or_else(|| {
        cfg.routes
            .iter()
            .flat_map(|r| r.arms.iter().map(move |a| (r, a)))
            .find(|(_, a)| a.backend.get_ref() == &opts.backend)
            .map(|(r, a)| {
                a.upstream_model
                    .clone()
                    .unwrap_or_else(|| r.model.get_ref().clone())
            })
            .unwrap_or_else(|| "default".into())
    });
    let body = Bytes::from(
        serde_json::json!({
            "model": model,
            "max_tokens": opts.max_tokens,
            "messages": [{"role": "user", "content": "Count from one to twenty."}],
        })
        .to_string(),
    );
    let backend = Arc::new(backend);
    let mut steps = Vec::new();
    let mut capacity: Option<Step> = None;
    let mut baseline = None;
    let mut c = 1;
    while c <= opts.max_concurrency {
        let step = run_step(&backend, &body, c, opts.step).await;
        let base = *baseline.get_or_insert(step.p50_ms);
        let within = step.requests > 0
            && (step.errors as f64) <= 0.01 * step.requests as f64
            && step.p50_ms <= base * opts.latency_bound;
        steps.push(step.clone());
        if !within {
            break;
        }
        capacity = Some(step);
        c *= 2;
    }
    Ok(Report { steps, capacity })
}

async fn run_step(
    backend: &Arc<upstream::Backend>,
    body: &Bytes,
    concurrency: usize,
    length: Duration,
) -> Step {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let deadline = started + length;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (backend, body) = (backend.clone(), body.clone());
            let (latencies, errors) = (latencies.clone(), errors.clone());
            tokio::spawn(async move {
                let headers = Forwarded {
                    lines: b"content-type: application/json\r\n".to_vec(),
                    authorization: None,
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match backend
                        .send(Method::POST, "/v1/chat/completions", &headers, body.clone())
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status();
                            resp.into_body().collect().await.is_ok() && status.is_success()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(t.elapsed());
                    } else {
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let mut l = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    l.sort();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i].as_secs_f64() * 1000.0
    };
    let elapsed = started.elapsed().as_secs_f64();
    Step {
        concurrency,
        requests: l.len(),
        errors: *errors.lock().unwrap_or_else(|p| p.into_inner()),
        p50_ms: pct(0.5),
        p95_ms: pct(0.95),
        rps: l.len() as f64 / elapsed,
    }
}

/// The table of steps and the config snippet to paste.
pub fn render(report: &Report, opts: &ProbeOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>11} {:>9} {:>7} {:>9} {:>9} {:>8}",
        "CONCURRENCY", "REQUESTS", "ERRORS", "P50 ms", "P95 ms", "REQ/S"
    );
    for s in &report.steps {
        let _ = writeln!(
            out,
            "{:>11} {:>9} {:>7} {:>9.1} {:>9.1} {:>8.2}",
            s.concurrency, s.requests, s.errors, s.p50_ms, s.p95_ms, s.rps
        );
    }
    match &report.capacity {
        Some(c) => {
            let _ = writeln!(
                out,
                "\ncapacity: {} concurrent requests, {:.2} req/s, median latency within {}x of a lone request\n\n\
                 [[schedule.backend]]\nname = \"{}\"\nmax_in_flight = {}\n\n\
                 # and, for a provider pool in [[budget.pool]]: requests_per_minute = {{ max = {} }}",
                c.concurrency,
                c.rps,
                opts.latency_bound,
                opts.backend,
                c.concurrency,
                (c.rps * 60.0).floor()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\nthe backend did not answer a single request successfully; check its URL and model"
            );
        }
    }
    out
}

pub fn run_blocking(cfg: &Loaded, opts: &ProbeOptions) -> Result<Report> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(probe(cfg, opts))
}
