//! The push of a migration without a shared path: its messages
//! ([`PushBegin`], [`FileChunk`], [`PushEnd`]), the source's reader of a
//! sealed image directory ([`PushPlan`] → [`PlanReader`]) and the target's
//! [`PushReceiver`], which stages what arrives and keeps it only when the
//! stream ended with an end marker matching it. The protocol around it (who
//! restores, who rolls back) is in the parent module's doc.

use super::super::{image_rel, CLAIM_FILE};
use crate::agent::{io_error, AgentConfig, AgentError, AgentResult};
use crate::core::ids::PlainFileName;
use crate::core::job::MigrationPhase;
use crate::core::registry::Registry;
use crate::core::{JobId, JobRecord, JobState, MigrationId, NodeName};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest `data` of one chunk the receiver accepts.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// Chunks received but not yet written that a push may hold (4 MiB with the
/// sender's 1 MiB chunks).
pub(super) const WRITE_AHEAD_CHUNKS: usize = 4;
/// Chunk size the sender uses.
pub const SEND_CHUNK_BYTES: usize = 1 << 20;
/// Upper bound of one push, whatever the free space says.
pub const MAX_PUSH_BYTES: u64 = 1 << 40;
/// Most files in one push (a CRIU image directory has tens).
pub const MAX_PUSH_FILES: usize = 100_000;
/// Largest job record accepted (the registry's own limit).
pub const MAX_RECORD_JSON_BYTES: usize = 4 << 20;
/// Free space a push must leave on the target (registry writes, logs).
pub(super) const FREE_SPACE_MARGIN: u64 = 64 << 20;
/// Job output files that travel with the job.
pub(super) const OUTPUT_NAMES: &[&str] = &["stdout", "stderr"];
/// Names that are never image files: a pushed `CLAIM` would block the
/// target's own restore; CRIU creates the socket itself.
pub(super) const NOT_PUSHABLE: &[&str] = &[CLAIM_FILE, "lazy-pages.socket"];
/// Staging area of pushes being received, under the state dir.
pub(super) const INCOMING: &str = "incoming";

/// Which part of a job a pushed file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileArea {
    /// A file of the sealed image directory.
    Image,
    /// The job's `stdout` or `stderr` (see [`AgentConfig::jobs_dir`]).
    JobOutput,
}

/// First message of a push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushBegin {
    pub job: JobId,
    pub migration: MigrationId,
    pub from: NodeName,
    /// Bytes of all files to follow (an early push: the source's estimate).
    pub total_bytes: u64,
    /// The job's record, in the registry's JSON format.
    pub record_json: Vec<u8>,
    /// Opened when the dump started: page images come as growing chunks
    /// while CRIU writes them, and the sealed record comes with the end
    /// marker (see [`super::early`]).
    pub early: bool,
    /// The memory pages came before, over a page stream of the same
    /// migration (see [`super::stream`]): the receiver adds them to the
    /// images and seals the whole directory anew.
    pub pages_streamed: bool,
}

/// A piece of one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileChunk {
    pub name: PlainFileName,
    pub area: FileArea,
    pub offset: u64,
    /// Size of the whole file (0 for a growing one).
    pub size: u64,
    pub data: bytes::Bytes,
    /// A page image still being written (early pushes only): its size comes
    /// with the end marker.
    pub growing: bool,
}

