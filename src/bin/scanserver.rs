//! `scanserver`: the Protection Server daemon and its operator commands.
//!
//! This binary parses the command line and hands over to the library; the
//! flags of every command are defined here, in one place.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use scanserver::{
    admin::{self, AdminClient},
    auth::BearerToken,
    config::{Config, ConfigError, RulesConfig, TlsConfig},
    engine::{Engine, EngineConfig},
    localscan,
    proto::{AgentsRequest, Health, ReloadSignaturesRequest, StatusRequest, TagRequest},
    report::Format,
    reporting::Receiver,
    server::{Server, termination_signal},
    signatures::{Ruleset, SignatureError},
    vms::SecurityTag,
};

/// How to set the log level, said after the help of the commands that log.
const LOG_HELP: &str =
    "Log levels: SCANSERVER_LOG (a tracing filter, e.g. debug or scanserver=debug).";

/// The Protection Server of an SVM: scans files for Light Agents with YARA-X
/// rules.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = LOG_HELP
)]
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
    #[command(after_help = LOG_HELP)]
    Scan(ScanArgs),
    /// Run the Protection Server: serve Light Agents over gRPC.
    ///
    /// Settings come from the configuration file, then SCANSERVER_*
    /// environment variables, then these flags, each overriding the one
    /// before. With none at all, the shipped signatures are served on
    /// 0.0.0.0:7405 without TLS.
    #[command(after_help = LOG_HELP)]
    Serve(Box<ServeArgs>),
    /// Check a ruleset, or make a running server reload its signatures.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Show a running server's status: version, uptime, OK / WARNING /
    /// CRITICAL with every reason in force, and each component's state.
    ///
    /// Exit status: 0 OK, 1 WARNING or CRITICAL, 2 the server could not be
    /// asked.
    Status(AdminArgs),
    /// List the virtual machines a running server protects (connected ones,
    /// those seen in the last 30 days, and tagged ones of any age), with
    /// status and security tags.
    Agents(AdminArgs),
    /// Assign or remove a VM's security tag on a running server.
    #[command(subcommand)]
    Tags(TagsCommand),
    /// Run a minimal Integration Server that prints each SVM report it
    /// receives as one JSON line on stdout, to try a deployment.
    Receiver(ReceiverArgs),
}

/// How the operator commands reach the admin service.
#[derive(Args, Clone)]
struct AdminTarget {
    /// Address of the server's admin listener: IP:PORT, or unix:PATH for
    /// its Unix-domain socket (`serve --admin-listen`).
    #[arg(long, value_name = "ADDR", default_value = admin::DEFAULT_ADMIN_LISTEN, env = "SCANSERVER_ADMIN")]
    admin: String,

    /// Send the bearer token in FILE, when the server asks for one
    /// (`serve --admin-token-file`).
    #[arg(long, value_name = "FILE", env = "SCANSERVER_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Args)]
struct AdminArgs {
    #[command(flatten)]
    server: AdminTarget,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Assign a tag by hand; only an operator removes it again.
    Assign(TagArgs),
    /// Remove a tag, however it was assigned; the VM's agent is asked to
    /// restart its session.
    Remove(TagArgs),
}

#[derive(Args)]
struct TagArgs {
    /// The VM's id, as `scanserver agents` lists it.
    vm: String,
    /// `ANTI_VIRUS.VirusFound.threat=high` or `IDS_IPS.threat=high`.
    #[arg(value_parser = |s: &str| s.parse::<SecurityTag>())]
    tag: SecurityTag,
    #[command(flatten)]
    server: AdminTarget,
}

#[derive(Args)]
struct ReceiverArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7407")]
    listen: std::net::SocketAddr,

    /// Accept only reports carrying the bearer token in this file.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML; see scanserver.sample.toml).
    #[arg(long, value_name = "FILE", env = "SCANSERVER_CONFIG")]
    config: Option<PathBuf>,

    /// Address of the agent listener [default: 0.0.0.0:7405].
    #[arg(long, value_name = "ADDR", env = "SCANSERVER_LISTEN")]
    listen: Option<std::net::SocketAddr>,

    /// The ruleset: a folder, a source file or pre-compiled rules; a
    /// relative path is from the working folder (`/` under systemd: give
    /// an absolute one) [default: signatures].
    #[arg(long, value_name = "PATH", env = "SCANSERVER_RULES")]
    rules: Option<PathBuf>,

