//! Server configuration: a TOML file (see `scanserver.sample.toml`), then
//! `SCANSERVER_*` environment variables, then command-line flags, each
//! overriding the one before. With nothing configured, the server serves the
//! shipped signatures on [`DEFAULT_LISTEN`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    admin::AdminAddr, engine::EngineConfig, files, reporting::ReportingConfig,
    status::InfrastructureConfig,
};

/// The largest `uploads.max_file_size`: a file's share of the spool is
/// counted in KiB, 32 bits of them.
const MAX_UPLOAD: u64 = (u32::MAX as u64) << 10;

/// A refusal of `setting`, for `problem`.
fn invalid(setting: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        setting,
        problem: problem.into(),
    })
}

/// The agent listener's default address. 7405 is this server's port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7405";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

/// Everything `scanserver serve` is configured with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    pub rules: RulesConfig,
    pub engine: EngineConfig,
    pub uploads: UploadConfig,
    pub reporting: ReportingConfig,
    pub infrastructure: InfrastructureConfig,
}

impl Config {
    /// Checks what the types alone do not: values the server could not
    /// run with, or that contradict each other. The first problem found
    /// is the one told.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_durations()?;
        self.check_tls()?;
        // An empty value (an environment variable set to nothing, say)
        // would be taken as given: an empty tag refuses every agent, an
        // empty path names no file.
        if let Some(setting) = self.empty_setting() {
            return invalid(
                setting,
                "is empty: give a value, or leave the setting out (file, SCANSERVER_* variable and flag) for its default",
            );
        }
        self.check_engine()?;
        self.check_agents()?;
        self.check_uploads()?;
        self.check_outbound()?;
        self.check_listeners()
    }

    /// The timers' settings.
    fn check_durations(&self) -> Result<(), ConfigError> {
        // Timers are set from these: far-off values ("never", say) would
        // overflow the runtime's clock, and 0 means never where allowed.
        let durations = [
            ("engine.scan_timeout", self.engine.scan_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("server.snapshot_interval", self.server.snapshot_interval),
            ("rules.check_interval", self.rules.check_interval),
            ("rules.max_age", self.rules.max_age),
            ("reporting.interval", self.reporting.interval),
        ];
        let tls_check = self
            .tls
            .as_ref()
            .map(|tls| ("tls.check_interval", tls.check_interval));
        for (setting, duration) in durations.into_iter().chain(tls_check) {
            if duration > MAX_DURATION {
                return invalid(
                    setting,
                    "must be at most 1000 years (0s where it means never)",
                );
            }
        }
        let heartbeat = self.server.heartbeat_interval;
        // Agents may answer no faster than a tenth of a second (lightagent
        // does not): shorter, three intervals would end their sessions.
        if heartbeat < Duration::from_secs(1) || heartbeat > Duration::from_secs(3600) {
            return invalid("server.heartbeat_interval", "must be between 1s and 1h");
        }
        if self.engine.scan_timeout < Duration::from_secs(1) {
            return invalid(
                "engine.scan_timeout",
                "must be at least 1s (YARA-X counts scan time in whole seconds)",
            );
        }
        let check = self.rules.check_interval;
        if !check.is_zero() && check < Duration::from_secs(1) {
            return invalid(
                "rules.check_interval",
                "must be 0s (never) or at least 1s: each look reads the whole ruleset",
            );
        }
        if self.server.idle_timeout <= self.engine.scan_timeout {
            return invalid(
                "server.idle_timeout",
                "must be longer than engine.scan_timeout: a stream waiting for a scan would be cut off as idle",
            );
        }
        if self.server.snapshot_interval < Duration::from_secs(1) {
            return invalid(
                "server.snapshot_interval",
                "must be at least 1s: each save under load writes the whole cache",
            );
        }
        if self.reporting.interval < Duration::from_secs(1) {
            return invalid("reporting.interval", "must be at least 1s");
        }
        Ok(())
    }

    /// The `[tls]` table, when there is one.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        if !tls.check_interval.is_zero() && tls.check_interval < Duration::from_secs(1) {
            return invalid("tls.check_interval", "must be 0s (never) or at least 1s");
        }
        // A `[tls]` table may leave the certificate and key to flags or
        // variables (the same file on every SVM, each with its own files),
        // but the listener needs them.
        for (setting, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
            if path.as_os_str().is_empty() {
                return invalid(
                    setting,
                    "is missing or empty: TLS needs the server's certificate and key ([tls] cert and key, or --tls-cert and --tls-key)",
                );
            }
        }
        if tls.vm_id_in_certificate && tls.client_ca.is_none() {
            return invalid(
                "tls.vm_id_in_certificate",
                "needs mutual TLS: set tls.client_ca, the CA of the agents' certificates",
            );
        }
        Ok(())
    }

    /// The `[engine]` table.
    fn check_engine(&self) -> Result<(), ConfigError> {
        if self.engine.threads > MAX_THREADS {
            return invalid("engine.threads", "must be at most 1024 (0: one per core)");
        }
        if self.engine.max_scan_size == 0 {
            return invalid("engine.max_scan_size", "must be more than 0");
        }
        if !(1..=1 << 20).contains(&self.engine.queue_capacity) {
            return invalid("engine.queue_capacity", "must be between 1 and 1,048,576");
        }
        Ok(())
    }

    /// What the server takes of agents: how many, on how many connections,
    /// with which tags.
    fn check_agents(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if server.max_agents == 0 {
            return invalid("server.max_agents", "must be at least 1");
        }
        if server.max_agents > crate::vms::MAX_VMS {
            // Each connected VM holds a place in the registry of protected
            // VMs, which has no more: agents past it would be refused as
            // if the SVM were full.
            return invalid(
                "server.max_agents",
                format!(
                    "must be at most {} (the VMs the registry holds)",
                    crate::vms::MAX_VMS
                ),
            );
        }
        if server.max_connections() > crate::connections::MAX_CONNECTIONS {
            return invalid(
                "server.max_connections",
                "must be at most 1048576 (and server.max_agents no more than half that, when max_connections is not set)",
            );
        }
        if server.max_connections_per_address == Some(0) {
            return invalid(
                "server.max_connections_per_address",
                "must be at least 1 (an agent needs one connection)",
            );
        }
        if server.max_connections() < server.max_agents {
            return invalid(
                "server.max_connections",
                "must be at least server.max_agents: agents beyond it could not connect to be told that the SVM is full",
            );
        }
        if let Some(tag) = server.allowed_tags.iter().find(|t| t.trim() != t.as_str()) {
            return invalid(
                "server.allowed_tags",
                format!("has {tag:?}, with spaces around it: agents' tags are matched exactly"),
            );
        }
        Ok(())
    }

    /// The `[uploads]` table, and the largest upload against the largest
    /// scan.
    fn check_uploads(&self) -> Result<(), ConfigError> {
        let uploads = &self.uploads;
        if !(1..=MAX_SPOOL_FILES).contains(&uploads.spool_files) {
            return invalid("uploads.spool_files", "must be between 1 and 1048576");
        }
        if uploads.message_budget < crate::intake::CALL_MOST as u64 {
            return invalid(
                "uploads.message_budget",
                "must be at least 32 MiB: the room one call may need (messages of the largest size, 16 MiB, after smaller ones)",
            );
        }
        if uploads.path_budget < crate::service::MAX_PATH_LEN as u64 {
            return invalid(
                "uploads.path_budget",
                "must be at least 98304 (a file's longest path, 96 KiB)",
            );
        }
        if uploads.files_in_flight == 0 {
            return invalid("uploads.files_in_flight", "must be at least 1");
        }
        // Checked first: the upload limit follows them when a file does
        // not set it, and a budget too small to spool anything would be
        // blamed on the limit.
        let budgets = [
            ("uploads.spool_budget", uploads.spool_budget),
            ("uploads.spool_budget_per_vm", uploads.spool_budget_per_vm()),
        ];
        if let Some((setting, _)) = budgets.iter().find(|(_, budget)| *budget < 1 << 10) {
            return invalid(setting, "must be at least 1 KiB");
        }
        if uploads.max_file_size == 0 {
            // Agents read 0 in the Welcome as no limit given.
            return invalid("uploads.max_file_size", "must be more than 0");
        }
        if !(4 << 10..=4 << 20).contains(&uploads.chunk_size) {
            return invalid("uploads.chunk_size", "must be between 4 KiB and 4 MiB");
        }
        if uploads.max_file_size > MAX_UPLOAD {
            return invalid("uploads.max_file_size", "must be under 4 TiB");
        }
        // Both counted in whole KiB, as the budget hands them out.
        if uploads.spool_budget >> 10 < uploads.max_file_size.div_ceil(1024) {
            return invalid(
                "uploads.spool_budget",
                "is below uploads.max_file_size: a file of the largest size accepted could never be spooled",
            );
        }
        if uploads.spool_budget_per_vm() >> 10 < uploads.max_file_size.div_ceil(1024) {
            return invalid(
                "uploads.spool_budget_per_vm",
                "is below uploads.max_file_size: a VM's file of the largest size accepted could never be spooled",
            );
        }
        if uploads.max_file_size > self.engine.max_scan_size {
            return invalid(
                "uploads.max_file_size",
                "is over engine.max_scan_size: such uploads could never be scanned; lower it or raise the other",
            );
        }
        Ok(())
    }

    /// What the server connects to: the Integration Server and the
    /// infrastructure's endpoint.
    fn check_outbound(&self) -> Result<(), ConfigError> {
        // TLS is used for https:// URLs only: a plain URL with TLS settings
        // would send reports and the token in the clear. A URL without a
        // scheme (host:port) would start, and fail every report.
        if let Some(url) = &self.reporting.integration_server {
            let uri = url.parse::<http::Uri>().ok();
            let scheme = uri
                .as_ref()
                .filter(|uri| uri.host().is_some_and(|h| !h.is_empty()));
            let https = match scheme.and_then(|uri| uri.scheme_str()) {
                Some("https") => true,
                Some("http") => false,
                _ => {
                    return invalid(
                        "reporting.integration_server",
                        format!(
                            "is {url:?}: give a URL, as http://integration.example:7271 (https:// with [reporting.tls])"
                        ),
                    );
                }
            };
            if https != self.reporting.tls.is_some() {
                return invalid(
                    "reporting.integration_server",
                    "must be an https:// URL with [reporting.tls], and an http:// URL without",
                );
            }
        }
        if let Some(endpoint) = &self.infrastructure.endpoint {
            let port = endpoint
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return invalid(
                    "infrastructure.endpoint",
                    format!(
                        "is {endpoint:?}: give a host and port, as vcenter.example:443 or [2001:db8::1]:443"
                    ),
                );
            }
        }
        Ok(())
    }

    /// The listeners' addresses: apart, and the admin one guarded.
    fn check_listeners(&self) -> Result<(), ConfigError> {
        // Two listeners on one port clash when either takes every address.
        let overlap = |one: SocketAddr, other: SocketAddr| {
            let any = one.ip().is_unspecified() || other.ip().is_unspecified();
            one.port() != 0 && one.port() == other.port() && (any || one.ip() == other.ip())
        };
        let clashes = |other: SocketAddr| match &self.server.admin_listen {
            AdminAddr::Tcp(admin) => overlap(*admin, other),
            AdminAddr::Unix(_) => false,
        };
        if clashes(self.server.listen) || self.server.metrics_listen.is_some_and(clashes) {
            return invalid(
                "server.admin_listen",
                "must differ from the agent and metrics listeners: the admin service is never served to agents",
            );
        }
        if let Some(metrics) = self.server.metrics_listen
            && overlap(metrics, self.server.listen)
        {
            return invalid(
                "server.metrics_listen",
                "must differ from the agent listener's address (server.listen)",
            );
        }
        // Tags lift a VM's quarantine: a VM that reaches the admin service
        // must not be able to do so for itself.
        if let AdminAddr::Tcp(admin) = self.server.admin_listen
            && !admin.ip().is_loopback()
            && self.server.admin_token_file.is_none()
        {
            return invalid(
                "server.admin_listen",
                "is reachable from other hosts, and no server.admin_token_file is set: whoever reached it could change security tags; set a token file, or keep the admin listener on loopback or a unix: socket",
            );
        }
        Ok(())
    }

    /// The first setting given an empty value, if any.
    fn empty_setting(&self) -> Option<&'static str> {
        let path = |path: Option<&PathBuf>| path.is_some_and(|p| p.as_os_str().is_empty());
        let tls = self.tls.as_ref();
        [
            ("server.svm_id", self.server.svm_id.is_empty()),
            (
                "server.allowed_tags",
                self.server.allowed_tags.iter().any(String::is_empty),
            ),
            (
                "reporting.integration_server",
                self.reporting.integration_server.as_deref() == Some(""),
            ),
            ("rules.path", self.rules.path.as_os_str().is_empty()),
            ("rules.cache_dir", path(self.rules.cache_dir.as_ref())),
            ("server.state_dir", path(self.server.state_dir.as_ref())),
            ("uploads.spool_dir", path(self.uploads.spool_dir.as_ref())),
            (
                "server.admin_token_file",
                path(self.server.admin_token_file.as_ref()),
            ),
            (
                "tls.client_ca",
                path(tls.and_then(|tls| tls.client_ca.as_ref())),
            ),
        ]
        .into_iter()
        .find_map(|(setting, empty)| empty.then_some(setting))
    }

    /// The spool folder in use: `uploads.spool_dir`, else `spool` in the
    /// state folder. Not the system's temporary folder: that is shared by
    /// every user (one could take the name first), and often held in
    /// memory, where large files must not go.
    pub fn spool_dir(&self) -> PathBuf {
        self.uploads
            .spool_dir
            .clone()
            .unwrap_or_else(|| self.server.state_dir().join("spool"))
    }

    /// Reads a TOML configuration file. `uploads.max_file_size`, unless
    /// the file sets it, is the file's `engine.max_scan_size` (an operator
    /// who raises the one expects agents' files of that size to be taken),
    /// within the spool budgets and the upload limit's own bound: a default
    /// never stops the start.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = files::read_to_string(path, files::SMALL_FILE_LIMIT).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        let parse_error = |source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        };
        // Parsed from the text (not from the table below), so that errors
        // say where in the file they are.
        let mut config: Config = toml::from_str(&text).map_err(parse_error)?;
        let table: toml::Table = text.parse().map_err(parse_error)?;
        let uploads = table.get("uploads").and_then(toml::Value::as_table);
        if !uploads.is_some_and(|uploads| uploads.contains_key("max_file_size")) {
            // Budgets are handed out in whole KiB.
            let per_vm = config.uploads.spool_budget_per_vm.unwrap_or(u64::MAX);
            config.uploads.max_file_size = config
                .engine
                .max_scan_size
                .min(config.uploads.spool_budget & !1023)
                .min(per_vm & !1023)
                .min(MAX_UPLOAD);
        }
        Ok(config)
    }
}

