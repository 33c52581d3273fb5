//! Development certificates: a throwaway CA and a `localhost` server
//! certificate signed by it, for the demo and the tests. Never for
//! production.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// PEM texts of a fresh CA and a server certificate signed by it.
pub struct DevCert {
    /// The CA certificate: what clients trust.
    pub ca_pem: String,
    /// The server certificate chain (leaf, then CA).
    pub cert_pem: String,
    /// The server's private key (PKCS#8).
    pub key_pem: String,
}

/// Makes a CA and a server certificate for `names` (DNS names or IPs).
pub fn generate(names: &[&str]) -> anyhow::Result<DevCert> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wsgw development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(DevCert {
        ca_pem: ca_cert.pem(),
        cert_pem: format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    })
}

impl DevCert {
    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(dir.join("cert.pem"), &self.cert_pem)?;
        std::fs::write(dir.join("key.pem"), &self.key_pem)?;
        Ok(())
    }
}
