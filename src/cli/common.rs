//! What every CLI shares: the cluster file, connections, finding a job, and
//! turning gRPC statuses into sentences.

use crate::api::client::{self, ClientTls};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;
use crate::core::cluster_file::ClusterFile;
use anyhow::{anyhow, Context};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Ctx {
    pub cf: ClusterFile,
    pub tls: Option<ClientTls>,
}

/// A gRPC failure as a user-facing error: the agent's message, which already
/// says what happened and where the job is, plus the code for scripts.
pub fn status_err(what: &str, s: tonic::Status) -> anyhow::Error {
    match crate::security::membership::explain_tls_error(&s) {
        Some(why) => anyhow!("{what}: {why} ({}, {:?})", s.message(), s.code()),
        None => anyhow!("{what}: {} ({:?})", s.message(), s.code()),
    }
}

/// A failed call's status as text for a table cell, with a TLS refusal
/// named (an agent that refuses our client certificate says so only once
/// the first call is made: TLS 1.3 sends that alert after the handshake).
pub use crate::api::client::status_text;

impl Ctx {
    pub fn load(flag: Option<&Path>) -> anyhow::Result<Self> {
        let path = ClusterFile::locate(flag);
        let cf = ClusterFile::load(&path)?;
        let tls = ClientTls::from_cluster(&cf).context("loading client TLS files")?;
        if let Some(t) = &cf.tls {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            crate::security::membership::check_certificate(&t.ca, &t.cert, now)
                .with_context(|| format!("the client certificate in {}", path.display()))?;
        }
        Ok(Self { cf, tls })
    }

    /// Every node's load and the cluster's jobs, as the balancer polls them,
    /// giving each agent the balancer's default time to answer
    /// (`DEFAULT_POLL_DEADLINE`): placement, drain and restore decide from it.
    pub async fn poll_view(&self) -> crate::balancer::view::ClusterView {
        crate::balancer::view::poll(
            &self.cf,
            self.tls.as_ref(),
            crate::balancer::service::DEFAULT_POLL_DEADLINE,
        )
        .await
    }

    /// A client for `node`, over this process's open connection to it if
    /// there is one: looking a job up and then acting on it often talks to
    /// the same agent twice, and each new connection costs an mTLS handshake.
    pub async fn agent(&self, node: &str) -> anyhow::Result<AgentClient<Channel>> {
        let n = self.cf.node(node)?;
        client::pooled_agent(&n.endpoint, self.tls.as_ref(), CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("node {node} ({}) is unreachable", n.endpoint))
    }

    /// Drop the open connection to `node` after a failed call, so a
    /// long-running command (mosmon) reconnects next time.
    pub fn forget(&self, node: &str) {
        if let Ok(n) = self.cf.node(node) {
            client::forget(&n.endpoint);
        }
    }

    /// The first agent that answers; any of them can read the registry.
    pub async fn any_agent(&self) -> anyhow::Result<AgentClient<Channel>> {
        let mut last = None;
        for n in &self.cf.nodes {
            match self.agent(n.name.as_str()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the cluster has no nodes")))
    }

    /// Find a job by id, or by host pid (asking every node). A pid that no
    /// agent manages is refused with the agent's explanation.
    pub async fn find_job(&self, spec: &str) -> anyhow::Result<pb::Job> {
        use pb::get_job_request::Selector;
        if let Ok(pid) = spec.parse::<i32>() {
            let mut refusal = None;
            for n in &self.cf.nodes {
                let Ok(mut c) = self.agent(n.name.as_str()).await else {
                    continue;
                };
                match c
                    .get_job(pb::GetJobRequest {
                        selector: Some(Selector::Pid(pid)),
                    })
                    .await
                {
                    Ok(j) => return Ok(j.into_inner()),
                    Err(s) => refusal = Some(s),
                }
            }
            return Err(match refusal {
                Some(s)
                    if s.code() == tonic::Code::PermissionDenied
                        || s.code() == tonic::Code::InvalidArgument =>
                {
                    anyhow!("refused: pid {pid} is not a job managed by mosix on any node; only jobs started with mosrun can be migrated, frozen or signalled")
                }
                Some(s) => status_err(&format!("looking up pid {pid}"), s),
                None => anyhow!("no node is reachable"),
            });
        }
        let mut c = self.any_agent().await?;
        c.get_job(pb::GetJobRequest {
            selector: Some(Selector::JobId(spec.to_string())),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_err(&format!("job {spec}"), s))
    }
}

/// An error and its causes, each said once: "a: b: c". Why: `{:#}` appends
/// every cause, and many errors here already quote their cause in their own
/// message (`"cannot read cluster file {path}: {source} …"`), so the same
/// words were printed twice. A cause whose text is already in what came
/// before is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Migrating) => "migrating",
        Ok(pb::JobState::Frozen) => "frozen",
        Ok(pb::JobState::Exited) => "exited",
        Ok(pb::JobState::Failed) => "failed",
        _ => "?",
    }
}

pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Poll every node's load concurrently with a deadline; unreachable nodes
/// come back as Err so callers can show them as down.
pub async fn poll_loads(
    ctx: &Ctx,
    deadline: Duration,
) -> Vec<(String, Result<pb::NodeLoad, String>)> {
    let futs = ctx.cf.nodes.iter().map(|n| {
        let name = n.name.to_string();
        let ep = n.endpoint.clone();
        let tls = ctx.tls.clone();
        async move {
            let r = tokio::time::timeout(deadline, async {
                let mut c = client::agent(&ep, tls.as_ref(), deadline)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                c.get_load(pb::GetLoadRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| status_text(&s))
            })
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()));
            (name, r)
        }
    });
    let mut out = futures::future::join_all(futs).await;
    // With etcd, a node without a live lease is LOST (see balancer::view).
    let mut loads: Vec<(String, &mut Result<pb::NodeLoad, String>)> =
        out.iter_mut().map(|(n, r)| (n.clone(), r)).collect();
    crate::balancer::view::mark_lost_loads(&ctx.cf, &mut loads).await;
    out
}

/// `90`, `90s`, `5m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 5m, 1h)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::{error_chain, parse_duration};
    use crate::core::cluster_file::ClusterFile;
    use anyhow::anyhow;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        // A cause quoted in its error's own message, then a context.
        let e = anyhow::Error::from(
            ClusterFile::load(Path::new("/nonexistent/cluster.json")).unwrap_err(),
        )
        .context("mosctl jobs");
        let s = error_chain(&e);
        assert!(
            s.starts_with("mosctl jobs: cannot read cluster file"),
            "{s}"
        );
        assert_eq!(s.matches("No such file or directory").count(), 1, "{s}");
        // Causes that are not quoted are all kept, in order.
        let e = anyhow!("c").context("b").context("a");
        assert_eq!(error_chain(&e), "a: b: c");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "0", "-1s", "5d", "abc", "1.5.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
