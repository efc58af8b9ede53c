//! Several `mos-balance serve` instances, one leader (see `coord::election`).
//!
//! Each instance holds a short lease (3 s TTL, renewed every second, fenced
//! 2 s after its last good renewal) and tries every [`CAMPAIGN_EVERY`] to
//! create the leader key bound to it. The one that does leads; the others
//! stand by and take over within TTL + one try (≈3.5 s) of the leader's
//! death. Only the leader rebalances, and each of its moves carries its
//! leadership revision, which agents check against etcd (`agent::ownership`),
//! so a leader that was cut off and does not know it yet is refused.
//!
//! The leader also watches the nodes' leases: a node that owns jobs but
//! holds no lease is reported LOST, with the jobs etcd says it owns; after
//! the fencing margin (the node has certainly killed them by then), the
//! [`NodeLostHook`] runs: `mos-balance serve` gives it
//! `balancer::restart::restart_from_checkpoints`. The watch compares
//! states rather than reacting to an expiry event, so a standby that takes
//! over in the middle of a restart finishes it.

use crate::coord::election::Election;
use crate::coord::fencing::FenceTiming;
use crate::coord::lease::{self, FenceHandler, LeaseHolder};
use crate::coord::ownership::{OwnerRecord, Owners};
use crate::coord::store::{Store, SystemClock};
use crate::coord::CoordError;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);

/// The balancer's own lease: short, so a standby takes over quickly.
pub fn balancer_timing() -> FenceTiming {
    FenceTiming {
        ttl: Duration::from_secs(3),
        margin: Duration::from_secs(1),
    }
}

/// A node whose lease expired, and the jobs it owned then.
#[derive(Debug, Clone)]
pub struct NodeLost {
    pub node: String,
    pub jobs: Vec<(String, OwnerRecord)>,
    /// The leader's revision: the hook's actions are fenced by it.
    pub leader_revision: i64,
}

/// Called by the leader for a lost node, after the fencing margin. It
/// answers whether the node's jobs are settled (restarted, or recorded
/// lost); if not, the leader calls it again after [`RETRY_EVERY`].
pub type NodeLostHook = Arc<dyn Fn(NodeLost) -> BoxFuture<'static, bool> + Send + Sync>;

/// How soon a lost node's unsettled jobs are tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(10);

/// A lost node, as the leader tracks it.
struct Dead {
    /// When to run the hook (next); None: settled, or running now.
    next: Option<tokio::time::Instant>,
    run: Option<tokio::task::JoinHandle<bool>>,
}

/// The owner records whose node holds no lease, by node.
fn orphans_by_node(
    owned: Vec<(String, OwnerRecord)>,
    live: &BTreeSet<String>,
) -> BTreeMap<String, Vec<(String, OwnerRecord)>> {
    let mut out: BTreeMap<String, Vec<(String, OwnerRecord)>> = BTreeMap::new();
    for (job, o) in owned {
        if !live.contains(&o.node) {
            out.entry(o.node.clone()).or_default().push((job, o));
        }
    }
    out
}

pub struct Leadership {
    pub election: Election,
    pub store: Arc<dyn Store>,
    pub cluster: String,
    /// The current leadership revision; 0 while standing by.
    revision: AtomicI64,
    holder: Arc<LeaseHolder>,
    /// The agents' lease timing: how long to wait after a node's expiry.
    pub node_timing: FenceTiming,
    pub hook: NodeLostHook,
}

struct StandDown(std::sync::Weak<Leadership>);

