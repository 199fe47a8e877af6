//! The signature database: loading, compiling and versioning YARA rules.
//!
//! A ruleset comes from a folder of sources or from a file (a single `.yar`
//! source, or rules pre-compiled by `yr compile`).
//!
//! * Every `*.yar` / `*.yara` file below the folder is compiled, recursively,
//!   each into its own namespace named after its path relative to the folder.
//!   `include` is resolved from the including file's own folder and must stay
//!   inside the ruleset folder.
//! * The external variables of public rulesets ([`EXTERNALS`]) are declared,
//!   so such rulesets compile; the engine sets them for each scanned file.
//! * YARA-X's relaxed regular-expression syntax is accepted, as common public
//!   rules need it. Warnings are logged, never fatal; any error fails the whole
//!   load with every error's file, line and column.
//! * The ruleset [version](Ruleset::version) is a blake3 digest over the
//!   sorted relative paths and contents of every source file, the compile
//!   profile and the engine version. Verdicts are only valid for the version
//!   that produced them.
//! * Compiled rules are kept in a cache folder under their version, so a
//!   restart with unchanged signatures does not compile again. Compiled rules
//!   contain native code: the cache folder must be writable only by the
//!   server's user (it is created with mode 0700), and every cached file
//!   carries a blake3 checksum that is verified before it is loaded.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    fmt, fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use walkdir::WalkDir;
use yara_x::{Compiler, Rules, Scanner, SourceCode};

use crate::files::{self, LEASE_WAIT, open_regular};

/// External variables declared for every compiled ruleset, as used by public
/// rulesets (signature-base and THOR-style rules). Each is a string.
pub const EXTERNALS: [&str; 5] = ["filename", "filepath", "extension", "filetype", "owner"];

/// The values of the name-derived external variables for one file,
/// THOR-style: `filename` is the base name, `filepath` the folder,
/// `extension` the lower-case extension with its dot. (`filetype` and
/// `owner` stay empty.) A Windows path (a drive letter or `\\` first, or
/// backslashes and no slash), as agents on Windows VMs send, is split at
/// its backslashes (and slashes) and its folder keeps them: public rules
/// written for Windows test `filepath contains "\\System32"`.
///
/// Verdicts are cached under the name as given, not under these values:
/// a change to how they are worked out must raise
/// [`crate::engine::VERDICT_REVISION`], or saved verdicts made the old way
/// would be served.
#[derive(Default)]
pub struct NameExternals<'a> {
    pub filename: Cow<'a, str>,
    pub filepath: Cow<'a, str>,
    pub extension: String,
}

impl<'a> NameExternals<'a> {
    /// The values for a file named `name`; all empty without a name.
    pub fn of(name: Option<&'a Path>) -> Self {
        match name {
            None => Self::default(),
            Some(name) => match name.to_str() {
                Some(text) if is_windows_path(text) => Self::of_windows(text),
                _ => Self::of_path(name),
            },
        }
    }

    fn of_path(name: &'a Path) -> Self {
        let text =
            |s: Option<&'a std::ffi::OsStr>| s.map(|s| s.to_string_lossy()).unwrap_or_default();
        NameExternals {
            filename: text(name.file_name()),
            filepath: text(name.parent().map(Path::as_os_str)),
            extension: name
                .extension()
                .map(|e| dotted_lowercase(&e.to_string_lossy()))
                .unwrap_or_default(),
        }
    }

    fn of_windows(name: &'a str) -> Self {
        // A name relative to a drive's current folder (`C:setup.exe`) is
        // split after its drive, whose folder it is in.
        let (filepath, filename) = match name.rfind(['\\', '/']) {
            Some(at) => (&name[..at], &name[at + 1..]),
            None if has_drive(name) => name.split_at(2),
            None => ("", name),
        };
        // As `Path::extension`: none for `.hidden`, a lone dot for `name.`.
        let extension = match filename.rfind('.') {
            Some(at) if at > 0 => dotted_lowercase(&filename[at + 1..]),
            _ => String::new(),
        };
        NameExternals {
            filename: filename.into(),
            filepath: filepath.into(),
            extension,
        }
    }

    /// (variable, value) pairs.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("filename", &self.filename),
            ("filepath", &self.filepath),
            ("extension", &self.extension),
        ]
    }
}

/// Whether `name` is a Windows path: a drive letter or a backslash first
/// (a UNC or device path, a path from the current drive's root), or
/// backslashes without a slash.
fn is_windows_path(name: &str) -> bool {
    has_drive(name) || name.starts_with('\\') || (name.contains('\\') && !name.contains('/'))
}

/// Whether `name` begins with a drive letter and its colon.
fn has_drive(name: &str) -> bool {
    name.as_bytes()
        .get(..2)
        .is_some_and(|start| start[0].is_ascii_alphabetic() && start[1] == b':')
}

fn dotted_lowercase(extension: &str) -> String {
    format!(".{}", extension.to_lowercase())
}

/// The YARA-X version the engine is built with.
pub const YARA_X_VERSION: &str = env!("SCANSERVER_YARA_X_VERSION");

/// Everything besides the sources that changes what compiled rules do. Part
/// of the ruleset version, so a change here invalidates cached rules and
/// verdicts.
const COMPILE_PROFILE: &str = "relaxed-re;externals=filename,filepath,extension,filetype,owner";

/// The header of rules serialized by YARA-X.
const SERIALIZED_MAGIC: &[u8] = b"YARA-X\0\0";

/// Errors while loading a ruleset.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} holds no YARA sources (.yar or .yara files) and is not rules compiled by `yr compile`: \
         give the folder of the sources, a source file, or compiled rules",
        .0.display()
    )]
    Empty(PathBuf),
    #[error(
        "there is no ruleset at {}: put the signatures there, or give their path with --rules \
         (or SCANSERVER_RULES, or `[rules] path`); the shipped signatures are the `signatures` \
         folder of the distribution",
        .0.display()
    )]
    Missing(PathBuf),
    #[error(
        "{} has no rule that can match (none, or only private rules): \
         a ruleset that cannot detect anything would report every file clean",
        .0.display()
    )]
    NoRules(PathBuf),
    #[error(
        "{} changed while it was compiled (an update under way?); load it again once the update is complete",
        .0.display()
    )]
    Changed(PathBuf),
    #[error("{} error(s) in the ruleset:\n{}", .0.len(), DiagnosticList(.0))]
    Compile(Vec<Diagnostic>),
    #[error(
        "{} declares some of the external variables {} as strings but not {}: \
         compile it with all of them declared as strings, or with none",
        path.display(), EXTERNALS.join(", "), missing.join(", ")
    )]
    SomeExternals {
        path: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error(
        "cannot load pre-compiled rules {}: {source}; compile them with `yr compile` of \
         YARA-X {YARA_X_VERSION} (this server's), or give their sources",
        path.display()
    )]
    Precompiled {
        path: PathBuf,
        source: yara_x::errors::SerializationError,
    },
}

