//! `mosctl certs`: a cluster CA, node certificates and the image key, for a
//! real cluster (the local cluster makes its own at `local up`).

use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write into (created 0700): ca.pem, ca.key, NODE.pem/.key,
    /// client.pem/.key, image.key. An existing CA there is reused.
    #[arg(long)]
    pub dir: PathBuf,
    /// Cluster name (in the CA's subject).
    #[arg(long, default_value = "mosix")]
    pub name: String,
    /// A node as NAME=ADDR[,ADDR...] (repeat for every node); the addresses
    /// go into the certificate as IP or DNS names.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
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
        sans.push(crate::api::client::CLUSTER_TLS_NAME.to_string());
        specs.push((name.to_string(), sans));
    }
    crate::security::pki::write_cluster_pki(&a.dir, &a.name, &specs)
        .context("writing certificates")?;
    let key = a.dir.join("image.key");
    if !key.exists() {
        crate::security::manifest::ClusterKey::generate()
            .save(&key)
            .context("writing the image key")?;
    }
    println!(
        "wrote the cluster CA, {} node certificate(s), a client certificate and image.key to {}",
        specs.len(),
        a.dir.display()
    );
    println!(
        "give each node its NODE.pem/NODE.key, ca.pem and image.key (never on the shared path)"
    );
    Ok(())
}
