//! The early push: memory pages leave for the target while CRIU writes them.
//!
//! Why: a full copy without a shared path used to dump, seal and only then
//! push every byte. At 1 GiB on this project's 2-core test machine the
//! push (~1.1 s) came after the dump (~0.6 s) instead of beside it, and the
//! job was frozen for both.
//!
//! How, on the source:
//! 1. When the job's record says `dumping`, just before CRIU starts, the
//!    source opens the push with an *early* begin ([`PushBegin::early`]):
//!    the record in phase `dumping`, and an estimate of the bytes to come
//!    (the tree's resident memory) for the target's free-space check.
//! 2. A thread follows the page images as CRIU appends to them, as
//!    [`crate::security::follow`] does to hash them, and sends what is new
//!    as *growing* chunks ([`FileChunk::growing`]), a megabyte at a time.
//! 3. After the dump and the seal (`EarlyPush::finish`), the thread
//!    sends the page images' tails; then the other files go, and the end
//!    marker with the sealed record (phase `dumped`) and each page image's
//!    final size, which must be what the seal saw.
//!
//! Safety is the push's own (see the parent module): the source keeps its
//! complete sealed copy until the target says the job runs there, and the
//! target restores only when asked, after verifying the manifest. Bytes
//! that changed behind the follower would fail that verification: a
//! migration that rolls back, never a corrupt restore.
//!
//! Anything wrong with the early stream (a target that does not know early
//! pushes, a follower that lost a file, a size that does not match the
//! seal) drops it, and the target keeps nothing; the usual push then runs
//! from the sealed images, as before this existed.

use super::push::{
    FileArea, FileChunk, PushBegin, PushEnd, PushPart, PushPlan, PushSummary, SEND_CHUNK_BYTES,
};
use crate::agent::peers::Peers;
use crate::agent::{AgentError, AgentResult};
use crate::core::ids::PlainFileName;
use crate::core::{JobRecord, MigrationId, NodeName};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages queued between the readers and the network.
const QUEUE: usize = 4;

/// What the follower sent of each page image: bytes, by name.
type Sent = BTreeMap<String, u64>;

/// An open early push (see the module doc).
pub(crate) struct EarlyPush {
    /// Taken by `finish`; dropped, with the follower's, it ends the stream.
    tx: Option<mpsc::Sender<PushPart>>,
    call: Option<tokio::task::JoinHandle<AgentResult<PushSummary>>>,
    stop: Arc<AtomicBool>,
    follower: Option<std::thread::JoinHandle<Result<Sent, String>>>,
}

impl EarlyPush {
    /// Open the early push of `rec` (phase `dumping`) to `target`, and
    /// start following the page images in `dir`. Must run inside the
    /// agent's runtime (the call is a task of its own).
    pub(crate) fn start(
        peers: Arc<dyn Peers>,
        target: NodeName,
        rec: &JobRecord,
        mig: &MigrationId,
        from: NodeName,
        dir: &Path,
        estimate: u64,
    ) -> AgentResult<Self> {
        let record_json = serde_json::to_vec(rec)
            .map_err(|e| AgentError::Internal(format!("encoding the job record: {e}")))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let begin = PushBegin {
            job: rec.id.clone(),
            migration: mig.clone(),
            from,
            total_bytes: estimate,
            record_json,
            early: true,
            pages_streamed: false,
        };
        tx.try_send(PushPart::Begin(begin))
            .map_err(|_| AgentError::Internal("the early push's queue refused its begin".into()))?;
        let call = tokio::spawn(async move { peers.push_images(&target, rx).await });
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, t) = (dir.to_path_buf(), stop.clone(), tx.clone());
        let follower = std::thread::Builder::new()
            .name("push-follow".into())
            .spawn(move || follow(&d, &s, &t))
            .map_err(|e| AgentError::Internal(format!("starting the early push: {e}")));
        let follower = match follower {
            Ok(f) => f,
            Err(e) => {
                call.abort();
                return Err(e);
            }
        };
        Ok(Self {
            tx: Some(tx),
            call: Some(call),
            stop,
            follower: Some(follower),
        })
    }

    /// The dump is done and sealed: send the page images' tails, the
    /// other files of `plan` and the end marker with `plan`'s (sealed)
    /// record; return the target's answer. An error means this stream is
    /// over and the target kept nothing: push again the usual way.
    pub(crate) async fn finish(mut self, plan: PushPlan) -> AgentResult<PushSummary> {
        self.stop.store(true, Ordering::Release);
        let follower = self.follower.take();
        let sent = tokio::task::spawn_blocking(move || match follower {
            Some(f) => {
                f.thread().unpark();
                f.join()
                    .unwrap_or_else(|_| Err("the early push's follower panicked".into()))
            }
            None => Err("no follower".into()),
        })
        .await
        .map_err(|e| AgentError::Internal(format!("early push follower: {e}")))?;
        let (Some(tx), Some(call)) = (self.tx.take(), self.call.take()) else {
            return Err(AgentError::Internal(
                "the early push was finished twice".into(),
            ));
        };
        let rest = match sent {
            Ok(sent) => rest_of(plan, sent),
            Err(why) => Err(why),
        };
        match rest {
            Ok((plan, end)) => {
                let fed = tokio::task::spawn_blocking(move || feed(plan, end, tx))
                    .await
                    .map_err(|e| AgentError::Internal(format!("early push reader: {e}")))?;
                let answer = call
                    .await
                    .map_err(|e| AgentError::Internal(format!("early push call: {e}")))?;
                fed.map_err(AgentError::Internal)?;
                answer
            }
            Err(why) => {
                // Closing the stream without its end marker: the target
                // drops what it has. Wait for that, so that the usual push
                // that follows does not find the job busy there.
                drop(tx);
                let _ = call.await;
                Err(AgentError::Internal(why))
            }
        }
    }
}

