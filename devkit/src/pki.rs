//! The development PKI: a CA, the relay's server certificate (for `localhost` and 127.0.0.1),
//! a client certificate per network, and an Ed25519 device-token key per network. The relay's
//! first start (`relay serve` without a config) and `loadgen` both issue theirs here and lay
//! the files out as before (see their `pki.rs`).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

fn err(e: rcgen::Error) -> String {
    e.to_string()
}

/// A CA's parameters: the same for a name every time, so a CA restored from its saved key
/// (`DevCa::from_key_pem`) names exactly the subject of the certificate first issued.
fn ca_params(common_name: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl DevCa {
    /// A new CA named `common_name`, and its self-signed certificate (PEM).
    pub fn generate(common_name: &str) -> Result<(DevCa, String), String> {
        let key = KeyPair::generate().map_err(err)?;
        let params = ca_params(common_name)?;
        let cert = params.self_signed(&key).map_err(err)?;
        let issuer = Issuer::new(params, key);
        Ok((DevCa { issuer }, cert.pem()))
    }

    /// The CA named `common_name` whose key is `key_pem` ([`DevCa::key_pem`]), to issue more
    /// certificates later.
    pub fn from_key_pem(common_name: &str, key_pem: &str) -> Result<DevCa, String> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        Ok(DevCa {
            issuer: Issuer::new(ca_params(common_name)?, key),
        })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The relay's server certificate: for `localhost` and 127.0.0.1, named `relay`.
    pub fn issue_server(&self) -> Result<Issued, String> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let mut params = CertificateParams::new(names).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, "relay");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params)
    }

    /// A client certificate named `common_name` (a network's servers, an operator).
    pub fn issue_client(&self, common_name: &str) -> Result<Issued, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    fn sign(&self, params: &CertificateParams) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh Ed25519 device-token key of a network, PKCS#8 v2 DER.
pub fn token_key() -> Result<Vec<u8>, String> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map(|document| document.as_ref().to_vec())
        .map_err(|_| "generating an Ed25519 key".to_string())
}

/// The 32-byte public key of a token key (what the relay's config lists).
pub fn token_public_key(pkcs8: &[u8]) -> Result<[u8; 32], String> {
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|_| "not an Ed25519 PKCS#8 key".to_string())?;
    key.public_key()
        .as_ref()
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_string())
}

/// A network of the relay's own development PKI (`./relay-data/pki`): its files are
/// `<stem>.pem`, `<stem>.key` and `<stem>-token.pk8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNetwork {
    pub stem: &'static str,
    pub id: u32,
    /// The client certificate's common name and the network's name.
    pub name: &'static str,
    pub gatekeeper: bool,
}

impl DevNetwork {
    /// The server role as relay configs spell it.
    pub fn server_role(&self) -> &'static str {
        if self.gatekeeper {
            "gatekeeper_server"
        } else {
            "partner_server"
        }
    }
}

/// The two networks of the relay's development PKI: a gatekeeper and a demo partner.
pub const RELAY_DEV_NETWORKS: [DevNetwork; 2] = [
    DevNetwork {
        stem: "gatekeeper",
        id: 1,
        name: "gatekeeper",
        gatekeeper: true,
    },
    DevNetwork {
        stem: "partner",
        id: 2,
        name: "demo-partner",
        gatekeeper: false,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_ca_issues_like_the_first() {
        let (ca, ca_pem) = DevCa::generate("test CA").unwrap();
        assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let server = ca.issue_server().unwrap();
        assert!(server.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = DevCa::from_key_pem("test CA", &ca.key_pem()).unwrap();
        assert_eq!(again.key_pem(), ca.key_pem());
        let client = again.issue_client("someone").unwrap();
        assert!(client.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(DevCa::from_key_pem("test CA", "not a key").is_err());
    }

    #[test]
    fn token_keys_have_32_byte_public_keys() {
        let key = token_key().unwrap();
        let public = token_public_key(&key).unwrap();
        assert_ne!(public, [0; 32]);
        assert_ne!(token_public_key(&token_key().unwrap()).unwrap(), public);
        assert!(token_public_key(&[0; 16]).is_err());
    }
}