/// The `[server]` table: the agent listener and sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the agent listener.
    pub listen: SocketAddr,
    /// This SVM's identifier, as agents and the Integration Server see it
    /// [default: the host name].
    pub svm_id: String,
    /// Its display name in reports [default: the SVM id].
    pub name: Option<String>,
    /// Addresses agents reach the agent listener at, for reports. By
    /// default: the address bound (the kernel's port, for a port of 0), or
    /// `<svm id>:<port>` when it listens on every interface.
    pub addresses: Vec<String>,
    /// Address of the admin listener (`scanserver status`, `agents`,
    /// `tags`): loopback or a management network, or `unix:PATH`, a
    /// Unix-domain socket in a folder of the server's user (see
    /// [`crate::admin::AdminSocket::bind`]).
    pub admin_listen: AdminAddr,
    /// A file holding the bearer token every admin request must carry;
    /// unset: the admin service asks for none.
    pub admin_token_file: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` listener; unset: no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Agents connected at once; more are rejected with CAPACITY.
    pub max_agents: usize,
    /// Connections open at once on the agent listener, TLS handshakes
    /// included; more are closed as they are accepted (see
    /// [`crate::connections`]) [default: twice `max_agents`, and 64 more].
    pub max_connections: Option<usize>,
    /// Of those, how many one address other than the SVM's own may hold;
    /// more from it are closed as they are accepted [default:
    /// `max_agents`].
    pub max_connections_per_address: Option<usize>,
    /// Connection tags accepted from agents; empty accepts every agent.
    pub allowed_tags: Vec<String>,
    /// How often each side of a session sends a heartbeat; three missed
    /// heartbeats end the session.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A Scan stream that neither receives a request nor answers a waiting
    /// file for this long is closed (verdicts of scans under way do not
    /// count); so is one whose agent takes none of its replies for this
    /// long, and a `ScanFile` call whose file takes longer than this. An
    /// agent connection with no call under way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM or Ctrl-C, how long scans in flight may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where the server keeps what survives a restart (the verdict cache,
    /// the protected VMs and their tags)
    /// [default: `$STATE_DIRECTORY` when systemd sets it, else the user's
    /// state folder, `~/.local/state/scanserver`].
    pub state_dir: Option<PathBuf>,
    /// How often the verdict cache and the protected VMs are saved to the
    /// state folder (when they changed; the VMs also a second after each
    /// change); both are saved at shutdown too.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
}

impl ServerConfig {
    /// The addresses reports give for the agent listener.
    pub fn addresses(&self) -> Vec<String> {
        if !self.addresses.is_empty() {
            return self.addresses.clone();
        }
        if self.listen.ip().is_unspecified() {
            vec![format!("{}:{}", self.svm_id, self.listen.port())]
        } else {
            vec![self.listen.to_string()]
        }
    }

    /// Connections open at once on the agent listener.
    pub fn max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| self.max_agents.saturating_mul(2).saturating_add(64))
    }

    /// Connections one address other than the SVM's own may have open at
    /// once on the agent listener.
    pub fn max_connections_per_address(&self) -> usize {
        self.max_connections_per_address.unwrap_or(self.max_agents)
    }

    /// The state folder in use.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .or_else(|| systemd_directory("STATE_DIRECTORY"))
            .or_else(|| dirs::state_dir().map(|d| d.join("scanserver")))
            .or_else(|| dirs::data_local_dir().map(|d| d.join("scanserver")))
            .unwrap_or_else(|| PathBuf::from("state"))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("the default address is valid"),
            svm_id: default_svm_id(),
            name: None,
            addresses: Vec::new(),
            admin_listen: crate::admin::DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("the default admin address is valid"),
            admin_token_file: None,
            metrics_listen: None,
            max_agents: 1000,
            max_connections: None,
            max_connections_per_address: None,
            allowed_tags: Vec::new(),
            heartbeat_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            state_dir: None,
            snapshot_interval: Duration::from_secs(60),
        }
    }
}

/// The first folder of a list systemd gives in `variable` (it lists
/// them `:`-separated when a unit names several), if any.
fn systemd_directory(variable: &str) -> Option<PathBuf> {
    let list = std::env::var_os(variable)?;
    std::env::split_paths(&list).find(|dir| !dir.as_os_str().is_empty())
}

fn default_svm_id() -> String {
    crate::host_name().unwrap_or_else(|| "svm".to_owned())
}

/// The `[tls]` table: present means the agent listener speaks TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM). Left out of the file, it must
    /// come from `--tls-cert` (or its variable).
    #[serde(default)]
    pub cert: PathBuf,
    /// The server's private key (PEM). Left out of the file, it must come
    /// from `--tls-key` (or its variable).
    #[serde(default)]
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to. When
    /// set, every agent must present a certificate (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With mutual TLS: the VM id of an agent's Hello must be a name its
    /// certificate is for (a DNS name or IP address, in its shortest form,
    /// among its subject alternative names), so that an agent speaks for its
    /// own VM only.
    #[serde(default)]
    pub vm_id_in_certificate: bool,
    /// How often the server looks at these files, to serve renewed ones
    /// without a SIGHUP (once two looks in a row found them); zero never
    /// looks.
    #[serde(
        default = "TlsConfig::default_check_interval",
        with = "humantime_serde"
    )]
    pub check_interval: Duration,
}

impl TlsConfig {
    /// The files at `cert` and `key`, without a client CA, looked at every
    /// minute.
    pub fn new(cert: PathBuf, key: PathBuf) -> TlsConfig {
        TlsConfig {
            cert,
            key,
            client_ca: None,
            vm_id_in_certificate: false,
            check_interval: TlsConfig::default_check_interval(),
        }
    }

    fn default_check_interval() -> Duration {
        Duration::from_secs(60)
    }
}

/// The `[rules]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// A folder of `.yar`/`.yara` files, a source file or pre-compiled rules.
    pub path: PathBuf,
    /// Where compiled rules are cached [default: `rules` in
    /// `$CACHE_DIRECTORY` when systemd sets it, else in the user's cache
    /// folder, `~/.cache/scanserver/rules`].
    pub cache_dir: Option<PathBuf>,
    /// Signatures older than this (by their files' modification time) turn
    /// the SVM Warning: "signatures outdated".
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often the server looks at the ruleset's files, to load a new
    /// version (once two looks in a row found it); zero never looks.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            path: PathBuf::from("signatures"),
            cache_dir: None,
            max_age: Duration::from_secs(7 * 24 * 3600),
            check_interval: Duration::from_secs(300),
        }
    }
}