impl SignatureError {
    /// The error on one line, for a status: a compile's first error, and
    /// how many more there are.
    pub fn summary(&self) -> String {
        match self {
            SignatureError::Compile(errors) if errors.len() > 1 => {
                format!("{} (and {} more errors)", errors[0], errors.len() - 1)
            }
            SignatureError::Compile(errors) if errors.len() == 1 => errors[0].to_string(),
            other => other.to_string(),
        }
    }

    /// The error with at most the first `errors` of a compile's errors in
    /// full, and how many more there are.
    pub fn abridged(&self, errors: usize) -> String {
        match self {
            SignatureError::Compile(all) if all.len() > errors => format!(
                "{} errors in the ruleset; the first {errors}:\n{}and {} more (`scanserver rules check` lists them all)",
                all.len(),
                DiagnosticList(&all[..errors]),
                all.len() - errors
            ),
            other => other.to_string(),
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        SignatureError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A compiler error or warning, located in a source file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Diagnostic {
    /// YARA-X's code for the diagnostic (`E009`, `slow_pattern`, ...).
    pub code: String,
    pub title: String,
    pub file: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The full report, with the offending source line.
    pub text: String,
}

impl Diagnostic {
    /// Converts a YARA-X error or warning through its documented JSON form.
    fn from_report(report: &impl Serialize) -> Self {
        #[derive(Deserialize)]
        struct Label {
            code_origin: Option<String>,
        }
        #[derive(Deserialize)]
        struct Report {
            code: String,
            title: String,
            line: Option<usize>,
            column: Option<usize>,
            #[serde(default)]
            labels: Vec<Label>,
            text: String,
        }
        let report: Report = serde_json::to_value(report)
            .and_then(serde_json::from_value)
            .expect("YARA-X reports serialize with code, title and text");
        Diagnostic {
            code: report.code,
            title: report.title,
            file: report.labels.into_iter().find_map(|l| l.code_origin),
            line: report.line,
            column: report.column,
            text: report.text,
        }
    }

    /// An error (`code`) found at byte `at` of `text` (the file `file`)
    /// before YARA-X parses it, placed by its line and column, from 1.
    fn located(code: &str, file: &str, text: &[u8], at: usize, title: String) -> Self {
        let before = &text[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |nl| nl + 1);
        let column = at - line_start + 1;
        Diagnostic {
            code: code.into(),
            text: format!("error: {title}\n --> {file}:{line}:{column}"),
            title,
            file: Some(file.into()),
            line: Some(line),
            column: Some(column),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line, self.column) {
            (Some(file), Some(line), Some(col)) => write!(f, "{file}:{line}:{col}: ")?,
            (Some(file), _, _) => write!(f, "{file}: ")?,
            _ => {}
        }
        write!(f, "[{}] {}", self.code, self.title)
    }
}

struct DiagnosticList<'a>(&'a [Diagnostic]);

impl fmt::Display for DiagnosticList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.0 {
            writeln!(f, "{}", d.text.trim_end())?;
        }
        Ok(())
    }
}

/// Compiled rules with what identifies them.
pub struct Ruleset {
    rules: Rules,
    version: Arc<str>,
    /// The first 64 bits of the version, for cache keys.
    version_id: u64,
    rule_count: usize,
    source: PathBuf,
    compile_time: Duration,
    from_cache: bool,
    warnings: Vec<Diagnostic>,
    name_sensitive: bool,
    /// Whether the rules declare the external variables ([`EXTERNALS`]),
    /// all as strings; otherwise they declare none.
    externals: bool,
    /// When the signatures were released: the newest modification time of
    /// their files, in milliseconds since the Unix epoch; looked at again
    /// while the files keep this version (see [`Ruleset::seen_on_disk`]).
    released_ms: AtomicU64,
}

impl fmt::Debug for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ruleset")
            .field("version", &self.version)
            .field("rule_count", &self.rule_count)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// What the files of a ruleset hold, read without compiling them.
#[derive(Debug, Clone)]
pub struct OnDisk {
    pub version: String,
    /// When they were released: their newest modification time (`None`
    /// if it could not be read, the files gone since, say).
    pub released: Option<SystemTime>,
}

impl Ruleset {
    /// The ruleset of the one rule file `source` (for the crate's unit
    /// tests; integration tests have theirs in `tests/common`).
    #[cfg(test)]
    pub(crate) fn of_source(source: &str) -> Ruleset {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yar"), source).unwrap();
        Ruleset::load(dir.path(), None).unwrap()
    }

    /// Loads the ruleset at `source` (a folder of sources, a source file or
    /// a pre-compiled rules file), reusing compiled rules from `cache_dir`
    /// when they are there and storing them there when they are not.
    pub fn load(source: &Path, cache_dir: Option<&Path>) -> Result<Ruleset, SignatureError> {
        on_compiler_stack(source, || Self::load_here(source, cache_dir))
    }

    /// [`Ruleset::load`], on the thread that calls it.
    fn load_here(source: &Path, cache_dir: Option<&Path>) -> Result<Ruleset, SignatureError> {
        reachable(source)?;
        if is_precompiled(source)? {
            return Self::load_precompiled(source);
        }
        let started = Instant::now();
        let sources = SourceSet::collect(source)?;
        let OnDisk { version, released } = sources.on_disk();
        let cache = cache_dir.map(|dir| RulesCache::new(dir, &version));
        let name_sensitive = sources.mention_externals();
        if let Some((rules, warnings)) = cache.as_ref().and_then(RulesCache::load) {
            tracing::info!(%version, "loaded compiled rules from the cache");
            let ruleset = Self::new(rules, version, source, started, true, warnings)?;
            return Ok(ruleset
                .with_name_sensitivity(name_sensitive)
                .released(released));
        }
        let (rules, warnings) = sources.compile()?;
        // YARA-X reads included files itself: changed since they were
        // hashed, the rules would not be those of `version` (and would be
        // cached, and their verdicts kept, under it).
        if sources.has_includes() && SourceSet::collect(source)?.version() != version {
            return Err(SignatureError::Changed(source.to_owned()));
        }
        let ruleset = Self::new(rules, version, source, started, false, warnings)?;
        if let Some(cache) = &cache {
            cache.store(ruleset.rules(), ruleset.warnings());
        }
        Ok(ruleset
            .with_name_sensitivity(name_sensitive)
            .released(released))
    }

    /// The version the ruleset at `source` would have, read without
    /// compiling: the periodic check of a serving ruleset compares it with
    /// the loaded one's.
    pub fn version_of(source: &Path) -> Result<String, SignatureError> {
        Self::look(source).map(|on_disk| on_disk.version)
    }

    /// [`Ruleset::version_of`], with the files' release time.
    pub fn look(source: &Path) -> Result<OnDisk, SignatureError> {
        reachable(source)?;
        if is_precompiled(source)? {
            // Hashed as it is read: a periodic look at a large file does
            // not hold it in memory.
            let version = files::open_regular(source, files::LEASE_WAIT)
                .and_then(|(file, _)| precompiled_version(file))
                .map_err(|e| SignatureError::io(source, e))?;
            return Ok(OnDisk {
                version,
                released: newest_modification([source]),
            });
        }
        on_compiler_stack(source, || Ok(SourceSet::collect(source)?.on_disk()))
    }

