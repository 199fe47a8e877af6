//! Signature updates while serving.
//!
//! Signatures change several times a day; a restart to load them would end
//! every agent's session. A running server reads its ruleset again when
//! asked: by SIGHUP (what updaters send daemons once they have replaced
//! the files), by the admin service's `ReloadSignatures` (`scanserver
//! rules reload`), or by its own periodic check of the files
//! (`rules.check_interval`, every 5 minutes by default).
//!
//! A reload reads the configured ruleset and compares its version with the
//! loaded one's: the same, nothing happens. A new version is compiled (or
//! taken from the compiled-rules cache) on a blocking thread, one reload at
//! a time, while scans go on with the current rules; then it replaces them
//! ([`ServiceState::replace_ruleset`]): the verdict cache is emptied, every
//! session tells its agent (`SignaturesChanged`), and every scan that
//! starts from then on uses the new rules. Scans under way finish with the
//! old ones, and their verdicts carry the old version.
//!
//! Fail closed: signatures that do not load (errors, no rule that can
//! match, files changed while they were compiled) replace nothing. The
//! server never scans with rules it could not load, nor stops scanning
//! because an update was broken: it goes on with the rules it had, and its
//! status says `SIGNATURES_UPDATE_FAILED` until a reload succeeds (or finds
//! the files back to the loaded version).
//!
//! The periodic check loads a new version only once two checks in a row
//! have found it, so that an update copied file by file is not loaded half
//! way; and it does not try again a version that failed (SIGHUP and the
//! admin call do).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, watch};

use crate::{
    config::RulesConfig,
    service::ServiceState,
    shutdown::shut_down,
    signatures::{Ruleset, SignatureError},
    status::Svm,
};

/// Why a reload replaced nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Signatures(#[from] SignatureError),
    #[error("loading the signatures stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}

impl ReloadError {
    /// The error on one line, for the SVM's status.
    pub fn summary(&self) -> String {
        match self {
            ReloadError::Signatures(err) => err.summary(),
            other => other.to_string(),
        }
    }
}

/// What a reload did.
pub struct Reload {
    /// Whether the loaded version changed.
    pub changed: bool,
    /// The version loaded before.
    pub previous: Arc<str>,
    /// The signatures loaded now.
    pub ruleset: Arc<Ruleset>,
    /// How long reading and loading took.
    pub elapsed: Duration,
}

/// Reloads the server's signatures, one reload at a time.
pub struct Reloader {
    state: Arc<ServiceState>,
    svm: Arc<Svm>,
    source: PathBuf,
    cache_dir: Option<PathBuf>,
    check_interval: Duration,
    /// Held for the whole of a reload.
    running: Mutex<()>,
}

impl Reloader {
    pub fn new(rules: &RulesConfig, state: Arc<ServiceState>, svm: Arc<Svm>) -> Self {
        Reloader {
            state,
            svm,
            source: rules.path.clone(),
            cache_dir: rules.cache_dir(),
            check_interval: rules.check_interval,
            running: Mutex::new(()),
        }
    }

    /// Reads the ruleset again and loads it if its version changed. A
    /// reload asked for while another runs waits for it, then reads the
    /// files again.
    pub async fn reload(&self) -> Result<Reload, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let previous = self.state.engine.ruleset();
        let (source, cache_dir) = (self.source.clone(), self.cache_dir.clone());
        let current = previous.version_arc();
        let loaded = tokio::task::spawn_blocking(move || {
            load_changed(&source, cache_dir.as_deref(), &current)
        })
        .await
        .map_err(ReloadError::from)
        .and_then(|loaded| Ok(loaded?));
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::error!(
                    source = %self.source.display(),
                    version = previous.version(),
                    "the new signatures do not load; scanning goes on with the loaded ones: {err}"
                );
                self.svm.signatures_updated(Some(err.summary()));
                return Err(err);
            }
        };
        if let Some(ruleset) = loaded {
            ruleset.log_loaded();
            self.state.replace_ruleset(ruleset);
            tracing::info!(
                previous = previous.version(),
                "signatures replaced: verdict cache emptied, agents told"
            );
        }
        self.svm.signatures_updated(None);
        let ruleset = self.state.engine.ruleset();
        Ok(Reload {
            changed: ruleset.version() != previous.version(),
            previous: previous.version_arc(),
            ruleset,
            elapsed: started.elapsed(),
        })
    }

    /// Reloads on every SIGHUP, until the process ends.
    pub async fn on_hangup(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(err) => {
                tracing::warn!("SIGHUP will not reload the signatures: {err}");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reading the signatures again");
            // The outcome is logged, and a failure shown in the status.
            let _ = self.reload().await;
        }
    }

    /// Checks the ruleset's files every `rules.check_interval` (never when
    /// it is zero) and reloads a new version once two checks in a row found
    /// it, until shutdown.
    pub async fn keep_checking(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.check_interval.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(self.check_interval);
        ticker.tick().await;
        let mut check = Check::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shut_down(&mut shutdown) => return,
            }
            let source = self.source.clone();
            let found = tokio::task::spawn_blocking(move || Ruleset::version_of(&source))
                .await
                .map_err(ReloadError::from)
                .and_then(|found| Ok(found?));
            let loaded = self.state.engine.ruleset().version_arc();
            match check.next(found, &loaded) {
                Step::Wait => {}
                Step::Current => self.svm.signatures_updated(None),
                Step::Unreadable(err) => {
                    tracing::warn!(source = %self.source.display(), "cannot read the signatures: {err}");
                    self.svm.signatures_updated(Some(err));
                }
                Step::Reload => {
                    tracing::info!(source = %self.source.display(), "the signatures changed on disk");
                    check.reloaded(self.reload().await.is_ok());
                }
            }
        }
    }
}

