//! The instance table and the pure rules over it: which instance gets a
//! request (power of two choices), how fast a new one ramps up (slow start),
//! when a failed request may be tried again (retry rules and budget).
//!
//! Nothing here touches a socket or a clock of its own: callers pass `now`
//! and a random source, so every rule is unit-tested as plain data.
//!
//! The choice follows linkerd2-proxy's balancer: pick two instances at
//! random and send to the one with the lower cost. The two are drawn with
//! probability proportional to 1 / cost (see [`p2c_weighted`]), so two slow
//! instances are seldom the only choice while faster ones are free. Its cost here is
//! `(in_flight + 1) × peak_ewma_latency × (1 + node load per capacity) /
//! slow_start_weight`, where the load term counts only until the instance
//! has answered (after that its latency carries the load):
//! - in-flight requests are the fastest signal of a slow instance;
//! - the peak-EWMA of its response times (linkerd's `PeakEwma`: a slower
//!   response raises the estimate at once, faster ones pull it down with a
//!   10 s time constant) says how long each of them will take. An instance
//!   on a slower or busier node answers more slowly, so it gets fewer
//!   requests in proportion, before any in-flight count builds up;
//! - the node's capacity-normalised load (from the agents' `GetLoad`) says
//!   which of two instances sits on the busier node before either has
//!   answered anything (and a new one starts from the service's typical
//!   latency, not from zero, so it is not flooded);
//! - a new or returned instance starts at a tenth of its weight (slow start);
//! - when the service has had requests queued everywhere for a while
//!   (saturated, see [`Saturation`]), the instance with the fewest
//!   outstanding requests wins outright (least outstanding, as HAProxy's
//!   leastconn and nginx's least_conn), which keeps every instance busy
//!   (see [`choose`] and [`least`]).

use super::metrics::InstanceMetrics;
use super::pool::Pool;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an instance is in its life as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InstanceState {
    /// Takes requests.
    Active,
    /// Its agent announced a freeze (`freeze_id`): no new requests; the
    /// in-flight ones finish, then the gateway closes its connections and
    /// acknowledges.
    Draining { freeze_id: u64 },
    /// Frozen or moving. `generation` is the job record's generation when
    /// the freeze was announced: only a newer record brings it back.
    Away { generation: u64 },
    /// Failed a connect, a probe or reset a request: no traffic until
    /// `until`, then the probe decides.
    Ejected { until: Instant },
}

impl InstanceState {
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::Active => "active",
            InstanceState::Draining { .. } => "draining",
            InstanceState::Away { .. } => "away",
            InstanceState::Ejected { .. } => "ejected",
        }
    }
}

/// One instance of a service: a job listening on `addr` (its node's
/// address and the declared port).
#[derive(Debug, Clone)]
pub struct Instance {
    pub job: String,
    pub node: String,
    pub addr: SocketAddr,
    pub state: InstanceState,
    /// Start of its slow start (it appeared, returned, or was re-admitted).
    pub since: Instant,
    pub in_flight: u32,
    /// The node's load divided by its capacity (0 = idle).
    pub load_per_capacity: f64,
    /// Consecutive failed probes.
    pub probe_failures: u32,
    /// Peak-EWMA of response times, seconds (None until the first one).
    pub latency: Option<PeakEwma>,
    /// Its metric series, looked up on its first request.
    pub metrics: Option<Arc<InstanceMetrics>>,
    /// Its kept connections. Owned here, so a request finds them with its
    /// choice, and an instance that leaves the table takes them along: they
    /// close once the last request that holds the pool lets go.
    pub pool: Arc<Pool>,
}

/// linkerd2-proxy's peak-sensitive moving average of response times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    pub secs: f64,
    pub at: Instant,
}

/// Time constant of the latency average.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latencies below this count as this: differences under a few
/// milliseconds are noise (a context switch, a page fault), not a slower
/// instance, and with no request in flight the cheaper of two instances
/// always wins, so a 0.3 ms instance would take every request from a
/// 0.4 ms one. Above it a slow or crowded node shows at once.
pub const LATENCY_FLOOR: f64 = 0.005;

impl PeakEwma {
    /// Fold in one response time observed at `now`.
    pub fn observe(prev: Option<PeakEwma>, rtt: Duration, now: Instant) -> PeakEwma {
        let x = rtt.as_secs_f64();
        let secs = match prev {
            None => x,
            // A peak is taken at once: an instance that just got slow must
            // lose traffic now, not in ten seconds.
            Some(p) if x > p.secs => x,
            Some(p) => {
                let dt = now.saturating_duration_since(p.at).as_secs_f64();
                let w = (-dt / EWMA_DECAY.as_secs_f64()).exp();
                p.secs * w + x * (1.0 - w)
            }
        };
        PeakEwma { secs, at: now }
    }

    /// The estimate as of `now`: decayed toward zero since the last
    /// response, as Finagle's and tower's Peak-EWMA read it. Without this
    /// an instance that had one slow answer would never be chosen again,
    /// so never measured again, and keep its peak forever; with it, an
    /// idle instance looks cheaper as time passes and is tried again.
    pub fn at(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.secs * (-dt / EWMA_DECAY.as_secs_f64()).exp()
    }
}

