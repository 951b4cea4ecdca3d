use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// kedge: LLM traffic shaping at the kernel edge.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEDGE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
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