/// The ruleset at `source`, loaded when its version is not `current`.
fn load_changed(
    source: &std::path::Path,
    cache_dir: Option<&std::path::Path>,
    current: &str,
) -> Result<Option<Ruleset>, SignatureError> {
    if Ruleset::version_of(source)? == current {
        return Ok(None);
    }
    let ruleset = Ruleset::load(source, cache_dir)?;
    Ok((ruleset.version() != current).then_some(ruleset))
}

/// What the periodic check remembers between two looks at the files.
#[derive(Default)]
struct Check {
    /// The version the last look found, if it could read one.
    seen: Option<String>,
    /// The version whose last reload failed.
    failed: Option<String>,
    /// The last error reading the files, reported once.
    unreadable: Option<String>,
}

/// What the periodic check does after a look.
#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing, for now.
    Wait,
    /// The files hold the loaded version: no update failed (whatever a
    /// reload found before).
    Current,
    /// Load the version found.
    Reload,
    /// Report that the files cannot be read, and why.
    Unreadable(String),
}

impl Check {
    /// The step after a look that `found` a version (or could not read
    /// one), with `loaded` the version in use.
    fn next(&mut self, found: Result<String, ReloadError>, loaded: &str) -> Step {
        let found = match found {
            Ok(found) => found,
            Err(err) => {
                self.seen = None;
                let error = err.summary();
                return match self.unreadable.replace(error.clone()) == Some(error.clone()) {
                    true => Step::Wait,
                    false => Step::Unreadable(error),
                };
            }
        };
        self.unreadable = None;
        let steady = self.seen.replace(found.clone()).as_ref() == Some(&found);
        match () {
            _ if found == loaded => {
                self.failed = None;
                Step::Current
            }
            _ if !steady || self.failed.as_ref() == Some(&found) => Step::Wait,
            _ => Step::Reload,
        }
    }

    /// Records how the reload of the version last seen went.
    fn reloaded(&mut self, succeeded: bool) {
        self.failed = match succeeded {
            true => None,
            false => self.seen.clone(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreadable() -> Result<String, ReloadError> {
        Err(SignatureError::Missing(PathBuf::from("rules")).into())
    }

    #[test]
    fn a_new_version_is_reloaded_once_two_looks_found_it() {
        let mut check = Check::default();
        assert_eq!(check.next(Ok("v1".into()), "v1"), Step::Current);
        assert_eq!(
            check.next(Ok("v2".into()), "v1"),
            Step::Wait,
            "just changed"
        );
        assert_eq!(
            check.next(Ok("v3".into()), "v1"),
            Step::Wait,
            "still changing"
        );
        assert_eq!(check.next(Ok("v3".into()), "v1"), Step::Reload);
        check.reloaded(true);
        assert_eq!(check.next(Ok("v3".into()), "v3"), Step::Current);
    }

    #[test]
    fn a_version_that_failed_is_not_tried_again() {
        let mut check = Check::default();
        check.next(Ok("bad".into()), "v1");
        assert_eq!(check.next(Ok("bad".into()), "v1"), Step::Reload);
        check.reloaded(false);
        assert_eq!(check.next(Ok("bad".into()), "v1"), Step::Wait);
        assert_eq!(check.next(Ok("fixed".into()), "v1"), Step::Wait);
        assert_eq!(check.next(Ok("fixed".into()), "v1"), Step::Reload);
    }

    #[test]
    fn unreadable_files_are_reported_once_and_break_the_streak() {
        let mut check = Check::default();
        check.next(Ok("v2".into()), "v1");
        assert!(
            matches!(check.next(unreadable(), "v1"), Step::Unreadable(e) if e.contains("rules"))
        );
        assert_eq!(
            check.next(unreadable(), "v1"),
            Step::Wait,
            "reported already"
        );
        assert_eq!(
            check.next(Ok("v2".into()), "v1"),
            Step::Wait,
            "seen once since"
        );
        assert_eq!(check.next(Ok("v2".into()), "v1"), Step::Reload);
    }

    #[test]
    fn files_back_to_the_loaded_version_clear_a_failure() {
        let mut check = Check::default();
        check.next(Ok("bad".into()), "v1");
        check.next(Ok("bad".into()), "v1");
        check.reloaded(false);
        assert_eq!(check.next(Ok("v1".into()), "v1"), Step::Current);
        assert!(matches!(
            check.next(unreadable(), "v1"),
            Step::Unreadable(_)
        ));
        assert_eq!(check.next(Ok("v1".into()), "v1"), Step::Current);
    }
}
