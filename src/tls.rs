//! The agent listener's TLS (rustls): the certificate, key and client CA
//! from PEM files, checked when the server starts, and read again on
//! SIGHUP, so that a renewed certificate (or CA) is served without a
//! restart, which would end every agent's session. Connections already
//! open keep what they were accepted with.
//!
//! Each handshake runs on a task of its own, within 10 seconds: a client
//! that connects and never finishes its handshake neither holds its socket
//! for ever nor holds up anyone else's.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, ServerConfig, server::WebPkiClientVerifier},
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{config::TlsConfig, shutdown::shut_down};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that finished their handshake and wait for the server to
/// take them.
const HANDSHAKEN_BACKLOG: usize = 64;

/// TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source} (PEM is expected)", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "the TLS settings (certificate {}, key {}{}) are not usable: {error}; check that the certificate and key are PEM and belong together, and the client CA holds a certificate",
        settings.cert.display(),
        settings.key.display(),
        settings.client_ca.as_ref().map(|ca| format!(", client CA {}", ca.display())).unwrap_or_default(),
    )]
    Unusable {
        settings: TlsConfig,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The listener's TLS settings and what they make, replaced by a reload.
pub struct Tls {
    settings: TlsConfig,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsConfig) -> Result<Tls, TlsError> {
        Ok(Tls {
            config: ArcSwap::from_pointee(server_config(settings)?),
            settings: settings.clone(),
        })
    }

    /// Reads the files again; connections accepted from now on use them.
    /// Files that cannot be used replace nothing.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The connections accepted on `listener` (Nagle's algorithm off, see
    /// `server::incoming`), once their handshake is done, until `shutdown`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (handshaken, incoming) = mpsc::channel(HANDSHAKEN_BACKLOG);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = shut_down(&mut shutdown) => return,
                    () = handshaken.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, say: wait for some to
                        // be freed rather than spin.
                        tracing::warn!("cannot accept a connection: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.config.load_full());
                let handshaken = handshaken.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = handshaken.send(Ok(stream)).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, "TLS handshake failed: {err}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

/// The rustls configuration `settings` make: the server's certificate
/// chain and key, and with a client CA, a certificate from it required of
/// every client. HTTP/2 only, as gRPC needs.
fn server_config(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let unusable = |error: Box<dyn std::error::Error + Send + Sync>| TlsError::Unusable {
        settings: settings.clone(),
        error,
    };
    let certs = certificates("certificate", &settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|source| TlsError::File {
        what: "private key",
        path: settings.key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable(e.into()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA", ca)? {
                roots.add(cert).map_err(|e| unusable(e.into()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| unusable(e.into()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| unusable(e.into()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The certificates in the PEM file at `path` (the `what` of the settings).
fn certificates(
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |source| TlsError::File {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error)?;
    match certs.is_empty() {
        true => Err(file_error(rustls_pki_types::pem::Error::NoItemsFound)),
        false => Ok(certs),
    }
}
