use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use harbor_gateway::proxy::error_chain;
use harbor_gateway::server;

/// TLS-terminating gateway that serves a Harbor registry on the Rancher server's hostname.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). See config/gateway.toml for every key and its default.
    #[arg(long, short, global = true, default_value = "/etc/harbor-gateway/gateway.toml")]
    config: PathBuf,

    /// Log format on stderr. The level comes from RUST_LOG, e.g. RUST_LOG=debug (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

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

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("harbor-gateway: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(prepared)) {
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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
