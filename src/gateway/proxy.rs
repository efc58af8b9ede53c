//! The listeners: HTTP/1.1 on hyper's server (keep-alive on both sides; the
//! instance side is [`super::upstream`], on the same task) and plain TCP;
//! picking an instance, holding a request while its only instance is
//! moved, retries, limits.
//!
//! Limits and the answers they give (the connection stays usable for other
//! clients throughout; each client connection is its own task):
//! - request head larger than `max_header_bytes` → 431 (hyper's parser);
//!   malformed request → 400 (hyper's parser);
//! - a first request head not complete within `header_timeout_ms` → 408;
//!   an idle keep-alive connection is just closed after that time;
//! - body larger than `max_body_bytes` (by Content-Length, or as it
//!   arrives) → 413; body not complete within `body_timeout_ms` → 408;
//! - no instance → 503 with a sentence saying why; held for `hold_ms` if an
//!   instance is being moved; backend failure → 502, backend too slow → 504;
//! - `max_connections` client connections at once: more wait in the
//!   kernel's accept queue.
//!
//! Requests are buffered whole (bounded by `max_body_bytes`), so one can be
//! sent again after a failure; responses are buffered whole too (bounded by
//! `max_response_bytes`), which keeps the in-flight count exact: a request
//! is in flight until its response is complete and its connection is back
//! in the pool (or closed, if the instance is being drained).

use super::metrics::InstanceMetrics;
use super::pool::{self, Conn};
use super::table::{self, Failure, InstanceState, NoInstance};
use super::upstream::{self, ExchangeError, Outgoing};
use super::{Gateway, Mode, ServiceListen};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long a connect to an instance may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an instance that failed a connect or reset a request gets no traffic.
pub const EJECT_FOR: Duration = Duration::from_secs(2);
/// Attempts per request (the first and up to two retries).
const MAX_ATTEMPTS: usize = 3;

type Body = Full<Bytes>;

fn reply(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("mosgw: {msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Same, and the client connection is closed after it (its request was not
/// read to the end).
fn reply_close(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = reply(code, msg);
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Accept clients of one service until the process ends.
pub async fn serve(
    gw: Arc<Gateway>,
    svc: ServiceListen,
    listener: TcpListener,
    conns: Arc<Semaphore>,
) {
    let name: Arc<str> = Arc::from(svc.name.as_str());
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of fds and the like: wait instead of spinning.
                tracing::warn!(service = %name, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let name = name.clone();
        tokio::spawn(async move {
            match svc.mode {
                Mode::Http => http_conn(gw, name, stream, peer).await,
                Mode::Tcp => tcp_conn(gw, name, stream).await,
            }
            drop(permit);
        });
    }
}

/// One client connection in HTTP mode.
async fn http_conn(gw: Arc<Gateway>, svc: Arc<str>, stream: TcpStream, peer: SocketAddr) {
    // A second handle on the socket, to answer 408 after hyper gave up on
    // a slow request head (hyper closes without a word).
    let spare = stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(spare, s)| Ok((spare, TcpStream::from_std(s)?)));
    let (spare, stream) = match spare {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("client socket: {e}");
            return;
        }
    };
    let served = Arc::new(AtomicU64::new(0));
    // The client's address as a header value, formatted once per
    // connection rather than on every request it sends.
    let client_ip = HeaderValue::from_str(&peer.ip().to_string()).ok();
    let lim = &gw.cfg.limits;
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(lim.header_timeout_ms))
        .max_buf_size(lim.max_header_bytes)
        .keep_alive(true);
    let svc_fn = {
        let served = served.clone();
        let gw = gw.clone();
        hyper::service::service_fn(move |req| {
            served.fetch_add(1, Ordering::Relaxed);
            let gw = gw.clone();
            let svc = svc.clone();
            let client_ip = client_ip.clone();
            async move {
                let client = Client {
                    addr: peer,
                    ip: client_ip,
                };
                Ok::<_, std::convert::Infallible>(handle(gw, svc, client, req).await)
            }
        })
    };
    let r = b.serve_connection(TokioIo::new(stream), svc_fn).await;
    if let Err(e) = r {
        if e.is_timeout() && served.load(Ordering::Relaxed) == 0 {
            let _ = answer_408(spare).await;
        }
    }
}

