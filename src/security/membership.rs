//! Is this node really a member of this cluster? The checks `mosixd` makes
//! when it starts, and the sentences the CLIs give for TLS failures.
//!
//! Why: joining a machine to a cluster takes a CA certificate, a node
//! certificate and key, a node name and a shared path, and each can be the
//! wrong one. Left alone, every such mistake surfaces late and far from its
//! cause: a wrong CA or an expired certificate as a bare "transport error"
//! on some other node, a name mismatch as peers that cannot verify each
//! other, a shared path that is a local directory on one node as a
//! migration whose images are "not found" on the target. So the agent checks
//! what it can at start-up and refuses to start with a sentence that names
//! the mistake, and [`explain_tls_error`] turns rustls' handshake errors
//! into the same kind of sentence for the CLIs.
//!
//! The shared path carries a marker, `.mosix-cluster`, naming the cluster
//! and its CA's fingerprint (the first agent to start writes it), and a
//! presence file per node under `.mosix-nodes/`. An agent whose shared path
//! has another cluster's marker refuses to start; a node that answers but
//! whose presence file is missing from the shared path as another node sees
//! it is on a different file system, which `mosctl load` reports
//! ([`nodes_missing_from_shared`]).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The marker file at the root of a cluster's shared path.
pub const MARKER_FILE: &str = ".mosix-cluster";
/// The directory of per-node presence files on the shared path.
pub const NODES_DIR: &str = ".mosix-nodes";

