//! A full copy's memory pages, streamed: written once, on the target.
//!
//! Why: without a shared path, a full copy used to write every page twice,
//! once into the source's image dir (CRIU's dump) and once into the
//! target's (the push), and read it once in between. CRIU's own migration
//! without shared storage writes it once: `criu dump --page-server` sends
//! the pages over a socket to a `criu page-server` that writes them on the
//! target. On this project's test VM, whose host takes freed memory back,
//! each page-cache write of a GiB can cost seconds (BENCHMARKS.md, 1b), so
//! the second write was most of the gap to bare CRIU.
//!
//! How: the same two CRIU halves, with the agents' mTLS connection between
//! them instead of a plain TCP port:
//!
//! ```text
//! source                                         target
//! criu swrk (dump, leave stopped)                criu page-server -D incoming-pages/<job>/<mig>
//!   │ ps socket (a socket pair)                    │ --ps-socket (a socket pair)
//! agent ── StreamPages: open, data ⇄ data, done ── agent (+ the seal's follower hashing)
//! ```
//!
//! The agents carry CRIU's page-server protocol byte for byte and never
//! parse it. Neither side listens on a port, so nothing else on either node
//! can feed pages in.
//!
//! 1. Before the freeze, the source opens the stream (`PageTunnel::open`);
//!    the target starts its page server and answers `ready`. A target that
//!    cannot (an older agent, no CRIU, not enough space) fails the call and
//!    the move goes the usual way, pages in the push.
//! 2. CRIU dumps with the page socket and `leave_stopped`: every other image
//!    file lands in the source's dir as before, the pages only on the
//!    target. The job's stopped tree is the source's complete copy now, as
//!    in post-copy: SIGKILL once the target runs the job, SIGCONT if it
//!    does not (see the parent module's safety rule, which is unchanged).
//! 3. The target's page server ends when CRIU closes the transfer; the
//!    target answers `done` and keeps the pages and their digests (hashed
//!    while they were written, as the source's follower does) for the push.
//! 4. The push (`pages_streamed`) brings the rest. The target checks the
//!    source's manifest over what it pushed, adds the pages, and seals the
//!    whole directory anew with the cluster key; the Restore then verifies
//!    that manifest, without reading the pages a second time, and lets CRIU
//!    free them as it restores them ([`HashedOnArrival`] says why that is
//!    safe, and only once).
//!
//! A job with its own address streams too. Its stopped tree keeps CRIU's
//! network lock and its connections in TCP repair mode, which a restore
//! undoes on the target; on the source its link goes down after the dump
//! (nothing may answer for the address the target takes), and if the tree
//! runs on after all, the source undoes all three itself
//! (`postcopy::resume_stopped_tree`, shared with post-copy). Set
//! `MOSIX_PAGE_STREAM=off` on an agent to turn the stream off there.
//!
//! # Plain pages
//!
//! Relayed, every page crosses both agents: read from a socket, sealed into
//! TLS records, written, and the reverse on the other side. On a 2-core node
//! without kernel TLS, that CPU is spent inside the freeze, beside CRIU's
//! own, and a 1 GiB move took ~1.3x bare CRIU's (BENCHMARKS.md 1b). With
//! `mosixd --plain-pages` on both nodes the agents only set up a TCP
//! connection between the two CRIUs, as in CRIU's own migration (and as
//! post-copy's lazy pages already go):
//!
//! ```text
//! source agent                                  target agent
//! open (plain: true) ═══ mTLS stream ═══════►  TcpListener on its own address, port 0
//!            ◄══════ plain { ip:port, 32-byte token } ══  (token: 32 random bytes)
//! TCP connect ip:port, send the token ───────►  accept; the first 32 bytes must be the
//!                                               token (constant-time compare), else
//!                                               closed and the next one waited for;
//!                                               the listener is dropped once one is in
//!                                               criu page-server --ps-socket <that socket>
//!            ◄─────────────────── 1 byte ─────  (the page server has it)
//! criu dump ═ socket pair ═ splice ═ TCP ════►  the page server writes pages-*.img
//!            ◄══════ done (ok, bytes) ═══════  once the page server has ended
//! ```
//!
//! On the source, CRIU keeps a socket pair, which the kernel joins to the
//! connection (`splice`, no copy through the agent; [`super::splice`] says
//! why CRIU does not get the TCP socket itself). On the target the page
//! server has the connection.
//!
//! What it gives up: the pages cross the network unencrypted and without
//! integrity beyond TCP's checksum, as bare CRIU's and post-copy's do; the
//! token keeps anyone else from feeding the page server, and it only ever
//! travels inside the mTLS stream. Everything else (the small image files,
//! the seal, the manifest the target checks, the Restore) is unchanged. So
//! it is off by default, for a trusted cluster network. A target that does
//! not have it (or has no own address to listen on) answers `ready`, and
//! the pages are relayed as above; a connection that fails makes the source
//! fall back to pushing them.

