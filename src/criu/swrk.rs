//! A warm CRIU worker: `criu swrk`, CRIU's RPC service process, started
//! before the dump or restore it will serve.
//!
//! `rust-criu` starts a fresh `criu swrk` inside every call. Exec and dynamic
//! linking of CRIU cost ~3 ms, and a migration pays it twice (dump, restore)
//! while the job stands still. So the driver keeps one worker spawned ahead
//! of time ([`Spare`]) and talks to it itself, with `rust-criu`'s generated
//! RPC messages (CRIU's `rpc.proto`):
//!
//! ```text
//! agent ── Criu_req{DUMP|RESTORE, opts} ──▶ criu swrk
//!       ◀── Criu_resp{NOTIFY, script}  ──   (zero or more: post-restore, pre-resume, ...)
//!       ── Criu_req{NOTIFY, success}   ──▶
//!       ◀── Criu_resp{DUMP|RESTORE, success, cr_errno} ──  (final; the worker then exits)
//! ```
//!
//! One message per SOCK_SEQPACKET datagram. A worker serves exactly one
//! dump or restore (CRIU refuses `keep_open` for those), so each use is
//! followed by spawning the next spare.
//!
//! File descriptors in the options (`images_dir_fd`, `status_fd`) need not
//! be inherited: CRIU reopens them as `/proc/<peer>/fd/<n>`, the peer being
//! the process that created the socket pair (SO_PEERCRED), i.e. the agent.
//! So a worker spawned long before the image directory existed can use it.
//!
//! Priorities. An idle spare sits at the lowest CPU priority (nice 19), so
//! that finishing its start-up never competes with a migration in progress.
//! A worker at work runs at [`WORKER_NICE`], above the jobs: a node is
//! migrated away from because it is overloaded, and at the jobs' own
//! priority CRIU would get 1/(n+1) of a node crowded with n jobs (on a
//! CPU-capped node, a frozen time of seconds for a job of a few MiB). The
//! jobs CRIU restores get their own nice values back: from the images, and
//! for the threads the agent raised for the dump, from the job's pending
//! migration (`agent::priority`). A worker that has sent its final answer goes back to nice 19 for its
//! teardown. Only the child is ever made low-priority, never a thread of
//! the agent: a starved agent thread could hold a lock (the address space
//! during fork, the spare's slot) that a migration then waits for. A spare that died meanwhile is replaced by
//! a fresh spawn (the cold path, as with `rust-criu`). When the agent exits,
//! the worker reads EOF on its socket and exits too.

use protobuf::Message;
use rust_criu::rust_criu_protobuf::rpc;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The nice value of a worker doing a dump or restore (see the module docs).
pub const WORKER_NICE: i32 = crate::core::MIGRATION_NICE;
/// The nice value of an idle spare and of a worker tearing itself down.
const IDLE_NICE: i32 = 19;

/// Why a conversation with a worker failed (before or instead of CRIU's
/// own verdict, which comes back as a response with `success = false`).
#[derive(Debug, thiserror::Error)]
pub enum SwrkError {
    #[error("cannot start `{path} swrk`: {source}")]
    Spawn { path: String, source: io::Error },
    #[error("CRIU RPC socket: {0}")]
    Io(#[from] io::Error),
    #[error("CRIU RPC message: {0}")]
    Proto(#[from] protobuf::Error),
    #[error("CRIU exited before it answered the request")]
    Eof,
    #[error("CRIU answered a {sent:?} request with {got:?}")]
    Unexpected {
        sent: rpc::Criu_req_type,
        got: rpc::Criu_req_type,
    },
    #[error("CRIU failed: {0}")]
    Failed(String),
    #[error("the {0} notification was refused")]
    NotifyRefused(String),
    /// The call's [`Watch`] stopped it (deadline passed, or told to abort).
    #[error("{0}")]
    Stopped(String),
}

/// Bounds on one call: a deadline, and a check polled while CRIU works
/// (`Some(reason)` stops the call). A stopped call kills the worker.
#[derive(Default)]
pub struct Watch<'a> {
    pub deadline: Option<std::time::Instant>,
    pub abort_if: Option<&'a (dyn Fn() -> Option<String> + Send + Sync)>,
}

impl Watch<'_> {
    /// How often the abort check runs while CRIU is silent.
    const TICK_MS: u16 = 50;

