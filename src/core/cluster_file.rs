//! The cluster file: the one place every CLI and agent learns the nodes.
//!
//! Format (JSON), written by `mosctl local up` or by hand on a real cluster:
//!
//! ```json
//! {
//!   "name": "local",
//!   "shared_root": "/srv/mosix",             // optional: no shared path → direct transfer
//!   "balancer": "https://10.77.1.1:7070",    // optional
//!   "tls": { "ca": "...ca.pem", "cert": "...client.pem", "key": "...client.key" },  // optional
//!   "etcd": ["http://10.77.1.250:2379"],     // optional: leases, ownership, fencing (src/coord)
//!   "nodes": [ { "name": "node1", "endpoint": "http://10.77.1.2:7000", "address": "10.77.1.2",
//!                "run_socket": "/run/mosix/local/node1.sock" } ]     // run_socket: optional
//! }
//! ```
//!
//! Where it is looked up: `--cluster PATH`, else `$MOSIX_CLUSTER`, else
//! [`DEFAULT_CLUSTER_FILE`] (a local cluster), else
//! [`INSTALLED_CLUSTER_FILE`] if only that exists.

use super::ids::NodeName;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CLUSTER_FILE: &str = "/run/mosix/local/cluster.json";
/// The cluster file of a node installed from the package (`mosctl certs
/// --cluster-file` writes it); used when there is no local cluster.
pub const INSTALLED_CLUSTER_FILE: &str = "/etc/mosix/cluster.json";

#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    #[error(
        "cannot read cluster file {path}: {source} (is the cluster up? try `mosctl local up`)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster file {path} is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("unknown node {0:?}; the cluster has: {1}")]
    UnknownNode(String, String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: NodeName,
    /// gRPC endpoint, `http://ip:port` or `https://ip:port`.
    pub endpoint: String,
    /// The node's address as jobs see it (where a job's listening socket answers).
    pub address: String,
    /// Prometheus endpoint, if served.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The agent's Unix socket for `mosrun` on that node (`mosixd
    /// --run-socket`), if it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub name: String,
    #[serde(default)]
    pub shared_root: Option<PathBuf>,
    #[serde(default)]
    pub balancer: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    pub nodes: Vec<NodeEntry>,
    /// etcd client endpoints (`http://ip:port`). With any, agents hold
    /// leases and fence themselves, jobs have owner records, and balancers
    /// elect a leader (see `coord`); without, node loss is only reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
}

impl ClusterFile {
    /// Resolve which cluster file to use (flag, env, default).
    pub fn locate(flag: Option<&Path>) -> PathBuf {
        if let Some(p) = flag {
            return p.to_path_buf();
        }
        if let Some(p) = std::env::var_os("MOSIX_CLUSTER") {
            return PathBuf::from(p);
        }
        // A node set up from the package has no local cluster: its file is
        // /etc/mosix/cluster.json. A local cluster, when there is one, wins.
        let local = Path::new(DEFAULT_CLUSTER_FILE);
        let installed = Path::new(INSTALLED_CLUSTER_FILE);
        if !local.exists() && installed.exists() {
            return installed.to_path_buf();
        }
        PathBuf::from(DEFAULT_CLUSTER_FILE)
    }

    pub fn load(path: &Path) -> Result<Self, ClusterFileError> {
        let bytes = std::fs::read(path).map_err(|e| ClusterFileError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(path, &bytes)
    }

    /// Parse and validate; exposed for property tests.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, ClusterFileError> {
        let malformed = |why: String| ClusterFileError::Malformed {
            path: path.to_path_buf(),
            why,
        };
        let cf: ClusterFile =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if cf.nodes.is_empty() {
            return Err(malformed("no nodes".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &cf.nodes {
            if !seen.insert(n.name.clone()) {
                return Err(malformed(format!("node {} listed twice", n.name)));
            }
            if !(n.endpoint.starts_with("http://") || n.endpoint.starts_with("https://")) {
                return Err(malformed(format!(
                    "node {}: endpoint {:?} must start with http:// or https://",
                    n.name, n.endpoint
                )));
            }
        }
        for e in &cf.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(malformed(format!(
                    "etcd endpoint {e:?} must start with http:// or https://"
                )));
            }
        }
        Ok(cf)
    }

    pub fn node(&self, name: &str) -> Result<&NodeEntry, ClusterFileError> {
        self.nodes
            .iter()
            .find(|n| n.name.as_str() == name)
            .ok_or_else(|| ClusterFileError::UnknownNode(name.to_string(), self.node_names()))
    }

    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        super::registry::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"name":"t","nodes":[{"name":"node1","endpoint":"http://10.0.0.2:7000","address":"10.0.0.2"}]}"#;

    #[test]
    fn parses_and_finds_nodes() {
        let cf = ClusterFile::parse(Path::new("c"), GOOD.as_bytes()).unwrap();
        assert_eq!(cf.node("node1").unwrap().address, "10.0.0.2");
        let err = cf.node("node9").unwrap_err().to_string();
        assert!(err.contains("node9") && err.contains("node1"), "{err}");
    }

    #[test]
    fn refuses_bad_files() {
        for bad in [
            "",
            "{}",
            r#"{"name":"t","nodes":[]}"#,
            r#"{"name":"t","nodes":[{"name":"../x","endpoint":"http://a:1","address":"a"}]}"#,
            r#"{"name":"t","nodes":[{"name":"n","endpoint":"ftp://a:1","address":"a"}]}"#,
            r#"{"name":"t","nodes":[{"name":"n","endpoint":"http://a:1","address":"a"},{"name":"n","endpoint":"http://a:1","address":"a"}]}"#,
        ] {
            assert!(
                ClusterFile::parse(Path::new("c"), bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn mutations_never_panic() {
        let mut seed: u64 = 7;
        for _ in 0..3000 {
            let mut b = GOOD.as_bytes().to_vec();
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (seed >> 33) as usize % b.len();
            b[i] = (seed >> 17) as u8;
            let _ = ClusterFile::parse(Path::new("c"), &b);
        }
    }
}
