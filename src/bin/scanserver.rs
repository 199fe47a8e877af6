//! `scanserver`: the Protection Server daemon and its operator commands.
//!
//! This binary parses the command line and hands over to the library; the
//! flags of every command are defined here, in one place.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use scanserver::{
    engine::{Engine, EngineConfig},
    localscan,
    report::Format,
    signatures::{Ruleset, SignatureError},
};

/// The Protection Server of an SVM: scans files for Light Agents with YARA-X
/// rules.
#[derive(Parser)]
#[command(version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "SCANSERVER_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scan local files and folders, recursively and in parallel.
    ///
    /// Prints each infected file with the rules that matched and each file
    /// that could not be scanned with the reason, then a summary. Exit
    /// status: 0 nothing found, 1 something found, 2 some file could not be
    /// scanned (or the rules could not be loaded).
    Scan(ScanArgs),
    /// Work with rulesets.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    rules: RulesArgs,

    /// Print one JSON object per file per line (the summary goes to stderr).
    #[arg(long)]
    json: bool,

    /// Scan threads [default: one per core].
    #[arg(long, short = 'j', value_name = "N")]
    threads: Option<usize>,

    /// Per-file scan timeout; a file scanned longer fails with `timeout`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// Files larger than this many bytes fail with `too_large`.
    #[arg(long, value_name = "BYTES", default_value_t = EngineConfig::default().max_scan_size)]
    max_size: u64,

    /// Files and folders to scan.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct RulesArgs {
    /// The ruleset: a folder of .yar/.yara files, one source file, or a
    /// pre-compiled rules file.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "signatures",
        env = "SCANSERVER_RULES"
    )]
    rules: PathBuf,

    /// Where compiled rules are cached, so unchanged signatures are not
    /// compiled again [default: the user's cache folder, scanserver/rules].
    #[arg(long, value_name = "DIR", env = "SCANSERVER_RULES_CACHE")]
    rules_cache: Option<PathBuf>,

    /// Always compile; neither read nor write the compiled-rules cache.
    #[arg(long)]
    no_rules_cache: bool,
}

impl RulesArgs {
    fn load(&self) -> Result<Ruleset, SignatureError> {
        let cache = match (&self.rules_cache, self.no_rules_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(dir.clone()),
            (None, false) => dirs::cache_dir().map(|d| d.join("scanserver").join("rules")),
        };
        let ruleset = Ruleset::load(&self.rules, cache.as_deref())?;
        tracing::info!(
            version = ruleset.version(),
            rules = ruleset.rule_count(),
            from_cache = ruleset.from_cache(),
            elapsed = ?ruleset.compile_time(),
            "signatures loaded from {}",
            ruleset.source().display()
        );
        let warnings = ruleset.warnings();
        if !warnings.is_empty() {
            tracing::warn!(
                "{} compiler warnings; `scanserver rules check {}` lists them",
                warnings.len(),
                self.rules.display()
            );
        }
        for warning in warnings {
            tracing::debug!("{warning}");
        }
        Ok(ruleset)
    }
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Compile a ruleset and print its version, rule count, warnings and
    /// errors. Exit status 1 when it does not compile.
    Check {
        /// The ruleset: a folder, a source file or a pre-compiled file.
        #[arg(value_name = "PATH", default_value = "signatures")]
        path: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Scan(args) => scan(args),
        Command::Rules(RulesCommand::Check { path }) => check(&path),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCANSERVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn scan(args: ScanArgs) -> ExitCode {
    let ruleset = match args.rules.load() {
        Ok(ruleset) => ruleset,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let config = EngineConfig {
        threads: args.threads.unwrap_or(0),
        scan_timeout: args.timeout,
        max_scan_size: args.max_size,
        ..EngineConfig::default()
    };
    let engine = match Engine::new(ruleset, &config) {
        Ok(engine) => engine,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Text
    };
    let summary = localscan::run(&engine, &args.paths, format);
    ExitCode::from(summary.exit_code())
}

fn check(path: &std::path::Path) -> ExitCode {
    match Ruleset::check(path) {
        Ok(ruleset) => {
            for warning in ruleset.warnings() {
                println!("{}", warning.text.trim_end());
            }
            println!(
                "{}: OK, {} rules, {} warnings, version {}, compiled in {:.2?}",
                path.display(),
                ruleset.rule_count(),
                ruleset.warnings().len(),
                ruleset.version(),
                ruleset.compile_time()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
