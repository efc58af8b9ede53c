//! A lease held on etcd, renewed in the background, with the self-fencing
//! watchdog (see [`super::fencing`] for the timing rule).
//!
//! Two tasks, on purpose: the renewer makes etcd calls, each of which may
//! take up to [`super::etcd::CALL_TIMEOUT`] across a partition; the
//! watchdog only reads the clock, every [`WATCHDOG_TICK`], so a hanging
//! call never delays fencing.

use super::fencing::{FenceTiming, LeaseClock, Verdict};
use super::store::{Cas, Clock, Store};
use super::CoordError;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the watchdog looks at the clock.
pub const WATCHDOG_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Renewing; writes are allowed while the verdict is not `Fence`.
    Live,
    /// The deadline passed: the handler is stopping the jobs.
    Fencing,
    /// Jobs stopped; waiting to get a new lease.
    Fenced,
}

struct State {
    lease: i64,
    clock: LeaseClock,
    phase: Phase,
    /// Bumped at every new lease: callers can tell a rejoin happened.
    generation: u64,
}

/// One lease and the key that advertises it (`/mosix/<c>/nodes/<node>`
/// for an agent).
pub struct LeaseHolder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    pub timing: FenceTiming,
    key: String,
    value: Vec<u8>,
    state: Mutex<State>,
}

/// What the owner of a lease does when it must fence and when it is back.
pub trait FenceHandler: Send + Sync {
    /// Stop every job now; return once they are dead.
    fn fence(&self) -> BoxFuture<'_, ()>;
    /// A new lease is held again (after a fence): reconcile with etcd.
    fn rejoined(&self) -> BoxFuture<'_, ()>;
}

