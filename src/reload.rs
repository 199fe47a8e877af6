//! Signature updates while serving.
//!
//! Signatures change several times a day; a restart to load them would end
//! every agent's session. A running server reads its ruleset again when
//! asked: by SIGHUP (what updaters send daemons once they have replaced
//! the files; see [`crate::server::Server::reload_on_hangup`]), by the
//! admin service's `ReloadSignatures` (`scanserver rules reload`), or by
//! its own periodic check of the files (`rules.check_interval`, every 5
//! minutes by default).
//!
//! A reload reads the configured ruleset and compares its version with the
//! loaded one's: the same, nothing happens. A new version is compiled (or
//! taken from the compiled-rules cache) on a blocking thread, one reload at
//! a time, while scans go on with the current rules; then it replaces them
//! ([`ServiceState::replace_ruleset`]): the verdict cache is emptied, every
//! session tells its agent (`SignaturesChanged`), and every scan that
//! starts from then on uses the new rules. Scans under way finish with the
//! old ones, and their verdicts carry the old version. A reload runs on a
//! task of its own: a caller that goes away (an admin client that gives
//! up) does not cut it short. Asks made while a reload runs are merged:
//! they wait for one more reload, which starts once the running one ends
//! (and reads the files then), and share its outcome. However often an
//! admin client asks, at most one reload runs and one waits.
//!
//! Fail closed: signatures that do not load (errors, no rule that can
//! match, included files changed while they were compiled) replace
//! nothing. The server never scans with rules it could not load, nor stops
//! scanning because an update was broken: it goes on with the rules it
//! had, and its status says `SIGNATURES_UPDATE_FAILED` until a reload
//! succeeds (or finds the files back to the loaded version).
//!
//! SIGHUP and the admin call load what the files hold at that moment. The
//! periodic check loads a new version only once two looks in a row have
//! found it, and only that version, so that an update copied file by file
//! is not loaded half way; it reports files it cannot read after two looks
//! too. It does not compile again a version that a reload (its own, or
//! one asked for by SIGHUP or the admin call) could not load; SIGHUP and
//! the admin call always try.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, watch};

use crate::{
    config::RulesConfig,
    service::ServiceState,
    shutdown::Periodic,
    signatures::{OnDisk, Ruleset, SignatureError},
    status::Svm,
};

/// Why a reload replaced nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Signatures(#[from] SignatureError),
    #[error("loading the signatures panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    #[error("the reload ended without an outcome (see the server's log)")]
    Lost,
}

impl ReloadError {
    /// The error on one line, for the SVM's status.
    pub fn summary(&self) -> String {
        match self {
            ReloadError::Signatures(err) => err.summary(),
            other => other.to_string(),
        }
    }

    /// The error with at most the first `errors` compiler errors in full.
    pub fn abridged(&self, errors: usize) -> String {
        match self {
            ReloadError::Signatures(err) => err.abridged(errors),
            other => other.to_string(),
        }
    }

    /// Whether the same files would fail the same way: the periodic check
    /// does not try them again. (Files that could not be read, or changed
    /// while compiled, may load at the next try.)
    fn lasting(&self) -> bool {
        !matches!(
            self,
            ReloadError::Signatures(
                SignatureError::Io { .. } | SignatureError::Missing(_) | SignatureError::Changed(_)
            )
        )
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
    /// Held for the whole of a reload, and of a periodic look at the files
    /// (whose outcome would otherwise overwrite a reload's in the status).
    /// It keeps the last version that could not load, whichever reload
    /// tried it: the periodic check does not compile it again.
    running: Mutex<Broken>,
    /// The reload asked for and not started yet: every ask until it starts
    /// waits for its outcome.
    pending: parking_lot::Mutex<Option<watch::Receiver<Option<Outcome>>>>,
}

/// A reload's outcome, shared by every ask it answers.
pub type Outcome = Arc<Result<Reload, ReloadError>>;

impl Reloader {
    pub fn new(rules: &RulesConfig, state: Arc<ServiceState>, svm: Arc<Svm>) -> Self {
        Reloader {
            state,
            svm,
            source: rules.path.clone(),
            cache_dir: rules.cache_dir(),
            check_interval: rules.check_interval,
            running: Mutex::new(Broken::default()),
            pending: parking_lot::Mutex::new(None),
        }
    }

