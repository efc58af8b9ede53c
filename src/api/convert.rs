//! proto ↔ core conversion, in one module of `TryFrom`/`From` impls.
//! Anything that arrives over the wire is validated here; a bad field becomes
//! [`InvalidRequest`], which maps to `INVALID_ARGUMENT` naming the field.

use super::pb;
use crate::agent::direct::{
    FileArea, FileChunk, PushBegin, PushEnd, PushPart, PushSummary, Resolution, MAX_CHUNK_BYTES,
    MAX_RECORD_JSON_BYTES,
};
use crate::agent::load::{JobUsage, NodeLoad};
use crate::agent::migration::{DumpResult, Mode, RestoreCall};
use crate::agent::{AgentAction, AgentError, JobList, JobSelector, LaunchRequest, NodeAdminInfo};
use crate::core::ids::PlainFileName;
use crate::core::job::PendingMigration;
use crate::core::{
    JobId, JobRecord, JobState, MigrationId, MigrationRecord, NodeName, ServiceDecl,
};
use crate::criu::PageServer;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
#[error("invalid request: {field}: {why}")]
pub struct InvalidRequest {
    pub field: &'static str,
    pub why: String,
}

impl InvalidRequest {
    fn new(field: &'static str, why: impl ToString) -> Self {
        Self {
            field,
            why: why.to_string(),
        }
    }
}

impl From<InvalidRequest> for Status {
    fn from(e: InvalidRequest) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

fn job_id(field: &'static str, s: &str) -> Result<JobId, InvalidRequest> {
    JobId::parse(s).map_err(|e| InvalidRequest::new(field, e))
}
fn node(field: &'static str, s: &str) -> Result<NodeName, InvalidRequest> {
    NodeName::parse(s).map_err(|e| InvalidRequest::new(field, e))
}
fn mig_opt(field: &'static str, s: &str) -> Result<Option<MigrationId>, InvalidRequest> {
    if s.is_empty() {
        Ok(None)
    } else {
        MigrationId::parse(s)
            .map(Some)
            .map_err(|e| InvalidRequest::new(field, e))
    }
}

pub fn agent_error_to_status(e: AgentError) -> Status {
    match e {
        AgentError::InvalidArgument(m) => Status::invalid_argument(m),
        AgentError::NotFound(m) => Status::not_found(m),
        AgentError::FailedPrecondition(m) => Status::failed_precondition(m),
        AgentError::PermissionDenied(m) => Status::permission_denied(m),
        AgentError::Unavailable(m) => Status::unavailable(m),
        AgentError::Aborted(m) => Status::aborted(m),
        AgentError::DataLoss(m) => Status::data_loss(m),
        AgentError::ResourceExhausted(m) => Status::resource_exhausted(m),
        AgentError::Internal(m) => Status::internal(m),
    }
}

pub fn status_to_agent_error(s: Status) -> AgentError {
    let m = s.message().to_string();
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => AgentError::InvalidArgument(m),
        Code::NotFound => AgentError::NotFound(m),
        Code::FailedPrecondition | Code::AlreadyExists => AgentError::FailedPrecondition(m),
        Code::PermissionDenied | Code::Unauthenticated => AgentError::PermissionDenied(m),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            AgentError::Unavailable(format!("{:?}: {m}", s.code()))
        }
        Code::Aborted => AgentError::Aborted(m),
        Code::DataLoss => AgentError::DataLoss(m),
        Code::ResourceExhausted => AgentError::ResourceExhausted(m),
        _ => AgentError::Internal(m),
    }
}

