//! Cluster certificate authority and node certificates for mutual TLS.
//!
//! Every mosix daemon authenticates its peers with TLS client certificates
//! issued by a per-cluster CA, so only nodes holding a certificate from that
//! CA can submit jobs or push migrations. This module generates that CA and
//! the node/client certificates; it does not do TLS itself.
//!
//! All keys are ECDSA P-256 (broadly supported by rustls/webpki, small and
//! fast to generate); certificates and keys are PEM (`CERTIFICATE` and
//! PKCS#8 `PRIVATE KEY` blocks).
//!
//! # On-disk layout ([`write_cluster_pki`])
//!
//! ```text
//! <dir>/               created with mode 0700 if it does not exist
//!   ca.pem             CA certificate (mode 0644): distribute to every node
//!   ca.key             CA private key (mode 0600): keep off worker nodes if possible
//!   <node>.pem         node certificate, serverAuth + clientAuth (0644)
//!   <node>.key         node private key (0600)
//!   client.pem         CLI certificate, CN "mosix-client", clientAuth only (0644)
//!   client.key         CLI private key (0600)
//! ```
//!
//! * Node names must match `^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$` (they become
//!   file names, so anything else could escape `<dir>`), and may not be `ca`
//!   or `client`, whose files are reserved.
//! * Each node certificate carries the node name as a DNS SAN (unless it is
//!   already listed) plus the requested SANs; SANs that parse as IP
//!   addresses become IP SANs, the rest DNS SANs.
//! * Re-running is idempotent: an existing CA is reused, and existing
//!   `<name>.pem`/`<name>.key` pairs are left untouched (to change a node's
//!   SANs, delete its two files and re-run). A lone `.pem` without its
//!   `.key` (or vice versa) is an error rather than silently replaced.
//! * Every file is written atomically (temp file + fsync + rename), key
//!   first, so a crash never leaves a certificate whose key is missing.
//!
//! # Validity
//!
//! The CA is valid from yesterday (tolerates clock skew between nodes) for
//! ten years, with `pathLenConstraint = 0` so it can only sign leaf
//! certificates. Leaf certificates get the same span, capped at the CA's
//! expiry (a leaf outliving its CA would only fail later, confusingly).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use thiserror::Error;

use super::manifest::write_file_atomic;

/// Common name of the CLI client certificate written by [`write_cluster_pki`].
pub const CLIENT_COMMON_NAME: &str = "mosix-client";

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CLIENT_FILE_STEM: &str = "client";
const VALIDITY_YEARS: i32 = 10;
const SECS_PER_DAY: i64 = 86_400;

/// Errors from CA/certificate generation and PKI file handling.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "invalid node name {0:?}: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}$ \
         and not be \"ca\" or \"client\""
    )]
    InvalidNodeName(String),
    #[error("node name {0:?} listed more than once")]
    DuplicateNodeName(String),
    #[error("invalid {what} {value:?}: must be non-empty and contain no control characters")]
    InvalidName { what: &'static str, value: String },
    #[error("invalid subject alternative name {0:?}: not an IP address or DNS name")]
    InvalidSan(String),
    #[error("a certificate must allow client auth, server auth, or both")]
    NoKeyUsage,
    #[error("invalid CA certificate/key: {0}")]
    InvalidCa(String),
    #[error(
        "{present} exists but {missing} does not; refusing to overwrite half of a \
         certificate/key pair (remove the remaining file to regenerate)"
    )]
    PartialFiles { present: PathBuf, missing: PathBuf },
    #[error(
        "private key file {path} is accessible by group/others (mode {mode:04o}); \
         run `chmod 600` on it"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct CertKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Hand-written so that logging a `CertKeyPem` never prints the private key.
