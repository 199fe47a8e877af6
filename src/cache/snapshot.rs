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
//! then the blake3 digest of everything before it. It is written entry by
//! entry, never whole in memory. A snapshot whose digest, format, maker or
//! signatures version does not match is set aside (renamed `*.rejected`)
//! with a warning, and never trusted.
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
    io::{self, Write},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use bytes::Buf;
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
    /// aside (renamed `*.rejected`) and reported. One larger than the
    /// cache's budget is not read: an entry takes more room in the cache
    /// than in the file, so a larger `cache.budget` made it, and reading it
    /// whole would take more memory than this cache is given (the next
    /// save replaces it).
    pub fn load(&self, path: &Path, ruleset: &Ruleset) -> Result<u64, SnapshotError> {
        let data = match files::read(path, self.budget.max(1 << 20)) {
            Ok(data) => data,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(SnapshotError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let entries = parse(&data, ruleset).inspect_err(|_| state::set_aside(path))?;
        let version = ruleset.version_arc();
        // Counted as held after loading: entries take more room in the
        // cache than in the file, so not all of a file within the budget
        // may fit; those that do are loaded.
        let before = self.len();
        for (content, verdict) in entries.map_while(Result::ok) {
            let key = CacheKey {
                content,
                rules: ruleset.version_id(),
            };
            self.insert(key, verdict, &version);
        }
        let count = self.len().saturating_sub(before) as u64;
        bump(&self.counters.loaded, count);
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

/// The entries of a snapshot, checked from end to end before any is used
/// (then decoded again as they are, rather than held all at once).
fn parse<'a>(data: &'a [u8], ruleset: &Ruleset) -> Result<Entries<'a>, SnapshotError> {
    let damaged = SnapshotError::Damaged;
    let (body, digest) = data.split_last_chunk::<32>().ok_or(damaged("too short"))?;
    if blake3::hash(body) != blake3::Hash::from_bytes(*digest) {
        return Err(damaged("checksum mismatch"));
    }
    let mut rest = body.strip_prefix(MAGIC).ok_or(damaged("not a snapshot"))?;
    if rest.len() < 4 {
        return Err(damaged("too short"));
    }
    let found = rest.get_u32_le();
    if found != FORMAT {
        return Err(SnapshotError::Format { found });
    }
    let header = Header::decode_length_delimited(&mut rest).map_err(|_| damaged("bad header"))?;
    if header.made_by != made_by() {
        return Err(SnapshotError::MadeBy {
            found: header.made_by,
        });
    }
    if header.signatures_version != ruleset.version() {
        return Err(SnapshotError::Signatures {
            found: header.signatures_version,
        });
    }
    let entries = Entries(rest);
    entries.clone().try_for_each(|entry| entry.map(drop))?;
    Ok(entries)
}

/// A snapshot's entries, decoded one by one; the first that cannot be is
/// the last.
#[derive(Clone)]
struct Entries<'a>(&'a [u8]);

impl Iterator for Entries<'_> {
    type Item = Result<([u8; 32], Verdict), SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let damaged = SnapshotError::Damaged;
        let entry = Entry::decode_length_delimited(&mut self.0)
            .map_err(|_| damaged("bad entry"))
            .and_then(|entry| {
                let content = <[u8; 32]>::try_from(entry.content.as_slice())
                    .map_err(|_| damaged("bad entry key"))?;
                let verdict = entry
                    .verdict
                    .as_ref()
                    .ok_or(damaged("entry without verdict"))?;
                Ok((content, Verdict::from(verdict)))
            });
        if entry.is_err() {
            self.0 = &[];
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Digest;

    #[test]
    fn a_snapshot_made_by_another_build_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ruleset = Ruleset::load(Path::new("signatures"), None).unwrap();
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

    #[test]
    fn a_snapshot_larger_than_the_budget_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ruleset = Ruleset::load(Path::new("signatures"), None).unwrap();
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
