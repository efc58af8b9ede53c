//! Polling the cluster: every agent is asked for its load concurrently, each
//! with a deadline. An agent that does not answer is marked down and the rest
//! carry on. The jobs come from the registry (through any agent that answers)
//! and are joined with the per-job usage their node reported. Without a
//! shared path the agent asked gathers every node's own jobs (ListJobs is
//! cluster-wide either way), so one call still suffices; a node it names as
//! not listed counts as down in this view (`mark_unlisted`).

use super::policy::{ClusterSnapshot, JobSnapshot, NodeSnapshot};
use crate::api::client::{self, ClientTls};
use crate::api::pb;
use crate::core::cluster_file::ClusterFile;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub endpoint: String,
    pub load: Result<pb::NodeLoad, String>,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub nodes: Vec<NodeState>,
    /// Jobs not finished, as the registry has them.
    pub jobs: Vec<pb::Job>,
    pub timestamp_unix_ms: u64,
}

/// One GetLoad over the pooled channel to `ep` (see `client::pooled_agent`).
async fn get_load(
    ep: &str,
    tls: Option<&ClientTls>,
    deadline: Duration,
) -> Result<pb::NodeLoad, String> {
    let mut c = client::pooled_agent(ep, tls, deadline)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut req = tonic::Request::new(pb::GetLoadRequest {});
    req.set_timeout(deadline);
    c.get_load(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

pub async fn poll(cf: &ClusterFile, tls: Option<&ClientTls>, deadline: Duration) -> ClusterView {
    let futs = cf.nodes.iter().map(|n| {
        let (name, ep) = (n.name.to_string(), n.endpoint.clone());
        let tls = tls.cloned();
        async move {
            let load = tokio::time::timeout(deadline, async {
                match get_load(&ep, tls.as_ref(), deadline).await {
                    Ok(l) => Ok(l),
                    // Maybe a pooled channel to an agent that restarted:
                    // connect afresh once.
                    Err(_) => {
                        client::forget(&ep);
                        get_load(&ep, tls.as_ref(), deadline).await
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")));
            NodeState {
                name,
                endpoint: ep,
                load,
            }
        }
    });
    let mut nodes = futures::future::join_all(futs).await;
    if !cf.etcd.is_empty() {
        mark_lost(cf, &mut nodes).await;
    }
    let mut listed: Option<pb::ListJobsResponse> = None;
    for n in nodes.iter().filter(|n| n.load.is_ok()) {
        let got = tokio::time::timeout(deadline, async {
            let mut c = client::pooled_agent(&n.endpoint, tls, deadline)
                .await
                .ok()?;
            let mut req = tonic::Request::new(pb::ListJobsRequest {
                node: String::new(),
                include_finished: false,
            });
            req.set_timeout(deadline);
            let got = c.list_jobs(req).await.ok().map(|r| r.into_inner());
            if got.is_none() {
                client::forget(&n.endpoint);
            }
            got
        })
        .await
        .ok()
        .flatten();
        if got.is_some() {
            listed = got;
            break;
        }
    }
    let jobs = match listed {
        Some(l) => {
            mark_unlisted(&mut nodes, &l.unlisted);
            l.jobs
        }
        None => Vec::new(),
    };
    ClusterView {
        nodes,
        jobs,
        timestamp_unix_ms: crate::core::now_unix_ms(),
    }
}

/// Without a shared path, the nodes that did not list their jobs (see
/// `ListJobsResponse.unlisted`) count as down for this view: their jobs are
/// unknown, and a node that seems to have none would be planned onto, and
/// a drain of it would end at once saying it was drained.
fn mark_unlisted(nodes: &mut [NodeState], unlisted: &[pb::UnlistedNode]) {
    for u in unlisted {
        for n in nodes
            .iter_mut()
            .filter(|n| n.name == u.node && n.load.is_ok())
        {
            n.load = Err(format!("its jobs could not be listed: {}", u.reason));
        }
    }
}

/// Text a LOST node's load error starts with (mosctl load, mosmon show it).
pub const LOST: &str = "LOST";

/// With etcd: a node without a live lease is LOST, even if its agent
/// answers (then it is cut off from etcd and has fenced itself): no job is
/// planned onto it, and every view shows it so.
async fn mark_lost(cf: &ClusterFile, nodes: &mut [NodeState]) {
    let mut loads: Vec<(String, &mut Result<pb::NodeLoad, String>)> = nodes
        .iter_mut()
        .map(|n| (n.name.clone(), &mut n.load))
        .collect();
    mark_lost_loads(cf, &mut loads).await;
}

/// `mark_lost` on (node, load) pairs (`mosctl load` polls that way).
pub async fn mark_lost_loads(
    cf: &ClusterFile,
    loads: &mut [(String, &mut Result<pb::NodeLoad, String>)],
) {
    let Some(live) = live_nodes(cf).await else {
        return;
    };
    for (name, load) in loads.iter_mut() {
        if !live.contains(name.as_str()) {
            let why = match &**load {
                Ok(_) => "its agent answers, but it holds no etcd lease (cut off from etcd: it has fenced its jobs)".to_string(),
                Err(e) => format!("its etcd lease expired and its agent does not answer ({e})"),
            };
            **load = Err(format!("{LOST}: {why}"));
        }
    }
}

/// With etcd: the nodes holding a live lease (None without etcd, or if it
/// cannot be asked: then nobody is marked LOST).
pub async fn live_nodes(cf: &ClusterFile) -> Option<std::collections::BTreeSet<String>> {
    static STORE: std::sync::Mutex<Option<std::sync::Arc<dyn crate::coord::store::Store>>> =
        std::sync::Mutex::new(None);
    if cf.etcd.is_empty() {
        return None;
    }
    let cached = STORE.lock().ok().and_then(|s| s.clone());
    let store = match cached {
        Some(s) => s,
        None => match crate::coord::connect(&cf.etcd).await {
            Ok(s) => {
                if let Ok(mut g) = STORE.lock() {
                    *g = Some(s.clone());
                }
                s
            }
            Err(e) => {
                tracing::debug!("node leases unknown: {e}");
                return None;
            }
        },
    };
    crate::coord::live_nodes(&*store, &cf.name).await.ok()
}

/// The CPU demand the policy plans with for a job its agent reported: what
/// was measured, or one busy core for a job not sampled yet (an agent lists
/// one with demand 0 and `unsampled` for up to a second after it arrived;
/// counting that 0 made the target of a move look empty to the next
/// round). The polled view and the feed ([`super::feed`]) both use it.
pub(super) fn reported_demand(u: &pb::JobUsage) -> f64 {
    if u.unsampled {
        1.0
    } else {
        u.demand
    }
}

impl ClusterView {
    /// The nodes that did not answer, with why.
    pub fn down(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .filter_map(|n| n.load.as_ref().err().map(|e| (n.name.clone(), e.clone())))
            .collect()
    }

    /// The policy's input. Node load is the larger of what the agent measured
    /// and the sum of its jobs' demand, where a job that arrived too recently
    /// to have been sampled counts as one busy core: right after a migration
    /// the target must not look emptier than it is.
    pub fn snapshot(&self, bandwidth_hint: f64) -> ClusterSnapshot {
        let now = self.timestamp_unix_ms;
        let mut usage: BTreeMap<String, pb::JobUsage> = BTreeMap::new();
        let mut bandwidth: Vec<f64> = Vec::new();
        let mut nodes: Vec<NodeSnapshot> = Vec::new();
        for n in &self.nodes {
            match &n.load {
                Ok(l) => {
                    for u in &l.jobs {
                        usage.insert(u.job_id.clone(), u.clone());
                    }
                    if l.migration_bandwidth_bps > 0.0 {
                        bandwidth.push(l.migration_bandwidth_bps);
                    }
                    nodes.push(NodeSnapshot {
                        name: n.name.clone(),
                        up: true,
                        capacity: l.capacity,
                        load: l.load,
                        mem_total_bytes: l.mem_total_bytes,
                        mem_available_bytes: l.mem_available_bytes,
                        migrations_in_flight: l.migrations_in_flight,
                        blocked: l.blocked,
                        job_addresses: l.job_addresses,
                    })
                }
                Err(_) => nodes.push(NodeSnapshot {
                    name: n.name.clone(),
                    up: false,
                    capacity: 1.0,
                    load: 0.0,
                    mem_total_bytes: 0,
                    mem_available_bytes: 0,
                    migrations_in_flight: 0,
                    blocked: false,
                    job_addresses: false,
                }),
            }
        }
        let mut jobs = Vec::new();
        let mut job_load: BTreeMap<String, f64> = BTreeMap::new();
        for j in &self.jobs {
            let running = j.state == pb::JobState::Running as i32;
            let u = usage.get(&j.id);
            let demand = u
                .map(reported_demand)
                .unwrap_or(if running { 1.0 } else { 0.0 });
            *job_load.entry(j.node.clone()).or_default() += demand;
            if j.state == pb::JobState::Migrating as i32 {
                if let Some(n) = nodes.iter_mut().find(|n| n.name == j.node) {
                    n.migrations_in_flight = n.migrations_in_flight.max(1);
                }
            }
            if !running {
                continue;
            }
            jobs.push(JobSnapshot {
                id: j.id.clone(),
                node: j.node.clone(),
                rss_bytes: u.map(|u| u.rss_bytes).unwrap_or(0),
                cpu_demand: demand,
                residence_secs: now.saturating_sub(j.arrived_unix_ms) as f64 / 1000.0,
                pinned: j.pinned,
                migratable: !j.non_migratable,
                post_copy_failed: j.history.last().is_some_and(|m| m.post_copy && !m.ok),
                own_address: !j.address.is_empty(),
            });
        }
        for n in nodes.iter_mut().filter(|n| n.up) {
            n.load = n.load.max(job_load.get(&n.name).copied().unwrap_or(0.0));
        }
        let bw = if bandwidth.is_empty() {
            bandwidth_hint
        } else {
            bandwidth.iter().sum::<f64>() / bandwidth.len() as f64
        };
        ClusterSnapshot {
            nodes,
            jobs,
            bandwidth_bytes_per_sec: bw,
        }
    }

    pub fn endpoint(&self, node: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.endpoint.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, load: Result<pb::NodeLoad, String>) -> NodeState {
        NodeState {
            name: name.into(),
            endpoint: format!("http://{name}:1"),
            load,
        }
    }

    #[test]
    fn a_node_whose_jobs_were_not_listed_counts_as_down() {
        let mut nodes = vec![
            node("node1", Ok(pb::NodeLoad::default())),
            node("node2", Ok(pb::NodeLoad::default())),
            node("node3", Err("no answer within 5s".into())),
        ];
        let unlisted = [
            pb::UnlistedNode {
                node: "node2".into(),
                reason: "no answer in time".into(),
            },
            pb::UnlistedNode {
                node: "node3".into(),
                reason: "unreachable".into(),
            },
        ];
        mark_unlisted(&mut nodes, &unlisted);
        assert!(nodes[0].load.is_ok());
        assert_eq!(
            nodes[1].load.as_ref().unwrap_err(),
            "its jobs could not be listed: no answer in time"
        );
        // A node already down keeps the reason it had.
        assert_eq!(nodes[2].load.as_ref().unwrap_err(), "no answer within 5s");
        let view = ClusterView {
            nodes,
            ..Default::default()
        };
        let down: Vec<String> = view.down().into_iter().map(|(n, _)| n).collect();
        assert_eq!(down, ["node2", "node3"]);
    }

    #[test]
    fn a_job_not_sampled_yet_counts_as_a_busy_core_as_in_the_feed() {
        let usage = |id: &str, demand: f64, unsampled: bool| pb::JobUsage {
            job_id: id.into(),
            demand,
            unsampled,
            ..Default::default()
        };
        let report = |jobs: Vec<pb::JobUsage>| pb::NodeLoad {
            capacity: 2.0,
            jobs,
            ..Default::default()
        };
        let record = |id: &str, node: &str| pb::Job {
            id: id.into(),
            node: node.into(),
            state: pb::JobState::Running as i32,
            ..Default::default()
        };
        // node1's job has run there for a while; node2's has just arrived
        // and its agent has not sampled it yet.
        let view = ClusterView {
            nodes: vec![
                node("node1", Ok(report(vec![usage("j1", 1.0, false)]))),
                node("node2", Ok(report(vec![usage("j2", 0.0, true)]))),
            ],
            jobs: vec![record("j1", "node1"), record("j2", "node2")],
            ..Default::default()
        };
        let s = view.snapshot(0.0);
        let load = |n: &str| s.nodes.iter().find(|x| x.name == n).unwrap().load;
        assert_eq!(load("node1"), 1.0);
        assert_eq!(load("node2"), 1.0, "the new job is not free: {s:?}");
        let j2 = s.jobs.iter().find(|j| j.id == "j2").unwrap();
        assert_eq!(j2.cpu_demand, 1.0);
        // The same report through the feed's path gives the same loads.
        let fed = super::super::feed::NodeState::from_report(
            "node2",
            report(vec![usage("j2", 0.0, true)]),
            std::time::Instant::now(),
        );
        assert_eq!(fed.node.load, load("node2"));
    }
}