impl FenceHandler for StandDown {
    fn fence(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(l) = self.0.upgrade() {
                if l.revision.swap(0, Ordering::SeqCst) != 0 {
                    tracing::error!("balancer lease not renewed in time: no longer leading");
                }
            }
        })
    }
    fn rejoined(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Leadership {
    pub async fn start(
        store: Arc<dyn Store>,
        cluster: &str,
        id: &str,
        hook: NodeLostHook,
    ) -> Result<Arc<Self>, CoordError> {
        let holder = LeaseHolder::acquire(
            store.clone(),
            Arc::new(SystemClock),
            balancer_timing(),
            format!("/mosix/{cluster}/balancer/members/{id}"),
            id.as_bytes().to_vec(),
        )
        .await?;
        let l = Arc::new(Self {
            election: Election::new(store.clone(), cluster, id),
            store,
            cluster: cluster.to_string(),
            revision: AtomicI64::new(0),
            holder: holder.clone(),
            node_timing: FenceTiming::default(),
            hook,
        });
        lease::spawn(holder, Arc::new(StandDown(Arc::downgrade(&l))));
        tokio::spawn(l.clone().campaign_forever());
        tokio::spawn(l.clone().watch_nodes_forever());
        Ok(l)
    }

    /// The leadership revision if this instance leads now (and its lease
    /// is good), else None.
    pub fn leading(&self) -> Option<i64> {
        let r = self.revision.load(Ordering::SeqCst);
        (r != 0 && self.holder.may_write()).then_some(r)
    }

    /// Before an action: does etcd still show us as the leader?
    pub async fn confirm(&self) -> Option<i64> {
        let r = self.leading()?;
        match self.election.is_leader(r).await {
            Ok(true) => Some(r),
            _ => None,
        }
    }

    async fn campaign_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CAMPAIGN_EVERY).await;
            if !self.holder.may_write() {
                self.revision.store(0, Ordering::SeqCst);
                continue;
            }
            let lease = self.holder.lease_id();
            match self.election.campaign(lease).await {
                Ok(Some(rev)) => {
                    if self.revision.swap(rev, Ordering::SeqCst) != rev {
                        tracing::warn!(id = %self.election.id, revision = rev, "leading the balancers (leadership revision {rev})");
                    }
                }
                Ok(None) => {
                    if self.revision.swap(0, Ordering::SeqCst) != 0 {
                        tracing::warn!("another balancer leads now: standing by");
                    }
                }
                Err(e) => tracing::debug!("campaign: {e}"),
            }
        }
    }

    /// Level-triggered, like a Kubernetes controller: every second the
    /// leader compares the owner records with the live leases, so a node
    /// that died while no balancer led, or while the previous leader was in
    /// the middle of its restart, is still found by whoever leads next. A
    /// job whose restart finished has moved its owner record to a live
    /// node, so it drops out by itself; one that could not be restarted
    /// yet keeps its dead owner and is tried again every [`RETRY_EVERY`].
    async fn watch_nodes_forever(self: Arc<Self>) {
        let owners = Owners::new(self.store.clone(), &self.cluster);
        let mut dead: BTreeMap<String, Dead> = BTreeMap::new();
        let mut margins: BTreeMap<String, Duration> = BTreeMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(rev) = self.leading() else {
                dead.clear();
                continue;
            };
            let live = match crate::coord::live_node_margins(&*self.store, &self.cluster).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("watching node leases: {e}");
                    continue;
                }
            };
            // Each agent says its own margin (`mosixd --fence-margin`);
            // remembered while its lease lives, since the key goes with it.
            for (node, m) in &live {
                if let Some(m) = m {
                    margins.insert(node.clone(), *m);
                }
            }
            let live: BTreeSet<String> = live.into_keys().collect();
            let owned = match owners.list().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!("reading owner records: {e}");
                    continue;
                }
            };
            let orphans = orphans_by_node(owned, &live);
            dead.retain(|node, _| orphans.contains_key(node));
            let now = tokio::time::Instant::now();
            for (node, jobs) in orphans {
                let d = dead.entry(node.clone()).or_insert_with(|| {
                    tracing::error!(node = %node, jobs = jobs.len(), "node LOST: it holds no lease in etcd and owns jobs");
                    // The node fenced itself `margin` before etcd expired
                    // it; wait the margin again for a node whose clock ran
                    // slow (a new leader cannot know when the lease
                    // expired, so it counts from now: later, never sooner).
                    // A leader that never saw the node alive uses the
                    // default margin.
                    let margin = margins
                        .get(&node)
                        .copied()
                        .unwrap_or_else(|| self.node_timing.takeover_delay());
                    Dead {
                        next: Some(now + margin),
                        run: None,
                    }
                });
                if let Some(run) = &d.run {
                    if !run.is_finished() {
                        continue;
                    }
                    let settled = match d.run.take() {
                        Some(h) => h.await.unwrap_or(false),
                        None => false,
                    };
                    d.next = (!settled).then(|| now + RETRY_EVERY);
                }
                if d.next.is_none_or(|t| now < t) {
                    continue;
                }
                d.next = None;
                let lost = NodeLost {
                    node,
                    jobs,
                    leader_revision: rev,
                };
                d.run = Some(tokio::spawn((self.hook)(lost)));
            }
        }
    }

    pub async fn resign(&self) {
        if let Some(r) = self.leading() {
            self.election.resign(r).await;
        }
        self.holder.release().await;
    }
}
