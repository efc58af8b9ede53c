//! Foreground jobs, home side: what `mosrun` talks to (the `Runner` service,
//! on the home agent's Unix socket).
//!
//! A run: place the job with the [`crate::placement`] table (reserving its
//! slot at once, or waiting for one), open a session on the chosen node
//! (`Agent::exec` in-process when it is this node, `Exec` over the warm
//! mTLS channel otherwise), then relay: the caller's stdin and signals one
//! way, the job's output and end the other. The table's samples come from
//! [`Agent::start_placement`], once a second, over the same warm channels,
//! so a start costs no TLS handshake and no poll of the cluster.
//!
//! Node loss: a session whose stream breaks, or that says nothing for
//! [`NODE_SILENCE`], lost its node. A job that had not started there is
//! placed again (always safe); one that had is started again elsewhere
//! only with `rerun_on_node_loss` (its stdin is replayed, and its output
//! held back per attempt, so a re-run repeats nothing — up to
//! [`MAX_HELD`] bytes, past which output streams live again and a re-run
//! may repeat it). Every such event is a notice line for the user.

use super::exec::{ExecIn, ExecOut, ExecStart, ExitInfo, Failure, FailureKind, Started};
use super::peers::ExecStream;
use super::Agent;
use crate::core::NodeName;
use crate::placement::{Decision, NodeInfo, Table, Want};
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often every node's slots are sampled.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long one node's sample may take, connecting included.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(2);
/// A session this silent (no output, no heartbeat) lost its node.
pub const NODE_SILENCE: Duration = Duration::from_secs(4);
/// Output held back per attempt when re-runs are on.
pub const MAX_HELD: usize = 16 << 20;
/// Stdin kept for a re-run.
const MAX_STDIN_LOG: usize = 64 << 20;
/// How long a run waits for a first sample of a node before calling it
/// unreachable (an agent that just started has not sampled anyone yet).
const FIRST_SAMPLE_GRACE: Duration = Duration::from_secs(3);

pub struct Runner {
    table: Mutex<Table>,
    changed: tokio::sync::Notify,
}

