//! `kedge run`: load the config, bring up the kernel edge, serve until signalled.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    budget::Budget,
    config::{self, AttachMode},
    feedback::Feedback,
    gpu::{GpuSample, GpuSource, spawn_poller},
    kernel::{KernelEdge, TagReader},
    ledger::{self, Ledger},
    metrics::{Admin, Metrics},
    notify,
    proxy::{Proxy, ProxySlot, Tags, tls},
};

/// The usage ledger, and the budget engine rebuilt from it so a restart never
/// resets a budget.
fn start_budget(cfg: &config::Loaded) -> Result<(Arc<Budget>, Arc<Ledger>)> {
    let lcfg = &cfg.raw.budget.ledger;
    let ledger = Ledger::open(lcfg)
        .with_context(|| format!("opening the usage ledger {}", lcfg.path.display()))?;
    Ok((Arc::new(rebuilt_budget(cfg)?), Arc::new(ledger)))
}

/// A budget engine for `cfg`'s limits holding the current windows' usage from
/// the ledger (which must exist: `Ledger::open` creates it).
fn rebuilt_budget(cfg: &config::Loaded) -> Result<Budget> {
    let now = jiff::Timestamp::now();
    let budget = Budget::new(&cfg.raw.budget, now).map_err(|errors| {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("budget config: {}", all.join("; "))
    })?;
    let path = &cfg.raw.budget.ledger.path;
    let rows = ledger::rebuild(path, &budget, now)
        .with_context(|| format!("rebuilding budgets from {}", path.display()))?;
    tracing::info!(ledger = %path.display(), rows, "budgets rebuilt from the usage ledger");
    Ok(budget)
}

/// Opens the configured GPU source and polls it on its own thread. Without a
/// GPU or a driver kedge says so once and runs with no GPU load.
fn start_gpu(cfg: &config::Loaded) -> watch::Receiver<Vec<GpuSample>> {
    match GpuSource::open(&cfg.raw.gpu) {
        Ok(Some(source)) => {
            tracing::info!(source = source.name(), "GPU load source");
            let interval = std::time::Duration::from_millis(cfg.raw.gpu.interval_ms.max(10));
            // The thread ends when the receiver side is gone (daemon exit).
            spawn_poller(source, interval).0
        }
        Ok(None) => {
            tracing::info!("GPU load source: none (configured)");
            watch::channel(Vec::new()).1
        }
        Err(e) => {
            tracing::warn!(
                "GPU load source: none ({e}); routing and shedding run without GPU load"
            );
            watch::channel(Vec::new()).1
        }
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = Arc::new(config::load(config_path)?);
    let mode = cfg.attach();

    let kernel = if mode == AttachMode::Off {
        tracing::info!("attach = \"off\": no kernel program, classifying in userspace");
        None
    } else {
        let edge = KernelEdge::start(&cfg)?;
        tracing::info!(
            mode = mode.as_str(),
            interface = cfg.raw.kernel.interface.as_deref().unwrap_or(""),
            pins = %edge.dir.display(),
            "kernel edge attached"
        );
        Some(Arc::new(Mutex::new(edge)))
    };

    let metrics = Arc::new(Metrics::new());
    let listener = TcpListener::bind(cfg.raw.listen.addr)
        .await
        .with_context(|| format!("binding the proxy to {}", cfg.raw.listen.addr))?;
    let admin_listener = TcpListener::bind(cfg.raw.metrics.addr)
        .await
        .with_context(|| format!("binding the admin listener to {}", cfg.raw.metrics.addr))?;

    let cert = match &cfg.raw.listen.tls {
        Some(t) => Some(tls::ReloadableCert::load(
            t.cert.get_ref(),
            t.key.get_ref(),
        )?),
        None => None,
    };
    let acceptor = match &cert {
        Some(c) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            c.clone(),
        )?)),
        None => None,
    };

    let gpu = start_gpu(&cfg);
    let (budget, ledger) = start_budget(&cfg)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let parts = Parts {
        kernel: kernel.clone(),
        metrics: metrics.clone(),
        gpu,
        ledger: ledger.clone(),
    };
    let slot = Arc::new(ProxySlot::new(parts.proxy(cfg.clone(), budget)?));
    let mut feedback = parts.feedback(&slot, &stop_rx);
    let admin = Arc::new(Admin {
        metrics,
        kernel: kernel.clone(),
        proxy: slot.clone(),
    });
    let proxy_task = tokio::spawn(slot.clone().serve(listener, acceptor, stop_rx.clone()));
    let admin_task = tokio::spawn(admin.serve(admin_listener, stop_rx.clone()));
    tracing::info!(
        proxy = %cfg.raw.listen.addr,
        admin = %cfg.raw.metrics.addr,
        tls = cert.is_some(),
        backends = cfg.raw.backends.len(),
        routes = cfg.raw.routes.len(),
        "kedge is serving"
    );
    notify::notify("READY=1\nSTATUS=serving");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                notify::reloading();
                match reload(config_path, &slot, &parts, cert.as_deref()) {
                    Ok(()) => {
                        // The feedback loop follows the new classes and shedding rules.
                        feedback.abort();
                        feedback = parts.feedback(&slot, &stop_rx);
                        notify::notify("READY=1\nSTATUS=serving (config reloaded)");
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "SIGHUP: config refused; the old one keeps running");
                        notify::notify("READY=1\nSTATUS=serving (reload refused, see the log)");
                    }
                }
            }
        }
    }
    notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    let _ = feedback.await;
    // Every settled request is in the ledger before we exit.
    match ledger.flush() {
        Ok(()) => tracing::info!("usage ledger flushed"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "flushing the usage ledger"),
    }
    if kernel.is_some() {
        // Deliberate: pinned maps and links keep enforcing while the daemon is
        // down or being upgraded; `kedge detach` removes them.
        tracing::info!("kernel edge left attached (pinned); `kedge detach` removes it");
    }
    Ok(())
}

