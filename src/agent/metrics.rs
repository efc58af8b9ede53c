//! Prometheus metrics of one agent: node load, jobs, and migrations with
//! their durations (histograms) and failures. Served over HTTP at `/metrics`.

use super::Agent;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct AgentMetrics {
    pub registry: Registry,
    pub load: Gauge,
    pub capacity: Gauge,
    pub jobs_running: IntGauge,
    pub migrations_in_flight: IntGauge,
    /// Seconds, by outcome (ok|rolled_back|failed) and kind (frozen|total).
    pub migration_seconds: HistogramVec,
    pub migration_failures: IntCounterVec,
}

impl AgentMetrics {
    pub fn new(node: &str) -> prometheus::Result<Self> {
        let labels = [("node".to_string(), node.to_string())].into();
        let registry = Registry::new_custom(Some("mosix".into()), Some(labels))?;
        let load = Gauge::new("node_load", "Runnable tasks of the node's jobs (smoothed)")?;
        let capacity = Gauge::new("node_capacity", "Cores x speed")?;
        let jobs_running = IntGauge::new("jobs_running", "Jobs running on this node")?;
        let migrations_in_flight = IntGauge::new(
            "migrations_in_flight",
            "Migrations under way from this node",
        )?;
        let migration_seconds = HistogramVec::new(
            HistogramOpts::new("migration_seconds", "Migration durations")
                .buckets(vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            &["kind", "outcome"],
        )?;
        let migration_failures = IntCounterVec::new(
            Opts::new("migration_failures_total", "Failed migrations by stage"),
            &["stage"],
        )?;
        registry.register(Box::new(load.clone()))?;
        registry.register(Box::new(capacity.clone()))?;
        registry.register(Box::new(jobs_running.clone()))?;
        registry.register(Box::new(migrations_in_flight.clone()))?;
        registry.register(Box::new(migration_seconds.clone()))?;
        registry.register(Box::new(migration_failures.clone()))?;
        Ok(Self {
            registry,
            load,
            capacity,
            jobs_running,
            migrations_in_flight,
            migration_seconds,
            migration_failures,
        })
    }
}

/// Render a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Serve `/metrics` for a registry on `addr` in the background.
pub async fn serve_registry(
    render_fn: Arc<dyn Fn() -> String + Send + Sync>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let f = render_fn.clone();
            async move { f() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok(())
}

pub async fn serve(agent: Arc<Agent>, addr: SocketAddr) -> anyhow::Result<()> {
    let f: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        let l = agent.node_load();
        let m = &agent.metrics;
        m.load.set(l.load);
        m.capacity.set(l.capacity);
        m.jobs_running.set(i64::from(l.jobs_running));
        m.migrations_in_flight
            .set(i64::from(l.migrations_in_flight));
        render(&m.registry)
    });
    serve_registry(f, addr).await
}
