//! The load feed: this node's load, pushed to the balancer (`WatchLoad`).
//!
//! Why push: a balancer that polls every agent every round pays one request
//! and one answer per node per round whether anything changed or not; at
//! 10,000 nodes that is most of a core. Loads change slowly and jobs rarely,
//! so the agent sends only what changed, as icecream's daemons do:
//!
//! - a complete report when the stream opens;
//! - a complete report when the load moved by more than [`CHANGE_FRACTION`]
//!   of capacity since the last report sent (or memory available by more than
//!   that fraction of the total), or at once when anything else the policy
//!   reads changed: the set of jobs, a job's flags, migrations in flight,
//!   block, speed, capacity;
//! - otherwise a heartbeat every [`HEARTBEAT`] ± [`HEARTBEAT_JITTER`]
//!   (random, so 10,000 agents started together do not beat in step), so
//!   that the balancer can tell a quiet node from a dead one: silence past
//!   [`HEARTBEAT_BOUND`] means down.
//!
//! Every report is this node's complete state, never a delta: a report lost
//! with a broken stream costs nothing, since the next stream starts complete.
//! The decision ([`Pacer`]) is pure and driven by a caller's clock, so the
//! rule, the heartbeat and its jitter are tested without waiting. The same
//! stream code serves `mosixd` and `mosbench sim-agents`.

use super::load::{JobFlags, NodeLoad};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

/// A change smaller than this fraction of capacity (load) or of total
/// memory (memory available) is not worth a report.
pub const CHANGE_FRACTION: f64 = 0.10;
/// Heartbeat period of a quiet node.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Each heartbeat comes up to this much earlier or later than the period.
pub const HEARTBEAT_JITTER: Duration = Duration::from_secs(2);
/// A stream silent for longer than this is a node down: more than two
/// heartbeats at their latest, so one delayed heartbeat is no outage.
pub const HEARTBEAT_BOUND: Duration = Duration::from_secs(25);
/// How often the agent looks at its load (it samples once a second).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One item of the feed.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The node's complete state.
    Full(NodeLoad),
    /// Nothing worth sending changed; the node is alive.
    Heartbeat,
}

/// Whether `now` differs from `last` (the last report sent) enough to send.
pub fn worth_sending(last: &NodeLoad, now: &NodeLoad) -> bool {
    let cap = if now.capacity.is_finite() && now.capacity > 0.0 {
        now.capacity
    } else {
        1.0
    };
    if (now.load - last.load).abs() > CHANGE_FRACTION * cap
        || now.load.is_nan() != last.load.is_nan()
    {
        return true;
    }
    let mem_step = CHANGE_FRACTION * now.mem_total_bytes.max(1) as f64;
    if (now.mem_available_bytes as f64 - last.mem_available_bytes as f64).abs() > mem_step {
        return true;
    }
    if now.capacity != last.capacity
        || now.mem_total_bytes != last.mem_total_bytes
        || now.migrations_in_flight != last.migrations_in_flight
        || now.blocked != last.blocked
        || now.speed != last.speed
        || now.supports_post_copy != last.supports_post_copy
        || now.supports_pre_copy != last.supports_pre_copy
        || now.job_addresses != last.job_addresses
        || now.jobs.len() != last.jobs.len()
    {
        return true;
    }
    // The same jobs with the same flags (the agent lists them in id order).
    // A job's demand is covered by the node's load above.
    now.jobs
        .iter()
        .zip(&last.jobs)
        .any(|(a, b)| a.job_id != b.job_id || a.flags != b.flags)
}

/// Decides, at each look, what (if anything) to send. Pure: the caller
/// passes its clock (milliseconds from any origin) and the current state.
pub struct Pacer {
    last_sent: Option<NodeLoad>,
    next_heartbeat_ms: u64,
    rng: u64,
}

