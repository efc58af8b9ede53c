//! Following the agents' load feeds (`WatchLoad`), for `mos-balance serve`.
//!
//! Why: polling asks every agent every round, so a round over 10,000 agents
//! costs 10,000 requests and answers (and the registry's whole job list)
//! even when nothing changed. Instead each agent pushes a complete report
//! when its load moved by more than 10% of capacity or its jobs changed, and
//! a heartbeat every ~10 s otherwise (see `agent::loadfeed`). One task per
//! agent follows its stream, reconnecting with a jittered backoff.
//!
//! The latest report of each node is kept already converted to the policy's
//! types ([`NodeState`]: a `NodeSnapshot` and its `JobSnapshot`s), behind an
//! `Arc` that a report replaces as a whole. A round takes the `Arc`s (a
//! pointer per node, no copy of any node's state) and hands references to
//! `policy::plan_nodes`: nothing of 10,000 nodes is rebuilt per round, and a
//! quiet node costs nothing at all between its heartbeats.
//!
//! A node is down when its stream is broken (and not yet re-opened), or when
//! it has been silent for longer than its heartbeat bound. Whether a slot is
//! up is a pure function of its state and a clock ([`SlotState::status`]).

use super::policy::{self, JobSnapshot, NodeRef, NodeSnapshot, Plan, PolicyConfig};
use crate::api::client::{self, ClientTls};
use crate::api::pb;
use crate::core::cluster_file::ClusterFile;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Heartbeat bound assumed until an agent states its own.
pub const DEFAULT_BOUND: Duration = Duration::from_secs(25);
/// First reconnect delay after a failure; doubled up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Connections being set up at once (TLS handshakes are CPU work: 10,000 at
/// once would time out against each other).
pub const CONNECT_CONCURRENCY: usize = 256;
/// How long to wait for a connection and the first report.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One node's latest complete report, in the policy's types.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub node: NodeSnapshot,
    /// Its jobs that may be planned (running, no operation under way).
    pub jobs: Vec<JobSnapshot>,
    pub bandwidth_bps: f64,
    /// When the report arrived (residence is advanced from here).
    pub received: Instant,
}

impl NodeState {
    /// The policy's view of one agent's report. Like the polled view
    /// (`ClusterView::snapshot`): the node's load is at least its jobs'
    /// demand, where a job not sampled yet counts as one busy core; a job
    /// with an operation under way is not planned and counts as a migration
    /// in flight.
    pub fn from_report(name: &str, l: pb::NodeLoad, received: Instant) -> Self {
        let mut job_load = 0.0;
        let mut busy = false;
        let mut jobs = Vec::with_capacity(l.jobs.len());
        for u in l.jobs {
            let demand = super::view::reported_demand(&u);
            job_load += demand;
            if u.busy {
                busy = true;
                continue;
            }
            let residence_secs = if u.arrived_unix_ms == 0 {
                u.residence_secs
            } else {
                l.timestamp_unix_ms.saturating_sub(u.arrived_unix_ms) as f64 / 1000.0
            };
            jobs.push(JobSnapshot {
                id: u.job_id,
                node: name.to_string(),
                rss_bytes: u.rss_bytes,
                cpu_demand: demand,
                residence_secs,
                pinned: u.pinned,
                migratable: !u.non_migratable,
                post_copy_failed: u.post_copy_failed,
                own_address: u.own_address,
            });
        }
        NodeState {
            node: NodeSnapshot {
                name: name.to_string(),
                up: true,
                capacity: l.capacity,
                load: l.load.max(job_load),
                mem_total_bytes: l.mem_total_bytes,
                mem_available_bytes: l.mem_available_bytes,
                migrations_in_flight: if busy {
                    l.migrations_in_flight.max(1)
                } else {
                    l.migrations_in_flight
                },
                blocked: l.blocked,
                job_addresses: l.job_addresses,
            },
            jobs,
            bandwidth_bps: l.migration_bandwidth_bps,
            received,
        }
    }
}

/// What the feed knows of one node.
#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub latest: Option<Arc<NodeState>>,
    /// The stream is open (its first report arrived).
    pub connected: bool,
    /// Any report, heartbeats included.
    pub last_heard: Option<Instant>,
    pub bound: Option<Duration>,
    /// Why the last stream failed or ended.
    pub error: Option<String>,
    /// At least one attempt has ended (in a report or an error).
    pub settled: bool,
}