impl Runner {
    pub fn new(names: Vec<String>) -> Self {
        Self {
            table: Mutex::new(Table::new(names)),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> Option<T> {
        self.table.lock().ok().map(|mut t| f(&mut t))
    }

    fn release(&self, node: &str) {
        self.with(|t| t.release(node));
        self.changed.notify_waiters();
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunStart {
    pub exec: ExecStart,
    /// Run there (None: the best node).
    pub node: Option<String>,
    pub rerun_on_node_loss: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunIn {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunOut {
    Placed {
        node: String,
        place_ms: f64,
        queued_ms: f64,
    },
    Started(Started),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Notice(String),
    Exit(ExitInfo),
    Failure(Failure),
}

/// How one attempt on one node ended.
enum Outcome {
    /// Exit or failure sent to the caller.
    Done,
    /// The caller went away (the session's input is dropped: the job dies).
    CallerGone,
    /// The node had no free slot after all: place again.
    NoSlot,
    Lost {
        reason: String,
        started: bool,
    },
}

#[derive(Default)]
struct StdinLog {
    chunks: Vec<Vec<u8>>,
    bytes: usize,
    eof: bool,
    /// False once more was sent than we keep: no re-run possible.
    complete: bool,
}

impl StdinLog {
    fn push(&mut self, b: &[u8]) {
        self.bytes += b.len();
        if self.bytes > MAX_STDIN_LOG {
            self.complete = false;
            self.chunks.clear();
        } else if self.complete {
            self.chunks.push(b.to_vec());
        }
    }
}

impl Agent {
    /// Sample every node's slots now and then every [`REFRESH`].
    pub fn start_placement(self: &Arc<Self>) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tick.tick().await;
                agent.refresh_placement().await;
            }
        });
    }

    async fn refresh_placement(self: &Arc<Self>) {
        let names = self.runner.with(|t| t.names()).unwrap_or_default();
        let polls = names.into_iter().map(|name| {
            let agent = self.clone();
            async move {
                let slots = if name == agent.cfg.node.as_str() {
                    let a = agent.clone();
                    tokio::task::spawn_blocking(move || a.node_slots())
                        .await
                        .ok()
                } else {
                    // Bounded: a node cut off the network (connects that
                    // are never answered) must not hold up the others'
                    // samples for the whole connect timeout.
                    match NodeName::parse(&name) {
                        Ok(n) => {
                            tokio::time::timeout(SAMPLE_DEADLINE, agent.peers.slots(&n, REFRESH))
                                .await
                                .ok()
                                .and_then(|r| r.ok())
                        }
                        Err(_) => None,
                    }
                };
                (name, slots)
            }
        });
        let results = futures::future::join_all(polls).await;
        self.runner.with(|t| {
            for (name, s) in results {
                t.update(
                    &name,
                    s.map(|s| NodeInfo {
                        capacity: s.capacity,
                        slots: s.slots,
                        used: s.used,
                        background: s.background_load,
                        blocked: s.blocked,
                    }),
                );
            }
        });
        self.runner.changed.notify_waiters();
    }

    /// Decide where to run (waiting for a slot if need be). Returns the
    /// node, the decision's own time and the time spent waiting, in ms.
    async fn place(
        &self,
        want: Option<&str>,
        since: Instant,
    ) -> Result<(String, f64, f64), Failure> {
        loop {
            let notified = self.runner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let t = Instant::now();
            let decision = self
                .runner
                .with(|tb| {
                    let mut rng = rand::rng();
                    let mut pick = |n: usize| rand::Rng::random_range(&mut rng, 0..n.max(1));
                    tb.choose(want.map_or(Want::Best, Want::Node), &mut pick)
                })
                .ok_or_else(|| Failure::new(FailureKind::Internal, "placement table poisoned"))?;
            let decide_ms = t.elapsed().as_secs_f64() * 1e3;
            match decision {
                Decision::Place(n) => {
                    return Ok((n, decide_ms, (t - since).as_secs_f64() * 1e3));
                }
                Decision::UnknownNode => {
                    let names = self.runner.with(|t| t.names().join(", "));
                    return Err(Failure::new(
                        FailureKind::UnknownNode,
                        format!(
                            "unknown node {:?}; the cluster has: {}",
                            want.unwrap_or(""),
                            names.unwrap_or_default()
                        ),
                    ));
                }
                Decision::Blocked => {
                    return Err(Failure::new(
                        FailureKind::NodeBlocked,
                        match want {
                            Some(n) => crate::agent::admin::blocked_message(n),
                            None => "every node of the cluster that is up is blocked (mosctl unblock NODE to allow jobs in)".to_string(),
                        },
                    ));
                }
                Decision::NoNode if since.elapsed() > FIRST_SAMPLE_GRACE => {
                    return Err(Failure::new(
                        FailureKind::NoNode,
                        match want {
                            Some(n) => format!("node {n} is unreachable"),
                            None => "no node of the cluster is reachable".to_string(),
                        },
                    ));
                }
                // Wait for a slot (or a first sample); a sample comes every
                // second, a slot frees when one of our jobs ends.
                _ => {
                    let _ = tokio::time::timeout(REFRESH, notified).await;
                }
            }
        }
    }

    /// Run a foreground job; see the module doc.
    pub fn run(
        self: &Arc<Self>,
        start: RunStart,
        input: mpsc::Receiver<RunIn>,
    ) -> mpsc::Receiver<RunOut> {
        let (tx, rx) = mpsc::channel(64);
        let agent = self.clone();
        tokio::spawn(async move { agent.run_session(start, input, tx).await });
        rx
    }

    async fn run_session(
        self: Arc<Self>,
        start: RunStart,
        mut input: mpsc::Receiver<RunIn>,
        out: mpsc::Sender<RunOut>,
    ) {
        let since = Instant::now();
        let mut want = start.node.clone();
        let mut log = StdinLog {
            complete: true,
            ..Default::default()
        };
        let mut notice: Option<(String, String, bool)> = None;
        let mut exec = start.exec.clone();
        exec.take_slot = true;
        loop {
            let placed = tokio::select! {
                p = self.place(want.as_deref(), since) => p,
                m = input.recv() => match m {
                    None => return,
                    Some(RunIn::Signal(s)) => {
                        // Interrupted while waiting for a slot: like a job
                        // that died of it at once.
                        let _ = out.send(RunOut::Exit(ExitInfo { code: Some(128 + s), ..Default::default() })).await;
                        return;
                    }
                    Some(RunIn::Stdin(b)) => { log.push(&b); continue; }
                    Some(RunIn::StdinEof) => { log.eof = true; continue; }
                },
            };
            let (node, place_ms, queued_ms) = match placed {
                Ok(p) => p,
                Err(f) => {
                    let f = match notice.take() {
                        Some((lost, reason, _)) => Failure::new(
                            FailureKind::NodeLost,
                            format!("node {lost} lost ({reason}), and {}", f.message),
                        ),
                        None => f,
                    };
                    let _ = out.send(RunOut::Failure(f)).await;
                    return;
                }
            };
            if let Some((lost, reason, started)) = notice.take() {
                let what = if started {
                    "re-running on"
                } else {
                    "starting on"
                };
                let verb = if started { "lost" } else { "unreachable" };
                let line = format!("node {lost} {verb} ({reason}); {what} {node}");
                tracing::warn!("{line}");
                let _ = out.send(RunOut::Notice(line)).await;
            }
            if out
                .send(RunOut::Placed {
                    node: node.clone(),
                    place_ms,
                    queued_ms,
                })
                .await
                .is_err()
            {
                self.runner.release(&node);
                return;
            }
            let (etx, erx) = mpsc::channel(256);
            let outs: Result<ExecStream, String> = if node == self.cfg.node.as_str() {
                Ok(
                    tokio_stream::wrappers::ReceiverStream::new(self.exec(exec.clone(), erx))
                        .map(Ok)
                        .boxed(),
                )
            } else {
                match NodeName::parse(&node) {
                    Ok(n) => self
                        .peers
                        .exec(&n, exec.clone(), erx)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let outcome = match outs {
                Ok(s) => {
                    self.relay(
                        &node,
                        s,
                        etx,
                        &mut input,
                        &out,
                        &mut log,
                        start.rerun_on_node_loss,
                    )
                    .await
                }
                Err(reason) => Outcome::Lost {
                    reason,
                    started: false,
                },
            };
            self.runner.release(&node);
            match outcome {
                Outcome::Done | Outcome::CallerGone => return,
                Outcome::NoSlot => {
                    self.runner.with(|t| t.mark_full(&node));
                }
                Outcome::Lost { reason, started } => {
                    self.runner.with(|t| t.mark_down(&node));
                    let retry = if started {
                        start.rerun_on_node_loss && log.complete
                    } else {
                        start.rerun_on_node_loss || start.node.is_none()
                    };
                    if !retry {
                        let why = if started && start.rerun_on_node_loss {
                            "; not re-run: its stdin was too large to replay"
                        } else if started {
                            "; not re-run (mosrun --rerun-on-node-loss would)"
                        } else {
                            ""
                        };
                        let _ = out
                            .send(RunOut::Failure(Failure::new(
                                FailureKind::NodeLost,
                                format!("node {node} lost ({reason}){why}"),
                            )))
                            .await;
                        return;
                    }
                    // Anywhere but there (it is marked down).
                    want = None;
                    notice = Some((node, reason, started));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        node: &str,
        mut outs: ExecStream,
        etx: mpsc::Sender<ExecIn>,
        input: &mut mpsc::Receiver<RunIn>,
        out: &mpsc::Sender<RunOut>,
        log: &mut StdinLog,
        hold: bool,
    ) -> Outcome {
        for b in &log.chunks {
            let _ = etx.send(ExecIn::Stdin(b.clone())).await;
        }
        if log.eof {
            let _ = etx.send(ExecIn::StdinEof).await;
        }
        let remote = node != self.cfg.node.as_str();
        let mut started = false;
        let mut held: Vec<RunOut> = Vec::new();
        let mut held_bytes = 0usize;
        let mut holding = hold;
        let mut last_heard = Instant::now();
        let mut hb = tokio::time::interval(super::exec::HEARTBEAT);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = outs.next() => {
                    last_heard = Instant::now();
                    let o = match m {
                        Some(Ok(ExecOut::Started(s))) => {
                            started = true;
                            RunOut::Started(s)
                        }
                        Some(Ok(ExecOut::Stdout(b))) => RunOut::Stdout(b),
                        Some(Ok(ExecOut::Stderr(b))) => RunOut::Stderr(b),
                        Some(Ok(ExecOut::Heartbeat)) => continue,
                        Some(Ok(ExecOut::Exit(info))) => {
                            for h in held.drain(..) {
                                let _ = out.send(h).await;
                            }
                            let _ = out.send(RunOut::Exit(info)).await;
                            return Outcome::Done;
                        }
                        // Blocked since the last sample: like a full node,
                        // it is skipped until the next sample says more.
                        Some(Ok(ExecOut::Failure(f)))
                            if f.kind == FailureKind::NoSlot
                                || f.kind == FailureKind::NodeBlocked =>
                        {
                            return Outcome::NoSlot;
                        }
                        Some(Ok(ExecOut::Failure(f))) => {
                            let _ = out.send(RunOut::Failure(f)).await;
                            return Outcome::Done;
                        }
                        Some(Err(e)) => return Outcome::Lost { reason: e.to_string(), started },
                        None => return Outcome::Lost { reason: "its session ended without an exit status".into(), started },
                    };
                    let len = match &o {
                        RunOut::Stdout(b) | RunOut::Stderr(b) => b.len(),
                        _ => 0,
                    };
                    if holding && len > 0 {
                        held_bytes += len;
                        held.push(o);
                        if held_bytes > MAX_HELD {
                            // Too much to hold: stream from here on.
                            holding = false;
                            for h in held.drain(..) {
                                if out.send(h).await.is_err() {
                                    return Outcome::CallerGone;
                                }
                            }
                        }
                    } else if out.send(o).await.is_err() {
                        return Outcome::CallerGone;
                    }
                }
                m = input.recv() => match m {
                    None => return Outcome::CallerGone,
                    Some(RunIn::Stdin(b)) => {
                        // Kept only for a re-run (without one, nothing is
                        // ever replayed once the job started).
                        if hold {
                            log.push(&b);
                        }
                        let _ = etx.send(ExecIn::Stdin(b)).await;
                    }
                    Some(RunIn::StdinEof) => {
                        log.eof = true;
                        let _ = etx.send(ExecIn::StdinEof).await;
                    }
                    Some(RunIn::Signal(s)) => {
                        let _ = etx.send(ExecIn::Signal(s)).await;
                    }
                },
                _ = hb.tick() => {
                    // try_send: a stalled peer must not stall this loop.
                    let _ = etx.try_send(ExecIn::Heartbeat);
                    if remote && last_heard.elapsed() > NODE_SILENCE {
                        return Outcome::Lost {
                            reason: format!("no word from it for {} s", NODE_SILENCE.as_secs()),
                            started,
                        };
                    }
                }
            }
        }
    }
}
