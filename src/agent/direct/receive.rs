//! The target's half of a move without a shared path (see the parent
//! module): receive a push into staging, restore it when the source asks,
//! and answer `ResolveMigration` from what happened here (the `landed`
//! markers).

use super::push::{
    free_bytes, remove_dir_if_any, FileChunk, PushPart, PushReceiver, PushSummary, ReceiveLimits,
    Resolution, INCOMING, MAX_PUSH_BYTES, WRITE_AHEAD_CHUNKS,
};
use super::{image_rel, remove_images_in_background, RestoreCall};
use crate::agent::{io_error, Agent, AgentError, AgentResult};
use crate::core::registry::RegistryError;
use crate::core::{JobId, JobRecord, JobState, MigrationId};
use futures::{Stream, StreamExt};
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `landed/<job>/<migration>`: migrations restored here (see module doc).
const LANDED: &str = "landed";

impl Agent {
    pub(super) fn landed_marker(&self, job: &JobId, mig: &MigrationId) -> PathBuf {
        self.cfg
            .shared_root
            .join(LANDED)
            .join(job.as_str())
            .join(mig.as_str())
    }

    pub(super) fn mark_landed(&self, job: &JobId, mig: &MigrationId) {
        let m = self.landed_marker(job, mig);
        let r = m
            .parent()
            .map(fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|()| File::create(&m).map(|_| ()));
        if let Err(e) = r {
            tracing::error!(job = %job, "cannot record that migration {mig} landed here: {e}");
        }
    }

    /// PushImages: receive one migration's images (see [`PushReceiver`]).
    pub async fn receive_push<S>(self: &Arc<Self>, mut parts: S) -> AgentResult<PushSummary>
    where
        S: Stream<Item = AgentResult<PushPart>> + Send + Unpin,
    {
        if self.cfg.shared {
            return Err(AgentError::FailedPrecondition(format!(
                "{} uses a shared path; images are not pushed to it",
                self.cfg.node
            )));
        }
        self.check_not_blocked()?;
        let begin = match parts.next().await {
            Some(Ok(PushPart::Begin(b))) => b,
            Some(Ok(_)) => {
                return Err(AgentError::InvalidArgument(
                    "a push must start with its begin message".into(),
                ))
            }
            Some(Err(e)) => return Err(e),
            None => return Err(AgentError::InvalidArgument("empty push".into())),
        };
        let (job, from) = (begin.job.clone(), begin.from.clone());
        let _busy = self.claim(&job)?;
        // Whatever arrived for this migration before is replaced.
        self.hashed_on_arrival.forget(&job, &begin.migration);
        let mig = begin.migration.clone();
        // The pages came first, over a page stream (see [`super::stream`]).
        let streamed = if begin.pages_streamed {
            Some(self.streamed_pages.take(&job, &begin.migration).ok_or_else(|| {
                AgentError::FailedPrecondition(format!(
                    "push of job {job} from {from}: its pages were streamed, but {} holds no pages of migration {} (it restarted since, or they expired); nothing was kept",
                    self.cfg.node, begin.migration
                ))
            })?)
        } else {
            None
        };
        let existing = match self.registry.get(&job) {
            Ok(r) => Some(r),
            Err(RegistryError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let limits = ReceiveLimits {
            max_bytes: MAX_PUSH_BYTES,
            free_bytes: free_bytes(&self.cfg.shared_root),
        };
        let cfg = self.cfg.clone();
        let t0 = Instant::now();
        let rx =
            Self::blocking(move || PushReceiver::start(&cfg, begin, existing.as_ref(), limits))
                .await??;
        // Chunks are written on a thread of their own, a few behind the
        // network, so that writing one (the page cache copy is the largest
        // cost of a push) overlaps receiving and decrypting the next. The
        // writer hands the receiver back when the channel closes, or stops at
        // the first bad chunk with its error.
        let (tx, mut chunks) = tokio::sync::mpsc::channel::<FileChunk>(WRITE_AHEAD_CHUNKS);
        let writer = tokio::task::spawn_blocking(move || -> AgentResult<PushReceiver> {
            let mut rx = rx;
            while let Some(c) = chunks.blocking_recv() {
                rx.accept(c)?;
            }
            Ok(rx)
        });
        // Feed the writer until the end marker, or say why the push stops
        // early.
        let fed = async {
            loop {
                let part = match parts.next().await {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        return Err(e.context(&format!(
                            "receiving the images of job {job} from {from}; nothing was kept"
                        )))
                    }
                    None => {
                        return Err(AgentError::Aborted(format!(
                            "the images of job {job} from {from} ended before their end marker (the source stopped or the connection broke); nothing was kept"
                        )))
                    }
                };
                match part {
                    PushPart::File(c) => {
                        if tx.send(c).await.is_err() {
                            // The writer stopped at a bad chunk: it says why.
                            return Err(AgentError::Internal(
                                "the image writer stopped without saying why; nothing was kept"
                                    .into(),
                            ));
                        }
                    }
                    PushPart::Begin(_) => {
                        return Err(AgentError::InvalidArgument(format!(
                            "push of job {job}: a second begin message; nothing was kept"
                        )))
                    }
                    PushPart::End(end) => return Ok(end),
                }
            }
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| AgentError::Internal(format!("image writer failed: {e}")))?;
        // A bad chunk the writer refused came before whatever ended the
        // stream, so its error is the answer. A receiver dropped here
        // removes what it wrote.
        match (fed, written) {
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Ok(end), Ok(rx)) => {
                let registry = self.registry.clone();
                let was_streamed = streamed.is_some();
                let summary =
                    Self::blocking(move || rx.complete(end, &registry, streamed)).await??;
                if was_streamed {
                    self.hashed_on_arrival.insert(&job, &mig);
                }
                tracing::info!(
                    job = %job,
                    from = %from,
                    files = summary.files,
                    bytes = summary.bytes,
                    ms = t0.elapsed().as_millis() as u64,
                    "images received"
                );
                Ok(summary)
            }
        }
    }