impl LeaseHolder {
    /// Grant a lease and bind `key` to it.
    pub async fn acquire(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        timing: FenceTiming,
        key: String,
        value: Vec<u8>,
    ) -> Result<Arc<Self>, CoordError> {
        let sent = clock.now();
        let lease = grant_and_bind(&*store, timing, &key, &value).await?;
        Ok(Arc::new(Self {
            store,
            clock,
            timing,
            key,
            value,
            state: Mutex::new(State {
                lease,
                clock: LeaseClock::new(timing, sent),
                phase: Phase::Live,
                generation: 1,
            }),
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    pub fn lease_id(&self) -> i64 {
        self.with(|s| s.lease).unwrap_or(0)
    }

    pub fn generation(&self) -> u64 {
        self.with(|s| s.generation).unwrap_or(0)
    }

    pub fn phase(&self) -> Phase {
        self.with(|s| s.phase).unwrap_or(Phase::Fencing)
    }

    /// The verdict now, from the clock.
    pub fn verdict(&self) -> Verdict {
        let now = self.clock.now();
        self.with(|s| match s.phase {
            Phase::Live => s.clock.verdict(now),
            _ => Verdict::Fence,
        })
        .unwrap_or(Verdict::Fence)
    }

    /// The fencing deadline on the holder's clock: the send time of the
    /// last good renewal + TTL − margin (what the fence file carries).
    pub fn fence_deadline(&self) -> Duration {
        self.with(|s| s.clock.deadline()).unwrap_or_default()
    }

    /// Whether the holder may commit a write now. False from the fencing
    /// deadline until a new lease is held and the handler has reconciled.
    pub fn may_write(&self) -> bool {
        self.verdict() != Verdict::Fence
    }

    /// Renew once. `LeaseGone` means etcd already expired it.
    pub async fn renew_once(&self) -> Result<(), CoordError> {
        let lease = self.lease_id();
        let sent = self.clock.now();
        self.store.keep_alive(lease).await?;
        self.with(|s| {
            if s.lease == lease && s.phase == Phase::Live {
                s.clock.renewed(sent);
            }
        });
        Ok(())
    }

    /// The watchdog's step: if the deadline passed, move to `Fencing` and
    /// say so (the caller then stops the jobs).
    pub fn check(&self) -> bool {
        let now = self.clock.now();
        self.with(|s| {
            if s.phase == Phase::Live && s.clock.verdict(now) == Verdict::Fence {
                s.phase = Phase::Fencing;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }

    /// Force fencing (etcd said the lease is gone).
    pub fn force_fence(&self) -> bool {
        self.with(|s| {
            if s.phase == Phase::Live {
                s.phase = Phase::Fencing;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }

    /// The jobs are stopped.
    pub fn fenced_done(&self) {
        self.with(|s| s.phase = Phase::Fenced);
    }

    /// After fencing: a new lease, the key bound to it. Writes stay refused
    /// until [`Self::resume`].
    pub async fn reacquire(&self) -> Result<(), CoordError> {
        if self.phase() != Phase::Fenced {
            return Ok(());
        }
        let sent = self.clock.now();
        let lease = grant_and_bind(&*self.store, self.timing, &self.key, &self.value).await?;
        self.with(|s| {
            s.lease = lease;
            s.clock = LeaseClock::new(self.timing, sent);
            s.generation += 1;
        });
        Ok(())
    }

    /// Writes are allowed again.
    pub fn resume(&self) {
        self.with(|s| {
            if s.phase == Phase::Fenced {
                s.phase = Phase::Live;
            }
        });
    }

    /// Give the lease back (clean shutdown): the key goes at once.
    pub async fn release(&self) {
        let _ = self.store.revoke(self.lease_id()).await;
    }
}

async fn grant_and_bind(
    store: &dyn Store,
    timing: FenceTiming,
    key: &str,
    value: &[u8],
) -> Result<i64, CoordError> {
    let lease = store.grant(timing.ttl).await?;
    // The key may still be bound to a previous lease of ours (a restarted
    // agent): overwrite it, whatever its revision.
    for _ in 0..5 {
        let cur = store.get(key.to_string()).await?;
        let rev = cur.map_or(0, |e| e.mod_revision);
        if let Cas::Done(_) = store
            .cas(key.to_string(), rev, value.to_vec(), lease)
            .await?
        {
            return Ok(lease);
        }
    }
    Err(CoordError::Unavailable(format!(
        "could not bind {key} to lease {lease}: it kept changing"
    )))
}

/// Run the renewer and the watchdog until the process ends.
pub fn spawn(holder: Arc<LeaseHolder>, handler: Arc<dyn FenceHandler>) {
    let h = holder.clone();
    let hd = handler.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCHDOG_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if h.check() {
                tracing::error!(
                    lease = h.lease_id(),
                    fence_after_s = h.timing.fence_after().as_secs_f64(),
                    "could not renew the lease in etcd in time: fencing (stopping every job here; no write is committed for them)"
                );
                hd.fence().await;
                h.fenced_done();
            }
        }
    });
    tokio::spawn(async move {
        // Renewals are attempts in their own tasks, not a sequence: on a
        // loaded machine one call can stall for seconds, and a new attempt
        // must not wait for it. Any answer moves the deadline (to the
        // send time of the request answered).
        let mut last_try = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            match holder.phase() {
                Phase::Live => {
                    let at_risk = holder.verdict() != Verdict::Healthy;
                    let period = if at_risk {
                        Duration::from_millis(750)
                    } else {
                        holder.timing.renew_every()
                    };
                    if last_try.elapsed() < period {
                        continue;
                    }
                    last_try = tokio::time::Instant::now();
                    let (h, hd) = (holder.clone(), handler.clone());
                    tokio::spawn(async move {
                        match h.renew_once().await {
                            Ok(()) => {}
                            Err(CoordError::LeaseGone(id)) => {
                                tracing::error!(
                                    lease = id,
                                    "etcd says our lease expired: fencing now"
                                );
                                if h.force_fence() {
                                    hd.fence().await;
                                    h.fenced_done();
                                }
                            }
                            Err(e) => tracing::warn!("lease renewal failed: {e}"),
                        }
                    });
                }
                Phase::Fencing => {}
                Phase::Fenced => {
                    if last_try.elapsed() < Duration::from_millis(500) {
                        continue;
                    }
                    last_try = tokio::time::Instant::now();
                    match holder.reacquire().await {
                        Ok(()) => {
                            tracing::warn!(lease = holder.lease_id(), "etcd reachable again: new lease; checking job ownership before anything else");
                            // Every job here was killed by the fence, so
                            // nothing of ours runs: writes may resume, and
                            // the reconcile needs them (to record the loss).
                            holder.resume();
                            // The grant may have taken most of the new
                            // deadline (a channel reconnecting after the
                            // heal): renew now, so the reconcile does not
                            // meet a fence at once.
                            if let Err(e) = holder.renew_once().await {
                                tracing::warn!("first renewal of the new lease: {e}");
                            }
                            handler.rejoined().await;
                        }
                        Err(e) => tracing::debug!("still fenced, no new lease: {e}"),
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::store::{FakeClock, MemStore};

    async fn setup() -> (Arc<FakeClock>, Arc<MemStore>, Arc<LeaseHolder>) {
        let clock = Arc::new(FakeClock::default());
        let store = Arc::new(MemStore::new(clock.clone()));
        let h = LeaseHolder::acquire(
            store.clone(),
            clock.clone(),
            FenceTiming::default(),
            "/mosix/t/nodes/node1".into(),
            b"node1".to_vec(),
        )
        .await
        .unwrap();
        (clock, store, h)
    }

    #[tokio::test]
    async fn a_partitioned_holder_fences_before_etcd_expires_its_lease() {
        let (clock, store, h) = setup().await;
        clock.advance(Duration::from_secs(3));
        h.renew_once().await.unwrap();
        store.set_unreachable(true);
        for _ in 0..27 {
            clock.advance(Duration::from_millis(250));
            assert!(h.renew_once().await.is_err());
            assert!(!h.check(), "not yet at {:?}", clock.now());
            assert!(h.may_write());
        }
        // 3 s + 7 s: the deadline.
        clock.advance(Duration::from_millis(250));
        assert!(h.check());
        assert!(!h.may_write());
        assert!(!h.check(), "fencing is started once");
        // etcd still holds the lease at this moment: we fenced first.
        store.set_unreachable(false);
        assert!(store
            .get("/mosix/t/nodes/node1".into())
            .await
            .unwrap()
            .is_some());
        store.set_unreachable(true);
        h.fenced_done();
        clock.advance(Duration::from_secs(5));
        assert!(h.reacquire().await.is_err());
        store.set_unreachable(false);
        // Meanwhile etcd expired the old lease and its key.
        assert!(h.reacquire().await.is_ok());
        assert!(!h.may_write(), "writes wait for resume()");
        assert_eq!(h.generation(), 2);
        h.resume();
        assert!(h.may_write());
        let e = store
            .get("/mosix/t/nodes/node1".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.lease, h.lease_id());
    }

    #[tokio::test]
    async fn renewals_keep_it_healthy_and_a_gone_lease_says_so() {
        let (clock, store, h) = setup().await;
        for _ in 0..10 {
            clock.advance(Duration::from_secs(3));
            h.renew_once().await.unwrap();
            assert_eq!(h.verdict(), Verdict::Healthy);
        }
        // A stopped process: nothing ran for 20 s.
        clock.advance(Duration::from_secs(20));
        assert_eq!(h.verdict(), Verdict::Fence);
        assert!(!h.may_write());
        assert!(matches!(
            h.renew_once().await,
            Err(CoordError::LeaseGone(_))
        ));
        let _ = store;
    }
}