impl RulesConfig {
    /// The compiled-rules cache folder in use: the one set, else `rules`
    /// in `$CACHE_DIRECTORY` when systemd sets it (`CacheDirectory=`), else
    /// in the user's cache folder.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir
            .clone()
            .or_else(|| systemd_directory("CACHE_DIRECTORY").map(|d| d.join("rules")))
            .or_else(|| dirs::cache_dir().map(|d| d.join("scanserver").join("rules")))
    }
}

/// The longest duration a setting may have: 1000 years.
pub const MAX_DURATION: Duration = Duration::from_secs(1000 * 366 * 86400);

/// The most `uploads.spool_files` may be.
pub const MAX_SPOOL_FILES: u32 = 1 << 20;

/// The most scan threads (`engine.threads`): a typo's hundred thousand
/// would fail the start with a thread error, or exhaust memory, rather
/// than say which setting is wrong.
pub const MAX_THREADS: usize = 1024;

/// The `[uploads]` table: how received file content is held.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadConfig {
    /// Files up to this size are received in memory; larger ones are
    /// spooled to a temporary file.
    pub memory_threshold: u64,
    /// Memory all uploads in memory may use together; beyond it, even small
    /// files are spooled.
    pub memory_budget: u64,
    /// Folder for spooled files [default: `spool` in the state folder].
    pub spool_dir: Option<PathBuf>,
    /// Disk all spooled uploads may use together; a file that does not fit
    /// fails with RESOURCE_EXHAUSTED (its agent sends it again later, or to
    /// another SVM).
    pub spool_budget: u64,
    /// Disk one VM's spooled uploads may use together, so that a VM
    /// scanning a folder of large files leaves room for the others'; one
    /// more fails with RESOURCE_EXHAUSTED, as for a full spool. (`ScanFile`
    /// uploads are no VM's: only `spool_budget` bounds them.) [default:
    /// 4 GiB, or `max_file_size` when larger; see
    /// [`Self::spool_budget_per_vm`]]
    pub spool_budget_per_vm: Option<u64>,
    /// Files all spooled uploads may have at once (each holds a descriptor
    /// until its scan ends); one more fails with RESOURCE_EXHAUSTED.
    pub spool_files: u32,
    /// Files larger than this are refused. [default: a configuration
    /// file's `engine.max_scan_size`, within the spool budgets (see
    /// [`Config::from_file`])]
    pub max_file_size: u64,
    /// The chunk size agents are asked to use.
    pub chunk_size: u32,
    /// Files open at once per VM, and `ScanFile` calls at once on the
    /// whole server.
    pub files_in_flight: u32,
    /// Memory the agent listener's calls may hold together for request
    /// messages over 64 KiB (see [`crate::intake`]); a call whose message
    /// finds no room within 10 s fails with RESOURCE_EXHAUSTED. The default,
    /// 1 GiB, is about twice what 1,000 `lightagent` Scan streams would
    /// hold (one was seen to hold 491 KiB).
    pub message_budget: u64,
    /// Bytes the paths of the files open on Scan streams may hold together
    /// (each keeps its path until its final reply); a begin whose path
    /// does not fit fails with RESOURCE_EXHAUSTED. The files themselves
    /// are at most `server.max_agents` times `files_in_flight`, on the
    /// whole server (a file keeps its place after its session ends).
    pub path_budget: u64,
}