    /// Reads the ruleset again and loads it if its version changed. A
    /// reload asked for while another runs waits for it, then reads the
    /// files again; asks made meanwhile share that one reload.
    pub async fn reload(self: &Arc<Self>) -> Outcome {
        let mut outcome = self
            .pending()
            .get_or_insert_with(|| self.start_pending())
            .clone();
        match outcome.wait_for(Option::is_some).await {
            Ok(outcome) => Arc::clone(outcome.as_ref().expect("waited for")),
            Err(_) => Arc::new(Err(ReloadError::Lost)),
        }
    }

    /// Starts the task of the pending reload: once the running reload is
    /// over, it takes the pending place (later asks make another) and
    /// reloads. Its outcome goes to every ask made until then.
    fn start_pending(self: &Arc<Self>) -> watch::Receiver<Option<Outcome>> {
        let (outcome, pending) = watch::channel(None);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut broken = this.running.lock().await;
            this.pending().take();
            let reloaded = this.reload_now(&mut broken, None).await;
            outcome.send_replace(Some(Arc::new(reloaded)));
        });
        pending
    }

    fn pending(&self) -> parking_lot::MutexGuard<'_, Option<watch::Receiver<Option<Outcome>>>> {
        self.pending.lock()
    }

    async fn reload_now(
        &self,
        broken: &mut Broken,
        expected: Option<String>,
    ) -> Result<Reload, ReloadError> {
        let started = Instant::now();
        let previous = self.state.engine.ruleset();
        let (source, cache_dir) = (self.source.clone(), self.cache_dir.clone());
        let current = previous.version_arc();
        let any_version = expected.is_none();
        // The version that failed, if loading it panicked before it could
        // say: the one the files held when read, or, if reading them
        // panicked, the one asked for.
        let asked = expected.clone();
        let seen = Arc::new(OnceLock::new());
        let seeing = Arc::clone(&seen);
        let found = blocking(move || {
            load_changed(
                &source,
                cache_dir.as_deref(),
                &current,
                expected.as_deref(),
                &seeing,
            )
        })
        .await;
        let (version, loaded) = match found {
            Ok(Found { on_disk, loaded }) => {
                previous.seen_on_disk(&on_disk);
                (Some(on_disk.version), loaded.map_err(ReloadError::from))
            }
            Err(err @ ReloadError::Panicked(_)) => (seen.get().cloned().or(asked), Err(err)),
            Err(err) => (None, Err(err)),
        };
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                if let Some(version) = version.filter(|_| err.lasting()) {
                    broken.0 = Some(version);
                }
                tracing::error!(
                    source = %self.source.display(),
                    version = previous.version(),
                    "the new signatures do not load; scanning goes on with the loaded ones: {}",
                    err.abridged(10)
                );
                // What the periodic check found may load at its next try
                // (an update still being copied): not worth a Warning yet.
                if any_version || err.lasting() {
                    self.svm.signatures_reloaded(Err(err.summary()));
                }
                return Err(err);
            }
        };
        let replaced = loaded.is_some();
        if let Some(ruleset) = loaded {
            ruleset.log_loaded();
            // Emptying the verdict cache drops each of its entries (a
            // million or more in its default budget): not on a runtime
            // thread, which agents' streams wait for meanwhile.
            let state = Arc::clone(&self.state);
            blocking(move || {
                state.replace_ruleset(ruleset);
                Ok(())
            })
            .await?;
            tracing::info!(
                previous = previous.version(),
                "signatures replaced: verdict cache emptied, agents told"
            );
        }
        // Unless the periodic check found the files moved on since its
        // looks, the loaded signatures are now those on disk.
        if replaced || any_version {
            self.svm.signatures_reloaded(Ok(()));
        }
        let ruleset = self.state.engine.ruleset();
        let reload = Reload {
            changed: ruleset.version() != previous.version(),
            previous: previous.version_arc(),
            ruleset,
            elapsed: started.elapsed(),
        };
        // Often the last hold on the old rules (YARA-X's compiled code and
        // tables): freed off the runtime's threads.
        tokio::task::spawn_blocking(move || drop(previous));
        Ok(reload)
    }

    /// Looks at the ruleset's files every `rules.check_interval` (never
    /// when it is zero), and reloads a new version once two looks in a row
    /// found it, until shutdown.
    pub async fn keep_checking(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        if self.check_interval.is_zero() {
            return;
        }
        let mut looks = Periodic::every(self.check_interval, shutdown).await;
        let mut check = Check::default();
        while looks.next().await {
            // Held from the look to the reload: a reload asked for in
            // between could find the version broken, and it would be
            // compiled again.
            let mut broken = self.running.lock().await;
            let Some(version) = self.look(&mut check, &mut broken).await else {
                continue;
            };
            tracing::info!(source = %self.source.display(), "the signatures changed on disk");
            // A version that cannot load is recorded by the reload itself.
            let _ = self.reload_now(&mut broken, Some(version)).await;
        }
    }

    /// Looks at the files once; returns the version to load, if any.
    async fn look(&self, check: &mut Check, broken: &mut Broken) -> Option<String> {
        let source = self.source.clone();
        let found = blocking(move || Ruleset::look(&source)).await;
        let ruleset = self.state.engine.ruleset();
        if let Ok(on_disk) = &found {
            ruleset.seen_on_disk(on_disk);
        }
        let found = found.map(|on_disk| on_disk.version);
        match check.next(found, &ruleset.version_arc(), broken) {
            Step::Wait => None,
            Step::Current => {
                self.svm.signatures_reloaded(Ok(()));
                None
            }
            Step::Unreadable(err) => {
                tracing::warn!(source = %self.source.display(), "cannot read the signatures: {err}");
                self.svm.signatures_reloaded(Err(err));
                None
            }
            Step::Reload(version) => Some(version),
        }
    }
}

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SignatureError> + Send + 'static,
) -> Result<T, ReloadError> {
    Ok(tokio::task::spawn_blocking(work).await??)
}

