//! Warm restarts: the cache's entries, saved to a snapshot file in the
//! server's state folder and loaded at start.
//!
//! A snapshot replaces the previous one atomically
//! ([`state::replace_file`]): a crash leaves either the old snapshot or the
//! new one, never a mix. It is written by a background task, never
//! on the scan path.
//!
//! Layout: a magic line and the format number, then protobuf messages each
//! prefixed by its length (a `Header`, then one `Entry` per verdict),
//! then the blake3 digest of everything before it. It is written and read
//! entry by entry, never whole in memory (read twice: checked from end to
//! end, then loaded). A snapshot whose digest, format, maker or signatures
//! version does not match, or with an entry that cannot be decoded, is set
//! aside (renamed `*.rejected`) with a warning, and none of it is trusted.
//!
//! The maker is this server's build ([`made_by`]). A verdict depends on
//! more than the signatures: on how the server scans (the external
//! variables it works out from a file's name, the scanner's options),
//! which the signatures version does not cover. A verdict cached under a
//! file's name by a build that worked out `filename` differently would be
//! served for that name as it stands, and a rule on the name would not be
//! heard: so an upgrade starts with a cold cache, as a signatures update
//! does.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use prost::Message;

use super::{CacheKey, SharedCache, bump};
use crate::{engine::VERDICT_REVISION, files, proto, signatures::Ruleset, state, verdict::Verdict};

const MAGIC: &[u8] = b"scanserver verdict snapshot\n";
const FORMAT: u32 = 1;

/// The snapshot's file name in the state folder.
pub const FILE_NAME: &str = "verdicts.snapshot";

#[derive(Clone, PartialEq, Message)]
struct Header {
    #[prost(string, tag = "1")]
    signatures_version: String,
    /// The build that made the verdicts (see [`made_by`]); empty in
    /// snapshots of builds before it was written, which are set aside.
    #[prost(string, tag = "2")]
    made_by: String,
}

/// This build, as a snapshot's header names its maker: the package version
/// and the verdicts revision (raised by hand with any change to how a
/// verdict is made: see [`VERDICT_REVISION`]).
pub fn made_by() -> String {
    format!(
        "scanserver {} (verdicts revision {VERDICT_REVISION})",
        env!("CARGO_PKG_VERSION")
    )
}

#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(bytes = "vec", tag = "1")]
    content: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    verdict: Option<proto::Verdict>,
}

/// Why a snapshot was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the snapshot is damaged ({0})")]
    Damaged(&'static str),
    #[error("the snapshot is of format {found}, this server reads format {FORMAT}")]
    Format { found: u32 },
    #[error("the snapshot holds verdicts of signatures {found}, not of the current ones")]
    Signatures { found: String },
    #[error(
        "the snapshot was made by another version of the server ({}), whose verdicts may not hold for this one",
        if found.is_empty() { "an earlier one" } else { found }
    )]
    MadeBy { found: String },
}

impl SharedCache {
    /// Writes every entry made with `ruleset` to `path`, atomically, and
    /// returns how many were written.
    pub fn save(&self, path: &Path, ruleset: &Ruleset) -> io::Result<u64> {
        self.save_as(path, ruleset, made_by())
    }

    fn save_as(&self, path: &Path, ruleset: &Ruleset, made_by: String) -> io::Result<u64> {
        let written = state::replace_file(path, |file| {
            let mut out = Checksummed {
                file,
                hasher: blake3::Hasher::new(),
            };
            out.write_all(MAGIC)?;
            out.write_all(&FORMAT.to_le_bytes())?;
            let header = Header {
                signatures_version: ruleset.version().to_owned(),
                made_by,
            };
            let mut message = Vec::new();
            header.encode_length_delimited(&mut message)?;
            out.write_all(&message)?;
            let mut written = 0;
            for (key, value) in self.entries.iter() {
                if key.rules != ruleset.version_id() {
                    continue;
                }
                let entry = Entry {
                    content: key.content.to_vec(),
                    verdict: Some(proto::Verdict::from(&value.verdict)),
                };
                // One no load would read (a file some hundred thousand
                // rules matched): left out, scanned again after a restart.
                if entry.encoded_len() > MAX_MESSAGE {
                    continue;
                }
                message.clear();
                entry.encode_length_delimited(&mut message)?;
                out.write_all(&message)?;
                written += 1;
            }
            let digest = out.hasher.finalize();
            out.file.write_all(digest.as_bytes())?;
            Ok(written)
        })?;
        self.counters.persisted.store(written, Ordering::Relaxed);
        Ok(written)
    }