impl From<&crate::agent::events::JobEvent> for pb::JobEvent {
    fn from(e: &crate::agent::events::JobEvent) -> Self {
        use crate::agent::events::EventKind;
        let kind = match e.kind {
            EventKind::FreezePending => pb::JobEventKind::FreezePending,
            EventKind::Running => pb::JobEventKind::Running,
            EventKind::Ended => pb::JobEventKind::Ended,
        };
        pb::JobEvent {
            kind: kind as i32,
            job_id: e.job.to_string(),
            node: e.node.to_string(),
            service: e
                .service
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            port: e.service.as_ref().map(|s| u32::from(s.port)).unwrap_or(0),
            freeze_id: e.freeze_id,
            ack_within_ms: e.ack_within_ms,
            generation: e.generation,
            unix_ms: e.unix_ms,
            to_node: e
                .to_node
                .as_ref()
                .map(|n| n.to_string())
                .unwrap_or_default(),
            address: e.address.map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}

/// A job's own address on the wire: none when the address is empty.
fn job_net(
    address: &str,
    prefix: u32,
    gateway: &str,
    mac: String,
) -> Result<Option<crate::core::JobNet>, InvalidRequest> {
    if address.is_empty() {
        return Ok(None);
    }
    let ip = address.parse().map_err(|_| {
        InvalidRequest::new("address", format!("{address:?} is not an IPv4 address"))
    })?;
    let gateway = gateway.parse().map_err(|_| {
        InvalidRequest::new("gateway", format!("{gateway:?} is not an IPv4 address"))
    })?;
    let prefix = u8::try_from(prefix)
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| InvalidRequest::new("address_prefix", format!("{prefix} is not 0-32")))?;
    Ok(Some(crate::core::JobNet {
        ip,
        prefix,
        gateway,
        mac,
    }))
}

/// A declared service on the wire: none when the name is empty.
pub(crate) fn service_decl(name: &str, port: u32) -> Result<Option<ServiceDecl>, InvalidRequest> {
    if name.is_empty() {
        if port != 0 {
            return Err(InvalidRequest::new(
                "service",
                "a port needs a service name",
            ));
        }
        return Ok(None);
    }
    ServiceDecl::new(name, port)
        .map(Some)
        .map_err(|e| InvalidRequest::new("service", e))
}

impl TryFrom<pb::LaunchRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::LaunchRequest) -> Result<Self, InvalidRequest> {
        if r.argv.is_empty() || r.argv[0].is_empty() {
            return Err(InvalidRequest::new("argv", "must name a command"));
        }
        let mut env: Vec<(String, String)> = r.env.into_iter().collect();
        env.sort();
        Ok(AgentAction::Launch(LaunchRequest {
            argv: r.argv,
            env,
            cwd: r.cwd,
            uid: r.uid,
            gid: r.gid,
            pinned: r.pinned,
            non_migratable: r.non_migratable,
            name: r.name,
            service: service_decl(&r.service, r.port)?,
            checkpoint: super::convert_checkpoint::launch_policy(
                r.checkpoint_every_ms,
                r.checkpoint_keep,
            )?,
            own_net: match r.net.as_str() {
                "" => None,
                "own" => Some(true),
                "node" => Some(false),
                other => {
                    return Err(InvalidRequest::new(
                        "net",
                        format!("{other:?} is neither \"own\" nor \"node\""),
                    ))
                }
            },
        }))
    }
}

impl TryFrom<pb::ListJobsRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::ListJobsRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::ListJobs {
            node: if r.node.is_empty() {
                None
            } else {
                Some(node("node", &r.node)?)
            },
            include_finished: r.include_finished,
            local_only: false,
        })
    }
}

impl TryFrom<pb::GetJobRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::GetJobRequest) -> Result<Self, InvalidRequest> {
        use pb::get_job_request::Selector;
        match r.selector {
            Some(Selector::JobId(id)) => {
                Ok(AgentAction::GetJob(JobSelector::Id(job_id("job_id", &id)?)))
            }
            Some(Selector::Pid(pid)) if pid > 0 => Ok(AgentAction::GetJob(JobSelector::Pid(pid))),
            Some(Selector::Pid(pid)) => Err(InvalidRequest::new(
                "pid",
                format!("{pid} is not a valid pid"),
            )),
            None => Err(InvalidRequest::new("selector", "give job_id or pid")),
        }
    }
}

impl TryFrom<pb::DumpRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::DumpRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::Dump {
            job: job_id("job_id", &r.job_id)?,
            migration: mig_opt("migration_id", &r.migration_id)?,
            leave_running: r.leave_running,
        })
    }
}

fn parse_page_server(s: &str) -> Result<Option<PageServer>, InvalidRequest> {
    if s.is_empty() {
        return Ok(None);
    }
    let sa: std::net::SocketAddr = s
        .parse()
        .map_err(|_| InvalidRequest::new("page_server", format!("{s:?} is not ip:port")))?;
    Ok(Some(PageServer {
        address: sa.ip().to_string(),
        port: sa.port(),
    }))
}

impl TryFrom<pb::RestoreRequest> for RestoreCall {
    type Error = InvalidRequest;
    fn try_from(r: pb::RestoreRequest) -> Result<Self, InvalidRequest> {
        let job = job_id("job_id", &r.job_id)?;
        let migration = mig_opt("migration_id", &r.migration_id)?
            .ok_or_else(|| InvalidRequest::new("migration_id", "must not be empty"))?;
        // The image directory is derived, never trusted: a caller-chosen path
        // could point a root CRIU at anything.
        let expected = crate::agent::migration::image_rel(&job, &migration);
        if !r.image_dir.is_empty() && r.image_dir != expected {
            return Err(InvalidRequest::new(
                "image_dir",
                format!("must be {expected:?} for this job and migration"),
            ));
        }
        Ok(RestoreCall {
            job,
            migration,
            page_server: parse_page_server(&r.page_server)?,
            from: if r.from_node.is_empty() {
                None
            } else {
                Some(node("from_node", &r.from_node)?)
            },
            frozen_before_ms: r.frozen_before_ms,
            image_bytes: r.image_bytes,
        })
    }
}

impl From<&RestoreCall> for pb::RestoreRequest {
    fn from(c: &RestoreCall) -> Self {
        pb::RestoreRequest {
            job_id: c.job.to_string(),
            migration_id: c.migration.to_string(),
            image_dir: crate::agent::migration::image_rel(&c.job, &c.migration),
            page_server: c
                .page_server
                .as_ref()
                .map(|p| format!("{}:{}", p.address, p.port))
                .unwrap_or_default(),
            from_node: c.from.as_ref().map(|n| n.to_string()).unwrap_or_default(),
            frozen_before_ms: c.frozen_before_ms,
            image_bytes: c.image_bytes,
        }
    }
}

