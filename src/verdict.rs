//! Verdicts: what the engine concludes about one content.
//!
//! A verdict is `Clean`, `Infected` with the rules that matched, or `Failed`
//! with a reason. The type is built so that a failure can never be mistaken
//! for a clean file: [`Verdict::is_clean`] is true for `Clean` only, and
//! every consumer (command-line exit status, gRPC replies, the verdict cache)
//! matches on all three cases.

use std::fmt;

use serde::Serialize;
use yara_x::MetaValue;

/// The engine's conclusion about one content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Scanned completely; no rule matched.
    Clean,
    /// At least one (non-private) rule matched.
    Infected(Vec<Detection>),
    /// The scan did not complete. Never to be taken as clean.
    Failed(Failure),
}

impl Verdict {
    /// True only for a completed scan with no match.
    pub fn is_clean(&self) -> bool {
        matches!(self, Verdict::Clean)
    }

    /// The detections of an infected verdict; empty otherwise.
    pub fn detections(&self) -> &[Detection] {
        match self {
            Verdict::Infected(detections) => detections,
            _ => &[],
        }
    }

    /// The failure of a failed verdict.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Verdict::Failed(failure) => Some(failure),
            _ => None,
        }
    }

    /// The lower-case name used in JSON output and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Infected(_) => "infected",
            Verdict::Failed(_) => "failed",
        }
    }

    /// A failed verdict with the given reason and explanation.
    pub fn failed(reason: FailReason, detail: impl Into<String>) -> Self {
        Verdict::Failed(Failure {
            reason,
            detail: detail.into(),
        })
    }
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    /// The rule identifier.
    pub rule: String,
    /// The rule's namespace: its source file relative to the ruleset root.
    pub namespace: String,
    /// The rule's tags.
    pub tags: Vec<String>,
    /// The `threat`, `threat_name` or `malware_family` meta of the rule, or
    /// the rule identifier when it has none.
    pub threat: String,
    /// How dangerous the finding is.
    pub severity: Severity,
}

impl Detection {
    /// Builds a detection from a matching YARA-X rule and its meta.
    pub(crate) fn from_rule(rule: &yara_x::Rule<'_, '_>) -> Self {
        let mut threat = None;
        let mut severity = None;
        let mut score = None;
        for (key, value) in rule.metadata() {
            match (key, value) {
                ("threat" | "threat_name" | "malware_family", MetaValue::String(s)) => {
                    threat = Some(s.to_owned())
                }
                ("severity", MetaValue::String(s)) => severity = Severity::parse(s),
                ("score", MetaValue::Integer(n)) => score = Some(n),
                _ => {}
            }
        }
        Detection {
            rule: rule.identifier().to_owned(),
            namespace: rule.namespace().to_owned(),
            tags: rule.tags().map(|t| t.identifier().to_owned()).collect(),
            threat: threat.unwrap_or_else(|| rule.identifier().to_owned()),
            severity: severity
                .or(score.map(Severity::from_score))
                .unwrap_or(Severity::High),
        }
    }
}

/// How dangerous a detection is.
///
/// Taken from a rule's `severity` meta (`low`, `medium`, `high`,
/// `critical`). Public rulesets such as signature-base carry a `score`
/// (0-100) instead, which is mapped onto the same scale. A rule that says
/// neither is `High`: it matched, and an operator should look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    fn from_score(score: i64) -> Self {
        match score {
            ..40 => Severity::Low,
            40..70 => Severity::Medium,
            70..90 => Severity::High,
            _ => Severity::Critical,
        }
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// Why a scan did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailReason,
    /// A human-readable explanation, for logs and operators.
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// The reason of a failed scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The scan ran past the per-file timeout.
    Timeout,
    /// The content is larger than the maximum scan size.
    TooLarge,
    /// The content could not be read, or changed while it was read.
    Io,
    /// The scan engine reported an error.
    Engine,
}

impl FailReason {
    /// The name used in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Timeout => "timeout",
            FailReason::TooLarge => "too_large",
            FailReason::Io => "io",
            FailReason::Engine => "engine",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_never_clean() {
        for reason in [
            FailReason::Timeout,
            FailReason::TooLarge,
            FailReason::Io,
            FailReason::Engine,
        ] {
            let verdict = Verdict::failed(reason, "x");
            assert!(!verdict.is_clean());
            assert_eq!(verdict.kind(), "failed");
        }
    }

    #[test]
    fn score_maps_onto_severity() {
        assert_eq!(Severity::from_score(10), Severity::Low);
        assert_eq!(Severity::from_score(60), Severity::Medium);
        assert_eq!(Severity::from_score(75), Severity::High);
        assert_eq!(Severity::from_score(100), Severity::Critical);
    }
}
