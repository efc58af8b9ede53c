//! `mosctl certs`: a cluster CA, node certificates and the image key, for a
//! real cluster (the local cluster makes its own at `local up`), and with
//! `--cluster-file` the cluster file that lists the nodes.
//!
//! Why one command: joining machines to a cluster should be one step per
//! thing, and each re-run only adds. The CA and the image key are made the
//! first time and reused after; a node's certificate is issued once (its
//! files are kept on later runs); the cluster file gains the nodes named.
//! So adding a fourth node is the same command with one more `--node`.

use crate::core::cluster_file::{ClusterFile, NodeEntry, TlsFiles};
use crate::core::NodeName;
use anyhow::{bail, Context};
use std::path::PathBuf;

/// Default agent port on a real cluster (the local cluster uses the same).
const AGENT_PORT: u16 = 7000;
/// Default balancer port.
const BALANCER_PORT: u16 = 7070;
/// Where the packaged agent config puts mosrun's socket on every node.
const RUN_SOCKET: &str = "/run/mosix/mosixd.sock";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write into (created 0700): ca.pem, ca.key, NODE.pem/.key,
    /// client.pem/.key, image.key. An existing CA there is reused.
    #[arg(long)]
    pub dir: PathBuf,
    /// Cluster name (in the CA's subject, and the cluster file's name).
    #[arg(long, default_value = "mosix")]
    pub name: String,
    /// A node as NAME=ADDR[,ADDR...] (repeat for every node); the addresses
    /// go into the certificate as IP or DNS names; the first is where its
    /// agent listens.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    /// Also write (or add these nodes to) this cluster file, e.g.
    /// /etc/mosix/cluster.json, pointing at the certificates in --dir.
    #[arg(long)]
    pub cluster_file: Option<PathBuf>,
    /// The shared path, recorded in the cluster file (as the agents have it).
    #[arg(long, requires = "cluster_file")]
    pub shared: Option<PathBuf>,
    /// The address `mos-balance serve` listens on: issues the balancer's
    /// certificate (balancer.pem/.key) and records it in the cluster file.
    #[arg(long)]
    pub balancer: Option<String>,
    /// The agents' gRPC port, for the cluster file.
    #[arg(long, default_value_t = AGENT_PORT)]
    pub port: u16,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    for n in &a.nodes {
        let (name, addrs) = n
            .split_once('=')
            .with_context(|| format!("--node {n:?}: expected NAME=ADDR[,ADDR...]"))?;
        let mut sans: Vec<String> = addrs
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if sans.is_empty() {
            bail!("--node {n:?}: give at least one address (NAME=ADDR)");
        }
        sans.push(crate::api::client::CLUSTER_TLS_NAME.to_string());
        specs.push((name.to_string(), sans));
    }
    let mut all = specs.clone();
    if let Some(b) = &a.balancer {
        all.push((
            "balancer".to_string(),
            vec![b.clone(), crate::api::client::CLUSTER_TLS_NAME.to_string()],
        ));
    }
    crate::security::pki::write_cluster_pki(&a.dir, &a.name, &all)
        .context("writing certificates")?;
    let key = a.dir.join("image.key");
    if !key.exists() {
        crate::security::manifest::ClusterKey::generate()
            .save(&key)
            .context("writing the image key")?;
    }
    println!(
        "{}: the cluster CA, {} node certificate(s), a client certificate and image.key",
        a.dir.display(),
        specs.len(),
    );
    if let Some(path) = &a.cluster_file {
        write_cluster_file(path, &a, &specs)?;
        println!("{}: the cluster file", path.display());
    }
    println!(
        "give each node ca.pem, image.key and its own NODE.pem/NODE.key (never ca.key, never on the shared path)"
    );
    Ok(())
}

/// Write the cluster file, or add the nodes to the one there.
fn write_cluster_file(
    path: &std::path::Path,
    a: &Args,
    specs: &[(String, Vec<String>)],
) -> anyhow::Result<()> {
    // Absolute, because every node and CLI reads it from wherever it runs.
    let dir = std::path::absolute(&a.dir).context("resolving --dir")?;
    let mut cf = if path.exists() {
        let cf = ClusterFile::load(path)?;
        if cf.name != a.name {
            bail!(
                "{} is the cluster file of cluster {:?}, not {:?}: give --name {}",
                path.display(),
                cf.name,
                a.name,
                cf.name
            );
        }
        cf
    } else {
        ClusterFile {
            name: a.name.clone(),
            shared_root: None,
            balancer: None,
            tls: None,
            nodes: Vec::new(),
            etcd: Vec::new(),
        }
    };
    cf.tls = Some(TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    });
    if let Some(s) = &a.shared {
        cf.shared_root = Some(s.clone());
    }
    if let Some(b) = &a.balancer {
        cf.balancer = Some(format!("https://{}", host_port(b, BALANCER_PORT)));
    }
    for (name, sans) in specs {
        let address = sans.first().cloned().unwrap_or_default();
        let entry = NodeEntry {
            name: NodeName::parse(name)?,
            endpoint: format!("https://{}", host_port(&address, a.port)),
            address,
            metrics: None,
            run_socket: Some(PathBuf::from(RUN_SOCKET)),
        };
        match cf.nodes.iter_mut().find(|n| n.name == entry.name) {
            Some(n) => *n = entry,
            None => cf.nodes.push(entry),
        }
    }
    cf.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// `addr:port`, with brackets for an IPv6 address.
fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}
