//! Keeping the instance table current: the agents' job list and node loads
//! every `poll_ms`, each agent's event stream in between (a freeze is
//! announced there, and a restored instance is back within milliseconds
//! rather than at the next poll), and an active probe of every instance.
//!
//! The drain step for a freeze (see the module doc of [`super`]): mark the
//! instance draining (no new requests), wait for its in-flight requests up
//! to three quarters of the agent's acknowledgement bound, close its pooled
//! connections, mark it away, and acknowledge. Freezes of jobs that are not
//! instances of our services are acknowledged at once: we hold nothing of
//! theirs.

use super::table::{self, InstanceState, Sighting};
use super::Gateway;
use crate::api::client::{self, ClientTls};
use crate::api::pb;
use crate::core::cluster_file::ClusterFile;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// How often each instance is probed (a TCP connect).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Consecutive failed probes that eject an instance.
const PROBE_FAILURES_TO_EJECT: u32 = 2;

/// Start every background task of discovery.
pub fn start(gw: Arc<Gateway>, cf: ClusterFile, tls: Option<ClientTls>, subscriber: String) {
    tokio::spawn(poll_loop(gw.clone(), cf.clone(), tls.clone()));
    for n in &cf.nodes {
        tokio::spawn(watch_loop(
            gw.clone(),
            n.endpoint.clone(),
            tls.clone(),
            subscriber.clone(),
        ));
    }
    tokio::spawn(probe_loop(gw));
}