impl Drop for EarlyPush {
    fn drop(&mut self) {
        // A dump that failed: the follower must not follow forever, and the
        // stream ends without its end marker (the target keeps nothing).
        // Aborting the call also frees a follower blocked on a full queue.
        self.stop.store(true, Ordering::Release);
        if let Some(call) = self.call.take() {
            call.abort();
        }
    }
}

/// What is left to send after the follower: `plan` without the page images
/// it sent whole (each must be exactly the size the seal saw), and the end
/// marker's grown files. A page image the follower never saw goes whole.
fn rest_of(mut plan: PushPlan, mut sent: Sent) -> Result<(PushPlan, PushEnd), String> {
    let mut grown = Vec::new();
    let mut rest = Vec::new();
    for f in std::mem::take(&mut plan.files) {
        let name = f.name.as_str();
        match sent.remove(name) {
            // Nothing of it was sent (the target has no such file): whole.
            Some(0) if f.area == FileArea::Image => rest.push(f),
            Some(n) if f.area == FileArea::Image && n == f.size => grown.push((f.name.clone(), n)),
            Some(n) => {
                return Err(format!(
                    "the early push sent {n} bytes of {name}, which the seal found {} bytes long",
                    f.size
                ))
            }
            None => rest.push(f),
        }
    }
    if let Some(name) = sent.keys().next() {
        return Err(format!(
            "the early push sent {name}, which is not among the sealed images"
        ));
    }
    plan.files = rest;
    let end = PushEnd {
        files: grown.len() as u32,
        total_bytes: grown.iter().map(|(_, n)| n).sum(),
        record_json: std::mem::take(&mut plan.begin.record_json),
        grown,
    };
    Ok((plan, end))
}

/// Send the files of `plan` whole, then `end` with the plan's counts added.
fn feed(plan: PushPlan, mut end: PushEnd, tx: mpsc::Sender<PushPart>) -> Result<(), String> {
    for part in plan.into_parts(SEND_CHUNK_BYTES) {
        let part = match part.map_err(|e| e.to_string())? {
            PushPart::Begin(_) => continue,
            PushPart::End(e) => {
                end.files += e.files;
                end.total_bytes += e.total_bytes;
                PushPart::End(std::mem::take(&mut end))
            }
            f => f,
        };
        if tx.blocking_send(part).is_err() {
            // The call ended (the target refused): its answer says why.
            break;
        }
    }
    Ok(())
}

struct Followed {
    name: PlainFileName,
    file: File,
    offset: u64,
}

/// Send what CRIU appends to the page images in `dir`, until `stop`; then
/// one last pass to the end of every file. Returns the bytes sent of each.
fn follow(dir: &Path, stop: &AtomicBool, tx: &mpsc::Sender<PushPart>) -> Result<Sent, String> {
    let mut files: BTreeMap<String, Followed> = BTreeMap::new();
    loop {
        // Read the flag before the pass: a pass that starts after the dump
        // finished sees every byte, so it can be the last.
        let last = stop.load(Ordering::Acquire);
        discover(dir, &mut files)?;
        let mut progressed = false;
        for f in files.values_mut() {
            progressed |= send_new(f, last, tx)?;
        }
        if last {
            break;
        }
        if !progressed {
            // Woken early by `finish`.
            std::thread::park_timeout(Duration::from_millis(2));
        }
    }
    Ok(files.into_iter().map(|(n, f)| (n, f.offset)).collect())
}

/// Open the page images not followed yet.
fn discover(dir: &Path, files: &mut BTreeMap<String, Followed>) -> Result<(), String> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // CRIU has not made it yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("listing {}: {e}", dir.display())),
    };
    for e in rd.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if !crate::security::follow::is_page_image(&name) || files.contains_key(&name) {
            continue;
        }
        let path: PathBuf = e.path();
        let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let plain = PlainFileName::parse(&name).map_err(|e| format!("{name}: {e}"))?;
        files.insert(
            name,
            Followed {
                name: plain,
                file,
                offset: 0,
            },
        );
    }
    Ok(())
}