impl fmt::Debug for CertKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKeyPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Generates a self-signed cluster CA (ECDSA P-256, ten years, may sign
/// leaf certificates only).
pub fn generate_ca(cluster_name: &str) -> Result<CertKeyPem, PkiError> {
    check_name("cluster name", cluster_name)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mosix");
    dn.push(DnType::CommonName, format!("mosix CA {cluster_name}"));
    params.distinguished_name = dn;
    // pathLen 0: a stolen node key can never be used to mint sub-CAs, and
    // nothing in mosix needs intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = unix_now();
    // date_time_ymd panics on impossible dates; civil_from_unix/add_years
    // only ever produce valid ones.
    let (y, m, d) = civil_from_unix(now - SECS_PER_DAY);
    params.not_before = date_time_ymd(y, m, d);
    let (y, m, d) = add_years(civil_from_unix(now), VALIDITY_YEARS);
    params.not_after = date_time_ymd(y, m, d);
    let cert = params.self_signed(&key)?;
    Ok(CertKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a leaf certificate for `common_name` signed by `ca`.
///
/// `sans` entries that parse as IP addresses become IP SANs, others DNS
/// SANs. `client`/`server` select the clientAuth/serverAuth extended key
/// usages; at least one is required, because a certificate with no EKU
/// extension would be valid for *every* purpose.
pub fn issue_cert(
    ca: &CertKeyPem,
    common_name: &str,
    sans: &[String],
    client: bool,
    server: bool,
) -> Result<CertKeyPem, PkiError> {
    check_name("common name", common_name)?;
    if !client && !server {
        return Err(PkiError::NoKeyUsage);
    }
    let ca = LoadedCa::from_pem(ca)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mosix");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .map(|s| parse_san(s))
        .collect::<Result<_, _>>()?;
    // Explicit CA:FALSE, so no verifier can be talked into treating a node
    // certificate as an issuer.
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDSA TLS handshakes only need digitalSignature.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;

    let now = unix_now();
    if ca.not_after_unix <= now {
        return Err(PkiError::InvalidCa("CA certificate has expired".into()));
    }
    let (y, m, d) = civil_from_unix(now - SECS_PER_DAY);
    params.not_before = date_time_ymd(y, m, d);
    let wanted = add_years(civil_from_unix(now), VALIDITY_YEARS);
    // Midnight of the CA's expiry day is never later than the CA's expiry.
    let ca_end = civil_from_unix(ca.not_after_unix);
    let (y, m, d) = wanted.min(ca_end);
    params.not_after = date_time_ymd(y, m, d);

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(CertKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Creates (or completes) the cluster PKI directory; see the module docs for
/// the layout. Each node's certificate is usable as both TLS server and
/// client certificate.
pub fn write_cluster_pki(
    dir: &Path,
    cluster_name: &str,
    nodes: &[(String, Vec<String>)],
) -> Result<(), PkiError> {
    // Validate everything before writing anything, so a typo in the last
    // node name does not leave a half-populated directory behind.
    check_name("cluster name", cluster_name)?;
    let mut seen = HashSet::new();
    for (name, sans) in nodes {
        validate_node_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(PkiError::DuplicateNodeName(name.clone()));
        }
        for san in sans {
            parse_san(san)?;
        }
    }

    if !dir.exists() {
        // 0700: the directory holds private keys.
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }

    let ca = match read_pair(dir, CA_CERT_FILE, CA_KEY_FILE)? {
        Some(existing) => {
            // Fail now on a broken CA even if no node needs issuing.
            LoadedCa::from_pem(&existing)?;
            existing
        }
        None => {
            let ca = generate_ca(cluster_name)?;
            write_pair(dir, CA_CERT_FILE, CA_KEY_FILE, &ca)?;
            ca
        }
    };

    for (name, sans) in nodes {
        let cert_file = format!("{name}.pem");
        let key_file = format!("{name}.key");
        if read_pair(dir, &cert_file, &key_file)?.is_some() {
            continue;
        }
        let mut all_sans = sans.clone();
        // Peers will often dial a node by its name; make that verify.
        if !all_sans.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            all_sans.insert(0, name.clone());
        }
        let cert = issue_cert(&ca, name, &all_sans, true, true)?;
        write_pair(dir, &cert_file, &key_file, &cert)?;
    }

    let cert_file = format!("{CLIENT_FILE_STEM}.pem");
    let key_file = format!("{CLIENT_FILE_STEM}.key");
    if read_pair(dir, &cert_file, &key_file)?.is_none() {
        let cert = issue_cert(&ca, CLIENT_COMMON_NAME, &[], true, false)?;
        write_pair(dir, &cert_file, &key_file, &cert)?;
    }
    Ok(())
}

/// A parsed CA ready to sign.
struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    not_after_unix: i64,
}

impl LoadedCa {
    fn from_pem(ca: &CertKeyPem) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(&ca.key_pem)
            .map_err(|e| PkiError::InvalidCa(format!("cannot parse CA key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCa(format!("cannot parse CA certificate PEM: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&pem.contents)
            .map_err(|e| PkiError::InvalidCa(format!("cannot parse CA certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(PkiError::InvalidCa(
                "certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        // rcgen would happily sign with a key that does not belong to the
        // certificate, producing certs that fail every handshake later with
        // an unhelpful error. Catch mismatched ca.pem/ca.key here instead.
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(PkiError::InvalidCa(
                "CA private key does not match the CA certificate".into(),
            ));
        }
        let not_after_unix = x509.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
        Ok(LoadedCa {
            issuer,
            not_after_unix,
        })
    }
}

fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let bytes = name.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes
        .iter()
        .skip(1)
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    let reserved = name == "ca" || name == CLIENT_FILE_STEM;
    if !first_ok || !rest_ok || bytes.len() > 63 || reserved {
        return Err(PkiError::InvalidNodeName(name.to_string()));
    }
    Ok(())
}

fn check_name(what: &'static str, value: &str) -> Result<(), PkiError> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(PkiError::InvalidName {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// IP literal → IP SAN; otherwise a conservative DNS-name check (ASCII
/// letters, digits, `-`, `_`, `.`, optional leading `*.` wildcard), so a typo
/// fails here instead of producing a certificate no peer accepts.
fn parse_san(san: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let host = san.strip_prefix("*.").unwrap_or(san);
    let valid = !host.is_empty()
        && san.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(PkiError::InvalidSan(san.to_string()));
    }
    let ia5 = san
        .to_string()
        .try_into()
        .map_err(|_| PkiError::InvalidSan(san.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

/// Reads an existing cert/key pair: `None` if neither file exists, an error
/// if only one does. Refuses a key readable by group/others, for the same
/// reason the cluster key loader does.
fn read_pair(dir: &Path, cert_file: &str, key_file: &str) -> Result<Option<CertKeyPem>, PkiError> {
    let cert_path = dir.join(cert_file);
    let key_path = dir.join(key_file);
    let cert_exists = cert_path.try_exists().map_err(io_err(&cert_path))?;
    let key_exists = key_path.try_exists().map_err(io_err(&key_path))?;
    match (cert_exists, key_exists) {
        (false, false) => Ok(None),
        (true, false) => Err(PkiError::PartialFiles {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(PkiError::PartialFiles {
            present: key_path,
            missing: cert_path,
        }),
        (true, true) => {
            let mode = fs::metadata(&key_path)
                .map_err(io_err(&key_path))?
                .permissions()
                .mode()
                & 0o7777;
            if mode & 0o077 != 0 {
                return Err(PkiError::KeyPermissions {
                    path: key_path,
                    mode,
                });
            }
            let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            Ok(Some(CertKeyPem { cert_pem, key_pem }))
        }
    }
}

/// Key first: if we crash between the two writes, the leftover is a lone
/// key, never a certificate whose key was never written.
fn write_pair(
    dir: &Path,
    cert_file: &str,
    key_file: &str,
    pair: &CertKeyPem,
) -> Result<(), PkiError> {
    let key_path = dir.join(key_file);
    write_file_atomic(&key_path, pair.key_pem.as_bytes(), 0o600).map_err(io_err(&key_path))?;
    let cert_path = dir.join(cert_file);
    write_file_atomic(&cert_path, pair.cert_pem.as_bytes(), 0o644).map_err(io_err(&cert_path))?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        // A pre-1970 clock is broken; the resulting certs would be rejected
        // as not-yet-valid/expired by peers, which surfaces the problem.
        .unwrap_or(0)
}

/// Calendar date (UTC) of a Unix timestamp, via Howard Hinnant's
/// `civil_from_days`. Done by hand because rcgen only exposes
/// `date_time_ymd`, and pulling in `time` just for "now" is not worth it.
fn civil_from_unix(secs: i64) -> (i32, u8, u8) {
    let z = secs.div_euclid(SECS_PER_DAY) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Clamp into the range X.509/`time` handle; the day/month casts are
    // lossless because of the ranges noted above.
    let year = year.clamp(1950, 9999) as i32;
    (year, month as u8, day as u8)
}

fn add_years((y, m, d): (i32, u8, u8), years: i32) -> (i32, u8, u8) {
    // Feb 29 + N years may not exist; Feb 28 is close enough for validity.
    let d = if m == 2 && d == 29 { 28 } else { d };
    ((y + years).min(9999), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use webpki::{anchor_from_trusted_cert, EndEntityCert, KeyUsage};
    use x509_parser::extensions::GeneralName;

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    /// Full chain verification, as rustls would do it.
    fn verify_chain(
        ca: &CertKeyPem,
        leaf: &CertKeyPem,
        usage: KeyUsage,
    ) -> Result<(), webpki::Error> {
        let ca_der = CertificateDer::from(der(&ca.cert_pem));
        let leaf_der = CertificateDer::from(der(&leaf.cert_pem));
        let anchor = anchor_from_trusted_cert(&ca_der)?;
        let ee = EndEntityCert::try_from(&leaf_der)?;
        ee.verify_for_usage(&algs(), &[anchor], &[], UnixTime::now(), usage, None, None)
            .map(|_| ())
    }

    fn algs() -> Vec<&'static dyn rustls_pki_types::SignatureVerificationAlgorithm> {
        vec![
            webpki::ring::ECDSA_P256_SHA256,
            webpki::ring::ECDSA_P256_SHA384,
        ]
    }

    fn node_sans() -> Vec<String> {
        vec![
            "node1.cluster.local".into(),
            "10.0.0.5".into(),
            "::1".into(),
        ]
    }

    #[test]
    fn node_cert_chains_to_ca_for_server_and_client() {
        let ca = generate_ca("test").unwrap();
        let node = issue_cert(&ca, "node1", &node_sans(), true, true).unwrap();
        verify_chain(&ca, &node, KeyUsage::server_auth()).unwrap();
        verify_chain(&ca, &node, KeyUsage::client_auth()).unwrap();

        let leaf_der = CertificateDer::from(der(&node.cert_pem));
        let ee = EndEntityCert::try_from(&leaf_der).unwrap();
        for name in ["node1.cluster.local", "10.0.0.5", "::1"] {
            let sn = ServerName::try_from(name).unwrap();
            ee.verify_is_valid_for_subject_name(&sn).unwrap();
        }
        let other = ServerName::try_from("node2.cluster.local").unwrap();
        assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
        let other_ip = ServerName::try_from("10.0.0.6").unwrap();
        assert!(ee.verify_is_valid_for_subject_name(&other_ip).is_err());
    }

    #[test]
    fn cert_from_other_ca_does_not_verify() {
        let ca = generate_ca("test").unwrap();
        // Same cluster name => identical issuer DN, so only the signature
        // check can tell the CAs apart: the realistic impostor case.
        let rogue_ca = generate_ca("test").unwrap();
        let rogue = issue_cert(&rogue_ca, "node1", &node_sans(), true, true).unwrap();
        for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
            let err = verify_chain(&ca, &rogue, usage).unwrap_err();
            assert!(
                matches!(err, webpki::Error::InvalidSignatureForPublicKey),
                "{err:?}"
            );
        }
        // And the control: it does verify against its own CA.
        verify_chain(&rogue_ca, &rogue, KeyUsage::server_auth()).unwrap();

        let other_ca = generate_ca("other").unwrap();
        let other = issue_cert(&other_ca, "node1", &node_sans(), true, true).unwrap();
        let err = verify_chain(&ca, &other, KeyUsage::server_auth()).unwrap_err();
        assert!(matches!(err, webpki::Error::UnknownIssuer), "{err:?}");
    }

    #[test]
    fn eku_is_enforced() {
        let ca = generate_ca("test").unwrap();
        let client = issue_cert(&ca, CLIENT_COMMON_NAME, &[], true, false).unwrap();
        verify_chain(&ca, &client, KeyUsage::client_auth()).unwrap();
        assert!(verify_chain(&ca, &client, KeyUsage::server_auth()).is_err());
        let server = issue_cert(&ca, "srv", &["srv".into()], false, true).unwrap();
        verify_chain(&ca, &server, KeyUsage::server_auth()).unwrap();
        assert!(verify_chain(&ca, &server, KeyUsage::client_auth()).is_err());
        assert!(matches!(
            issue_cert(&ca, "x", &[], false, false),
            Err(PkiError::NoKeyUsage)
        ));
    }

    #[test]
    fn parsed_fields_are_as_requested() {
        let ca = generate_ca("prod").unwrap();
        let node = issue_cert(&ca, "node1", &node_sans(), false, true).unwrap();
        let ca_der = der(&ca.cert_pem);
        let node_der = der(&node.cert_pem);
        let (_, ca_x) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&node_der).unwrap();

        assert!(ca_x.is_ca());
        let bc = ca_x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        assert_eq!(ca_x.subject(), ca_x.issuer());
        assert!(ca_x.subject().to_string().contains("mosix CA prod"));
        let years = (ca_x.validity().not_after.timestamp() - unix_now()) / (365 * SECS_PER_DAY);
        assert!((9..=10).contains(&years), "{years}");

        assert!(!x.is_ca());
        assert_eq!(x.issuer().as_raw(), ca_x.subject().as_raw());
        assert!(x.subject().to_string().contains("CN=node1"));
        assert!(x.validity().not_after.timestamp() <= ca_x.validity().not_after.timestamp());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        assert!(!eku.client_auth);
        let san = x.subject_alternative_name().unwrap().unwrap().value;
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for n in &san.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(b.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        assert_eq!(dns, ["node1.cluster.local"]);
        assert!(ips.contains(&vec![10, 0, 0, 5]), "{ips:?}");
        assert!(ips.iter().any(|b| b.len() == 16), "{ips:?}");
    }

    #[test]
    fn bad_sans_and_names_refused() {
        let ca = generate_ca("test").unwrap();
        for bad in ["", "a b", "foo/bar", "ex..ample", "caf\u{e9}.com", "*."] {
            let err = issue_cert(&ca, "n", &[bad.to_string()], true, true).unwrap_err();
            assert!(matches!(err, PkiError::InvalidSan(_)), "{bad:?}: {err:?}");
        }
        issue_cert(&ca, "n", &["*.nodes.example".into()], true, true).unwrap();
        assert!(matches!(generate_ca(""), Err(PkiError::InvalidName { .. })));
        assert!(matches!(
            issue_cert(&ca, "a\nb", &[], true, true),
            Err(PkiError::InvalidName { .. })
        ));
    }

    #[test]
    fn mismatched_or_non_ca_refused() {
        let ca = generate_ca("test").unwrap();
        let other = generate_ca("test").unwrap();
        let mixed = CertKeyPem {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        let err = issue_cert(&mixed, "n", &[], true, true).unwrap_err();
        assert!(
            matches!(&err, PkiError::InvalidCa(m) if m.contains("does not match")),
            "{err:?}"
        );
        let leaf = issue_cert(&ca, "n", &[], true, true).unwrap();
        let err = issue_cert(&leaf, "m", &[], true, true).unwrap_err();
        assert!(
            matches!(&err, PkiError::InvalidCa(m) if m.contains("not a CA")),
            "{err:?}"
        );
        let garbage = CertKeyPem {
            cert_pem: "nope".into(),
            key_pem: ca.key_pem.clone(),
        };
        assert!(matches!(
            issue_cert(&garbage, "n", &[], true, true),
            Err(PkiError::InvalidCa(_))
        ));
    }

    #[test]
    fn debug_does_not_leak_private_key() {
        let ca = generate_ca("test").unwrap();
        let s = format!("{ca:?}");
        assert!(!s.contains("PRIVATE KEY"), "{s}");
        assert!(s.contains("redacted"));
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn load(dir: &Path, stem: &str) -> CertKeyPem {
        CertKeyPem {
            cert_pem: fs::read_to_string(dir.join(format!("{stem}.pem"))).unwrap(),
            key_pem: fs::read_to_string(dir.join(format!("{stem}.key"))).unwrap(),
        }
    }

    #[test]
    fn write_cluster_pki_layout_modes_and_chains() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let nodes = vec![
            ("node1".to_string(), vec!["10.0.0.1".to_string()]),
            ("node2".to_string(), vec!["node2.lan".to_string()]),
        ];
        write_cluster_pki(&dir, "c1", &nodes).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for key in ["ca.key", "node1.key", "node2.key", "client.key"] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        for cert in ["ca.pem", "node1.pem", "node2.pem", "client.pem"] {
            assert_eq!(mode(&dir.join(cert)), 0o644, "{cert}");
        }
        // Nothing but the expected eight files (no temp leftovers).
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 8);

        let ca = load(&dir, "ca");
        let node1 = load(&dir, "node1");
        verify_chain(&ca, &node1, KeyUsage::server_auth()).unwrap();
        verify_chain(&ca, &node1, KeyUsage::client_auth()).unwrap();
        let d = CertificateDer::from(der(&node1.cert_pem));
        let ee = EndEntityCert::try_from(&d).unwrap();
        for name in ["node1", "10.0.0.1"] {
            ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
                .unwrap();
        }
        let client = load(&dir, "client");
        verify_chain(&ca, &client, KeyUsage::client_auth()).unwrap();
        assert!(verify_chain(&ca, &client, KeyUsage::server_auth()).is_err());
        let cd = der(&client.cert_pem);
        let (_, cx) = x509_parser::parse_x509_certificate(&cd).unwrap();
        assert!(cx.subject().to_string().contains("CN=mosix-client"));
    }

    #[test]
    fn write_cluster_pki_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let n1 = vec![("node1".to_string(), vec![])];
        write_cluster_pki(dir, "c1", &n1).unwrap();
        let ca1 = load(dir, "ca");
        let node1 = load(dir, "node1");
        let client = load(dir, "client");

        let n12 = vec![
            ("node1".to_string(), vec!["1.2.3.4".to_string()]),
            ("node2".to_string(), vec![]),
        ];
        write_cluster_pki(dir, "c1", &n12).unwrap();
        // Existing material untouched.
        assert_eq!(load(dir, "ca").cert_pem, ca1.cert_pem);
        assert_eq!(load(dir, "ca").key_pem, ca1.key_pem);
        assert_eq!(load(dir, "node1").cert_pem, node1.cert_pem);
        assert_eq!(load(dir, "client").cert_pem, client.cert_pem);
        // New node issued by the *same* CA.
        let node2 = load(dir, "node2");
        verify_chain(&ca1, &node2, KeyUsage::server_auth()).unwrap();
    }

    #[test]
    fn bad_node_names_refused_before_writing() {
        let long = "a".repeat(64);
        let ok63 = "a".repeat(63);
        for bad in [
            "", "../x", "a/b", ".hidden", "-x", "_x", "a b", "ca", "client", "n\u{e9}", &long,
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let nodes = vec![("good".to_string(), vec![]), (bad.to_string(), vec![])];
            let err = write_cluster_pki(tmp.path(), "c", &nodes).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidNodeName(_)),
                "{bad:?}: {err:?}"
            );
            assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "{bad:?}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let nodes = vec![(ok63, vec![]), ("Node_1.a-b".to_string(), vec![])];
        write_cluster_pki(tmp.path(), "c", &nodes).unwrap();

        let dup = vec![("n".to_string(), vec![]), ("n".to_string(), vec![])];
        assert!(matches!(
            write_cluster_pki(tmp.path(), "c", &dup),
            Err(PkiError::DuplicateNodeName(_))
        ));
    }

    #[test]
    fn partial_pairs_and_loose_ca_key_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_cluster_pki(dir, "c", &[("n1".into(), vec![])]).unwrap();

        fs::remove_file(dir.join("n1.key")).unwrap();
        let err = write_cluster_pki(dir, "c", &[("n1".into(), vec![])]).unwrap_err();
        assert!(matches!(err, PkiError::PartialFiles { .. }), "{err:?}");
        fs::remove_file(dir.join("n1.pem")).unwrap();
        // With both gone, the node is simply re-issued.
        write_cluster_pki(dir, "c", &[("n1".into(), vec![])]).unwrap();

        fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = write_cluster_pki(dir, "c", &[]).unwrap_err();
        assert!(matches!(err, PkiError::KeyPermissions { .. }), "{err:?}");
        fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o600)).unwrap();

        fs::remove_file(dir.join("ca.pem")).unwrap();
        let err = write_cluster_pki(dir, "c", &[]).unwrap_err();
        assert!(matches!(err, PkiError::PartialFiles { .. }), "{err:?}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29));
        assert_eq!(civil_from_unix(1_767_225_599), (2025, 12, 31));
        assert_eq!(civil_from_unix(1_767_225_600), (2026, 1, 1));
        assert_eq!(add_years((2028, 2, 29), 10), (2038, 2, 28));
    }
}