use crate::agent::peers::Peers;
use crate::agent::{io_error, Agent, AgentError, AgentResult};
use crate::core::{JobId, MigrationId, NodeName};
use crate::security::manifest::Precomputed;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Staging of streamed pages, under the state dir:
/// `incoming-pages/<job>/<migration>/`, its page server's log beside it.
pub(crate) const INCOMING_PAGES: &str = "incoming-pages";
/// Bytes of a plain page connection's token.
pub const PLAIN_TOKEN_BYTES: usize = 32;
/// The byte a target sends on a plain page connection once its page server
/// has the socket.
const PLAIN_ACK: u8 = 1;
/// Bytes read from a page-server socket per message.
const CHUNK: usize = 1 << 20;
/// Messages queued towards the network.
const QUEUE: usize = 8;
/// How long the source waits for the target's `ready`.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long, once the dump returned, the source waits for `done`.
const DONE_WITHIN: Duration = Duration::from_secs(30);
/// How long the target waits for the source between two messages. The
/// source's dump has a deadline of its own; this only bounds a source that
/// neither sends nor hangs up.
const SILENCE_LIMIT: Duration = Duration::from_secs(300);
/// How long a target's page server gets to end after its input ended.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// How long received pages wait for their push before they are dropped.
const KEEP_FOR: Duration = Duration::from_secs(600);

/// First message of a page stream.
#[derive(Debug, Clone, PartialEq)]
pub struct PageStreamOpen {
    pub job: JobId,
    pub migration: MigrationId,
    pub from: NodeName,
    /// The source's estimate of the pages' bytes, for the free-space check.
    pub estimate_bytes: u64,
    /// The source asks for a plain TCP connection for the pages (see the
    /// module doc, "Plain pages").
    pub plain: bool,
}

/// What the source sends.
#[derive(Debug, Clone, PartialEq)]
pub enum PageStreamIn {
    Open(PageStreamOpen),
    Data(Bytes),
}

/// What the target answers.
#[derive(Debug, Clone, PartialEq)]
pub enum PageStreamOut {
    /// The page server runs: the dump may start.
    Ready,
    /// Instead of `Ready`, to a source that asked for it: the pages go over
    /// a plain TCP connection to this address, opened with this token.
    Plain(PlainPageSocket),
    Data(Bytes),
    Done(PageStreamDone),
}

/// Where a plain page connection goes, and the one-time token that opens
/// it. The token only ever travels inside the agents' mTLS connection.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainPageSocket {
    pub address: std::net::SocketAddr,
    pub token: [u8; PLAIN_TOKEN_BYTES],
}

impl std::fmt::Debug for PlainPageSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token, even in a debug line.
        f.debug_struct("PlainPageSocket")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The target's last word on a page stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageStreamDone {
    pub ok: bool,
    pub error: String,
    pub bytes: u64,
}

/// The target's answers, as they arrive at the source.
pub type PageOutStream = BoxStream<'static, AgentResult<PageStreamOut>>;

/// Whether a move of a job may stream its pages (see the module doc).
pub(crate) fn wanted() -> bool {
    !matches!(
        std::env::var("MOSIX_PAGE_STREAM").ok().as_deref(),
        Some("off" | "0" | "no" | "false")
    )
}

// ------------------------------------------------------------ source side

/// Bytes a page socket may hold each way. Why: a Unix socket's default
/// (~208 KiB) made CRIU's page writer wait on the agent's reads many times
/// per MiB; with room for a few of the tunnel's chunks, CRIU and the agent
/// run side by side.
const PAGE_SOCKET_BUFFER: usize = 4 << 20;

/// The socket pair between an agent and its CRIU (the dump's page sender,
/// or the target's page server), with room for [`PAGE_SOCKET_BUFFER`].
fn page_socket_pair() -> AgentResult<(UnixStream, UnixStream)> {
    use nix::sys::socket::{setsockopt, sockopt};
    let (a, b) = UnixStream::pair().map_err(|e| io_error("making the page socket", e))?;
    for s in [&a, &b] {
        // Best effort: the FORCE variants pass the system's cap as root;
        // without them the default buffer still works, only slower.
        let _ = setsockopt(s, sockopt::SndBufForce, &PAGE_SOCKET_BUFFER);
        let _ = setsockopt(s, sockopt::RcvBufForce, &PAGE_SOCKET_BUFFER);
    }
    Ok((a, b))
}

