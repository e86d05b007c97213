//! The `engage` binary: parses flags, sets up logging and runs the server.

use clap::Parser;
use engage::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

// sled allocates and frees a node copy per insert; with glibc malloc the writer thread spent
// ~30% of its time in the allocator (perf, see BENCHMARKS.md). mimalloc is a well-kept, widely
// used allocator that handles this pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Prints what a one-shot command answered, or logs its failure.
fn report(result: Result<String, engage::server::ServerError>, what: &str) -> std::process::ExitCode {
    logging(LogFormat::Human);
    match result {
        Ok(answer) => {
            println!("{answer}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "{what} failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    // Before the flags are parsed (and before any thread starts): the file's settings become
    // the defaults of their flags.
    // Not `env::args()`: an argument that is not UTF-8 (a user id, a path) must not panic.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.get(1).is_some_and(|c| c == "serve") {
        if let Err(e) = engage::config::apply_config_file(&args) {
            eprintln!("engage: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    // A bad command line is one line on stderr (help and version print as usual).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            eprintln!("engage: {} (engage --help)", first.trim_start_matches("error: "));
            return std::process::ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Compact(args) => {
            logging(LogFormat::Human);
            match engage::server::compact(&args) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "engage compact failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Backup(args) => report(engage::server::backup(&args), "engage backup"),
        Command::Restore(args) => report(engage::server::restore(&args), "engage restore"),
        Command::Keys(args) => report(engage::server::keys(&args), "engage keys"),
        Command::Client(command) => engage::cli::run(command),
        Command::Serve(args) => {
            logging(args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("engage: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match runtime.block_on(engage::server::run(*args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "engage failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
