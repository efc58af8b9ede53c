//! `mosgw`: an HTTP/1.1 (and plain TCP) front end for services whose
//! instances are mosix jobs, and that knows when an instance is about to be
//! frozen and moved.
//!
//! Why a gateway of our own: HAProxy, nginx, Envoy or LVS learn that a
//! backend moved from a failed connect or a health check, and then retry,
//! eject or hold the request. CRIU moreover refuses to dump a job that holds
//! an established TCP connection, and a proxy's pooled keep-alive
//! connections are exactly that. So mosgw subscribes to every agent's job
//! events (`WatchEvents`): when an agent announces that an instance will be
//! frozen, mosgw stops sending it new requests, lets the in-flight ones
//! finish (bounded), closes its pooled connections to it and acknowledges
//! (`AckFreeze`); the agent dumps only then. While the instance is away its
//! requests go to the other instances, or — if it was the only one — are
//! held until it runs again at its new address (bounded by `hold`).
//!
//! Parts:
//! - [`table`]: the instance table and the pure rules (P2C choice, slow
//!   start, retries), unit-tested without sockets;
//! - [`discovery`]: keeps the table current from the agents (job list and
//!   load every `poll`, the event streams in between), active probes, the
//!   drain-and-acknowledge step;
//! - [`proxy`]: the listeners (HTTP/1.1, and a byte copy for TCP), picking
//!   an instance, retries and holding;
//! - [`server`]: the client side of HTTP/1.1 (a request read within the
//!   limits, an answer written); [`upstream`] and [`pool`]: the exchange
//!   with an instance, on the request's own task, and the kept sockets a
//!   freeze closes; [`http1`]: the framing both sides share (heads parsed
//!   by httparse, the parser hyper uses);
//! - [`metrics`]: Prometheus metrics and the admin endpoint (`/metrics`,
//!   `/status`: the table as JSON).
//!
//! Config file (JSON, `mosgw --config FILE`; every field but `services` is
//! optional and defaults to the flag's default):
//!
//! ```json
//! { "services": [ { "name": "web", "listen": "0.0.0.0:8080", "mode": "http" },
//!                 { "name": "db",  "listen": "0.0.0.0:5432", "mode": "tcp" } ],
//!   "admin": "127.0.0.1:9180",
//!   "limits": { "max_header_bytes": 16384, "max_body_bytes": 1048576,
//!               "header_timeout_ms": 10000, "body_timeout_ms": 10000,
//!               "backend_timeout_ms": 30000, "max_connections": 10000 },
//!   "slow_start_ms": 5000, "hold_ms": 10000, "poll_ms": 1000 }
//! ```

pub mod discovery;
pub mod http1;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod table;
pub mod upstream;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{Instance, RetryBudget, Saturation};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad gateway configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr} for service {service}: {source}")]
    Listen {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceListen {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest request head (request line and headers); larger gets 431.
    /// At least 8192 (a head smaller than that is no real limit).
    pub max_header_bytes: usize,
    /// Largest request body; larger gets 413.
    pub max_body_bytes: usize,
    /// A client must send a request head within this (else 408).
    pub header_timeout_ms: u64,
    /// ... and its body within this (else 408); and take an answer within
    /// this (else the connection is closed: a client that stops reading
    /// would hold its connection for good).
    pub body_timeout_ms: u64,
    /// A backend must answer within this (else 504).
    pub backend_timeout_ms: u64,
    /// Client connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// Largest response body taken from a backend (else 502).
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 << 10,
            max_body_bytes: 1 << 20,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            backend_timeout_ms: 30_000,
            max_connections: 10_000,
            max_response_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub services: Vec<ServiceListen>,
    /// Where `/metrics` and `/status` are served (none if unset).
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    /// Slow start of a new or returned instance.
    pub slow_start_ms: u64,
    /// Longest a request waits for an instance that is being moved.
    pub hold_ms: u64,
    /// How often the job list and node loads are read.
    pub poll_ms: u64,
    /// Where access-log lines go (none if unset; `-` for stdout).
    pub access_log: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            services: vec![],
            admin: None,
            limits: Limits::default(),
            slow_start_ms: 5_000,
            hold_ms: 10_000,
            poll_ms: 1_000,
            access_log: None,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.services.is_empty() {
            return Err(GatewayError::Config(
                "no services: give --service NAME=ADDR:PORT or a config file".into(),
            ));
        }
        for s in &self.services {
            crate::core::ServiceDecl::new(&s.name, 1).map_err(GatewayError::Config)?;
        }
        let mut names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.services.len() {
            return Err(GatewayError::Config("a service is listed twice".into()));
        }
        let l = &self.limits;
        if l.max_header_bytes < 8192 {
            return Err(GatewayError::Config(format!(
                "max_header_bytes {} is below 8192 (the smallest request-head buffer)",
                l.max_header_bytes
            )));
        }
        if l.max_connections == 0 || l.header_timeout_ms == 0 || l.body_timeout_ms == 0 {
            return Err(GatewayError::Config(
                "max_connections and timeouts must be above zero".into(),
            ));
        }
        if self.poll_ms < 50 {
            return Err(GatewayError::Config("poll_ms below 50".into()));
        }
        Ok(())
    }
}

