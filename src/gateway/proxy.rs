//! The listeners: HTTP/1.1 (keep-alive on both sides: the client side is
//! [`super::server`], the instance side [`super::upstream`], both on the
//! connection's own task) and plain TCP; picking an instance, holding a
//! request while its only instance is moved, retries.
//!
//! Limits and the answers they give (the connection stays usable for other
//! clients throughout; each client connection is its own task):
//! - bad, oversized or slow request heads and bodies: 400, 431, 413, 408,
//!   as [`super::server`] says, and the connection is closed;
//! - no instance → 503 with a sentence saying why; held for `hold_ms` if an
//!   instance is being moved; backend failure → 502, backend too slow → 504;
//! - `max_connections` client connections at once: more wait in the
//!   kernel's accept queue.
//!
//! Requests are read whole (bounded by `max_body_bytes`), so one can be
//! sent again after a failure; responses are read whole too (bounded by
//! `max_response_bytes`), which keeps the in-flight count exact: a request
//! is in flight until its response is complete and its connection is back
//! in the pool (or closed, if the instance is being drained).
//!
//! A client that goes away while its request is at an instance is noticed
//! when its answer is written: the exchange runs to its end (bounded by
//! `backend_timeout_ms`), so the instance's connection stays in step and
//! goes back to the pool.

use super::http1::Stream;
use super::metrics::InstanceMetrics;
use super::pool::{self, Conn};
use super::server::{self, Refusal, Reply, Request, Watchdog};
use super::table::{self, Failure, InstanceState, NoInstance};
use super::upstream::{self, Answer, ExchangeError, Outgoing};
use super::{Gateway, Mode, Service, ServiceListen};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long a connect to an instance may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an instance that failed a connect or reset a request gets no traffic.
pub const EJECT_FOR: Duration = Duration::from_secs(2);
/// Attempts per request (the first and up to two retries).
const MAX_ATTEMPTS: usize = 3;
/// The header line of the gateway's own answers.
const TEXT: &[u8] = b"content-type: text/plain; charset=utf-8\r\n";

/// How a request ended.
enum Outcome {
    /// An instance answered; its header lines are in the caller's buffer.
    Forwarded(Answer),
    /// The gateway answers itself: a status and a sentence.
    Own(u16, String),
}

impl Outcome {
    fn status(&self) -> u16 {
        match self {
            Outcome::Forwarded(a) => a.status,
            Outcome::Own(code, _) => *code,
        }
    }
}

/// Accept clients of one service until the process ends.
pub async fn serve(
    gw: Arc<Gateway>,
    svc: ServiceListen,
    listener: TcpListener,
    conns: Arc<Semaphore>,
) {
    // Services are fixed at start, so this finds it; each connection then
    // holds it and looks nothing up by name.
    let Some(service) = gw.services.get(&svc.name).cloned() else {
        tracing::error!(service = %svc.name, "not in the gateway's table");
        return;
    };
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of fds and the like: wait instead of spinning.
                tracing::warn!(service = %svc.name, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let service = service.clone();
        tokio::spawn(async move {
            match svc.mode {
                Mode::Http => http_conn(gw, service, stream, peer).await,
                Mode::Tcp => tcp_conn(gw, service, stream).await,
            }
            drop(permit);
        });
    }
}

/// One client connection in HTTP mode: requests one after another, each
/// read whole, forwarded, answered.
async fn http_conn(gw: Arc<Gateway>, service: Arc<Service>, stream: TcpStream, peer: SocketAddr) {
    let lim = &gw.cfg.limits;
    let svc: &str = &service.name;
    // The client's address as it goes into X-Forwarded-For, formatted once
    // per connection rather than on every request it sends.
    let ip = peer.ip().to_string();
    let mut s = Stream::new(stream);
    let mut wd = Watchdog::new();
    // Buffers kept for the connection's life: the request as it goes to
    // the instance, the answer's header lines, the answer as it goes back.
    let mut wire = Vec::with_capacity(1024);
    let mut lines = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(1024);
    let mut waiting_since = Instant::now();
    let mut first = true;
    loop {
        let read = server::read_request(
            &mut s,
            &mut wd,
            lim,
            waiting_since,
            first,
            ip.as_bytes(),
            &mut wire,
        )
        .await;
        let req = match read {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(Refusal { status, why }) => {
                gw.metrics
                    .requests
                    .with_label_values(&[svc, "", &status.to_string()])
                    .inc();
                let body = format!("mosgw: {why}\n");
                let reply = own_reply(status, &body, true);
                let _ =
                    server::write_reply(&mut s.io, None, &reply, Instant::now(), &mut out).await;
                let _ = s.io.shutdown().await;
                return;
            }
        };
        first = false;
        lines.clear();
        let (outcome, end) = handle(&gw, &service, peer, &req, &wire, &mut wd, &mut lines).await;
        let own;
        let reply = match &outcome {
            Outcome::Forwarded(a) => Reply {
                status: a.status,
                lines: &lines,
                body: &a.body,
                dated: a.dated,
                length_in_lines: a.length_in_lines,
                close: !req.keep_alive,
            },
            Outcome::Own(status, msg) => {
                own = format!("mosgw: {msg}\n");
                own_reply(*status, &own, !req.keep_alive)
            }
        };
        let write_by = end + Duration::from_millis(lim.body_timeout_ms);
        let write = server::write_reply(&mut s.io, Some(&req), &reply, end, &mut out);
        let written = wd.within(write_by, write).await;
        if !matches!(written, Some(Ok(()))) || reply.close {
            let _ = s.io.shutdown().await;
            return;
        }
        // A large body made a buffer large: not kept for the connection's
        // life (a thousand idle connections would hold a megabyte each).
        server::shrink(&mut wire, &mut s.buf);
        waiting_since = end;
    }
}