async fn answer_408(s: std::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::from_std(s)?;
    let body = "mosgw: the request head did not arrive in time\n";
    let msg = format!(
        "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await
}

/// Who sent a request: its address, and that address as a header value.
struct Client {
    addr: SocketAddr,
    ip: Option<HeaderValue>,
}

/// One request: read the body within the limits, forward, account.
async fn handle(
    gw: Arc<Gateway>,
    svc: Arc<str>,
    client: Client,
    req: Request<Incoming>,
) -> Response<Body> {
    let peer = client.addr;
    let t0 = Instant::now();
    // Only kept when there is an access log to write it to.
    let logged = gw.access.is_some().then(|| {
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        (req.method().clone(), target)
    });
    let (resp, picked, end) = forward_request(&gw, &svc, &client, req, t0).await;
    let code = resp.status();
    // One clock read less: the end the in-flight count took, if any.
    let end = end.unwrap_or_else(Instant::now);
    let secs = end.saturating_duration_since(t0).as_secs_f64();
    let instance: &str = picked.as_ref().map_or("", |m| &m.job);
    match &picked {
        Some(m) if code == StatusCode::OK => m.ok.inc(),
        _ => gw
            .metrics
            .requests
            .with_label_values(&[&*svc, instance, code.as_str()])
            .inc(),
    }
    match &picked {
        Some(m) => m.latency.observe(secs),
        None => gw
            .metrics
            .latency
            .with_label_values(&[&*svc, ""])
            .observe(secs),
    }
    if let Some((method, target)) = logged {
        gw.access_log(format_args!(
            "{} {peer} {svc} {method} {target:?} {} {:.3}ms instance={}",
            crate::core::now_unix_ms(),
            code.as_u16(),
            secs * 1e3,
            if instance.is_empty() { "-" } else { &instance }
        ));
    }
    resp
}

async fn forward_request(
    gw: &Arc<Gateway>,
    svc: &str,
    client: &Client,
    req: Request<Incoming>,
    t0: Instant,
) -> (
    Response<Body>,
    Option<Arc<InstanceMetrics>>,
    Option<Instant>,
) {
    let lim = &gw.cfg.limits;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > lim.max_body_bytes as u64) {
        return (
            reply_close(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {} bytes", lim.max_body_bytes),
            ),
            None,
            None,
        );
    }
    let (parts, body) = req.into_parts();
    // Most requests have no body: no timer, no collecting, and they go on
    // at the time their head came (t0); one with a body, once it is whole.
    let mut now = t0;
    let collected = if hyper::body::Body::is_end_stream(&body) {
        Ok(Ok(Bytes::new()))
    } else {
        let c = tokio::time::timeout(
            Duration::from_millis(lim.body_timeout_ms),
            Limited::new(body, lim.max_body_bytes).collect(),
        )
        .await
        .map(|r| r.map(|c| c.to_bytes()));
        now = Instant::now();
        c
    };
    let body = match collected {
        Err(_) => {
            return (
                reply_close(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                ),
                None,
                None,
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return (
                reply_close(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body larger than {} bytes", lim.max_body_bytes),
                ),
                None,
                None,
            )
        }
        Ok(Err(e)) => {
            return (
                reply_close(StatusCode::BAD_REQUEST, &format!("bad request body: {e}")),
                None,
                None,
            )
        }
        Ok(Ok(b)) => b,
    };
    let hyper::http::request::Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    strip_hop_by_hop(&mut headers);
    if let Some(ip) = &client.ip {
        append_forwarded_for(&mut headers, ip);
    }
    // An HTTP/1.1 server sees origin-form targets: sent as they came. An
    // absolute-form one (a proxy request) is cut to its path.
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut tried: Vec<String> = vec![];
    loop {
        let (m, addr, picked_at) = match pick(gw, svc, &tried, now).await {
            Ok(x) => x,
            Err(resp) => return (resp, None, None),
        };
        let out = Outgoing {
            method: &method,
            target,
            headers: &headers,
            body: &body,
        };
        // After any hold in the pick: the instance's latency and the
        // backend deadline count from here.
        let sent = picked_at;
        let job: &str = &m.job;
        let flight = InFlight::new(gw, svc, &m);
        let r = attempt(gw, job, addr, &out, sent).await;
        let end = Instant::now();
        flight.finish(r.is_ok().then_some((sent, end)));
        // A retry picks with the clock as it is now.
        now = end;
        match r {
            Ok(resp) => return (resp, Some(m), Some(end)),
            Err(f) => {
                let kind = match f {
                    Failure::Connect => "connect",
                    Failure::NotSent => "not_sent",
                    Failure::Reset => "reset",
                    Failure::Timeout => "timeout",
                };
                gw.metrics.errors.with_label_values(&[svc, job, kind]).inc();
                if matches!(f, Failure::Connect | Failure::Reset) {
                    eject(gw, svc, job);
                }
                tried.push(job.to_string());
                let budget = || {
                    gw.with_service(svc, |s| s.budget.withdraw())
                        .unwrap_or(false)
                };
                if tried.len() < MAX_ATTEMPTS && table::may_retry(&method, f) && budget() {
                    gw.metrics.retries.with_label_values(&[svc]).inc();
                    continue;
                }
                let resp = match f {
                    Failure::Timeout => reply(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("instance {job} of service {svc} did not answer in time"),
                    ),
                    _ => reply(
                        StatusCode::BAD_GATEWAY,
                        &format!("instance {job} of service {svc} failed ({kind}) and the request may not be retried"),
                    ),
                };
                return (resp, Some(m), Some(end));
            }
        }
    }
}

/// Connection-level headers (RFC 9110 7.6.1) are not forwarded.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Names, not strings: a string is parsed and hashed on every remove.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    use hyper::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    const HOP_BY_HOP: [HeaderName; 7] = [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ];
    // Most requests and responses carry none of them: one look at each
    // name (a standard name compares as a tag) instead of seven hashed
    // removes. Any name a Connection header lists is only removed when
    // there is a Connection header, which takes the long way.
    if !h.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    let listed: Vec<HeaderName> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn append_forwarded_for(h: &mut HeaderMap, ip: &HeaderValue) {
    // A name, not a string: a string is parsed and hashed on every lookup.
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    let joined = match h.get(&X_FORWARDED_FOR) {
        // Most requests come straight from their client: no header to join.
        None => ip.clone(),
        Some(prev) => {
            let mut v = prev.as_bytes().to_vec();
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip.as_bytes());
            match HeaderValue::from_bytes(&v) {
                Ok(v) => v,
                Err(_) => return,
            }
        }
    };
    h.insert(X_FORWARDED_FOR, joined);
}