/// In a streamed move's image dir on the source, written before the dump:
/// `<pid> <start time>` of the job's tree, left stopped by the dump. It is
/// the source's copy of the job, so a restarted agent must find it (see
/// `recovery`). Not sealed, never pushed.
pub(crate) const STOPPED_TREE: &str = "stopped-tree";

/// A job's tree left stopped by a streamed dump: its init, named for good
/// by pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoppedTree {
    pub pid: i32,
    pub start: u64,
}

impl StoppedTree {
    pub(crate) fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start: crate::core::procfs::start_time(pid)?,
        })
    }

    /// Still the same process (not ended, its pid not reused).
    pub(crate) fn is_there(&self) -> bool {
        crate::core::procfs::start_time(self.pid) == Some(self.start)
    }

    pub(crate) fn record(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(
            dir.join(STOPPED_TREE),
            format!("{} {}\n", self.pid, self.start),
        )
    }

    pub(crate) fn read(dir: &Path) -> Option<Self> {
        let s = std::fs::read_to_string(dir.join(STOPPED_TREE)).ok()?;
        let mut f = s.split_whitespace();
        Some(Self {
            pid: f.next()?.parse().ok()?,
            start: f.next()?.parse().ok()?,
        })
    }
}

/// An open page stream, source side: CRIU's end of the pages' socket (one
/// end of a socket pair pumped to and from the target, or a plain TCP
/// connection to the target's page server), and the task that waits for
/// the target's `done`.
pub(crate) struct PageTunnel {
    criu_end: Option<OwnedFd>,
    pump: tokio::task::JoinHandle<AgentResult<u64>>,
}

impl PageTunnel {
    /// Open the stream to `target` and wait until its page server runs.
    pub(crate) async fn open(
        peers: &Arc<dyn Peers>,
        target: &NodeName,
        open: PageStreamOpen,
    ) -> AgentResult<Self> {
        let asked_plain = open.plain;
        let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
        let ready = async {
            let mut back = peers.stream_pages(target, open, rx).await?;
            match back.next().await {
                Some(Ok(PageStreamOut::Ready)) => Ok((back, None)),
                Some(Ok(PageStreamOut::Plain(p))) if asked_plain => Ok((back, Some(p))),
                Some(Ok(o)) => Err(AgentError::Internal(format!(
                    "{target} answered a page stream with {o:?} before it was ready"
                ))),
                Some(Err(e)) => Err(e),
                None => Err(AgentError::Unavailable(format!(
                    "{target} ended the page stream before it was ready"
                ))),
            }
        };
        let (back, plain) = tokio::time::timeout(READY_WITHIN, ready)
            .await
            .map_err(|_| {
                AgentError::Unavailable(format!(
                    "{target} did not start a page server within {READY_WITHIN:?}"
                ))
            })??;
        if let Some(p) = plain {
            let sock = tokio::time::timeout(READY_WITHIN, plain_connect(&p))
                .await
                .map_err(|_| {
                    AgentError::Unavailable(format!(
                        "{target}'s page server did not take the plain connection to {} within {READY_WITHIN:?}",
                        p.address
                    ))
                })?
                .map_err(|e| {
                    AgentError::Unavailable(format!(
                        "plain page connection to {target} ({}): {e}",
                        p.address
                    ))
                })?;
            // CRIU keeps a socket pair, joined to the connection by the
            // kernel (`splice`: why not the TCP socket itself).
            let (ours, theirs) = page_socket_pair()?;
            let joined = super::splice::Joined::start(ours, sock)
                .map_err(|e| io_error("joining the plain page connection", e))?;
            let pump = tokio::spawn(async move {
                // The stream stays open until `done`: the target reads its
                // end as this source gone, and stops its page server.
                let _open = tx;
                let r = until_done(back, None).await;
                drop(joined);
                r
            });
            return Ok(Self {
                criu_end: Some(OwnedFd::from(theirs)),
                pump,
            });
        }
        let (ours, theirs) = page_socket_pair()?;
        ours.set_nonblocking(true)
            .map_err(|e| io_error("making the page socket", e))?;
        let sock = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| io_error("making the page socket", e))?;
        let (mut rd, wr) = sock.into_split();
        let pump = tokio::spawn(async move {
            // CRIU → target, until CRIU and we have both closed its end.
            let up = async move {
                // One buffer, split after each read: a chunk is dropped as
                // soon as it is encoded for the network, and `reserve` then
                // reuses its memory. A fresh 1 MiB buffer per read (a
                // socket read brings far less) faulted in new pages for
                // every chunk: ~0.2 CPU-s per GiB on a 2-core node, in the
                // dump's frozen window (BENCHMARKS.md section 11).
                let mut buf = BytesMut::with_capacity(CHUNK);
                loop {
                    if buf.capacity() < CHUNK / 4 {
                        buf.reserve(CHUNK);
                    }
                    match rd.read_buf(&mut buf).await {
                        Ok(0) => return Ok(()),
                        Ok(_) => {
                            if tx.send(buf.split().freeze()).await.is_err() {
                                return Err(AgentError::Aborted(
                                    "the page stream closed under CRIU".into(),
                                ));
                            }
                        }
                        Err(e) => return Err(io_error("reading CRIU's pages", e)),
                    }
                }
            };
            // Target → CRIU (its page server's few answers), then `done`.
            let down = until_done(back, Some(wr));
            let (up, down) = tokio::join!(up, down);
            let bytes = down?;
            up.map(|()| bytes)
        });
        Ok(Self {
            criu_end: Some(OwnedFd::from(theirs)),
            pump,
        })
    }

    /// CRIU's end, by number (see [`crate::criu::DumpSpec::page_socket`]).
    pub(crate) fn criu_fd(&self) -> RawFd {
        self.criu_end.as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    /// After the dump: close CRIU's end and wait for the target's `done`.
    /// Returns the bytes of page images the target wrote.
    pub(crate) async fn finish(mut self) -> AgentResult<u64> {
        drop(self.criu_end.take());
        match tokio::time::timeout(DONE_WITHIN, &mut self.pump).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(AgentError::Internal(format!("page stream task: {e}"))),
            Err(_) => Err(AgentError::Aborted(format!(
                "the target did not confirm the pages within {DONE_WITHIN:?}"
            ))),
        }
    }
}

