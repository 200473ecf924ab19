//! flags → config → `imrelay::run` (or a one-shot command).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use imrelay::config::{Config, LogFormat, Overrides};

/// mimalloc instead of glibc's allocator: the callback path allocates many small, short-lived
/// strings and maps (the event, the Rhai values); see README, "Dependencies".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "imrelay",
    version,
    about = "Tencent Cloud Chat webhooks → Rhai rules → HTTP destinations"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Config file (default: ./imrelay.toml when present, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where callbacks arrive, e.g. 0.0.0.0:8080 (server.listen).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// The rules folder (rules.dir).
    #[arg(long, global = true)]
    rules: Option<PathBuf>,
    /// The data folder for the delivery queue (storage.dir).
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// text or json (log.format).
    #[arg(long, global = true)]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve callbacks (the default).
    Serve,
    /// Load the config and compile every rule; print problems; exit 1 if any.
    Check,
    /// Run the rules on one payload and print what each did; sends nothing.
    DryRun {
        /// The CallbackCommand, e.g. Group.CallbackAfterSendMsg.
        #[arg(long)]
        command: String,
        /// A callback body (JSON file).
        payload: PathBuf,
    },
    /// Run the rule tests kept beside the rules.
    Test,
    /// Move dead-lettered deliveries back into the queue.
    Replay {
        /// Only this destination's.
        #[arg(long)]
        destination: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.common.listen.clone(),
        rules_dir: cli.common.rules.clone(),
        data_dir: cli.common.data.clone(),
        log_format: cli.common.log_format.clone(),
    };
    let config = match Config::load(cli.common.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    init_logging(config.log.format);
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Check => imrelay::cli::check(&config),
        Command::DryRun { command, payload } => imrelay::cli::dry_run(&config, &command, &payload),
        Command::Test => imrelay::cli::test(&config),
        Command::Replay { destination } => imrelay::cli::replay(&config, destination.as_deref()),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn init_logging(format: LogFormat) {
    // warp logs every client disconnect at ERROR from its accept loop: silence that module.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("warp::server=off".parse().expect("static directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(config: Config) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", config.server.listen);
                return 1;
            }
        };
        match imrelay::run(config, listener, stop_signal()).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e}");
                1
            }
        }
    })
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