    fn stopped(&self) -> Option<String> {
        if let Some(d) = self.deadline {
            if std::time::Instant::now() >= d {
                return Some("deadline passed".into());
            }
        }
        self.abort_if.and_then(|f| f())
    }

    /// Wait until `sock` has a message, or the watch says stop.
    fn wait_readable(&self, sock: &OwnedFd) -> Result<(), SwrkError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.deadline.is_none() && self.abort_if.is_none() {
            return Ok(());
        }
        loop {
            if let Some(why) = self.stopped() {
                return Err(SwrkError::Stopped(why));
            }
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(Self::TICK_MS)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(SwrkError::Io(e.into())),
            }
        }
    }
}

/// One `criu swrk` process and our end of its RPC socket.
pub struct Worker {
    child: Child,
    sock: OwnedFd,
}

impl Worker {
    /// Start `criu swrk` (at the calling thread's priority).
    pub fn spawn(criu: &Path) -> Result<Self, SwrkError> {
        Self::spawn_inheriting(criu, None)
    }

    /// A worker for one call that uses a file descriptor of ours by number:
    /// a page server's socket (`Criu_page_server_info.fd`), which CRIU takes
    /// only from a worker that inherited it (it cannot reopen a socket
    /// through `/proc/<peer>/fd`, as it does an image dir). Costs the ~3 ms
    /// of a cold start that a spare saves, on a call that moves a job's
    /// whole memory. `fd` stays CLOEXEC in the agent; only the child keeps
    /// it, under the same number.
    pub fn spawn_with_fd(criu: &Path, fd: std::os::fd::RawFd) -> Result<Self, SwrkError> {
        Self::spawn_inheriting(criu, Some(fd))
    }

    fn spawn_inheriting(criu: &Path, extra: Option<std::os::fd::RawFd>) -> Result<Self, SwrkError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            // CLOEXEC on both ends, so no other child the agent starts
            // meanwhile inherits the worker's socket (which would hide the
            // worker's exit from us); the worker's end is made inheritable
            // between fork and exec, in the child only.
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SwrkError::Io(e.into()))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(criu);
        cmd.arg("swrk")
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        inherit_fds(&mut cmd, std::iter::once(fd).chain(extra).collect());
        let child = cmd.spawn().map_err(|source| SwrkError::Spawn {
            path: criu.display().to_string(),
            source,
        })?;
        drop(theirs);
        Ok(Self { child, sock: ours })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stop an unused worker and collect its exit.
    fn discard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send `req`, answer CRIU's notifications with `on_notify` (true =
    /// go on), and return the final response if CRIU reports success.
    /// The worker is used up either way; its exit is collected on a
    /// background thread so the caller does not wait for CRIU's teardown.
    pub fn call(
        self,
        req: &rpc::Criu_req,
        on_notify: &mut dyn FnMut(&str, &rpc::Criu_notify) -> bool,
    ) -> Result<rpc::Criu_resp, SwrkError> {
        self.call_watched(req, on_notify, &Watch::default())
    }

    /// [`Self::call`], bounded by `watch`: when it says stop, the worker
    /// is killed and the call returns [`SwrkError::Stopped`]. What CRIU was
    /// doing to a process tree is the caller's to clean up (a dump's tree
    /// is released by CRIU's death; a restore's half-made tree is not).
    pub fn call_watched(
        mut self,
        req: &rpc::Criu_req,
        on_notify: &mut dyn FnMut(&str, &rpc::Criu_notify) -> bool,
        watch: &Watch,
    ) -> Result<rpc::Criu_resp, SwrkError> {
        let result = converse(&self.sock, req, on_notify, watch);
        // CRIU's own teardown (unmapping its page pipes, up to the size of
        // the job's memory) is left; nothing waits for it.
        crate::core::set_nice(self.pid(), IDLE_NICE);
        if result.is_err() {
            // A failed or refused request: make sure CRIU is not left
            // holding a half-restored tree or a frozen job.
            let _ = self.child.kill();
        }
        drop(self.sock);
        let mut child = self.child;
        let reaped = std::thread::Builder::new()
            .name("criu-exit".into())
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = reaped {
            tracing::warn!("cannot start a thread to collect CRIU's exit: {e}");
        }
        result
    }
}

