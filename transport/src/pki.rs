//! The fleet PKI: one CA per fleet, one certificate per host, written as PEM files.
//!
//! A CA directory holds `ca.pem` and `ca-key.pem` (0600). A host's TLS directory holds `ca.pem`
//! (the fleet CA, to verify peers), `cert.pem` and `key.pem` (0600). Every host certificate is
//! usable both as a TLS server certificate (`listen`) and as a client certificate (`send`), and
//! carries the host's name and addresses as subject alternative names, which is what a peer
//! checks (the common name is only for people and logs). Keys are ECDSA P-256.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// File names inside a CA directory and a TLS directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

/// Default validity of a fleet CA and of a host certificate.
pub const CA_DAYS: u32 = 3650;
pub const HOST_DAYS: u32 = 825;

/// Certificates are valid from this long before their creation, for hosts whose clocks lag.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "{} already holds a CA ({}): refusing to overwrite it; choose another --ca-dir or remove \
         the old CA first (every host certificate it issued stops being trusted)",
        dir.display(),
        file.display()
    )]
    CaExists { dir: PathBuf, file: PathBuf },
    #[error(
        "{} already exists: pass --force to replace the certificate and key in {}",
        file.display(),
        dir.display()
    )]
    CertExists { dir: PathBuf, file: PathBuf },
    #[error(
        "Cannot read {}: create the CA with `vkmigrate pki init --ca-dir {}` or pass the right \
         --ca-dir",
        file.display(),
        dir.display()
    )]
    CaMissing {
        dir: PathBuf,
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a usable PEM {what}", file.display())]
    BadPem {
        file: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("The CA key {} does not belong to the CA certificate {}", key.display(), cert.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("Invalid host name {name:?} for a certificate (use a DNS name or an IP address)")]
    BadName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("Cannot {step} a certificate")]
    Generate {
        step: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("Validity of {days} days is out of range")]
    BadValidity { days: u32 },
    #[error("Cannot {step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What `init_ca` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `issue` wrote.
#[derive(Debug, Clone)]
pub struct HostFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The subject alternative names in the certificate, as text.
    pub names: Vec<String>,
}

/// A host certificate to issue.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The host's name: the certificate's common name, and a SAN (DNS name, or IP address when
    /// it parses as one).
    pub name: String,
    /// More IP address SANs.
    pub ips: Vec<IpAddr>,
    /// More DNS name SANs.
    pub dns: Vec<String>,
    pub days: u32,
}