    /// Loads the entries of the snapshot at `path` made with `ruleset`.
    /// A missing snapshot loads nothing; one that cannot be trusted is set
    /// aside (renamed `*.rejected`) and reported. The file is read as it
    /// is checked and loaded, never held whole: a snapshot is a fifth of
    /// the cache's memory, which it would add to at start. One larger than
    /// the cache's budget is not read: an entry takes more room in the
    /// cache than in the file, so a larger `cache.budget` made it, and
    /// most of what it holds would not fit (the next save replaces it).
    pub fn load(&self, path: &Path, ruleset: &Ruleset) -> Result<u64, SnapshotError> {
        let io_error = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        let (file, size) = match files::open_within(path, self.budget.max(1 << 20)) {
            Ok(opened) => opened,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(io_error(source)),
        };
        // Checked from end to end before any entry is used.
        let snapshot = Snapshot::check(file, size)
            .and_then(|snapshot| snapshot.read(ruleset, |_, _| ()).map(|()| snapshot))
            .map_err(|err| err.or_io(io_error))
            .inspect_err(|err| {
                // One that could not be read may be fine: kept.
                if !matches!(err, SnapshotError::Io { .. }) {
                    state::set_aside(path);
                }
            })?;
        let version = ruleset.version_arc();
        // Counted as held after loading: entries take more room in the
        // cache than in the file, so not all of a file within the budget
        // may fit; those that do are loaded.
        let before = self.len();
        let insert = |content, verdict| {
            let rules = ruleset.version_id();
            self.insert(CacheKey { content, rules }, verdict, &version);
        };
        // Read again, as it was checked (the state folder is the server's
        // own: a file replaced meanwhile is another inode, not this one).
        // Should this read fail (the file changed in place, a disk error),
        // the verdicts loaded are kept: each was read whole, and checked.
        let read = snapshot.read(ruleset, insert);
        let count = self.len().saturating_sub(before) as u64;
        bump(&self.counters.loaded, count);
        if let Err(err) = read {
            let err = err.or_io(io_error);
            tracing::warn!(path = %path.display(), "the snapshot could not be read to its end a second time ({err}): {count} verdicts loaded from it");
            if !matches!(err, SnapshotError::Io { .. }) {
                state::set_aside(path);
            }
        }
        Ok(count)
    }
}

/// The snapshot file being written, with the checksum of what went in.
struct Checksummed<W> {
    file: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Checksummed<W> {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.file.write_all(bytes)
    }
}

/// The largest message of a snapshot read (an entry is a digest and a
/// verdict; a larger one is not written).
const MAX_MESSAGE: usize = 16 << 20;

/// A snapshot file whose checksum holds, read from its start.
struct Snapshot {
    file: File,
    /// Its length, less the checksum.
    body: u64,
}

/// What reading a snapshot met: its damage, or an I/O error.
enum Fault {
    Snapshot(SnapshotError),
    Io(io::Error),
}

impl Fault {
    fn or_io(self, io_error: impl FnOnce(io::Error) -> SnapshotError) -> SnapshotError {
        match self {
            Fault::Snapshot(err) => err,
            Fault::Io(err) => io_error(err),
        }
    }
}

impl From<SnapshotError> for Fault {
    fn from(err: SnapshotError) -> Self {
        Fault::Snapshot(err)
    }
}

impl From<io::Error> for Fault {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            // The checksum holds: a file that ends early changed since.
            io::ErrorKind::UnexpectedEof => Fault::Snapshot(SnapshotError::Damaged("too short")),
            _ => Fault::Io(err),
        }
    }
}

impl Snapshot {
    /// Checks the checksum of the snapshot `file` of `size` bytes.
    fn check(file: File, size: u64) -> Result<Snapshot, Fault> {
        let body = size
            .checked_sub(32)
            .ok_or(SnapshotError::Damaged("too short"))?;
        let mut hasher = blake3::Hasher::new();
        let hashed = io::copy(&mut (&file).take(body), &mut hasher)?;
        if hashed < body {
            return Err(SnapshotError::Damaged("too short").into());
        }
        let mut digest = [0; 32];
        (&file).read_exact(&mut digest)?;
        if hasher.finalize() != blake3::Hash::from_bytes(digest) {
            return Err(SnapshotError::Damaged("checksum mismatch").into());
        }
        Ok(Snapshot { file, body })
    }

