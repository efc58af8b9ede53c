//! Job events for front ends and outside schedulers (`WatchEvents`,
//! `AckFreeze`), and the wait before a service instance is frozen.
//!
//! Why: CRIU refuses to dump a job that holds an established TCP connection,
//! and a front end such as `mosgw` keeps pooled keep-alive connections to
//! every instance of a service. Learning of a migration from a failed
//! connect (as HAProxy or nginx would) means failed or retried requests; so
//! the agent says *before* it freezes a job that declares a service
//! ([`EventKind::FreezePending`]), each named subscriber stops sending new
//! requests, lets the in-flight ones finish, closes its connections and
//! acknowledges ([`Events::ack`]), and only then does the dump begin.
//!
//! Bounds, so that nobody can block a migration: the agent waits for
//! acknowledgements at most [`Events::ack_bound`] (2 s); a subscriber whose
//! stream ends (a gateway that died) is dropped from every wait at once.
//! Then it waits up to [`TCP_CLOSE_BOUND`] for the job's own TCP connections
//! to close (the backend sees the gateway's close a moment after the
//! acknowledgement). If something is still connected after that, the dump
//! runs anyway and CRIU's refusal rolls the migration back: the job keeps
//! running where it was, and is never lost.
//!
//! Events are a broadcast: a subscriber that falls more than
//! [`CHANNEL_CAPACITY`] events behind skips the oldest (and should re-read
//! the job list, as `mosgw` does every second anyway).

use crate::core::{now_unix_ms, JobId, JobRecord, NodeName, ServiceDecl};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, Notify};

/// Events kept for a slow subscriber before it starts skipping.
pub const CHANNEL_CAPACITY: usize = 1024;
/// Longest wait for subscribers' acknowledgements before a dump.
pub const DEFAULT_ACK_BOUND: Duration = Duration::from_secs(2);
/// Longest wait, after the acknowledgements, for the job's TCP connections
/// to close (the backend's side of a connection the gateway just closed).
pub const TCP_CLOSE_BOUND: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The job is about to be frozen; named subscribers must acknowledge.
    FreezePending,
    /// The job runs on `node` (started, restored, or resumed after a failed move).
    Running,
    /// The job ended.
    Ended,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub kind: EventKind,
    pub job: JobId,
    pub node: NodeName,
    pub service: Option<ServiceDecl>,
    pub freeze_id: u64,
    pub ack_within_ms: u64,
    pub generation: u64,
    pub unix_ms: u64,
    pub to_node: Option<NodeName>,
    /// The job's own address, if it has one (see `agent::jobnet`).
    pub address: Option<std::net::Ipv4Addr>,
}

impl JobEvent {
    fn of(kind: EventKind, rec: &JobRecord, node: &NodeName) -> Self {
        Self {
            kind,
            job: rec.id.clone(),
            node: node.clone(),
            service: rec.service.clone(),
            freeze_id: 0,
            ack_within_ms: 0,
            generation: rec.generation,
            unix_ms: now_unix_ms(),
            to_node: None,
            address: rec.net.as_ref().map(|n| n.ip),
        }
    }
}

/// How a wait before a freeze ended (for the log).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FreezeWait {
    /// Subscribers that acknowledged (or whose stream ended).
    pub released: usize,
    /// Subscribers still waited for when the bound passed.
    pub timed_out: Vec<String>,
    /// The job still had TCP connections when the close bound passed.
    pub still_connected: bool,
    pub waited: Duration,
}

struct Freeze {
    /// Subscription id → subscriber name, still to acknowledge.
    waiting: HashMap<u64, String>,
    done: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    /// Named subscriptions: id → name.
    subs: HashMap<u64, String>,
    freezes: HashMap<u64, Freeze>,
}

struct Shared {
    tx: broadcast::Sender<JobEvent>,
    inner: Mutex<Inner>,
    next: AtomicU64,
}

impl Shared {
    /// Forget subscription `id` everywhere; freezes that only waited for it go on.
    fn drop_sub(&self, id: u64) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        g.subs.remove(&id);
        for f in g.freezes.values_mut() {
            if f.waiting.remove(&id).is_some() && f.waiting.is_empty() {
                f.done.notify_one();
            }
        }
    }
}

/// The agent's event hub (cheap to clone).
#[derive(Clone)]
pub struct Events {
    shared: Arc<Shared>,
    pub ack_bound: Duration,
}