/// Last message of a push: what the sender sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushEnd {
    pub files: u32,
    pub total_bytes: u64,
    /// An early push's sealed record (empty otherwise).
    pub record_json: Vec<u8>,
    /// An early push's growing files and their final sizes.
    pub grown: Vec<(PlainFileName, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PushPart {
    Begin(PushBegin),
    File(FileChunk),
    End(PushEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushSummary {
    pub files: u32,
    pub bytes: u64,
}

/// The target's answer to ResolveMigration.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Restored there; the job's record there, unless it has moved on.
    Landed(Option<Box<JobRecord>>),
    /// Not restored, and the target's copy is gone: it never will be.
    Abandoned,
}

/// One file the source will send.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    pub area: FileArea,
    pub name: PlainFileName,
    pub path: PathBuf,
    pub size: u64,
}

/// Everything one push sends.
#[derive(Debug, Clone)]
pub struct PushPlan {
    pub begin: PushBegin,
    pub files: Vec<PlannedFile>,
}

impl PushPlan {
    /// The stream's messages, reading each file in `chunk`-byte pieces as
    /// it goes (blocking I/O: run it on a blocking thread).
    pub fn into_parts(self, chunk: usize) -> PlanReader {
        PlanReader {
            begin: Some(self.begin),
            files: self.files.into_iter(),
            current: None,
            chunk: chunk.clamp(1, MAX_CHUNK_BYTES),
            sent_files: 0,
            sent_bytes: 0,
            finished: false,
        }
    }
}

struct Sending {
    plan: PlannedFile,
    file: File,
    offset: u64,
    first: bool,
}

/// Iterator over the messages of a [`PushPlan`].
pub struct PlanReader {
    begin: Option<PushBegin>,
    files: std::vec::IntoIter<PlannedFile>,
    current: Option<Sending>,
    chunk: usize,
    sent_files: u32,
    sent_bytes: u64,
    finished: bool,
}

impl Iterator for PlanReader {
    type Item = AgentResult<PushPart>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        if let Some(b) = self.begin.take() {
            return Some(Ok(PushPart::Begin(b)));
        }
        loop {
            if let Some(cur) = self.current.as_mut() {
                // An empty file is sent as one chunk without data.
                if cur.first || cur.offset < cur.plan.size {
                    cur.first = false;
                    let want = (cur.plan.size - cur.offset).min(self.chunk as u64) as usize;
                    // Read into fresh, unzeroed memory: the chunk's bytes
                    // are handed on, not copied again.
                    let mut data = Vec::with_capacity(want);
                    let got = (&mut cur.file).take(want as u64).read_to_end(&mut data);
                    let got = got.and_then(|n| {
                        if n == want {
                            Ok(())
                        } else {
                            Err(std::io::ErrorKind::UnexpectedEof.into())
                        }
                    });
                    if let Err(e) = got {
                        self.finished = true;
                        return Some(Err(io_error(
                            &format!(
                                "reading {} to send (did it shrink after sealing?)",
                                cur.plan.path.display()
                            ),
                            e,
                        )));
                    }
                    let chunk = FileChunk {
                        name: cur.plan.name.clone(),
                        area: cur.plan.area,
                        offset: cur.offset,
                        size: cur.plan.size,
                        data: data.into(),
                        growing: false,
                    };
                    cur.offset += want as u64;
                    self.sent_bytes += want as u64;
                    return Some(Ok(PushPart::File(chunk)));
                }
                self.current = None;
            }
            match self.files.next() {
                Some(plan) => match File::open(&plan.path) {
                    Ok(file) => {
                        self.sent_files += 1;
                        self.current = Some(Sending {
                            plan,
                            file,
                            offset: 0,
                            first: true,
                        });
                    }
                    Err(e) => {
                        self.finished = true;
                        return Some(Err(io_error(
                            &format!("opening {} to send", plan.path.display()),
                            e,
                        )));
                    }
                },
                None => {
                    self.finished = true;
                    return Some(Ok(PushPart::End(PushEnd {
                        files: self.sent_files,
                        total_bytes: self.sent_bytes,
                        ..Default::default()
                    })));
                }
            }
        }
    }
}

/// How much a node accepts in one push.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveLimits {
    pub max_bytes: u64,
    /// Free bytes on the state dir's file system (None: unknown).
    pub free_bytes: Option<u64>,
}

struct Receiving {
    area: FileArea,
    name: String,
    size: u64,
    written: u64,
    file: File,
}

impl Receiving {
    /// Append a chunk's bytes (checked by the caller).
    fn write(&mut self, data: &[u8]) -> AgentResult<()> {
        self.file
            .write_all(data)
            .map_err(|e| io_error(&format!("writing pushed image {}", self.name), e))?;
        self.written += data.len() as u64;
        Ok(())
    }
}

