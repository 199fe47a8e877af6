//! The agent listener's TLS (rustls): the certificate, key and client CA
//! from PEM files, checked when the server starts, and read again on
//! SIGHUP (see [`crate::server::Server::reload_on_hangup`]) and when a
//! look at them every `tls.check_interval` finds them renewed
//! ([`Tls::keep_checking`]), so that a renewed certificate (or CA) is
//! served without a restart, which would end every agent's session.
//! Connections already open keep what they were accepted with: an agent
//! whose certificate a new CA no longer admits stays connected until it
//! reconnects (or the server restarts).
//!
//! Each handshake runs on a task of its own, within 10 seconds: a client
//! that connects and never finishes its handshake neither holds its socket
//! for ever nor holds up anyone else's. A connection takes its place among
//! `server.max_connections` (see [`crate::connections`]) before its
//! handshake, which bounds the handshakes under way: silent clients hold
//! up others only once they take every place, as any flood of connections
//! would.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, ServerConfig, server::WebPkiClientVerifier},
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    config::TlsConfig,
    connections::{ACCEPTED_QUEUE, Connections, Counted},
    files, shutdown,
    status::Svm,
};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the {what} {} is not PEM: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "the private key {} is not the key of the certificate {}",
        settings.key.display(),
        settings.cert.display()
    )]
    KeyMismatch { settings: Box<TlsConfig> },
    #[error(
        "the TLS settings (certificate {}, key {}{}) are not usable",
        settings.cert.display(),
        settings.key.display(),
        settings.client_ca.as_ref().map(|ca| format!(", client CA {}", ca.display())).unwrap_or_default(),
    )]
    Unusable {
        settings: Box<TlsConfig>,
        #[source]
        error: Box<rustls::Error>,
    },
}

/// The listener's TLS settings and what they make, replaced by a reload.
pub struct Tls {
    settings: TlsConfig,
    served: ArcSwap<Served>,
    /// The digest of the files the config was made of: a reload of the
    /// same files changes nothing.
    files: Mutex<blake3::Hash>,
}

