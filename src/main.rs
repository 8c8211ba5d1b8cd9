//! `streamer`: one binary, a subcommand per role. See `streamer --help`.

#![forbid(unsafe_code)]

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = streamer::cli::Cli::parse();
    match streamer::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("streamer: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