    /// Compiles the ruleset at `source` without touching any cache, as
    /// `scanserver rules check` does.
    pub fn check(source: &Path) -> Result<Ruleset, SignatureError> {
        Self::load(source, None)
    }

    fn load_precompiled(path: &Path) -> Result<Ruleset, SignatureError> {
        let started = Instant::now();
        let bytes = files::read(path, u64::MAX).map_err(|e| SignatureError::io(path, e))?;
        let rules = Rules::deserialize(&bytes).map_err(|source| SignatureError::Precompiled {
            path: path.to_owned(),
            source,
        })?;
        let version = precompiled_version(&bytes[..]).expect("reading memory does not fail");
        // Without sources, assume the rules may look at file names.
        let ruleset = Self::new(rules, version, path, started, false, vec![])?;
        Ok(ruleset
            .with_name_sensitivity(true)
            .released(newest_modification([path])))
    }

    /// With its release time, when it could be read (otherwise the Unix
    /// epoch: signatures of unknown age count as outdated).
    fn released(self, released: Option<SystemTime>) -> Self {
        self.set_release_time(released.unwrap_or(SystemTime::UNIX_EPOCH));
        self
    }

    /// The files at the ruleset's source, as looked at since it loaded:
    /// when they hold this version (an update wrote them again, unchanged),
    /// their release time is the ruleset's, as it would be were the
    /// signatures loaded now.
    pub fn seen_on_disk(&self, on_disk: &OnDisk) {
        if let Some(released) = on_disk
            .released
            .filter(|_| on_disk.version == *self.version)
        {
            self.set_release_time(released);
        }
    }

    fn set_release_time(&self, released: SystemTime) {
        // Files dated ahead of the clock (copied from a host whose clock is
        // fast, or the clock set back) count as released when first seen:
        // their age grows from then, rather than stay nothing, and they
        // still come to count as outdated.
        let now = SystemTime::now();
        let released = match released > now {
            true if self.released_ms.load(Ordering::Relaxed) != 0 => return,
            true => {
                tracing::warn!(
                    version = %self.version,
                    "the signatures' files are dated ahead of this machine's clock: their age counts from now"
                );
                now
            }
            false => released,
        };
        let ms = released
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.released_ms.store(ms, Ordering::Relaxed);
    }

    fn with_name_sensitivity(mut self, name_sensitive: bool) -> Self {
        self.name_sensitive = name_sensitive;
        self
    }

    /// The ruleset of compiled `rules`; refused when no rule of theirs can
    /// match (fail closed: a scan with nothing to find is no verdict).
    fn new(
        rules: Rules,
        version: String,
        source: &Path,
        started: Instant,
        from_cache: bool,
        warnings: Vec<Diagnostic>,
    ) -> Result<Self, SignatureError> {
        if rules.iter().all(|rule| rule.is_private()) {
            return Err(SignatureError::NoRules(source.to_owned()));
        }
        // Rules compiled here declare every external; rules compiled
        // elsewhere may declare none (they see no names), but not some:
        // a scan could not set the others.
        let mut scanner = Scanner::new(&rules);
        let missing: Vec<_> = EXTERNALS
            .into_iter()
            .filter(|ident| scanner.set_global(ident, "").is_err())
            .collect();
        drop(scanner);
        if !missing.is_empty() && missing.len() < EXTERNALS.len() {
            let path = source.to_owned();
            return Err(SignatureError::SomeExternals { path, missing });
        }
        Ok(Ruleset {
            externals: missing.is_empty(),
            rule_count: rules.iter().len(),
            rules,
            version_id: version_id(&version),
            version: version.into(),
            source: source.to_owned(),
            compile_time: started.elapsed(),
            from_cache,
            warnings,
            name_sensitive: false,
            released_ms: AtomicU64::new(0),
        })
    }

    /// When the signatures were released: the newest modification time of
    /// their files.
    pub fn release_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.released_ms.load(Ordering::Relaxed))
    }

    /// The compiled rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The ruleset version (hex blake3 digest); verdicts are keyed by it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The version as a number (its first 64 bits): cache keys carry it.
    pub fn version_id(&self) -> u64 {
        self.version_id
    }

    /// The version, shared: verdicts carry it.
    pub fn version_arc(&self) -> Arc<str> {
        Arc::clone(&self.version)
    }

    /// Whether the rules declare the name-derived external variables
    /// ([`EXTERNALS`]), to be set for every scan; rules compiled elsewhere
    /// may declare none.
    pub fn declares_externals(&self) -> bool {
        self.externals
    }

    /// The number of rules, private ones included.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Where the ruleset was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// How long compiling (or loading from the cache) took.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether the compiled rules came from the cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Whether verdicts may depend on the file's name: the sources mention
    /// the name-derived external variables (or are unknown). The verdict
    /// cache then keys verdicts by name as well as content.
    pub fn name_sensitive(&self) -> bool {
        self.name_sensitive
    }

    /// The compiler's warnings (empty when loaded from the cache).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// Logs what was loaded, and how many compiler warnings there were
    /// (each one at debug level).
    pub fn log_loaded(&self) {
        tracing::info!(
            version = self.version(),
            rules = self.rule_count(),
            from_cache = self.from_cache(),
            elapsed = ?self.compile_time(),
            "signatures loaded from {}",
            self.source().display()
        );
        if !self.warnings.is_empty() {
            tracing::warn!(
                "{} compiler warnings; `scanserver rules check {}` lists them",
                self.warnings.len(),
                self.source().display()
            );
        }
        for warning in &self.warnings {
            tracing::debug!("{warning}");
        }
    }
}

/// The version of pre-compiled rules: their bytes and the engine's version.
fn precompiled_version(content: impl io::Read) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(content)?;
    hasher.update(YARA_X_VERSION.as_bytes());
    Ok(hasher.finalize().to_hex().to_string())
}

fn is_precompiled(path: &Path) -> Result<bool, SignatureError> {
    if path.is_dir() {
        return Ok(false);
    }
    let mut head = [0u8; SERIALIZED_MAGIC.len()];
    let n = open_regular(path, LEASE_WAIT)
        .and_then(|(f, _)| io::Read::read(&mut io::Read::take(f, head.len() as u64), &mut head))
        .map_err(|e| SignatureError::io(path, e))?;
    Ok(&head[..n] == SERIALIZED_MAGIC)
}

/// The most a rule source file may hold: rules are text, and a larger
/// file (a disk image put in the folder by mistake) would be read whole
/// into memory.
const MAX_SOURCE_SIZE: u64 = 64 << 20;

/// A ruleset version as a number: its first 64 bits, which cache keys carry.
pub fn version_id(version: &str) -> u64 {
    version
        .get(..16)
        .and_then(|prefix| u64::from_str_radix(prefix, 16).ok())
        .unwrap_or(0)
}

