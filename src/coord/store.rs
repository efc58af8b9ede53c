//! The few etcd operations the coordination layer needs, behind a trait.
//!
//! Why a trait: the fencing, ownership and election logic is where the
//! subtle bugs live (who may write, when a node must kill its jobs), and it
//! must be testable without a running etcd. [`MemStore`] is an in-memory
//! implementation with etcd's semantics (one global revision, leases with a
//! TTL on an injected clock, compare-and-set on `mod_revision`), used by the
//! unit tests; [`super::etcd::EtcdStore`] is the real one.

use super::CoordError;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A key's value with the revisions that make it a fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    /// The revision of the key's last write: an ownership epoch.
    pub mod_revision: i64,
    /// The revision that created the key: a leadership revision.
    pub create_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// Written at this revision (the new epoch).
    Done(i64),
    /// The comparison failed; what the key holds now (None: absent).
    Conflict(Option<Entry>),
}

/// What the coordination layer asks of etcd. Every call has a deadline
/// inside the implementation: a partition must surface as an error, never
/// as a call that hangs past the lease.
pub trait Store: Send + Sync {
    /// Grant a lease of `ttl`; returns its id.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, CoordError>>;
    /// Renew a lease once; returns the TTL etcd now gives it (0 or an error
    /// `LeaseGone` once it has expired).
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, CoordError>>;
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), CoordError>>;
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Entry>, CoordError>>;
    /// Every key under `prefix`, sorted by key.
    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<(String, Entry)>, CoordError>>;
    /// Write `value` if the key's `mod_revision` is `expected` (0: the key
    /// must not exist), in one transaction; optionally bound to `lease`.
    fn cas(
        &self,
        key: String,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'_, Result<Cas, CoordError>>;
    /// Delete the key if its `mod_revision` is `expected`.
    fn delete_if(&self, key: String, expected: i64) -> BoxFuture<'_, Result<bool, CoordError>>;
}

/// A clock the in-memory store and the fencing logic can share in tests.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary, fixed origin (monotonic).
    fn now(&self) -> Duration;
}

/// The real monotonic clock: CLOCK_MONOTONIC itself (not time since some
/// `Instant`), so that a deadline computed from it means the same in
/// another process of this machine: the fence watchdog reads it too (see
/// [`super::watchdog`]).
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        super::watchdog::monotonic_now()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct FakeClock(Mutex<Duration>);

impl FakeClock {
    pub fn advance(&self, d: Duration) {
        if let Ok(mut t) = self.0.lock() {
            *t += d;
        }
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        self.0.lock().map(|t| *t).unwrap_or_default()
    }
}

#[derive(Default)]
struct Mem {
    revision: i64,
    next_lease: i64,
    /// lease → expiry time on the clock
    leases: BTreeMap<i64, (Duration, Duration)>,
    kv: BTreeMap<String, Entry>,
    /// Simulates a partition: every call fails.
    unreachable: bool,
}

/// An in-memory etcd for unit tests (see the module doc).
pub struct MemStore {
    clock: Arc<dyn Clock>,
    inner: Mutex<Mem>,
}

impl MemStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            inner: Mutex::new(Mem {
                revision: 1,
                next_lease: 1,
                ..Mem::default()
            }),
        }
    }

    /// Cut this client off etcd (or heal the cut).
    pub fn set_unreachable(&self, cut: bool) {
        if let Ok(mut m) = self.inner.lock() {
            m.unreachable = cut;
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Mem, Duration) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        let now = self.clock.now();
        let mut m = self
            .inner
            .lock()
            .map_err(|_| CoordError::Unavailable("store lock poisoned".into()))?;
        if m.unreachable {
            return Err(CoordError::Unavailable(
                "etcd unreachable (simulated)".into(),
            ));
        }
        // Expire leases and their keys, as etcd does.
        let expired: Vec<i64> = m
            .leases
            .iter()
            .filter(|(_, (exp, _))| *exp <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            m.leases.remove(&id);
            let before = m.kv.len();
            m.kv.retain(|_, e| e.lease != id);
            if m.kv.len() != before {
                m.revision += 1;
            }
        }
        f(&mut m, now)
    }
}

impl Store for MemStore {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, CoordError>> {
        let r = self.with(|m, now| {
            let id = m.next_lease;
            m.next_lease += 1;
            m.leases.insert(id, (now + ttl, ttl));
            Ok(id)
        });
        Box::pin(async move { r })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, CoordError>> {
        let r = self.with(|m, now| match m.leases.get_mut(&lease) {
            Some((exp, ttl)) => {
                *exp = now + *ttl;
                Ok(*ttl)
            }
            None => Err(CoordError::LeaseGone(lease)),
        });
        Box::pin(async move { r })
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), CoordError>> {
        let r = self.with(|m, _| {
            m.leases.remove(&lease);
            m.kv.retain(|_, e| e.lease != lease);
            m.revision += 1;
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Entry>, CoordError>> {
        let r = self.with(|m, _| Ok(m.kv.get(&key).cloned()));
        Box::pin(async move { r })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<(String, Entry)>, CoordError>> {
        let r = self.with(|m, _| {
            Ok(m.kv
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect())
        });
        Box::pin(async move { r })
    }

    fn cas(
        &self,
        key: String,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'_, Result<Cas, CoordError>> {
        let r = self.with(|m, _| {
            let cur = m.kv.get(&key).cloned();
            let now_rev = cur.as_ref().map_or(0, |e| e.mod_revision);
            if now_rev != expected {
                return Ok(Cas::Conflict(cur));
            }
            if lease != 0 && !m.leases.contains_key(&lease) {
                return Err(CoordError::LeaseGone(lease));
            }
            m.revision += 1;
            let rev = m.revision;
            let create_revision = cur.map_or(rev, |e| e.create_revision);
            m.kv.insert(
                key,
                Entry {
                    value,
                    mod_revision: rev,
                    create_revision,
                    lease,
                },
            );
            Ok(Cas::Done(rev))
        });
        Box::pin(async move { r })
    }

    fn delete_if(&self, key: String, expected: i64) -> BoxFuture<'_, Result<bool, CoordError>> {
        let r = self.with(|m, _| {
            if m.kv.get(&key).map(|e| e.mod_revision) == Some(expected) {
                m.kv.remove(&key);
                m.revision += 1;
                Ok(true)
            } else {
                Ok(false)
            }
        });
        Box::pin(async move { r })
    }
}