    /// Where compiled rules are cached, so unchanged signatures are not
    /// compiled again [default: rules in $CACHE_DIRECTORY when systemd sets
    /// it, else the user's cache folder, scanserver/rules].
    #[arg(long, value_name = "DIR", env = "SCANSERVER_RULES_CACHE")]
    rules_cache: Option<PathBuf>,

    /// This SVM's identifier [default: the host name].
    #[arg(long, value_name = "ID", env = "SCANSERVER_SVM_ID")]
    svm_id: Option<String>,

    /// Scan threads, at most 1024; 0 is one per core [default: one per
    /// core].
    #[arg(long, short = 'j', value_name = "N", env = "SCANSERVER_THREADS")]
    threads: Option<usize>,

    /// Agents connected at once, at least 1 and at most --max-connections
    /// [default: 1000].
    #[arg(long, value_name = "N", env = "SCANSERVER_MAX_AGENTS")]
    max_agents: Option<usize>,

    /// Connections open at once on the agent listener, at most 1048576;
    /// more are closed as they are accepted [default: twice --max-agents,
    /// and 64 more].
    #[arg(long, value_name = "N", env = "SCANSERVER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,

    /// Accept only agents with one of these connection tags (repeat the
    /// flag, or separate with commas) [default: every agent].
    #[arg(
        long = "allowed-tag",
        value_name = "TAG",
        env = "SCANSERVER_ALLOWED_TAGS",
        value_delimiter = ','
    )]
    allowed_tags: Vec<String>,

    /// Server certificate (PEM); with --tls-key, the listener speaks TLS.
    #[arg(
        long,
        value_name = "FILE",
        env = "SCANSERVER_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "SCANSERVER_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// CA (PEM) that agent certificates must chain to: mutual TLS, every
    /// agent must present a certificate.
    #[arg(long, value_name = "FILE", env = "SCANSERVER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,

    /// Folder for spooled uploads, private to the server [default: spool in
    /// the state folder].
    #[arg(long, value_name = "DIR", env = "SCANSERVER_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,

    /// Folder for what survives a restart: the verdict cache, the
    /// protected VMs and their tags [default: $STATE_DIRECTORY, else
    /// ~/.local/state/scanserver].
    #[arg(long, value_name = "DIR", env = "SCANSERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Address of the admin listener that `scanserver status`, `agents`,
    /// `tags` and `rules reload` talk to: IP:PORT, kept on loopback, or
    /// unix:PATH, a Unix-domain socket (0660) in a folder of the server's
    /// user, which keeps other users out (the safer choice where they log
    /// in) [default: 127.0.0.1:7406].
    #[arg(long, value_name = "ADDR", env = "SCANSERVER_ADMIN_LISTEN")]
    admin_listen: Option<admin::AdminAddr>,

    /// Ask every admin request for the bearer token in FILE (the commands
    /// read it with --admin-token-file) [default: no token].
    #[arg(long, value_name = "FILE", env = "SCANSERVER_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics [default: off].
    #[arg(long, value_name = "ADDR", env = "SCANSERVER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,

    /// Report to the Integration Server at this URL (http://host:port;
    /// https:// needs the config file's [reporting.tls]) [default: no
    /// reports].
    #[arg(long, value_name = "URL", env = "SCANSERVER_INTEGRATION_SERVER")]
    integration_server: Option<String>,

    /// Time between regular reports to the Integration Server, at least 1s
    /// (300s, 5m, 1h30m) [default: 300s].
    #[arg(long, value_name = "DURATION", env = "SCANSERVER_REPORT_INTERVAL", value_parser = humantime::parse_duration)]
    report_interval: Option<Duration>,
}