/// Check a pushed record against this node, the push and what this node
/// knows of the job (`existing`); the job must be migrating here in
/// `phase`. Returns the record and where this node keeps the job's output.
fn check_record(
    cfg: &AgentConfig,
    begin: &PushBegin,
    record_json: &[u8],
    existing: Option<&JobRecord>,
    phase: MigrationPhase,
) -> AgentResult<(JobRecord, PathBuf)> {
    let me = &cfg.node;
    let refuse = |why: String| {
        AgentError::FailedPrecondition(format!(
            "refusing the images of job {} (migration {}) from {}: {why}",
            begin.job, begin.migration, begin.from
        ))
    };
    if record_json.len() > MAX_RECORD_JSON_BYTES {
        return Err(AgentError::InvalidArgument(format!(
            "the pushed job record is larger than {MAX_RECORD_JSON_BYTES} bytes"
        )));
    }
    let record = crate::core::registry::parse_record(Path::new("pushed record"), record_json)
        .map_err(|e| {
            AgentError::InvalidArgument(format!("the pushed job record is not valid: {e}"))
        })?;
    if record.id != begin.job {
        return Err(AgentError::InvalidArgument(format!(
            "the pushed record is of job {}, the push of job {}",
            record.id, begin.job
        )));
    }
    let Some(p) = record.pending.as_ref() else {
        return Err(refuse("the job has no migration under way".into()));
    };
    if p.id != begin.migration {
        return Err(refuse(format!("the job's migration under way is {}", p.id)));
    }
    if p.to.as_ref() != Some(me) {
        return Err(refuse(format!(
            "the job is not migrating to this node ({me}) but to {}",
            p.to.as_ref()
                .map(|n| n.as_str())
                .unwrap_or("no node (a freeze)")
        )));
    }
    if p.from != begin.from || record.node != begin.from || p.from == *me {
        return Err(refuse(format!(
            "the job is on {} and leaving {}, not coming from {}",
            record.node, p.from, begin.from
        )));
    }
    if record.state != JobState::Migrating || p.phase != phase {
        return Err(refuse(format!(
            "the job is {} (phase {:?}), not migrating in phase {phase:?}",
            record.state.as_str(),
            p.phase
        )));
    }
    // CRIU reopens the job's output by path: it must be where this node
    // keeps job output, never a path chosen by the sender.
    let output_dir = cfg.jobs_dir.join(begin.job.as_str());
    for (name, path) in [
        ("stdout", &record.stdout_path),
        ("stderr", &record.stderr_path),
    ] {
        if Path::new(path) != output_dir.join(name) {
            return Err(refuse(format!(
                "its {name} is {path}, but {me} keeps job output in {}; without a shared path every node needs the same --jobs-dir",
                cfg.jobs_dir.display()
            )));
        }
    }
    if let Some(old) = existing {
        if old.node == *me && !old.state.is_finished() {
            return Err(refuse(format!(
                "the job is already recorded on this node, {}",
                old.state.as_str()
            )));
        }
        if old.generation >= record.generation {
            return Err(refuse(format!(
                "this node has a record of the job as new or newer (generation {} >= {}): a stale or replayed push",
                old.generation, record.generation
            )));
        }
    }
    Ok((record, output_dir))
}

pub(super) fn area_dir(a: FileArea) -> &'static str {
    match a {
        FileArea::Image => "images",
        FileArea::JobOutput => "output",
    }
}

/// The target's side of one push: validates every message and writes the
/// files into a staging directory; [`PushReceiver::complete`] moves them into
/// place. Dropped before that (bad input, a broken stream), it removes
/// everything it wrote.
pub struct PushReceiver {
    node: NodeName,
    /// For checking an early push's sealed record at its end.
    cfg: AgentConfig,
    existing: Option<JobRecord>,
    begin: PushBegin,
    record: JobRecord,
    /// Most bytes this push may bring: what a push that is not early
    /// announced; for an early one, what the limits and free space allow.
    cap: u64,
    require_manifest: bool,
    /// `<root>/incoming/<job>/<migration>`
    staging: PathBuf,
    /// `<root>/images/<job>/<migration>`
    images: PathBuf,
    /// `<jobs_dir>/<job>`
    output_dir: PathBuf,
    current: Option<Receiving>,
    /// An early push's page images still being written, by name.
    growing: BTreeMap<String, Receiving>,
    done: BTreeSet<(FileArea, String)>,
    received: u64,
}