/// One source file of a ruleset.
struct SourceFile {
    /// Path relative to the ruleset root, with `/` separators: the namespace.
    relative: String,
    path: PathBuf,
    text: Vec<u8>,
    /// The text compiled, when it differs from the file's: a top-level
    /// file's includes rewritten to the included files' absolute paths.
    /// Not in the version, which the folder's place on disk must not
    /// change (see [`SourceSet::version`]).
    compiled: Option<Vec<u8>>,
    /// The files its includes name, in order, relative to the ruleset
    /// root: what the version holds of where they lead.
    targets: Vec<String>,
    /// Compiled as a namespace of its own (`.yar`/`.yara`), or only included.
    top_level: bool,
}

/// The source files of a ruleset, in the order of their relative paths.
struct SourceSet {
    files: Vec<SourceFile>,
    /// Whether any file includes another (which YARA-X reads itself, be it
    /// only included or also compiled on its own).
    includes: bool,
}

impl SourceSet {
    /// Reads every `.yar`/`.yara` file below `source` (or `source` itself
    /// when it is a file), and every file they include.
    fn collect(source: &Path) -> Result<SourceSet, SignatureError> {
        // A file's folder is the one it lies in: reached through a link
        // (`/etc/scanserver/rules.yar` to a release's `index.yar`), it is
        // named and includes from where it lies, as a folder reached
        // through a link is.
        let canonical = source
            .canonicalize()
            .map_err(|e| SignatureError::io(source, e))?;
        let root = match source.is_dir() {
            true => canonical,
            false => canonical.parent().unwrap_or(Path::new("/")).to_owned(),
        };
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        let walk = WalkDir::new(source)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            // Hidden entries are not the ruleset's: an editor's lock file
            // (`.#rules.yar`, a link to nowhere), a `.git` folder.
            .filter_entry(|entry| entry.depth() == 0 || !hidden(entry.path()));
        for entry in walk {
            // A link is followed before it can be filtered: one to nowhere
            // comes as an error.
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if err.depth() > 0 && err.path().is_some_and(hidden) => continue,
                Err(err) => return Err(walk_error(source, err)),
            };
            // The source itself, when a file, whatever its name.
            if !(entry.depth() == 0 || is_rule_file(entry.path())) || entry.file_type().is_dir() {
                continue;
            }
            if !entry.file_type().is_file() {
                let err = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
                return Err(SignatureError::io(entry.path(), err));
            }
            // A link's target must be a rule file too: the text of any
            // other file linked in (a token, a key) would be compiled, and
            // shown by the compiler's errors.
            if entry.depth() > 0 && entry.path_is_symlink() {
                let target = entry
                    .path()
                    .canonicalize()
                    .map_err(|e| SignatureError::io(entry.path(), e))?;
                if !is_rule_file(&target) {
                    let message = format!(
                        "a link to {}, which is not a rule file (.yar, .yara): link rule files only",
                        target.display()
                    );
                    let err = io::Error::new(io::ErrorKind::InvalidInput, message);
                    return Err(SignatureError::io(entry.path(), err));
                }
            }
            let file = SourceFile::read(&root, entry.path(), true)?;
            // A link to a file of the set (`latest.yar` to `v2.yar`) is
            // that file: compiled twice, its rules would clash.
            if seen.insert(file.path.clone()) {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Err(SignatureError::Empty(source.to_owned()));
        }
        let mut set = SourceSet {
            files,
            includes: false,
        };
        // A ruleset of one file lies in a folder that is not the ruleset's
        // alone (`/etc/scanserver`): it may include rule files there, and
        // nothing else (a token file, whose text a compile error would
        // show).
        set.resolve_includes(&root, source.is_file())?;
        set.check_include_depth()?;
        set.files.sort_by(|a, b| a.relative.cmp(&b.relative));
        Ok(set)
    }