impl Tls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsConfig) -> Result<Tls, TlsError> {
        let files = Files::read(settings)?;
        Ok(Tls {
            served: ArcSwap::from_pointee(files.served(settings)?),
            files: Mutex::new(files.digest()),
            settings: settings.clone(),
        })
    }

    /// Reads the files again: when they changed, connections accepted from
    /// now on use them; false when they did not. Files that cannot be used
    /// replace nothing.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.settings)?;
        self.replace(&mut self.loaded(), files)
    }

    /// The digest of the files served, locked: reloads take their turns.
    fn loaded(&self) -> parking_lot::MutexGuard<'_, blake3::Hash> {
        self.files.lock()
    }

    /// Serves `files` from now on, unless they are those of `loaded`.
    fn replace(&self, loaded: &mut blake3::Hash, files: Files) -> Result<bool, TlsError> {
        if *loaded == files.digest() {
            return Ok(false);
        }
        self.served.store(Arc::new(files.served(&self.settings)?));
        *loaded = files.digest();
        Ok(true)
    }

    /// When the certificate chain served can be used (unknown if no
    /// validity in it can be read).
    pub fn validity(&self) -> Option<Validity> {
        self.served.load().validity
    }

    /// Reads the files again (see [`Tls::reload`]), logs the outcome and
    /// shows a failure in `svm`'s status.
    /// Blocking: files on a share may keep a read waiting (for a lease, or
    /// for the share), which must not be a runtime thread's wait.
    pub fn reload_and_report(&self, svm: &Svm) {
        self.load_and_report(|| Files::read(&self.settings), svm);
    }

    /// Serves the files `read` gives if they are new and usable, logs the
    /// outcome and shows a failure in `svm`'s status; false when they
    /// could not be used. They are read and the outcome reported under
    /// the lock, so that two reloads at once (SIGHUP, the periodic look)
    /// report in the order they ran.
    fn load_and_report(&self, read: impl FnOnce() -> Result<Files, TlsError>, svm: &Svm) -> bool {
        let mut loaded = self.loaded();
        let reloaded = read()
            .and_then(|files| self.replace(&mut loaded, files))
            .map_err(|err| crate::WithCauses(&err).to_string());
        match &reloaded {
            Ok(true) => {
                tracing::info!(cert = %self.settings.cert.display(), "TLS files read again: new connections use them")
            }
            Ok(false) => tracing::debug!("TLS files unchanged"),
            Err(err) => {
                tracing::error!(
                    "TLS files not reloaded, new connections keep the earlier ones: {err}"
                )
            }
        }
        let usable = reloaded.is_ok();
        svm.tls_reloaded(reloaded.map(|_| ()));
        usable
    }

    /// Looks at the files every `tls.check_interval` (never when it is
    /// zero), and serves new ones once two looks in a row found the same,
    /// until shutdown: a certificate that cert-manager or an ACME client
    /// renewed is served without anyone sending a SIGHUP. The files of the
    /// second look are those loaded, so a renewal caught between its
    /// certificate and its key is neither served nor reported as a
    /// failure. New files that cannot be used are reported once, and not
    /// tried again until they change, as are files that cannot be read at
    /// `UNREADABLE_LOOKS` looks in a row; a failure is cleared when the
    /// files served are found back on disk.
    pub async fn keep_checking(self: Arc<Self>, svm: Arc<Svm>, shutdown: watch::Receiver<bool>) {
        let every = self.settings.check_interval;
        if every.is_zero() {
            return;
        }
        let mut ticks = shutdown::Periodic::every(every, shutdown).await;
        let mut looks = Looks::default();
        while ticks.next().await {
            let (tls, svm) = (Arc::clone(&self), Arc::clone(&svm));
            let looked = tokio::task::spawn_blocking(move || {
                tls.look(&mut looks, &svm);
                looks
            });
            looks = looked.await.unwrap_or_else(|err| {
                tracing::error!("a look at the TLS files failed: {err}");
                Looks::default()
            });
        }
    }

    /// One look of [`Tls::keep_checking`]'s. Blocking: the files are read.
    fn look(&self, looks: &mut Looks, svm: &Svm) {
        // Files that cannot be read (being replaced, or gone) are looked at
        // again; only when they stay so (a renewal written with modes the
        // server cannot read, say) is that a failure. Read and reported
        // under the lock, as reloads report theirs: a SIGHUP's reload of
        // mended files, reported before, must not be followed by this
        // look's older failure.
        let files = {
            let _in_turn = self.loaded();
            match Files::read(&self.settings) {
                Ok(files) => {
                    looks.unreadable = 0;
                    Some(files)
                }
                Err(err) => {
                    looks.unreadable += 1;
                    if looks.unreadable == UNREADABLE_LOOKS {
                        let err = crate::WithCauses(&err).to_string();
                        tracing::error!("TLS files cannot be read, renewals are not served: {err}");
                        svm.tls_reloaded(Err(err));
                    }
                    None
                }
            }
        };
        let found = files.as_ref().map(Files::digest);
        let renewed = {
            let loaded = self.loaded();
            if found == Some(*loaded) && svm.tls_update_failure().is_some() {
                svm.tls_reloaded(Ok(()));
            }
            looks.next(found, *loaded)
        };
        let (Some(renewed), Some(files)) = (renewed, files) else {
            return;
        };
        tracing::info!(cert = %self.settings.cert.display(), "the TLS files changed on disk");
        if !self.load_and_report(|| Ok(files), svm) {
            looks.failed = Some(renewed);
        }
    }

    /// The connections accepted on `listener` that find a place in
    /// `connections` (see [`Connections::accept`]), once their handshake is
    /// done, for as long as the stream is held (tonic drops it when it
    /// stops accepting).
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        connections: Arc<Connections>,
    ) -> ReceiverStream<io::Result<Counted<TlsStream<TcpStream>>>> {
        let (accepted, incoming) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(async move {
            // Dropped with this task, which aborts the handshakes left.
            let mut handshakes = JoinSet::new();
            loop {
                let (tcp, peer, place) = tokio::select! {
                    next = connections.accept(&listener) => next,
                    Some(_) = handshakes.join_next() => continue,
                    () = accepted.closed() => return,
                };
                let acceptor = TlsAcceptor::from(Arc::clone(&self.served.load().config));
                let (accepted, connections) = (accepted.clone(), Arc::clone(&connections));
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = accepted.send(Ok(place.hold(stream))).await;
                        }
                        Ok(Err(err)) => connections.handshake_failed(peer, &err),
                        Err(_) => {
                            let why = format!("not done within {HANDSHAKE_TIMEOUT:?}");
                            connections.handshake_failed(peer, &why);
                        }
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

/// Looks in a row at files that cannot be read before that is a failure:
/// a renewal may be caught between removing and writing a file.
const UNREADABLE_LOOKS: u32 = 3;

/// What the periodic check of the files saw: the new files of its last
/// look, the last new files that could not be used, and how many looks in
/// a row could not read the files.
#[derive(Default)]
struct Looks {
    seen: Option<blake3::Hash>,
    failed: Option<blake3::Hash>,
    unreadable: u32,
}

impl Looks {
    /// Takes a look that `found` the files with this digest (none: they
    /// could not be read) while those of `loaded` are served; returns the
    /// digest of new files to load now, seen twice in a row.
    fn next(&mut self, found: Option<blake3::Hash>, loaded: blake3::Hash) -> Option<blake3::Hash> {
        let new = found.filter(|found| *found != loaded && Some(*found) != self.failed);
        let previous = std::mem::replace(&mut self.seen, new);
        let twice = new.is_some() && new == previous;
        if twice {
            self.seen = None;
        }
        new.filter(|_| twice)
    }
}

/// What the files make: the rustls configuration, and when the certificate
/// chain can be used.
struct Served {
    config: Arc<ServerConfig>,
    validity: Option<Validity>,
}

/// When a certificate chain can be used: from the last of its
/// certificates' starts to the first of their ends. Clients refuse a chain
/// outside it, whichever of its certificates is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// The validity of the certificates of `chain` that clients check: the
    /// server's own, and the intermediate CAs served with it. A root
    /// (self-signed) served after them is a trust anchor, whose validity
    /// clients do not check. A certificate that cannot be read is left out
    /// (rustls checks the certificates); `None` if none can be.
    fn of(chain: &[CertificateDer<'_>]) -> Option<Validity> {
        let time = |time: x509_parser::time::ASN1Time| {
            let seconds = u64::try_from(time.timestamp()).unwrap_or(0);
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
        };
        chain
            .iter()
            .enumerate()
            .filter_map(|(n, der)| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                let root = n > 0 && cert.subject() == cert.issuer();
                let validity = cert.validity();
                (!root).then(|| Validity {
                    not_before: time(validity.not_before),
                    not_after: time(validity.not_after),
                })
            })
            .reduce(|chain, cert| Validity {
                not_before: chain.not_before.max(cert.not_before),
                not_after: chain.not_after.min(cert.not_after),
            })
    }
}

/// The contents of the files the settings name.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The client CA's path and contents, when there is one.
    client_ca: Option<(PathBuf, Vec<u8>)>,
}

impl Files {
    fn read(settings: &TlsConfig) -> Result<Files, TlsError> {
        let read = |what, path: &Path| {
            files::read(path, files::SMALL_FILE_LIMIT).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Files {
            cert: read("certificate", &settings.cert)?,
            key: read("private key", &settings.key)?,
            client_ca: settings
                .client_ca
                .as_deref()
                .map(|ca| Ok((ca.to_owned(), read("client CA", ca)?)))
                .transpose()?,
        })
    }

    fn digest(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let ca = self.client_ca.as_ref().map_or(&[][..], |(_, ca)| ca);
        for part in [&self.cert[..], &self.key, ca] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize()
    }

    fn served(&self, settings: &TlsConfig) -> Result<Served, TlsError> {
        let certs = certificates(&self.cert).map_err(pem("certificate", &settings.cert))?;
        let validity = Validity::of(&certs);
        let config = Arc::new(self.server_config(settings, certs)?);
        Ok(Served { config, validity })
    }

    /// The rustls configuration the files make: the server's certificate
    /// chain `certs` and key, and with a client CA, a certificate from it
    /// required of every client. HTTP/2 only, as gRPC needs.
    fn server_config(
        &self,
        settings: &TlsConfig,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<ServerConfig, TlsError> {
        let unusable = |error| TlsError::Unusable {
            settings: Box::new(settings.clone()),
            error: Box::new(error),
        };
        let key =
            PrivateKeyDer::from_pem_slice(&self.key).map_err(pem("private key", &settings.key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(unusable)?;
        let builder = match &self.client_ca {
            Some((path, ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(ca).map_err(pem("client CA", path))? {
                    roots.add(cert).map_err(unusable)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| unusable(rustls::Error::General(e.to_string())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|error| match error {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    settings: Box::new(settings.clone()),
                },
                error => unusable(error),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The error of the `what` file at `path`, which is not PEM.
fn pem(what: &'static str, path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Pem { what, path, source }
}

/// The certificates of PEM `bytes`: at least one.
fn certificates(
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    let certs = CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(rustls_pki_types::pem::Error::NoItemsFound);
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_loaded_when_seen_twice_and_unusable_ones_tried_once() {
        let hash = |s: &str| blake3::hash(s.as_bytes());
        let (served, half, renewed) = (hash("served"), hash("new cert, old key"), hash("renewed"));
        let mut looks = Looks::default();
        assert_eq!(looks.next(Some(served), served), None);
        // A renewal caught half way, then done.
        assert_eq!(looks.next(Some(half), served), None);
        assert_eq!(looks.next(Some(renewed), served), None);
        assert_eq!(looks.next(None, served), None, "unreadable");
        assert_eq!(
            looks.next(Some(renewed), served),
            None,
            "not twice in a row"
        );
        assert_eq!(looks.next(Some(renewed), served), Some(renewed));
        assert_eq!(looks.next(Some(renewed), renewed), None, "loaded");
        // Files that could not be used are not tried again until they change.
        looks.failed = Some(half);
        for _ in 0..3 {
            assert_eq!(looks.next(Some(half), renewed), None);
        }
        assert_eq!(looks.next(Some(served), renewed), None);
        assert_eq!(looks.next(Some(served), renewed), Some(served));
    }
}