impl UploadConfig {
    /// Disk one VM's spooled uploads may use together: as set, else 4 GiB,
    /// or `max_file_size` when that is larger (so that a configuration
    /// that raised it needs nothing more).
    pub fn spool_budget_per_vm(&self) -> u64 {
        self.spool_budget_per_vm
            .unwrap_or((4 << 30).max(self.max_file_size))
    }
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            memory_threshold: 8 << 20,
            memory_budget: 128 << 20,
            spool_dir: None,
            spool_budget: 16 << 30,
            spool_budget_per_vm: None,
            spool_files: 4096,
            max_file_size: EngineConfig::default().max_scan_size,
            chunk_size: 256 << 10,
            files_in_flight: 128,
            message_budget: 1 << 30,
            path_budget: 128 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_configuration_parses_and_matches_the_defaults() {
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("scanserver.sample.toml");
        let config = Config::from_file(&sample).unwrap();
        let defaults = Config::default();
        assert_eq!(config.server.listen, defaults.server.listen);
        assert_eq!(
            config.server.heartbeat_interval,
            defaults.server.heartbeat_interval
        );
        assert_eq!(
            config.uploads.memory_threshold,
            defaults.uploads.memory_threshold
        );
        assert_eq!(
            config.server.snapshot_interval,
            defaults.server.snapshot_interval
        );
        assert_eq!(config.engine.scan_timeout, defaults.engine.scan_timeout);
        assert_eq!(config.rules.max_age, defaults.rules.max_age);
        assert_eq!(config.rules.check_interval, defaults.rules.check_interval);
        assert_eq!(config.reporting.interval, defaults.reporting.interval);
        assert_eq!(config.server.admin_listen, defaults.server.admin_listen);
        assert_eq!(config.engine.max_scan_size, defaults.engine.max_scan_size);
        assert_eq!(config.uploads.spool_files, defaults.uploads.spool_files);
        assert_eq!(config.uploads.path_budget, defaults.uploads.path_budget);
    }