/// What outlives a config reload.
struct Parts {
    kernel: Option<Arc<Mutex<KernelEdge>>>,
    metrics: Arc<Metrics>,
    gpu: watch::Receiver<Vec<GpuSample>>,
    ledger: Arc<Ledger>,
}

impl Parts {
    fn proxy(&self, cfg: Arc<config::Loaded>, budget: Arc<Budget>) -> Result<Proxy> {
        let tags = match &self.kernel {
            Some(k) => {
                let dir = k.lock().unwrap_or_else(|p| p.into_inner()).dir.clone();
                Tags::Kernel(Box::new(TagReader::open(&dir, cfg.default_class)?))
            }
            None => Tags::from_config(&cfg),
        };
        Proxy::new(
            cfg,
            tags,
            self.metrics.clone(),
            self.gpu.clone(),
            budget,
            Some(self.ledger.clone()),
        )
    }

    fn feedback(&self, slot: &Arc<ProxySlot>, stop: &watch::Receiver<bool>) -> JoinHandle<()> {
        let proxy = slot.get();
        let feedback = Feedback::new(
            proxy.config().clone(),
            self.kernel.clone(),
            self.metrics.clone(),
            proxy.clone(),
            self.gpu.clone(),
            proxy.budget().clone(),
            self.ledger.clone(),
        );
        tokio::spawn(feedback.run(stop.clone()))
    }
}

/// SIGHUP: validate the file, then apply it whole — kernel maps in place, a
/// new proxy for new connections (open ones finish under the old config), new
/// budgets only when `[budget]` changed (rebuilt from the ledger). Anything
/// wrong and nothing changes.
fn reload(
    path: &Path,
    slot: &ProxySlot,
    parts: &Parts,
    cert: Option<&tls::ReloadableCert>,
) -> Result<()> {
    let new = Arc::new(config::load(path)?);
    let old = slot.get();
    let old_cfg = old.config();
    for (what, changed) in [
        (
            "listen.addr",
            new.raw.listen.addr != old_cfg.raw.listen.addr,
        ),
        (
            "metrics.addr",
            new.raw.metrics.addr != old_cfg.raw.metrics.addr,
        ),
        ("kernel.attach", new.attach() != old_cfg.attach()),
        (
            "kernel.interface",
            new.raw.kernel.interface != old_cfg.raw.kernel.interface,
        ),
        (
            "kernel.pin_root",
            new.raw.kernel.pin_root != old_cfg.raw.kernel.pin_root,
        ),
        (
            "listen.tls",
            new.raw.listen.tls.is_some() != old_cfg.raw.listen.tls.is_some(),
        ),
    ] {
        if changed {
            anyhow::bail!("{what} changed: that takes a restart (`systemctl restart kedge`)");
        }
    }
    let budget = if new.budget_toml == old_cfg.budget_toml {
        old.budget().clone()
    } else {
        parts.ledger.flush()?;
        Arc::new(rebuilt_budget(&new)?)
    };
    let proxy = parts.proxy(new.clone(), budget)?;
    if let Some(c) = cert {
        c.reload()?;
        tracing::info!("SIGHUP: TLS certificate reloaded");
    }
    if let Some(k) = &parts.kernel {
        k.lock().unwrap_or_else(|p| p.into_inner()).sync(&new)?;
    }
    slot.replace(proxy);
    tracing::info!(config = %path.display(), "SIGHUP: config reloaded");
    Ok(())
}
