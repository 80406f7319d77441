//! The development PKI `relay serve` creates on first start: a CA, the relay's server
//! certificate, client certificates for a gatekeeper network and a demo partner network, and
//! an Ed25519 device-token key for each (it also signs their users' consent records), and
//! the operator's client certificate for the control API. Real deployments configure their own (see
//! `config.rs`); this exists so the README's run command works on a fresh machine.

use std::fs;
use std::path::{Path, PathBuf};

use codec::{NetworkId, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::core::auth::NetworkEntry;

/// The gatekeeper network of the development PKI.
pub const DEV_GATEKEEPER: NetworkId = NetworkId(1);
/// The demo partner network of the development PKI.
pub const DEV_PARTNER: NetworkId = NetworkId(2);

/// Paths of the development PKI's files.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

/// (file stem, network, name, server role) of each client identity the dev PKI issues.
const CLIENTS: [(&str, NetworkId, &str, Role); 2] = [
    (
        "gatekeeper",
        DEV_GATEKEEPER,
        "gatekeeper",
        Role::GatekeeperServer,
    ),
    ("partner", DEV_PARTNER, "demo-partner", Role::PartnerServer),
];

impl DevPki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("relay.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("relay.key")
    }
    /// The operator's client certificate, for the control API's operator endpoints.
    pub fn operator_cert(&self) -> PathBuf {
        self.dir.join("operator.pem")
    }

    /// SHA-256 of the operator certificate, if this PKI has one (PKIs made before the
    /// control plane existed do not: delete `pki/` to have it made again).
    pub fn operator_fingerprint(&self) -> Option<[u8; 32]> {
        let cert = CertificateDer::from_pem_file(self.operator_cert()).ok()?;
        Some(sha256(&cert))
    }

    /// Creates the PKI under `data_dir/pki` unless it is already there, and returns it.
    pub fn ensure(data_dir: &Path) -> Result<DevPki, String> {
        let pki = DevPki {
            dir: data_dir.join("pki"),
        };
        if pki.ca_cert().exists() {
            return Ok(pki);
        }
        fs::create_dir_all(&pki.dir).map_err(|e| format!("creating {}: {e}", pki.dir.display()))?;
        pki.generate().map_err(|e| {
            format!(
                "generating the development PKI in {}: {e}",
                pki.dir.display()
            )
        })?;
        Ok(pki)
    }

    fn generate(&self) -> Result<(), Box<dyn std::error::Error>> {
        let ca_key = KeyPair::generate()?;
        let ca_params = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        // Kept (0600) so that more development identities can be issued later
        // (`DevPki::issue_client`); a real deployment's CA key never sits on the relay.
        write(&self.dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "relay");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        write(&self.ca_cert(), ca_cert.pem().as_bytes())?;
        write(&self.server_cert(), server_cert.pem().as_bytes())?;
        write(&self.server_key(), server_key.serialize_pem().as_bytes())?;
        let operator_key = KeyPair::generate()?;
        let mut operator = CertificateParams::new(Vec::<String>::new())?;
        operator
            .distinguished_name
            .push(DnType::CommonName, "relay operator");
        operator.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let operator_cert = operator.signed_by(&operator_key, &issuer)?;
        write(&self.operator_cert(), operator_cert.pem().as_bytes())?;
        write(
            &self.dir.join("operator.key"),
            operator_key.serialize_pem().as_bytes(),
        )?;
        for (stem, _, name, _) in CLIENTS {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer)?;
            write(&self.dir.join(format!("{stem}.pem")), cert.pem().as_bytes())?;
            write(
                &self.dir.join(format!("{stem}.key")),
                key.serialize_pem().as_bytes(),
            )?;
            let token_key = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| "generating an Ed25519 key")?;
            write(
                &self.dir.join(format!("{stem}-token.pk8")),
                token_key.as_ref(),
            )?;
        }
        Ok(())
    }

    /// The two networks of the development PKI, with their certificate fingerprints and
    /// token keys read from the files.
    pub fn networks(&self) -> Result<Vec<NetworkEntry>, String> {
        CLIENTS
            .iter()
            .map(|&(stem, id, name, role)| {
                let cert_path = self.dir.join(format!("{stem}.pem"));
                let cert = CertificateDer::from_pem_file(&cert_path)
                    .map_err(|e| format!("{}: {e}", cert_path.display()))?;
                let token_path = self.dir.join(format!("{stem}-token.pk8"));
                let pkcs8 =
                    fs::read(&token_path).map_err(|e| format!("{}: {e}", token_path.display()))?;
                let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
                    .map_err(|_| format!("{}: not an Ed25519 PKCS#8 key", token_path.display()))?;
                let public: [u8; 32] = key
                    .public_key()
                    .as_ref()
                    .try_into()
                    .map_err(|_| "an Ed25519 public key is 32 bytes")?;
                Ok(NetworkEntry {
                    id,
                    name: name.to_string(),
                    server_roles: vec![role],
                    cert_sha256: vec![sha256(&cert)],
                    token_public_key: Some(public),
                    client_ca_der: Vec::new(),
                })
            })
            .collect()
    }
}

/// The development CA's parameters: the same every time, so a certificate issued later with
/// the saved key names exactly the CA certificate's subject.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Article 7 Relay development CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl DevPki {
    /// Issues a client certificate named `name` from the development CA: (certificate PEM,
    /// key PEM). For development and tests that register more networks.
    pub fn issue_client(&self, name: &str) -> Result<(String, String), String> {
        let ca_key_path = self.dir.join("ca.key");
        let pem = fs::read_to_string(&ca_key_path)
            .map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        let ca_key =
            KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        let issuer = Issuer::new(ca_params().map_err(|e| e.to_string())?, ca_key);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::write(path, bytes)?;
    // Keys are secrets even in development.
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "key" || e == "pk8") {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