    /// Reads the snapshot from its start: checks its header against this
    /// build and `ruleset`, and hands each entry to `each`, in turn. The
    /// first entry that cannot be decoded fails the read.
    fn read(
        &self,
        ruleset: &Ruleset,
        mut each: impl FnMut([u8; 32], Verdict),
    ) -> Result<(), Fault> {
        let damaged = |what| Fault::Snapshot(SnapshotError::Damaged(what));
        (&self.file).seek(SeekFrom::Start(0))?;
        let mut input = BufReader::new((&self.file).take(self.body));
        let mut magic = [0; MAGIC.len()];
        input.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(damaged("not a snapshot"));
        }
        let mut format = [0; 4];
        input.read_exact(&mut format)?;
        let found = u32::from_le_bytes(format);
        if found != FORMAT {
            return Err(SnapshotError::Format { found }.into());
        }
        let mut message = Vec::new();
        let header: Header =
            next_message(&mut input, &mut message, "bad header")?.ok_or(damaged("bad header"))?;
        if header.made_by != made_by() {
            let found = header.made_by;
            return Err(SnapshotError::MadeBy { found }.into());
        }
        if header.signatures_version != ruleset.version() {
            let found = header.signatures_version;
            return Err(SnapshotError::Signatures { found }.into());
        }
        while let Some(entry) = next_message::<Entry>(&mut input, &mut message, "bad entry")? {
            let content = <[u8; 32]>::try_from(entry.content.as_slice())
                .map_err(|_| damaged("bad entry key"))?;
            let verdict = entry
                .verdict
                .as_ref()
                .ok_or(damaged("entry without verdict"))?;
            each(content, Verdict::from(verdict));
        }
        Ok(())
    }
}