impl PushReceiver {
    /// Check the push's first message against this node and what it already
    /// knows of the job (`existing`: its record here, if any).
    pub fn start(
        cfg: &AgentConfig,
        begin: PushBegin,
        existing: Option<&JobRecord>,
        limits: ReceiveLimits,
    ) -> AgentResult<Self> {
        let me = &cfg.node;
        if cfg.shared {
            return Err(AgentError::FailedPrecondition(format!(
                "{me} uses a shared path; images are not pushed to it"
            )));
        }
        // An early push starts while the job is being dumped; its sealed
        // record, checked the same way, comes with the end marker.
        let phase = if begin.early {
            MigrationPhase::Dumping
        } else {
            MigrationPhase::Dumped
        };
        let (record, output_dir) = check_record(cfg, &begin, &begin.record_json, existing, phase)?;
        if begin.total_bytes > limits.max_bytes {
            return Err(AgentError::ResourceExhausted(format!(
                "images of job {} are {} bytes, more than the {} a push may carry",
                begin.job, begin.total_bytes, limits.max_bytes
            )));
        }
        if let Some(free) = limits.free_bytes {
            if begin.total_bytes.saturating_add(FREE_SPACE_MARGIN) > free {
                return Err(AgentError::ResourceExhausted(format!(
                    "{me} has {free} bytes free in {}, not enough for the {} bytes of images of job {}",
                    cfg.shared_root.display(),
                    begin.total_bytes,
                    begin.job
                )));
            }
        }
        let staging = cfg
            .shared_root
            .join(INCOMING)
            .join(begin.job.as_str())
            .join(begin.migration.as_str());
        // Left over from an interrupted earlier attempt.
        remove_dir_if_any(&staging).map_err(|e| io_error("clearing the push staging dir", e))?;
        // In block groups of its own, as a dump's dir: the pushed files are
        // created while the job is frozen.
        crate::criu::create_image_dir(&staging)
            .map_err(|e| io_error("creating the push staging dir", e))?;
        for a in [FileArea::Image, FileArea::JobOutput] {
            fs::create_dir_all(staging.join(area_dir(a)))
                .map_err(|e| io_error("creating the push staging dir", e))?;
        }
        let images = cfg
            .shared_root
            .join(image_rel(&begin.job, &begin.migration));
        let cap = if begin.early {
            let free = limits
                .free_bytes
                .map_or(u64::MAX, |f| f.saturating_sub(FREE_SPACE_MARGIN));
            limits.max_bytes.min(free)
        } else {
            begin.total_bytes
        };
        Ok(Self {
            node: me.clone(),
            cfg: cfg.clone(),
            existing: existing.cloned(),
            require_manifest: cfg.image_key.is_some(),
            begin,
            record,
            cap,
            staging,
            images,
            output_dir,
            current: None,
            growing: BTreeMap::new(),
            done: BTreeSet::new(),
            received: 0,
        })
    }

    fn bad(&self, why: String) -> AgentError {
        AgentError::InvalidArgument(format!(
            "push of job {} (migration {}) from {}: {why}; nothing was kept",
            self.begin.job, self.begin.migration, self.begin.from
        ))
    }

