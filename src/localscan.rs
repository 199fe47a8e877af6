//! The operator's local scan (`scanserver scan`): files and folders on this
//! machine, walked recursively and scanned in parallel by the same engine
//! the server uses.
//!
//! Folders are walked without following symbolic links (as `yr scan` and
//! clamscan do), and only regular files are scanned; a path named on the
//! command line is followed if it is a link. A folder that cannot be read is
//! reported as a failed entry, so it cannot pass for clean.

use std::{path::PathBuf, time::Duration};

use walkdir::WalkDir;

use crate::{
    engine::{Content, Engine, ScanJob, ScanOutcome},
    report::{Format, Reporter, Summary},
    verdict::{FailReason, Verdict},
};

/// Scans `paths` (files or folders) with `engine`, printing each result in
/// `format`, and returns the totals.
pub fn run(engine: &Engine, paths: &[PathBuf], format: Format) -> Summary {
    let reporter = Reporter::new(format);
    let unreadable =
        |path: PathBuf, why: String| reporter.file(&path, &unreadable_outcome(why), None);
    let files = walk(paths.to_vec(), &unreadable);
    engine.scan_all(files.map(ScanJob::file), |job, outcome| {
        if let Content::File(path) = &job.content {
            reporter.file(path, &outcome, None);
        }
    });
    reporter.finish()
}

/// The regular files below `paths`, walked in order without following
/// symbolic links (a path given itself is followed). Entries that cannot
/// be read go to `unreadable`, with why; so does a path given itself that
/// is neither a file nor a folder (a device, a FIFO: scanning it was asked
/// for, and did not happen). Such entries below a folder are left out.
pub fn walk<'a>(
    paths: Vec<PathBuf>,
    unreadable: impl Fn(PathBuf, String) + Send + Sync + 'a,
) -> impl Iterator<Item = PathBuf> + Send + 'a {
    paths
        .into_iter()
        .flat_map(|root| {
            let walk = WalkDir::new(&root)
                .follow_links(false)
                .follow_root_links(true);
            walk.into_iter().map(move |entry| {
                entry.map_err(|err| (err.path().unwrap_or(&root).to_owned(), err.to_string()))
            })
        })
        .filter_map(move |entry| match entry {
            Ok(entry) if entry.file_type().is_file() => Some(entry.into_path()),
            Ok(entry) if entry.depth() == 0 && !entry.file_type().is_dir() => {
                unreadable(entry.into_path(), "not a regular file or folder".into());
                None
            }
            Ok(_) => None,
            Err((path, why)) => {
                unreadable(path, why);
                None
            }
        })
}

/// The outcome reported for an entry that could not be read.
pub fn unreadable_outcome(why: String) -> ScanOutcome {
    let verdict = Verdict::failed(FailReason::Io, why);
    ScanOutcome::failed(verdict, 0, Duration::ZERO, "".into())
}