impl Drop for PageTunnel {
    fn drop(&mut self) {
        // Dropped unfinished (a failed dump): the stream ends, and the
        // target drops what it wrote.
        self.pump.abort();
    }
}

/// The target's answers until its `done`: the page server's bytes for
/// CRIU (relayed into `answers`; none come on a plain connection, where
/// the two CRIUs talk directly), then how it went.
async fn until_done(
    mut back: PageOutStream,
    mut answers: Option<tokio::net::unix::OwnedWriteHalf>,
) -> AgentResult<u64> {
    while let Some(m) = back.next().await {
        match m? {
            PageStreamOut::Data(b) => match answers.as_mut() {
                Some(wr) => wr
                    .write_all(&b)
                    .await
                    .map_err(|e| io_error("answering CRIU", e))?,
                None => {
                    return Err(AgentError::Internal(
                        "page data in the stream of a plain page connection".into(),
                    ))
                }
            },
            PageStreamOut::Done(d) if d.ok => return Ok(d.bytes),
            PageStreamOut::Done(d) => {
                return Err(AgentError::Aborted(format!(
                    "the target's page server failed: {}",
                    d.error
                )))
            }
            PageStreamOut::Ready | PageStreamOut::Plain(_) => {
                return Err(AgentError::Internal(
                    "a page stream said ready twice".into(),
                ))
            }
        }
    }
    Err(AgentError::Aborted(
        "the page stream ended before the target said how it went".into(),
    ))
}

/// Source side of a plain page connection: connect, present the token,
/// and wait for the target's one byte (its page server runs). Returned
/// blocking, for CRIU.
async fn plain_connect(p: &PlainPageSocket) -> std::io::Result<std::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(p.address).await?;
    s.write_all(&p.token).await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    if ack[0] != PLAIN_ACK {
        return Err(std::io::Error::other("the target did not accept the token"));
    }
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Target side: the first connection to `listener` that presents `token`,
/// within `within`. Any other is closed; the listener is dropped after, so
/// the port takes nothing more. Returned blocking, for CRIU.
async fn plain_accept(
    listener: tokio::net::TcpListener,
    token: &[u8; PLAIN_TOKEN_BYTES],
    within: Duration,
) -> Result<std::net::TcpStream, String> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let (mut s, peer) = tokio::time::timeout_at(until, listener.accept())
            .await
            .map_err(|_| format!("no source connected with its token within {within:?}"))?
            .map_err(|e| format!("accepting the plain page connection: {e}"))?;
        let mut got = [0u8; PLAIN_TOKEN_BYTES];
        let read = tokio::time::timeout_at(until, s.read_exact(&mut got)).await;
        if matches!(read, Ok(Ok(_))) && same_token(&got, token) {
            let s = s.into_std().map_err(|e| e.to_string())?;
            s.set_nonblocking(false).map_err(|e| e.to_string())?;
            return Ok(s);
        }
        tracing::warn!(%peer, "a connection to a plain page socket without its token: closed");
    }
}