/// The next length-delimited message of `input` (`what`, to say it is
/// damaged), read into `buffer`; none at the end of the input.
fn next_message<M: Message + Default>(
    input: &mut impl BufRead,
    buffer: &mut Vec<u8>,
    what: &'static str,
) -> Result<Option<M>, Fault> {
    let damaged = || Fault::Snapshot(SnapshotError::Damaged(what));
    if input.fill_buf()?.is_empty() {
        return Ok(None);
    }
    // Its length: a varint, 7 bits to a byte (5 bytes are more than
    // enough for the largest message).
    let mut len = 0u64;
    for shift in (0..35).step_by(7) {
        let mut byte = [0];
        input.read_exact(&mut byte)?;
        len |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] < 0x80 {
            if len > MAX_MESSAGE as u64 {
                return Err(damaged());
            }
            buffer.resize(len as usize, 0);
            input.read_exact(buffer)?;
            return M::decode(buffer.as_slice())
                .map(Some)
                .map_err(|_| damaged());
        }
    }
    Err(damaged())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cache::Digest,
        verdict::{Detection, Severity},
    };

    /// A state folder, the snapshot's path in it, and the shipped
    /// signatures.
    fn folder() -> (tempfile::TempDir, PathBuf, Ruleset) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ruleset = Ruleset::load(Path::new("signatures"), None).unwrap();
        (dir, path, ruleset)
    }

    /// A detection of `rule`, with `tags` tags and `threat`.
    fn detection(rule: String, tags: usize, threat: String) -> Detection {
        Detection {
            rule,
            namespace: "test.yar".into(),
            tags: vec!["tag".into(); tags],
            threat,
            severity: Severity::High,
        }
    }

    #[test]
    fn a_snapshot_made_by_another_build_is_set_aside() {
        let (dir, path, ruleset) = folder();
        let cache = SharedCache::new(1 << 20, &ruleset);
        let key = CacheKey::new(&Digest::from_bytes([7; 32]), &ruleset, None);
        cache.insert(key, Verdict::Clean, &ruleset.version_arc());
        cache.save(&path, &ruleset).unwrap();
        assert_eq!(
            SharedCache::new(1 << 20, &ruleset)
                .load(&path, &ruleset)
                .unwrap(),
            1
        );
        let without_room = SharedCache::new(0, &ruleset);
        assert_eq!(without_room.load(&path, &ruleset).unwrap(), 0, "none held");
        assert_eq!(without_room.stats().loaded, 0);

        let earlier = "scanserver 0.1.0 (verdicts revision 0)".to_owned();
        cache.save_as(&path, &ruleset, earlier.clone()).unwrap();
        let restored = SharedCache::new(1 << 20, &ruleset);
        let err = restored.load(&path, &ruleset).unwrap_err();
        assert!(matches!(err, SnapshotError::MadeBy { found } if found == earlier));
        assert!(restored.is_empty());
        assert!(!path.exists() && dir.path().join(format!("{FILE_NAME}.rejected")).exists());
    }

    /// Entries are read as they come, across the reader's buffers; and a
    /// snapshot is checked whole before any entry is used: one cut short
    /// in an entry loads none, whatever its checksum says.
    #[test]
    fn a_snapshot_is_read_as_it_comes_and_checked_before_use() {
        let (_dir, path, ruleset) = folder();
        let cache = SharedCache::new(16 << 20, &ruleset);
        let entries: Vec<_> = (0..3_000u32)
            .map(|i| {
                let mut digest = [0; 32];
                digest[..4].copy_from_slice(&i.to_le_bytes());
                let verdict = match i % 3 {
                    0 => Verdict::Clean,
                    _ => {
                        let threat = "x".repeat(i as usize % 300);
                        let detection = detection(format!("Rule_{i}"), (i % 7) as usize, threat);
                        Verdict::Infected(vec![detection; (i % 4) as usize + 1])
                    }
                };
                (digest, verdict)
            })
            .collect();
        for (digest, verdict) in &entries {
            let key = CacheKey::new(&Digest::from_bytes(*digest), &ruleset, None);
            cache.insert(key, verdict.clone(), &ruleset.version_arc());
        }
        assert_eq!(cache.save(&path, &ruleset).unwrap(), 3_000);
        assert!(std::fs::metadata(&path).unwrap().len() > 1 << 20);
        let restored = SharedCache::new(16 << 20, &ruleset);
        assert_eq!(restored.load(&path, &ruleset).unwrap(), 3_000);
        for (digest, verdict) in &entries {
            let key = CacheKey::new(&Digest::from_bytes(*digest), &ruleset, None);
            assert_eq!(&restored.get(&key).unwrap().verdict, verdict);
        }

        // Cut within its last entry, with a checksum made for what is left.
        let saved = std::fs::read(&path).unwrap();
        let mut cut = saved[..saved.len() - 32 - 10].to_vec();
        cut.extend_from_slice(blake3::hash(&cut).as_bytes());
        std::fs::write(&path, &cut).unwrap();
        let restored = SharedCache::new(16 << 20, &ruleset);
        let err = restored.load(&path, &ruleset).unwrap_err();
        assert!(matches!(err, SnapshotError::Damaged(_)), "{err}");
        assert!(restored.is_empty(), "no entry of it used");
        assert!(!path.exists(), "set aside");
    }

    /// A verdict too large for a load to read is not written: the others
    /// still load.
    #[test]
    fn a_verdict_no_load_would_read_is_left_out() {
        let (_dir, path, ruleset) = folder();
        // A cache large enough to hold it (an entry takes at most a share
        // of the budget).
        let cache = SharedCache::new(8 << 30, &ruleset);
        let huge = detection("Huge".into(), 0, "x".repeat(MAX_MESSAGE));
        let huge = Verdict::Infected(vec![huge]);
        for (byte, verdict) in [(1, huge), (2, Verdict::Clean)] {
            let key = CacheKey::new(&Digest::from_bytes([byte; 32]), &ruleset, None);
            cache.insert(key, verdict, &ruleset.version_arc());
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.save(&path, &ruleset).unwrap(), 1);
        let restored = SharedCache::new(8 << 30, &ruleset);
        assert_eq!(restored.load(&path, &ruleset).unwrap(), 1);
    }

    #[test]
    fn a_snapshot_larger_than_the_budget_is_not_read() {
        let (_dir, path, ruleset) = folder();
        std::fs::write(&path, vec![0; (1 << 20) + 1]).unwrap();
        let err = SharedCache::new(1 << 20, &ruleset)
            .load(&path, &ruleset)
            .unwrap_err();
        let SnapshotError::Io { source, .. } = &err else {
            panic!("{err}");
        };
        assert!(source.to_string().contains("more than the 1 MiB"), "{err}");
        assert!(path.exists(), "left for the next save to replace");
    }
}