    /// Refuses a top-level file below which includes nest deeper than
    /// [`MAX_INCLUDE_DEPTH`]: YARA-X reads included files itself, a level
    /// of recursion for each, and a chain of thousands (generated, or
    /// made to) overflows the stack of the thread compiling them, which
    /// aborts the server. An include cycle counts once round: YARA-X
    /// refuses it.
    fn check_include_depth(&self) -> Result<(), SignatureError> {
        let index: HashMap<&str, usize> = (self.files.iter().enumerate())
            .map(|(i, file)| (file.relative.as_str(), i))
            .collect();
        let below: Vec<Vec<usize>> = (self.files.iter())
            .map(|file| {
                file.targets
                    .iter()
                    .filter_map(|t| index.get(t.as_str()).copied())
                    .collect()
            })
            .collect();
        // The longest chain of includes below each file, found without
        // recursion (a chain may be thousands long).
        let (mut depth, mut done, mut on_way) = (
            vec![0; below.len()],
            vec![false; below.len()],
            vec![false; below.len()],
        );
        for start in 0..below.len() {
            let mut way = vec![(start, 0)];
            on_way[start] = true;
            while let Some((file, next)) = way.last_mut() {
                let file = *file;
                if let Some(&child) = below[file].get(*next) {
                    *next += 1;
                    if !done[child] && !on_way[child] {
                        on_way[child] = true;
                        way.push((child, 0));
                    }
                    continue;
                }
                let children = below[file].iter().filter(|&&child| done[child]);
                depth[file] = children.map(|&child| depth[child] + 1).max().unwrap_or(0);
                (done[file], on_way[file]) = (true, false);
                way.pop();
            }
        }
        let errors: Vec<_> = (self.files.iter().zip(&depth))
            .filter(|(file, depth)| file.top_level && **depth > MAX_INCLUDE_DEPTH)
            .map(|(file, depth)| {
                let message = format!(
                    "includes nested {depth} deep below this file (it includes a file that includes another, and so on), more than {MAX_INCLUDE_DEPTH}: include the files from fewer levels"
                );
                Diagnostic::located("include", &file.relative, &file.text, 0, message)
            })
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(SignatureError::Compile(errors)),
        }
    }

    /// The set's version, and when its files were released.
    fn on_disk(&self) -> OnDisk {
        OnDisk {
            version: self.version(),
            released: newest_modification(self.files.iter().map(|f| f.path.as_path())),
        }
    }

    /// Rewrites every top-level file's `include` to the canonical path of
    /// the included file, resolved from the including file's own folder (as
    /// YARA does; YARA-X alone would resolve it from the working directory),
    /// and adds included files to the set. An include that leaves the
    /// ruleset folder, or cannot be read, is an error. Includes are found
    /// as YARA-X's parser finds them (see [`includes`]), wherever they
    /// stand on their line: one missed would be compiled from a file the
    /// version does not cover, and could leave the folder.
    fn resolve_includes(
        &mut self,
        root: &Path,
        rule_files_only: bool,
    ) -> Result<(), SignatureError> {
        let mut errors = Vec::new();
        let mut pending: Vec<usize> = (0..self.files.len()).collect();
        let mut seen: HashSet<PathBuf> = self.files.iter().map(|f| f.path.clone()).collect();
        while let Some(index) = pending.pop() {
            let file = &self.files[index];
            let dir = file.path.parent().unwrap_or(root).to_owned();
            let mut rewritten = Vec::with_capacity(file.text.len());
            let mut copied = 0;
            let mut found = Vec::new();
            for (statement, target) in includes(&file.text) {
                let resolved = dir.join(&target).canonicalize();
                let error = |message: String| {
                    Diagnostic::located(
                        "include",
                        &file.relative,
                        &file.text,
                        statement.start,
                        message,
                    )
                };
                // A top-level file's include is written into its text with
                // the path it resolved to: a path that cannot be written so
                // would make YARA-X read another file than the one checked
                // here. (Included files' includes are left as written, and
                // YARA-X resolves them as here; it takes no path that is
                // not UTF-8, wherever it is met.)
                let unwritable = |path: &Path| {
                    path.to_str()
                        .is_none_or(|p| file.top_level && p.contains(['\\', '"']))
                };
                match resolved {
                    Ok(path) if rule_files_only && !is_rule_file(&path) => errors.push(error(
                        format!("include of {}: a ruleset of one file may include only .yar and .yara files", path.display()),
                    )),
                    Ok(path) if unwritable(&path) => errors.push(error(format!(
                        "include of {}: its path holds a backslash, a quote or bytes that are not UTF-8, which an include cannot name; rename the file or its folders",
                        path.display()
                    ))),
                    Ok(path) if path.starts_with(root) => {
                        if file.top_level {
                            let literal = path.to_string_lossy();
                            rewritten.extend_from_slice(&file.text[copied..statement.start]);
                            rewritten.extend_from_slice(format!("include \"{literal}\"").as_bytes());
                            copied = statement.end;
                        }
                        found.push((path, statement.start));
                    }
                    Ok(path) => errors.push(error(format!(
                        "include of {} leaves the ruleset folder",
                        path.display()
                    ))),
                    Err(err) => errors.push(error(format!("cannot include `{target}`: {err}"))),
                }
            }
            rewritten.extend_from_slice(&self.files[index].text[copied..]);
            if self.files[index].top_level && !found.is_empty() {
                self.files[index].compiled = Some(rewritten);
            }
            let targets = found.iter().map(|(path, _)| relative_to(root, path));
            self.files[index].targets = targets.collect();
            self.includes |= !found.is_empty();
            for (path, at) in found {
                // Seen once read: a file that cannot be read is reported at
                // every include of it.
                if seen.contains(&path) {
                    continue;
                }
                match SourceFile::read(root, &path, false) {
                    Ok(included) => {
                        seen.insert(path);
                        self.files.push(included);
                        pending.push(self.files.len() - 1);
                    }
                    // Named where it is included: the file alone may be
                    // one of many of that name.
                    Err(err) => {
                        let file = &self.files[index];
                        let message = format!("include of {}: {err}", path.display());
                        let error =
                            Diagnostic::located("include", &file.relative, &file.text, at, message);
                        errors.push(error);
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SignatureError::Compile(errors))
        }
    }

    /// The ruleset version: blake3 over the sorted relative paths and
    /// contents, whether each file is compiled on its own or only
    /// included (a folder, and one of its files that includes the others,
    /// read the same files and compile different rules), the compile
    /// profile and the engine version. The contents are the files' own,
    /// with their includes as written, and the relative paths of the files
    /// each include resolved to (a link flipped to another release makes
    /// another version): the same rules copied to another folder (a
    /// release unpacked beside the last) keep their version, their
    /// verdicts and their compiled form.
    fn version(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        for file in &self.files {
            hasher.update(file.relative.as_bytes());
            hasher.update(&[0, u8::from(file.top_level)]);
            hasher.update(&(file.text.len() as u64).to_le_bytes());
            hasher.update(&file.text);
            // (Only for a file that includes others: the versions of
            // rulesets without includes stay what they were.)
            if !file.targets.is_empty() {
                hasher.update(&(file.targets.len() as u64).to_le_bytes());
            }
            for target in &file.targets {
                hasher.update(&(target.len() as u64).to_le_bytes());
                hasher.update(target.as_bytes());
            }
        }
        hasher.update(COMPILE_PROFILE.as_bytes());
        hasher.update(YARA_X_VERSION.as_bytes());
        hasher.finalize().to_hex().to_string()
    }

    /// Whether any file includes another.
    fn has_includes(&self) -> bool {
        self.includes
    }

    /// Whether any source mentions a name-derived external variable. A
    /// mention in a comment or string counts too, which only makes the
    /// verdict cache more careful.
    fn mention_externals(&self) -> bool {
        self.files.iter().any(|file| {
            ["filename", "filepath", "extension"].iter().any(|ident| {
                file.text
                    .windows(ident.len())
                    .any(|w| w == ident.as_bytes())
            })
        })
    }

    /// Compiles the top-level files, one namespace each.
    fn compile(&self) -> Result<(Rules, Vec<Diagnostic>), SignatureError> {
        let mut compiler = Compiler::new();
        compiler.relaxed_re_syntax(true);
        for name in EXTERNALS {
            compiler
                .define_global(name, "")
                .expect("external variable names are valid identifiers");
        }
        for file in self.files.iter().filter(|f| f.top_level) {
            compiler.new_namespace(&file.relative);
            let origin = file.path.to_string_lossy();
            // Errors are collected by the compiler and read back below.
            let text = file.compiled.as_deref().unwrap_or(&file.text);
            let _ = compiler.add_source(SourceCode::from(text).with_origin(origin));
        }
        let errors: Vec<_> = compiler
            .errors()
            .iter()
            .map(Diagnostic::from_report)
            .collect();
        if !errors.is_empty() {
            return Err(SignatureError::Compile(errors));
        }
        let warnings = compiler
            .warnings()
            .iter()
            .map(Diagnostic::from_report)
            .collect();
        Ok((compiler.build(), warnings))
    }
}

impl SourceFile {
    fn read(root: &Path, path: &Path, top_level: bool) -> Result<SourceFile, SignatureError> {
        let text = files::read(path, MAX_SOURCE_SIZE).map_err(|e| SignatureError::io(path, e))?;
        let canonical = path
            .canonicalize()
            .map_err(|e| SignatureError::io(path, e))?;
        let relative = relative_to(root, &canonical);
        if let Some(at) = too_deep(&text) {
            let title = format!(
                "an expression nested more than {MAX_NESTING} levels deep (brackets, and \
                 operators one within another: `not not ...`, `1 | 2 | ...`), which YARA-X \
                 would recurse into as deep: write it flatter, with `and` or `or` between terms"
            );
            let error = Diagnostic::located("nesting", &relative, &text, at, title);
            return Err(SignatureError::Compile(vec![error]));
        }
        Ok(SourceFile {
            relative,
            path: canonical,
            text,
            compiled: None,
            targets: Vec::new(),
            top_level,
        })
    }
}

/// Whether a ruleset can be at `source`: there is none when nothing is
/// there; anything else that keeps it from being looked at (a folder the
/// server may not enter, a sandbox) is told as it is.
fn reachable(source: &Path) -> Result<(), SignatureError> {
    match fs::metadata(source) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(SignatureError::Missing(source.to_owned()))
        }
        Err(err) => Err(SignatureError::io(source, err)),
    }
}

