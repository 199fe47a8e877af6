//! `lightagent`: the Light Agent client of the Protection Server.
//!
//! Parses the command line and drives the library's [`client`]; the flags
//! of every command are defined here, in one place.
//!
//! [`client`]: scanserver::client

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use scanserver::{
    bench::FileSet,
    client::{Agent, AgentOptions, ClientTls, Files, HashFirst, ResultSink},
    engine::ScanOutcome,
    localscan,
    proto::{TaskKind, TaskState},
    report::{Format, Reporter},
};

/// How to set the log level, said after the help of every command.
const LOG_HELP: &str = "Log levels: LIGHTAGENT_LOG (a tracing filter, e.g. debug).";

/// The Light Agent client of the Protection Server.
#[derive(Parser)]
#[command(
    name = "lightagent",
    version,
    long_about = None,
    propagate_version = true,
    after_help = LOG_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scan local files and folders through a server.
    ///
    /// Each file is announced by its blake3 digest first, and its content
    /// is sent only if the server asks for it: content the server knows
    /// (another VM's files, an earlier scan) is never sent. While the
    /// server knows almost none of the files (fewer than 1 in 8 of the
    /// last 64: a cold cache, new signatures), files go with their content
    /// at once instead, unhashed, saving a second read of each; see
    /// --hash-first.
    ///
    /// Output and exit status are those of `scanserver scan` (0 nothing
    /// found, 1 something found, 2 some file could not be scanned, or the
    /// server could not be reached or refused the session), and the JSON
    /// lines add `cached`.
    #[command(after_help = LOG_HELP)]
    Scan(ScanArgs),

    /// Simulate a boot storm: many agents scan the same files at once.
    ///
    /// Each simulated agent has its own connection and session. The files
    /// are read and hashed once, up front, so what is measured is the
    /// server. Every round prints files, unique contents, the scans the
    /// engine ran, cache hits, coalesced waits, files and MB per second,
    /// verdict latency (p50, p99) and errors. The first round against a
    /// fresh server is a cold storm; later rounds are answered by digest.
    #[command(after_help = LOG_HELP)]
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Simulated agents, each with its own connection and session, at most
    /// 10000.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    agents: u32,

    /// The files every agent scans: folders, or files.
    #[arg(long = "files", required = true, num_args = 1.., value_name = "PATH")]
    files: Vec<PathBuf>,

    /// How many times the storm is repeated.
    #[arg(long, value_name = "R", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Print each round as a JSON object on its own line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Print one JSON object per file per line (the summary goes to stderr).
    #[arg(long)]
    json: bool,

    /// When to announce files by their digest before sending content.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = HashFirstArg::Auto)]
    hash_first: HashFirstArg,

    /// Report the run to the server as a scan task of this kind (without
    /// it, none is reported): a full scan that found nothing and failed no
    /// file clears the VM's automatic malware tag.
    #[arg(long, value_enum, value_name = "KIND")]
    task: Option<Task>,

    /// Files and folders to scan.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct ConnectionArgs {
    /// The server, `http://HOST:PORT` or `https://HOST:PORT`.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:7405",
        env = "LIGHTAGENT_SERVER"
    )]
    server: String,

    /// Agent identifier [default: lightagent-HOSTNAME].
    #[arg(long, value_name = "ID")]
    agent_id: Option<String>,

    /// VM identifier [default: /etc/machine-id, else the host name].
    #[arg(long, value_name = "ID")]
    vm_id: Option<String>,

    /// VM name [default: the host name].
    #[arg(long, value_name = "NAME")]
    vm_name: Option<String>,

    /// Connection tags to present (repeat the flag).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,

    /// Only accept an encrypted channel: an http:// address is refused
    /// before connecting, and the server is told to refuse the session on a
    /// plain channel.
    #[arg(long)]
    require_encryption: bool,

    /// CA certificate (PEM) the server's certificate chains to; required
    /// with https:// (no system trust store is used).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,

    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// Client private key (PEM), for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Server name to verify the certificate against [default: from URL].
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
}