/// One try at one instance.
async fn attempt(
    gw: &Arc<Gateway>,
    job: &str,
    addr: SocketAddr,
    req: &Outgoing<'_>,
    sent: Instant,
) -> Result<Response<Body>, Failure> {
    let lim = &gw.cfg.limits;
    let pool = gw.pool(job);
    let mut conn: Conn = match pool.take(addr) {
        Some(c) => c,
        None => pool::connect(addr, CONNECT_TIMEOUT)
            .await
            .map_err(|_| Failure::Connect)?,
    };
    // From when the request went out (no clock read of its own).
    let deadline =
        tokio::time::Instant::from_std(sent) + Duration::from_millis(lim.backend_timeout_ms);
    // On any failure the connection is dropped here, which closes it.
    match tokio::time::timeout_at(
        deadline,
        upstream::exchange(&mut conn.stream, req, lim.max_response_bytes),
    )
    .await
    {
        Ok(Ok((mut resp, keep))) => {
            if keep {
                pool.put(conn);
            }
            strip_hop_by_hop(resp.headers_mut());
            resp.headers_mut().remove(hyper::header::CONTENT_LENGTH);
            Ok(resp)
        }
        Ok(Err(ExchangeError::NotSent)) => Err(Failure::NotSent),
        Ok(Err(ExchangeError::Reset)) => Err(Failure::Reset),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Choose an instance for a request (counting it in flight there), holding
/// the request while the service's instances are being moved.
async fn pick(
    gw: &Arc<Gateway>,
    svc: &str,
    avoid: &[String],
    mut now: Instant,
) -> Result<(Arc<InstanceMetrics>, SocketAddr, Instant), Response<Body>> {
    let hold = Duration::from_millis(gw.cfg.hold_ms);
    // Read when holding starts (most requests never hold).
    let mut deadline = None;
    let mut holding = false;
    let result = loop {
        // While holding, registered before looking, so a change between
        // the look and the wait is not missed. (Not before: registering
        // takes the Notify's lock twice, on every request.)
        let notified = gw.changed.notified();
        tokio::pin!(notified);
        if holding {
            notified.as_mut().enable();
        }
        let slow = gw.slow_start();
        let r = gw.with_service(svc, |s| {
            // A request pays into the retry budget once, on its first
            // look, under the lock the pick takes anyway.
            if avoid.is_empty() && !holding {
                s.budget.deposit();
            }
            let choice = table::choose(
                s.instances.values(),
                avoid,
                now,
                slow,
                &mut s.saturation,
                |n| rand::random_range(0..n),
            );
            match choice.and_then(|j| s.instances.get_mut(&j)) {
                Some(i) => {
                    i.in_flight += 1;
                    let m = i
                        .metrics
                        .get_or_insert_with(|| Arc::new(gw.metrics.for_instance(svc, &i.job)));
                    Ok((m.clone(), i.addr))
                }
                None => Err(table::when_none_eligible(svc, s.instances.values())),
            }
        });
        match r {
            None => break Err(reply(StatusCode::NOT_FOUND, &format!("no service {svc:?}"))),
            Some(Ok((m, addr))) => {
                m.in_flight.inc();
                break Ok((m, addr, now));
            }
            Some(Err(NoInstance::Unavailable(why))) => {
                break Err(reply(StatusCode::SERVICE_UNAVAILABLE, &why))
            }
            Some(Err(NoInstance::Hold)) => {
                if !holding {
                    holding = true;
                    deadline = Some(tokio::time::Instant::now() + hold);
                    gw.metrics.held.with_label_values(&[svc]).inc();
                    gw.metrics.held_total.with_label_values(&[svc]).inc();
                    // Look again, registered this time.
                    continue;
                }
                let until = deadline.unwrap_or_else(tokio::time::Instant::now);
                let woken = tokio::time::timeout_at(until, notified).await;
                now = Instant::now();
                if woken.is_err() {
                    break Err(reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "service {svc:?}: its instances are being moved and none came back within {} ms",
                            hold.as_millis()
                        ),
                    ));
                }
            }
        }
    };
    if holding {
        gw.metrics.held.with_label_values(&[svc]).dec();
    }
    result
}