/// Compared in constant time: how long a wrong token takes to refuse says
/// nothing about how much of it was right.
fn same_token(a: &[u8; PLAIN_TOKEN_BYTES], b: &[u8; PLAIN_TOKEN_BYTES]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

// ------------------------------------------------------------ target side

/// Pages a target received, waiting for the push of the same migration.
pub struct StreamedPages {
    pub dir: PathBuf,
    /// Digests taken while the page server wrote (empty without a key).
    pub hashes: BTreeMap<String, Precomputed>,
    at: Instant,
}

impl Drop for StreamedPages {
    fn drop(&mut self) {
        // Taken by a push, its files have moved into the images; else they
        // are of no use any more.
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Migrations whose pages this agent wrote from a page stream, hashed as
/// they arrived, and sealed into the images itself (the push's
/// `add_streamed_pages`), by job and migration. Their one restore here may
/// do two things no other restore may:
/// - skip reading the pages a second time to check them: the digests in the
///   manifest are this process's own, of what it wrote moments before;
/// - let CRIU free each page image as it reads it (`auto_dedup`), so the
///   restore reuses the memory those pages held instead of taking as much
///   again: a move then needs about the job's size of free memory here, not
///   twice that. That is safe because the source still holds the job's
///   complete copy (its stopped tree) until this restore has answered.
///
/// One-shot: taken by the restore that uses it, which deletes the page
/// images once CRIU returns, whatever the outcome. Any later restore of the
/// same migration (a retry after a failure, a restart of this agent) then
/// finds no pages and fails, as it should: holes punched by CRIU must never
/// run as the job's memory. The source resumes its own copy instead.
#[derive(Default)]
pub(crate) struct HashedOnArrival(Mutex<HashMap<(JobId, MigrationId), Instant>>);

impl HashedOnArrival {
    pub(crate) fn insert(&self, job: &JobId, mig: &MigrationId) {
        let Ok(mut m) = self.0.lock() else { return };
        // A migration whose restore never came (the source rolled back).
        m.retain(|_, at| at.elapsed() < KEEP_FOR);
        m.insert((job.clone(), mig.clone()), Instant::now());
    }

    /// Forget a migration whose images are being replaced (a new push).
    pub(crate) fn forget(&self, job: &JobId, mig: &MigrationId) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&(job.clone(), mig.clone()));
        }
    }

    /// True, once, if the restore of these images may use the mark.
    pub(crate) fn take(&self, job: &JobId, mig: &MigrationId) -> bool {
        self.0
            .lock()
            .map(|mut m| {
                m.remove(&(job.clone(), mig.clone()))
                    .is_some_and(|at| at.elapsed() < KEEP_FOR)
            })
            .unwrap_or(false)
    }
}

/// The target's received page streams, by job and migration.
#[derive(Default)]
pub(crate) struct Received(Mutex<HashMap<(JobId, MigrationId), StreamedPages>>);

impl Received {
    fn put(&self, job: JobId, mig: MigrationId, pages: StreamedPages) {
        let Ok(mut m) = self.0.lock() else { return };
        // A source that never pushed (it rolled back, or died): drop them.
        m.retain(|_, p| p.at.elapsed() < KEEP_FOR);
        m.insert((job, mig), pages);
    }

    /// The pages of one migration, for its push.
    pub(crate) fn take(&self, job: &JobId, mig: &MigrationId) -> Option<StreamedPages> {
        self.0.lock().ok()?.remove(&(job.clone(), mig.clone()))
    }
}

