//! `streamer`: one binary, a subcommand per role. See `streamer --help`.

#![forbid(unsafe_code)]

use clap::Parser as _;

/// jemalloc, with its background thread (the crate's `background_threads`
/// feature), gives memory back to the system once it has been free for a
/// while (`dirty_decay_ms`, 10 s by default), even while the process is
/// otherwise idle. With glibc's allocator the memory of closed sockets was
/// never given back: 10,000 idle sockets took about 100 MiB, all of it still
/// held after the last one closed; with jemalloc about 88% of it comes back
/// within 15 s, for about 0.5 KiB more per open socket (`idle-memory` in
/// BENCHMARKS.md). Options can be changed at run time through
/// `_RJEM_MALLOC_CONF`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