    #[test]
    fn contradictions_and_impossible_values_are_errors() {
        assert!(Config::default().validate().is_ok());
        let mut config = Config::default();
        config.server.heartbeat_interval = Duration::ZERO;
        assert!(config.validate().is_err());
        config.server.heartbeat_interval = Duration::from_millis(200);
        assert!(config.validate().is_err(), "agents may beat every 100 ms");
        config.server.heartbeat_interval = Duration::from_secs(1);
        assert!(config.validate().is_ok());
        let mut config = Config::default();
        config.server.admin_listen = "0.0.0.0:7406".parse().unwrap();
        assert!(config.validate().is_err(), "off loopback without a token");
        config.server.admin_token_file = Some("admin.token".into());
        assert!(config.validate().is_ok());
        let mut config = Config::default();
        config.uploads.max_file_size = config.engine.max_scan_size + 1;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.reporting.integration_server = Some("https://integration.example".into());
        assert!(config.validate().is_err(), "https without TLS settings");
        config.reporting.integration_server = Some("http://integration.example".into());
        assert!(config.validate().is_ok());
        config.reporting.tls = Some(crate::reporting::ReportingTls {
            ca: "ca.pem".into(),
            cert: None,
            key: None,
            domain: None,
        });
        assert!(config.validate().is_err(), "TLS settings with http");
        for not_a_url in [
            "integration.example:7271",
            "ftp://integration.example",
            "http://",
        ] {
            let is = |c: &mut Config| c.reporting.integration_server = Some(not_a_url.into());
            assert_eq!(refused(is), "reporting.integration_server", "{not_a_url}");
        }
        let sub_second = |c: &mut Config| c.engine.scan_timeout = Duration::from_millis(500);
        assert_eq!(refused(sub_second), "engine.scan_timeout");
        assert_eq!(
            refused(|c| c.engine.max_scan_size = 0),
            "engine.max_scan_size"
        );
        assert_eq!(
            refused(|c| c.engine.queue_capacity = 0),
            "engine.queue_capacity"
        );
        assert_eq!(
            refused(|c| c.engine.queue_capacity = usize::MAX),
            "engine.queue_capacity",
            "refused, not a panic in the engine's semaphore"
        );
        assert_eq!(refused(|c| c.server.max_agents = 0), "server.max_agents");
        assert_eq!(
            refused(|c| c.server.max_connections = Some(c.server.max_agents - 1)),
            "server.max_connections"
        );
        assert_eq!(
            refused(|c| c.server.max_agents = crate::vms::MAX_VMS + 1),
            "server.max_agents",
            "no more agents than the registry holds VMs"
        );
        let mut most = Config::default();
        most.server.max_agents = crate::vms::MAX_VMS;
        assert!(most.validate().is_ok());
        assert_eq!(
            refused(|c| c.uploads.message_budget = (32 << 20) - 1),
            "uploads.message_budget"
        );
        assert_eq!(
            refused(|c| c.uploads.path_budget = (96 << 10) - 1),
            "uploads.path_budget"
        );
        assert_eq!(
            refused(|c| c.uploads.spool_budget = c.uploads.max_file_size - 1),
            "uploads.spool_budget"
        );
        assert_eq!(
            refused(|c| c.uploads.spool_budget_per_vm = Some(c.uploads.max_file_size - 1)),
            "uploads.spool_budget_per_vm"
        );
        assert_eq!(
            refused(|c| c.uploads.spool_files = 0),
            "uploads.spool_files"
        );
        assert_eq!(
            refused(|c| c.uploads.spool_files = MAX_SPOOL_FILES + 1),
            "uploads.spool_files"
        );
        let never_ever = |c: &mut Config| c.server.snapshot_interval = Duration::MAX;
        assert_eq!(refused(never_ever), "server.snapshot_interval");
        let too_often = |c: &mut Config| c.rules.check_interval = Duration::from_millis(100);
        assert_eq!(refused(too_often), "rules.check_interval");
        let idle_below_scans = |c: &mut Config| c.server.idle_timeout = c.engine.scan_timeout;
        assert_eq!(refused(idle_below_scans), "server.idle_timeout");
        let tls_too_often = |c: &mut Config| {
            let mut tls = TlsConfig::new("server.pem".into(), "server.key".into());
            tls.check_interval = Duration::from_millis(100);
            c.tls = Some(tls);
        };
        assert_eq!(refused(tls_too_often), "tls.check_interval");
        assert_eq!(
            refused(|c| c.engine.threads = MAX_THREADS + 1),
            "engine.threads"
        );
    }

