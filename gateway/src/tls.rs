//! Stage 2 setup: the rustls server configuration for wss listeners, and
//! loading certificate/key pairs (which `certs.rs` serves and reloads).
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

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate/key pair or the TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("{key} {path}: {source}")]
    Cert {
        /// The configuration key (`tls.cert`, `tls.certificates[0].cert`).
        key: String,
        /// The file.
        path: String,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The end-entity certificate is not a certificate webpki can parse.
    #[error("{key} {path}: the first certificate cannot be parsed: {source}")]
    Parse {
        /// The configuration key.
        key: String,
        /// The file.
        path: String,
        /// What went wrong.
        source: webpki::Error,
    },
    /// The key file could not be read or holds no private key.
    #[error("{key} {path}: {source}")]
    Key {
        /// The configuration key (`tls.key`, `tls.certificates[0].key`).
        key: String,
        /// The file.
        path: String,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair (an unsupported key, or a key that is not
    /// the certificate's).
    #[error("{pair}: certificate and key rejected: {source}")]
    Pair {
        /// The configuration keys of the pair (`tls.cert/tls.key`).
        pair: String,
        /// What rustls said.
        source: rustls::Error,
    },
    /// rustls refused the server configuration itself.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Sessions kept for TLS 1.2 clients that resume by session id rather than
/// by ticket (rustls' default is 256). An entry is roughly 300 bytes (the
/// 32-byte id twice, the encoded session, map and queue slots), so 20,000,
/// about as many as the gateway holds sessions (`listen.max_sessions` is
/// 19,000), costs at most ~6 MiB. TLS 1.3 clients and ticket-capable TLS 1.2
/// clients do not use it.
pub(crate) const SESSION_CACHE_ENTRIES: usize = 20_000;

/// Where one certificate/key pair comes from, and the configuration keys
/// that name it (for error messages).
#[derive(Debug, Clone)]
pub(crate) struct PairFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// `tls` for the default pair, `tls.certificates[i]` for the others.
    pub(crate) name: String,
}

impl PairFiles {
    /// Reads and checks the pair: PEM, an end-entity certificate webpki can
    /// parse (it is matched against SNI names later), and a private key
    /// that is the certificate's.
    pub(crate) fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let (cert_key, key_key) = (format!("{}.cert", self.name), format!("{}.key", self.name));
        let cert_err = |source| TlsError::Cert {
            key: cert_key.clone(),
            path: self.cert.display().to_string(),
            source,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(cert_err)?;
        let Some(leaf) = certs.first() else {
            return Err(cert_err(rustls_pki_types::pem::Error::NoItemsFound));
        };
        webpki::EndEntityCert::try_from(leaf).map_err(|source| TlsError::Parse {
            key: cert_key.clone(),
            path: self.cert.display().to_string(),
            source,
        })?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| TlsError::Key {
            key: key_key.clone(),
            path: self.key.display().to_string(),
            source,
        })?;
        let pair = format!("{cert_key}/{key_key}");
        let ck = CertifiedKey::from_der(certs, key, provider).map_err(|source| TlsError::Pair {
            pair: pair.clone(),
            source,
        })?;
        // from_der lets a key whose public half it cannot derive through;
        // aws-lc-rs derives it for every key type it loads, so a mismatch
        // is always caught here.
        ck.keys_match()
            .map_err(|source| TlsError::Pair { pair, source })?;
        Ok(ck)
    }
}

/// The crypto provider of every wss listener.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the server configuration around `resolver`, which picks the
/// certificate of each handshake (`certs::CertStore`).
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(config))
}