impl ServeArgs {
    /// The configuration: file, then environment and flags on top.
    fn config(&self) -> Result<Config, ConfigError> {
        // (An empty path is refused by the flag's parser, naming it.)
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        set(&mut config.server.listen, &self.listen);
        set(&mut config.rules.path, &self.rules);
        set(&mut config.server.svm_id, &self.svm_id);
        set(&mut config.engine.threads, &self.threads);
        set(&mut config.server.max_agents, &self.max_agents);
        set(&mut config.server.admin_listen, &self.admin_listen);
        set(&mut config.reporting.interval, &self.report_interval);
        if self.metrics_listen.is_some() {
            config.server.metrics_listen = self.metrics_listen;
        }
        if self.max_connections.is_some() {
            config.server.max_connections = self.max_connections;
        }
        if self.admin_token_file.is_some() {
            config.server.admin_token_file = self.admin_token_file.clone();
        }
        if self.integration_server.is_some() {
            config.reporting.integration_server = self.integration_server.clone();
        }
        if self.rules_cache.is_some() {
            config.rules.cache_dir = self.rules_cache.clone();
        }
        if self.spool_dir.is_some() {
            config.uploads.spool_dir = self.spool_dir.clone();
        }
        if self.state_dir.is_some() {
            config.server.state_dir = self.state_dir.clone();
        }
        if !self.allowed_tags.is_empty() {
            // "vdi, prod" names `prod`, as it reads.
            let tags = self.allowed_tags.iter().map(|tag| tag.trim().to_owned());
            config.server.allowed_tags = tags.collect();
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            // The file's other TLS settings stay unless flags replace them.
            let tls = config
                .tls
                .get_or_insert_with(|| TlsConfig::new(cert.clone(), key.clone()));
            tls.cert = cert.clone();
            tls.key = key.clone();
        }
        if let Some(client_ca) = &self.tls_client_ca {
            let Some(tls) = config.tls.as_mut() else {
                return Err(ConfigError::Invalid {
                    setting: "tls.client_ca",
                    problem: "needs the server's certificate and key: give --tls-cert and --tls-key, or [tls] cert and key".into(),
                });
            };
            tls.client_ca = Some(client_ca.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

/// Overrides `target` with `value` when one was given.
fn set<T: Clone>(target: &mut T, value: &Option<T>) {
    if let Some(value) = value {
        *target = value.clone();
    }
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    rules: RulesArgs,

    /// Print one JSON object per file per line (the summary goes to stderr).
    #[arg(long)]
    json: bool,

    /// Scan threads, at most 1024; 0 is one per core [default: one per
    /// core].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
    threads: Option<u16>,

    /// Per-file scan timeout, at least 1s; a file scanned longer fails with
    /// `timeout` [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = scan_timeout)]
    timeout: Option<Duration>,

    /// Files larger than this many bytes fail with `too_large`; at least 1,
    /// as the server's `max_scan_size`.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = EngineConfig::default().max_scan_size,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
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
    /// compiled again [default: rules in $CACHE_DIRECTORY when systemd sets
    /// it, else the user's cache folder, scanserver/rules].
    #[arg(long, value_name = "DIR", env = "SCANSERVER_RULES_CACHE")]
    rules_cache: Option<PathBuf>,

    /// Always compile; neither read nor write the compiled-rules cache.
    #[arg(long)]
    no_rules_cache: bool,
}

impl RulesArgs {
    fn load(&self) -> Result<Ruleset, SignatureError> {
        let cache = match self.no_rules_cache {
            true => None,
            false => RulesConfig {
                path: self.rules.clone(),
                cache_dir: self.rules_cache.clone(),
                ..RulesConfig::default()
            }
            .cache_dir(),
        };
        let ruleset = Ruleset::load(&self.rules, cache.as_deref())?;
        ruleset.log_loaded();
        Ok(ruleset)
    }
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Compile a ruleset and print its version, rule count, warnings and
    /// errors. Exit status 1 when it does not compile.
    Check {
        /// The ruleset: a folder, a source file or a pre-compiled file.
        #[arg(
            value_name = "PATH",
            default_value = "signatures",
            env = "SCANSERVER_RULES"
        )]
        path: PathBuf,
    },
    /// Make a running server read its signatures again (as SIGHUP does),
    /// and load them if they changed; waits until they are loaded (10
    /// minutes at most: the server finishes the reload all the same).
    ///
    /// Signatures that do not load replace nothing: the server goes on
    /// with those it had, and the errors are printed. Exit status: 0
    /// reloaded or unchanged, 1 the new signatures do not load, 2 the
    /// server could not be asked or did not answer in time.
    Reload(AdminArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_) | Command::Receiver(_));
    init_logging(cli.log_format, if serving { "info" } else { "warn" });
    match cli.command {
        Command::Scan(args) => scan(args),
        Command::Serve(args) => serve(&args),
        Command::Rules(RulesCommand::Check { path }) => check(&path),
        Command::Rules(RulesCommand::Reload(args)) => {
            operate(&args.server, admin::RELOAD_TIMEOUT, |admin| {
                reload(admin, args.json)
            })
        }
        Command::Status(args) => operate(&args.server, admin::REQUEST_TIMEOUT, |admin| {
            status(admin, args.json)
        }),
        Command::Agents(args) => operate(&args.server, admin::REQUEST_TIMEOUT, |admin| {
            agents(admin, args.json)
        }),
        Command::Tags(command) => {
            let (args, assign) = match command {
                TagsCommand::Assign(args) => (args, true),
                TagsCommand::Remove(args) => (args, false),
            };
            let target = args.server.clone();
            operate(&target, admin::REQUEST_TIMEOUT, |admin| {
                tag(admin, args, assign)
            })
        }
        Command::Receiver(args) => receiver(&args),
    }
}

/// Runs an admin command against the server `target` names, waiting at
/// most `timeout` for each answer; exit status 2 when it cannot be asked.
fn operate<F, Fut>(target: &AdminTarget, timeout: Duration, command: F) -> ExitCode
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, tonic::Status>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return failed(&err),
    };
    let token = match read_token(
        target.admin_token_file.as_deref(),
        "--admin-token-file (or SCANSERVER_ADMIN_TOKEN_FILE)",
    ) {
        Ok(token) => token,
        Err(err) => return failed(&err),
    };
    runtime.block_on(async {
        let client = match admin::connect(&target.admin, token, timeout).await {
            Ok(client) => client,
            Err(err) => return failed(&err),
        };
        command(client)
            .await
            .unwrap_or_else(|status| refused(&status, timeout))
    })
}