/// An answer the gateway makes itself: plain text, no date of an instance,
/// its own length.
fn own_reply(status: u16, body: &str, close: bool) -> Reply<'_> {
    Reply {
        status,
        lines: TEXT,
        body: body.as_bytes(),
        dated: false,
        length_in_lines: false,
        close,
    }
}

/// One request: forward, account. Returns how it ended and when.
async fn handle(
    gw: &Arc<Gateway>,
    service: &Service,
    peer: SocketAddr,
    req: &Request,
    wire: &[u8],
    wd: &mut Watchdog,
    lines: &mut Vec<u8>,
) -> (Outcome, Instant) {
    let t0 = Instant::now();
    let svc: &str = &service.name;
    let (outcome, picked, end) = forward_request(gw, service, req, wire, wd, lines, t0).await;
    let code = outcome.status();
    // One clock read less: the end the in-flight count took, if any.
    let end = end.unwrap_or_else(Instant::now);
    let secs = end.saturating_duration_since(t0).as_secs_f64();
    let instance: &str = picked.as_ref().map_or("", |m| &m.job);
    match &picked {
        Some(m) if code == 200 => m.ok.inc(),
        _ => gw
            .metrics
            .requests
            .with_label_values(&[svc, instance, &code.to_string()])
            .inc(),
    }
    match &picked {
        Some(m) => m.latency.observe(secs),
        None => gw
            .metrics
            .latency
            .with_label_values(&[svc, ""])
            .observe(secs),
    }
    if gw.access.is_some() {
        let target = std::str::from_utf8(&wire[req.target.clone()]).unwrap_or("?");
        gw.access_log(format_args!(
            "{} {peer} {svc} {} {target:?} {code} {:.3}ms instance={}",
            crate::core::now_unix_ms(),
            req.method,
            secs * 1e3,
            if instance.is_empty() { "-" } else { instance }
        ));
    }
    (outcome, end)
}

async fn forward_request(
    gw: &Arc<Gateway>,
    service: &Service,
    req: &Request,
    wire: &[u8],
    wd: &mut Watchdog,
    lines: &mut Vec<u8>,
    t0: Instant,
) -> (Outcome, Option<Arc<InstanceMetrics>>, Option<Instant>) {
    let out = Outgoing {
        method: &req.method,
        wire,
    };
    let svc: &str = &service.name;
    let mut now = t0;
    let mut tried: Vec<String> = vec![];
    loop {
        let (m, pool, addr, picked_at) = match pick(gw, service, &tried, now).await {
            Ok(x) => x,
            Err(own) => return (own, None, None),
        };
        // After any hold in the pick: the instance's latency and the
        // backend deadline count from here.
        let sent = picked_at;
        let job: &str = &m.job;
        let flight = InFlight::new(gw, service, &m);
        let r = attempt(gw, &pool, addr, &out, sent, wd, lines).await;
        let end = Instant::now();
        flight.finish(r.is_ok().then_some((sent, end)));
        // A retry picks with the clock as it is now.
        now = end;
        match r {
            Ok(answer) => return (Outcome::Forwarded(answer), Some(m), Some(end)),
            Err(f) => {
                let kind = match f {
                    Failure::Connect => "connect",
                    Failure::NotSent => "not_sent",
                    Failure::Reset => "reset",
                    Failure::Timeout => "timeout",
                };
                gw.metrics.errors.with_label_values(&[svc, job, kind]).inc();
                if matches!(f, Failure::Connect | Failure::Reset) {
                    eject(gw, service, job);
                }
                tried.push(job.to_string());
                let budget = || service.with(|s| s.budget.withdraw()).unwrap_or(false);
                if tried.len() < MAX_ATTEMPTS && table::may_retry(&req.method, f) && budget() {
                    gw.metrics.retries.with_label_values(&[svc]).inc();
                    continue;
                }
                let own = match f {
                    Failure::Timeout => Outcome::Own(
                        504,
                        format!("instance {job} of service {svc} did not answer in time"),
                    ),
                    _ => Outcome::Own(
                        502,
                        format!("instance {job} of service {svc} failed ({kind}) and the request may not be retried"),
                    ),
                };
                return (own, Some(m), Some(end));
            }
        }
    }
}