/// A request counted in flight at an instance (by [`pick`]) until it ends.
///
/// Dropped without [`InFlight::finish`] it still ends the request: hyper
/// drops a request's future when its client goes away mid-request (a load
/// generator stopping, a browser tab closed), so code after the `.await`
/// never runs. Before this guard such requests stayed in flight for good:
/// the balancing bench's instances kept 10-13 phantom requests each, which
/// made a calm service look saturated, and a drain before a freeze would
/// wait its whole bound for requests that no longer existed.
struct InFlight<'a> {
    gw: &'a Gateway,
    svc: &'a str,
    m: &'a InstanceMetrics,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn new(gw: &'a Gateway, svc: &'a str, m: &'a InstanceMetrics) -> Self {
        Self {
            gw,
            svc,
            m,
            done: false,
        }
    }

    /// The request ended, answered if `sent_end` (when it went out, when
    /// its answer was complete) says so.
    fn finish(mut self, sent_end: Option<(Instant, Instant)>) {
        self.done = true;
        finished(self.gw, self.svc, self.m, sent_end);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned: no response time to learn from.
            finished(self.gw, self.svc, self.m, None);
        }
    }
}

/// A request at `job` ended (sent and answered at `sent_end`, if it was
/// answered): no longer in flight; its latency feeds the balancer; wake
/// drains and holds.
fn finished(gw: &Gateway, svc: &str, m: &InstanceMetrics, sent_end: Option<(Instant, Instant)>) {
    gw.with_service(svc, |s| {
        if let Some(i) = s.instances.get_mut(&*m.job) {
            i.in_flight = i.in_flight.saturating_sub(1);
            if let Some((sent, end)) = sent_end {
                let rtt = end.saturating_duration_since(sent);
                i.latency = Some(table::PeakEwma::observe(i.latency, rtt, end));
            }
        }
    });
    m.in_flight.dec();
    gw.changed.notify_waiters();
}

/// Passive health check: no traffic to `job` for a while (the active probe
/// re-admits it). An instance being drained or away is left alone.
fn eject(gw: &Gateway, svc: &str, job: &str) {
    gw.with_service(svc, |s| {
        if let Some(i) = s.instances.get_mut(job) {
            if matches!(
                i.state,
                InstanceState::Active | InstanceState::Ejected { .. }
            ) {
                i.state = InstanceState::Ejected {
                    until: Instant::now() + EJECT_FOR,
                };
            }
        }
    });
    gw.changed.notify_waiters();
}

/// One client connection in TCP mode: bytes copied both ways to an instance.
async fn tcp_conn(gw: Arc<Gateway>, svc: Arc<str>, mut client: TcpStream) {
    let mut tried = vec![];
    loop {
        let (m, addr, _) = match pick(&gw, &svc, &tried, Instant::now()).await {
            Ok(x) => x,
            Err(_) => return,
        };
        let job: &str = &m.job;
        let flight = InFlight::new(&gw, &svc, &m);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut backend)) => {
                let _ = backend.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                flight.finish(None);
                gw.metrics
                    .requests
                    .with_label_values(&[&*svc, job, "tcp"])
                    .inc();
                return;
            }
            _ => {
                flight.finish(None);
                gw.metrics
                    .errors
                    .with_label_values(&[&*svc, job, "connect"])
                    .inc();
                eject(&gw, &svc, job);
                tried.push(job.to_string());
                if tried.len() >= MAX_ATTEMPTS {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "example"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("host"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("10.0.0.9"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("10.0.0.8"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 10.0.0.8");
        // None of them: left as it is.
        let mut plain = headers(&[("host", "example"), ("content-length", "2")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
        // Only a name the Connection header lists, and the header itself.
        let mut listed = headers(&[("connection", "x-a"), ("x-a", "1"), ("x-b", "2")]);
        strip_hop_by_hop(&mut listed);
        assert_eq!(listed.len(), 1);
        assert!(listed.contains_key("x-b"));
    }
}
