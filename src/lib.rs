//! The Protection Server of an SVM (secure virtual machine).
//!
//! Light Agents on protected virtual machines send files (or first just
//! their digests) to this server, which scans them with YARA-X rules and
//! answers with verdicts, so nothing is scanned on the virtual machines
//! themselves.
//!
//! The crate is a library with two thin binaries, `scanserver` (the daemon
//! and its operator commands) and `lightagent` (the client). Its modules:
//!
//! * `allocator`: jemalloc, the allocator of the binaries, tests and
//!   benchmarks.
//! * [`signatures`]: loading, compiling, versioning and caching rulesets.
//! * [`reload`]: new signatures while serving (SIGHUP, the admin call, the
//!   periodic check).
//! * [`engine`]: the scan engine every entry point shares: current rules,
//!   a pool of scan workers, limits, and a bounded async queue.
//! * [`cache`]: the SharedCache of verdicts by content digest, coalescing
//!   of concurrent requests for the same content, and its snapshots.
//! * [`verdict`]: what a scan concludes (`Clean`, `Infected`, `Failed`).
//! * [`localscan`]: the operator's local scan of files and folders.
//! * [`files`]: opening the files the server reads, scanned or named by
//!   settings (configuration, signatures, TLS files, tokens): regular
//!   files only, the latter within a size.
//! * [`kernelfs`]: the kernel's own file systems, which walks do not enter
//!   and scans do not read large files of.
//! * [`config`]: the server's configuration (TOML, environment, flags).
//! * [`server`]: the agent listener (health, reflection), the admin and
//!   metrics listeners, the background tasks, and graceful shutdown.
//! * [`connections`]: the agent listener's connection limit, and the
//!   open files it needs.
//! * [`intake`]: the memory the agent listener's calls hold for their
//!   request messages, and how long a message may take to come whole.
//! * [`tls`]: the agent listener's TLS and mutual TLS, reloaded on SIGHUP.
//! * [`service`]: the Light Agent gRPC service (sessions, scans, lookups).
//! * [`sessions`]: the registry of connected agents.
//! * [`vms`]: the protected VMs of the last 30 days, their status and
//!   security tags.
//! * [`status`]: the SVM's status (OK, Warning, Critical, with reasons),
//!   its components and its load.
//! * [`reporting`]: reports to the Integration Server, and a reference
//!   receiver.
//! * [`admin`]: the operator's admin service (`scanserver status`,
//!   `agents`, `tags`, `rules reload`).
//! * [`auth`]: bearer tokens, for the admin service and the Integration
//!   Server.
//! * [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//! * [`notify`]: telling systemd the server is ready, reloading or
//!   stopping, and feeding its watchdog.
//! * [`state`]: the server's state folder (what survives a restart).
//! * [`shutdown`]: the signal every long-running task watches, and the
//!   health service's Watch calls, which end with it.
//! * [`client`]: the Light Agent client that `lightagent` drives.
//! * [`bench`](mod@bench): `lightagent bench`, simulated agents in a boot storm.
//! * [`report`]: how scan results are printed (text or JSON lines), and the
//!   exit status they add up to.
//! * [`proto`]: the gRPC protocol, generated from `proto/`, and conversions.
//!
//! Blocking locks are `parking_lot`'s, each held briefly and never across
//! an `.await`. They are not poisoned: a panic while one is held (a bug,
//! met by one request) does not make every later request that takes the
//! same lock panic as well. The data that section was changing may be
//! left half changed; sections under a lock are kept short for that
//! reason too.

pub mod admin;
mod allocator;
pub mod auth;
pub mod bench;
pub mod cache;
pub mod client;
pub mod config;
pub mod connections;
pub mod engine;
pub mod files;
pub mod intake;
pub mod kernelfs;
pub mod localscan;
pub mod metrics;
pub mod notify;
pub mod proto;
pub mod reload;
pub mod report;
pub mod reporting;
pub mod server;
pub mod service;
pub mod sessions;
pub mod shutdown;
pub mod signatures;
pub mod state;
pub mod status;
#[cfg(test)]
mod testlog;
pub mod tls;
pub mod verdict;
pub mod vms;

/// An error followed by its causes, `: `-separated, for messages to people:
/// some errors (tonic's transport errors) say only "transport error" and
/// keep what went wrong in their sources. A cause the message already
/// quotes is not repeated.
pub struct WithCauses<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for WithCauses<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        for error in causes(self.0).skip(1) {
            let said = error.to_string();
            if !text.contains(&said) {
                text = format!("{text}: {said}");
            }
        }
        f.write_str(&text)
    }
}

/// `error`, then each of its sources in turn.
pub(crate) fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |error| error.source())
}

/// `text` cut to its first `most` bytes (at a character's boundary), with
/// `…` after it when it was longer: a path in a log line, an id in a
/// status message, shown without taking the line or the header whole.
pub fn abridged(text: &str, most: usize) -> std::borrow::Cow<'_, str> {
    match text.len() > most {
        true => format!("{}…", &text[..text.floor_char_boundary(most)]).into(),
        false => text.into(),
    }
}

/// This host's name, as the kernel has it (what `hostname` prints: set at
/// boot from `/etc/hostname`, or by DHCP or cloud-init where that file is
/// missing or says `localhost`); `/etc/hostname` where the kernel's
/// cannot be read. `None` when neither names the host.
pub fn host_name() -> Option<String> {
    let named = |path: &str| {
        let name = std::fs::read_to_string(path).ok()?.trim().to_owned();
        (!name.is_empty() && name != "(none)" && name != "localhost").then_some(name)
    };
    named("/proc/sys/kernel/hostname").or_else(|| named("/etc/hostname"))
}

/// The server's version, as reported to agents and operators.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