    /// Write one chunk.
    pub fn accept(&mut self, c: FileChunk) -> AgentResult<()> {
        if c.growing {
            return self.accept_growing(c);
        }
        let name = c.name.as_str().to_string();
        if self.growing.contains_key(&name) && c.area == FileArea::Image {
            return Err(self.bad(format!("{name} was sent both growing and whole")));
        }
        match c.area {
            FileArea::Image if NOT_PUSHABLE.contains(&name.as_str()) => {
                return Err(self.bad(format!("{name:?} is not an image file")));
            }
            FileArea::JobOutput if !OUTPUT_NAMES.contains(&name.as_str()) => {
                return Err(self.bad(format!(
                    "job output may only be stdout or stderr, not {name:?}"
                )));
            }
            _ => {}
        }
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(self.bad(format!(
                "a chunk of {name} has {} bytes, more than {MAX_CHUNK_BYTES}",
                c.data.len()
            )));
        }
        let same_file = self
            .current
            .as_ref()
            .is_some_and(|f| f.area == c.area && f.name == name);
        if !same_file {
            self.close_current()?;
            if self.done.contains(&(c.area, name.clone())) {
                return Err(self.bad(format!("{name} was sent twice")));
            }
            let file = self.new_file(c.area, &name, c.offset)?;
            self.current = Some(Receiving {
                area: c.area,
                name: name.clone(),
                size: c.size,
                written: 0,
                file,
            });
        }
        let announced = self.cap;
        let received = self.received;
        let Some(cur) = self.current.as_mut() else {
            return Err(AgentError::Internal("push receiver lost its file".into()));
        };
        let len = c.data.len() as u64;
        let why = if c.size != cur.size {
            Some(format!(
                "the size of {name} changed from {} to {} mid-file",
                cur.size, c.size
            ))
        } else if c.offset != cur.written {
            Some(format!(
                "a chunk of {name} is at offset {}, expected {} (chunks come in order, without gaps)",
                c.offset, cur.written
            ))
        } else if cur.written.saturating_add(len) > cur.size {
            Some(format!(
                "{name} is longer than its size of {} bytes",
                cur.size
            ))
        } else if received.saturating_add(len) > announced {
            Some(format!(
                "more bytes than the {announced} announced or room for"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(self.bad(why));
        }
        cur.write(&c.data)?;
        self.received += len;
        Ok(())
    }

    /// Create the staged file a file's first chunk (at `offset`) starts.
    fn new_file(&self, area: FileArea, name: &str, offset: u64) -> AgentResult<File> {
        if offset != 0 {
            return Err(self.bad(format!("{name} starts at offset {offset}, not 0")));
        }
        if self.done.len() + self.growing.len() >= MAX_PUSH_FILES {
            return Err(self.bad(format!("more than {MAX_PUSH_FILES} files")));
        }
        let path = self.staging.join(area_dir(area)).join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&format!("creating {}", path.display()), e))
    }

    /// Write one chunk of a page image CRIU is still writing (an early
    /// push): chunks of each such file come in order, possibly interleaved
    /// with other growing files', and its size comes with the end marker.
    fn accept_growing(&mut self, c: FileChunk) -> AgentResult<()> {
        let name = c.name.as_str().to_string();
        if !self.begin.early {
            return Err(self.bad(format!(
                "{name} was sent growing in a push that is not early"
            )));
        }
        if c.area != FileArea::Image || !crate::security::follow::is_page_image(&name) {
            return Err(self.bad(format!(
                "only page images may be sent while they grow, not {name}"
            )));
        }
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(self.bad(format!(
                "a chunk of {name} has {} bytes, more than {MAX_CHUNK_BYTES}",
                c.data.len()
            )));
        }
        let whole = self.current.as_ref().is_some_and(|f| f.name == name)
            || self.done.contains(&(FileArea::Image, name.clone()));
        if whole {
            return Err(self.bad(format!("{name} was sent both growing and whole")));
        }
        let len = c.data.len() as u64;
        if self.received.saturating_add(len) > self.cap {
            return Err(self.bad(format!(
                "more bytes than the {} this node has room for",
                self.cap
            )));
        }
        if !self.growing.contains_key(&name) {
            let file = self.new_file(FileArea::Image, &name, c.offset)?;
            self.growing.insert(
                name.clone(),
                Receiving {
                    area: FileArea::Image,
                    name: name.clone(),
                    size: 0,
                    written: 0,
                    file,
                },
            );
        }
        let written = self.growing.get(&name).map_or(0, |f| f.written);
        if c.offset != written {
            return Err(self.bad(format!(
                "a chunk of {name} is at offset {}, expected {written} (chunks come in order, without gaps)",
                c.offset
            )));
        }
        let Some(cur) = self.growing.get_mut(&name) else {
            return Err(AgentError::Internal("push receiver lost its file".into()));
        };
        cur.write(&c.data)?;
        self.received += len;
        Ok(())
    }

    /// An early push's end: the growing files' final sizes and the sealed
    /// record, checked as a begin's record is in a push that is not early.
    fn settle_early(&mut self, end: &PushEnd) -> AgentResult<()> {
        if !self.begin.early {
            if !end.grown.is_empty() || !end.record_json.is_empty() {
                return Err(self.bad(
                    "its end marker carries an early push's fields in a push that is not early"
                        .into(),
                ));
            }
            return Ok(());
        }
        for (name, size) in &end.grown {
            let Some(f) = self.growing.remove(name.as_str()) else {
                return Err(self.bad(format!(
                    "the end marker gives {name} a final size, but it was not sent growing"
                )));
            };
            if f.written != *size {
                return Err(self.bad(format!(
                    "{name} ended after {} of its {size} bytes",
                    f.written
                )));
            }
            self.done.insert((FileArea::Image, f.name));
        }
        if let Some(name) = self.growing.keys().next() {
            return Err(self.bad(format!(
                "{name} was sent growing, but the end marker gives no final size for it"
            )));
        }
        let (record, _) = check_record(
            &self.cfg,
            &self.begin,
            &end.record_json,
            self.existing.as_ref(),
            MigrationPhase::Dumped,
        )
        .map_err(|e| e.context("the sealed record at the end of an early push"))?;
        self.record = record;
        Ok(())
    }

    fn close_current(&mut self) -> AgentResult<()> {
        if let Some(cur) = self.current.take() {
            if cur.written != cur.size {
                return Err(self.bad(format!(
                    "{} ended after {} of its {} bytes",
                    cur.name, cur.written, cur.size
                )));
            }
            self.done.insert((cur.area, cur.name));
        }
        Ok(())
    }

    /// The end marker arrived: check it against what arrived, then move the
    /// images into `images/<job>/<migration>`, the job's output into its
    /// output directory, and the record into `registry`.
    ///
    /// Nothing here is fsynced: the source keeps its own copy until the job
    /// runs here, so a crash of this node loses nothing.
    pub fn complete(
        mut self,
        end: PushEnd,
        registry: &Registry,
        streamed: Option<super::stream::StreamedPages>,
    ) -> AgentResult<PushSummary> {
        self.close_current()?;
        self.settle_early(&end)?;
        let files = self.done.len();
        if end.files as usize != files || end.total_bytes != self.received {
            return Err(self.bad(format!(
                "the sender sent {} files and {} bytes, {files} files and {} bytes arrived",
                end.files, end.total_bytes, self.received
            )));
        }
        if !self.begin.early && self.received != self.begin.total_bytes {
            return Err(self.bad(format!(
                "{} bytes were announced, {} arrived",
                self.begin.total_bytes, self.received
            )));
        }
        let manifest = crate::security::manifest::MANIFEST_FILE_NAME.to_string();
        if self.require_manifest && !self.done.contains(&(FileArea::Image, manifest)) {
            return Err(AgentError::DataLoss(format!(
                "images of job {} from {} have no manifest; refused",
                self.begin.job, self.begin.from
            )));
        }
        if self.images.join(CLAIM_FILE).exists() {
            return Err(AgentError::FailedPrecondition(format!(
                "images of migration {} are already claimed on {}: a restore of them is under way or done",
                self.begin.migration, self.node
            )));
        }
        // A complete copy from an earlier attempt of the same migration.
        remove_dir_if_any(&self.images).map_err(|e| io_error("replacing old images", e))?;
        if let Some(parent) = self.images.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error("creating the image dir", e))?;
        }
        let staged = self.staging.join(area_dir(FileArea::Image));
        if let Some(pages) = streamed {
            self.add_streamed_pages(&staged, pages)?;
        }
        fs::rename(&staged, &self.images)
            .map_err(|e| io_error("moving pushed images into place", e))?;
        let placed = self.place_outputs().and_then(|()| {
            let mut rec = self.record.clone();
            registry.put(&mut rec).map_err(AgentError::from)
        });
        if let Err(e) = placed {
            // Images without a record could never be restored; keep nothing.
            let _ = fs::remove_dir_all(&self.images);
            return Err(e.context(&format!("storing the images of job {}", self.begin.job)));
        }
        Ok(PushSummary {
            files: files as u32,
            bytes: self.received,
        })
    }

    /// A push whose pages were streamed: check the source's manifest of
    /// what it pushed, add the pages, and seal the whole directory anew with
    /// the cluster key, using the digests taken while the pages were written.
    /// Without a key (no manifests in this cluster) the pages are only added.
    fn add_streamed_pages(
        &self,
        staged: &Path,
        pages: super::stream::StreamedPages,
    ) -> AgentResult<()> {
        use crate::security::manifest;
        let (job, mig) = (self.begin.job.as_str(), self.begin.migration.as_str());
        if let Some(key) = &self.cfg.image_key {
            manifest::verify_manifest(staged, key, job, super::super::UNSEALED).map_err(|e| {
                AgentError::DataLoss(format!(
                    "images of job {job} from {}: {e}; refused",
                    self.begin.from
                ))
            })?;
        }
        let rd = fs::read_dir(&pages.dir).map_err(|e| io_error("listing the streamed pages", e))?;
        for e in rd {
            let e = e.map_err(|e| io_error("listing the streamed pages", e))?;
            let dest = staged.join(e.file_name());
            if dest.exists() {
                return Err(self.bad(format!(
                    "{:?} came both in the push and over the page stream",
                    e.file_name()
                )));
            }
            fs::rename(e.path(), &dest).map_err(|e| io_error("adding the streamed pages", e))?;
        }
        if let Some(key) = &self.cfg.image_key {
            manifest::write_manifest_with(
                staged,
                key,
                job,
                mig,
                super::super::UNSEALED,
                &pages.hashes,
                false,
            )
            .map_err(|e| AgentError::Internal(format!("sealing the received images: {e}")))?;
        }
        Ok(())
    }

    /// The job's output dir (its init's cwd) must exist; its files replace
    /// ours unless they are the same bytes already (on a one-machine test
    /// cluster they are the very same file).
    fn place_outputs(&self) -> AgentResult<()> {
        fs::create_dir_all(&self.output_dir)
            .map_err(|e| io_error("creating the job's output dir", e))?;
        for (area, name) in &self.done {
            if *area != FileArea::JobOutput {
                continue;
            }
            let staged = self.staging.join(area_dir(*area)).join(name);
            let dest = self.output_dir.join(name);
            place_output(&staged, &dest, self.record.uid, self.record.gid)
                .map_err(|e| io_error(&format!("placing the job's {name}"), e))?;
        }
        Ok(())
    }
}

impl Drop for PushReceiver {
    fn drop(&mut self) {
        // Whatever is still staged was not taken: a refused or broken push,
        // or the leftovers of a completed one.
        let _ = fs::remove_dir_all(&self.staging);
        if let Some(parent) = self.staging.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

pub(super) fn remove_dir_if_any(p: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(super) fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (ma, mb) = match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return Ok(false),
    };
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

pub(super) fn place_output(staged: &Path, dest: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    if same_content(staged, dest)? {
        return Ok(());
    }
    // The job writes its own output: it must own the file (as at launch).
    let _ = std::os::unix::fs::chown(staged, Some(uid), Some(gid));
    match fs::rename(staged, dest) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // --jobs-dir on another file system than the state dir.
            let dir = dest.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!(
                ".{}.push.tmp",
                dest.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("output")
            ));
            fs::copy(staged, &tmp)?;
            let _ = std::os::unix::fs::chown(&tmp, Some(uid), Some(gid));
            fs::rename(&tmp, dest)
        }
        r => r,
    }
}

pub(super) fn free_bytes(p: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(p)
        .ok()
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
}