impl TryFrom<pb::MigrateRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::MigrateRequest) -> Result<Self, InvalidRequest> {
        let mode = match pb::MigrationMode::try_from(r.mode) {
            Ok(pb::MigrationMode::Auto) => Mode::Auto,
            Ok(pb::MigrationMode::FullCopy) => Mode::FullCopy,
            Ok(pb::MigrationMode::PostCopy) if r.force => Mode::PostCopyForced,
            Ok(pb::MigrationMode::PostCopy) => Mode::PostCopy,
            Ok(pb::MigrationMode::PostCopyIfSafe) => Mode::PostCopyIfSafe,
            Ok(pb::MigrationMode::PreCopy) => Mode::PreCopy,
            Err(_) => {
                return Err(InvalidRequest::new(
                    "mode",
                    format!("unknown mode {}", r.mode),
                ))
            }
        };
        Ok(AgentAction::Migrate {
            job: job_id("job_id", &r.job_id)?,
            target: node("target_node", &r.target_node)?,
            migration: mig_opt("migration_id", &r.migration_id)?,
            mode,
            only_here: r.only_here,
        })
    }
}

impl From<Mode> for pb::MigrationMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => pb::MigrationMode::Auto,
            Mode::FullCopy => pb::MigrationMode::FullCopy,
            Mode::PostCopy | Mode::PostCopyForced => pb::MigrationMode::PostCopy,
            Mode::PostCopyIfSafe => pb::MigrationMode::PostCopyIfSafe,
            Mode::PreCopy => pb::MigrationMode::PreCopy,
        }
    }
}

/// The `force` flag that goes with [`pb::MigrationMode::from`] a mode.
pub fn mode_forced(m: Mode) -> bool {
    m == Mode::PostCopyForced
}

impl TryFrom<pb::SignalRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::SignalRequest) -> Result<Self, InvalidRequest> {
        if !(1..=64).contains(&r.signal) {
            return Err(InvalidRequest::new(
                "signal",
                format!("{} is out of range 1..=64", r.signal),
            ));
        }
        Ok(AgentAction::Signal {
            job: job_id("job_id", &r.job_id)?,
            signal: r.signal,
        })
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Running => pb::JobState::Running,
            JobState::Migrating => pb::JobState::Migrating,
            JobState::Frozen => pb::JobState::Frozen,
            JobState::Exited => pb::JobState::Exited,
            JobState::Failed => pb::JobState::Failed,
        }
    }
}

impl From<&MigrationRecord> for pb::Migration {
    fn from(m: &MigrationRecord) -> Self {
        pb::Migration {
            id: m.id.to_string(),
            from_node: m.from.to_string(),
            to_node: m.to.to_string(),
            started_unix_ms: m.started_unix_ms,
            frozen_ms: m.frozen_ms,
            total_ms: m.total_ms,
            ok: m.ok,
            error: m.error.clone(),
            image_bytes: m.image_bytes,
            post_copy: m.post_copy,
            pre_copy_rounds: m.pre_copy_rounds,
            pre_copy_bytes: m.pre_copy_bytes,
            fallback: m.fallback.clone(),
            restored_from_checkpoint: m.restored_from_checkpoint,
        }
    }
}

impl TryFrom<pb::Migration> for MigrationRecord {
    type Error = InvalidRequest;
    fn try_from(m: pb::Migration) -> Result<Self, InvalidRequest> {
        Ok(MigrationRecord {
            id: MigrationId::parse(&m.id).map_err(|e| InvalidRequest::new("migration.id", e))?,
            from: node("migration.from_node", &m.from_node)?,
            to: node("migration.to_node", &m.to_node)?,
            started_unix_ms: m.started_unix_ms,
            frozen_ms: m.frozen_ms,
            total_ms: m.total_ms,
            ok: m.ok,
            error: m.error,
            image_bytes: m.image_bytes,
            post_copy: m.post_copy,
            pre_copy_rounds: m.pre_copy_rounds,
            pre_copy_bytes: m.pre_copy_bytes,
            fallback: m.fallback,
            restored_from_checkpoint: m.restored_from_checkpoint,
        })
    }
}

impl From<&JobList> for pb::ListJobsResponse {
    fn from(l: &JobList) -> Self {
        pb::ListJobsResponse {
            jobs: l.jobs.iter().map(pb::Job::from).collect(),
            unlisted: l
                .unlisted
                .iter()
                .map(|u| pb::UnlistedNode {
                    node: u.node.to_string(),
                    reason: u.reason.clone(),
                })
                .collect(),
        }
    }
}