/// One service's instances, and a signal for requests held for them.
#[derive(Default)]
pub struct ServiceTable {
    pub instances: HashMap<String, Instance>,
    pub budget: RetryBudget,
    /// Whether the service has been saturated lately (the balancing rule).
    pub saturation: Saturation,
}

/// One service: its name and its table behind a lock of its own. Each of
/// its client connections holds it, so a request reaches its table without
/// looking the service up by name (twice a request, before).
pub struct Service {
    pub name: Arc<str>,
    table: Mutex<ServiceTable>,
}

impl Service {
    fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            table: Mutex::new(ServiceTable::default()),
        }
    }

    /// Run `f` on the table (None only if a panic poisoned its lock).
    pub fn with<T>(&self, f: impl FnOnce(&mut ServiceTable) -> T) -> Option<T> {
        self.table.lock().ok().map(|mut t| f(&mut t))
    }
}

/// The gateway's shared state.
pub struct Gateway {
    pub cfg: Config,
    /// By name; fixed at start (the services are the configuration's).
    pub services: HashMap<String, Arc<Service>>,
    /// Wakes requests held for an instance and drain waiters when the
    /// table changes or an in-flight request ends.
    pub changed: Notify,
    pub metrics: metrics::Metrics,
    pub access: Option<Mutex<Box<dyn std::io::Write + Send>>>,
    /// Node name → address jobs answer on (from the cluster file).
    pub node_addrs: HashMap<String, std::net::IpAddr>,
}

impl Gateway {
    pub fn new(
        cfg: Config,
        node_addrs: HashMap<String, std::net::IpAddr>,
    ) -> Result<Arc<Self>, GatewayError> {
        cfg.validate()?;
        let access: Option<Box<dyn std::io::Write + Send>> = match cfg.access_log.as_deref() {
            None => None,
            Some("-") => Some(Box::new(std::io::LineWriter::new(std::io::stdout()))),
            Some(p) => Some(Box::new(std::io::LineWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| GatewayError::Config(format!("access log {p}: {e}")))?,
            ))),
        };
        let services = cfg
            .services
            .iter()
            .map(|s| (s.name.clone(), Arc::new(Service::new(&s.name))))
            .collect();
        Ok(Arc::new(Self {
            metrics: metrics::Metrics::new()?,
            cfg,
            services,
            changed: Notify::new(),
            access: access.map(Mutex::new),
            node_addrs,
        }))
    }

    pub fn slow_start(&self) -> Duration {
        Duration::from_millis(self.cfg.slow_start_ms)
    }

    /// Run `f` on a service's table (None if the service is not ours).
    pub fn with_service<T>(&self, name: &str, f: impl FnOnce(&mut ServiceTable) -> T) -> Option<T> {
        self.services.get(name)?.with(f)
    }

    /// Run `f` on every service's table in turn, with its name.
    pub fn each_service(&self, mut f: impl FnMut(&str, &mut ServiceTable)) {
        for (name, s) in &self.services {
            s.with(|t| f(name, t));
        }
    }

    pub fn access_log(&self, line: std::fmt::Arguments<'_>) {
        if let Some(w) = &self.access {
            if let Ok(mut w) = w.lock() {
                let _ = writeln!(w, "{line}");
            }
        }
    }

    /// The table as JSON (for `/status` and tests).
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut out = serde_json::Map::new();
        self.each_service(|name, s| {
            let list: Vec<serde_json::Value> = s
                .instances
                .values()
                .map(|i| {
                    serde_json::json!({
                        "job": i.job,
                        "node": i.node,
                        "addr": i.addr.to_string(),
                        "state": i.state.name(),
                        "in_flight": i.in_flight,
                        "latency_ewma_ms": i.latency.map(|l| l.secs * 1e3),
                        "load_per_capacity": i.load_per_capacity,
                        "weight": table::slow_start_weight(now.saturating_duration_since(i.since), self.slow_start()),
                    })
                })
                .collect();
            out.insert(name.to_string(), serde_json::Value::Array(list));
        });
        serde_json::Value::Object(out)
    }
}

use std::io::Write as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_and_is_checked() {
        let c: Config = serde_json::from_str(
            r#"{"services":[{"name":"web","listen":"127.0.0.1:8080"},
                            {"name":"db","listen":"0.0.0.0:5432","mode":"tcp"}],
                "limits":{"max_body_bytes":100}}"#,
        )
        .unwrap();
        assert_eq!(c.services[0].mode, Mode::Http);
        assert_eq!(c.services[1].mode, Mode::Tcp);
        assert_eq!(c.limits.max_body_bytes, 100);
        assert_eq!(c.limits.max_header_bytes, 16 << 10);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.limits.max_header_bytes = 100;
        assert!(bad.validate().unwrap_err().to_string().contains("8192"));
        let mut bad = c.clone();
        bad.services[1].name = "web".into();
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.services[0].name = "a/b".into();
        assert!(bad.validate().is_err());
        assert!(Config::default().validate().is_err());
    }
}