    /// Restore RPC without a shared path: restore from the pushed copy and
    /// remember that it landed (see [`Agent::resolve_migration`]).
    pub(crate) async fn restore_pushed(
        self: &Arc<Self>,
        call: RestoreCall,
    ) -> AgentResult<JobRecord> {
        let (job, mig) = (call.job.clone(), call.migration.clone());
        if self.landed_marker(&job, &mig).exists() {
            return match self.registry.get(&job) {
                Ok(r) if r.node == self.cfg.node => Ok(r),
                _ => Err(AgentError::FailedPrecondition(format!(
                    "migration {mig} of job {job} was restored on {} earlier and the job has moved on since",
                    self.cfg.node
                ))),
            };
        }
        let post_copy = call.page_server.is_some();
        let rec = self.restore(call).await?;
        self.mark_landed(&job, &mig);
        let dir = self.image_dir(&image_rel(&job, &mig));
        if post_copy {
            // CRIU's lazy-pages daemon reads these until every page arrived.
            self.remove_images_after_lazy(job, dir);
        } else {
            // The job runs from memory now; nothing reads the images again.
            remove_images_in_background(dir);
        }
        Ok(rec)
    }

    /// Post-copy, target side: once the lazy-pages daemon has ended (its
    /// watcher removes the socket), drop our copy of the images, unless the
    /// transfer failed: the job's error then points at the daemon's log here.
    fn remove_images_after_lazy(self: &Arc<Self>, job: JobId, dir: PathBuf) {
        let agent = self.clone();
        let _ = std::thread::Builder::new()
            .name("rm-images".into())
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(3600);
                while dir.join("lazy-pages.socket").exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(500));
                }
                // The watcher removes the socket first, then records a
                // failure: give it time to.
                std::thread::sleep(Duration::from_secs(3));
                let failed = agent
                    .registry
                    .get(&job)
                    .is_ok_and(|r| r.state == JobState::Failed);
                if !failed {
                    let _ = fs::remove_dir_all(&dir);
                }
            });
    }

    /// ResolveMigration: did the migration land here? If not, drop our copy
    /// of it, so it never will. Runs under the job's lock, so it waits for
    /// (fails while) a push or restore of the job is under way.
    pub(crate) async fn resolve_migration(
        self: &Arc<Self>,
        job: &JobId,
        mig: &MigrationId,
    ) -> AgentResult<Resolution> {
        if self.cfg.shared {
            return Err(AgentError::FailedPrecondition(format!(
                "{} uses a shared path: migrations to it are settled through the shared registry",
                self.cfg.node
            )));
        }
        let _busy = self.claim(job)?;
        let me = self.cfg.node.clone();
        let rec = match self.registry.get(job) {
            Ok(r) => Some(r),
            Err(RegistryError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let pending_here = |r: &JobRecord| {
            r.pending
                .as_ref()
                .is_some_and(|p| p.id == *mig && p.to.as_ref() == Some(&me))
        };
        let in_history = rec
            .as_ref()
            .is_some_and(|r| r.history.iter().any(|m| m.id == *mig && m.to == me && m.ok));
        // Restored, but recording it failed: the process is ours.
        let running_unrecorded =
            rec.as_ref().is_some_and(pending_here) && self.local_pid(job).is_some();
        let dir = self.image_dir(&image_rel(job, mig));
        if self.landed_marker(job, mig).exists() || in_history || running_unrecorded {
            self.mark_landed(job, mig);
            let mut rec = rec;
            if running_unrecorded {
                if let (Some(r), Some(pid)) = (rec.as_mut(), self.local_pid(job)) {
                    r.node = me.clone();
                    r.state = JobState::Running;
                    r.pid = pid;
                    r.pending = None;
                    r.error.clear();
                    let _ = self.registry.put(r);
                }
            }
            // Nothing reads the images any more, unless a lazy-pages daemon
            // still runs (it removes its socket when it ends; then
            // `remove_images_after_lazy` takes care of them).
            if !dir.join("lazy-pages.socket").exists() {
                let _ = fs::remove_dir_all(&dir);
            }
            let here = rec.filter(|r| r.node == me).map(Box::new);
            return Ok(Resolution::Landed(here));
        }
        // Not restored here: make sure it never will be. The record first:
        // without it a Restore of these images is refused.
        if let Some(r) = rec.as_ref() {
            if pending_here(r) && r.node != me {
                self.registry.remove(job)?;
            }
        }
        remove_dir_if_any(&dir).map_err(|e| io_error("dropping pushed images", e))?;
        let staging = self
            .cfg
            .shared_root
            .join(INCOMING)
            .join(job.as_str())
            .join(mig.as_str());
        let _ = remove_dir_if_any(&staging);
        tracing::info!(job = %job, migration = %mig, "pushed images dropped: the source keeps the job");
        Ok(Resolution::Abandoned)
    }
}