/// The version that last failed to load, for as long as the files may
/// still hold it.
#[derive(Default)]
struct Broken(Option<String>);

/// What [`load_changed`] found.
struct Found {
    /// What the files held when first read.
    on_disk: OnDisk,
    /// The signatures of that version, if it was wanted and loaded.
    loaded: Result<Option<Ruleset>, SignatureError>,
}

/// The ruleset at `source`, loaded when its version is not `current` (and
/// is `expected`, when given). Fails only when the files' version cannot
/// be read. The version read goes to `seen` before it is loaded.
fn load_changed(
    source: &Path,
    cache_dir: Option<&Path>,
    current: &str,
    expected: Option<&str>,
    seen: &OnceLock<String>,
) -> Result<Found, SignatureError> {
    let wanted = |version: &str| version != current && expected.is_none_or(|e| e == version);
    let on_disk = Ruleset::look(source)?;
    let version = &on_disk.version;
    let _ = seen.set(version.clone());
    if !wanted(version) {
        return Ok(Found {
            on_disk,
            loaded: Ok(None),
        });
    }
    let loaded = match Ruleset::load(source, cache_dir) {
        Ok(ruleset) => Ok(wanted(ruleset.version()).then_some(ruleset)),
        // What failed may be files copied since `version` was read: their
        // failure is not that version's.
        Err(_) if Ruleset::version_of(source).ok().as_ref() != Some(version) => {
            Err(SignatureError::Changed(source.to_owned()))
        }
        Err(err) => Err(err),
    };
    Ok(Found { on_disk, loaded })
}

/// What the periodic check remembers between two looks at the files.
#[derive(Default)]
struct Check {
    /// The version the last look found, if it could read one.
    seen: Option<String>,
    /// The error of the last look, if it could not read the files.
    unreadable: Option<String>,
    /// The error last reported, until the files can be read.
    reported: Option<String>,
}

/// What the periodic check does after a look.
#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing, for now.
    Wait,
    /// The files hold the loaded version: no update failed (whatever a
    /// reload found before).
    Current,
    /// Load this version.
    Reload(String),
    /// Report that the files cannot be read, and why.
    Unreadable(String),
}

