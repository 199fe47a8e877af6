//! `lightagent`: the Light Agent client of the Protection Server.
//!
//! Its commands (scanning through a server, benchmarks) are defined in the
//! library's `cli` module; this binary only parses and dispatches.

use clap::Parser;

/// The Light Agent client of the Protection Server.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("lightagent has no commands yet; see `lightagent --help`");
    std::process::exit(2);
}
