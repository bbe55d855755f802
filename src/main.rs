use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use harbor_gateway::log_buffer::LogWriter;
use harbor_gateway::proxy::error_chain;
use harbor_gateway::server;
use harbor_gateway::workers::Workers;

/// TLS-terminating gateway that serves a Harbor registry on the Rancher server's hostname.
#[derive(Debug, Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Configuration file (TOML). See config/gateway.toml for every key, its unit and its
    /// default.
    #[arg(long, short, global = true, default_value = "/etc/harbor-gateway/gateway.toml")]
    config: PathBuf,

    /// Log format on stderr: `text` (one human-readable line per event) or `json` (one
    /// JSON object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

const AFTER_HELP: &str = "\
Environment:
  RUST_LOG   log filter, default `info`. The access log has target `access`:
             RUST_LOG=info,access=off hides it; RUST_LOG=debug adds per-connection detail.

Signals:
  SIGHUP     reload the configuration, certificate and CA bundle; a bad file keeps
             the previous state in force. Changed files are also picked up every
             reload.watch_interval seconds (default 5).
  SIGTERM    stop accepting, let in-flight requests finish for up to timeouts.drain
  SIGINT     seconds (default 60), then exit 0.

Exit status: 0 after a drain or a valid `check`, 2 for an invalid configuration or a
listener that cannot bind, 1 when the runtime cannot start.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and the certificate files, then exit (status 0 when valid).
    Check,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);

    let prepared = match server::prepare(&cli.config) {
        Ok(prepared) => prepared,
        Err(error) => {
            eprintln!("harbor-gateway: {}", error_chain(&error));
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("{}: configuration and certificates are valid", cli.config.display());
        return ExitCode::SUCCESS;
    }

    // Client connections run on the worker threads. This thread accepts them and handles
    // signals, reloads and the admin listener, so a reload never stalls a request.
    let workers = match Workers::start(prepared.config.worker_count()) {
        Ok(workers) => Arc::new(workers),
        Err(error) => {
            eprintln!("harbor-gateway: cannot start the worker threads: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("harbor-gateway: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(server::run(prepared, workers.clone()));
    // The accept loop has ended, so this is the last reference unless the run failed
    // before it started.
    if let Some(workers) = Arc::into_inner(workers) {
        workers.stop();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("harbor-gateway: {}", error_chain(&error));
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