impl Pacer {
    /// `seed` varies the heartbeat jitter between agents and streams.
    pub fn new(seed: u64) -> Self {
        Self {
            last_sent: None,
            next_heartbeat_ms: 0,
            // splitmix64's constant keeps a zero seed from sticking at zero
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn jittered_period_ms(&mut self) -> u64 {
        // xorshift64*: plenty for spreading heartbeats out
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let j = HEARTBEAT_JITTER.as_millis() as u64;
        HEARTBEAT.as_millis() as u64 - j + r % (2 * j + 1)
    }

    /// What to send at `now_ms` given the node's `current` state.
    pub fn next(&mut self, now_ms: u64, current: NodeLoad) -> Option<Update> {
        let send = match &self.last_sent {
            None => true,
            Some(last) => worth_sending(last, &current),
        };
        if send {
            self.last_sent = Some(current.clone());
            self.next_heartbeat_ms = now_ms + self.jittered_period_ms();
            return Some(Update::Full(current));
        }
        if now_ms >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now_ms + self.jittered_period_ms();
            return Some(Update::Heartbeat);
        }
        None
    }
}

/// Something that wakes the feed early (a job started, ended or moved).
pub type Pokes = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// One look at the node's state (a future, so that an agent can read its
/// registry off the async threads).
pub type Sample = futures::future::BoxFuture<'static, NodeLoad>;

/// The feed as a stream: looks at `sample()` every [`CHECK_EVERY`] and at
/// once when `pokes` yields, and passes on what the [`Pacer`] decides.
pub fn stream<F>(sample: F, pokes: Option<Pokes>, seed: u64) -> impl Stream<Item = Update>
where
    F: FnMut() -> Sample + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (Pacer::new(seed), tick, pokes, sample);
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            let (_, tick, pokes, _) = &mut st;
            match pokes {
                Some(p) => {
                    tokio::select! {
                        _ = tick.tick() => {}
                        got = p.next() => {
                            if got.is_none() {
                                *pokes = None;
                            }
                        }
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            let current = (st.3)().await;
            let now_ms = start.elapsed().as_millis() as u64;
            if let Some(u) = st.0.next(now_ms, current) {
                return Some((u, st));
            }
        }
    })
}

/// The job flags of a node's jobs from its registry, read again only for a
/// job not seen before or once per heartbeat period (a pin changes rarely,
/// and the registry is a file per job).
pub struct FlagCache {
    flags: HashMap<String, JobFlags>,
    refreshed_ms: u64,
}

impl FlagCache {
    pub fn new() -> Self {
        Self {
            flags: HashMap::new(),
            refreshed_ms: 0,
        }
    }

    /// Fill `load`'s jobs' flags; `read` gives a job's flags from its record
    /// (None if it has none), `busy` whether an operation on it runs now.
    pub fn fill(
        &mut self,
        now_ms: u64,
        load: &mut NodeLoad,
        mut read: impl FnMut(&str) -> Option<JobFlags>,
        busy: impl Fn(&str) -> bool,
    ) {
        if now_ms.saturating_sub(self.refreshed_ms) >= HEARTBEAT.as_millis() as u64 {
            self.flags.clear();
            self.refreshed_ms = now_ms;
        }
        self.flags
            .retain(|id, _| load.jobs.iter().any(|j| &j.job_id == id));
        for j in &mut load.jobs {
            let unsampled = j.flags.unsampled;
            let f = self
                .flags
                .entry(j.job_id.clone())
                .or_insert_with(|| read(&j.job_id).unwrap_or_default());
            j.flags = JobFlags {
                unsampled,
                busy: busy(&j.job_id),
                ..f.clone()
            };
        }
    }
}

impl Default for FlagCache {
    fn default() -> Self {
        Self::new()
    }
}

