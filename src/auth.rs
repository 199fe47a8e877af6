//! Bearer tokens: what the admin service may ask of operator commands, and
//! an Integration Server of the SVM's reports.
//!
//! A token is read from a file, never taken on a command line, where every
//! user of the machine could read it in the process list. It travels in
//! the `authorization` metadata as `Bearer <token>` (that exact spelling),
//! marked sensitive so that it is neither logged nor kept in HTTP/2 header
//! tables. The side that checks compares in constant time, so that the
//! time of a refusal does not tell how much of a guess was right (only
//! whether its length was). A token authenticates; it does not encrypt:
//! without TLS, whoever sees the traffic sees the token. The admin token
//! is read again on SIGHUP, the reporting token before each report: a
//! rotated token is used without a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwapOption;
use subtle::ConstantTimeEq;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

use crate::files;

/// The most a token file may hold: a token is a line of text.
const TOKEN_FILE_LIMIT: u64 = 64 << 10;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("the token in {} is not printable ASCII without spaces", path.display())]
    Invalid { path: PathBuf },
}

/// A bearer token, as the `authorization` value that carries it.
#[derive(Debug, Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    /// The token in the file at `path`, surrounding white space trimmed.
    /// A file others may read is used, with a warning: anyone who can read
    /// it can change security tags.
    pub fn read(path: &Path) -> Result<BearerToken, TokenError> {
        BearerToken::parse(&BearerToken::read_file(path)?, path)
    }

    /// What the token file at `path` holds, unchecked (see
    /// [`BearerToken::parse`]).
    pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TokenError> {
        files::read(path, TOKEN_FILE_LIMIT).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// The token in `bytes`, read from the file at `path`, as
    /// [`BearerToken::read`] takes it (with its warning when any user may
    /// read the file, which is looked at).
    pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<BearerToken, TokenError> {
        use std::os::unix::fs::PermissionsExt;
        let path_buf = || path.to_owned();
        // Its group may read it: that is how operators share one token
        // (mode 640, their group's).
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.permissions().mode() & 0o004 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", metadata.permissions().mode() & 0o777),
                "the token file may be read by any user; make it readable by its owner (and the operators' group) alone (chmod 600, or 640)"
            );
        }
        match std::str::from_utf8(bytes).map(str::trim) {
            Ok("") => Err(TokenError::Empty { path: path_buf() }),
            Ok(token) => {
                BearerToken::new(token).ok_or_else(|| TokenError::Invalid { path: path_buf() })
            }
            Err(_) => Err(TokenError::Invalid { path: path_buf() }),
        }
    }

    /// `token` as a bearer token; `None` unless it is printable ASCII
    /// without spaces (what every gRPC stack carries unchanged).
    pub fn new(token: &str) -> Option<BearerToken> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        Some(BearerToken(value))
    }

    /// Adds the token to `request`.
    fn attach<T>(&self, request: &mut Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }

    /// Whether `request` carries this token; UNAUTHENTICATED, with `hint`
    /// (what the caller should do), when it does not.
    fn check<T>(&self, request: &Request<T>, hint: &str) -> Result<(), Status> {
        let given = request
            .metadata()
            .get("authorization")
            .map_or(&[][..], |value| value.as_bytes());
        match bool::from(given.ct_eq(self.0.as_bytes())) {
            true => Ok(()),
            false => Err(Status::unauthenticated(format!(
                "missing or wrong bearer token: {hint}"
            ))),
        }
    }
}

/// Adds a token, when there is one, to every request of a client.
#[derive(Debug, Clone, Default)]
pub struct SendToken(pub Option<BearerToken>);

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            token.attach(&mut request);
        }
        Ok(request)
    }
}

/// Refuses, on a server, every request without the token (when there is
/// one), telling the caller `hint`.
#[derive(Debug, Clone)]
pub struct RequireToken {
    pub token: RequiredToken,
    pub hint: &'static str,
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &*self.token.0.load() {
            Some(token) => token.check(&request, self.hint).map(|()| request),
            None => Ok(request),
        }
    }
}

/// The token a [`RequireToken`] asks for (none: it asks for none), shared
/// with whoever replaces it (the admin token file, read again on SIGHUP).
#[derive(Debug, Clone)]
pub struct RequiredToken(Arc<ArcSwapOption<BearerToken>>);

impl RequiredToken {
    pub fn new(token: Option<BearerToken>) -> Self {
        RequiredToken(Arc::new(ArcSwapOption::from_pointee(token)))
    }

    /// Asks for `token` from now on; false if it was asked for already.
    /// (Not atomic: for one writer, the SIGHUP task.)
    pub(crate) fn replace(&self, token: BearerToken) -> bool {
        let same = (self.0.load().as_deref()).is_some_and(|old| old.0 == token.0);
        if !same {
            self.0.store(Some(Arc::new(token)));
        }
        !same
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_trimmed_and_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        let token = BearerToken::read(&path).unwrap();
        let mut request = Request::new(());
        token.attach(&mut request);
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(token.check(&request, "").is_ok());

        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            BearerToken::read(&path),
            Err(TokenError::Empty { .. })
        ));
        for invalid in [
            "new\nline",
            "a\tb",
            "a b",
            "p\u{e4}ssword",
            "\u{feff}s3cret",
        ] {
            std::fs::write(&path, invalid).unwrap();
            let read = BearerToken::read(&path);
            assert!(
                matches!(read, Err(TokenError::Invalid { .. })),
                "{invalid:?}"
            );
        }
        assert!(!format!("{token:?}").contains("s3cret"));
        let missing = dir.path().join("missing");
        assert!(matches!(
            BearerToken::read(&missing),
            Err(TokenError::Read { .. })
        ));
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = BearerToken::new("s3cret").unwrap();
        for given in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let mut request = Request::new(());
            if let Some(given) = given {
                request
                    .metadata_mut()
                    .insert("authorization", given.parse().unwrap());
            }
            let refused = token.check(&request, "set the token").unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{given:?}");
            assert!(refused.message().contains("set the token"));
        }
    }
}
