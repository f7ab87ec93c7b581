//! A host's TLS identity (`--tls-dir`: `ca.pem`, `cert.pem`, `key.pem`) and the rustls
//! configurations built from it: TLS 1.3 only, mutual authentication against the fleet CA.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::pki::{CA_CERT, CERT, KEY};

/// The ALPN protocol of the migration transport; a peer speaking anything else is refused in
/// the handshake. Bump it when the transport's framing changes incompatibly.
pub const ALPN: &[u8] = b"vkmigrate/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "Cannot read {}: issue this host's certificate with `vkmigrate pki issue --ca-dir CA_DIR \
         --name HOST --out {}` or pass the right --tls-dir",
        file.display(),
        dir.display()
    )]
    Missing {
        dir: PathBuf,
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no {what} in PEM format", file.display())]
    BadPem { file: PathBuf, what: &'static str },
    #[error(
        "{} is not a certificate issued by the fleet CA in {} (or it has expired, or is not for \
         TLS client and server use): issue it again with `vkmigrate pki issue`",
        cert.display(),
        ca.display()
    )]
    NotIssuedByCa {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("The key {} does not belong to the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("Cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("Cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// A host's TLS identity, loaded and checked: the fleet CA, this host's certificate chain and
/// key. Cheap to clone.
#[derive(Clone)]
pub struct TlsDir {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDir")
            .field("dir", &self.dir)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsDir {
    /// Load `ca.pem`, `cert.pem` and `key.pem` from `dir` and check that the certificate is
    /// currently valid, issued by that CA for client and server use, and matches the key, so
    /// that a wrong directory is reported here, naming the file, rather than as a refused
    /// handshake on the peer.
    pub fn load(dir: &Path) -> Result<TlsDir, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(CERT);
        let key_path = dir.join(KEY);
        let read = |file: &Path| {
            fs::read(file).map_err(|source| TlsError::Missing {
                dir: dir.to_path_buf(),
                file: file.to_path_buf(),
                source,
            })
        };
        let ca_pem = read(&ca_path)?;
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;

        let certs = |pem: &[u8], file: &Path| {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|_| TlsError::BadPem {
                    file: file.to_path_buf(),
                    what: "certificate",
                })?;
            if certs.is_empty() {
                return Err(TlsError::BadPem {
                    file: file.to_path_buf(),
                    what: "certificate",
                });
            }
            Ok(certs)
        };
        let cas = certs(&ca_pem, &ca_path)?;
        let chain = certs(&cert_pem, &cert_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::BadPem {
            file: key_path.clone(),
            what: "private key",
        })?;

        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|source| TlsError::NotIssuedByCa {
                cert: ca_path.clone(),
                ca: ca_path.clone(),
                source,
            })?;
        }
        let tls = TlsDir {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        };

        // Our own certificate must pass the check a peer will make of it.
        let provider = provider();
        let verifier = tls.client_verifier(&provider)?;
        let (end_entity, intermediates) = tls.chain.split_first().ok_or(TlsError::BadPem {
            file: cert_path.clone(),
            what: "certificate",
        })?;
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|source| TlsError::NotIssuedByCa {
                cert: cert_path.clone(),
                ca: ca_path.clone(),
                source,
            })?;
        let signer = provider
            .key_provider
            .load_private_key(tls.key.clone_key())
            .map_err(|source| TlsError::KeyMismatch {
                cert: cert_path.clone(),
                key: key_path.clone(),
                source,
            })?;
        rustls::sign::CertifiedKey::new(tls.chain.clone(), signer)
            .keys_match()
            .map_err(|source| TlsError::KeyMismatch {
                cert: cert_path,
                key: key_path,
                source,
            })?;
        Ok(tls)
    }

    /// The directory the identity was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn client_verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)
    }

    /// The server side: our certificate, and a client certificate signed by the fleet CA
    /// required of every peer.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = self.client_verifier(&provider)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::Config)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        // One connection per migration: no resumption, so that every connection is
        // authenticated by certificates, and no 0-RTT data.
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// The client side: our certificate as client certificate, the fleet CA as the only root.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::Config)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.resumption = Resumption::disabled();
        cfg.enable_early_data = false;
        Ok(cfg)
    }
}

/// ring, with AES-128-GCM first: it is the fastest suite on x86_64 with AES-NI (measured on
/// this machine: see the `quic` benchmark) and QUIC requires it anyway for its Initial packets.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}