impl SlotState {
    /// Up, with its latest report, or down and why (`now`: the caller's clock).
    pub fn status(&self, now: Instant) -> Result<&Arc<NodeState>, String> {
        let bound = self.bound.unwrap_or(DEFAULT_BOUND);
        match (&self.latest, self.last_heard) {
            _ if !self.connected => Err(self
                .error
                .clone()
                .unwrap_or_else(|| "no load report yet".into())),
            (Some(l), Some(heard)) => {
                let silent = now.saturating_duration_since(heard);
                if silent > bound {
                    Err(format!(
                        "its load feed has been silent for {:.0} s (bound {:.0} s)",
                        silent.as_secs_f64(),
                        bound.as_secs_f64()
                    ))
                } else {
                    Ok(l)
                }
            }
            _ => Err("no load report yet".into()),
        }
    }

    /// Apply one report.
    pub fn apply(&mut self, name: &str, r: pb::LoadReport, now: Instant) {
        self.last_heard = Some(now);
        self.connected = true;
        self.settled = true;
        self.error = None;
        if r.heartbeat_bound_ms > 0 {
            self.bound = Some(Duration::from_millis(r.heartbeat_bound_ms));
        }
        if let Some(l) = r.load {
            self.latest = Some(Arc::new(NodeState::from_report(name, l, now)));
        }
    }

    /// The stream failed or ended.
    pub fn broken(&mut self, why: String) {
        self.connected = false;
        self.settled = true;
        self.error = Some(why);
    }
}

struct Slot {
    name: Arc<str>,
    endpoint: String,
    state: Mutex<SlotState>,
}

/// The followed feeds of every node of a cluster file.
pub struct Feed {
    slots: Vec<Arc<Slot>>,
    settled: Arc<AtomicUsize>,
    /// Reports received (heartbeats, complete) since the start.
    reports: Arc<[AtomicUsize; 2]>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A node's name, and its latest state or why it is down.
pub type NodeEntry = (Arc<str>, Result<Arc<NodeState>, String>);

/// One round's view of the feed: a pointer per node, nothing copied.
pub struct FeedView {
    pub nodes: Vec<NodeEntry>,
    pub taken: Instant,
}

impl FeedView {
    /// Names of the nodes that are down, with why.
    pub fn down(&self) -> Vec<(&str, &str)> {
        self.nodes
            .iter()
            .filter_map(|(n, s)| s.as_ref().err().map(|e| (&**n, e.as_str())))
            .collect()
    }

    pub fn up(&self) -> impl Iterator<Item = &Arc<NodeState>> {
        self.nodes.iter().filter_map(|(_, s)| s.as_ref().ok())
    }

    /// Mean measured migration bandwidth of the nodes that know one.
    pub fn bandwidth(&self) -> f64 {
        let (sum, n) = self
            .up()
            .filter(|s| s.bandwidth_bps > 0.0)
            .fold((0.0, 0usize), |(s, n), x| (s + x.bandwidth_bps, n + 1));
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    fn refs(&self) -> Vec<NodeRef<'_>> {
        self.up()
            .map(|s| NodeRef {
                node: &s.node,
                jobs: &s.jobs,
                age_secs: self
                    .taken
                    .saturating_duration_since(s.received)
                    .as_secs_f64(),
            })
            .collect()
    }

    /// Plan straight from the reports (see the module doc).
    pub fn plan(&self, config: &PolicyConfig) -> Plan {
        policy::plan_nodes(&self.refs(), self.bandwidth(), config)
    }

    /// Initial placement from the reports.
    pub fn place(&self, config: &PolicyConfig, rss_bytes: u64, cpu: f64) -> Option<String> {
        policy::place_among(self.up().map(|s| &s.node), config, rss_bytes, cpu)
    }

    /// Mark nodes outside `live` (the etcd leases) down, as the polled view
    /// marks them LOST.
    pub fn retain_live(&mut self, live: &std::collections::BTreeSet<String>) {
        for (name, s) in &mut self.nodes {
            if s.is_ok() && !live.contains(&**name) {
                *s = Err(format!(
                    "{}: its agent reports, but it holds no etcd lease (cut off from etcd: it has fenced its jobs)",
                    super::view::LOST
                ));
            }
        }
    }
}

impl Feed {
    /// Start following every node of `cf` (needs a tokio runtime).
    pub fn start(cf: &ClusterFile, tls: Option<ClientTls>) -> Arc<Feed> {
        let sem = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
        let settled = Arc::new(AtomicUsize::new(0));
        let reports = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let slots: Vec<Arc<Slot>> = cf
            .nodes
            .iter()
            .map(|n| {
                Arc::new(Slot {
                    name: Arc::from(n.name.as_str()),
                    endpoint: n.endpoint.clone(),
                    state: Mutex::new(SlotState::default()),
                })
            })
            .collect();
        let tasks = slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                tokio::spawn(follow(
                    s.clone(),
                    tls.clone(),
                    sem.clone(),
                    settled.clone(),
                    reports.clone(),
                    i as u64,
                ))
                .abort_handle()
            })
            .collect();
        Arc::new(Feed {
            slots,
            settled,
            reports,
            tasks,
        })
    }

    /// Reports received so far: (heartbeats, complete reports).
    pub fn reports(&self) -> (usize, usize) {
        (
            self.reports[0].load(Ordering::Relaxed),
            self.reports[1].load(Ordering::Relaxed),
        )
    }

    /// Every node has answered or failed at least once.
    pub fn settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed) >= self.slots.len()
    }

    /// Wait (at most `max`) until [`Feed::settled`].
    pub async fn wait_settled(&self, max: Duration) {
        let t = Instant::now();
        while !self.settled() && t.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The latest state of every node, as of now.
    pub fn view(&self) -> FeedView {
        let now = Instant::now();
        let nodes = self
            .slots
            .iter()
            .map(|s| {
                let st = match s.state.lock() {
                    Ok(g) => g.status(now).cloned(),
                    Err(_) => Err("feed state poisoned".to_string()),
                };
                (s.name.clone(), st)
            })
            .collect();
        FeedView { nodes, taken: now }
    }
}

