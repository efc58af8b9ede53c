//! The balancer service: follows the agents' load feeds (or polls them),
//! plans with the policy, carries the plan out, and serves the cluster view,
//! the plan, the history, placement and "rebalance now" over gRPC
//! (`mos-balance serve`). With a [`Feed`] a round plans straight from the
//! latest pushed reports; without one (one-shot runs, `serve --poll`) it
//! polls every agent.

use super::feed::Feed;
use super::orchestrator::{self, GrpcMigrator, Outcome};
use super::policy::{self, Plan, PolicyConfig};
use super::view::{self, ClusterView};
use crate::api::client::ClientTls;
use crate::api::pb;
use crate::api::pb::balancer_server::Balancer as BalancerApi;
use crate::core::cluster_file::ClusterFile;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

const HISTORY_LEN: usize = 1000;
/// How long an agent has to answer a poll before it counts as down
/// (`mos-balance --agent-timeout`). A node capped at half a core and full
/// of CPU-bound jobs, on a busy machine, was once seen to need more than 2 s.
pub const DEFAULT_POLL_DEADLINE: Duration = Duration::from_secs(5);

pub struct BalancerMetrics {
    pub registry: Registry,
    pub rounds: IntCounter,
    pub migrations: IntCounterVec,
    pub migration_seconds: Histogram,
}

impl BalancerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("mosix_balancer".into()), None)?;
        let rounds = IntCounter::new("rounds_total", "Balancing rounds")?;
        let migrations = IntCounterVec::new(
            Opts::new("migrations_total", "Migrations ordered, by outcome"),
            &["outcome"],
        )?;
        let migration_seconds = Histogram::with_opts(
            HistogramOpts::new("migration_seconds", "Total time of migrations ordered")
                .buckets(vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(rounds.clone()))?;
        registry.register(Box::new(migrations.clone()))?;
        registry.register(Box::new(migration_seconds.clone()))?;
        Ok(Self {
            registry,
            rounds,
            migrations,
            migration_seconds,
        })
    }
}

pub struct Balancer {
    pub cf: ClusterFile,
    pub tls: Option<ClientTls>,
    pub config: PolicyConfig,
    pub poll_deadline: Duration,
    pub migrate_timeout: Duration,
    pub max_parallel: usize,
    pub metrics: BalancerMetrics,
    state: Mutex<State>,
    /// One round at a time, whoever asks (timer or RPC).
    round_lock: Mutex<()>,
    /// With etcd: the election among balancers; only the leader moves jobs.
    pub leadership: std::sync::OnceLock<Arc<super::leader::Leadership>>,
    /// The agents' load feeds, when rounds plan from them (see [`Feed`]).
    pub feed: std::sync::OnceLock<Arc<Feed>>,
}

#[derive(Default)]
struct State {
    plan: Option<Plan>,
    history: VecDeque<pb::Migration>,
}

/// What one round did.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// The polled view; empty when the round planned from the feed.
    pub view: ClusterView,
    /// Nodes that were down, with why.
    pub down: Vec<(String, String)>,
    pub plan: Plan,
    pub outcomes: Vec<Outcome>,
}

impl RoundReport {
    pub fn failures(&self) -> Vec<String> {
        self.outcomes
            .iter()
            .filter_map(|o| {
                o.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{} {} -> {}: {e}", o.mv.job_id, o.mv.from, o.mv.to))
            })
            .collect()
    }
}

pub fn plan_to_pb(p: &Plan) -> pb::Plan {
    pb::Plan {
        moves: p
            .moves
            .iter()
            .map(|m| pb::PlannedMove {
                job_id: m.job_id.clone(),
                from_node: m.from.clone(),
                to_node: m.to.clone(),
                reason: format!("{:?}", m.reason),
                expected_gain: m.expected_gain,
                estimated_cost_secs: m.estimated_cost_secs,
                post_copy: m.post_copy,
            })
            .collect(),
        imbalance_before: p.imbalance_before,
        imbalance_after: p.imbalance_after,
    }
}