/// One try at one instance; the answer's header lines go into `lines`
/// (left empty on a failure).
async fn attempt(
    gw: &Arc<Gateway>,
    pool: &pool::Pool,
    addr: SocketAddr,
    req: &Outgoing<'_>,
    sent: Instant,
    wd: &mut Watchdog,
    lines: &mut Vec<u8>,
) -> Result<Answer, Failure> {
    let lim = &gw.cfg.limits;
    let mut conn: Conn = match pool.take(addr) {
        Some(c) => c,
        None => pool::connect(addr, CONNECT_TIMEOUT)
            .await
            .map_err(|_| Failure::Connect)?,
    };
    // From when the request went out (no clock read of its own).
    let deadline = sent + Duration::from_millis(lim.backend_timeout_ms);
    let exchange = upstream::exchange(&mut conn.stream, req, lim.max_response_bytes, lines);
    // On any failure the connection is dropped here, which closes it.
    let r = match wd.within(deadline, exchange).await {
        Some(Ok((answer, keep))) => {
            if keep {
                pool.put(conn);
            }
            return Ok(answer);
        }
        Some(Err(ExchangeError::NotSent)) => Err(Failure::NotSent),
        Some(Err(ExchangeError::Reset)) => Err(Failure::Reset),
        None => Err(Failure::Timeout),
    };
    lines.clear();
    r
}

/// Choose an instance for a request (counting it in flight there), holding
/// the request while the service's instances are being moved.
async fn pick(
    gw: &Arc<Gateway>,
    service: &Service,
    avoid: &[String],
    mut now: Instant,
) -> Result<(Arc<InstanceMetrics>, Arc<pool::Pool>, SocketAddr, Instant), Outcome> {
    let svc: &str = &service.name;
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
        let r = service.with(|s| {
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
                    Ok((m.clone(), i.pool.clone(), i.addr))
                }
                None => Err(table::when_none_eligible(svc, s.instances.values())),
            }
        });
        match r {
            None => break Err(Outcome::Own(404, format!("no service {svc:?}"))),
            Some(Ok((m, pool, addr))) => {
                m.in_flight.inc();
                break Ok((m, pool, addr, now));
            }
            Some(Err(NoInstance::Unavailable(why))) => break Err(Outcome::Own(503, why)),
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
                    break Err(Outcome::Own(
                        503,
                        format!(
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
/// Dropped without [`InFlight::finish`] it still ends the request: a
/// request's future may be dropped mid-request (its connection's task
/// ended, as hyper's server did when a client went away), so code after
/// the `.await` never runs. Before this guard such requests stayed in flight for good:
/// the balancing bench's instances kept 10-13 phantom requests each, which
/// made a calm service look saturated, and a drain before a freeze would
/// wait its whole bound for requests that no longer existed.
struct InFlight<'a> {
    gw: &'a Gateway,
    service: &'a Service,
    m: &'a InstanceMetrics,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn new(gw: &'a Gateway, service: &'a Service, m: &'a InstanceMetrics) -> Self {
        Self {
            gw,
            service,
            m,
            done: false,
        }
    }

    /// The request ended, answered if `sent_end` (when it went out, when
    /// its answer was complete) says so.
    fn finish(mut self, sent_end: Option<(Instant, Instant)>) {
        self.done = true;
        finished(self.gw, self.service, self.m, sent_end);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned: no response time to learn from.
            finished(self.gw, self.service, self.m, None);
        }
    }
}

/// A request at `job` ended (sent and answered at `sent_end`, if it was
/// answered): no longer in flight; its latency feeds the balancer; wake
/// drains and holds.
fn finished(
    gw: &Gateway,
    service: &Service,
    m: &InstanceMetrics,
    sent_end: Option<(Instant, Instant)>,
) {
    service.with(|s| {
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
fn eject(gw: &Gateway, service: &Service, job: &str) {
    service.with(|s| {
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
async fn tcp_conn(gw: Arc<Gateway>, service: Arc<Service>, mut client: TcpStream) {
    let svc: &str = &service.name;
    let mut tried = vec![];
    loop {
        let (m, _, addr, _) = match pick(&gw, &service, &tried, Instant::now()).await {
            Ok(x) => x,
            Err(_) => return,
        };
        let job: &str = &m.job;
        let flight = InFlight::new(&gw, &service, &m);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut backend)) => {
                let _ = backend.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                flight.finish(None);
                gw.metrics
                    .requests
                    .with_label_values(&[svc, job, "tcp"])
                    .inc();
                return;
            }
            _ => {
                flight.finish(None);
                gw.metrics
                    .errors
                    .with_label_values(&[svc, job, "connect"])
                    .inc();
                eject(&gw, &service, job);
                tried.push(job.to_string());
                if tried.len() >= MAX_ATTEMPTS {
                    return;
                }
            }
        }
    }
}
