//! Prometheus metrics of the gateway, per service and per instance (the
//! instance label is the job id), and the admin endpoint:
//! `GET /metrics` (Prometheus text format) and `GET /status` (the instance
//! table as JSON: service → [{job, node, addr, state, in_flight, ...}]).

use super::Gateway;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;

pub struct Metrics {
    pub registry: Registry,
    /// Requests answered, by service, instance ("" if none was reached) and status code.
    pub requests: IntCounterVec,
    /// Failures by service, instance and kind (connect, reset, timeout, ...).
    pub errors: IntCounterVec,
    /// Time from request to response, by service and instance.
    pub latency: HistogramVec,
    pub in_flight: IntGaugeVec,
    /// Requests waiting for an instance that is being moved, by service.
    pub held: IntGaugeVec,
    pub held_total: IntCounterVec,
    pub retries: IntCounterVec,
    /// Freeze announcements handled (acknowledged) by service and instance.
    pub drains: IntCounterVec,
}

/// Handles on one instance's series (see [`Metrics::for_instance`]).
#[derive(Debug)]
pub struct InstanceMetrics {
    pub job: Arc<str>,
    pub in_flight: IntGauge,
    pub latency: Histogram,
    /// Requests answered 200 (other codes go through `requests`).
    pub ok: IntCounter,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("mosgw_requests_total", "Requests answered"),
            &["service", "instance", "code"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("mosgw_errors_total", "Failed attempts at a backend"),
            &["service", "instance", "kind"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("mosgw_request_duration_seconds", "Request latency").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["service", "instance"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new("mosgw_in_flight", "Requests in flight"),
            &["service", "instance"],
        )?;
        let held = IntGaugeVec::new(
            Opts::new("mosgw_held", "Requests held for an instance being moved"),
            &["service"],
        )?;
        let held_total = IntCounterVec::new(
            Opts::new("mosgw_held_total", "Requests that were held"),
            &["service"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("mosgw_retries_total", "Requests sent again"),
            &["service"],
        )?;
        let drains = IntCounterVec::new(
            Opts::new("mosgw_drains_total", "Instances let go of before a freeze"),
            &["service", "instance"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(held_total.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(drains.clone()))?;
        Ok(Self {
            registry,
            requests,
            errors,
            latency,
            in_flight,
            held,
            held_total,
            retries,
            drains,
        })
    }

    /// The series of one instance that every request touches, looked up
    /// once. `with_label_values` hashes the labels and takes a lock each
    /// time; at tens of thousands of requests a second, four of those per
    /// request were a measurable share of the gateway's CPU.
    pub fn for_instance(&self, svc: &str, job: &str) -> InstanceMetrics {
        InstanceMetrics {
            job: Arc::from(job),
            in_flight: self.in_flight.with_label_values(&[svc, job]),
            latency: self.latency.with_label_values(&[svc, job]),
            ok: self.requests.with_label_values(&[svc, job, "200"]),
        }
    }

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

fn text(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answer one admin request.
pub fn admin(gw: &Arc<Gateway>, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gw.metrics.render(),
        ),
        "/status" => text(StatusCode::OK, "application/json", gw.status().to_string()),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "mosgw admin: try /metrics or /status\n".into(),
        ),
    }
}