impl Balancer {
    pub fn new(
        cf: ClusterFile,
        tls: Option<ClientTls>,
        config: PolicyConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            cf,
            tls,
            config,
            poll_deadline: DEFAULT_POLL_DEADLINE,
            migrate_timeout: Duration::from_secs(300),
            max_parallel: 4,
            metrics: BalancerMetrics::new()?,
            state: Mutex::new(State::default()),
            round_lock: Mutex::new(()),
            leadership: std::sync::OnceLock::new(),
            feed: std::sync::OnceLock::new(),
        })
    }

    /// Follow the agents' load feeds from now on, and plan from them.
    pub fn follow_feeds(&self) {
        let _ = self.feed.set(Feed::start(&self.cf, self.tls.clone()));
    }

    pub async fn poll(&self) -> ClusterView {
        view::poll(&self.cf, self.tls.as_ref(), self.poll_deadline).await
    }

    /// The feed's view of the cluster now (LOST nodes marked down, as the
    /// polled view marks them), once every node answered or failed once.
    async fn feed_view(&self, feed: &Feed) -> super::feed::FeedView {
        feed.wait_settled(self.poll_deadline).await;
        let mut v = feed.view();
        if let Some(live) = view::live_nodes(&self.cf).await {
            v.retain_live(&live);
        }
        v
    }

    pub fn plan_for(&self, v: &ClusterView) -> Plan {
        policy::plan(&v.snapshot(0.0), &self.config)
    }

    /// Poll, plan, and (unless `dry_run`) carry the plan out.
    pub async fn round(
        &self,
        dry_run: bool,
        progress: &(dyn Fn(&Outcome, usize, usize) + Sync),
    ) -> RoundReport {
        let _one = self.round_lock.lock().await;
        self.metrics.rounds.inc();
        let (view, plan, down) = match self.feed.get() {
            Some(feed) => {
                let fv = self.feed_view(feed).await;
                let plan = fv.plan(&self.config);
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let nodes: Vec<String> = fv
                        .up()
                        .map(|s| {
                            format!(
                                "{} {:.2}/{:.2} jobs {} busy {} age {:.2}s",
                                s.node.name,
                                s.node.load,
                                s.node.capacity,
                                s.jobs.len(),
                                s.node.migrations_in_flight,
                                s.received.elapsed().as_secs_f64()
                            )
                        })
                        .collect();
                    tracing::debug!(
                        "round: {} move(s) from [{}]",
                        plan.moves.len(),
                        nodes.join("; ")
                    );
                }
                let down = fv
                    .down()
                    .into_iter()
                    .map(|(n, e)| (n.to_string(), e.to_string()))
                    .collect();
                (ClusterView::default(), plan, down)
            }
            None => {
                let view = self.poll().await;
                let plan = self.plan_for(&view);
                let down = view.down();
                (view, plan, down)
            }
        };
        self.state.lock().await.plan = Some(plan.clone());
        // With an election, only a confirmed leader acts, and its moves
        // carry its leadership revision (agents refuse a stale one).
        let leader_revision = match self.leadership.get() {
            None => Some(0),
            Some(l) if dry_run || plan.moves.is_empty() => l.leading(),
            Some(l) => l.confirm().await,
        };
        if leader_revision.is_none() && !dry_run && !plan.moves.is_empty() {
            tracing::debug!(
                "standing by: {} planned move(s) left to the leader",
                plan.moves.len()
            );
        }
        let outcomes = if dry_run || plan.moves.is_empty() || leader_revision.is_none() {
            vec![]
        } else {
            let migrator = GrpcMigrator {
                endpoints: self
                    .cf
                    .nodes
                    .iter()
                    .map(|n| (n.name.to_string(), n.endpoint.clone()))
                    .collect(),
                tls: self.tls.clone(),
                timeout: self.migrate_timeout,
                leader_revision: leader_revision.unwrap_or(0),
            };
            orchestrator::execute(&plan, &migrator, self.max_parallel, progress).await
        };
        let mut st = self.state.lock().await;
        for o in &outcomes {
            let m = match &o.result {
                Ok(m) => {
                    self.metrics.migrations.with_label_values(&["ok"]).inc();
                    self.metrics
                        .migration_seconds
                        .observe(m.total_ms as f64 / 1000.0);
                    m.clone()
                }
                Err(e) => {
                    self.metrics.migrations.with_label_values(&["failed"]).inc();
                    pb::Migration {
                        from_node: o.mv.from.clone(),
                        to_node: o.mv.to.clone(),
                        ok: false,
                        error: format!("{}: {e}", o.mv.job_id),
                        started_unix_ms: crate::core::now_unix_ms(),
                        ..Default::default()
                    }
                }
            };
            st.history.push_front(m);
            st.history.truncate(HISTORY_LEN);
        }
        RoundReport {
            view,
            down,
            plan,
            outcomes,
        }
    }

    /// Rebalance every `interval` until the process ends.
    pub async fn run_forever(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = self
                .round(false, &|o, i, n| match &o.result {
                    Ok(m) => tracing::info!(
                        "[{i}/{n}] {} {} -> {}: frozen {} ms",
                        o.mv.job_id,
                        o.mv.from,
                        o.mv.to,
                        m.frozen_ms
                    ),
                    Err(e) => tracing::warn!(
                        "[{i}/{n}] {} {} -> {} failed: {e}",
                        o.mv.job_id,
                        o.mv.from,
                        o.mv.to
                    ),
                })
                .await;
            let down: Vec<&str> = r.down.iter().map(|(n, _)| n.as_str()).collect();
            if !down.is_empty() {
                tracing::warn!("nodes down: {}", down.join(", "));
            }
        }
    }
}

