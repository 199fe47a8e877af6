//! The gRPC protocol, generated from the `.proto` files in `proto/`, and
//! the conversions between its messages and the library's types.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    cache::{CacheStats, CachedVerdict},
    engine::ScanOutcome,
    verdict::{
        Detection as LibDetection, FailReason, Failure, Severity as LibSeverity,
        Verdict as LibVerdict,
    },
};

pub mod codec;

tonic::include_proto!("scanserver.v1");
include!(concat!(env!("OUT_DIR"), "/scanserver.v1.serde.rs"));

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("scanserver_descriptor");

/// The protocol major version this build speaks.
pub const PROTOCOL_VERSION: u32 = ProtocolVersion::Current as u32;

impl From<file_request::Kind> for FileRequest {
    fn from(kind: file_request::Kind) -> Self {
        FileRequest { kind: Some(kind) }
    }
}

/// Each of a file's requests as a `FileRequest`.
macro_rules! file_requests {
    ($($request:ident => $kind:ident),*) => {$(
        impl From<$request> for FileRequest {
            fn from(request: $request) -> Self {
                file_request::Kind::$kind(request).into()
            }
        }
    )*};
}

file_requests!(FileBegin => Begin, FileChunk => Chunk, FileEnd => End, FileCancel => Cancel);

/// A Scan stream message of one request.
impl From<file_request::Kind> for ScanRequest {
    fn from(kind: file_request::Kind) -> Self {
        ScanRequest {
            requests: vec![kind.into()],
        }
    }
}

impl From<&LibVerdict> for Verdict {
    fn from(verdict: &LibVerdict) -> Self {
        let kind = match verdict {
            LibVerdict::Clean => verdict::Kind::Clean(Clean {}),
            LibVerdict::Infected(detections) => verdict::Kind::Infected(Infected {
                detections: detections.iter().map(Detection::from).collect(),
            }),
            LibVerdict::Failed(failure) => verdict::Kind::Failed(Failed {
                reason: FailureReason::from(failure.reason) as i32,
                detail: failure.detail.clone(),
            }),
        };
        Verdict { kind: Some(kind) }
    }
}

impl From<&LibDetection> for Detection {
    fn from(d: &LibDetection) -> Self {
        let severity = match d.severity {
            LibSeverity::Low => Severity::Low,
            LibSeverity::Medium => Severity::Medium,
            LibSeverity::High => Severity::High,
            LibSeverity::Critical => Severity::Critical,
        };
        Detection {
            rule: d.rule.clone(),
            namespace: d.namespace.clone(),
            tags: d.tags.clone(),
            threat: d.threat.clone(),
            severity: severity as i32,
        }
    }
}

impl From<FailReason> for FailureReason {
    fn from(reason: FailReason) -> Self {
        match reason {
            FailReason::Timeout => FailureReason::Timeout,
            FailReason::TooLarge => FailureReason::TooLarge,
            FailReason::Io => FailureReason::Io,
            FailReason::Engine => FailureReason::Engine,
        }
    }
}

impl From<&Verdict> for LibVerdict {
    /// A verdict from the wire. Anything missing or unknown reads as a
    /// failure, never as clean.
    fn from(verdict: &Verdict) -> Self {
        match &verdict.kind {
            Some(verdict::Kind::Clean(_)) => LibVerdict::Clean,
            Some(verdict::Kind::Infected(infected)) if !infected.detections.is_empty() => {
                LibVerdict::Infected(infected.detections.iter().map(LibDetection::from).collect())
            }
            Some(verdict::Kind::Failed(failed)) => {
                let reason = match failed.reason() {
                    FailureReason::Timeout => FailReason::Timeout,
                    FailureReason::TooLarge => FailReason::TooLarge,
                    FailureReason::Io => FailReason::Io,
                    FailureReason::Engine | FailureReason::Unspecified => FailReason::Engine,
                };
                LibVerdict::Failed(Failure {
                    reason,
                    detail: failed.detail.clone(),
                })
            }
            _ => LibVerdict::failed(FailReason::Engine, "the server sent no usable verdict"),
        }
    }
}

impl From<&Detection> for LibDetection {
    fn from(d: &Detection) -> Self {
        let severity = match d.severity() {
            Severity::Low => LibSeverity::Low,
            Severity::Medium => LibSeverity::Medium,
            Severity::Critical => LibSeverity::Critical,
            Severity::High | Severity::Unspecified => LibSeverity::High,
        };
        LibDetection {
            rule: d.rule.clone(),
            namespace: d.namespace.clone(),
            tags: d.tags.clone(),
            threat: d.threat.clone(),
            severity,
        }
    }
}