impl Default for Events {
    fn default() -> Self {
        Self::new(DEFAULT_ACK_BOUND)
    }
}

/// One `WatchEvents` stream; dropping it (the caller hung up) releases every
/// freeze that waits for it.
pub struct Subscription {
    pub rx: broadcast::Receiver<JobEvent>,
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.drop_sub(self.id);
    }
}

impl Events {
    pub fn new(ack_bound: Duration) -> Self {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                tx,
                inner: Mutex::new(Inner::default()),
                next: AtomicU64::new(1),
            }),
            ack_bound,
        }
    }

    fn next_id(&self) -> u64 {
        self.shared.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Subscribe; a non-empty `name` makes freezes wait for this subscriber.
    pub fn subscribe(&self, name: &str) -> Subscription {
        let id = self.next_id();
        // Receiver and registration under one lock, so no freeze can be
        // announced between them and then wait for an ack never asked for.
        let rx = match self.shared.inner.lock() {
            Ok(mut g) => {
                if !name.is_empty() {
                    g.subs.insert(id, name.to_string());
                }
                self.shared.tx.subscribe()
            }
            Err(_) => self.shared.tx.subscribe(),
        };
        Subscription {
            rx,
            id,
            shared: self.shared.clone(),
        }
    }

    /// Named subscribers right now.
    pub fn subscriber_names(&self) -> Vec<String> {
        self.shared
            .inner
            .lock()
            .map(|g| g.subs.values().cloned().collect())
            .unwrap_or_default()
    }

    /// `name` no longer uses the instance of freeze `freeze_id`. False if
    /// that freeze is not waiting (any more) for it.
    pub fn ack(&self, name: &str, freeze_id: u64) -> bool {
        let Ok(mut g) = self.shared.inner.lock() else {
            return false;
        };
        let Some(f) = g.freezes.get_mut(&freeze_id) else {
            return false;
        };
        let before = f.waiting.len();
        f.waiting.retain(|_, n| n != name);
        let accepted = f.waiting.len() < before;
        if accepted && f.waiting.is_empty() {
            f.done.notify_one();
        }
        accepted
    }

    fn send(&self, e: JobEvent) {
        // No receiver is not an error: nobody is watching.
        let _ = self.shared.tx.send(e);
    }

    /// The job runs on `node` now.
    pub fn running(&self, rec: &JobRecord, node: &NodeName) {
        self.send(JobEvent::of(EventKind::Running, rec, node));
    }

    /// The job ended.
    pub fn ended(&self, rec: &JobRecord, node: &NodeName) {
        self.send(JobEvent::of(EventKind::Ended, rec, node));
    }

    /// Announce that `rec` (running as `pid` on `node`) is about to be
    /// frozen, and for a service instance wait — bounded — until every named
    /// subscriber let go of it and its TCP connections are closed.
    pub async fn before_freeze(
        &self,
        rec: &JobRecord,
        pid: i32,
        node: &NodeName,
        to: Option<&NodeName>,
    ) -> FreezeWait {
        let t0 = Instant::now();
        let mut out = FreezeWait::default();
        let id = self.next_id();
        let mut e = JobEvent::of(EventKind::FreezePending, rec, node);
        e.freeze_id = id;
        e.ack_within_ms = self.ack_bound.as_millis() as u64;
        e.to_node = to.cloned();
        if rec.service.is_none() {
            // Nothing listens for it on the job's behalf: announce only.
            self.send(e);
            return out;
        }
        let done = Arc::new(Notify::new());
        let asked = match self.shared.inner.lock() {
            Ok(mut g) => {
                let waiting = g.subs.clone();
                let n = waiting.len();
                if n > 0 {
                    g.freezes.insert(
                        id,
                        Freeze {
                            waiting,
                            done: done.clone(),
                        },
                    );
                }
                n
            }
            Err(_) => 0,
        };
        self.send(e);
        if asked > 0 {
            let _ = tokio::time::timeout(self.ack_bound, done.notified()).await;
            if let Ok(mut g) = self.shared.inner.lock() {
                if let Some(f) = g.freezes.remove(&id) {
                    out.timed_out = f.waiting.into_values().collect();
                }
            }
            out.released = asked - out.timed_out.len();
        }
        let deadline = Instant::now() + TCP_CLOSE_BOUND;
        loop {
            if job_tcp_connections(pid) == 0 {
                break;
            }
            if Instant::now() >= deadline {
                out.still_connected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        out.waited = t0.elapsed();
        out
    }
}

/// TCP states in `/proc/net/tcp` that are not connections: LISTEN (0A) and
/// CLOSE (07). TIME_WAIT (06) sockets belong to no process.
fn is_connection_state(st: &str) -> bool {
    !matches!(st, "0A" | "07")
}

/// Inodes of connected TCP sockets in a `/proc/<pid>/net/tcp{,6}` table.
pub fn connected_inodes(table: &str) -> HashSet<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let st = f.get(3)?;
            let inode = f.get(9)?.parse::<u64>().ok()?;
            (is_connection_state(st) && inode != 0).then_some(inode)
        })
        .collect()
}

