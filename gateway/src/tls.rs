//! Stage 2 setup: the rustls server configuration for wss listeners.
//!
//! TLS 1.2 and 1.3 only, ALPN `http/1.1` only (fastwebsockets has no
//! WebSocket over HTTP/2), aws-lc-rs as the provider, no 0-RTT (a replayed
//! early-data message would reach the backend twice).
//!
//! # Session resumption
//!
//! A reconnecting client resumes its TLS session instead of paying a full
//! handshake (certificate signature and chain verification; in TLS 1.2 the
//! key exchange too), which matters when every phone comes back at once.
//! Resumption is stateless: the session travels in an encrypted ticket
//! (TLS 1.3 tickets, RFC 5077 tickets in TLS 1.2) under rustls' rotating
//! ticket key (`aws_lc_rs::Ticketer`: a fresh random key every 6 hours, the
//! previous one still accepted, so a ticket lives at most 12 hours). The
//! keys exist only in this process: a client landing on another instance,
//! or on this one after a restart, does a full handshake. TLS 1.2 clients
//! that offer no ticket extension resume by session id from an in-memory
//! cache of [`SESSION_CACHE_ENTRIES`].

use std::path::Path;
use std::sync::Arc;

use rustls::server::ServerSessionMemoryCache;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("tls.cert {path}: {source}")]
    Cert {
        /// The file.
        path: String,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The key file could not be read or holds no private key.
    #[error("tls.key {path}: {source}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair (for instance, key and certificate differ).
    #[error("tls.cert/tls.key rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Sessions kept for TLS 1.2 clients that resume by session id rather than
/// by ticket (rustls' default is 256). An entry is roughly 300 bytes (the
/// 32-byte id twice, the encoded session, map and queue slots), so 20,000,
/// about as many as the gateway holds sessions (`listen.max_sessions` is
/// 19,000), costs at most ~6 MiB. TLS 1.3 clients and ticket-capable TLS 1.2
/// clients do not use it.
pub(crate) const SESSION_CACHE_ENTRIES: usize = 20_000;

/// Builds the server configuration from PEM files.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.display().to_string(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(config))
}