/// The exit of an admin command the server refused, or did not answer
/// within `timeout`.
fn refused(status: &tonic::Status, timeout: Duration) -> ExitCode {
    // tonic's own deadline: the server may still be at the work asked.
    if status.code() == tonic::Code::Cancelled
        && status.message() == tonic::TimeoutExpired(()).to_string()
    {
        return failed(&format_args!(
            "no answer within {}: the server is busy, or still at what was asked (a reload of large signatures, say: its outcome shows in `scanserver status`)",
            humantime::format_duration(timeout)
        ));
    }
    failed(&format_args!("{:?}: {}", status.code(), status.message()))
}

async fn status(mut admin: AdminClient, json: bool) -> Result<ExitCode, tonic::Status> {
    let reply = admin.status(StatusRequest {}).await?.into_inner();
    print(&reply, json, admin::render_status);
    let ok = reply.report.is_some_and(|r| r.status == Health::Ok as i32);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn reload(mut admin: AdminClient, json: bool) -> Result<ExitCode, tonic::Status> {
    match admin.reload_signatures(ReloadSignaturesRequest {}).await {
        Ok(reply) => {
            print(&reply.into_inner(), json, admin::render_reload);
            Ok(ExitCode::SUCCESS)
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            eprintln!("error: {}", status.message());
            Ok(ExitCode::FAILURE)
        }
        Err(status) => Err(status),
    }
}

async fn agents(mut admin: AdminClient, json: bool) -> Result<ExitCode, tonic::Status> {
    let reply = admin.agents(AgentsRequest {}).await?.into_inner();
    print(&reply, json, admin::render_agents);
    Ok(ExitCode::SUCCESS)
}

async fn tag(
    mut admin: AdminClient,
    args: TagArgs,
    assign: bool,
) -> Result<ExitCode, tonic::Status> {
    let request = TagRequest {
        vm_id: args.vm.clone(),
        tag: args.tag.name().to_owned(),
    };
    let reply = match assign {
        true => admin.assign_tag(request).await?,
        false => admin.remove_tag(request).await?,
    }
    .into_inner();
    let done = match (assign, reply.changed) {
        (true, true) => "assigned to",
        (true, false) => "was already assigned by hand to",
        (false, true) => "removed from",
        (false, false) => "was not assigned to",
    };
    println!("{} {done} {}", args.tag, args.vm);
    Ok(ExitCode::SUCCESS)
}

/// Prints `reply` as JSON or as `render` writes it.
fn print<T: serde::Serialize>(reply: &T, json: bool, render: fn(&T) -> String) {
    match json {
        true => println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        ),
        false => print!("{}", render(reply)),
    }
}