/// `path` relative to `root` (whole, when outside it), with `/` separators.
fn relative_to(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Whether `path` names a rule file: `.yar` or `.yara`.
fn is_rule_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext == "yar" || ext == "yara")
}

/// Whether the entry at `path` is hidden: its name begins with a dot.
fn hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."))
}

/// An entry of the ruleset's folder that cannot be walked, told as what to
/// do about it when it is a symbolic link to nowhere (or to itself).
fn walk_error(source: &Path, err: walkdir::Error) -> SignatureError {
    let path = err.path().unwrap_or(source).to_owned();
    let is_link = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    let err = io::Error::from(err);
    let err = if is_link {
        let message = format!(
            "{err}; it is a symbolic link whose target cannot be read: remove it, or mend its target"
        );
        io::Error::new(err.kind(), message)
    } else {
        err
    };
    SignatureError::io(&path, err)
}

/// The deepest an expression of a rule may nest: brackets, and operators
/// one within another, counted together (see [`too_deep`]). YARA-X's
/// parser and compiler recurse once a level with no bound of their own
/// (but for regular expressions, held to 250): a rule nested tens of
/// thousands deep, generated or broken, would overflow the stack of the
/// thread compiling it, which aborts the whole server. Real rules nest a
/// few levels.
const MAX_NESTING: usize = 1000;

/// The deepest includes may nest below a top-level file: libyara allows
/// 16; see [`SourceSet::check_include_depth`].
const MAX_INCLUDE_DEPTH: usize = 32;

/// The stack of the thread a ruleset is parsed and compiled on (see
/// [`on_compiler_stack`]): room for [`MAX_NESTING`] levels many times over
/// (a level takes well under a KiB). Only the pages used are committed.
const COMPILER_STACK: usize = 64 << 20;