pub struct BalancerService {
    pub balancer: Arc<Balancer>,
}

fn view_to_pb(v: &ClusterView) -> pb::ClusterView {
    pb::ClusterView {
        nodes: v
            .nodes
            .iter()
            .map(|n| pb::NodeView {
                name: n.name.clone(),
                endpoint: n.endpoint.clone(),
                up: n.load.is_ok(),
                error: n.load.as_ref().err().cloned().unwrap_or_default(),
                load: n.load.as_ref().ok().cloned(),
            })
            .collect(),
        jobs: v.jobs.clone(),
        timestamp_unix_ms: v.timestamp_unix_ms,
    }
}

#[tonic::async_trait]
impl BalancerApi for BalancerService {
    async fn get_cluster_view(
        &self,
        _r: Request<pb::GetClusterViewRequest>,
    ) -> Result<Response<pb::ClusterView>, Status> {
        let v = self.balancer.poll().await;
        Ok(Response::new(view_to_pb(&v)))
    }

    async fn get_plan(
        &self,
        _r: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        if let Some(feed) = self.balancer.feed.get() {
            let v = self.balancer.feed_view(feed).await;
            return Ok(Response::new(plan_to_pb(&v.plan(&self.balancer.config))));
        }
        let v = self.balancer.poll().await;
        Ok(Response::new(plan_to_pb(&self.balancer.plan_for(&v))))
    }

    async fn get_history(
        &self,
        r: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::History>, Status> {
        let limit = match r.into_inner().limit {
            0 => 100,
            n => n.min(HISTORY_LEN as u32),
        } as usize;
        let st = self.balancer.state.lock().await;
        Ok(Response::new(pb::History {
            migrations: st.history.iter().take(limit).cloned().collect(),
        }))
    }

    async fn place(
        &self,
        r: Request<pb::PlaceRequest>,
    ) -> Result<Response<pb::PlaceResponse>, Status> {
        let r = r.into_inner();
        if !r.cpu_cores.is_finite() || r.cpu_cores < 0.0 || r.cpu_cores > 1e6 {
            return Err(Status::invalid_argument(format!(
                "cpu_cores {} out of range",
                r.cpu_cores
            )));
        }
        let cores = if r.cpu_cores == 0.0 { 1.0 } else { r.cpu_cores };
        let none = || Status::resource_exhausted("no node is up with memory for this job");
        let node = match self.balancer.feed.get() {
            Some(feed) => self
                .balancer
                .feed_view(feed)
                .await
                .place(&self.balancer.config, r.rss_bytes, cores)
                .ok_or_else(none)?,
            None => {
                let v = self.balancer.poll().await;
                policy::place(&v.snapshot(0.0), &self.balancer.config, r.rss_bytes, cores)
                    .ok_or_else(none)?
            }
        };
        let endpoint = self
            .balancer
            .cf
            .nodes
            .iter()
            .find(|n| n.name.as_str() == node)
            .map(|n| n.endpoint.clone())
            .unwrap_or_default();
        Ok(Response::new(pb::PlaceResponse { node, endpoint }))
    }

    async fn rebalance(
        &self,
        r: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let dry = r.into_inner().dry_run;
        let b = self.balancer.clone();
        // Detached, like the agents' migrations: a caller that goes away must
        // not cancel a round half way.
        let rep = tokio::spawn(async move { b.round(dry, &|_, _, _| {}).await })
            .await
            .map_err(|e| Status::internal(format!("round failed: {e}")))?;
        Ok(Response::new(pb::RebalanceResponse {
            plan: Some(plan_to_pb(&rep.plan)),
            done: rep
                .outcomes
                .iter()
                .filter_map(|o| o.result.as_ref().ok().cloned())
                .collect(),
            failures: rep.failures(),
        }))
    }
}