impl Instance {
    pub fn new(job: &str, node: &str, addr: SocketAddr, now: Instant) -> Self {
        Self {
            job: job.to_string(),
            node: node.to_string(),
            addr,
            state: InstanceState::Active,
            since: now,
            in_flight: 0,
            load_per_capacity: 0.0,
            probe_failures: 0,
            latency: None,
            metrics: None,
            pool: Arc::default(),
        }
    }

    /// May take a new request now.
    pub fn eligible(&self) -> bool {
        self.state == InstanceState::Active
    }

    /// Expected back soon: requests may wait for it (held) rather than fail.
    pub fn returning(&self) -> bool {
        matches!(
            self.state,
            InstanceState::Draining { .. } | InstanceState::Away { .. }
        )
    }
}

/// Weight of an instance `age` into its slow start of `window`: from 0.1
/// up to 1.0, linearly.
pub fn slow_start_weight(age: Duration, window: Duration) -> f64 {
    if window.is_zero() || age >= window {
        return 1.0;
    }
    let f = age.as_secs_f64() / window.as_secs_f64();
    0.1 + 0.9 * f
}

/// Cost of sending one more request to an instance (lower is better);
/// `latency` is its expected response time in seconds.
pub fn cost(in_flight: u32, latency: f64, load_per_capacity: f64, weight: f64) -> f64 {
    let load = if load_per_capacity.is_finite() && load_per_capacity > 0.0 {
        load_per_capacity
    } else {
        0.0
    };
    let latency = if latency.is_finite() {
        latency.max(LATENCY_FLOOR)
    } else {
        LATENCY_FLOOR
    };
    (f64::from(in_flight) + 1.0) * latency * (1.0 + load) / weight.max(0.01)
}

/// Scratch lists of a choice: on the stack for services of up to this
/// many instances (a choice is made for every request).
const INLINE: usize = 8;
type Scratch<T> = SmallVec<[T; INLINE]>;

/// The latency to assume for instances that have not answered yet: the
/// median of the others' estimates (so a new instance competes as a
/// typical one), or the floor if none has answered.
fn default_latency(measured: &[Option<f64>]) -> f64 {
    let mut known: Scratch<f64> = measured.iter().flatten().copied().collect();
    if known.is_empty() {
        return LATENCY_FLOOR;
    }
    known.sort_by(|a, b| a.total_cmp(b));
    known[known.len() / 2]
}

/// Power of two choices over `costs`: two distinct random indices, the
/// cheaper wins (ties: the first drawn). `rand(n)` returns a value in 0..n.
pub fn p2c(costs: &[f64], mut rand: impl FnMut(usize) -> usize) -> Option<usize> {
    match costs.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = rand(n) % n;
            // A second index different from the first, uniformly.
            let b = (a + 1 + rand(n - 1) % (n - 1)) % n;
            Some(if costs[b] < costs[a] { b } else { a })
        }
    }
}

/// Power of two choices with weighted draws: the two candidates are drawn
/// (distinct) with probability proportional to `weights`, and the cheaper
/// of the two by `costs` wins. With equal weights this is plain P2C. With
/// unequal ones a slow instance is rarely even a candidate, so two slow
/// instances are seldom the only choice: with two instances 4× slower than
/// two others, plain P2C draws only slow ones for 1 request in 6, weighted
/// draws for about 1 in 90. `rand(n)` returns a value in 0..n.
pub fn p2c_weighted(
    costs: &[f64],
    weights: &[f64],
    mut rand: impl FnMut(usize) -> usize,
) -> Option<usize> {
    const SCALE: usize = 1 << 30;
    let n = costs.len();
    if n <= 1 || weights.len() != n {
        return p2c(costs, rand);
    }
    let w: Scratch<f64> = weights
        .iter()
        .map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 })
        .collect();
    let mut draw = |skip: Option<usize>| -> Option<usize> {
        let total: f64 = w
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != skip)
            .map(|(_, x)| x)
            .sum();
        if total <= 0.0 {
            return None;
        }
        let mut r = (rand(SCALE) % SCALE) as f64 / SCALE as f64 * total;
        let mut last = None;
        for (i, &x) in w.iter().enumerate() {
            if Some(i) == skip || x <= 0.0 {
                continue;
            }
            last = Some(i);
            if r < x {
                return Some(i);
            }
            r -= x;
        }
        last
    };
    match draw(None) {
        Some(a) => match draw(Some(a)) {
            Some(b) => Some(if costs[b] < costs[a] { b } else { a }),
            None => Some(a),
        },
        // No usable weight: fall back to uniform draws.
        None => p2c(costs, rand),
    }
}