impl From<&JobRecord> for pb::Job {
    fn from(r: &JobRecord) -> Self {
        pb::Job {
            id: r.id.to_string(),
            node: r.node.to_string(),
            state: pb::JobState::from(r.state) as i32,
            pid: r.pid,
            argv: r.argv.clone(),
            cwd: r.cwd.clone(),
            uid: r.uid,
            gid: r.gid,
            stdout_path: r.stdout_path.clone(),
            stderr_path: r.stderr_path.clone(),
            created_unix_ms: r.created_unix_ms,
            exit_code: r.exit_code,
            exit_signal: r.exit_signal,
            history: r.history.iter().map(pb::Migration::from).collect(),
            pinned: r.pinned,
            non_migratable: r.non_migratable,
            name: r.name.clone(),
            error: r.error.clone(),
            arrived_unix_ms: r.arrived_unix_ms,
            generation: r.generation,
            service: r
                .service
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            port: r.service.as_ref().map(|s| u32::from(s.port)).unwrap_or(0),
            checkpoint: r.checkpoint.as_ref().map(pb::CheckpointStatus::from),
            address: r.net.as_ref().map(|n| n.ip.to_string()).unwrap_or_default(),
            address_prefix: r.net.as_ref().map_or(0, |n| u32::from(n.prefix)),
            gateway: r
                .net
                .as_ref()
                .map(|n| n.gateway.to_string())
                .unwrap_or_default(),
            mac: r.net.as_ref().map(|n| n.mac.clone()).unwrap_or_default(),
        }
    }
}

/// A job as a client sees it. The pending migration, which the wire does not
/// carry, is left empty.
impl TryFrom<pb::Job> for JobRecord {
    type Error = InvalidRequest;
    fn try_from(j: pb::Job) -> Result<Self, InvalidRequest> {
        let state = match pb::JobState::try_from(j.state) {
            Ok(pb::JobState::Running) => JobState::Running,
            Ok(pb::JobState::Migrating) => JobState::Migrating,
            Ok(pb::JobState::Frozen) => JobState::Frozen,
            Ok(pb::JobState::Exited) => JobState::Exited,
            Ok(pb::JobState::Failed) => JobState::Failed,
            _ => {
                return Err(InvalidRequest::new(
                    "state",
                    format!("unknown state {}", j.state),
                ))
            }
        };
        Ok(JobRecord {
            id: job_id("id", &j.id)?,
            name: j.name,
            node: node("node", &j.node)?,
            state,
            pid: j.pid,
            argv: j.argv,
            cwd: j.cwd,
            uid: j.uid,
            gid: j.gid,
            stdout_path: j.stdout_path,
            stderr_path: j.stderr_path,
            created_unix_ms: j.created_unix_ms,
            arrived_unix_ms: j.arrived_unix_ms,
            exit_code: j.exit_code,
            exit_signal: j.exit_signal,
            history: j
                .history
                .into_iter()
                .map(MigrationRecord::try_from)
                .collect::<Result<_, _>>()?,
            pending: None::<PendingMigration>,
            pinned: j.pinned,
            non_migratable: j.non_migratable,
            error: j.error,
            generation: j.generation,
            service: service_decl(&j.service, j.port)?,
            checkpoint: j.checkpoint.map(crate::core::CheckpointStatus::from),
            net: job_net(&j.address, j.address_prefix, &j.gateway, j.mac)?,
        })
    }
}

impl From<&NodeLoad> for pb::NodeLoad {
    fn from(l: &NodeLoad) -> Self {
        pb::NodeLoad {
            node: l.node.clone(),
            load: l.load,
            capacity: l.capacity,
            cpu_usage: l.cpu_usage,
            mem_total_bytes: l.mem_total_bytes,
            mem_available_bytes: l.mem_available_bytes,
            jobs_running: l.jobs_running,
            migrations_in_flight: l.migrations_in_flight,
            migration_bandwidth_bps: l.migration_bandwidth_bps,
            jobs: l
                .jobs
                .iter()
                .map(|u: &JobUsage| pb::JobUsage {
                    job_id: u.job_id.clone(),
                    rss_bytes: u.rss_bytes,
                    cpu_cores: u.cpu_cores,
                    runnable: u.runnable,
                    demand: u.demand,
                    residence_secs: 0.0,
                    arrived_unix_ms: u.flags.arrived_unix_ms,
                    pinned: u.flags.pinned,
                    non_migratable: u.flags.non_migratable,
                    post_copy_failed: u.flags.post_copy_failed,
                    busy: u.flags.busy,
                    unsampled: u.flags.unsampled,
                    own_address: u.flags.own_address,
                })
                .collect(),
            timestamp_unix_ms: l.timestamp_unix_ms,
            supports_post_copy: l.supports_post_copy,
            supports_pre_copy: l.supports_pre_copy,
            job_addresses: l.job_addresses,
            blocked: l.blocked,
            speed: l.speed,
        }
    }
}

impl From<&crate::agent::loadfeed::Update> for pb::LoadReport {
    fn from(u: &crate::agent::loadfeed::Update) -> Self {
        match u {
            crate::agent::loadfeed::Update::Full(l) => pb::LoadReport {
                load: Some(pb::NodeLoad::from(l)),
                heartbeat_bound_ms: crate::agent::loadfeed::HEARTBEAT_BOUND.as_millis() as u64,
            },
            crate::agent::loadfeed::Update::Heartbeat => pb::LoadReport::default(),
        }
    }
}

