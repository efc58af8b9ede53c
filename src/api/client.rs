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
/// HTTP/2 receive window of an agent's server per stream (its connection
/// window is twice this): room for a few image chunks of a push in flight.
pub const PUSH_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame an agent's server accepts (the protocol's default is
/// 16 KiB): fewer frames, and fewer headers to parse, per image chunk.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

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
/// a core for 1,000 agents). A tonic `Channel` is cheap to clone and
/// multiplexes calls over one HTTP/2 connection, so one per peer is enough.
/// A channel whose peer went away fails its next call ("Service was not
/// ready"), so callers [`forget`] an endpoint after a failed call and the
/// next call connects afresh. The CLIs use the pool too (a lookup and the
/// action that follows share one connection); [`agent`] always connects.
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

/// An agent client over this process's open channel to `endpoint`, or a new
/// one (kept for next time).
pub async fn pooled_agent(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<AgentClient<Channel>> {
    let key = (endpoint.to_string(), identity_key(tls));
    let cached = pool().lock().ok().and_then(|p| p.get(&key).cloned());
    let ch = match cached {
        Some(ch) => ch,
        None => {
            let ch = channel(endpoint, tls, connect_timeout).await?;
            if let Ok(mut p) = pool().lock() {
                p.insert(key, ch.clone());
            }
            ch
        }
    };
    Ok(AgentClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// Drop the pooled channel to `endpoint` (after a failed call).
pub fn forget(endpoint: &str) {
    if let Ok(mut p) = pool().lock() {
        p.retain(|(ep, _), _| ep != endpoint);
    }
}

/// Open a new channel.
pub async fn channel(
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
    ep.connect().await.map_err(|e| {
        // A handshake failure names the mistake (wrong CA, expired
        // certificate) instead of a bare "transport error".
        let why = crate::security::membership::explain_tls_error(&e);
        let err = anyhow::Error::new(e);
        match why {
            Some(why) => err.context(format!("TLS handshake with {endpoint} failed: {why}")),
            None => err,
        }
    })
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

/// The text of a status from an agent, with a TLS failure explained.
pub fn status_text(s: &tonic::Status) -> String {
    match crate::security::membership::explain_tls_error(s) {
        Some(why) => format!("{why}: {}", s.message()),
        None => s.message().to_string(),
    }
}