/// How many connected TCP sockets the processes of `root`'s tree hold.
pub fn job_tcp_connections(root: i32) -> usize {
    let pids = crate::core::procfs::tree_pids(root);
    let mut mine = HashSet::new();
    for p in &pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in rd.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                let t = t.to_string_lossy();
                if let Some(n) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    mine.insert(n);
                }
            }
        }
    }
    if mine.is_empty() {
        return 0;
    }
    let mut connected = HashSet::new();
    for t in ["tcp", "tcp6"] {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{root}/net/{t}")) {
            connected.extend(connected_inodes(&s));
        }
    }
    mine.intersection(&connected).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(service: bool) -> JobRecord {
        let mut r = crate::core::registry::tests::sample("j1");
        r.service = service.then(|| ServiceDecl::new("web", 8080).unwrap());
        r
    }

    #[test]
    fn parses_connected_sockets_only() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1\n\
   2: 0100007F:1F90 0100007F:D2A6 08 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1\n\
   3: 0100007F:1F90 0100007F:D2A8 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0\n";
        let got = connected_inodes(t);
        assert_eq!(got, [222u64, 333].into_iter().collect());
    }

    #[test]
    fn counts_the_connections_a_process_holds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_peer, _) = l.accept().unwrap();
        // A child holding one connected socket (as its stdin), one holding none.
        let mut with = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(s)))
            .spawn()
            .unwrap();
        let mut without = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (a, b) = (
            job_tcp_connections(with.id() as i32),
            job_tcp_connections(without.id() as i32),
        );
        let _ = with.kill();
        let _ = without.kill();
        let _ = with.wait();
        let _ = without.wait();
        assert_eq!((a, b), (1, 0));
    }

    #[tokio::test]
    async fn a_freeze_waits_for_named_subscribers_until_they_ack() {
        let ev = Events::new(Duration::from_secs(5));
        let mut sub = ev.subscribe("gw");
        let node = NodeName::parse("node1").unwrap();
        let r = rec(true);
        let ev2 = ev.clone();
        let acker = tokio::spawn(async move {
            let e = sub.rx.recv().await.unwrap();
            assert_eq!(e.kind, EventKind::FreezePending);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(ev2.ack("gw", e.freeze_id));
            assert!(
                !ev2.ack("gw", e.freeze_id),
                "a second ack is not waited for"
            );
            sub
        });
        let w = ev.before_freeze(&r, 0, &node, None).await;
        assert_eq!(w.released, 1);
        assert!(w.timed_out.is_empty());
        assert!(w.waited >= Duration::from_millis(90), "{w:?}");
        assert!(w.waited < Duration::from_secs(4), "{w:?}");
        drop(acker.await.unwrap());
    }

    #[tokio::test]
    async fn a_dead_subscriber_or_silence_never_blocks_a_freeze() {
        let ev = Events::new(Duration::from_millis(300));
        let node = NodeName::parse("node1").unwrap();
        // Silent subscriber: the bound ends the wait.
        let sub = ev.subscribe("silent");
        let w = ev.before_freeze(&rec(true), 0, &node, None).await;
        assert_eq!(w.timed_out, vec!["silent".to_string()]);
        assert!(w.waited < Duration::from_secs(2));
        // Its stream ends mid-wait: released at once.
        let ev2 = ev.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(sub);
            ev2.subscriber_names()
        });
        let w = ev.before_freeze(&rec(true), 0, &node, None).await;
        assert_eq!(w.released, 1, "{w:?}");
        assert!(w.waited < Duration::from_millis(250), "{w:?}");
        assert!(t.await.unwrap().is_empty());
        // A job without a service never waits.
        let _s = ev.subscribe("gw");
        let w = ev.before_freeze(&rec(false), 0, &node, None).await;
        assert_eq!(w, FreezeWait::default());
    }
}