/// Requests in flight per instance, averaged over a service and over
/// [`SATURATION_WINDOW`], that make it saturated (see [`Saturation`]).
pub const SATURATED_IN_FLIGHT: f64 = 3.0;
/// Below this average a saturated service is calm again (hysteresis: a
/// service near the threshold must not flip rules on every request).
pub const CALM_IN_FLIGHT: f64 = 2.0;
/// Time constant of the in-flight average that decides saturation, while
/// the average falls: a saturated service stays so through a short lull.
pub const SATURATION_WINDOW: Duration = Duration::from_secs(1);
/// Its time constant while the average rises. Shorter, because every
/// moment a closed loop spends unrecognised costs throughput: with the
/// rise at [`SATURATION_WINDOW`], a fresh closed loop of 4 per instance
/// took 1.4 s to be seen, the slow node's instances were kept short for
/// that long, and that alone was worth about 1.5% of the balancing bench's
/// 10 s maximum-rate runs, where mosgw stayed 1-3% below least_conn in
/// three runs of four. Still long enough that a burst of a few tens of
/// milliseconds (a VM stall at moderate load) does not count.
pub const SATURATION_RISE: Duration = Duration::from_millis(250);

/// Whether a service is saturated: its requests in flight per instance,
/// averaged over time (an exponential average, sampled at each choice,
/// with a [`SATURATION_RISE`] time constant while it rises and
/// [`SATURATION_WINDOW`] while it falls).
///
/// Why an average and not the count at the moment of the choice: a burst
/// at moderate load queues requests everywhere for a few milliseconds, and
/// the best place for a burst is the fast instances, which drain it at
/// once. Judged by the instantaneous count (the rule before this one), the
/// balancing bench's bursts at 60% load switched to least outstanding,
/// sent their requests to the slow node's instances, and p99 rose from
/// 0.47× to 0.85× nginx's. Saturation worth least outstanding is a state
/// that lasts: a closed-loop load that keeps every instance queued.
#[derive(Debug, Clone, Copy, Default)]
pub struct Saturation {
    /// The average of in-flight requests per instance.
    pub avg: f64,
    /// When it was last sampled (None: never).
    pub at: Option<Instant>,
    /// The current verdict.
    pub on: bool,
}

impl Saturation {
    /// Fold in `per_instance` requests in flight seen at `now` and say
    /// whether the service is saturated.
    pub fn observe(&mut self, per_instance: f64, now: Instant) -> bool {
        let x = if per_instance.is_finite() && per_instance > 0.0 {
            per_instance
        } else {
            0.0
        };
        self.avg = match self.at {
            None => x,
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                let tau = if x > self.avg {
                    SATURATION_RISE
                } else {
                    SATURATION_WINDOW
                };
                let w = (-dt / tau.as_secs_f64()).exp();
                self.avg * w + x * (1.0 - w)
            }
        };
        self.at = Some(now);
        self.on = if self.on {
            self.avg >= CALM_IN_FLIGHT
        } else {
            self.avg >= SATURATED_IN_FLIGHT
        };
        self.on
    }
}

/// Choose an eligible instance of `instances`, avoiding those in `avoid`
/// when any other is eligible (a retry goes elsewhere if it can).
pub fn choose<'a>(
    instances: impl Iterator<Item = &'a Instance>,
    avoid: &[String],
    now: Instant,
    slow_start: Duration,
    saturation: &mut Saturation,
    rand: impl FnMut(usize) -> usize,
) -> Option<String> {
    let eligible: Scratch<&Instance> = instances.filter(|i| i.eligible()).collect();
    let pool = if avoid.is_empty() {
        eligible
    } else {
        let fresh: Scratch<&Instance> = eligible
            .iter()
            .copied()
            .filter(|i| !avoid.contains(&i.job))
            .collect();
        if fresh.is_empty() {
            eligible
        } else {
            fresh
        }
    };
    // Saturated: the service has had requests queued everywhere for a
    // while (on average [`SATURATED_IN_FLIGHT`] or more in flight per
    // instance, see [`Saturation`]), so a request waits wherever it goes.
    // Then the least outstanding requests win (HAProxy's leastconn,
    // nginx's least_conn): it keeps every instance busy, a slower one
    // included. Latencies would keep a slow instance's queue short on
    // purpose, and its node then lends it less CPU (a backend's threads
    // compete with the node's other work): the balancing bench's maximum
    // rate stayed 5% below least_conn's. Otherwise latency decides, which
    // is what keeps p99 low below saturation.
    let total: u32 = pool.iter().map(|i| i.in_flight).sum();
    let saturated = saturation.observe(f64::from(total) / pool.len().max(1) as f64, now);
    let weight =
        |i: &Instance| slow_start_weight(now.saturating_duration_since(i.since), slow_start);
    if saturated {
        let costs: Scratch<f64> = pool
            .iter()
            .map(|i| (f64::from(i.in_flight) + 1.0) / weight(i).max(0.01))
            .collect();
        return least(&costs, rand).map(|k| pool[k].job.clone());
    }
    // Each estimate read once (a decay, so an `exp`, apiece).
    let measured: Scratch<Option<f64>> =
        pool.iter().map(|i| i.latency.map(|l| l.at(now))).collect();
    let typical = default_latency(&measured);
    let costs: Scratch<f64> = pool
        .iter()
        .zip(&measured)
        .map(|(i, &measured)| {
            let weight = weight(i);
            let own = measured.unwrap_or(typical);
            // The node's load tells which instance sits on the busier node
            // before it has answered anything. Once it has, its response
            // times already carry that load: counting it twice left a
            // loaded node's instances idle while the others queued (the
            // balancing bench's maximum rate was 5% below nginx's).
            let load = if measured.is_some() {
                0.0
            } else {
                i.load_per_capacity
            };
            // Until its slow start ends an instance is never priced below
            // the typical latency: its first few fast answers must not let
            // it take over before it has warmed up.
            let warming = now.saturating_duration_since(i.since) < slow_start;
            cost(
                i.in_flight,
                if warming { own.max(typical) } else { own },
                load,
                weight,
            )
        })
        .collect();
    // Drawn in proportion to 1 / cost: an idle slow instance is rarely a
    // candidate, but once the fast ones have requests queued their cost
    // rises and the slow one is drawn again, so no capacity is left unused
    // as the service fills up.
    let weights: Scratch<f64> = costs.iter().map(|c| 1.0 / c).collect();
    p2c_weighted(&costs, &weights, rand).map(|k| pool[k].job.clone())
}