    /// The setting the default configuration, changed by `change`, is
    /// refused for.
    fn refused(change: impl FnOnce(&mut Config)) -> &'static str {
        let mut config = Config::default();
        change(&mut config);
        match config.validate() {
            Err(ConfigError::Invalid { setting, .. }) => setting,
            other => panic!("{other:?}"),
        }
    }

    /// A file that sets `engine.max_scan_size` alone sets the upload limit
    /// with it, up or down, within the spool budgets; one that sets both
    /// keeps each.
    #[test]
    fn the_upload_limit_follows_the_scan_limit_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let read = |text: &str| {
            let path = dir.path().join("scanserver.toml");
            std::fs::write(&path, text).unwrap();
            let config = Config::from_file(&path).unwrap();
            config.validate().unwrap();
            config.uploads.max_file_size
        };
        let raised = "[engine]\nmax_scan_size = 1073741824\n";
        assert_eq!(read(raised), 1 << 30);
        // Within the spool budgets (16 GiB by default) when it follows.
        assert_eq!(read("[engine]\nmax_scan_size = 34359738368\n"), 16 << 30);
        let budget = "[uploads]\nspool_budget_per_vm = 4294967296\n";
        let with_budget = format!("[engine]\nmax_scan_size = 8589934592\n{budget}");
        assert_eq!(read(&with_budget), 4 << 30);
        assert_eq!(read("[engine]\nmax_scan_size = 1048576\n"), 1 << 20);
        let both = format!("{raised}[uploads]\nmax_file_size = 1048576\n");
        assert_eq!(read(&both), 1 << 20);
        assert_eq!(read(""), Config::default().uploads.max_file_size);
        // A budget too small for any file is the budget's fault, not the
        // limit that followed it down to nothing.
        let path = dir.path().join("scanserver.toml");
        std::fs::write(&path, "[uploads]\nspool_budget = 512\n").unwrap();
        match Config::from_file(&path).unwrap().validate() {
            Err(ConfigError::Invalid { setting, .. }) => {
                assert_eq!(setting, "uploads.spool_budget")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A tag with spaces around it (from "vdi, prod" in a file) and an
    /// infrastructure endpoint without a port are refused at start: the
    /// one would refuse every agent with that tag, the other would keep the
    /// SVM Critical, each only once serving.
    #[test]
    fn settings_that_would_only_fail_once_serving_are_refused() {
        let tags = |tags: &[&str]| tags.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        // Listeners on one port, one of them on every address.
        let any = |c: &mut Config| c.server.listen = "0.0.0.0:7406".parse().unwrap();
        assert_eq!(refused(any), "server.admin_listen");
        let metrics = |c: &mut Config| {
            c.server.metrics_listen = Some("127.0.0.1:7405".parse().unwrap());
        };
        assert_eq!(refused(metrics), "server.metrics_listen");
        let spaced = tags(&["vdi", " prod"]);
        assert_eq!(
            refused(|c| c.server.allowed_tags = spaced),
            "server.allowed_tags"
        );
        for wrong in [
            "vcenter.example",
            "",
            ":443",
            "vcenter.example:https",
            "[::1]:99999",
        ] {
            let endpoint = Some(wrong.to_owned());
            let setting = refused(|c| c.infrastructure.endpoint = endpoint);
            assert_eq!(setting, "infrastructure.endpoint", "{wrong}");
        }
        for right in ["vcenter.example:443", "192.0.2.1:443", "[2001:db8::1]:443"] {
            let mut config = Config::default();
            config.infrastructure.endpoint = Some(right.to_owned());
            config.server.allowed_tags = tags(&["vdi", "prod"]);
            config.validate().unwrap();
        }
    }

    /// An empty value (`SCANSERVER_ALLOWED_TAGS=`, say) is refused, naming
    /// the setting, rather than taken as given: an empty tag would refuse
    /// every agent.
    #[test]
    fn empty_values_are_errors() {
        assert_eq!(
            refused(|c| c.server.allowed_tags = vec!["".into()]),
            "server.allowed_tags"
        );
        assert_eq!(refused(|c| c.server.svm_id.clear()), "server.svm_id");
        assert_eq!(
            refused(|c| c.reporting.integration_server = Some("".into())),
            "reporting.integration_server"
        );
        assert_eq!(
            refused(|c| c.server.state_dir = Some("".into())),
            "server.state_dir"
        );
        let no_key = |c: &mut Config| c.tls = Some(TlsConfig::new("server.pem".into(), "".into()));
        assert_eq!(refused(no_key), "tls.key");
    }

    /// A `[tls]` table without the certificate and key parses (flags or
    /// variables may give them), and stops the start if nothing does.
    #[test]
    fn a_tls_table_may_leave_its_files_to_flags() {
        let table = "[tls]\nclient_ca = \"agents-ca.pem\"\nvm_id_in_certificate = true\n";
        let mut config: Config = toml::from_str(table).unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                setting: "tls.cert",
                ..
            })
        ));
        let tls = config.tls.as_mut().unwrap();
        (tls.cert, tls.key) = ("server.pem".into(), "server.key".into());
        config.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[server]\nlisten_on = \"x\"").is_err());
    }

    #[test]
    fn the_admin_listener_may_be_a_unix_socket() {
        let config: Config =
            toml::from_str("[server]\nadmin_listen = \"unix:/run/scanserver/admin.sock\"").unwrap();
        let socket = AdminAddr::Unix("/run/scanserver/admin.sock".into());
        assert_eq!(config.server.admin_listen, socket);
        let err = toml::from_str::<Config>("[server]\nadmin_listen = \"localhost\"").unwrap_err();
        assert!(err.to_string().contains("unix:PATH"), "{err}");
    }
}