/// Create a fleet CA in `dir` (created 0700 if missing): `ca.pem` and `ca-key.pem` (0600).
/// Refuses if either file exists.
pub fn init_ca(dir: &Path, common_name: &str, days: u32) -> Result<CaFiles, PkiError> {
    let files = CaFiles {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    if let Some(file) = first_existing(&[&files.cert, &files.key])? {
        return Err(PkiError::CaExists {
            dir: dir.to_path_buf(),
            file,
        });
    }
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "vkmigrate fleet");
    // A unique name per CA: peers find the issuer of a certificate by name, so two fleets'
    // CAs of the same name would make a certificate of the other fleet fail as a bad
    // signature rather than as an unknown issuer.
    let id = params.key_identifier(&key);
    let id: String = id.iter().take(6).map(|b| format!("{b:02x}")).collect();
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, format!("ca-{id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, days)?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            step: "self-sign the CA",
            source,
        })?;
    make_dir(dir)?;
    // The key first: a directory with a ca.pem but no key is the worse half-state.
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// Issue a certificate for a host, signed by the CA in `ca_dir`, into `out` (created 0700 if
/// missing): `ca.pem` (a copy of the CA certificate), `cert.pem` and `key.pem` (0600). Refuses
/// to replace an existing `cert.pem` or `key.pem` unless `force`.
pub fn issue(
    ca_dir: &Path,
    spec: &HostSpec,
    out: &Path,
    force: bool,
) -> Result<HostFiles, PkiError> {
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let read_ca = |file: &Path| {
        fs::read_to_string(file).map_err(|source| PkiError::CaMissing {
            dir: ca_dir.to_path_buf(),
            file: file.to_path_buf(),
            source,
        })
    };
    let ca_pem = read_ca(&ca_cert_path)?;
    let ca_key_pem = read_ca(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| PkiError::BadPem {
        file: ca_key_path.clone(),
        what: "private key",
        source,
    })?;
    let ca_der =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).map_err(|_| {
            PkiError::BadPem {
                file: ca_cert_path.clone(),
                what: "certificate",
                source: rcgen::Error::CouldNotParseCertificate,
            }
        })?;
    if !ca_key_matches(&ca_der, &ca_key) {
        return Err(PkiError::CaKeyMismatch {
            cert: ca_cert_path,
            key: ca_key_path,
        });
    }
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|source| PkiError::BadPem {
        file: ca_cert_path.clone(),
        what: "CA certificate",
        source,
    })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.name.as_str());
    let mut sans = Vec::new();
    let mut push = |san: SanType| {
        if !sans.contains(&san) {
            sans.push(san);
        }
    };
    match spec.name.parse::<IpAddr>() {
        Ok(ip) => push(SanType::IpAddress(ip)),
        Err(_) => push(SanType::DnsName(dns_name(&spec.name)?)),
    }
    for d in &spec.dns {
        push(SanType::DnsName(dns_name(d)?));
    }
    for ip in &spec.ips {
        push(SanType::IpAddress(*ip));
    }
    let names = sans.iter().map(san_text).collect();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, spec.days)?;

    let files = HostFiles {
        ca: out.join(CA_CERT),
        cert: out.join(CERT),
        key: out.join(KEY),
        names,
    };
    if !force {
        if let Some(file) = first_existing(&[&files.cert, &files.key])? {
            return Err(PkiError::CertExists {
                dir: out.to_path_buf(),
                file,
            });
        }
    }
    let key = new_key()?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            step: "sign",
            source,
        })?;
    make_dir(out)?;
    write_replace(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_replace(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write_replace(&files.ca, ca_pem.as_bytes(), 0o644)?;
    Ok(files)
}

fn dns_name(name: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    name.try_into().map_err(|source| PkiError::BadName {
        name: name.to_owned(),
        source,
    })
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// True if the public key in the certificate `der` is that of `key`.
fn ca_key_matches(der: &rustls::pki_types::CertificateDer<'_>, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData as _;
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert.public_key().raw == key.subject_public_key_info().as_slice(),
        Err(_) => false,
    }
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    if days == 0 || days > 100 * 366 {
        return Err(PkiError::BadValidity { days });
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
    Ok(())
}

/// The first of `paths` that exists: what writing them would overwrite.
fn first_existing(paths: &[&PathBuf]) -> Result<Option<PathBuf>, PkiError> {
    for p in paths {
        let exists = p.try_exists().map_err(|source| PkiError::Io {
            step: "check",
            path: p.to_path_buf(),
            source,
        })?;
        if exists {
            return Ok(Some(p.to_path_buf()));
        }
    }
    Ok(None)
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::Generate {
        step: "generate the key of",
        source,
    })
}

fn make_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            step: "create the directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Create `path` (which must not exist) with `mode`, write and sync it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |step| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { step, path, source }
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create"))?;
    // The umask may have cleared bits of `mode`; a key must not have more.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of"))?;
    f.write_all(data).map_err(io_err("write"))?;
    f.sync_all().map_err(io_err("sync"))
}

/// Write `path` through a temporary file in the same directory and rename it into place, so
/// that a reader sees the old or the new file, never half of one.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = write_new(&tmp, data, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| PkiError::Io {
            step: "rename into place",
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_host_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let files = init_ca(&ca, "test CA", 10).expect("init");
        assert!(files.cert.exists() && files.key.exists());
        let err = init_ca(&ca, "test CA", 10).expect_err("second init refused");
        assert!(matches!(err, PkiError::CaExists { .. }), "{err}");
        let spec = HostSpec {
            name: "hostb".into(),
            ips: vec!["198.18.0.2".parse().expect("ip")],
            dns: vec!["hostb.lan".into()],
            days: 10,
        };
        let out = dir.path().join("tls");
        let host = issue(&ca, &spec, &out, false).expect("issue");
        assert_eq!(
            host.names,
            ["DNS:hostb", "DNS:hostb.lan", "IP:198.18.0.2"],
            "SANs"
        );
        let err = issue(&ca, &spec, &out, false).expect_err("no overwrite");
        assert!(matches!(err, PkiError::CertExists { .. }), "{err}");
        issue(&ca, &spec, &out, true).expect("forced");
    }

    #[test]
    fn missing_ca_names_the_file_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = HostSpec {
            name: "h".into(),
            ips: Vec::new(),
            dns: Vec::new(),
            days: 1,
        };
        let err = issue(dir.path(), &spec, &dir.path().join("out"), false).expect_err("no CA");
        let msg = err.to_string();
        assert!(
            msg.contains("ca.pem") && msg.contains("vkmigrate pki init"),
            "{msg}"
        );
    }
}