/// The cheapest of `costs`, ties broken at random (`rand(n)` returns a
/// value in 0..n): the least outstanding requests, as nginx's least_conn
/// and HAProxy's leastconn choose, for a saturated service.
///
/// Why the exact minimum there and not two random choices: when a node's
/// backends share its CPU with other work, the node lends them CPU in
/// proportion to their runnable threads, and that share is concave in
/// their number (k / (k + others)). Two choices keep the per-instance
/// queues equal only on average; the spread around it cost the slow node
/// some of its share, and the balancing bench's maximum rate stayed 2-5%
/// below least_conn's in four full runs of five. Below saturation the
/// choice is P2C as before, which is what keeps p99 low.
pub fn least(costs: &[f64], mut rand: impl FnMut(usize) -> usize) -> Option<usize> {
    let min = costs
        .iter()
        .copied()
        .filter(|c| c.is_finite())
        .min_by(|a, b| a.total_cmp(b))?;
    let ties: Scratch<usize> = (0..costs.len()).filter(|&i| costs[i] == min).collect();
    match ties.len() {
        0 => None,
        1 => Some(ties[0]),
        n => Some(ties[rand(n) % n]),
    }
}

/// What the gateway should do for a request with no eligible instance.
#[derive(Debug, Clone, PartialEq)]
pub enum NoInstance {
    /// Some instance is being moved: wait for it (up to the hold bound).
    Hold,
    /// Nothing to wait for: 503 with this reason.
    Unavailable(String),
}

pub fn when_none_eligible<'a>(
    service: &str,
    instances: impl Iterator<Item = &'a Instance>,
) -> NoInstance {
    let all: Vec<&Instance> = instances.collect();
    if all.iter().any(|i| i.returning()) {
        return NoInstance::Hold;
    }
    if all.is_empty() {
        NoInstance::Unavailable(format!(
            "service {service:?} has no running instances (start one with `mosrun --service {service} --port PORT -- CMD`)"
        ))
    } else {
        NoInstance::Unavailable(format!(
            "all {} instances of service {service:?} are failing (connect errors or health probes); retry later",
            all.len()
        ))
    }
}

/// How an attempt at a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection: the request never left the gateway.
    Connect,
    /// A pooled connection was already closed: nothing of the request was
    /// written.
    NotSent,
    /// The connection failed after the request was (maybe) sent, before a
    /// response: a reset or an early close.
    Reset,
    /// The backend did not answer in time.
    Timeout,
}

/// Methods that may be repeated without a different effect (RFC 9110 9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// May a request that failed this way be sent again (to another instance)?
/// A request that never reached a backend may always go again; one that
/// may have reached it only if repeating it is harmless. A timeout is never
/// retried: the backend may still be working on it, and another try would
/// double the load of a slow service.
pub fn may_retry(method: &http::Method, failure: Failure) -> bool {
    match failure {
        Failure::Connect | Failure::NotSent => true,
        Failure::Reset => idempotent(method),
        Failure::Timeout => false,
    }
}

/// A retry budget, as in linkerd2-proxy and Finagle: retries may add at
/// most `ratio` of the requests (plus a small reserve), so a failing
/// backend cannot multiply the load on the others.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    tokens: f64,
    ratio: f64,
    max: f64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(0.2, 10.0)
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, reserve: f64) -> Self {
        Self {
            tokens: reserve,
            ratio,
            max: reserve.max(1.0) * 10.0,
        }
    }
    /// A request arrived.
    pub fn deposit(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.max);
    }
    /// Take one retry, if the budget allows.
    pub fn withdraw(&mut self) -> bool {
        // With a tolerance: ten deposits of 0.2 are 1.9999… in floating point.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the agents say about one job (from a job list or an event).
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub job: String,
    pub node: String,
    pub addr: SocketAddr,
    pub running: bool,
    pub generation: u64,
}

