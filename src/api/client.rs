//! Client helpers: connect to an agent or the balancer, with optional mTLS.

use super::pb::agent_client::AgentClient;
use super::pb::balancer_client::BalancerClient;
use crate::core::cluster_file::{ClusterFile, TlsFiles};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Every node certificate carries this DNS name, so clients can verify any
/// node of the cluster regardless of its address (trust is the cluster CA).
pub const CLUSTER_TLS_NAME: &str = "mosix.cluster";

/// Largest gRPC message we accept (job lists of a big cluster fit).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl ClientTls {
    pub fn load(files: &TlsFiles) -> anyhow::Result<Self> {
        use anyhow::Context;
        Ok(Self {
            ca_pem: std::fs::read(&files.ca)
                .with_context(|| format!("reading {}", files.ca.display()))?,
            cert_pem: std::fs::read(&files.cert)
                .with_context(|| format!("reading {}", files.cert.display()))?,
            key_pem: std::fs::read(&files.key)
                .with_context(|| format!("reading {}", files.key.display()))?,
        })
    }

    pub fn from_cluster(cf: &ClusterFile) -> anyhow::Result<Option<Self>> {
        cf.tls.as_ref().map(Self::load).transpose()
    }
}

/// Channels already open in this process, by endpoint and client identity.
///
/// Why: a balancer polls every agent every few seconds; a new mTLS
/// connection per agent per round costs a TLS handshake each (about 20% of
/// a core for 1,000 agents). A tonic `Channel` is cheap to clone, multiplexes
/// calls over one HTTP/2 connection and reconnects by itself when the
/// connection breaks, so one per peer is enough.
fn pool() -> &'static std::sync::Mutex<std::collections::HashMap<(String, u64), Channel>> {
    static POOL: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<(String, u64), Channel>>,
    > = std::sync::OnceLock::new();
    POOL.get_or_init(Default::default)
}

fn identity_key(tls: Option<&ClientTls>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(t) = tls {
        t.ca_pem.hash(&mut h);
        t.cert_pem.hash(&mut h);
        t.key_pem.hash(&mut h);
    }
    h.finish()
}

/// A channel to `endpoint`, reusing this process's open one if there is.
pub async fn channel(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<Channel> {
    let key = (endpoint.to_string(), identity_key(tls));
    if let Some(ch) = pool().lock().ok().and_then(|p| p.get(&key).cloned()) {
        return Ok(ch);
    }
    let ch = connect(endpoint, tls, connect_timeout).await?;
    if let Ok(mut p) = pool().lock() {
        p.insert(key, ch.clone());
    }
    Ok(ch)
}

/// Open a new channel (no reuse).
pub async fn connect(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<Channel> {
    let mut ep = Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    if let Some(t) = tls {
        let cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&t.ca_pem))
            .identity(Identity::from_pem(&t.cert_pem, &t.key_pem))
            .domain_name(CLUSTER_TLS_NAME);
        ep = ep.tls_config(cfg)?;
    }
    Ok(ep.connect().await?)
}

pub async fn agent(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<AgentClient<Channel>> {
    Ok(
        AgentClient::new(channel(endpoint, tls, connect_timeout).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
}

pub async fn balancer(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<BalancerClient<Channel>> {
    Ok(
        BalancerClient::new(channel(endpoint, tls, connect_timeout).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
}
