//! Certificates for tests that rotate or choose certificates: a CA that
//! issues server certificates on demand, atomic replacement of the files a
//! gateway serves, and TLS clients that report the certificate they were
//! shown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

/// A CA kept in memory so that it can issue more certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what clients trust.
    pub pem: String,
}

/// A server certificate and its key.
#[derive(Clone)]
pub struct Issued {
    /// Leaf then CA, PEM.
    pub cert_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf's DER: what a client sees as the end-entity certificate.
    pub leaf_der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgw test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A fresh key and a certificate for `names` (DNS names or IPs).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("test"));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            leaf_der: cert.der().to_vec(),
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `contents` to `path` the way a careful deployment tool does:
/// into a temporary file beside it, then renamed over it (a reader sees
/// the old file or the new one, never half of one).
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Replaces a served pair: the key first, then the certificate.
pub fn install(issued: &Issued, cert: &Path, key: &Path) {
    replace_file(key, &issued.key_pem);
    replace_file(cert, &issued.cert_pem);
}

/// A client TLS configuration trusting the CAs in `ca_pems`, or with
/// `None` accepting any certificate (to see what the server presents for
/// a name none of its certificates is valid for); every handshake is a
/// full one.
pub fn client_config(ca_pems: Option<&[&str]>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut cfg = match ca_pems {
        Some(pems) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for pem in pems {
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed session shows the certificate of the handshake it resumes,
    // not the one the server serves now.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// A full TLS handshake with `addr`, sending `sni` (or no SNI); returns
/// the end-entity certificate the server presented, or the handshake's
/// error.
pub async fn presented(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let (cfg, name) = match sni {
        Some(n) => (cfg.clone(), ServerName::try_from(n.to_owned()).unwrap()),
        None => {
            // rustls sends no SNI for an IP address, and with SNI off.
            let mut c = (**cfg).clone();
            c.enable_sni = false;
            (Arc::new(c), ServerName::try_from("localhost").unwrap())
        }
    };
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    Ok(conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default())
}

/// Accepts every certificate (signatures are still checked).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