/// Where an instance answers: its job's own address (issue 18: it moves
/// with the job) if it has one, else its node's.
fn addr_of(gw: &Gateway, node: &str, job_address: &str, port: u32) -> Option<SocketAddr> {
    let ip = match job_address.parse::<std::net::IpAddr>() {
        Ok(ip) => ip,
        Err(_) => *gw.node_addrs.get(node)?,
    };
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

async fn list_jobs(cf: &ClusterFile, tls: Option<&ClientTls>) -> Option<Vec<pb::Job>> {
    for n in &cf.nodes {
        let Ok(mut c) = client::pooled_agent(&n.endpoint, tls, RPC_TIMEOUT).await else {
            continue;
        };
        let call = c.list_jobs(pb::ListJobsRequest {
            node: String::new(),
            include_finished: false,
        });
        match tokio::time::timeout(RPC_TIMEOUT, call).await {
            Ok(Ok(r)) => return Some(r.into_inner().jobs),
            _ => client::forget(&n.endpoint),
        }
    }
    None
}

async fn node_loads(cf: &ClusterFile, tls: Option<&ClientTls>) -> Vec<(String, f64)> {
    let calls = cf.nodes.iter().map(|n| async move {
        let mut c = client::pooled_agent(&n.endpoint, tls, RPC_TIMEOUT)
            .await
            .ok()?;
        let l = tokio::time::timeout(RPC_TIMEOUT, c.get_load(pb::GetLoadRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        let per_cap = if l.capacity > 0.0 {
            l.load / l.capacity
        } else {
            l.load
        };
        Some((n.name.to_string(), per_cap))
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The job list's view of one service.
fn sightings(gw: &Gateway, jobs: &[pb::Job], service: &str) -> Vec<Sighting> {
    jobs.iter()
        .filter(|j| j.service == service)
        .filter_map(|j| {
            let state = pb::JobState::try_from(j.state).ok()?;
            let running = match state {
                pb::JobState::Running => true,
                pb::JobState::Migrating => false,
                _ => return None,
            };
            Some(Sighting {
                job: j.id.clone(),
                node: j.node.clone(),
                addr: addr_of(gw, &j.node, &j.address, j.port)?,
                running,
                generation: j.generation,
            })
        })
        .collect()
}

/// Pools of active instances keep connections again (after a return).
fn resume_active_pools(gw: &Gateway) {
    gw.each_service(|_, t| {
        for i in t.instances.values() {
            if i.state == InstanceState::Active {
                i.pool.resume();
            }
        }
    });
}

async fn poll_loop(gw: Arc<Gateway>, cf: ClusterFile, tls: Option<ClientTls>) {
    let every = Duration::from_millis(gw.cfg.poll_ms);
    loop {
        let (jobs, loads) =
            tokio::join!(list_jobs(&cf, tls.as_ref()), node_loads(&cf, tls.as_ref()));
        let now = Instant::now();
        let mut changed = false;
        if let Some(jobs) = jobs {
            let names: Vec<String> = gw.cfg.services.iter().map(|s| s.name.clone()).collect();
            for name in names {
                let seen = sightings(&gw, &jobs, &name);
                changed |= gw
                    .with_service(&name, |s| table::reconcile(&mut s.instances, &seen, now))
                    .unwrap_or(false);
            }
        }
        gw.each_service(|_, s| {
            for i in s.instances.values_mut() {
                if let Some((_, l)) = loads.iter().find(|(n, _)| *n == i.node) {
                    i.load_per_capacity = *l;
                }
            }
        });
        if changed {
            resume_active_pools(&gw);
            gw.changed.notify_waiters();
        }
        tokio::time::sleep(every).await;
    }
}

async fn watch_loop(
    gw: Arc<Gateway>,
    endpoint: String,
    tls: Option<ClientTls>,
    subscriber: String,
) {
    loop {
        if let Ok(mut c) = client::pooled_agent(&endpoint, tls.as_ref(), RPC_TIMEOUT).await {
            let req = pb::WatchEventsRequest {
                subscriber: subscriber.clone(),
            };
            match c.watch_events(req).await {
                Ok(s) => {
                    tracing::info!(agent = %endpoint, "watching job events");
                    let mut s = s.into_inner();
                    while let Ok(Some(ev)) = s.message().await {
                        on_event(&gw, &endpoint, tls.as_ref(), &subscriber, ev);
                    }
                    tracing::warn!(agent = %endpoint, "job event stream ended; reconnecting");
                }
                Err(e) => {
                    tracing::debug!(agent = %endpoint, "watch: {}", e.message());
                }
            }
        }
        client::forget(&endpoint);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn on_event(
    gw: &Arc<Gateway>,
    endpoint: &str,
    tls: Option<&ClientTls>,
    subscriber: &str,
    ev: pb::JobEvent,
) {
    let ours = gw.cfg.services.iter().any(|s| s.name == ev.service);
    match pb::JobEventKind::try_from(ev.kind) {
        Ok(pb::JobEventKind::FreezePending) => {
            let gw = gw.clone();
            let endpoint = endpoint.to_string();
            let tls = tls.cloned();
            let subscriber = subscriber.to_string();
            tokio::spawn(async move {
                if ours {
                    drain(&gw, &ev).await;
                }
                ack(&endpoint, tls.as_ref(), &subscriber, ev.freeze_id).await;
            });
        }
        Ok(pb::JobEventKind::Running) if ours => {
            let Some(addr) = addr_of(gw, &ev.node, &ev.address, ev.port) else {
                return;
            };
            let s = Sighting {
                job: ev.job_id.clone(),
                node: ev.node.clone(),
                addr,
                running: true,
                generation: ev.generation,
            };
            let changed = gw
                .with_service(&ev.service, |t| {
                    let changed = table::apply(&mut t.instances, &s, Instant::now());
                    if changed {
                        if let Some(i) = t.instances.get(&s.job) {
                            i.pool.resume();
                        }
                    }
                    changed
                })
                .unwrap_or(false);
            if changed {
                tracing::info!(job = %ev.job_id, node = %ev.node, %addr, "instance running");
                gw.changed.notify_waiters();
            }
        }
        Ok(pb::JobEventKind::Ended) if ours => {
            gw.with_service(&ev.service, |t| t.instances.remove(&ev.job_id));
            gw.changed.notify_waiters();
        }
        _ => {}
    }
}

/// Let go of an instance before its freeze (see the module doc).
async fn drain(gw: &Arc<Gateway>, ev: &pb::JobEvent) {
    let t0 = Instant::now();
    let svc = ev.service.as_str();
    let job = ev.job_id.as_str();
    let known = gw
        .with_service(svc, |t| match t.instances.get_mut(job) {
            Some(i) => {
                i.state = InstanceState::Draining {
                    freeze_id: ev.freeze_id,
                };
                true
            }
            None => false,
        })
        .unwrap_or(false);
    gw.changed.notify_waiters();
    let bound = Duration::from_millis(ev.ack_within_ms.saturating_mul(3) / 4)
        .clamp(Duration::from_millis(100), Duration::from_millis(1500));
    let deadline = tokio::time::Instant::now() + bound;
    if known {
        loop {
            let notified = gw.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = gw
                .with_service(svc, |t| t.instances.get(job).map(|i| i.in_flight))
                .flatten()
                .unwrap_or(0);
            if busy == 0 || tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }
    // Closed outside the table's lock.
    if let Some(pool) = gw
        .with_service(svc, |t| t.instances.get(job).map(|i| i.pool.clone()))
        .flatten()
    {
        pool.drain();
    }
    gw.with_service(svc, |t| {
        if let Some(i) = t.instances.get_mut(job) {
            if matches!(i.state, InstanceState::Draining { .. }) {
                i.state = InstanceState::Away {
                    generation: ev.generation,
                };
            }
        }
    });
    gw.metrics.drains.with_label_values(&[svc, job]).inc();
    tracing::info!(job, service = svc, to = %ev.to_node, drain_ms = t0.elapsed().as_millis() as u64, "let go of instance before its freeze");
}

async fn ack(endpoint: &str, tls: Option<&ClientTls>, subscriber: &str, freeze_id: u64) {
    let Ok(mut c) = client::pooled_agent(endpoint, tls, RPC_TIMEOUT).await else {
        return;
    };
    let call = c.ack_freeze(pb::AckFreezeRequest {
        subscriber: subscriber.to_string(),
        freeze_id,
    });
    if let Ok(Ok(r)) = tokio::time::timeout(RPC_TIMEOUT, call).await {
        if !r.into_inner().accepted {
            tracing::debug!(freeze_id, "acknowledged too late");
        }
    }
}

/// Active health check: a TCP connect to every instance that takes traffic
/// (or was ejected and may come back).
async fn probe_loop(gw: Arc<Gateway>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let mut targets: Vec<(String, String, SocketAddr)> = vec![];
        gw.each_service(|svc, t| {
            targets.extend(
                t.instances
                    .values()
                    .filter(|i| {
                        matches!(
                            i.state,
                            InstanceState::Active | InstanceState::Ejected { .. }
                        )
                    })
                    .map(|i| (svc.to_string(), i.job.clone(), i.addr)),
            )
        });
        let probes = targets.into_iter().map(|(svc, job, addr)| async move {
            let ok = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (svc, job, addr, ok)
        });
        let results = futures::future::join_all(probes).await;
        let now = Instant::now();
        let mut changed = false;
        for (svc, job, addr, ok) in results {
            gw.with_service(&svc, |t| {
                let Some(i) = t.instances.get_mut(&job) else {
                    return;
                };
                if i.addr != addr {
                    return;
                }
                match (i.state, ok) {
                    (InstanceState::Active, true) => i.probe_failures = 0,
                    (InstanceState::Active, false) => {
                        i.probe_failures += 1;
                        if i.probe_failures >= PROBE_FAILURES_TO_EJECT {
                            i.state = InstanceState::Ejected {
                                until: now + super::proxy::EJECT_FOR,
                            };
                            changed = true;
                        }
                    }
                    (InstanceState::Ejected { until }, true) if now >= until => {
                        // Re-admitted: a returned instance starts slowly.
                        i.state = InstanceState::Active;
                        i.since = now;
                        i.probe_failures = 0;
                        changed = true;
                    }
                    _ => {}
                }
            });
        }
        if changed {
            gw.changed.notify_waiters();
        }
    }
}