/// The token in the file `flag` names, if it names one; the error names
/// the flag.
fn read_token(path: Option<&std::path::Path>, flag: &str) -> Result<Option<BearerToken>, String> {
    path.map(BearerToken::read)
        .transpose()
        .map_err(|err| format!("{flag}: {err}"))
}

fn receiver(args: &ReceiverArgs) -> ExitCode {
    let token = match read_token(args.token_file.as_deref(), "--token-file") {
        Ok(token) => token,
        Err(err) => return failed(&err),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return failed(&err),
    };
    let result = runtime.block_on(async {
        let (reports, mut received) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(report) = received.recv().await {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            }
        });
        tracing::info!(addr = %args.listen, "receiving SVM reports");
        tonic::transport::Server::builder()
            .add_service(Receiver::service(reports, token))
            .serve_with_shutdown(args.listen, termination_signal())
            .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: cannot serve on {}: {err}", args.listen);
            ExitCode::from(2)
        }
    }
}

/// Reports an error that stops the command: exit status 2.
fn failed(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(2)
}

/// Logs to stderr at `default_level`, or as `SCANSERVER_LOG` says.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCANSERVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A scan timeout as `serve` takes one (`engine.scan_timeout`): YARA-X
/// counts scan time in whole seconds, so below 1s every file would time out.
fn scan_timeout(value: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if timeout < Duration::from_secs(1) {
        return Err("must be at least 1s (YARA-X counts scan time in whole seconds)".into());
    }
    if timeout > scanserver::config::MAX_DURATION {
        return Err("must be at most 1000 years".into());
    }
    Ok(timeout)
}

fn scan(args: ScanArgs) -> ExitCode {
    let ruleset = match args.rules.load() {
        Ok(ruleset) => ruleset,
        Err(err) => return failed(&err),
    };
    let defaults = EngineConfig::default();
    let config = EngineConfig {
        threads: args.threads.map_or(0, usize::from),
        scan_timeout: args.timeout.unwrap_or(defaults.scan_timeout),
        max_scan_size: args.max_size,
        ..defaults
    };
    let engine = match Engine::new(ruleset, &config) {
        Ok(engine) => engine,
        Err(err) => return failed(&err),
    };
    let format = Format::json_if(args.json);
    let summary = localscan::run(&engine, &args.paths, format);
    ExitCode::from(summary.exit_code())
}

fn serve(args: &ServeArgs) -> ExitCode {
    // SIGHUP, which reloads the signatures, TLS files and admin token once
    // serving, is ignored until then (its default action ends the process):
    // loading large signatures takes seconds.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let config = match args.config() {
        Ok(config) => config,
        Err(err) => return failed(&err),
    };
    let ruleset = match Ruleset::load(&config.rules.path, config.rules.cache_dir().as_deref()) {
        Ok(ruleset) => ruleset,
        Err(err) => return failed(&err),
    };
    ruleset.log_loaded();
    let engine = match Engine::new(ruleset, &config.engine) {
        Ok(engine) => Arc::new(engine),
        Err(err) => return failed(&err),
    };
    // The queue's places are held for the whole scan: fewer places than
    // threads leave threads idle (the default, 64, is too few on a host of
    // more cores). The local scan takes no places.
    if engine.queue_capacity() < engine.threads() {
        tracing::warn!(
            queue_capacity = engine.queue_capacity(),
            threads = engine.threads(),
            "engine.queue_capacity is below the scan threads: at most {} scans run at once; raise it to twice the threads",
            engine.queue_capacity()
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return failed(&err),
    };
    let result = runtime.block_on(async {
        let server = Server::bind(&config, engine).await?;
        tokio::spawn(server.reload_on_hangup());
        tracing::info!(
            addr = %server.local_addr(),
            tls = config.tls.is_some(),
            mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            svm_id = %config.server.svm_id,
            "serving Light Agents"
        );
        server.run(termination_signal()).await
    });
    // The last saves are made: a reload still compiling on a blocking
    // thread is not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => failed(&scanserver::WithCauses(&err)),
    }
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