/// Let the child of `cmd` keep `fds` across exec, under the same numbers.
/// They stay CLOEXEC in the agent, so no other child it starts meanwhile
/// inherits them; only this one, between fork and exec, clears the flag.
pub(crate) fn inherit_fds(cmd: &mut Command, fds: Vec<std::os::fd::RawFd>) {
    // SAFETY: only async-signal-safe calls (fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The conversation itself, over any SEQPACKET socket (unit-testable with a
/// fake CRIU on the other end).
fn converse(
    sock: &OwnedFd,
    req: &rpc::Criu_req,
    on_notify: &mut dyn FnMut(&str, &rpc::Criu_notify) -> bool,
    watch: &Watch,
) -> Result<rpc::Criu_resp, SwrkError> {
    let sent = req.type_();
    send(sock, &req.write_to_bytes()?)?;
    loop {
        watch.wait_readable(sock)?;
        let resp = rpc::Criu_resp::parse_from_bytes(&recv(sock)?)?;
        let got = resp.type_();
        if got == rpc::Criu_req_type::NOTIFY {
            let script = resp.notify.script().to_string();
            let ok = resp.success() && on_notify(&script, &resp.notify);
            let mut ack = rpc::Criu_req::new();
            ack.set_type(rpc::Criu_req_type::NOTIFY);
            ack.set_notify_success(ok);
            send(sock, &ack.write_to_bytes()?)?;
            if !ok {
                return Err(SwrkError::NotifyRefused(script));
            }
            continue;
        }
        if !resp.success() {
            let mut why = format!("{got:?} request failed");
            if resp.has_cr_errno() && resp.cr_errno() != 0 {
                why.push_str(&format!(
                    " ({})",
                    io::Error::from_raw_os_error(resp.cr_errno())
                ));
            }
            // CRIU's own message, less the RLIMIT_NOFILE line it logs on every
            // run here (root without CAP_SYS_RESOURCE), which is not the error.
            let msg: Vec<&str> = resp
                .cr_errmsg()
                .lines()
                .filter(|l| !l.contains("RLIMIT_NOFILE"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if !msg.is_empty() {
                why.push_str(&format!(": {}", msg.join(" | ")));
            }
            return Err(SwrkError::Failed(why));
        }
        if got != sent {
            return Err(SwrkError::Unexpected { sent, got });
        }
        return Ok(resp);
    }
}

fn send(sock: &OwnedFd, bytes: &[u8]) -> Result<(), SwrkError> {
    let n = nix::sys::socket::send(sock.as_raw_fd(), bytes, nix::sys::socket::MsgFlags::empty())
        .map_err(|e| SwrkError::Io(e.into()))?;
    if n != bytes.len() {
        return Err(SwrkError::Io(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write on the CRIU socket",
        )));
    }
    Ok(())
}

/// One whole datagram: peek its size first (MSG_TRUNC reports the real
/// length of a SEQPACKET message), then read it.
fn recv(sock: &OwnedFd) -> Result<Vec<u8>, SwrkError> {
    use nix::sys::socket::MsgFlags;
    loop {
        let mut probe = [0u8; 0];
        let len = match nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut probe,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Ok(0) => return Err(SwrkError::Eof),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SwrkError::Io(e.into())),
        };
        let mut buf = vec![0u8; len];
        return match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => Err(SwrkError::Eof),
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(e) => Err(SwrkError::Io(e.into())),
        };
    }
}

/// At most one idle worker, ready for the next dump or restore.
pub struct Spare {
    criu: PathBuf,
    slot: Mutex<Option<Worker>>,
}

