//! `mosgw`: the HTTP/TCP front end for mosix services (see `gateway`).

use crate::cli::common::Ctx;
use crate::gateway::{self, Config, Gateway, Mode, ServiceListen};
use anyhow::{bail, Context};
use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// mosgw: balance HTTP requests (or TCP connections) over the instances of
/// mosix services, following them as they migrate.
///
/// Instances are jobs started with `mosrun --service NAME --port PORT`.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// A JSON config file (format in the `gateway` module doc); flags add to it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Serve an HTTP service: NAME=ADDR:PORT (repeatable).
    #[arg(long = "service", value_name = "NAME=ADDR:PORT")]
    pub services: Vec<String>,
    /// Serve a service as plain TCP: NAME=ADDR:PORT (repeatable).
    #[arg(long = "tcp-service", value_name = "NAME=ADDR:PORT")]
    pub tcp_services: Vec<String>,
    /// Serve /metrics and /status here.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Largest request head in bytes (431 above; at least 8192).
    #[arg(long)]
    pub max_header_bytes: Option<usize>,
    /// Largest request body in bytes (413 above).
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Time for a client to send a request head, ms (408 after).
    #[arg(long)]
    pub header_timeout_ms: Option<u64>,
    /// Time for a client to send a request body, ms (408 after), and to
    /// take an answer (the connection is closed after).
    #[arg(long)]
    pub body_timeout_ms: Option<u64>,
    /// Time for an instance to answer, ms (504 after).
    #[arg(long)]
    pub backend_timeout_ms: Option<u64>,
    /// Client connections at once.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Slow start of a new or returned instance, ms.
    #[arg(long)]
    pub slow_start_ms: Option<u64>,
    /// Longest a request waits for an instance that is being moved, ms.
    #[arg(long)]
    pub hold_ms: Option<u64>,
    /// How often to read the job list and node loads, ms.
    #[arg(long)]
    pub poll_ms: Option<u64>,
    /// Access log file (`-` for stdout).
    #[arg(long)]
    pub access_log: Option<String>,
    /// Threads that serve requests [default: the CPUs this process may run
    /// on, e.g. 1 under `taskset -c 0`]. With 1, everything runs on one
    /// thread (a current-thread runtime: no cross-thread wakeups), like an
    /// nginx worker or HAProxy with `nbthread 1`.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Name this gateway gives the agents (they wait for its acknowledgement
    /// before freezing an instance) [default: mosgw-HOST-PID].
    #[arg(long)]
    pub subscriber: Option<String>,
}

fn parse_service(s: &str, mode: Mode) -> anyhow::Result<ServiceListen> {
    let (name, addr) = s
        .split_once('=')
        .with_context(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    let listen: SocketAddr = addr
        .parse()
        .with_context(|| format!("{s:?}: {addr:?} is not an ADDR:PORT"))?;
    Ok(ServiceListen {
        name: name.to_string(),
        listen,
        mode,
    })
}

/// The configuration from the file (if any) and the flags.
pub fn config(a: &Args) -> anyhow::Result<Config> {
    let mut c = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<Config>(&text)
                .with_context(|| format!("{} is not a valid mosgw config", p.display()))?
        }
        None => Config::default(),
    };
    for s in &a.services {
        c.services.push(parse_service(s, Mode::Http)?);
    }
    for s in &a.tcp_services {
        c.services.push(parse_service(s, Mode::Tcp)?);
    }
    let l = &mut c.limits;
    if let Some(v) = a.max_header_bytes {
        l.max_header_bytes = v;
    }
    if let Some(v) = a.max_body_bytes {
        l.max_body_bytes = v;
    }
    if let Some(v) = a.header_timeout_ms {
        l.header_timeout_ms = v;
    }
    if let Some(v) = a.body_timeout_ms {
        l.body_timeout_ms = v;
    }
    if let Some(v) = a.backend_timeout_ms {
        l.backend_timeout_ms = v;
    }
    if let Some(v) = a.max_connections {
        l.max_connections = v;
    }
    if let Some(v) = a.slow_start_ms {
        c.slow_start_ms = v;
    }
    if let Some(v) = a.hold_ms {
        c.hold_ms = v;
    }
    if let Some(v) = a.poll_ms {
        c.poll_ms = v;
    }
    if a.admin.is_some() {
        c.admin = a.admin;
    }
    if a.access_log.is_some() {
        c.access_log = a.access_log.clone();
    }
    c.validate()?;
    Ok(c)
}

async fn serve_admin(gw: Arc<Gateway>, l: tokio::net::TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = gateway::metrics::admin(&gw, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let cfg = config(&a)?;
    let ctx = Ctx::load(a.cluster.as_deref())?;
    let mut node_addrs = HashMap::new();
    for n in &ctx.cf.nodes {
        let ip = n.address.parse().with_context(|| {
            format!(
                "node {} has address {:?}, not an IP address",
                n.name, n.address
            )
        })?;
        node_addrs.insert(n.name.to_string(), ip);
    }
    if node_addrs.is_empty() {
        bail!("the cluster file lists no nodes");
    }
    let gw = Gateway::new(cfg.clone(), node_addrs)?;
    let mut listeners = vec![];
    for s in &cfg.services {
        let l = tokio::net::TcpListener::bind(s.listen).await.map_err(|e| {
            gateway::GatewayError::Listen {
                service: s.name.clone(),
                addr: s.listen,
                source: e,
            }
        })?;
        listeners.push((s.clone(), l));
    }
    if let Some(addr) = cfg.admin {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the admin endpoint"))?;
        tokio::spawn(serve_admin(gw.clone(), l));
    }
    let subscriber = a.subscriber.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("mosgw-{host}-{}", std::process::id())
    });
    gateway::discovery::start(gw.clone(), ctx.cf.clone(), ctx.tls.clone(), subscriber);
    let conns = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_connections));
    for (s, l) in listeners {
        tracing::info!(service = %s.name, listen = %s.listen, mode = ?s.mode, "serving");
        tokio::spawn(gateway::proxy::serve(gw.clone(), s, l, conns.clone()));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("mosgw stopping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_a_config() {
        let a = Args::parse_from([
            "mosgw",
            "--service",
            "web=127.0.0.1:8080",
            "--tcp-service",
            "db=127.0.0.1:5432",
            "--max-body-bytes",
            "10",
        ]);
        let c = config(&a).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].mode, Mode::Tcp);
        assert_eq!(c.limits.max_body_bytes, 10);
        for bad in [
            vec!["mosgw"],
            vec!["mosgw", "--service", "web"],
            vec!["mosgw", "--service", "web=nowhere"],
            vec!["mosgw", "--service", "w b=127.0.0.1:1"],
            vec![
                "mosgw",
                "--service",
                "web=127.0.0.1:1",
                "--max-header-bytes",
                "10",
            ],
        ] {
            assert!(config(&Args::parse_from(&bad)).is_err(), "{bad:?}");
        }
    }
}