impl Agent {
    /// Source side: open a page stream for `rec`'s move to `target`, or say
    /// why not and return None (its pages then go in the push).
    pub(crate) async fn open_page_stream(
        &self,
        rec: &crate::core::JobRecord,
        pid: i32,
        mig: &MigrationId,
        target: &NodeName,
    ) -> Option<PageTunnel> {
        let open = PageStreamOpen {
            job: rec.id.clone(),
            migration: mig.clone(),
            from: self.cfg.node.clone(),
            estimate_bytes: crate::core::procfs::tree_rss_bytes(pid),
            plain: self.cfg.plain_pages,
        };
        match PageTunnel::open(&self.peers, target, open).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::info!(job = %rec.id, to = %target, "the pages go in the push: no page stream to {target} ({e})");
                None
            }
        }
    }

    /// StreamPages, target side (see the module doc): everything the
    /// source's CRIU sends goes to a page server of ours, its answers back;
    /// `out` gets `ready`, the answers, and `done` (or the error that
    /// stopped it before `ready`).
    pub async fn serve_page_stream(
        self: Arc<Self>,
        open: PageStreamOpen,
        input: BoxStream<'static, AgentResult<Bytes>>,
        out: mpsc::Sender<AgentResult<PageStreamOut>>,
    ) {
        let (job, from) = (open.job.clone(), open.from.clone());
        let t0 = Instant::now();
        match self.page_stream(open, input, &out).await {
            Ok((done, plain)) => {
                if done.ok {
                    tracing::info!(job = %job, from = %from, bytes = done.bytes, ms = t0.elapsed().as_millis() as u64, plain, "pages received over the page stream");
                } else {
                    tracing::warn!(job = %job, from = %from, "page stream failed: {}", done.error);
                }
                let _ = out.send(Ok(PageStreamOut::Done(done))).await;
            }
            Err(e) => {
                tracing::info!(job = %job, from = %from, "page stream refused: {e}");
                let _ = out.send(Err(e)).await;
            }
        }
    }

    async fn page_stream(
        self: &Arc<Self>,
        open: PageStreamOpen,
        mut input: BoxStream<'static, AgentResult<Bytes>>,
        out: &mpsc::Sender<AgentResult<PageStreamOut>>,
    ) -> AgentResult<(PageStreamDone, bool)> {
        let me = &self.cfg.node;
        if self.cfg.shared {
            return Err(AgentError::FailedPrecondition(format!(
                "{me} uses a shared path; pages are not streamed to it"
            )));
        }
        if open.from == *me || !self.peers.knows(&open.from) {
            return Err(AgentError::InvalidArgument(format!(
                "a page stream from {:?}, which is not another node of this cluster",
                open.from.as_str()
            )));
        }
        self.check_not_blocked()?;
        if let Some(free) = super::push::free_bytes(&self.cfg.shared_root) {
            if open
                .estimate_bytes
                .saturating_add(super::push::FREE_SPACE_MARGIN)
                > free
            {
                return Err(AgentError::ResourceExhausted(format!(
                    "{me} has {free} bytes free in {}, not enough for the ~{} bytes of pages of job {}",
                    self.cfg.shared_root.display(),
                    open.estimate_bytes,
                    open.job
                )));
            }
        }
        let _busy = self.claim(&open.job)?;
        let parent = self
            .cfg
            .shared_root
            .join(INCOMING_PAGES)
            .join(open.job.as_str());
        let dir = parent.join(open.migration.as_str());
        let log = parent.join(format!("{}.log", open.migration.as_str()));
        // Left over from an earlier attempt of the same migration.
        drop(self.streamed_pages.take(&open.job, &open.migration));
        super::push::remove_dir_if_any(&dir)
            .map_err(|e| io_error("clearing the page staging dir", e))?;
        crate::criu::create_image_dir(&dir)
            .map_err(|e| io_error("creating the page staging dir", e))?;
        let cleanup = |dir: &Path, log: &Path| {
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_file(log);
            let _ = std::fs::remove_dir(parent.as_path());
        };
        // The page server's socket: a socket pair whose other end this agent
        // relays to and from the stream, or, to a source that asked for it
        // on a node that allows it, a plain TCP connection from the source's
        // CRIU (see the module doc, "Plain pages").
        let plain_ip = (open.plain && self.cfg.plain_pages)
            .then_some(self.cfg.page_server_ip)
            .flatten();
        let (relay_end, criu_sock): (Option<UnixStream>, OwnedFd) = match plain_ip {
            Some(ip) => match self.plain_socket(ip, out, &mut input).await {
                Ok(s) => (None, OwnedFd::from(s)),
                Err(e) => {
                    cleanup(&dir, &log);
                    return Err(e);
                }
            },
            None => {
                let (ours, theirs) = page_socket_pair()?;
                (Some(ours), OwnedFd::from(theirs))
            }
        };
        let started = {
            let (engine, dir, log) = (self.engine.clone(), dir.clone(), log.clone());
            let fd = criu_sock.as_raw_fd();
            Self::blocking(move || engine.page_server(&dir, fd, &log)).await?
        };
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                cleanup(&dir, &log);
                return Err(AgentError::from(e));
            }
        };
        if relay_end.is_none() {
            // The source's CRIU may send now. A write of one byte to a fresh
            // socket does not block; if it fails, the source gives up and
            // its stream's end stops the page server below.
            let _ = nix::unistd::write(&criu_sock, &[PLAIN_ACK]);
        }
        drop(criu_sock);
        let follower = self
            .cfg
            .image_key
            .is_some()
            .then(|| crate::security::follow::FollowHasher::start(&dir, false));
        let plain = relay_end.is_none();
        let pumped = match relay_end {
            Some(ours) => relay(ours, input, out).await,
            None => until_exit(&mut child, input).await,
        };
        if plain && pumped.is_err() {
            // Its source is gone; nothing it still sends is wanted.
            let _ = child.kill();
        }
        // The page server ends by itself once CRIU closed the transfer (or
        // its input did); one that does not is killed.
        let status = Self::blocking(move || {
            let until = Instant::now() + EXIT_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => return Some(st),
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return None;
                    }
                }
            }
        })
        .await?;
        let hashes = match follower {
            Some(f) => Self::blocking(move || f.finish()).await?,
            None => BTreeMap::new(),
        };
        let why = match (&pumped, status) {
            (Ok(()), Some(st)) if st.success() => None,
            (Err(e), _) => Some(e.clone()),
            (Ok(()), Some(st)) => Some(format!(
                "criu page-server {st}: {}",
                crate::criu::log_excerpt(&log)
            )),
            (Ok(()), None) => Some(format!(
                "criu page-server did not end within {EXIT_GRACE:?} and was killed"
            )),
        };
        if let Some(error) = why {
            cleanup(&dir, &log);
            return Ok((
                PageStreamDone {
                    ok: false,
                    error,
                    bytes: 0,
                },
                plain,
            ));
        }
        let _ = std::fs::remove_file(&log);
        let bytes = super::super::dir_bytes(&dir);
        self.streamed_pages.put(
            open.job.clone(),
            open.migration.clone(),
            StreamedPages {
                dir,
                hashes,
                at: Instant::now(),
            },
        );
        Ok((
            PageStreamDone {
                ok: true,
                error: String::new(),
                bytes,
            },
            plain,
        ))
    }
}

