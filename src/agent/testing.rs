//! Test support shared by the agent's unit tests: a plain configuration and
//! an agent with no peers, over the fake CRIU engine.

use super::migration::RestoreCall;
use super::peers::{Peers, TargetInfo};
use super::{Agent, AgentConfig, AgentError, AgentResult, ImageSync};
use crate::core::{JobRecord, NodeName};
use futures::future::BoxFuture;
use std::path::Path;
use std::sync::Arc;

/// A node without a shared path, its state under `root/node`.
pub(crate) fn config(root: &Path, node: &str) -> AgentConfig {
    AgentConfig {
        node: NodeName::parse(node).unwrap(),
        shared_root: root.join(node),
        shared: false,
        jobs_dir: root.join("jobs"),
        cgroup_scope: None,
        speed: 1.0,
        image_key: None,
        page_server_ip: None,
        post_copy: false,
        plain_pages: false,
        jobs_squeeze: true,
        cgroup_favordynmods: false,
        image_sync: ImageSync::OnClose,
        common_dirs: Vec::new(),
        job_net: None,
        settle_patience: super::direct::DEFAULT_SETTLE_PATIENCE,
    }
}

/// Peers of an agent that knows no other node.
pub(crate) struct NoPeers;

impl Peers for NoPeers {
    fn knows(&self, _: &NodeName) -> bool {
        false
    }
    fn names(&self) -> Vec<String> {
        vec![]
    }
    fn ping<'a>(&'a self, _: &'a NodeName) -> BoxFuture<'a, AgentResult<TargetInfo>> {
        Box::pin(async { Err(AgentError::Unavailable("no peers".into())) })
    }
    fn restore<'a>(
        &'a self,
        _: &'a NodeName,
        _: RestoreCall,
    ) -> BoxFuture<'a, AgentResult<JobRecord>> {
        Box::pin(async { Err(AgentError::Unavailable("no peers".into())) })
    }
}

/// An agent alone, with the fake engine.
pub(crate) fn lone_agent(root: &Path, node: &str) -> Arc<Agent> {
    Agent::new(
        config(root, node),
        Arc::new(crate::criu::fake::FakeEngine::default()),
        Arc::new(NoPeers),
    )
    .unwrap()
}