impl TryFrom<pb::SetNodeAdminRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::SetNodeAdminRequest) -> Result<Self, InvalidRequest> {
        if let Some(s) = r.speed {
            if !crate::agent::admin::valid_speed(s) {
                return Err(InvalidRequest::new(
                    "speed",
                    format!("{s} is not a positive finite number"),
                ));
            }
        }
        Ok(AgentAction::SetNodeAdmin {
            blocked: r.blocked,
            speed: r.speed,
        })
    }
}

impl From<&NodeAdminInfo> for pb::NodeAdmin {
    fn from(a: &NodeAdminInfo) -> Self {
        pb::NodeAdmin {
            node: a.node.clone(),
            blocked: a.blocked,
            speed: a.speed,
        }
    }
}

impl TryFrom<pb::SetPinnedRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::SetPinnedRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::SetPinned {
            job: job_id("job_id", &r.job_id)?,
            pinned: r.pinned,
        })
    }
}

impl From<&DumpResult> for pb::DumpResponse {
    fn from(d: &DumpResult) -> Self {
        pb::DumpResponse {
            image_dir: d.image_dir.clone(),
            image_bytes: d.image_bytes,
            frozen_ms: d.frozen_ms,
        }
    }
}

// --- Migration without a shared path (PushImages, ResolveMigration) ---

impl TryFrom<pb::ImageChunk> for PushPart {
    type Error = InvalidRequest;
    fn try_from(c: pb::ImageChunk) -> Result<Self, InvalidRequest> {
        use pb::image_chunk::Part;
        match c.part {
            Some(Part::Begin(b)) => {
                if b.record_json.len() > MAX_RECORD_JSON_BYTES {
                    return Err(InvalidRequest::new(
                        "begin.record_json",
                        format!("larger than {MAX_RECORD_JSON_BYTES} bytes"),
                    ));
                }
                Ok(PushPart::Begin(PushBegin {
                    job: job_id("begin.job_id", &b.job_id)?,
                    migration: mig_opt("begin.migration_id", &b.migration_id)?.ok_or_else(
                        || InvalidRequest::new("begin.migration_id", "must not be empty"),
                    )?,
                    from: node("begin.from_node", &b.from_node)?,
                    total_bytes: b.total_bytes,
                    record_json: b.record_json,
                    early: b.early,
                    pages_streamed: b.pages_streamed,
                }))
            }
            Some(Part::File(f)) => {
                // A plain name, never a path: no '/', no "..", nothing hidden.
                let name = PlainFileName::parse(&f.name)
                    .map_err(|e| InvalidRequest::new("file.name", e))?;
                let area = match pb::FileArea::try_from(f.area) {
                    Ok(pb::FileArea::Image) => FileArea::Image,
                    Ok(pb::FileArea::JobOutput) => FileArea::JobOutput,
                    _ => {
                        return Err(InvalidRequest::new(
                            "file.area",
                            format!("unknown area {}", f.area),
                        ))
                    }
                };
                if f.data.len() > MAX_CHUNK_BYTES {
                    return Err(InvalidRequest::new(
                        "file.data",
                        format!("{} bytes, more than {MAX_CHUNK_BYTES}", f.data.len()),
                    ));
                }
                let end = f.offset.checked_add(f.data.len() as u64);
                // A growing file's size is not known yet; its end marker
                // gives it.
                let size = if f.growing { u64::MAX } else { f.size };
                if f.growing && f.size != 0 {
                    return Err(InvalidRequest::new(
                        "file.size",
                        format!("{name} is growing, so its size must be 0, not {}", f.size),
                    ));
                }
                if end.is_none_or(|e| e > size) {
                    return Err(InvalidRequest::new(
                        "file.offset",
                        format!(
                            "{} bytes at offset {} do not fit in {name}'s {} bytes",
                            f.data.len(),
                            f.offset,
                            f.size
                        ),
                    ));
                }
                Ok(PushPart::File(FileChunk {
                    name,
                    area,
                    offset: f.offset,
                    size: f.size,
                    data: f.data,
                    growing: f.growing,
                }))
            }
            Some(Part::End(e)) => {
                if e.record_json.len() > MAX_RECORD_JSON_BYTES {
                    return Err(InvalidRequest::new(
                        "end.record_json",
                        format!("larger than {MAX_RECORD_JSON_BYTES} bytes"),
                    ));
                }
                let grown = e
                    .grown
                    .into_iter()
                    .map(|g| {
                        PlainFileName::parse(&g.name)
                            .map(|n| (n, g.size))
                            .map_err(|err| InvalidRequest::new("end.grown.name", err))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(PushPart::End(PushEnd {
                    files: e.files,
                    total_bytes: e.total_bytes,
                    record_json: e.record_json,
                    grown,
                }))
            }
            None => Err(InvalidRequest::new("part", "empty message")),
        }
    }
}

impl From<PushPart> for pb::ImageChunk {
    fn from(p: PushPart) -> Self {
        use pb::image_chunk::Part;
        let part = match p {
            PushPart::Begin(b) => Part::Begin(pb::PushBegin {
                job_id: b.job.to_string(),
                migration_id: b.migration.to_string(),
                from_node: b.from.to_string(),
                total_bytes: b.total_bytes,
                record_json: b.record_json,
                early: b.early,
                pages_streamed: b.pages_streamed,
            }),
            PushPart::File(f) => Part::File(pb::FileData {
                name: f.name.to_string(),
                area: match f.area {
                    FileArea::Image => pb::FileArea::Image,
                    FileArea::JobOutput => pb::FileArea::JobOutput,
                } as i32,
                offset: f.offset,
                data: f.data,
                size: f.size,
                growing: f.growing,
            }),
            PushPart::End(e) => Part::End(pb::PushEnd {
                files: e.files,
                total_bytes: e.total_bytes,
                record_json: e.record_json,
                grown: e
                    .grown
                    .into_iter()
                    .map(|(name, size)| pb::GrownFile {
                        name: name.to_string(),
                        size,
                    })
                    .collect(),
            }),
        };
        pb::ImageChunk { part: Some(part) }
    }
}

impl From<&PushSummary> for pb::PushImagesResponse {
    fn from(s: &PushSummary) -> Self {
        pb::PushImagesResponse {
            files: s.files,
            bytes: s.bytes,
        }
    }
}

impl From<pb::PushImagesResponse> for PushSummary {
    fn from(r: pb::PushImagesResponse) -> Self {
        PushSummary {
            files: r.files,
            bytes: r.bytes,
        }
    }
}

impl TryFrom<pb::ResolveMigrationRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::ResolveMigrationRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::ResolveMigration {
            job: job_id("job_id", &r.job_id)?,
            migration: mig_opt("migration_id", &r.migration_id)?
                .ok_or_else(|| InvalidRequest::new("migration_id", "must not be empty"))?,
        })
    }
}