/// Runs `f` (a parse or a compile of rules) on a thread of its own with a
/// stack of [`COMPILER_STACK`], whichever thread asks: a runtime's thread
/// (a reload) has a stack of 2 MiB, the main thread (a start, `scanserver
/// rules check`) one of 8 MiB, and the compile must not depend on it. A
/// panic in `f` goes on in the caller.
fn on_compiler_stack<T: Send>(
    source: &Path,
    f: impl FnOnce() -> Result<T, SignatureError> + Send,
) -> Result<T, SignatureError> {
    std::thread::scope(|scope| {
        let compiler = std::thread::Builder::new()
            .name("rules".into())
            .stack_size(COMPILER_STACK)
            .spawn_scoped(scope, f)
            .map_err(|err| SignatureError::io(source, err))?;
        compiler
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Where `text` first nests deeper than [`MAX_NESTING`], if it does,
/// counted as YARA-X's parser and compiler would recurse, or more: every
/// open bracket (of conditions, hex strings and rule bodies alike), and
/// every operator since the last `and`, `or` or `,` at the same bracket (or
/// the rule section's start), unary (`not`, `defined`, `-`, `~`) or binary
/// (`==`, `|`, `<<`, `contains` ...: a chain of most binary operators
/// builds one node inside the other), each byte of `---` or `==` one.
/// Comments, text strings and regular expressions are passed over (YARA-X
/// holds the latter to 250 levels itself); a hex string counts its
/// brackets (its alternatives nest), not its `|`, `~` and `-`.
fn too_deep(text: &[u8]) -> Option<usize> {
    const OPERATOR_WORDS: [&[u8]; 13] = [
        b"not",
        b"defined",
        b"contains",
        b"icontains",
        b"startswith",
        b"istartswith",
        b"endswith",
        b"iendswith",
        b"iequals",
        b"matches",
        b"of",
        b"in",
        b"at",
    ];
    let is_operator = |b: u8| b"+-*\\%&|^~<>=!".contains(&b);
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut nesting = Nesting::default();
    // After `=` may come a hex string (a string's definition), whose
    // alternatives nest, but whose `|`, `~` and `-` are no operators. (A
    // `/` that begins no comment begins a regular expression, wherever it
    // stands: YARA divides with `\`.)
    let mut hex_next = false;
    // The bracket level of the hex string being read, if one is.
    let mut hex_at = None;
    let mut at = 0;
    while at < text.len() {
        let (byte, next) = (text[at], text.get(at + 1).copied());
        let mut hex_after = false;
        let mut operators = 0;
        match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                at += 1;
                continue;
            }
            b'/' if next == Some(b'/') => {
                at = skip_to(text, at, b"\n") + 1;
                continue;
            }
            b'/' if next == Some(b'*') => {
                at = skip_to(text, at + 2, b"*/") + 1;
                continue;
            }
            b'"' => at = skip_quoted(text, at, b'"'),
            b'/' => at = skip_quoted(text, at, b'/'),
            b'(' | b'[' | b'{' => {
                nesting.open();
                if byte == b'{' && hex_next {
                    hex_at = Some(nesting.levels());
                }
            }
            b')' | b']' | b'}' => {
                if hex_at == Some(nesting.levels()) {
                    hex_at = None;
                }
                nesting.close();
            }
            // Items of a list, each an operand. (A `:` ends no operand: a
            // `for` or `with` body lies within the operators before it.)
            b',' => nesting.end_operand(),
            b if is_word(b) && !b.is_ascii_digit() => {
                let end = run_end(text, at, is_word);
                let word = &text[at..end];
                // An operand ends at `and` or `or`, and a rule's section
                // begins anew.
                if [&b"and"[..], b"or", b"meta", b"strings", b"condition"].contains(&word) {
                    nesting.end_operand();
                }
                operators = usize::from(OPERATOR_WORDS.contains(&word));
                at = end - 1;
            }
            b if is_operator(b) => {
                let end = run_end(text, at, is_operator);
                // `=` alone defines (a string, a meta entry): no operator.
                // Otherwise each byte counts: `---x` is three operators
                // one within another, as `- - - x` is.
                hex_after = &text[at..end] == b"=";
                operators = if hex_after { 0 } else { end - at };
                at = end - 1;
            }
            _ => {}
        }
        if hex_at.is_none() {
            nesting.operators(operators);
        }
        if nesting.depth > MAX_NESTING {
            return Some(at);
        }
        hex_next = hex_after;
        at += 1;
    }
    None
}

/// What [`too_deep`] counts: the brackets open, and the operators counted
/// at each (the outermost level, outside any bracket, first).
struct Nesting {
    operators: Vec<usize>,
    /// The brackets open and the operators at every level, together.
    depth: usize,
}

impl Default for Nesting {
    fn default() -> Self {
        Nesting {
            operators: vec![0],
            depth: 0,
        }
    }
}

impl Nesting {
    fn levels(&self) -> usize {
        self.operators.len()
    }

    fn open(&mut self) {
        self.operators.push(0);
        self.depth += 1;
    }

    /// Closes the innermost bracket, with its operators; one closing none
    /// (the text does not parse) is passed over.
    fn close(&mut self) {
        if self.levels() > 1 {
            self.depth -= 1 + self.operators.pop().unwrap_or_default();
        }
    }

    fn operators(&mut self, count: usize) {
        *self
            .operators
            .last_mut()
            .expect("the outermost level stays") += count;
        self.depth += count;
    }

    /// An operand ended at the innermost level: its operators are over.
    fn end_operand(&mut self) {
        let level = self
            .operators
            .last_mut()
            .expect("the outermost level stays");
        self.depth -= std::mem::take(level);
    }
}

/// The end of the run of bytes `within` from `at` on.
fn run_end(text: &[u8], at: usize, within: impl Fn(u8) -> bool) -> usize {
    text[at..]
        .iter()
        .position(|&b| !within(b))
        .map_or(text.len(), |n| at + n)
}

/// The offset of the last byte of the first `end` in `text` from `from`
/// on (the end of `text` if there is none).
fn skip_to(text: &[u8], from: usize, end: &[u8]) -> usize {
    let from = from.min(text.len());
    text[from..]
        .windows(end.len())
        .position(|w| w == end)
        .map_or(text.len(), |n| from + n + end.len() - 1)
}

/// The offset of the `quote` that closes the one at `open` (`\` escapes
/// the next byte), or of the line's end (neither a string nor a regular
/// expression goes on past it), or of the end of `text`.
fn skip_quoted(text: &[u8], open: usize, quote: u8) -> usize {
    let mut at = open + 1;
    while at < text.len() && text[at] != quote && text[at] != b'\n' {
        at += 1 + usize::from(text[at] == b'\\');
    }
    at.min(text.len())
}

/// The `include` statements of `text`, as YARA-X's parser finds them:
/// where each stands (from `include` to the file name's closing quote),
/// and the file name. Comments are not statements; a file that does not
/// parse still gives those it has (the compiler reports the rest).
fn includes(text: &[u8]) -> Vec<(std::ops::Range<usize>, String)> {
    use yara_x_parser::ast::{AST, Item, WithSpan};
    AST::from(text)
        .items()
        .filter_map(|item| match item {
            Item::Include(include) => Some((include.span().range(), include.file_name.to_owned())),
            _ => None,
        })
        .collect()
}

/// Compiled rules on disk, one checksummed file per ruleset version, with
/// the compiler's warnings (a ruleset loaded from the cache reports them as
/// one compiled anew does). Layout: the blake3 digest of the version and
/// the rest, the length of the warnings (u32, little-endian), the warnings
/// as JSON, the rules as YARA-X serializes them. A file of another layout,
/// or of another version (copied or restored under this one's name),
/// fails its checksum and is compiled again: rules taken for another
/// version's would have their verdicts cached as that version's.
struct RulesCache {
    path: PathBuf,
    version: String,
}

impl RulesCache {
    fn new(dir: &Path, version: &str) -> Self {
        RulesCache {
            path: dir.join(format!("{version}.yarc")),
            version: version.to_owned(),
        }
    }

    /// The checksum of `rest`, a file's content after it, for this version.
    fn checksum(&self, rest: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.version.as_bytes());
        hasher.update(rest);
        hasher.finalize()
    }

    /// The cached rules and their warnings, if present and intact, in a
    /// folder no other user can write to (they hold native code). A
    /// damaged file is removed.
    fn load(&self) -> Option<(Rules, Vec<Diagnostic>)> {
        let dir = self.path.parent().expect("cache file has a folder");
        if let Err(err) = crate::state::private_dir(dir) {
            tracing::warn!("compiled-rules cache not used: {err}");
            return None;
        }
        let bytes = fs::read(&self.path).ok()?;
        let rules = bytes
            .split_at_checked(blake3::OUT_LEN)
            .filter(|(sum, rest)| self.checksum(rest).as_bytes() == *sum)
            .and_then(|(_, rest)| {
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let (warnings, payload) =
                    rest.split_at_checked(u32::from_le_bytes(*len) as usize)?;
                let warnings = serde_json::from_slice(warnings).ok()?;
                Some((Rules::deserialize(payload).ok()?, warnings))
            });
        if rules.is_none() {
            tracing::warn!(path = %self.path.display(), "damaged compiled-rules cache file; compiling again");
            let _ = fs::remove_file(&self.path);
        }
        rules
    }

    /// Stores compiled rules atomically (write to a temporary file, then
    /// rename). Failing to cache is logged, not fatal.
    fn store(&self, rules: &Rules, warnings: &[Diagnostic]) {
        if let Err(err) = self.try_store(rules, warnings) {
            tracing::warn!(path = %self.path.display(), %err, "cannot cache compiled rules");
        }
    }

    fn try_store(&self, rules: &Rules, warnings: &[Diagnostic]) -> io::Result<()> {
        let dir = self.path.parent().expect("cache file has a folder");
        crate::state::private_dir(dir)?;
        let warnings = serde_json::to_vec(warnings)?;
        let len = u32::try_from(warnings.len()).map_err(io::Error::other)?;
        let mut rest = len.to_le_bytes().to_vec();
        rest.extend_from_slice(&warnings);
        rest.extend_from_slice(&rules.serialize().map_err(io::Error::other)?);
        let mut file = tempfile::Builder::new()
            .prefix(TEMPORARY_PREFIX)
            .tempfile_in(dir)?;
        file.write_all(self.checksum(&rest).as_bytes())?;
        file.write_all(&rest)?;
        file.as_file().sync_all()?;
        file.persist(&self.path)?;
        Self::prune(dir);
        Ok(())
    }

    /// Keeps the [`KEPT_VERSIONS`] newest compiled rulesets of the folder
    /// (each signatures update adds one), and removes what a store cut
    /// short left behind. Only files named as this cache names them: the
    /// folder may hold others'.
    fn prune(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let mut compiled = Vec::new();
        for entry in entries.flatten() {
            let (path, name) = (entry.path(), entry.file_name());
            let modified = entry.metadata().and_then(|m| m.modified());
            let Ok(modified) = modified else { continue };
            let name = name.to_string_lossy();
            let version = name.strip_suffix(".yarc").unwrap_or_default();
            if version.len() == 64 && version.bytes().all(|b| b.is_ascii_hexdigit()) {
                compiled.push((modified, path));
            } else if name.starts_with(TEMPORARY_PREFIX) && modified < hour_ago {
                let _ = fs::remove_file(&path);
            }
        }
        compiled.sort_unstable_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        for (_, path) in compiled.into_iter().skip(KEPT_VERSIONS) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// How many compiled rulesets the rules cache keeps: enough to go back and
/// forth between a few signature sets without compiling again.
const KEPT_VERSIONS: usize = 8;

/// How the rules cache's temporary files are named, until renamed.
const TEMPORARY_PREFIX: &str = ".scanserver-tmp";

/// The newest modification time among `paths`; `None` when none can be
/// read.
fn newest_modification<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Option<SystemTime> {
    paths
        .into_iter()
        .filter_map(|path| fs::metadata(path).and_then(|m| m.modified()).ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_cache_keeps_its_newest_versions_and_nothing_of_others() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = SystemTime::UNIX_EPOCH;
        let put = |name: &str, age: u64| {
            let file = fs::File::create(dir.path().join(name)).unwrap();
            file.set_modified(epoch + Duration::from_secs(1_000_000 - age))
                .unwrap();
        };
        for age in 0..10 {
            put(&format!("{age:064x}.yarc"), age);
        }
        put("mine.yarc", 100);
        put(&format!("{TEMPORARY_PREFIX}cut"), 100);
        put(".tmp-of-another-program", 100);
        RulesCache::prune(dir.path());
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected: Vec<_> = (0..8).map(|age| format!("{age:064x}.yarc")).collect();
        expected.extend([".tmp-of-another-program".into(), "mine.yarc".into()]);
        expected.sort();
        assert_eq!(left, expected);
    }

    /// Signatures dated ahead of the clock count as released when loaded;
    /// looks at the files since do not keep their age at nothing.
    #[test]
    fn signatures_dated_ahead_of_the_clock_age_from_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yar");
        fs::write(&path, "rule a { condition: true }\n").unwrap();
        let ahead = SystemTime::now() + Duration::from_secs(365 * 86_400);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(ahead)
            .unwrap();
        let loaded = SystemTime::now();
        let ruleset = Ruleset::load(dir.path(), None).unwrap();
        let released = ruleset.release_time();
        // Kept in milliseconds.
        assert!(released + Duration::from_millis(1) > loaded && released <= SystemTime::now());
        std::thread::sleep(Duration::from_millis(20));
        ruleset.set_release_time(ahead);
        assert_eq!(ruleset.release_time(), released, "still from when loaded");
    }

    /// Nesting is counted as YARA-X would recurse: brackets, unary
    /// operators and chains of binary ones, each chain ended by `and`,
    /// `or`, `,` or `:`; what lies in comments, strings and patterns is
    /// passed over, and many strings and meta entries nest nothing.
    #[test]
    fn nesting_is_counted_as_yara_x_recurses() {
        let condition = |c: String| format!("rule r {{ condition: {c} }}");
        let deep = |c: String| too_deep(condition(c).as_bytes());
        // The rule's braces are one level.
        let n = MAX_NESTING - 1;
        assert_eq!(deep(format!("{}true", "not ".repeat(n))), None);
        assert!(deep(format!("{}true", "not ".repeat(n + 1))).is_some());
        let parens = |n| format!("{}true{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(deep(parens(n)), None);
        assert!(deep(parens(n + 1)).is_some());
        assert!(deep(format!("{}true", "not (".repeat(n / 2 + 1))).is_some());
        for operator in ["|", "==", "<<", "-", "contains"] {
            let chain = vec!["1"; n + 2].join(&format!(" {operator} "));
            assert!(deep(chain).is_some(), "{operator}");
        }
        for unary in ["-", "~", "- ", "~ "] {
            let chain = format!("{}filesize == 1", unary.repeat(n + 1));
            assert!(deep(chain).is_some(), "{unary:?}");
        }
        // A regular expression stands anywhere, its bytes no code; a
        // `for` body lies within the operators before it.
        let regex = format!(
            "pe.exports(/\"/) and {}true and pe.exports(/\"/)",
            "not ".repeat(n + 1)
        );
        assert!(deep(regex).is_some());
        let closing = format!("{}pe.exports(/\\){{2}}/) and true", "(".repeat(n));
        assert!(deep(closing).is_some());
        let loops = format!("{}for any i in (0..1) : ( true )", "not ".repeat(n));
        assert!(deep(loops).is_some());
        let hex = |n| {
            format!(
                "rule r {{ strings: $a = {{ {}AA{} }} condition: $a }}",
                "( ".repeat(n),
                " )".repeat(n)
            )
        };
        assert_eq!(too_deep(hex(n - 2).as_bytes()), None);
        assert!(too_deep(hex(n).as_bytes()).is_some());
        let text = condition(format!("{}true", "not /**/ ".repeat(n + 1)));
        assert_eq!(
            too_deep(text.as_bytes()),
            Some(text.rfind("not").unwrap() + 2)
        );
        // Side by side, not nested.
        let flat = ["not true", "1 | 2 == 3", "(not true)"]
            .map(|term| vec![term; 2 * MAX_NESTING].join(" and "))
            .join(" or ");
        assert_eq!(deep(flat), None);
        let o = "(".repeat(2 * MAX_NESTING);
        let alternatives = vec!["~AA"; 2 * MAX_NESTING].join(" | ");
        let passed_over = format!(
            "rule r {{\n meta: {meta}\n strings: $a = \"{o}\\\"{o}\" $b = /{o}\\/{o}/ \
             $c = {{ 4D ( {alternatives} ) [1-2] 5A }}\n {strings}\n \
             condition: $a and $b matches /{o}/ and {terms}\n}} // {o}\n/* {o}\n*/",
            meta = (0..2 * MAX_NESTING)
                .map(|i| format!("m{i} = {i}"))
                .collect::<Vec<_>>()
                .join(" "),
            strings = (0..2 * MAX_NESTING)
                .map(|i| format!("$s{i} = \"{i}\""))
                .collect::<Vec<_>>()
                .join(" "),
            terms = vec!["$c"; 2 * MAX_NESTING].join(", "),
        );
        assert_eq!(too_deep(passed_over.as_bytes()), None);
    }

    #[test]
    fn include_statements_are_found_as_yara_x_parses_them() {
        let found = |text: &str| {
            includes(text.as_bytes())
                .into_iter()
                .map(|(at, target)| (text[at].to_owned(), target))
                .collect::<Vec<_>>()
        };
        let statement = |text: &str, target: &str| (text.to_owned(), target.to_owned());
        assert_eq!(
            found("include \"a.yar\"\n"),
            [statement("include \"a.yar\"", "a.yar")]
        );
        assert_eq!(
            found("/* x */ include   \"../b.yara\" rule r { condition: true }"),
            [statement("include   \"../b.yara\"", "../b.yara")]
        );
        assert_eq!(found("// include \"a.yar\"\n/* include \"b.yar\" */"), []);
        assert_eq!(found("rule included { condition: true }"), []);
    }

    /// A file compiled on its own and included by another too is read
    /// again by YARA-X: the ruleset has includes, to be checked for
    /// changes after compiling.
    #[test]
    fn a_file_both_compiled_and_included_counts_as_an_include() {
        let dir = tempfile::tempdir().unwrap();
        let rule = |name: &str| format!("rule {name} {{ condition: true }}\n");
        fs::write(dir.path().join("b.yar"), rule("b")).unwrap();
        let set = SourceSet::collect(dir.path()).unwrap();
        assert!(!set.has_includes());
        let including = format!("include \"b.yar\"\n{}", rule("a"));
        fs::write(dir.path().join("a.yar"), including).unwrap();
        let set = SourceSet::collect(dir.path()).unwrap();
        assert!(set.files.iter().all(|file| file.top_level));
        assert!(set.has_includes());
    }
}