impl Spare {
    pub fn new(criu: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            criu,
            slot: Mutex::new(None),
        })
    }

    /// The spare if it is still alive, else a worker started now; either
    /// way at [`WORKER_NICE`]. Never waits for a refill in progress.
    pub fn take(&self) -> Result<Worker, SwrkError> {
        let spare = self.slot.try_lock().ok().and_then(|mut s| s.take());
        let worker = match spare {
            Some(mut w) => {
                if w.alive() {
                    w
                } else {
                    tracing::debug!("the spare CRIU worker had exited; starting one now");
                    w.discard();
                    Worker::spawn(&self.criu)?
                }
            }
            None => Worker::spawn(&self.criu)?,
        };
        crate::core::set_nice(worker.pid(), WORKER_NICE);
        Ok(worker)
    }

    /// Start a spare in the background if there is none.
    pub fn refill(self: &Arc<Self>) {
        let me = self.clone();
        let started = std::thread::Builder::new()
            .name("criu-spare".into())
            .spawn(move || {
                if me.slot.lock().map(|s| s.is_some()).unwrap_or(true) {
                    return;
                }
                // Spawned at our priority, then lowered: the slot is not
                // locked meanwhile, so a take() never waits for this.
                let w = match Worker::spawn(&me.criu) {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!("cannot start a spare CRIU worker: {e}");
                        return;
                    }
                };
                crate::core::set_nice(w.pid(), IDLE_NICE);
                let Ok(mut slot) = me.slot.lock() else {
                    return;
                };
                if slot.is_some() {
                    // Another refill won the race: keep one spare only.
                    w.discard();
                } else {
                    *slot = Some(w);
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start a thread for a spare CRIU worker: {e}");
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slot.lock() {
            if let Some(w) = s.take() {
                w.discard();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn resp(t: rpc::Criu_req_type, success: bool) -> rpc::Criu_resp {
        let mut r = rpc::Criu_resp::new();
        r.set_type(t);
        r.set_success(success);
        r
    }

    fn notify(script: &str, pid: i32) -> rpc::Criu_resp {
        let mut r = resp(rpc::Criu_req_type::NOTIFY, true);
        let mut n = rpc::Criu_notify::new();
        n.set_script(script.into());
        n.set_pid(pid);
        r.notify = protobuf::MessageField::some(n);
        r
    }

    fn restore_req() -> rpc::Criu_req {
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::RESTORE);
        req
    }

    /// A fake CRIU: checks the request, sends `script`'s notifications
    /// (recording each ack), then `last`.
    fn fake_criu(
        sock: OwnedFd,
        script: Vec<rpc::Criu_resp>,
        last: Option<rpc::Criu_resp>,
    ) -> std::thread::JoinHandle<(rpc::Criu_req_type, Vec<bool>)> {
        std::thread::spawn(move || {
            let req = rpc::Criu_req::parse_from_bytes(&recv(&sock).expect("request"))
                .expect("request parses");
            let mut acks = Vec::new();
            for n in script {
                send(&sock, &n.write_to_bytes().expect("encode")).expect("send notify");
                let ack = rpc::Criu_req::parse_from_bytes(&recv(&sock).expect("ack"))
                    .expect("ack parses");
                assert_eq!(ack.type_(), rpc::Criu_req_type::NOTIFY);
                acks.push(ack.notify_success());
                if !ack.notify_success() {
                    return (req.type_(), acks);
                }
            }
            if let Some(l) = last {
                send(&sock, &l.write_to_bytes().expect("encode")).expect("send final");
            }
            (req.type_(), acks)
        })
    }

    #[test]
    fn notifications_are_answered_then_the_final_response_returned() {
        let (ours, theirs) = pair();
        let criu = fake_criu(
            theirs,
            vec![notify("post-restore", 4242), notify("pre-resume", 0)],
            Some(resp(rpc::Criu_req_type::RESTORE, true)),
        );
        let mut seen = Vec::new();
        let r = converse(
            &ours,
            &restore_req(),
            &mut |s, n| {
                seen.push((s.to_string(), n.pid()));
                true
            },
            &Watch::default(),
        )
        .expect("restore succeeds");
        assert_eq!(r.type_(), rpc::Criu_req_type::RESTORE);
        assert_eq!(
            seen,
            vec![
                ("post-restore".to_string(), 4242),
                ("pre-resume".to_string(), 0)
            ]
        );
        let (sent, acks) = criu.join().expect("fake criu");
        assert_eq!(sent, rpc::Criu_req_type::RESTORE);
        assert_eq!(acks, vec![true, true]);
    }

    #[test]
    fn a_refused_notification_is_acked_as_failure_and_ends_the_call() {
        let (ours, theirs) = pair();
        let criu = fake_criu(theirs, vec![notify("pre-resume", 0)], None);
        let err =
            converse(&ours, &restore_req(), &mut |_, _| false, &Watch::default()).unwrap_err();
        assert!(
            matches!(err, SwrkError::NotifyRefused(ref s) if s == "pre-resume"),
            "{err}"
        );
        assert_eq!(criu.join().expect("fake criu").1, vec![false]);
    }

    #[test]
    fn a_failed_response_carries_criu_errno_and_message() {
        let (ours, theirs) = pair();
        let mut last = resp(rpc::Criu_req_type::RESTORE, false);
        last.set_cr_errno(libc::ENOSPC);
        last.set_cr_errmsg("can't write image".into());
        let _criu = fake_criu(theirs, vec![], Some(last));
        let err = converse(&ours, &restore_req(), &mut |_, _| true, &Watch::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("No space left on device"), "{msg}");
        assert!(msg.contains("can't write image"), "{msg}");
    }

    #[test]
    fn criu_dying_mid_request_is_an_error_not_a_hang() {
        let (ours, theirs) = pair();
        let criu = std::thread::spawn(move || {
            let _ = recv(&theirs);
            drop(theirs);
        });
        let err = converse(&ours, &restore_req(), &mut |_, _| true, &Watch::default()).unwrap_err();
        assert!(matches!(err, SwrkError::Eof), "{err}");
        criu.join().expect("fake criu");
    }

    #[test]
    fn an_answer_of_the_wrong_type_is_refused() {
        let (ours, theirs) = pair();
        let _criu = fake_criu(theirs, vec![], Some(resp(rpc::Criu_req_type::DUMP, true)));
        let err = converse(&ours, &restore_req(), &mut |_, _| true, &Watch::default()).unwrap_err();
        assert!(matches!(err, SwrkError::Unexpected { .. }), "{err}");
    }

    /// A CRIU that takes the request and never answers (a restore hung on
    /// a lock): the deadline ends the call, within a tick of it.
    #[test]
    fn a_silent_criu_is_stopped_at_the_deadline() {
        let (ours, theirs) = pair();
        let criu = std::thread::spawn(move || {
            let _ = recv(&theirs);
            std::thread::sleep(std::time::Duration::from_secs(3));
            drop(theirs);
        });
        let t0 = std::time::Instant::now();
        let watch = Watch {
            deadline: Some(t0 + std::time::Duration::from_millis(300)),
            abort_if: None,
        };
        let err = converse(&ours, &restore_req(), &mut |_, _| true, &watch).unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(err, SwrkError::Stopped(ref w) if w.contains("deadline")),
            "{err}"
        );
        assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        criu.join().expect("fake criu");
    }

    /// The abort check ends a silent call with its reason, even mid-way
    /// through notifications, and is not consulted once CRIU has answered.
    #[test]
    fn an_abort_check_stops_a_silent_call_with_its_reason() {
        let (ours, theirs) = pair();
        let criu = std::thread::spawn(move || {
            let _ = recv(&theirs);
            send(
                &theirs,
                &notify("setup-namespaces", 77)
                    .write_to_bytes()
                    .expect("encode"),
            )
            .expect("send");
            let _ = recv(&theirs);
            std::thread::sleep(std::time::Duration::from_secs(3));
            drop(theirs);
        });
        let fired = std::sync::atomic::AtomicBool::new(false);
        let check = || {
            fired
                .load(std::sync::atomic::Ordering::SeqCst)
                .then(|| "the lazy-pages daemon exited".to_string())
        };
        let watch = Watch {
            deadline: None,
            abort_if: Some(&check),
        };
        let mut pid = 0;
        let err = converse(
            &ours,
            &restore_req(),
            &mut |_, n| {
                pid = n.pid();
                fired.store(true, std::sync::atomic::Ordering::SeqCst);
                true
            },
            &watch,
        )
        .unwrap_err();
        assert_eq!(pid, 77, "the notification was answered first");
        assert!(
            matches!(err, SwrkError::Stopped(ref w) if w.contains("daemon exited")),
            "{err}"
        );
        criu.join().expect("fake criu");
    }

    /// The real thing: a spare `criu swrk` answers a VERSION request.
    #[test]
    fn a_spare_worker_answers_a_real_criu_request() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/criu/path");
        let Ok(criu) = std::fs::read_to_string(&path) else {
            eprintln!(
                "SKIPPED a_spare_worker_answers_a_real_criu_request: no CRIU at {} (run `make setup`)",
                path.display()
            );
            return;
        };
        let spare = Spare::new(PathBuf::from(criu.trim()));
        spare.refill();
        // The refill runs on its own thread; wait for it to fill the slot.
        for _ in 0..200 {
            if spare.slot.lock().map(|s| s.is_some()).unwrap_or(false) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let w = spare.take().expect("a worker");
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::VERSION);
        let r = w.call(&req, &mut |_, _| true).expect("VERSION answered");
        assert!(r.version.major_number() >= 4, "{:?}", r.version);
    }
}