impl Agent {
    /// Target side of a plain page connection: a one-time port on this
    /// node's own address, announced with its token in the stream, and the
    /// source's connection that presents the token.
    async fn plain_socket(
        &self,
        ip: std::net::IpAddr,
        out: &mpsc::Sender<AgentResult<PageStreamOut>>,
        input: &mut BoxStream<'static, AgentResult<Bytes>>,
    ) -> AgentResult<std::net::TcpStream> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|e| io_error("opening a plain page socket", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| io_error("opening a plain page socket", e))?;
        let token: [u8; PLAIN_TOKEN_BYTES] = rand::random();
        let offer = PageStreamOut::Plain(PlainPageSocket { address, token });
        if out.send(Ok(offer)).await.is_err() {
            return Err(AgentError::Aborted(
                "the source hung up before the dump".into(),
            ));
        }
        tokio::select! {
            r = plain_accept(listener, &token, READY_WITHIN) => r.map_err(AgentError::Unavailable),
            // A source that could not connect gives up on the stream (and
            // pushes the pages instead): this node's claim on the job must
            // go at once, not after READY_WITHIN.
            _ = input.next() => Err(AgentError::Aborted(
                "the source gave up on the plain page connection".into(),
            )),
        }
    }
}

/// Target side of a relayed page stream: `ready`, then the source's bytes
/// into the page server and its answers back, until the source's CRIU is
/// done.
async fn relay(
    ours: UnixStream,
    mut input: BoxStream<'static, AgentResult<Bytes>>,
    out: &mpsc::Sender<AgentResult<PageStreamOut>>,
) -> Result<(), String> {
    if out.send(Ok(PageStreamOut::Ready)).await.is_err() {
        return Err("the source hung up before the dump".to_string());
    }
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let sock = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = sock.into_split();
    // Page server → source: its answers, until it exits.
    let up = async move {
        loop {
            let mut b = BytesMut::with_capacity(4096);
            match rd.read_buf(&mut b).await {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    if out.send(Ok(PageStreamOut::Data(b.freeze()))).await.is_err() {
                        return Err("the source hung up".to_string());
                    }
                }
                Err(e) => return Err(format!("reading the page server: {e}")),
            }
        }
    };
    // Source → page server, until the source's CRIU is done. Its end (or a
    // broken stream) closes our side, so that a page server still waiting
    // ends too.
    let down = async move {
        let r = loop {
            match tokio::time::timeout(SILENCE_LIMIT, input.next()).await {
                Ok(Some(Ok(b))) => {
                    if let Err(e) = wr.write_all(&b).await {
                        break Err(format!("writing to the page server: {e}"));
                    }
                }
                Ok(Some(Err(e))) => break Err(format!("the source's stream broke: {e}")),
                Ok(None) => break Ok(()),
                Err(_) => break Err(format!("the source was silent for {SILENCE_LIMIT:?}")),
            }
        };
        let _ = wr.shutdown().await;
        r
    };
    let (up, down) = tokio::join!(up, down);
    down.and(up)
}