#[derive(Debug, Error)]
pub enum MembershipError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PEM certificate: {why}")]
    BadCertificate { path: PathBuf, why: String },
    #[error(
        "the certificate {cert} is not signed by this cluster's CA {ca} (it was issued by \
         {issuer:?}; the CA is {ca_subject:?}): it belongs to another cluster, or the CA file \
         is the wrong one. Issue the node's certificate from this CA (`mosctl certs --dir DIR \
         --node NAME=ADDR` in the CA's directory), or give the CA that issued it"
    )]
    WrongCa {
        cert: PathBuf,
        ca: PathBuf,
        issuer: String,
        ca_subject: String,
    },
    #[error(
        "the certificate {cert} expired on {not_after}; issue a new one (remove NODE.pem and \
         NODE.key in the CA's directory and run `mosctl certs` again)"
    )]
    Expired { cert: PathBuf, not_after: String },
    #[error(
        "the certificate {cert} is not valid before {not_before}: is this machine's clock right?"
    )]
    NotYetValid { cert: PathBuf, not_before: String },
    #[error(
        "the certificate {cert} was issued for node {cert_name:?}, but this agent is node \
         {node:?} (--node, or `node` in the config file, or the host name): give --node \
         {cert_name}, or this node the certificate issued for {node}"
    )]
    NameMismatch {
        cert: PathBuf,
        cert_name: String,
        node: String,
    },
    #[error(
        "the shared path {path} belongs to another cluster: its marker {marker} names cluster \
         {their_name:?} with CA fingerprint {their_ca}, but this node's CA is {our_ca}. Is the \
         cluster's shared file system mounted at {path} on this node?"
    )]
    OtherCluster {
        path: PathBuf,
        marker: PathBuf,
        their_name: String,
        their_ca: String,
        our_ca: String,
    },
    #[error("the shared path's marker {path} is unreadable or damaged: {why}")]
    BadMarker { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, MembershipError> {
    std::fs::read(path).map_err(|source| MembershipError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The DER of the first certificate in a PEM file.
fn pem_der(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, MembershipError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(bytes).map_err(|e| MembershipError::BadCertificate {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok(pem.contents)
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, MembershipError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| MembershipError::BadCertificate {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

/// The SHA-256 of a CA certificate's DER, hex: the cluster's identity on
/// its shared path.
pub fn ca_fingerprint(ca: &Path) -> Result<String, MembershipError> {
    let bytes = read(ca)?;
    let der = pem_der(ca, &bytes)?;
    Ok(hex::encode(Sha256::digest(&der)))
}

/// The common name of a CA certificate (`mosix CA <cluster>`), for messages.
fn common_name(c: &X509Certificate<'_>) -> Option<String> {
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

fn when(t: &x509_parser::time::ASN1Time) -> String {
    t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
}

/// Check a node's own certificate before serving with it: signed by the CA
/// it was given, valid now (`now_unix`), and issued for `node`.
pub fn check_node_certificate(
    ca: &Path,
    cert: &Path,
    node: &str,
    now_unix: i64,
) -> Result<(), MembershipError> {
    let cert_name = check_certificate(ca, cert, now_unix)?;
    if cert_name != node {
        return Err(MembershipError::NameMismatch {
            cert: cert.to_path_buf(),
            cert_name,
            node: node.to_string(),
        });
    }
    Ok(())
}

/// Check that `cert` is signed by `ca` and valid now; its common name.
/// The CLIs check their client certificate this way before connecting:
/// an agent refusing a client certificate of another CA only closes the
/// connection (TLS 1.3 sends its alert after the handshake, and the client
/// sees "operation was canceled"), so the mistake is best named here.
pub fn check_certificate(ca: &Path, cert: &Path, now_unix: i64) -> Result<String, MembershipError> {
    let ca_bytes = read(ca)?;
    let ca_der = pem_der(ca, &ca_bytes)?;
    let ca_cert = parse(ca, &ca_der)?;
    let bytes = read(cert)?;
    let der = pem_der(cert, &bytes)?;
    let c = parse(cert, &der)?;
    if c.verify_signature(Some(ca_cert.public_key())).is_err() {
        return Err(MembershipError::WrongCa {
            cert: cert.to_path_buf(),
            ca: ca.to_path_buf(),
            issuer: c.issuer().to_string(),
            ca_subject: ca_cert.subject().to_string(),
        });
    }
    let v = c.validity();
    if v.not_after.timestamp() < now_unix {
        return Err(MembershipError::Expired {
            cert: cert.to_path_buf(),
            not_after: when(&v.not_after),
        });
    }
    if v.not_before.timestamp() > now_unix {
        return Err(MembershipError::NotYetValid {
            cert: cert.to_path_buf(),
            not_before: when(&v.not_before),
        });
    }
    Ok(common_name(&c).unwrap_or_default())
}

/// What [`claim_shared_path`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedClaim {
    /// The marker was there and names this cluster.
    Joined,
    /// No marker: this agent wrote it. Right for the first node of a new
    /// cluster; on any other node it means this path is not the file system
    /// the others share.
    Created,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    cluster: String,
    /// Hex SHA-256 of the CA certificate; empty for a cluster without TLS.
    ca_sha256: String,
}

/// Check the shared path's marker against this node's cluster (write it if
/// there is none), then leave this node's presence file there.
pub fn claim_shared_path(
    shared: &Path,
    cluster: &str,
    ca_sha256: Option<&str>,
    node: &str,
) -> Result<SharedClaim, MembershipError> {
    let marker_path = shared.join(MARKER_FILE);
    let ours = Marker {
        cluster: cluster.to_string(),
        ca_sha256: ca_sha256.unwrap_or_default().to_string(),
    };
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MembershipError::Write { path, source }
    };
    let claim = match std::fs::read(&marker_path) {
        Ok(bytes) => {
            let theirs: Marker =
                serde_json::from_slice(&bytes).map_err(|e| MembershipError::BadMarker {
                    path: marker_path.clone(),
                    why: e.to_string(),
                })?;
            // Only a CA says who a cluster is; names are often "mosix".
            if !theirs.ca_sha256.is_empty()
                && !ours.ca_sha256.is_empty()
                && theirs.ca_sha256 != ours.ca_sha256
            {
                return Err(MembershipError::OtherCluster {
                    path: shared.to_path_buf(),
                    marker: marker_path,
                    their_name: theirs.cluster,
                    their_ca: theirs.ca_sha256,
                    our_ca: ours.ca_sha256,
                });
            }
            SharedClaim::Joined
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes =
                serde_json::to_vec_pretty(&ours).map_err(|e| MembershipError::BadMarker {
                    path: marker_path.clone(),
                    why: e.to_string(),
                })?;
            // Written whole to a file of our own, then linked into place:
            // link(2) fails if the marker exists (atomic on NFS too), so two
            // first agents racing leave one marker, and nobody ever reads a
            // half-written one. The loser checks the winner's.
            let tmp = shared.join(format!("{MARKER_FILE}.{node}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, &bytes).map_err(write_err(&tmp))?;
            let linked = std::fs::hard_link(&tmp, &marker_path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => SharedClaim::Created,
                // sshfs reports a link onto an existing name as EPERM (SFTP's
                // hardlink extension answers a generic failure), not EEXIST:
                // two agents of a cluster starting at once over sshfs made
                // the loser fail its start. A marker that exists now is the
                // winner's either way.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists || marker_path.exists() => {
                    return claim_shared_path(shared, cluster, ca_sha256, node);
                }
                Err(e) => return Err(write_err(&marker_path)(e)),
            }
        }
        Err(source) => {
            return Err(MembershipError::Read {
                path: marker_path,
                source,
            })
        }
    };
    let dir = shared.join(NODES_DIR);
    std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    let presence = dir.join(node);
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    std::fs::write(
        &presence,
        format!("host={host}\npid={}\n", std::process::id()),
    )
    .map_err(write_err(&presence))?;
    Ok(claim)
}

/// Of `nodes` (that answered), those with no presence file on `shared` as
/// this machine sees it: their shared path is another file system. `None`
/// when this machine does not see the cluster's shared path at all (no
/// marker there), so nothing can be said.
pub fn nodes_missing_from_shared<'a>(
    shared: &Path,
    nodes: impl IntoIterator<Item = &'a str>,
) -> Option<Vec<String>> {
    if !shared.join(MARKER_FILE).is_file() {
        return None;
    }
    let dir = shared.join(NODES_DIR);
    Some(
        nodes
            .into_iter()
            .filter(|n| !dir.join(n).is_file())
            .map(str::to_string)
            .collect(),
    )
}

/// A TLS handshake failure in `err`'s chain, as a sentence that names the
/// mistake; `None` if the error is not one of those.
pub fn explain_tls_error(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut text = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        text.push_str(&format!("{e:?} {e} | "));
        cur = e.source();
    }
    let has = |s: &str| text.contains(s);
    if has("UnknownIssuer") {
        Some("the peer's certificate is not signed by this cluster's CA (a wrong CA on one side)")
    } else if has("UnknownCA") || has("BadCertificate") || has("DecryptError") {
        Some(
            "the peer refused our certificate: it is not signed by the peer's cluster CA (a wrong CA on one side)",
        )
    } else if has("CertificateExpired") {
        Some("the peer refused our certificate: it has expired")
    } else if has("Expired") {
        Some("the peer's certificate has expired")
    } else if has("NotValidForName") {
        Some("the peer's certificate is not a mosix node certificate (no mosix.cluster name)")
    } else if has("CertificateRequired") {
        Some("the peer wants a client certificate and we gave none (no `tls` in the cluster file?)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::pki;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    #[test]
    fn node_certificate_mistakes_are_named() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let nodes = vec![("node1".to_string(), vec!["10.0.0.1".to_string()])];
        pki::write_cluster_pki(&a, "alpha", &nodes).unwrap();
        pki::write_cluster_pki(&b, "beta", &nodes).unwrap();
        let ca = a.join("ca.pem");
        let cert = a.join("node1.pem");
        check_node_certificate(&ca, &cert, "node1", now()).unwrap();

        let e = check_node_certificate(&b.join("ca.pem"), &cert, "node1", now()).unwrap_err();
        assert!(matches!(e, MembershipError::WrongCa { .. }), "{e}");
        assert!(e.to_string().contains("not signed by this cluster's CA"));

        let e = check_node_certificate(&ca, &cert, "node2", now()).unwrap_err();
        assert!(e.to_string().contains("issued for node \"node1\""), "{e}");

        let e = check_node_certificate(&ca, &cert, "node1", now() + 20 * 366 * 86_400).unwrap_err();
        assert!(e.to_string().contains("expired on"), "{e}");
    }

    #[test]
    fn agents_starting_together_leave_one_whole_marker() {
        for _ in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let claims: Vec<SharedClaim> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..6)
                    .map(|i| {
                        let p = d.path();
                        sc.spawn(move || {
                            claim_shared_path(p, "c", Some("aa"), &format!("node{i}")).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let created = claims
                .iter()
                .filter(|c| **c == SharedClaim::Created)
                .count();
            assert_eq!(created, 1, "{claims:?}");
        }
    }

    #[test]
    fn shared_path_marker() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        assert_eq!(
            claim_shared_path(s, "c", Some("aa"), "node1").unwrap(),
            SharedClaim::Created
        );
        assert_eq!(
            claim_shared_path(s, "c", Some("aa"), "node2").unwrap(),
            SharedClaim::Joined
        );
        let e = claim_shared_path(s, "c", Some("bb"), "node3").unwrap_err();
        assert!(e.to_string().contains("belongs to another cluster"), "{e}");
        assert_eq!(
            nodes_missing_from_shared(s, ["node1", "node2", "node3"]),
            Some(vec!["node3".to_string()])
        );
        assert_eq!(
            nodes_missing_from_shared(&s.join("elsewhere"), ["node1"]),
            None
        );
    }
}