impl super::Agent {
    /// The feed of this agent's load (what `WatchLoad` streams).
    pub fn load_feed(self: &std::sync::Arc<Self>) -> impl Stream<Item = Update> {
        let agent = self.clone();
        let start = std::time::Instant::now();
        let cache = std::sync::Arc::new(std::sync::Mutex::new(FlagCache::new()));
        let sample = move || -> Sample {
            let (agent, cache) = (agent.clone(), cache.clone());
            // Off the async threads: the registry may be a network file system.
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let mut nl = agent.node_load();
                    let now_ms = start.elapsed().as_millis() as u64;
                    let busy = agent.busy.lock().map(|b| b.clone()).unwrap_or_default();
                    if let Ok(mut cache) = cache.lock() {
                        cache.fill(
                            now_ms,
                            &mut nl,
                            |id| {
                                let id = crate::core::JobId::parse(id).ok()?;
                                let r = agent.registry.get(&id).ok()?;
                                Some(JobFlags {
                                    arrived_unix_ms: r.arrived_unix_ms,
                                    pinned: r.pinned,
                                    non_migratable: r.non_migratable,
                                    post_copy_failed: r
                                        .history
                                        .last()
                                        .is_some_and(|m| m.post_copy && !m.ok),
                                    busy: false,
                                    unsampled: false,
                                    own_address: r.net.is_some(),
                                })
                            },
                            |id| busy.iter().any(|b| b.as_str() == id),
                        );
                    }
                    nl
                })
                .await
                .unwrap_or_default()
            })
        };
        let sub = self.events.subscribe("");
        // Any job event (lagging behind counts too) is a reason to look now.
        let events = futures::stream::unfold(sub, |mut sub| async move {
            match sub.rx.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(((), sub)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
            }
        });
        // So is an operation's start or end (see `Agent::busy_changed`).
        let busy = futures::stream::unfold(self.busy_changed.subscribe(), |mut rx| async move {
            rx.changed().await.ok().map(|()| ((), rx))
        });
        let pokes: Pokes = Box::pin(futures::stream::select(events, busy));
        let seed = crate::core::now_unix_ms() ^ u64::from(std::process::id());
        stream(sample, Some(pokes), seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::load::JobUsage;

    fn node(load: f64, jobs: &[&str]) -> NodeLoad {
        NodeLoad {
            node: "n1".into(),
            load,
            capacity: 4.0,
            mem_total_bytes: 1000,
            mem_available_bytes: 500,
            jobs: jobs
                .iter()
                .map(|j| JobUsage {
                    job_id: j.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_beyond_ten_percent_of_capacity_are_sent() {
        let last = node(1.0, &["j1"]);
        // capacity 4: 10% is 0.4 cores
        assert!(!worth_sending(&last, &node(1.39, &["j1"])));
        assert!(!worth_sending(&last, &node(0.61, &["j1"])));
        assert!(worth_sending(&last, &node(1.41, &["j1"])));
        assert!(worth_sending(&last, &node(0.59, &["j1"])));
        // memory: 10% of the total
        let mut m = node(1.0, &["j1"]);
        m.mem_available_bytes = 590;
        assert!(!worth_sending(&last, &m));
        m.mem_available_bytes = 399;
        assert!(worth_sending(&last, &m));
    }

    #[test]
    fn job_and_node_changes_are_sent_at_once() {
        let last = node(1.0, &["j1"]);
        assert!(worth_sending(&last, &node(1.0, &["j1", "j2"])));
        assert!(worth_sending(&last, &node(1.0, &["j2"])));
        assert!(worth_sending(&last, &node(1.0, &[])));
        let mut pinned = node(1.0, &["j1"]);
        pinned.jobs[0].flags.pinned = true;
        assert!(worth_sending(&last, &pinned));
        let mut busy = node(1.0, &["j1"]);
        busy.jobs[0].flags.busy = true;
        assert!(worth_sending(&last, &busy));
        let mut b = node(1.0, &["j1"]);
        b.blocked = true;
        assert!(worth_sending(&last, &b));
        let mut f = node(1.0, &["j1"]);
        f.migrations_in_flight = 1;
        assert!(worth_sending(&last, &f));
        // a job's own demand or rss moving is not, by itself, news
        let mut d = node(1.0, &["j1"]);
        d.jobs[0].demand = 0.3;
        d.jobs[0].rss_bytes = 77;
        assert!(!worth_sending(&last, &d));
    }

    #[test]
    fn first_report_is_complete_then_heartbeats_are_jittered_around_ten_seconds() {
        let mut p = Pacer::new(42);
        assert_eq!(
            p.next(0, node(1.0, &["j1"])),
            Some(Update::Full(node(1.0, &["j1"])))
        );
        let mut beats = Vec::new();
        let mut last = 0;
        for t in (1000..=200_000).step_by(1000) {
            match p.next(t, node(1.1, &["j1"])) {
                Some(Update::Heartbeat) => {
                    beats.push(t - last);
                    last = t;
                }
                Some(u) => panic!("unexpected {u:?} at {t}"),
                None => {}
            }
        }
        assert!(beats.len() >= 15, "{beats:?}");
        let lo = (HEARTBEAT - HEARTBEAT_JITTER).as_millis() as u64;
        let hi = (HEARTBEAT + HEARTBEAT_JITTER).as_millis() as u64 + 1000;
        assert!(beats.iter().all(|&g| g >= lo && g <= hi), "{beats:?}");
        assert!(beats.iter().any(|&g| g != beats[0]), "jittered: {beats:?}");
        assert!(hi < HEARTBEAT_BOUND.as_millis() as u64 / 2 + 1000);
    }

    #[test]
    fn a_report_resets_the_heartbeat_and_the_baseline() {
        let mut p = Pacer::new(1);
        assert!(p.next(0, node(1.0, &[])).is_some());
        assert!(p.next(1000, node(1.3, &[])).is_none());
        // 1.0 -> 1.5 is news; then 1.5 is the baseline, so 1.8 is not
        assert!(matches!(
            p.next(2000, node(1.5, &[])),
            Some(Update::Full(_))
        ));
        assert!(p.next(3000, node(1.8, &[])).is_none());
        // no heartbeat before 8 s after the last report
        for t in (4000..10_000).step_by(1000) {
            assert!(p.next(t, node(1.8, &[])).is_none(), "at {t}");
        }
    }

    #[test]
    fn flags_are_read_once_per_job_and_refreshed_per_heartbeat() {
        let mut c = FlagCache::new();
        let reads = std::cell::Cell::new(0);
        let read = |_: &str| {
            reads.set(reads.get() + 1);
            Some(JobFlags {
                pinned: true,
                ..Default::default()
            })
        };
        let mut n = node(1.0, &["j1", "j2"]);
        c.fill(0, &mut n, read, |id| id == "j2");
        assert_eq!(reads.get(), 2);
        assert!(n.jobs[0].flags.pinned && !n.jobs[0].flags.busy && n.jobs[1].flags.busy);
        let mut n = node(1.0, &["j1", "j2"]);
        c.fill(5000, &mut n, read, |_| false);
        assert_eq!(reads.get(), 2, "cached");
        let mut n = node(1.0, &["j1", "j2", "j3"]);
        c.fill(6000, &mut n, read, |_| false);
        assert_eq!(reads.get(), 3, "only the new job");
        let mut n = node(1.0, &["j1"]);
        c.fill(10_001, &mut n, read, |_| false);
        assert_eq!(reads.get(), 4, "refreshed after a heartbeat period");
    }

    #[tokio::test]
    async fn the_stream_sends_a_full_report_then_news_within_a_look_or_at_a_poke() {
        let load = std::sync::Arc::new(std::sync::Mutex::new(node(1.0, &["j1"])));
        let l = load.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let pokes: Pokes = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        }));
        let s = stream(
            move || -> Sample {
                let n = l.lock().unwrap().clone();
                Box::pin(async move { n })
            },
            Some(pokes),
            3,
        );
        futures::pin_mut!(s);
        assert!(matches!(s.next().await, Some(Update::Full(_))));
        *load.lock().unwrap() = node(2.0, &["j1"]);
        let t = std::time::Instant::now();
        assert!(matches!(s.next().await, Some(Update::Full(n)) if n.load == 2.0));
        assert!(t.elapsed() <= CHECK_EVERY + Duration::from_millis(200));
        // a job change with a poke is sent at once, not at the next look
        let t = std::time::Instant::now();
        *load.lock().unwrap() = node(2.0, &["j1", "j2"]);
        tx.send(()).unwrap();
        assert!(matches!(s.next().await, Some(Update::Full(n)) if n.jobs.len() == 2));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    /// The start and the end of an operation on a job are reported at once,
    /// not at the next look a second later: a balancer planning from a
    /// report that still shows the job busy would lose a round.
    #[tokio::test]
    async fn an_operations_start_and_end_are_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let agent = crate::agent::testing::lone_agent(dir.path(), "node1");
        #[allow(clippy::zombie_processes)]
        let mut child = crate::criu::fake::stand_in("60").unwrap();
        let mut rec = crate::core::registry::tests::sample("j0000000001");
        rec.pid = child.id() as i32;
        agent.registry.put(&mut rec).unwrap();
        agent.adopt_child(&rec.id, rec.pid);

        let busy_of = |u: Option<Update>| match u {
            Some(Update::Full(l)) => {
                assert_eq!(l.jobs.len(), 1, "{l:?}");
                l.jobs[0].flags.busy
            }
            other => panic!("expected a full report, got {other:?}"),
        };
        let feed = agent.load_feed();
        futures::pin_mut!(feed);
        // The first look is at once; the next timed one a second later.
        assert!(!busy_of(feed.next().await));
        let t0 = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let guard = agent.claim(&rec.id).unwrap();
        assert!(busy_of(feed.next().await));
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(guard);
        assert!(!busy_of(feed.next().await));
        let took = t0.elapsed();
        assert!(
            took < Duration::from_millis(800),
            "both reports came {took:?} after the first: at the next look, not at once"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
