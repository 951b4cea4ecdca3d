use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

// The request path allocates small, short-lived buffers on every request;
// mimalloc's per-thread free lists cost measurably less than glibc's arenas
// there (docs/benchmarks.md, proxy overhead).
#[global_allocator]
static ALLOCATOR: kedge::allocator::MiMalloc = kedge::allocator::MiMalloc;

/// kedge: LLM traffic shaping at the kernel edge.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines for humans (default) or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "KEDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel edge and serve the proxy until SIGINT/SIGTERM.
    Run {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
    },
    /// Validate a config file and say what is wrong, with file and line.
    CheckConfig { file: PathBuf },
    /// Print the SHA-256 of an API key read from stdin, for `[[api_key]] sha256`.
    HashKey,
    /// Show the kernel edge and the daemon at a glance (from the pinned maps).
    Status {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Explain each pinned map and the bpftool command that dumps it.
    Maps {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
    },
    /// Measure how much a backend sustains before its latency degrades, and
    /// print the `max_in_flight` and rate to configure.
    ProbeCapacity {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
        /// A `[[backend]]` name.
        #[arg(long)]
        backend: String,
        /// Model to ask for (default: what the routes send this backend).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_tokens: u64,
        /// Median latency may grow to this multiple of a lone request's.
        #[arg(long, default_value_t = 2.0)]
        latency_bound: f64,
        #[arg(long, default_value_t = 256)]
        max_concurrency: usize,
        /// Seconds per concurrency step.
        #[arg(long, default_value_t = 5.0)]
        step_seconds: f64,
    },
    /// Spend per tenant and route from the usage ledger.
    Usage {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
        /// Start of the period (RFC 3339 or YYYY-MM-DD; default: this month's start in the budget time zone).
        #[arg(long)]
        from: Option<String>,
        /// End of the period (default: now).
        #[arg(long)]
        to: Option<String>,
    },
    /// Remove every pinned map and link (the kernel edge stops enforcing).
    Detach {
        #[arg(long, short, default_value = "/etc/kedge/kedge.toml")]
        config: PathBuf,
        /// Pin root to remove instead of the config's `kernel.pin_root`.
        #[arg(long)]
        pin_root: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("KEDGE_LOG").unwrap_or_else(|_| "info".into());
    // journald adds its own timestamps and wants no colour codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kedge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(kedge::daemon::run(&config)),
        Command::CheckConfig { file } => {
            let cfg = kedge::config::load(&file)?;
            println!(
                "{}: ok ({} classes, {} networks, {} backends, attach = {})",
                file.display(),
                cfg.raw.classes.len(),
                cfg.raw.networks.len(),
                cfg.raw.backends.len(),
                cfg.attach().as_str()
            );
            Ok(())
        }
        Command::HashKey => {
            // From stdin, so the key stays out of shell history and `ps`.
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            let key = key.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!key.is_empty(), "no key on stdin");
            println!("{}", kedge::classify::sha256_hex(key.as_bytes()));
            Ok(())
        }
        Command::Status { config, json } => {
            let cfg = kedge::config::load(&config)?;
            let snap = kedge::status::snapshot(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print!("{}", kedge::status::render(&snap));
            }
            Ok(())
        }
        Command::Maps { config } => {
            let root = kedge::config::load(&config)
                .map(|c| c.raw.kernel.pin_root)
                .unwrap_or_else(|_| PathBuf::from("/sys/fs/bpf/kedge"));
            print!("{}", kedge::status::render_maps(&root));
            Ok(())
        }
        Command::ProbeCapacity {
            config,
            backend,
            model,
            max_tokens,
            latency_bound,
            max_concurrency,
            step_seconds,
        } => {
            let cfg = kedge::config::load(&config)?;
            let opts = kedge::probe::ProbeOptions {
                backend,
                model,
                max_tokens,
                latency_bound,
                max_concurrency,
                step: std::time::Duration::from_secs_f64(step_seconds),
            };
            let report = kedge::probe::run_blocking(&cfg, &opts)?;
            print!("{}", kedge::probe::render(&report, &opts));
            Ok(())
        }
        Command::Usage { config, from, to } => {
            let cfg = kedge::config::load(&config)?;
            let tz = jiff::tz::TimeZone::get(cfg.raw.budget.timezone.get_ref())?;
            let parse = |s: &str| -> anyhow::Result<jiff::Timestamp> {
                if let Ok(t) = s.parse::<jiff::Timestamp>() {
                    return Ok(t);
                }
                let d: jiff::civil::Date = s.parse().map_err(|e| {
                    anyhow::anyhow!("`{s}` is neither RFC 3339 nor YYYY-MM-DD: {e}")
                })?;
                Ok(d.to_zoned(tz.clone())?.timestamp())
            };
            let now = jiff::Timestamp::now();
            let from = match from {
                Some(f) => parse(&f)?,
                None => now
                    .to_zoned(tz.clone())
                    .first_of_month()?
                    .start_of_day()?
                    .timestamp(),
            };
            let to = match to {
                Some(t) => parse(&t)?,
                None => now,
            };
            let path = &cfg.raw.budget.ledger.path;
            let rows = kedge::ledger::usage_report(path, from, to)?;
            println!("usage from {from} to {to} ({})", path.display());
            print!("{}", kedge::ledger::format_usage_table(&rows));
            Ok(())
        }
        Command::Detach { config, pin_root } => {
            let root = match pin_root {
                Some(r) => r,
                None => kedge::config::load(&config)?.raw.kernel.pin_root,
            };
            if kedge::kernel::detach(&root)? {
                println!(
                    "removed {} (programs detached, maps unpinned)",
                    root.display()
                );
            } else {
                println!("nothing pinned at {}", root.display());
            }
            Ok(())
        }
    }
}