fn jitter(d: Duration, seed: u64) -> Duration {
    // ±25%, from the slot index and the clock: reconnects spread out
    let r = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ crate::core::now_unix_ms()) % 501;
    d.mul_f64(0.75 + r as f64 / 1000.0)
}

/// Follow one agent's feed forever: connect, read reports, reconnect with
/// a jittered exponential backoff after a failure.
async fn follow(
    slot: Arc<Slot>,
    tls: Option<ClientTls>,
    sem: Arc<tokio::sync::Semaphore>,
    settled: Arc<AtomicUsize>,
    reports: Arc<[AtomicUsize; 2]>,
    seed: u64,
) {
    let mut first = true;
    let mut backoff = MIN_BACKOFF;
    let mark_settled = |first: &mut bool| {
        if std::mem::take(first) {
            settled.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        let opened = {
            let _permit = sem.acquire().await;
            tokio::time::timeout(CONNECT_TIMEOUT, open(&slot.endpoint, tls.as_ref())).await
        };
        // One way down for every failure: open, or the stream after it.
        let why = match opened {
            Ok(Ok(mut stream)) => loop {
                let bound = slot
                    .state
                    .lock()
                    .ok()
                    .and_then(|g| g.bound)
                    .unwrap_or(DEFAULT_BOUND);
                match tokio::time::timeout(bound, stream.message()).await {
                    Ok(Ok(Some(r))) => {
                        reports[usize::from(r.load.is_some())].fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut g) = slot.state.lock() {
                            g.apply(&slot.name, r, Instant::now());
                        }
                        mark_settled(&mut first);
                        backoff = MIN_BACKOFF;
                    }
                    Ok(Ok(None)) => break "its load feed ended".to_string(),
                    Ok(Err(s)) => {
                        break format!("its load feed failed: {}", client::status_text(&s))
                    }
                    Err(_) => break format!("its load feed was silent for {bound:?}"),
                }
            },
            Ok(Err(e)) => e,
            Err(_) => format!("no load report within {CONNECT_TIMEOUT:?}"),
        };
        client::forget(&slot.endpoint);
        if let Ok(mut g) = slot.state.lock() {
            g.broken(why);
        }
        mark_settled(&mut first);
        tokio::time::sleep(jitter(backoff, seed)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn open(
    endpoint: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::Streaming<pb::LoadReport>, String> {
    let mut c = client::pooled_agent(endpoint, tls, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    c.watch_load(pb::WatchLoadRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| client::status_text(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(load: f64, jobs: Vec<pb::JobUsage>) -> pb::LoadReport {
        pb::LoadReport {
            load: Some(pb::NodeLoad {
                node: "n1".into(),
                load,
                capacity: 2.0,
                mem_total_bytes: 100,
                mem_available_bytes: 50,
                timestamp_unix_ms: 100_000,
                jobs,
                ..Default::default()
            }),
            heartbeat_bound_ms: 25_000,
        }
    }

    #[test]
    fn a_node_is_down_until_it_reports_and_after_its_heartbeat_bound() {
        let t0 = Instant::now();
        let mut s = SlotState::default();
        assert!(s.status(t0).is_err());
        s.apply("n1", report(1.0, vec![]), t0);
        assert!(s.status(t0).is_ok());
        // heartbeats keep it up, past the bound counted from the last one
        s.apply(
            "n1",
            pb::LoadReport::default(),
            t0 + Duration::from_secs(20),
        );
        assert!(s.status(t0 + Duration::from_secs(44)).is_ok());
        let e = s.status(t0 + Duration::from_secs(46)).unwrap_err();
        assert!(e.contains("silent"), "{e}");
        // a heartbeat keeps the last complete report
        assert_eq!(
            s.status(t0 + Duration::from_secs(21)).unwrap().node.load,
            1.0
        );
    }

    #[test]
    fn a_broken_stream_is_down_at_once_and_a_new_one_brings_it_back() {
        let t0 = Instant::now();
        let mut s = SlotState::default();
        s.apply("n1", report(1.0, vec![]), t0);
        s.broken("its load feed ended".into());
        assert_eq!(s.status(t0).unwrap_err(), "its load feed ended");
        s.apply("n1", report(0.5, vec![]), t0 + Duration::from_secs(1));
        assert_eq!(
            s.status(t0 + Duration::from_secs(1)).unwrap().node.load,
            0.5
        );
    }

    #[test]
    fn reports_become_policy_state_like_the_polled_view() {
        let u = |id: &str| pb::JobUsage {
            job_id: id.into(),
            demand: 0.5,
            rss_bytes: 10,
            arrived_unix_ms: 90_000,
            ..Default::default()
        };
        let mut young = u("j2");
        young.unsampled = true;
        let mut busy = u("j3");
        busy.busy = true;
        let mut pinned = u("j4");
        pinned.pinned = true;
        pinned.non_migratable = true;
        let r = report(0.2, vec![u("j1"), young, busy, pinned]);
        let n = NodeState::from_report("n1", r.load.unwrap(), Instant::now());
        // load at least the jobs' demand, an unsampled job counting as 1 core
        assert_eq!(n.node.load, 0.5 + 1.0 + 0.5 + 0.5);
        assert_eq!(n.node.migrations_in_flight, 1, "an operation under way");
        let ids: Vec<&str> = n.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["j1", "j2", "j4"]);
        assert_eq!(n.jobs[0].residence_secs, 10.0);
        assert_eq!(n.jobs[1].cpu_demand, 1.0);
        assert!(n.jobs[2].pinned && !n.jobs[2].migratable);
        assert!(n.jobs.iter().all(|j| j.node == "n1"));
    }

    #[test]
    fn a_view_plans_like_a_snapshot_of_the_same_nodes() {
        let now = Instant::now();
        let hot = report(
            4.0,
            (0..4)
                .map(|i| pb::JobUsage {
                    job_id: format!("j{i}"),
                    demand: 1.0,
                    rss_bytes: 1,
                    arrived_unix_ms: 1,
                    ..Default::default()
                })
                .collect(),
        );
        let mut idle = report(0.0, vec![]);
        if let Some(l) = idle.load.as_mut() {
            l.node = "n2".into();
        }
        let a = Arc::new(NodeState::from_report("n1", hot.load.unwrap(), now));
        let b = Arc::new(NodeState::from_report("n2", idle.load.unwrap(), now));
        let v = FeedView {
            nodes: vec![
                (Arc::from("n1"), Ok(a.clone())),
                (Arc::from("n2"), Ok(b.clone())),
                (Arc::from("n3"), Err("down".into())),
            ],
            taken: now,
        };
        let snap = policy::ClusterSnapshot {
            nodes: vec![a.node.clone(), b.node.clone()],
            jobs: a.jobs.iter().chain(&b.jobs).cloned().collect(),
            bandwidth_bytes_per_sec: 0.0,
        };
        let cfg = PolicyConfig::default();
        let p = v.plan(&cfg);
        assert!(!p.moves.is_empty());
        assert_eq!(p, policy::plan(&snap, &cfg));
        assert_eq!(v.down(), vec![("n3", "down")]);
        assert_eq!(v.place(&cfg, 0, 1.0).as_deref(), Some("n2"));
    }

    #[test]
    fn residence_advances_with_the_age_of_a_report() {
        let t0 = Instant::now();
        let young = report(
            2.0,
            vec![pb::JobUsage {
                job_id: "j1".into(),
                demand: 2.0,
                arrived_unix_ms: 99_000, // 1 s before the report
                ..Default::default()
            }],
        );
        let mut idle = report(0.0, vec![]);
        if let Some(l) = idle.load.as_mut() {
            l.capacity = 8.0;
        }
        let a = Arc::new(NodeState::from_report("n1", young.load.unwrap(), t0));
        let b = Arc::new(NodeState::from_report("n2", idle.load.unwrap(), t0));
        let view = |at: Instant| FeedView {
            nodes: vec![
                (Arc::from("n1"), Ok(a.clone())),
                (Arc::from("n2"), Ok(b.clone())),
            ],
            taken: at,
        };
        let cfg = PolicyConfig::default(); // min residence 5 s
        assert!(view(t0).plan(&cfg).moves.is_empty(), "too young");
        assert_eq!(view(t0 + Duration::from_secs(5)).plan(&cfg).moves.len(), 1);
    }
}
