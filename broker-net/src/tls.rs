//! TLS for `mqtts` and `wss`: the server configuration read from PEM
//! files, swapped whole on reload, and the client certificate's name.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::ListenerConfig;

/// Why TLS could not be set up from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("invalid TLS settings")]
    Rustls(#[source] rustls::Error),
    /// The client CA could not be used to verify clients.
    #[error("invalid client CA")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The paths a listener's TLS is read from.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    require_certificate: bool,
}

/// A listener's current TLS configuration; cheap to clone, every clone the
/// same. [`TlsReload::reload`] reads the files again: connections accepted
/// afterwards use the new configuration, open ones keep the old.
#[derive(Clone)]
pub struct TlsReload {
    files: Arc<Files>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for TlsReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReload")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl TlsReload {
    /// Read the listener's files (it must be `mqtts` or `wss` with `cert`
    /// and `key`): what binding does, and what `broker check` uses to say
    /// whether they would load.
    pub fn load(config: &ListenerConfig) -> Result<TlsReload, TlsError> {
        let missing = |what: &str| TlsError::Content {
            path: PathBuf::new(),
            what: format!("no `{what}` configured"),
        };
        let files = Files {
            cert: config.cert.clone().ok_or_else(|| missing("cert"))?,
            key: config.key.clone().ok_or_else(|| missing("key"))?,
            client_ca: config.client_ca.clone(),
            require_certificate: config.require_certificate,
        };
        let current = Arc::new(build(&files)?);
        Ok(TlsReload {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(current)),
        })
    }

    /// Read the certificate, key and client CA again. On error the listener
    /// keeps the configuration it had.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(build(&self.files)?);
        *self.current.write() = fresh;
        Ok(())
    }

    /// The certificate file (for log lines).
    pub fn cert_path(&self) -> &Path {
        &self.files.cert
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }
}

fn build(files: &Files) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(TlsError::Rustls)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(TlsError::Verifier)?)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            path: path.to_owned(),
            what: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.to_owned(),
            what: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Content {
            path: path.to_owned(),
            what: format!("unreadable PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Content {
            path: path.to_owned(),
            what: "no PRIVATE KEY in the file".into(),
        })
}

/// The Common Name of a (verified) client certificate.
pub(crate) fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
