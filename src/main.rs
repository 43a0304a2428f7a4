//! The `embedjoin` binary: parse the command line, load settings, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use embedjoin::{Application, Settings};

/// mimalloc instead of glibc's malloc: less CPU per embedding on the bulk path, where
/// megabyte bodies and many vector-sized buffers come and go (BENCHMARKS.md, "Floats
/// written in place, and the allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Joins embedding parts into complete documents and indexes them once.")]
struct Cli {
    /// A TOML file layered over the built-in defaults (config/default.toml).
    #[arg(long, short, global = true, env = "EMBEDJOIN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Measure the whole pipeline in this process with generated load (or a running
    /// server with --http), and print a summary.
    Bench(Box<embedjoin::bench::BenchArgs>),
    /// Validate the settings, reach each backend, and print the effective settings
    /// (secrets shown as ***); exits non-zero, saying what to fix, when something is wrong.
    Check(embedjoin::check::CheckArgs),
    /// List the documents the sink refused for good, or send them again once the cause is
    /// fixed: `dead-letters list|replay [--reason R]`.
    DeadLetters(embedjoin::dead_letters::DeadLetterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("embedjoin: {e}");
            return ExitCode::from(2);
        }
    };
    embedjoin::telemetry::init(&settings.log);
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    if let Some(Command::Check(args)) = &cli.command {
        return runtime.block_on(embedjoin::check::run(&settings, args));
    }
    if let Some(Command::DeadLetters(args)) = &cli.command {
        return runtime.block_on(embedjoin::dead_letters::run(&settings, args));
    }
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(settings).await,
            Command::Bench(args) => embedjoin::bench::run(settings, *args).await,
            Command::Check(_) | Command::DeadLetters(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("Stopped: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shards = settings.shard_count();
    let app = Application::build(settings.clone()).await?;
    tracing::info!(port = app.port(), shards, bind = %settings.http.bind, "Serving.");
    app.run_until_stopped(embedjoin::shutdown::signal()).await
}