impl From<&Resolution> for pb::ResolveMigrationResponse {
    fn from(r: &Resolution) -> Self {
        match r {
            Resolution::Landed(job) => pb::ResolveMigrationResponse {
                landed: true,
                job: job.as_deref().map(pb::Job::from),
            },
            Resolution::Abandoned => pb::ResolveMigrationResponse {
                landed: false,
                job: None,
            },
        }
    }
}

impl TryFrom<pb::ResolveMigrationResponse> for Resolution {
    type Error = InvalidRequest;
    fn try_from(r: pb::ResolveMigrationResponse) -> Result<Self, InvalidRequest> {
        if !r.landed {
            return Ok(Resolution::Abandoned);
        }
        Ok(Resolution::Landed(
            r.job.map(JobRecord::try_from).transpose()?.map(Box::new),
        ))
    }
}

// ---------------------------------------------------------------- page stream

impl From<crate::agent::direct::stream::PageStreamIn> for pb::PageStreamIn {
    fn from(m: crate::agent::direct::stream::PageStreamIn) -> Self {
        use crate::agent::direct::stream::PageStreamIn;
        use pb::page_stream_in::Msg;
        let msg = match m {
            PageStreamIn::Open(o) => Msg::Open(pb::PageStreamOpen {
                job_id: o.job.to_string(),
                migration_id: o.migration.to_string(),
                from_node: o.from.to_string(),
                estimate_bytes: o.estimate_bytes,
                plain: o.plain,
            }),
            PageStreamIn::Data(b) => Msg::Data(b),
        };
        pb::PageStreamIn { msg: Some(msg) }
    }
}

impl TryFrom<pb::PageStreamIn> for crate::agent::direct::stream::PageStreamIn {
    type Error = InvalidRequest;
    fn try_from(m: pb::PageStreamIn) -> Result<Self, InvalidRequest> {
        use crate::agent::direct::stream::{PageStreamIn, PageStreamOpen};
        use pb::page_stream_in::Msg;
        match m.msg {
            Some(Msg::Open(o)) => Ok(PageStreamIn::Open(PageStreamOpen {
                job: job_id("open.job_id", &o.job_id)?,
                migration: mig_opt("open.migration_id", &o.migration_id)?
                    .ok_or_else(|| InvalidRequest::new("open.migration_id", "must not be empty"))?,
                from: node("open.from_node", &o.from_node)?,
                estimate_bytes: o.estimate_bytes,
                plain: o.plain,
            })),
            Some(Msg::Data(b)) => Ok(PageStreamIn::Data(b)),
            None => Err(InvalidRequest::new("msg", "must be set")),
        }
    }
}

impl From<crate::agent::direct::stream::PageStreamOut> for pb::PageStreamOut {
    fn from(m: crate::agent::direct::stream::PageStreamOut) -> Self {
        use crate::agent::direct::stream::PageStreamOut;
        use pb::page_stream_out::Msg;
        let msg = match m {
            PageStreamOut::Ready => Msg::Ready(true),
            PageStreamOut::Plain(p) => Msg::Plain(pb::PlainPageSocket {
                address: p.address.to_string(),
                token: p.token.to_vec(),
            }),
            PageStreamOut::Data(b) => Msg::Data(b),
            PageStreamOut::Done(d) => Msg::Done(pb::PageStreamDone {
                ok: d.ok,
                error: d.error,
                bytes: d.bytes,
            }),
        };
        pb::PageStreamOut { msg: Some(msg) }
    }
}

