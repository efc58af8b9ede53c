//! Job owner records: `/mosix/<cluster>/jobs/<id>/owner = {"node": N}`.
//!
//! The owner's **epoch** is the key's `mod_revision` in etcd: it is not
//! stored in the value because etcd assigns it at the write, and every
//! write makes a new one. That makes the epoch a fencing token for free:
//! ownership moves with one compare-and-set on it, so two nodes can never
//! both believe they took the job from the same owner, and a writer that
//! holds an old epoch is told so by etcd itself ([`Owners::check`]).

use super::store::{Cas, Entry, Store};
use super::CoordError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRecord {
    pub node: String,
    /// The etcd revision of the record's last write.
    pub epoch: i64,
}

#[derive(Serialize, Deserialize)]
struct Value {
    node: String,
}

fn decode(key: &str, e: &Entry) -> Result<OwnerRecord, CoordError> {
    let v: Value = serde_json::from_slice(&e.value)
        .map_err(|err| CoordError::Corrupt(format!("{key}: {err}")))?;
    Ok(OwnerRecord {
        node: v.node,
        epoch: e.mod_revision,
    })
}

fn encode(node: &str) -> Vec<u8> {
    serde_json::to_vec(&Value {
        node: node.to_string(),
    })
    .unwrap_or_default()
}

#[derive(Clone)]
pub struct Owners {
    store: Arc<dyn Store>,
    prefix: String,
}

impl Owners {
    pub fn new(store: Arc<dyn Store>, cluster: &str) -> Self {
        Self {
            store,
            prefix: format!("/mosix/{cluster}/jobs/"),
        }
    }

    pub fn key(&self, job: &str) -> String {
        format!("{}{job}/owner", self.prefix)
    }

    pub async fn get(&self, job: &str) -> Result<Option<OwnerRecord>, CoordError> {
        let key = self.key(job);
        match self.store.get(key.clone()).await? {
            Some(e) => Ok(Some(decode(&key, &e)?)),
            None => Ok(None),
        }
    }

    /// Record `node` as the owner of a job nobody owns yet; if it already
    /// is the owner, that record. Another owner is a [`CoordError::NotOwner`].
    pub async fn claim(&self, job: &str, node: &str) -> Result<OwnerRecord, CoordError> {
        let key = self.key(job);
        match self.store.cas(key.clone(), 0, encode(node), 0).await? {
            Cas::Done(epoch) => Ok(OwnerRecord {
                node: node.to_string(),
                epoch,
            }),
            Cas::Conflict(Some(e)) => {
                let now = decode(&key, &e)?;
                if now.node == node {
                    Ok(now)
                } else {
                    Err(CoordError::NotOwner {
                        job: job.to_string(),
                        node: node.to_string(),
                        owner: now,
                    })
                }
            }
            Cas::Conflict(None) => Err(CoordError::Unavailable(format!(
                "{key}: the create conflicted but the key is absent; retry"
            ))),
        }
    }

    /// Move the job from `from` (owner and epoch as the caller knows them)
    /// to `to`: one compare-and-set. Returns the new owner and epoch; if
    /// the record changed since `from`, [`CoordError::NotOwner`] with what
    /// it holds now, and nothing is written.
    pub async fn move_to(
        &self,
        job: &str,
        from: &OwnerRecord,
        to: &str,
    ) -> Result<OwnerRecord, CoordError> {
        let key = self.key(job);
        match self
            .store
            .cas(key.clone(), from.epoch, encode(to), 0)
            .await?
        {
            Cas::Done(epoch) => Ok(OwnerRecord {
                node: to.to_string(),
                epoch,
            }),
            Cas::Conflict(now) => Err(CoordError::NotOwner {
                job: job.to_string(),
                node: from.node.clone(),
                owner: match now {
                    Some(e) => decode(&key, &e)?,
                    None => OwnerRecord {
                        node: String::new(),
                        epoch: 0,
                    },
                },
            }),
        }
    }

    /// Fencing check before a write for the job: `node` must still own it
    /// at `epoch`.
    pub async fn check(&self, job: &str, node: &str, epoch: i64) -> Result<(), CoordError> {
        match self.get(job).await? {
            Some(o) if o.node == node && o.epoch == epoch => Ok(()),
            other => Err(CoordError::NotOwner {
                job: job.to_string(),
                node: node.to_string(),
                owner: other.unwrap_or(OwnerRecord {
                    node: String::new(),
                    epoch: 0,
                }),
            }),
        }
    }

    /// Forget a finished job (only if the record is still `rec`).
    pub async fn release(&self, job: &str, rec: &OwnerRecord) -> Result<bool, CoordError> {
        self.store.delete_if(self.key(job), rec.epoch).await
    }

    /// Every owner record: (job id, owner).
    pub async fn list(&self) -> Result<Vec<(String, OwnerRecord)>, CoordError> {
        let mut out = Vec::new();
        for (k, e) in self.store.list(self.prefix.clone()).await? {
            let Some(job) = k
                .strip_prefix(&self.prefix)
                .and_then(|r| r.strip_suffix("/owner"))
            else {
                continue;
            };
            match decode(&k, &e) {
                Ok(o) => out.push((job.to_string(), o)),
                Err(err) => tracing::warn!("skipping owner record: {err}"),
            }
        }
        Ok(out)
    }

    /// The jobs `node` owns.
    pub async fn owned_by(&self, node: &str) -> Result<Vec<(String, OwnerRecord)>, CoordError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|(_, o)| o.node == node)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::store::{FakeClock, MemStore};

    fn owners() -> Owners {
        let clock = Arc::new(FakeClock::default());
        Owners::new(Arc::new(MemStore::new(clock)), "t")
    }

    #[tokio::test]
    async fn a_move_is_one_cas_and_the_epoch_grows() {
        let o = owners();
        let a = o.claim("j1", "node1").await.unwrap();
        assert_eq!(o.claim("j1", "node1").await.unwrap(), a, "idempotent");
        let b = o.move_to("j1", &a, "node2").await.unwrap();
        assert!(b.epoch > a.epoch);
        assert_eq!(o.get("j1").await.unwrap(), Some(b.clone()));
        // A second mover with the old epoch loses, and learns the owner.
        match o.move_to("j1", &a, "node3").await {
            Err(CoordError::NotOwner { owner, .. }) => assert_eq!(owner, b),
            other => panic!("{other:?}"),
        }
        assert!(o.check("j1", "node2", b.epoch).await.is_ok());
        assert!(o.check("j1", "node1", a.epoch).await.is_err());
        assert!(matches!(
            o.claim("j1", "node1").await,
            Err(CoordError::NotOwner { .. })
        ));
        assert_eq!(o.owned_by("node2").await.unwrap().len(), 1);
        assert!(!o.release("j1", &a).await.unwrap(), "stale release refused");
        assert!(o.release("j1", &b).await.unwrap());
        assert_eq!(o.get("j1").await.unwrap(), None);
    }
}
