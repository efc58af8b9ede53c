//! Leader election for `mos-balance serve`: a lease-bound key created by
//! compare-and-set (`create_revision == 0`).
//!
//! Why not etcd's election service: the same key and lease give the same
//! guarantee, work through the one [`super::store::Store`] trait (so the
//! logic is unit-tested on the fake), and the **leadership revision** (the
//! key's `create_revision`) is simply read back. It is the balancer's
//! fencing token: a new leader always has a higher one, and a leader
//! checks that the key still carries its revision before each action
//! ([`Election::is_leader`]); agents refuse requests that carry a lower
//! one than the current leader's (see `agent::ownership`).

use super::store::{Cas, Store};
use super::CoordError;
use std::sync::Arc;

#[derive(Clone)]
pub struct Election {
    store: Arc<dyn Store>,
    key: String,
    /// Who we are (host, pid, listen address): shown as the leader.
    pub id: String,
}

/// The current leader as etcd shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub id: String,
    pub revision: i64,
}

impl Election {
    pub fn new(store: Arc<dyn Store>, cluster: &str, id: &str) -> Self {
        Self {
            store,
            key: leader_key(cluster),
            id: id.to_string(),
        }
    }

    /// Try once to become the leader with `lease`: Some(revision) if we
    /// lead (now or already), None if someone else does.
    pub async fn campaign(&self, lease: i64) -> Result<Option<i64>, CoordError> {
        match self
            .store
            .cas(self.key.clone(), 0, self.id.as_bytes().to_vec(), lease)
            .await?
        {
            Cas::Done(rev) => Ok(Some(rev)),
            Cas::Conflict(Some(e)) if e.lease == lease && e.value == self.id.as_bytes() => {
                Ok(Some(e.create_revision))
            }
            Cas::Conflict(_) => Ok(None),
        }
    }

    pub async fn leader(&self) -> Result<Option<Leader>, CoordError> {
        Ok(self.store.get(self.key.clone()).await?.map(|e| Leader {
            id: String::from_utf8_lossy(&e.value).into_owned(),
            revision: e.create_revision,
        }))
    }

    /// Whether leadership `revision` is still the current one.
    pub async fn is_leader(&self, revision: i64) -> Result<bool, CoordError> {
        Ok(self.leader().await?.is_some_and(|l| l.revision == revision))
    }

    /// Step down (clean shutdown): the key goes, a standby takes over at
    /// its next try instead of after the lease.
    pub async fn resign(&self, revision: i64) {
        if let Ok(Some(e)) = self.store.get(self.key.clone()).await {
            if e.create_revision == revision {
                let _ = self.store.delete_if(self.key.clone(), e.mod_revision).await;
            }
        }
    }
}

pub fn leader_key(cluster: &str) -> String {
    format!("/mosix/{cluster}/balancer/leader")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::store::{FakeClock, MemStore};
    use std::time::Duration;

    #[tokio::test]
    async fn one_leads_and_a_standby_takes_over_with_a_higher_revision() {
        let clock = Arc::new(FakeClock::default());
        let store = Arc::new(MemStore::new(clock.clone()));
        let a = Election::new(store.clone(), "t", "a");
        let b = Election::new(store.clone(), "t", "b");
        let la = store.grant(Duration::from_secs(3)).await.unwrap();
        let lb = store.grant(Duration::from_secs(3)).await.unwrap();
        let ra = a.campaign(la).await.unwrap().unwrap();
        assert_eq!(
            a.campaign(la).await.unwrap(),
            Some(ra),
            "re-campaign keeps it"
        );
        assert_eq!(b.campaign(lb).await.unwrap(), None);
        assert!(a.is_leader(ra).await.unwrap());
        // a dies: its lease is not renewed; b's is.
        clock.advance(Duration::from_secs(2));
        store.keep_alive(lb).await.unwrap();
        clock.advance(Duration::from_secs(2));
        let rb = b.campaign(lb).await.unwrap().unwrap();
        assert!(rb > ra, "the fencing token grows");
        assert!(!a.is_leader(ra).await.unwrap(), "the old leader is fenced");
        assert_eq!(b.leader().await.unwrap().unwrap().id, "b");
        b.resign(rb).await;
        assert_eq!(b.leader().await.unwrap(), None);
    }
}