impl TryFrom<pb::PageStreamOut> for crate::agent::direct::stream::PageStreamOut {
    type Error = InvalidRequest;
    fn try_from(m: pb::PageStreamOut) -> Result<Self, InvalidRequest> {
        use crate::agent::direct::stream::{PageStreamDone, PageStreamOut, PlainPageSocket};
        use pb::page_stream_out::Msg;
        match m.msg {
            Some(Msg::Ready(_)) => Ok(PageStreamOut::Ready),
            Some(Msg::Plain(p)) => Ok(PageStreamOut::Plain(PlainPageSocket {
                address: p
                    .address
                    .parse()
                    .map_err(|_| InvalidRequest::new("plain.address", "must be ip:port"))?,
                token: <[u8; 32]>::try_from(&p.token[..])
                    .map_err(|_| InvalidRequest::new("plain.token", "must be 32 bytes"))?,
            })),
            Some(Msg::Data(b)) => Ok(PageStreamOut::Data(b)),
            Some(Msg::Done(d)) => Ok(PageStreamOut::Done(PageStreamDone {
                ok: d.ok,
                error: d.error,
                bytes: d.bytes,
            })),
            None => Err(InvalidRequest::new("msg", "must be set")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_page_socket_round_trips_and_a_bad_one_is_refused() {
        use crate::agent::direct::stream::{
            PageStreamIn, PageStreamOpen, PageStreamOut, PlainPageSocket,
        };
        let p = PageStreamOut::Plain(PlainPageSocket {
            address: "10.0.0.2:40123".parse().unwrap(),
            token: [9; 32],
        });
        assert_eq!(
            PageStreamOut::try_from(pb::PageStreamOut::from(p.clone())).unwrap(),
            p
        );
        let open = PageStreamIn::Open(PageStreamOpen {
            job: JobId::parse("j1").unwrap(),
            migration: MigrationId::parse("m1").unwrap(),
            from: NodeName::parse("node1").unwrap(),
            estimate_bytes: 5,
            plain: true,
        });
        assert_eq!(
            PageStreamIn::try_from(pb::PageStreamIn::from(open.clone())).unwrap(),
            open
        );
        let bad = |address: &str, token: Vec<u8>| pb::PageStreamOut {
            msg: Some(pb::page_stream_out::Msg::Plain(pb::PlainPageSocket {
                address: address.into(),
                token,
            })),
        };
        let e = PageStreamOut::try_from(bad("10.0.0.2", vec![9; 32])).unwrap_err();
        assert!(format!("{e:?}").contains("plain.address"), "{e:?}");
        let e = PageStreamOut::try_from(bad("10.0.0.2:1", vec![9; 31])).unwrap_err();
        assert!(format!("{e:?}").contains("plain.token"), "{e:?}");
    }

    #[test]
    fn bad_fields_are_invalid_argument_naming_the_field() {
        let e = AgentAction::try_from(pb::MigrateRequest {
            job_id: "../etc".into(),
            target_node: "node2".into(),
            migration_id: String::new(),
            mode: 0,
            only_here: false,
            force: false,
            leader_revision: 0,
        })
        .unwrap_err();
        assert_eq!(e.field, "job_id");
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);
        let e = AgentAction::try_from(pb::MigrateRequest {
            job_id: "j1".into(),
            target_node: "node2".into(),
            migration_id: String::new(),
            mode: 99,
            only_here: false,
            force: false,
            leader_revision: 0,
        })
        .unwrap_err();
        assert_eq!(e.field, "mode");
        let e = AgentAction::try_from(pb::SignalRequest {
            job_id: "j1".into(),
            signal: 0,
        })
        .unwrap_err();
        assert_eq!(e.field, "signal");
        let e = AgentAction::try_from(pb::GetJobRequest { selector: None }).unwrap_err();
        assert_eq!(e.field, "selector");
    }

    #[test]
    fn pre_copy_mode_and_its_outcome_cross_the_wire() {
        let a = AgentAction::try_from(pb::MigrateRequest {
            job_id: "j1".into(),
            target_node: "node2".into(),
            migration_id: String::new(),
            mode: pb::MigrationMode::PreCopy as i32,
            only_here: true,
            force: false,
            leader_revision: 0,
        })
        .unwrap();
        assert!(matches!(
            a,
            AgentAction::Migrate {
                mode: Mode::PreCopy,
                only_here: true,
                ..
            }
        ));
        let m = MigrationRecord {
            id: MigrationId::parse("m1").unwrap(),
            from: NodeName::parse("node1").unwrap(),
            to: NodeName::parse("node2").unwrap(),
            started_unix_ms: 1,
            frozen_ms: 2,
            total_ms: 3,
            ok: true,
            error: String::new(),
            image_bytes: 4,
            post_copy: false,
            pre_copy_rounds: 3,
            pre_copy_bytes: 5,
            fallback: "why not".into(),
            restored_from_checkpoint: 7,
        };
        let back = MigrationRecord::try_from(pb::Migration::from(&m)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_jobs_own_address_and_its_net_choice_cross_the_wire() {
        let mut rec = crate::core::registry::tests::sample("j1");
        rec.net = Some(crate::core::JobNet::new(
            "10.77.1.120".parse().unwrap(),
            24,
            "10.77.1.1".parse().unwrap(),
        ));
        let wire = pb::Job::from(&rec);
        assert_eq!(wire.address, "10.77.1.120");
        assert_eq!(wire.mac, "02:6d:0a:4d:01:78");
        assert_eq!(JobRecord::try_from(wire).unwrap().net, rec.net);
        rec.net = None;
        let wire = pb::Job::from(&rec);
        assert!(wire.address.is_empty());
        assert_eq!(JobRecord::try_from(wire).unwrap().net, None);
        let bad = pb::Job {
            address: "10.77.1.300".into(),
            ..pb::Job::from(&rec)
        };
        assert_eq!(JobRecord::try_from(bad).unwrap_err().field, "address");
        let launch = |net: &str| {
            AgentAction::try_from(pb::LaunchRequest {
                argv: vec!["true".into()],
                net: net.into(),
                ..Default::default()
            })
        };
        for (net, want) in [("", None), ("own", Some(true)), ("node", Some(false))] {
            match launch(net).unwrap() {
                AgentAction::Launch(r) => assert_eq!(r.own_net, want, "{net:?}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(launch("bridge").unwrap_err().field, "net");
    }

    #[test]
    fn restore_image_dir_is_derived_not_trusted() {
        let e = RestoreCall::try_from(pb::RestoreRequest {
            job_id: "j1".into(),
            migration_id: "m1".into(),
            image_dir: "../../etc".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "image_dir");
        let ok = RestoreCall::try_from(pb::RestoreRequest {
            job_id: "j1".into(),
            migration_id: "m1".into(),
            image_dir: "images/j1/m1".into(),
            page_server: "10.0.0.1:7100".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.page_server.unwrap().port, 7100);
    }

    #[test]
    fn pushed_chunks_are_validated() {
        use pb::image_chunk::Part;
        let file = |name: &str, offset: u64, size: u64, data: Vec<u8>| pb::ImageChunk {
            part: Some(Part::File(pb::FileData {
                name: name.into(),
                area: pb::FileArea::Image as i32,
                offset,
                data: data.into(),
                size,
                growing: false,
            })),
        };
        for bad in ["../x", "a/b", "..", ".hidden", "", "x\0y", "/etc/passwd"] {
            let e = PushPart::try_from(file(bad, 0, 1, vec![1])).unwrap_err();
            assert_eq!(e.field, "file.name", "{bad:?}");
        }
        let e = PushPart::try_from(file("a.img", 2, 3, vec![1, 2])).unwrap_err();
        assert_eq!(e.field, "file.offset");
        let e = PushPart::try_from(file("a.img", u64::MAX, u64::MAX, vec![1])).unwrap_err();
        assert_eq!(e.field, "file.offset");
        let e = PushPart::try_from(file("a.img", 0, 10 << 20, vec![0; MAX_CHUNK_BYTES + 1]))
            .unwrap_err();
        assert_eq!(e.field, "file.data");
        let mut c = file("a.img", 0, 1, vec![1]);
        if let Some(Part::File(f)) = c.part.as_mut() {
            f.area = 0;
        }
        assert_eq!(PushPart::try_from(c).unwrap_err().field, "file.area");
        assert_eq!(
            PushPart::try_from(pb::ImageChunk { part: None })
                .unwrap_err()
                .field,
            "part"
        );
        let begin = |job: &str, mig: &str| pb::ImageChunk {
            part: Some(Part::Begin(pb::PushBegin {
                job_id: job.into(),
                migration_id: mig.into(),
                from_node: "node1".into(),
                total_bytes: 1,
                record_json: vec![],
                early: false,
                pages_streamed: false,
            })),
        };
        assert_eq!(
            PushPart::try_from(begin("../j", "m1")).unwrap_err().field,
            "begin.job_id"
        );
        assert_eq!(
            PushPart::try_from(begin("j1", "")).unwrap_err().field,
            "begin.migration_id"
        );
        // A good chunk survives the round trip.
        let ok = PushPart::try_from(file("pages-1.img", 1, 3, vec![7, 8])).unwrap();
        assert_eq!(
            PushPart::try_from(pb::ImageChunk::from(ok.clone())).unwrap(),
            ok
        );
    }

    #[test]
    fn errors_round_trip_through_status() {
        for e in [
            AgentError::NotFound("x".into()),
            AgentError::PermissionDenied("x".into()),
            AgentError::Aborted("x".into()),
            AgentError::DataLoss("x".into()),
            AgentError::ResourceExhausted("x".into()),
        ] {
            assert_eq!(status_to_agent_error(agent_error_to_status(e.clone())), e);
        }
    }
}
