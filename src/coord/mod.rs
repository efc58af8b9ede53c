//! Coordination on etcd: node leases, job ownership epochs, fencing, and
//! the balancer's leader election.
//!
//! Why etcd and not files on the shared path: the question "may this node
//! still run or write for job X?" must have one answer cluster-wide even
//! when a node is cut off. NFS cannot give it (close-to-open caching, locks
//! lost on partition); etcd's linearisable compare-and-set and its leases
//! can. So the split is:
//!
//! - the **registry** on the shared path stays the record of each job (its
//!   command, state, history): nothing about it moves here;
//! - **etcd** holds only liveness and the right to act: one lease per node
//!   (`/mosix/<cluster>/nodes/<node>`, bound to the lease), one owner record
//!   per job (`/mosix/<cluster>/jobs/<id>/owner`, whose `mod_revision` is the
//!   owner's epoch, see [`ownership`]), and the balancer's leader key
//!   ([`election`]).
//!
//! A node that cannot renew its lease stops its jobs before etcd can
//! expire it ([`fencing`] has the timing and the reasoning), and commits
//! nothing meanwhile ([`lease::LeaseHolder::may_write`]); writes for a job
//! are checked against its owner epoch ([`ownership::Owners::check`]). A
//! separate process per agent ([`watchdog`]) enforces the same deadline
//! when the agent itself cannot run (stopped, hung, killed).
//!
//! Everything talks to etcd through [`store::Store`], so the rules are unit
//! tested on an in-memory store with a fake clock; [`etcd::EtcdStore`] is
//! the real client. Without etcd endpoints in the cluster file none of this
//! runs, and mosix behaves as before (a lost node is only reported).

pub mod election;
pub mod etcd;
pub mod fencing;
pub mod lease;
pub mod ownership;
pub mod store;
pub mod watchdog;

use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("{0}")]
    Unavailable(String),
    #[error("lease {0} has expired in etcd")]
    LeaseGone(i64),
    #[error("job {job}: node {node} is not its owner; etcd says {} owns it at epoch {}", if owner.node.is_empty() { "nobody" } else { owner.node.as_str() }, owner.epoch)]
    NotOwner {
        job: String,
        node: String,
        owner: ownership::OwnerRecord,
    },
    #[error("this node is fenced (its etcd lease could not be renewed in time); nothing is written until it holds a lease again")]
    Fenced,
    #[error("malformed record in etcd: {0}")]
    Corrupt(String),
    #[error("etcd configuration: {0}")]
    Config(String),
}

/// The key advertising a node's liveness (bound to its lease).
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{}{node}", nodes_prefix(cluster))
}

pub fn nodes_prefix(cluster: &str) -> String {
    format!("/mosix/{cluster}/nodes/")
}

/// Connect to etcd and make one call, so an unreachable etcd is a clear
/// error here rather than a hang later.
pub async fn connect(endpoints: &[String]) -> Result<Arc<dyn store::Store>, CoordError> {
    let s = etcd::EtcdStore::connect(endpoints).await?;
    use store::Store as _;
    s.get("/mosix/".to_string()).await?;
    Ok(Arc::new(s))
}

/// Connect, retrying for up to `wait` (etcd may be starting with us).
pub async fn connect_within(
    endpoints: &[String],
    wait: Duration,
) -> Result<Arc<dyn store::Store>, CoordError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match connect(endpoints).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The nodes that hold a live lease now, each with the fencing margin its
/// agent advertises in its node key (`margin_ms`; None from an agent that
/// does not say, or an unreadable value).
pub async fn live_node_margins(
    store: &dyn store::Store,
    cluster: &str,
) -> Result<std::collections::BTreeMap<String, Option<Duration>>, CoordError> {
    let prefix = nodes_prefix(cluster);
    Ok(store
        .list(prefix.clone())
        .await?
        .into_iter()
        .filter_map(|(k, e)| {
            let node = k.strip_prefix(&prefix)?.to_string();
            let margin = serde_json::from_slice::<serde_json::Value>(&e.value)
                .ok()
                .and_then(|v| v.get("margin_ms")?.as_u64())
                .map(Duration::from_millis);
            Some((node, margin))
        })
        .collect())
}

/// Which nodes hold a live lease now (their key exists).
pub async fn live_nodes(
    store: &dyn store::Store,
    cluster: &str,
) -> Result<std::collections::BTreeSet<String>, CoordError> {
    let prefix = nodes_prefix(cluster);
    Ok(store
        .list(prefix.clone())
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::store::{FakeClock, MemStore, Store};
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn live_nodes_carry_the_margin_their_agents_advertise() {
        let s = MemStore::new(Arc::new(FakeClock::default()));
        let put = |node: &str, v: &str| s.cas(node_key("c", node), 0, v.as_bytes().to_vec(), 0);
        put("n1", r#"{"node":"n1","ttl_s":10,"margin_ms":1500}"#)
            .await
            .unwrap();
        put("n2", r#"{"node":"n2","ttl_s":10}"#).await.unwrap();
        put("n3", "not json").await.unwrap();
        let m = live_node_margins(&s, "c").await.unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["n1"], Some(Duration::from_millis(1500)));
        assert_eq!(m["n2"], None);
        assert_eq!(m["n3"], None);
        let live = live_nodes(&s, "c").await.unwrap();
        assert_eq!(live.len(), 3);
    }
}
