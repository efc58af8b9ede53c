//! When a node must stop its jobs: the pure timing rule of self-fencing.
//!
//! etcd lets a lease expire TTL after the last keep-alive *it received*.
//! The agent cannot know when that was, but it knows when it *sent* the
//! request whose answer it got, which was earlier: counting from the send
//! makes the agent's deadline fall before etcd's, never after. The agent
//! then stops its jobs at `sent + TTL − margin`, where the margin covers:
//!
//! - clock rate drift between this machine and etcd's leader (monotonic
//!   clocks drift by parts per million: microseconds per 10 s; 100 ms of
//!   margin is already generous),
//! - the time from noticing to the jobs being dead (a SIGKILL of each job's
//!   pid-namespace init, which takes its whole tree: milliseconds, but the
//!   agent may be descheduled on a loaded node: allow 1 s),
//! - the watchdog's own tick (250 ms) and scheduling delay.
//!
//! Defaults: TTL 10 s, renew every TTL/3 (3.3 s, so two renewals may fail
//! before fencing), margin 3 s, hence fencing 7 s after the last good
//! renewal was sent, at least 3 s before etcd can expire the lease. The
//! balancer, which sees the expiry, waits the same margin again before it
//! restarts the node's jobs elsewhere ([`FenceTiming::takeover_delay`]),
//! which covers a node whose clock ran slow by up to that much.
//!
//! The verdict is computed from the clock at every check, not from a flag
//! a task sets: an agent that was SIGSTOPped past its lease sees "fenced"
//! on the first check after SIGCONT, before any other work it resumes.
//! Its jobs do not wait for that: the fence watchdog, a process of its
//! own, kills them at the same deadline ([`super::watchdog`]).

use std::time::Duration;

/// The lease timing of one holder (agent or balancer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceTiming {
    pub ttl: Duration,
    pub margin: Duration,
}

impl Default for FenceTiming {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            margin: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("lease TTL must be at least 2 s (etcd counts whole seconds), not {0:?}")]
    TtlTooShort(Duration),
    #[error("fencing margin {margin:?} must be shorter than the lease TTL {ttl:?} minus one renewal period ({period:?})")]
    MarginTooLong {
        margin: Duration,
        ttl: Duration,
        period: Duration,
    },
}

impl FenceTiming {
    pub fn new(ttl: Duration, margin: Duration) -> Result<Self, TimingError> {
        let t = Self { ttl, margin };
        if ttl < Duration::from_secs(2) {
            return Err(TimingError::TtlTooShort(ttl));
        }
        if margin + t.renew_every() >= ttl {
            return Err(TimingError::MarginTooLong {
                margin,
                ttl,
                period: t.renew_every(),
            });
        }
        Ok(t)
    }

    /// How often to renew: a third of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after the last good renewal was sent the holder must stop.
    pub fn fence_after(&self) -> Duration {
        self.ttl.saturating_sub(self.margin)
    }

    /// How long whoever takes over must wait after seeing the lease expire.
    pub fn takeover_delay(&self) -> Duration {
        self.margin
    }
}

/// What the holder must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The lease is renewed; carry on.
    Healthy,
    /// Renewals are failing; `left` remains before fencing.
    AtRisk { left: Duration },
    /// Stop every job and commit no write.
    Fence,
}

/// The state the rule needs: when the last good renewal was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    pub timing: FenceTiming,
    /// Clock time of the send of the last renewal (or grant) etcd answered.
    pub last_ok_sent: Duration,
}

impl LeaseClock {
    pub fn new(timing: FenceTiming, granted_sent: Duration) -> Self {
        Self {
            timing,
            last_ok_sent: granted_sent,
        }
    }

    /// A renewal sent at `sent` was answered. An answer to an older request
    /// never moves the deadline back.
    pub fn renewed(&mut self, sent: Duration) {
        self.last_ok_sent = self.last_ok_sent.max(sent);
    }

    pub fn deadline(&self) -> Duration {
        self.last_ok_sent + self.timing.fence_after()
    }

    pub fn verdict(&self, now: Duration) -> Verdict {
        let deadline = self.deadline();
        if now >= deadline {
            return Verdict::Fence;
        }
        if now.saturating_sub(self.last_ok_sent)
            > self.timing.renew_every() + self.timing.renew_every() / 2
        {
            return Verdict::AtRisk {
                left: deadline - now,
            };
        }
        Verdict::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    #[test]
    fn defaults_fence_three_seconds_before_the_lease_can_expire() {
        let t = FenceTiming::default();
        assert_eq!(t.fence_after(), s(7.0));
        assert!(t.renew_every() < s(3.4));
        let c = LeaseClock::new(t, s(100.0));
        assert_eq!(c.verdict(s(101.0)), Verdict::Healthy);
        assert!(matches!(c.verdict(s(106.0)), Verdict::AtRisk { .. }));
        assert_eq!(
            c.verdict(s(106.99)),
            Verdict::AtRisk {
                left: s(107.0) - s(106.99)
            }
        );
        assert_eq!(c.verdict(s(107.0)), Verdict::Fence);
        // etcd cannot expire the lease before sent + TTL; we fence earlier.
        assert!(c.deadline() + t.margin <= s(100.0) + t.ttl);
    }

    #[test]
    fn renewals_move_the_deadline_forward_never_back() {
        let mut c = LeaseClock::new(FenceTiming::default(), s(0.0));
        c.renewed(s(3.0));
        assert_eq!(c.deadline(), s(10.0));
        // A late answer to an older request does not shorten anything.
        c.renewed(s(1.0));
        assert_eq!(c.deadline(), s(10.0));
        assert_ne!(c.verdict(s(9.9)), Verdict::Fence);
        assert_eq!(c.verdict(s(10.0)), Verdict::Fence);
    }

    #[test]
    fn a_stopped_holder_is_fenced_on_its_first_check_after_waking() {
        // SIGSTOP at 2 s, SIGCONT at 30 s: no renewal ran in between.
        let c = LeaseClock::new(FenceTiming::default(), s(1.0));
        assert_eq!(c.verdict(s(30.0)), Verdict::Fence);
    }

    #[test]
    fn bad_timings_are_refused_with_a_reason() {
        assert!(matches!(
            FenceTiming::new(s(1.0), s(0.1)),
            Err(TimingError::TtlTooShort(_))
        ));
        assert!(matches!(
            FenceTiming::new(s(10.0), s(7.0)),
            Err(TimingError::MarginTooLong { .. })
        ));
        let ok = FenceTiming::new(s(3.0), s(1.0)).unwrap();
        assert_eq!(ok.fence_after(), s(2.0));
    }
}