/// Target side of a plain page connection: the two CRIUs talk directly, so
/// this only waits for the page server to end (the source's CRIU closed
/// the connection). A source whose stream ends or breaks first is gone:
/// its page server is then stopped by the caller.
async fn until_exit(
    child: &mut std::process::Child,
    mut input: BoxStream<'static, AgentResult<Bytes>>,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tokio::select! {
            m = input.next() => return Err(match m {
                Some(Ok(_)) => "the source sent pages in the stream of a plain page connection".to_string(),
                Some(Err(e)) => format!("the source's stream broke: {e}"),
                None => "the source hung up before its dump ended".to_string(),
            }),
            _ = tick.tick() => {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_blocking(s: &std::net::TcpStream) -> bool {
        let fl = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
        fl != -1 && fl & libc::O_NONBLOCK == 0
    }

    #[tokio::test]
    async fn a_plain_page_socket_takes_only_the_connection_with_its_token() {
        use std::io::{Read, Write};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = l.local_addr().unwrap();
        let token: [u8; PLAIN_TOKEN_BYTES] = rand::random();
        let accept =
            tokio::spawn(async move { plain_accept(l, &token, Duration::from_secs(10)).await });
        // A stranger without the token is closed, and the port stays open.
        let mut stranger = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut wrong = token;
        wrong[31] ^= 1;
        stranger.write_all(&wrong).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(stranger.read(&mut b).await.unwrap(), 0, "closed");
        // The source: its token, then it waits for the target's byte.
        let p = PlainPageSocket { address, token };
        let source = tokio::spawn(async move { plain_connect(&p).await });
        let mut target = accept.await.unwrap().expect("the source is taken");
        assert!(is_blocking(&target), "handed to CRIU blocking");
        target.write_all(&[PLAIN_ACK]).unwrap();
        let mut source = source.await.unwrap().expect("the target's byte came");
        assert!(is_blocking(&source));
        // From here the connection is the two CRIUs' own, both ways.
        source.write_all(b"pages").unwrap();
        let mut got = [0u8; 5];
        target.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pages");
    }

    #[tokio::test]
    async fn a_plain_page_socket_nobody_opens_gives_up_in_time() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        let e = plain_accept(l, &[0; PLAIN_TOKEN_BYTES], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.contains("within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_source_whose_token_is_refused_is_told_so() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = l.local_addr().unwrap();
        let target = tokio::spawn(async move {
            // A target that answers anything but its byte.
            let (mut s, _) = l.accept().await.unwrap();
            let mut t = [0u8; PLAIN_TOKEN_BYTES];
            s.read_exact(&mut t).await.unwrap();
            s.write_all(&[0]).await.unwrap();
        });
        let p = PlainPageSocket {
            address,
            token: [3; PLAIN_TOKEN_BYTES],
        };
        assert!(plain_connect(&p).await.is_err());
        target.await.unwrap();
        assert!(same_token(&[5; 32], &[5; 32]));
        assert!(!same_token(&[5; 32], &[6; 32]));
        assert!(
            !format!("{p:?}").contains("3, 3"),
            "no token in debug output: {p:?}"
        );
    }

    #[test]
    fn pages_stream_unless_turned_off() {
        // The variable is read at each call; this test only leaves it unset.
        if std::env::var_os("MOSIX_PAGE_STREAM").is_none() {
            assert!(wanted());
        }
    }

    #[test]
    fn received_pages_are_taken_once_and_their_dir_goes_with_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j1").join("m1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pages-1.img"), b"x").unwrap();
        let r = Received::default();
        let (job, mig) = (
            JobId::parse("j1").unwrap(),
            MigrationId::parse("m1").unwrap(),
        );
        r.put(
            job.clone(),
            mig.clone(),
            StreamedPages {
                dir: dir.clone(),
                hashes: BTreeMap::new(),
                at: Instant::now(),
            },
        );
        let p = r.take(&job, &mig).expect("kept for the push");
        assert!(r.take(&job, &mig).is_none(), "taken once");
        assert!(dir.join("pages-1.img").exists());
        drop(p);
        assert!(!dir.exists(), "an unused copy is removed");
    }

    #[test]
    fn pages_hashed_on_arrival_serve_one_restore_and_a_new_push_clears_them() {
        let h = HashedOnArrival::default();
        let id = |j: &str, m: &str| (JobId::parse(j).unwrap(), MigrationId::parse(m).unwrap());
        let (job, mig) = id("j1", "m1");
        let (_, other) = id("j1", "m2");
        assert!(!h.take(&job, &mig), "nothing streamed yet");
        h.insert(&job, &mig);
        assert!(!h.take(&job, &other), "another migration of the job");
        assert!(h.take(&job, &mig), "its restore may consume the pages");
        assert!(!h.take(&job, &mig), "only once");
        h.insert(&job, &mig);
        h.forget(&job, &mig);
        assert!(!h.take(&job, &mig), "a push that replaced the images");
    }
}