impl Check {
    /// The step after a look that `found` a version (or could not read
    /// one), with `loaded` the version in use and `broken` the last one
    /// that could not load.
    fn next(
        &mut self,
        found: Result<String, ReloadError>,
        loaded: &str,
        broken: &mut Broken,
    ) -> Step {
        let found = match found {
            Ok(found) => found,
            Err(err) => {
                self.seen = None;
                let error = err.summary();
                let again = self.unreadable.as_ref() == Some(&error);
                self.unreadable = Some(error.clone());
                if again && self.reported.as_ref() != Some(&error) {
                    self.reported = Some(error.clone());
                    return Step::Unreadable(error);
                }
                return Step::Wait;
            }
        };
        self.unreadable = None;
        self.reported = None;
        let steady = self.seen.replace(found.clone()).as_ref() == Some(&found);
        if found == loaded {
            broken.0 = None;
            Step::Current
        } else if steady && broken.0.as_ref() != Some(&found) {
            Step::Reload(found)
        } else {
            Step::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreadable() -> Result<String, ReloadError> {
        Err(SignatureError::Missing(PathBuf::from("rules")).into())
    }

    fn reload(version: &str) -> Step {
        Step::Reload(version.into())
    }

    /// The periodic check and the reloads' record, as the reloader keeps
    /// them.
    #[derive(Default)]
    struct Looks {
        check: Check,
        broken: Broken,
    }

    impl Looks {
        fn next(&mut self, found: Result<String, ReloadError>, loaded: &str) -> Step {
            self.check.next(found, loaded, &mut self.broken)
        }

        /// What a reload that could not load `version` records.
        fn failed(&mut self, version: &str) {
            self.broken.0 = Some(version.into());
        }
    }

    #[test]
    fn a_new_version_is_reloaded_once_two_looks_found_it() {
        let mut check = Looks::default();
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
        assert_eq!(check.next(Ok("v3".into()), "v1"), reload("v3"));
        assert_eq!(check.next(Ok("v3".into()), "v3"), Step::Current);
    }

    #[test]
    fn a_version_that_cannot_load_is_not_tried_again() {
        let mut check = Looks::default();
        check.next(Ok("bad".into()), "v1");
        assert_eq!(check.next(Ok("bad".into()), "v1"), reload("bad"));
        check.failed("bad");
        assert_eq!(check.next(Ok("bad".into()), "v1"), Step::Wait);
        assert_eq!(check.next(Ok("fixed".into()), "v1"), Step::Wait);
        assert_eq!(check.next(Ok("fixed".into()), "v1"), reload("fixed"));
    }

    #[test]
    fn a_version_that_another_reload_could_not_load_is_not_tried() {
        let mut check = Looks::default();
        check.failed("bad"); // by SIGHUP, or `scanserver rules reload`
        assert_eq!(check.next(Ok("bad".into()), "v1"), Step::Wait);
        assert_eq!(check.next(Ok("bad".into()), "v1"), Step::Wait);
    }

    #[test]
    fn unreadable_files_are_reported_after_two_looks_once_and_break_the_streak() {
        let mut check = Looks::default();
        check.next(Ok("v2".into()), "v1");
        assert_eq!(
            check.next(unreadable(), "v1"),
            Step::Wait,
            "maybe a passing state"
        );
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
        assert_eq!(check.next(Ok("v2".into()), "v1"), reload("v2"));
    }

    #[test]
    fn files_back_to_the_loaded_version_clear_a_failure() {
        let mut check = Looks::default();
        check.next(Ok("bad".into()), "v1");
        check.next(Ok("bad".into()), "v1");
        check.failed("bad");
        assert_eq!(check.next(Ok("v1".into()), "v1"), Step::Current);
        check.next(unreadable(), "v1");
        assert!(matches!(
            check.next(unreadable(), "v1"),
            Step::Unreadable(_)
        ));
        assert_eq!(check.next(Ok("v1".into()), "v1"), Step::Current);
    }

    #[test]
    fn the_periodic_check_loads_only_the_version_it_saw_twice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yar"), "rule a { condition: true }").unwrap();
        let seen = Ruleset::version_of(dir.path()).unwrap();
        std::fs::write(dir.path().join("b.yar"), "rule b { condition: true }").unwrap();
        let load = |current: &str, expected: Option<&str>| {
            load_changed(dir.path(), None, current, expected, &OnceLock::new()).unwrap()
        };
        let moved_on = load("loaded", Some(&seen)).loaded.unwrap();
        assert!(moved_on.is_none(), "files changed since the looks");
        let any = load("loaded", None).loaded.unwrap().unwrap();
        assert_eq!(any.rule_count(), 2);
        assert!(
            load(any.version(), None).loaded.unwrap().is_none(),
            "unchanged"
        );

        std::fs::write(dir.path().join("c.yar"), "rule broken {").unwrap();
        let broken = load(any.version(), None);
        assert!(broken.loaded.is_err());
        assert_eq!(
            broken.on_disk.version,
            Ruleset::version_of(dir.path()).unwrap(),
            "the version that failed"
        );
    }
}
