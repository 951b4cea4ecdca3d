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
};

use crate::{
    budget::Budget,
    config::{self, AttachMode},
    feedback::Feedback,
    gpu::{GpuSample, GpuSource, spawn_poller},
    kernel::{KernelEdge, TagReader},
    ledger::{self, Ledger},
    metrics::{Admin, Metrics},
    proxy::{Proxy, Tags, tls},
};

/// The budget engine, rebuilt from the ledger so a restart never resets a budget.
fn start_budget(cfg: &config::Loaded) -> Result<(Arc<Budget>, Arc<Ledger>)> {
    let now = jiff::Timestamp::now();
    let budget = Budget::new(&cfg.raw.budget, now).map_err(|errors| {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("budget config: {}", all.join("; "))
    })?;
    let lcfg = &cfg.raw.budget.ledger;
    let ledger = Ledger::open(lcfg)
        .with_context(|| format!("opening the usage ledger {}", lcfg.path.display()))?;
    let rows = ledger::rebuild(&lcfg.path, &budget, now)
        .with_context(|| format!("rebuilding budgets from {}", lcfg.path.display()))?;
    tracing::info!(ledger = %lcfg.path.display(), rows, "budgets rebuilt from the usage ledger");
    Ok((Arc::new(budget), Arc::new(ledger)))
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

    let (kernel, tags) = if mode == AttachMode::Off {
        tracing::info!("attach = \"off\": no kernel program, classifying in userspace");
        (None, Tags::from_config(&cfg))
    } else {
        let edge = KernelEdge::start(&cfg)?;
        let tags = Tags::Kernel(Box::new(TagReader::open(&edge.dir, cfg.default_class)?));
        tracing::info!(
            mode = mode.as_str(),
            interface = cfg.raw.kernel.interface.as_deref().unwrap_or(""),
            pins = %edge.dir.display(),
            "kernel edge attached"
        );
        (Some(Arc::new(Mutex::new(edge))), tags)
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
    let proxy = Arc::new(Proxy::new(
        cfg.clone(),
        tags,
        metrics.clone(),
        gpu.clone(),
        budget.clone(),
        Some(ledger.clone()),
    )?);
    let feedback = Feedback::new(
        cfg.clone(),
        kernel.clone(),
        metrics.clone(),
        proxy.clone(),
        gpu,
        budget,
    );
    let feedback_task = tokio::spawn(feedback.run(stop_rx.clone()));
    let admin = Arc::new(Admin {
        metrics,
        kernel: kernel.clone(),
        config: cfg.clone(),
        proxy: proxy.clone(),
    });
    let proxy_task = tokio::spawn(proxy.serve(listener, acceptor, stop_rx.clone()));
    let admin_task = tokio::spawn(admin.serve(admin_listener, stop_rx));
    tracing::info!(
        proxy = %cfg.raw.listen.addr,
        admin = %cfg.raw.metrics.addr,
        tls = cert.is_some(),
        backends = cfg.raw.backends.len(),
        routes = cfg.raw.routes.len(),
        "kedge is serving"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => match &cert {
                Some(c) => match c.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "SIGHUP: TLS reload failed; keeping the old certificate"),
                },
                None => tracing::info!("SIGHUP: no TLS listener, nothing to reload"),
            },
        }
    }
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    let _ = feedback_task.await;
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