impl ConnectionArgs {
    fn options(&self) -> AgentOptions {
        let mut options = AgentOptions::for_host(self.server.clone());
        let set = |target: &mut String, value: &Option<String>| {
            if let Some(value) = value {
                target.clone_from(value);
            }
        };
        set(&mut options.agent_id, &self.agent_id);
        set(&mut options.vm_id, &self.vm_id);
        set(&mut options.vm_name, &self.vm_name);
        options.connection_tags = self.tags.clone();
        options.require_encryption = self.require_encryption;
        // A TLS setting given for a plain address is refused, not dropped.
        let tls_asked = self.ca.is_some() || self.cert.is_some() || self.tls_domain.is_some();
        if self.server.starts_with("https://") || tls_asked {
            options.tls = Some(ClientTls {
                ca: self.ca.clone(),
                identity: self.cert.clone().zip(self.key.clone()),
                domain: self.tls_domain.clone(),
            });
        }
        options
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum HashFirstArg {
    /// While the server knows some of the files.
    Auto,
    /// Always: content the server knows is never sent.
    Always,
    /// Never: every file goes with its content, and is not hashed here.
    Never,
}

impl From<HashFirstArg> for HashFirst {
    fn from(arg: HashFirstArg) -> Self {
        match arg {
            HashFirstArg::Auto => HashFirst::Auto,
            HashFirstArg::Always => HashFirst::Always,
            HashFirstArg::Never => HashFirst::Never,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Task {
    Full,
    Custom,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What the server tells the agent outside its files' outcomes (a
    // restart asked for, the session ended) goes to stderr, as warnings.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIGHTAGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // One runtime thread: the agent mostly waits on the server, and file
    // reads and hashing run on blocking threads. A multi-thread runtime
    // cost more CPU (tasks handed between its workers), which a client
    // sharing its cores with the server takes from the scans.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Command::Bench(args) = &cli.command {
        // Each simulated agent's content sender holds a blocking thread
        // for its whole scan: tokio's default of 512 would hold back the
        // uploads of the agents beyond.
        builder.max_blocking_threads(512 + args.agents as usize);
    }
    let runtime = builder
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    match cli.command {
        Command::Scan(args) => runtime.block_on(scan(args)),
        Command::Bench(args) => runtime.block_on(bench(args)),
    }
}

async fn bench(args: BenchArgs) -> ExitCode {
    // A connection per agent: as many descriptors as the hard limit allows.
    match scanserver::connections::raise_open_files() {
        Ok(limit) if limit < u64::from(args.agents) + 64 => eprintln!(
            "warning: {} agents need as many connections, and this process may open {limit} files; raise its limit (ulimit -n)",
            args.agents
        ),
        Ok(_) => {}
        Err(err) => eprintln!("warning: cannot read the limit of open files: {err}"),
    }
    let skipped = |path: PathBuf, err: String| eprintln!("skipped {}: {err}", path.display());
    let set = FileSet::read(&args.files, &skipped);
    if set.is_empty() {
        eprintln!("error: no readable file under the given paths");
        return ExitCode::from(2);
    }
    let options = args.connection.options();
    let mut errors = 0;
    for round in 1..=args.rounds as usize {
        let report =
            match scanserver::bench::round(&options, args.agents as usize, &set, round).await {
                Ok(report) => report,
                Err(err) => {
                    eprintln!("error: {}", scanserver::WithCauses(&err));
                    return ExitCode::from(2);
                }
            };
        match args.json {
            true => println!(
                "{}",
                serde_json::to_string(&report).expect("reports serialize")
            ),
            false => println!("{report}"),
        }
        errors += report.errors;
    }
    // Figures of a storm in which files failed are not those of the storm
    // asked for: a script that runs the bench must not take them as such.
    if errors > 0 {
        eprintln!("error: {errors} verdicts failed; see `lightagent scan` for why");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// A scan's results, printed as they come. Output left unread (a pager
/// left paused) holds up the scan, not the runtime's one thread, which
/// keeps the session's heartbeats and the connection going meanwhile.
struct Printed(Arc<Reporter>);

impl ResultSink for Printed {
    fn put(&self, path: &Path, outcome: ScanOutcome) {
        self.0
            .file_without_waiting(path, &outcome, Some(outcome.cached));
    }

    async fn room(&self) {
        self.0.room().await;
    }
}

async fn scan(args: ScanArgs) -> ExitCode {
    let agent = match Agent::connect(&args.connection.options()).await {
        Ok(agent) => agent,
        Err(err) => {
            eprintln!("error: {}", scanserver::WithCauses(&err));
            return ExitCode::from(2);
        }
    };
    let format = Format::json_if(args.json);
    let reporter = Arc::new(Reporter::new(format));
    // Walked as the scan goes, on the scan's preparing thread: the walk of
    // a large tree neither holds up the session's heartbeats nor is held
    // whole in memory.
    let walker = Arc::clone(&reporter);
    let unreadable = move |path: PathBuf, why| {
        walker.file(&path, &localscan::unreadable_outcome(why), Some(false))
    };
    let files = Files::local(localscan::walk(args.paths.clone(), unreadable));

    let task_id = uuid::Uuid::new_v4().to_string();
    let kind = args.task.map(|task| match task {
        Task::Full => TaskKind::FullScan,
        Task::Custom => TaskKind::CustomScan,
    });
    if let Some(kind) = kind {
        agent
            .report_task(&task_id, kind, TaskState::Started, 0, 0)
            .await;
    }
    let printed = Printed(Arc::clone(&reporter));
    let result = agent
        .scan_into(files, args.hash_first.into(), printed)
        .await;
    // A scan that broke has failed the files it had no answer for: every
    // file has its line, and the summary counts them.
    if let Err(err) = &result {
        eprintln!("error: {}", scanserver::WithCauses(err));
    }
    // The scan has ended, and dropped every copy of the sink (the walk's
    // too: its preparer let go of it before the scan could end).
    let reporter = Arc::try_unwrap(reporter).unwrap_or_else(|_| unreachable!("the scan has ended"));
    // Off the runtime's thread: the last lines may wait for a reader, and
    // the session is still to be told the task's end.
    let summary = tokio::task::spawn_blocking(move || reporter.finish())
        .await
        .expect("the summary is printed");
    if let Some(kind) = kind {
        // Files that failed here (unreadable ones were never sent) are told
        // too: a full scan that missed any proves nothing clean. Counts
        // saturate: a wrapped count could read as none.
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let (infected, mut failed) = (count(summary.infected), count(summary.failed));
        // Nor does a scan that broke, whatever its files' lines say.
        if result.is_err() {
            failed = failed.max(1);
        }
        agent
            .report_task(&task_id, kind, TaskState::Finished, infected, failed)
            .await;
    }
    // In order, so that the server takes the task's end before the session's.
    agent.close().await;
    match (summary.exit_code(), result) {
        // A broken scan is never a clean one.
        (0, Err(_)) => ExitCode::from(2),
        (code, _) => ExitCode::from(code),
    }
}