impl From<&CacheStats> for CacheStatistics {
    fn from(stats: &CacheStats) -> Self {
        CacheStatistics {
            entries: stats.entries,
            bytes: stats.bytes,
            budget_bytes: stats.budget,
            hits: stats.hits,
            misses: stats.misses,
            hit_ratio: stats.hit_ratio,
            coalesced_waits: stats.coalesced_waits,
            evictions: stats.evictions,
            loaded: stats.loaded,
            persisted: stats.persisted,
        }
    }
}

impl FileVerdict {
    /// The wire form of an engine outcome.
    pub fn from_outcome(outcome: &ScanOutcome) -> Self {
        FileVerdict {
            verdict: Some(Verdict::from(&outcome.verdict)),
            blake3: outcome
                .digest
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .unwrap_or_default(),
            cached: outcome.cached,
            signatures_version: outcome.rules_version.to_string(),
            scan_time_us: if outcome.cached {
                0
            } else {
                outcome.elapsed.as_micros() as u64
            },
            coalesced: outcome.coalesced,
        }
    }

    /// The wire form of a verdict the server already had (`coalesced`:
    /// from a scan under way for another request; otherwise from the
    /// cache).
    pub fn known(entry: &CachedVerdict, digest: &blake3::Hash, coalesced: bool) -> Self {
        FileVerdict {
            blake3: Bytes::copy_from_slice(digest.as_bytes()),
            signatures_version: entry.rules_version.to_string(),
            ..Self::in_lookup(entry, coalesced)
        }
    }

    /// The answer to a hash-first begin: the digest is left out (the
    /// begin's), and so is the signatures version when it is
    /// `message_version`, the one its `ScanReply` carries.
    pub fn hash_first(entry: &CachedVerdict, coalesced: bool, message_version: &str) -> Self {
        let mut verdict = Self::in_lookup(entry, coalesced);
        if *entry.rules_version != *message_version {
            verdict.signatures_version = entry.rules_version.to_string();
        }
        verdict
    }

    /// A verdict in a Lookup reply: the digest and signatures version are
    /// left out, being the request's and the reply's.
    pub fn in_lookup(entry: &CachedVerdict, coalesced: bool) -> Self {
        FileVerdict {
            verdict: Some(Verdict::from(&entry.verdict)),
            blake3: Bytes::new(),
            cached: !coalesced,
            signatures_version: String::new(),
            scan_time_us: 0,
            coalesced,
        }
    }

    /// The number of detections in the verdict.
    pub fn detection_count(&self) -> usize {
        match self.verdict.as_ref().and_then(|v| v.kind.as_ref()) {
            Some(verdict::Kind::Infected(infected)) => infected.detections.len(),
            _ => 0,
        }
    }

    /// An outcome as a client sees it: `size` is what the client knows of
    /// the file, `elapsed` what it measured, and `begun` the digest its
    /// begin gave (an answer to a hash-first begin leaves the digest out).
    /// `message_version` is the signatures version of the reply's message,
    /// for a verdict that leaves its own out; `latest` is the version of
    /// the verdicts before, shared when this one's is the same.
    pub fn to_outcome(
        &self,
        size: u64,
        elapsed: Duration,
        begun: Option<blake3::Hash>,
        message_version: &str,
        latest: &mut LatestVersion,
    ) -> ScanOutcome {
        let verdict = self
            .verdict
            .as_ref()
            .map(LibVerdict::from)
            .unwrap_or_else(|| {
                LibVerdict::failed(FailReason::Engine, "the server sent no verdict")
            });
        let version = match self.signatures_version.as_str() {
            "" => message_version,
            own => own,
        };
        ScanOutcome {
            verdict,
            size,
            digest: <[u8; 32]>::try_from(&self.blake3[..])
                .ok()
                .map(blake3::Hash::from_bytes)
                .or(begun),
            rules_version: latest.of(version),
            cached: self.cached,
            coalesced: self.coalesced,
            elapsed,
        }
    }
}

/// The signatures version of the verdicts a client received last: the same
/// string for thousands of verdicts, kept once rather than once for each.
#[derive(Debug, Default)]
pub struct LatestVersion(Option<Arc<str>>);

impl LatestVersion {
    fn of(&mut self, version: &str) -> Arc<str> {
        match &self.0 {
            Some(latest) if **latest == *version => Arc::clone(latest),
            _ => Arc::clone(self.0.insert(version.into())),
        }
    }
}
