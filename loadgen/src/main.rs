//! The `loadgen` binary: parses the command line and hands over to [`loadgen::run`].

use clap::Parser;
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = loadgen::cli::Cli::parse();
    loadgen::run::main(cli)
}
