//! The loop that pushes userspace pressure down to the kernel edge.
//!
//! Every tick it reads the latest GPU sample and every scheduler's queue
//! fullness, turns them into one admission ratio per class — the stricter of
//! the GPU shedding table ([`ShedController`]) and the queue controller
//! ([`AdmissionController`]), both with hysteresis — and writes the ratios
//! that changed into the kernel's `ADMISSION` map, the raw GPU load into
//! `GPU_LOAD`, and both into `/metrics`. Policy lives here; the kernel only
//! applies the numbers.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kedge_common::ADMIT_ALL;
use tokio::sync::watch;

use crate::{
    budget::Budget,
    config::Loaded,
    gpu::{GpuSample, ShedController},
    kernel::KernelEdge,
    ledger::Ledger,
    metrics::Metrics,
    proxy::Proxy,
    schedule::AdmissionController,
    webhook,
};

/// How often pressure is re-evaluated.
pub const TICK: Duration = Duration::from_millis(250);

pub struct Feedback {
    cfg: Arc<Loaded>,
    kernel: Option<Arc<Mutex<KernelEdge>>>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    gpu: watch::Receiver<Vec<GpuSample>>,
    shed: ShedController,
    queues: AdmissionController,
    /// What the kernel was last told, per class.
    written: Vec<u32>,
    budget: Arc<Budget>,
    ledger: Arc<Ledger>,
}

impl Feedback {
    pub fn new(
        cfg: Arc<Loaded>,
        kernel: Option<Arc<Mutex<KernelEdge>>>,
        metrics: Arc<Metrics>,
        proxy: Arc<Proxy>,
        gpu: watch::Receiver<Vec<GpuSample>>,
        budget: Arc<Budget>,
        ledger: Arc<Ledger>,
    ) -> Feedback {
        let classes = cfg.raw.classes.len();
        // Start from what the kernel holds: pinned admission ratios outlive a
        // restart or reload, and a ratio believed to be 1000 would never be
        // written back to 1000.
        let written: Vec<u32> = (0..classes as u32)
            .map(|c| {
                kernel.as_ref().map_or(ADMIT_ALL, |k| {
                    let k = k.lock().unwrap_or_else(|p| p.into_inner());
                    k.admission(c).unwrap_or(ADMIT_ALL)
                })
            })
            .collect();
        // Published here, before the daemon serves /metrics, not when the
        // loop first runs: a scrape right after start-up sees the real ratios.
        for (c, ratio) in cfg.raw.classes.iter().zip(&written) {
            metrics
                .admission
                .with_label_values(&[c.name.get_ref()])
                .set(*ratio as i64);
        }
        Feedback {
            shed: ShedController::new(&cfg.raw.gpu),
            queues: AdmissionController::new(cfg.schedule.feedback.clone(), classes)
                .resume(&written),
            written,
            cfg,
            kernel,
            metrics,
            proxy,
            gpu,
            budget,
            ledger,
        }
    }

    /// Runs until `stop` flips.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => self.tick(Instant::now()),
                _ = stop.changed() => return,
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        let samples = self.gpu.borrow().clone();
        for s in &samples {
            let gpu = s.index.to_string();
            self.metrics
                .gpu_utilization
                .with_label_values(&[&gpu])
                .set(s.utilization_pct as f64 / 100.0);
            self.metrics
                .gpu_memory_used
                .with_label_values(&[&gpu])
                .set(s.memory_used_bytes as f64);
            self.metrics
                .gpu_memory_total
                .with_label_values(&[&gpu])
                .set(s.memory_total_bytes as f64);
        }

        let fullness = observe_queues(&self.proxy, &self.metrics);
        self.queues.update(now, &fullness);

        let hottest = samples.iter().map(|s| s.utilization_pct).max().unwrap_or(0);
        let priorities: Vec<u8> = self.cfg.raw.classes.iter().map(|c| c.priority).collect();
        let gpu_ratios = self.shed.update(hottest, &priorities);
        let wanted: Vec<u32> = (0..self.cfg.raw.classes.len())
            .map(|c| gpu_ratios[c].min(self.queues.ratios()[c]))
            .collect();

