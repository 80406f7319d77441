//! The `relay` binary: `relay serve` runs a relay; `relay codes` lists the protocol's error
//! codes; `relay log inspect` shows the records of a log.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use relay::config::Config;
use relay::server::Server;

mod partner_cli;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Article 7 Relay: routes end-to-end-encrypted messages between a gatekeeper messenger and
/// the partner networks that interoperate with it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay. Without --config: data under ./relay-data, a development PKI created
    /// there on first start, TLS on 127.0.0.1:7700, HTTP (/metrics) on 127.0.0.1:7780, one
    /// core per CPU. Prints one line starting `relay ready` once it accepts connections;
    /// SIGINT or SIGTERM stops it cleanly. Log level: RELAY_LOG (e.g. `debug`).
    Serve {
        /// A TOML configuration file (see docs/operations.md for every key).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides `cores` (0: one per CPU).
        #[arg(long, value_name = "N")]
        cores: Option<u16>,
        /// Overrides `listen` (TLS), e.g. 127.0.0.1:0 for any free port.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `http_listen`.
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<std::net::SocketAddr>,
        /// Overrides `durability`: memory, os or fsync (the default).
        #[arg(long, value_name = "LEVEL")]
        durability: Option<String>,
        /// Overrides `interop.enforce`: `enforce` (the default) applies the interop rules
        /// (consent, location, partner status) to every cross-network frame; `off` is for
        /// lab runs that measure the data plane alone.
        #[arg(long, value_name = "MODE")]
        policy: Option<String>,
    },
    /// List the protocol's error codes: number, name, whether retrying may help.
    Codes,
    /// The partner registry of a running relay (operator certificate): list, show, add,
    /// status, limits.
    Partner(Box<partner_cli::PartnerArgs>),
    /// A relay's log, read-only: `relay log inspect PATH`.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Lists the records of log segments: offset, size, kind, CRC, and the user, devices and
    /// message each refers to; damaged ranges with their kind. PATH is a segment file, a
    /// shard directory or a data directory (every shard-N/ and quarantine/ in it). Safe on a
    /// running relay's directory: it only reads.
    Inspect {
        path: PathBuf,
        /// One summary line per segment, no records.
        #[arg(long)]
        summary: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Partner(args) => match partner_cli::run(*args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay partner: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Log(LogCommand::Inspect { path, summary }) => {
            match relay::log_inspect::inspect(&path, !summary) {
                Ok(text) => {
                    print!("{text}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("relay log inspect: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Codes => {
            for code in codec::ErrorCode::ALL {
                let retry = if code.is_retryable() {
                    "retryable"
                } else {
                    "final"
                };
                println!("{:>4}  {:<22} {retry}", code.as_u16(), code.name());
            }
            std::process::ExitCode::SUCCESS
        }
        Command::Serve {
            config,
            data_dir,
            cores,
            listen,
            http_listen,
            durability,
            policy,
        } => {
            init_logging();
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Ok(Config::embedded()),
            };
            let mut config = match loaded {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("relay: configuration error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            if let Some(n) = cores {
                config.cores = if n == 0 {
                    Config::embedded().cores
                } else {
                    n.min(relay::config::CORES_MAX)
                };
            }
            if let Some(addr) = listen {
                config.listen = addr;
            }
            if let Some(addr) = http_listen {
                config.http_listen = addr;
            }
            if let Some(level) = durability {
                config.durability = match level.as_str() {
                    "memory" => relay::core::log::Durability::Memory,
                    "os" => relay::core::log::Durability::Os,
                    "fsync" => relay::core::log::Durability::Fsync,
                    other => {
                        eprintln!("relay: --durability: {other:?} is not one of memory, os, fsync");
                        return std::process::ExitCode::from(2);
                    }
                };
            }
            if let Some(mode) = policy {
                config.interop.enforce = match mode.as_str() {
                    "enforce" => true,
                    "off" => false,
                    other => {
                        eprintln!("relay: --policy: {other:?} is not one of enforce, off");
                        return std::process::ExitCode::from(2);
                    }
                };
            }
            match serve(&config) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; log files and CI get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn serve(config: &Config) -> Result<(), String> {
    let server = Server::start(config)?;
    let settings = &server.control.settings;
    println!(
        "relay ready tls={} http={} cores={} durability={} data={} policy={} location={}",
        server.relay.listen,
        server.http.addr,
        config.cores,
        config.durability.name(),
        config.data_dir.display(),
        if settings.enforce { "enforce" } else { "off" },
        settings.location.describe(),
    );
    wait_for_signal();
    tracing::info!("stopping: no new connections; flushing open sessions");
    server.stop();
    tracing::info!("stopped");
    Ok(())
}

fn wait_for_signal() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return tracing::error!("signal runtime: {e}"),
    };
    runtime.block_on(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}