/// Send `f`'s new bytes: whole chunks only while CRIU writes (fewer, larger
/// messages), everything on the `last` pass. True if anything was sent.
fn send_new(f: &mut Followed, last: bool, tx: &mpsc::Sender<PushPart>) -> Result<bool, String> {
    let mut progressed = false;
    loop {
        let len = f
            .file
            .metadata()
            .map_err(|e| format!("{}: {e}", f.name))?
            .len();
        let ready = len.saturating_sub(f.offset);
        let want = ready.min(SEND_CHUNK_BYTES as u64) as usize;
        if want == 0 || (!last && want < SEND_CHUNK_BYTES) {
            return Ok(progressed);
        }
        // Unzeroed: the chunk's bytes are handed on, not copied again.
        let mut data = Vec::with_capacity(want);
        let got = (&mut f.file)
            .take(want as u64)
            .read_to_end(&mut data)
            .map_err(|e| format!("reading {}: {e}", f.name))?;
        if got == 0 {
            return Ok(progressed);
        }
        let chunk = FileChunk {
            name: f.name.clone(),
            area: FileArea::Image,
            offset: f.offset,
            size: 0,
            data: data.into(),
            growing: true,
        };
        f.offset += got as u64;
        progressed = true;
        if tx.blocking_send(PushPart::File(chunk)).is_err() {
            return Err("the target ended the early push".into());
        }
    }
}

/// What the early push may announce for `pid`'s tree: its resident memory
/// (what CRIU will write, give or take the small images) and the job's
/// output files, which go too.
pub(crate) fn estimate(pid: i32, outputs: &[&str]) -> u64 {
    let out: u64 = outputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    crate::core::procfs::tree_rss_bytes(pid).saturating_add(out)
}

#[cfg(test)]
mod tests {
    use super::super::push::PlannedFile;
    use super::*;

    fn plan(files: &[(&str, FileArea, u64)]) -> PushPlan {
        PushPlan {
            begin: PushBegin {
                job: crate::core::JobId::generate(),
                migration: MigrationId::parse("m1").unwrap(),
                from: NodeName::parse("node1").unwrap(),
                total_bytes: 0,
                record_json: b"{sealed}".to_vec(),
                early: false,
                pages_streamed: false,
            },
            files: files
                .iter()
                .map(|(n, area, size)| PlannedFile {
                    area: *area,
                    name: PlainFileName::parse(n).unwrap(),
                    path: PathBuf::from("/nonexistent").join(n),
                    size: *size,
                })
                .collect(),
        }
    }

    #[test]
    fn what_the_follower_sent_is_left_out_and_must_match_the_seal() {
        let p = plan(&[
            ("core-1.img", FileArea::Image, 10),
            ("pages-1.img", FileArea::Image, 100),
            ("pages-2.img", FileArea::Image, 0),
            ("stdout", FileArea::JobOutput, 5),
        ]);
        let sent: Sent = [("pages-1.img".to_string(), 100), ("pages-2.img".into(), 0)].into();
        let (rest, end) = rest_of(p.clone(), sent).unwrap();
        let names: Vec<&str> = rest.files.iter().map(|f| f.name.as_str()).collect();
        // An empty page image never reached the target: it goes whole.
        assert_eq!(names, ["core-1.img", "pages-2.img", "stdout"]);
        assert_eq!((end.files, end.total_bytes), (1, 100));
        assert_eq!(end.grown[0].0.as_str(), "pages-1.img");
        assert_eq!(end.record_json, b"{sealed}");

        let short: Sent = [("pages-1.img".to_string(), 99)].into();
        let e = rest_of(p.clone(), short).unwrap_err();
        assert!(e.contains("sent 99 bytes of pages-1.img"), "{e}");
        let stray: Sent = [("pages-9.img".to_string(), 4)].into();
        let e = rest_of(p, stray).unwrap_err();
        assert!(e.contains("pages-9.img, which is not among"), "{e}");
    }

    #[test]
    fn the_follower_sends_whole_chunks_while_the_file_grows_and_the_tail_last() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dir.path().to_path_buf(), stop.clone());
        let t = std::thread::spawn(move || follow(&d, &s, &tx));
        let mut want = Vec::new();
        {
            use std::io::Write;
            let mut f = File::create(dir.path().join("pages-1.img")).unwrap();
            std::fs::write(dir.path().join("core-1.img"), b"not followed").unwrap();
            for i in 0..5u8 {
                let piece = vec![i; SEND_CHUNK_BYTES / 2 + 7];
                f.write_all(&piece).unwrap();
                want.extend_from_slice(&piece);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        stop.store(true, Ordering::Release);
        let sent = t.join().unwrap().unwrap();
        assert_eq!(sent["pages-1.img"], want.len() as u64);
        assert_eq!(sent.len(), 1, "only page images: {sent:?}");
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Ok(PushPart::File(c)) = rx.try_recv() {
            assert!(c.growing && c.size == 0 && c.offset == got.len() as u64);
            got.extend_from_slice(&c.data);
            chunks += 1;
        }
        assert_eq!(got, want);
        // Whole megabytes while it grew, then the tail: 2 full + 1.
        assert_eq!(chunks, 3);
    }
}