        let mut kernel = self
            .kernel
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()));
        let now_wall = jiff::Timestamp::now();
        let ls = self.ledger.stats();
        self.metrics
            .ledger_last_commit
            .with_label_values::<&str>(&[])
            .set(ls.last_commit.as_secs_f64());
        self.metrics
            .ledger_rows
            .with_label_values::<&str>(&[])
            .set(ls.rows as f64);
        self.metrics
            .ledger_transactions
            .with_label_values::<&str>(&[])
            .set(ls.transactions as f64);
        for alert in self.budget.take_alerts() {
            tracing::warn!(alert = %alert, "budget alert");
            self.metrics
                .budget_alerts
                .with_label_values(&[
                    &alert.scope.to_string(),
                    alert.kind.label(),
                    &alert.threshold_permille.to_string(),
                ])
                .inc();
            if let Some(url) = self.cfg.raw.budget.webhook_url.as_ref() {
                webhook::post(url.get_ref().clone(), &alert);
            }
        }
        for s in self.budget.status(now_wall) {
            if s.limit > 0 {
                self.metrics
                    .budget_used
                    .with_label_values(&[&s.scope.to_string(), s.kind.label()])
                    .set(s.used as f64 / s.limit as f64);
            }
        }
        if let Some(k) = kernel.as_mut() {
            for m in self.budget.kernel_mirror(now_wall) {
                let id = crate::config::tenant_id(&m.tenant);
                let st = m.state;
                if let Err(e) = k.set_tenant(id, st.tokens_used, st.tokens_limit, st.blocked != 0) {
                    tracing::debug!(error = %e, "writing TENANTS");
                }
            }
        }
        if let Some(k) = kernel.as_mut() {
            for s in &samples {
                if let Err(e) = k.set_gpu_load(
                    s.index,
                    s.utilization_pct,
                    s.memory_used_bytes,
                    s.memory_total_bytes,
                ) {
                    tracing::debug!(error = %e, "writing GPU_LOAD");
                }
            }
        }
        for (class, &ratio) in wanted.iter().enumerate() {
            if ratio == self.written[class] {
                continue;
            }
            let name = self.cfg.class_name(class as u32).to_string();
            tracing::info!(class = %name, from = self.written[class], to = ratio, gpu_util = hottest, "admission ratio changed");
            if let Some(k) = kernel.as_mut()
                && let Err(e) = k.set_admission(class as u32, ratio)
            {
                tracing::warn!(error = %e, "writing ADMISSION");
                continue;
            }
            self.written[class] = ratio;
            self.metrics
                .admission
                .with_label_values(&[&name])
                .set(ratio as i64);
        }
    }
}

/// Refreshes the queue gauges from every scheduler and returns each class's
/// fullness (the worst backend decides). Also called on each `/metrics` scrape,
/// so the gauges are current, not one tick old.
pub fn observe_queues(proxy: &Proxy, metrics: &Metrics) -> Vec<f64> {
    let cfg = proxy.config();
    let classes = cfg.raw.classes.len();
    let mut fullness = vec![0.0f64; classes];
    for (backend, gate) in proxy.gates() {
        let stats = gate.stats();
        metrics
            .queue_in_flight
            .with_label_values(&[backend])
            .set(stats.in_flight as i64);
        for (class, c) in stats.classes.iter().enumerate().take(classes) {
            metrics
                .queue_depth
                .with_label_values(&[backend, cfg.class_name(class as u32)])
                .set(c.queued as i64);
        }
        for (class, f) in gate.fullness().into_iter().enumerate().take(classes) {
            fullness[class] = fullness[class].max(f);
        }
    }
    fullness
}

/// The daemon's own view for `kedge status`: every queue.
pub fn status(proxy: &Proxy) -> serde_json::Value {
    let cfg = proxy.config();
    let mut queues = Vec::new();
    for (backend, gate) in proxy.gates() {
        let stats = gate.stats();
        for (class, c) in stats.classes.iter().enumerate() {
            queues.push(serde_json::json!({
                "backend": backend,
                "class": cfg.class_name(class as u32),
                "depth": c.queued,
                "in_flight": c.in_flight,
                "admitted": c.admitted,
                "rejected": c.rejected.iter().sum::<u64>(),
            }));
        }
    }
    serde_json::json!({ "queues": queues })
}