/// Bring a service's instances up to date with a full job list (`seen`:
/// every job of the service that is running or migrating). Returns whether
/// anything changed. Jobs no longer listed have ended and leave the table.
pub fn reconcile(table: &mut HashMap<String, Instance>, seen: &[Sighting], now: Instant) -> bool {
    let mut changed = false;
    let before = table.len();
    table.retain(|job, _| seen.iter().any(|s| &s.job == job));
    changed |= table.len() != before;
    for s in seen {
        changed |= apply(table, s, now);
    }
    changed
}

/// Apply one sighting to the table. A record no newer than the freeze that
/// sent an instance away does not bring it back (a list read before the
/// freeze can arrive after it).
pub fn apply(table: &mut HashMap<String, Instance>, s: &Sighting, now: Instant) -> bool {
    match table.get_mut(&s.job) {
        None => {
            if !s.running {
                return false;
            }
            table.insert(s.job.clone(), Instance::new(&s.job, &s.node, s.addr, now));
            true
        }
        Some(i) => match i.state {
            InstanceState::Draining { .. } => false,
            InstanceState::Away { generation } => {
                if s.running && s.generation > generation {
                    // A new node answers at its own speed: start over.
                    if i.node != s.node {
                        i.latency = None;
                    }
                    i.node = s.node.clone();
                    i.addr = s.addr;
                    i.state = InstanceState::Active;
                    i.since = now;
                    i.probe_failures = 0;
                    true
                } else {
                    false
                }
            }
            InstanceState::Active | InstanceState::Ejected { .. } => {
                if !s.running {
                    // Migrating without our having been told (we were not
                    // subscribed yet): treat it as away.
                    i.state = InstanceState::Away {
                        generation: s.generation,
                    };
                    return true;
                }
                if i.addr != s.addr {
                    if i.node != s.node {
                        i.latency = None;
                    }
                    i.node = s.node.clone();
                    i.addr = s.addr;
                    i.since = now;
                    return true;
                }
                false
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 8080))
    }

    #[test]
    fn slow_start_ramps_from_a_tenth_to_full() {
        let w = Duration::from_secs(10);
        assert!((slow_start_weight(Duration::ZERO, w) - 0.1).abs() < 1e-9);
        assert!((slow_start_weight(Duration::from_secs(5), w) - 0.55).abs() < 1e-9);
        assert_eq!(slow_start_weight(Duration::from_secs(11), w), 1.0);
        assert_eq!(slow_start_weight(Duration::ZERO, Duration::ZERO), 1.0);
    }

    #[test]
    fn cost_grows_with_in_flight_latency_and_load_and_falls_with_weight() {
        let l = 0.01;
        assert!(cost(2, l, 0.0, 1.0) > cost(1, l, 0.0, 1.0));
        assert!(cost(1, l, 1.5, 1.0) > cost(1, l, 0.2, 1.0));
        assert!(cost(0, l, 0.0, 0.1) > cost(5, l, 0.0, 1.0));
        // Twice as slow with one in flight costs as much as twice the
        // requests at the faster one.
        assert!((cost(0, 2.0 * l, 0.0, 1.0) - cost(1, l, 0.0, 1.0)).abs() < 1e-12);
        // Garbage never makes an instance free or poisoned.
        assert_eq!(cost(0, l, f64::NAN, 1.0), l);
        assert_eq!(cost(0, l, -3.0, 1.0), l);
        assert_eq!(cost(0, f64::NAN, 0.0, 1.0), LATENCY_FLOOR);
        assert_eq!(cost(0, 0.0, 0.0, 1.0), LATENCY_FLOOR);
    }

    #[test]
    fn weighted_p2c_rarely_offers_only_slow_instances() {
        // Two fast (weight 1) and two slow (weight 0.25) idle instances.
        let costs = [1.0, 1.0, 4.0, 4.0];
        let weights = [1.0, 1.0, 0.25, 0.25];
        let mut slow = 0;
        let n = 20_000;
        for _ in 0..n {
            let k = p2c_weighted(&costs, &weights, |m| rand::random_range(0..m)).unwrap();
            if k >= 2 {
                slow += 1;
            }
        }
        // Both candidates slow: 0.1 × 0.25/2.25 ≈ 1.1%; plain P2C: 16.7%.
        let share = slow as f64 / n as f64;
        assert!(share > 0.003 && share < 0.03, "slow share {share}");
        // Equal weights: every instance is offered (plain P2C).
        let mut seen = [0; 3];
        for _ in 0..3000 {
            let k = p2c_weighted(&[1.0; 3], &[1.0; 3], |m| rand::random_range(0..m)).unwrap();
            seen[k] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
        // Zero or garbage weights fall back to uniform draws, never panic.
        assert!(p2c_weighted(&[1.0, 2.0], &[0.0, f64::NAN], |_| 0).is_some());
        assert_eq!(p2c_weighted(&[3.0], &[1.0], |_| 0), Some(0));
        assert_eq!(p2c_weighted(&[], &[], |_| 0), None);
        // Two candidates are always distinct: the cheaper of the pair wins.
        assert_eq!(p2c_weighted(&[5.0, 1.0], &[1.0, 1.0], |_| 0), Some(1));
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let e = PeakEwma::observe(None, ms(10), t0);
        assert_eq!(e.secs, 0.010);
        // Slower: taken at once.
        let e = PeakEwma::observe(Some(e), ms(50), t0 + ms(1));
        assert_eq!(e.secs, 0.050);
        // Faster a moment later: barely moves.
        let e1 = PeakEwma::observe(Some(e), ms(1), t0 + ms(101));
        assert!(e1.secs > 0.049 && e1.secs < 0.050, "{}", e1.secs);
        // Faster after one time constant: 1/e of the way from old to new.
        let e2 = PeakEwma::observe(Some(e), ms(1), t0 + ms(1) + EWMA_DECAY);
        let want = 0.050 / std::f64::consts::E + 0.001 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e2.secs - want).abs() < 1e-9, "{} vs {want}", e2.secs);
    }

    #[test]
    fn slow_instance_gets_fewer_requests_in_proportion() {
        // Two idle instances, one answering 4× slower: P2C with two of two
        // always compares both, so the fast one wins every draw; with one
        // in flight at the fast one (cost 2l) it still wins over the slow
        // idle one (cost 4l), with three it loses.
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let mut fast = Instance::new("fast", "n1", addr(1), old);
        let mut slow = Instance::new("slow", "n2", addr(2), old);
        fast.latency = Some(PeakEwma {
            secs: 0.010,
            at: now,
        });
        slow.latency = Some(PeakEwma {
            secs: 0.040,
            at: now,
        });
        let pick = |a: &Instance, b: &Instance| pick_of_two(a, b, now);
        assert_eq!(pick(&fast, &slow), "fast");
        fast.in_flight = 1;
        assert_eq!(pick(&fast, &slow), "fast");
        fast.in_flight = 4;
        assert_eq!(pick(&fast, &slow), "slow");
        // A new instance is priced at the typical latency, not at zero.
        let newbie = Instance::new("new", "n3", addr(3), old);
        let all = [&fast, &slow, &newbie];
        let measured: Vec<Option<f64>> = all.iter().map(|i| i.latency.map(|l| l.at(now))).collect();
        assert_eq!(default_latency(&measured), 0.040);
        // Below the floor, instances are equal.
        assert_eq!(cost(0, 0.0003, 0.0, 1.0), cost(0, 0.0004, 0.0, 1.0));
        assert_eq!(
            default_latency(&[newbie.latency.map(|l| l.at(now))]),
            LATENCY_FLOOR
        );
        // An instance that had one slow answer is not shunned forever:
        // idle, its estimate decays, and after a while it is chosen again.
        fast.in_flight = 0;
        slow.latency = Some(PeakEwma {
            secs: 0.040,
            at: now - 3 * EWMA_DECAY,
        });
        assert!(slow.latency.unwrap().at(now) < 0.040 / 19.0);
        assert_eq!(pick(&fast, &slow), "slow");
    }

    /// A saturation detector with no history: its first sample is its
    /// average, so the in-flight counts at the choice decide.
    fn fresh() -> Saturation {
        Saturation::default()
    }

    /// `choose` between two instances, with no slow start and no
    /// saturation history.
    fn pick_of_two(a: &Instance, b: &Instance, now: Instant) -> String {
        choose(
            [a.clone(), b.clone()].iter(),
            &[],
            now,
            Duration::ZERO,
            &mut fresh(),
            |n| rand::random_range(0..n),
        )
        .unwrap()
    }

    #[test]
    fn saturated_services_go_by_outstanding_requests() {
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let mut fast = Instance::new("fast", "n1", addr(1), old);
        let mut slow = Instance::new("slow", "n2", addr(2), old);
        fast.latency = Some(PeakEwma {
            secs: 0.004,
            at: now,
        });
        slow.latency = Some(PeakEwma {
            secs: 0.100,
            at: now,
        });
        let pick = |a: &Instance, b: &Instance| pick_of_two(a, b, now);
        // Below 3 in flight per instance on average, latency decides:
        // 4 queued at the fast one (cost 5 × 5 ms) still beat the idle
        // slow one (100 ms), and so does 1 at the slow one.
        fast.in_flight = 4;
        assert_eq!(pick(&fast, &slow), "fast");
        slow.in_flight = 1;
        assert_eq!(pick(&fast, &slow), "fast");
        // Saturated (6 in flight over 2): the fewer outstanding win.
        slow.in_flight = 2;
        assert_eq!(pick(&fast, &slow), "slow");
        slow.in_flight = 6;
        assert_eq!(pick(&fast, &slow), "fast");
    }

    #[test]
    fn least_takes_the_cheapest_and_spreads_ties() {
        assert_eq!(least(&[], |_| 0), None);
        assert_eq!(least(&[f64::NAN], |_| 0), None);
        assert_eq!(least(&[3.0, 1.0, 2.0], |_| 0), Some(1));
        assert_eq!(least(&[f64::NAN, 2.0, 5.0], |_| 0), Some(1));
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            let k = least(&[2.0, 1.0, 1.0, 1.0], |n| rand::random_range(0..n)).unwrap();
            seen[k] += 1;
        }
        assert_eq!(seen[0], 0, "never the dearer one");
        assert!(seen[1..].iter().all(|&c| c > 60), "ties spread: {seen:?}");
    }

    #[test]
    fn a_saturated_service_always_gets_the_least_outstanding_instance() {
        // Four instances long past slow start, 4 in flight each on
        // average (saturated), one with fewer: every choice is that one,
        // whatever its latency.
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let mut v: Vec<Instance> = (0..4)
            .map(|k| {
                let mut i = Instance::new(&format!("i{k}"), "n1", addr(k as u8 + 1), old);
                i.in_flight = 5;
                i.latency = Some(PeakEwma {
                    secs: 0.002,
                    at: now,
                });
                i
            })
            .collect();
        v[3].in_flight = 1;
        v[3].latency = Some(PeakEwma {
            secs: 0.200,
            at: now,
        });
        let mut s = fresh();
        for _ in 0..50 {
            let got = choose(v.iter(), &[], now, Duration::ZERO, &mut s, |n| {
                rand::random_range(0..n)
            });
            assert_eq!(got.as_deref(), Some("i3"));
        }
    }

    #[test]
    fn saturation_is_a_state_that_lasts_not_a_burst() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut s = Saturation::default();
        // Calm: about half a request per instance, one sample per 2.5 ms
        // (400 requests/s) for a second.
        for k in 0..400 {
            assert!(!s.observe(0.5, ms(k * 5 / 2)));
        }
        // A 50 ms burst with 8 in flight per instance (what a VM stall
        // leaves queued at moderate load): still calm.
        for k in 0..20 {
            assert!(!s.observe(8.0, ms(1000 + k * 5 / 2)), "burst at {k}");
        }
        // A closed loop that keeps ~3.75 per instance queued: saturated
        // within half a second (every moment before costs throughput)...
        let mut t = 1050;
        while !s.observe(3.75, ms(t)) {
            t += 2;
            assert!(t < 1050 + 500, "not saturated in time (avg {})", s.avg);
        }
        // ... and it stays so between 2 and 3 (hysteresis) ...
        for k in 0..1000 {
            assert!(s.observe(2.5, ms(t + k)));
        }
        // ... and calms down once the queues are gone.
        t += 1000;
        while s.observe(0.2, ms(t)) {
            t += 2;
            assert!(t < 5000, "never calm again (avg {})", s.avg);
        }
        // A lone first sample is taken as it is, bad values as zero.
        assert!(Saturation::default().observe(4.0, t0));
        assert!(!Saturation::default().observe(f64::NAN, t0));
    }

    #[test]
    fn node_load_prices_an_instance_only_until_it_has_answered() {
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let pick = |a: &Instance, b: &Instance| pick_of_two(a, b, now);
        let ewma = |secs| Some(PeakEwma { secs, at: now });
        // Neither has answered: the one on the busier node loses.
        let mut calm = Instance::new("calm", "n1", addr(1), old);
        let mut busy = Instance::new("busy", "n2", addr(2), old);
        busy.load_per_capacity = 3.0;
        assert_eq!(pick(&calm, &busy), "calm");
        // Both have answered, equally fast: the load is already in the
        // latencies, so it does not count again, and in-flight decides.
        calm.latency = ewma(0.020);
        busy.latency = ewma(0.020);
        calm.in_flight = 1;
        assert_eq!(pick(&calm, &busy), "busy");
        // Answered 4× slower than the calm one with 4 queued there: the
        // idle busy one (cost 4l) beats 5 in flight (cost 5l).
        busy.latency = ewma(0.080);
        calm.in_flight = 4;
        assert_eq!(pick(&calm, &busy), "busy");
    }

    #[test]
    fn p2c_takes_the_cheaper_of_two_distinct_draws() {
        assert_eq!(p2c(&[], |_| 0), None);
        assert_eq!(p2c(&[7.0], |_| 0), Some(0));
        // Draws 0 then (0+1+0)%3 = 1: index 1 is cheaper.
        assert_eq!(p2c(&[5.0, 1.0, 9.0], |_| 0), Some(1));
        // Draws 2 then (2+1+1)%3 = 1.
        let mut seq = [2usize, 1].into_iter();
        assert_eq!(p2c(&[5.0, 1.0, 0.5], |_| seq.next().unwrap()), Some(2));
        // Never the same index twice, whatever the random source says.
        for a in 0..4 {
            for b in 0..4 {
                let mut s = [a, b].into_iter();
                let mut drawn = vec![];
                let _ = p2c(&[1.0; 4], |n| {
                    let v = s.next().unwrap() % n;
                    drawn.push(v);
                    v
                });
                let first = drawn[0];
                let second = (first + 1 + drawn[1]) % 4;
                assert_ne!(first, second);
            }
        }
    }

    #[test]
    fn choose_skips_draining_away_ejected_and_prefers_untried() {
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let mut a = Instance::new("a", "n1", addr(1), old);
        let mut b = Instance::new("b", "n2", addr(2), old);
        let c = Instance::new("c", "n3", addr(3), old);
        a.state = InstanceState::Draining { freeze_id: 1 };
        b.state = InstanceState::Ejected { until: now };
        let all = [a.clone(), b.clone(), c.clone()];
        for _ in 0..10 {
            let got = choose(
                all.iter(),
                &[],
                now,
                Duration::from_secs(5),
                &mut fresh(),
                |n| rand::random_range(0..n),
            );
            assert_eq!(got.as_deref(), Some("c"));
        }
        // A retry avoids the instance that failed, if another is eligible.
        let mut b2 = b.clone();
        b2.state = InstanceState::Active;
        let all = [c.clone(), b2];
        for _ in 0..10 {
            let got = choose(
                all.iter(),
                &["c".into()],
                now,
                Duration::ZERO,
                &mut fresh(),
                |n| rand::random_range(0..n),
            );
            assert_eq!(got.as_deref(), Some("b"));
        }
        // ... but uses it when it is the only one.
        let got = choose(
            [c].iter(),
            &["c".into()],
            now,
            Duration::ZERO,
            &mut fresh(),
            |_| 0,
        );
        assert_eq!(got.as_deref(), Some("c"));
    }

    #[test]
    fn a_new_instance_gets_little_traffic_until_its_slow_start_ends() {
        let now = Instant::now();
        let old = Instance::new("old", "n1", addr(1), now - Duration::from_secs(60));
        let new = Instance::new("new", "n2", addr(2), now);
        let count = |at: Instant| {
            let mut n = 0;
            for _ in 0..1000 {
                if choose(
                    [&old, &new].into_iter(),
                    &[],
                    at,
                    Duration::from_secs(10),
                    &mut fresh(),
                    |k| rand::random_range(0..k),
                )
                .as_deref()
                    == Some("new")
                {
                    n += 1;
                }
            }
            n
        };
        // Both idle: the weight alone decides, and a new one loses at first.
        assert_eq!(count(now), 0);
        // After the window they are equal; the first draw wins ties.
        let later = count(now + Duration::from_secs(11));
        assert!((300..700).contains(&later), "{later}");
    }

    #[test]
    fn retry_rules() {
        use http::Method;
        assert!(may_retry(&Method::POST, Failure::Connect));
        assert!(may_retry(&Method::POST, Failure::NotSent));
        assert!(!may_retry(&Method::POST, Failure::Reset));
        assert!(may_retry(&Method::GET, Failure::Reset));
        assert!(may_retry(&Method::PUT, Failure::Reset));
        assert!(!may_retry(&Method::GET, Failure::Timeout));
        assert!(!may_retry(&Method::PATCH, Failure::Reset));
    }

    #[test]
    fn the_retry_budget_caps_retries_at_a_share_of_requests() {
        let mut b = RetryBudget::new(0.2, 2.0);
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "the reserve is spent");
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.withdraw(), "10 requests earn 2 retries");
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[test]
    fn no_instance_holds_only_when_one_is_coming_back() {
        let now = Instant::now();
        let mut a = Instance::new("a", "n1", addr(1), now);
        assert!(matches!(
            when_none_eligible("web", std::iter::empty()),
            NoInstance::Unavailable(m) if m.contains("no running instances")
        ));
        a.state = InstanceState::Away { generation: 3 };
        assert_eq!(
            when_none_eligible("web", [&a].into_iter()),
            NoInstance::Hold
        );
        a.state = InstanceState::Ejected { until: now };
        assert!(matches!(
            when_none_eligible("web", [&a].into_iter()),
            NoInstance::Unavailable(m) if m.contains("failing")
        ));
    }

    #[test]
    fn reconcile_follows_moves_and_ignores_stale_lists() {
        let t0 = Instant::now();
        let mut t = HashMap::new();
        let s = |node: &str, n: u8, running: bool, generation: u64| Sighting {
            job: "j".into(),
            node: node.into(),
            addr: addr(n),
            running,
            generation,
        };
        assert!(reconcile(&mut t, &[s("n1", 1, true, 3)], t0));
        assert_eq!(t["j"].addr, addr(1));
        // Freeze announced at generation 3: away.
        t.get_mut("j").unwrap().state = InstanceState::Away { generation: 3 };
        // A list read before the freeze still says running on n1: ignored.
        assert!(!reconcile(&mut t, &[s("n1", 1, true, 3)], t0));
        assert!(!t["j"].eligible());
        // Migrating (generation 4): still away.
        assert!(!reconcile(&mut t, &[s("n1", 1, false, 4)], t0));
        // Running on n2 (generation 5): back, at its new address, slow start anew.
        let t1 = t0 + Duration::from_secs(1);
        assert!(reconcile(&mut t, &[s("n2", 2, true, 5)], t1));
        assert_eq!(t["j"].addr, addr(2));
        assert_eq!(t["j"].since, t1);
        assert!(t["j"].eligible());
        // Gone from the list: ended, leaves the table.
        assert!(reconcile(&mut t, &[], t1));
        assert!(t.is_empty());
    }
}
