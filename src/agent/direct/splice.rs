//! The source's end of a plain page connection: CRIU's page socket joined to
//! the TCP connection to the target's page server, by the kernel.
//!
//! Why not hand CRIU the TCP connection itself: CRIU corks a page-server
//! socket (`TCP_CORK`) for the whole dump and only sets `TCP_NODELAY` before
//! some of its waits for an answer. Its last request (`PS_IOV_FORCE_CLOSE`,
//! 24 bytes) then sits in the corked queue until the kernel's 200 ms cork
//! timer sends it, and the dump waits that long for the answer: a 64 MiB
//! move took ~340 ms instead of ~180 (BENCHMARKS.md 1b; bare CRIU's own
//! migration pays the same). On a Unix socket the cork is a no-op, so CRIU
//! keeps its socket pair, and this module moves the bytes on:
//!
//! ```text
//! CRIU ══ socket pair ══► splice ─► pipe ─► splice ══ TCP (NODELAY) ══► target's page server
//! CRIU ◄═ socket pair ═══ read/write (its few answers) ◄══ TCP ════════
//! ```
//!
//! `splice(2)` moves page references, not bytes, so the pages are not
//! copied through this process. A kernel that cannot splice from a Unix
//! socket gets a plain copy loop instead. Each direction is a thread of its
//! own (blocking calls, a few per MiB); each ends when its input ends, and
//! passes the end on with a `shutdown` of its output. Dropping the
//! [`Joined`] shuts both sockets down, which ends both threads.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Bytes asked of one splice: a pipe holds 16 pages by default, and
/// growing it saves calls.
const PIPE_BYTES: usize = 1 << 20;

/// A page socket joined to a TCP connection; see the module doc.
pub(crate) struct Joined {
    unix: UnixStream,
    tcp: TcpStream,
}

impl Joined {
    /// Start moving bytes between `unix` (the agent's end of CRIU's page
    /// socket) and `tcp` (blocking, connected to the target's page server).
    pub(crate) fn start(unix: UnixStream, tcp: TcpStream) -> std::io::Result<Self> {
        tcp.set_nodelay(true)?;
        let (up_in, up_out) = (unix.try_clone()?, tcp.try_clone()?);
        let (down_in, down_out) = (tcp.try_clone()?, unix.try_clone()?);
        std::thread::Builder::new()
            .name("pages-up".into())
            .spawn(move || {
                let r = splice_all(&up_in, &up_out);
                if let Err(e) = &r {
                    tracing::warn!("plain page connection, CRIU → target: {e}");
                    // CRIU's writes fail now, rather than wait.
                    let _ = up_in.shutdown(Shutdown::Both);
                }
                let _ = up_out.shutdown(if r.is_ok() {
                    Shutdown::Write
                } else {
                    Shutdown::Both
                });
            })?;
        std::thread::Builder::new()
            .name("pages-down".into())
            .spawn(move || {
                let r = copy_all(&mut &down_in, &mut &down_out);
                if let Err(e) = &r {
                    tracing::debug!("plain page connection, target → CRIU: {e}");
                }
                let _ = down_out.shutdown(Shutdown::Write);
            })?;
        Ok(Self { unix, tcp })
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        // Both threads block on one of these; either is done or not wanted.
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.unix.shutdown(Shutdown::Both);
    }
}

/// Everything from `from` into `to` until `from` ends, spliced through a
/// pipe (or copied, where the kernel cannot splice from `from`).
fn splice_all(from: &UnixStream, to: &TcpStream) -> std::io::Result<u64> {
    let (pr, pw) = pipe()?;
    // Best effort: a larger pipe means fewer calls; the default works.
    unsafe {
        libc::fcntl(
            pw.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_BYTES as libc::c_int,
        )
    };
    let mut total = 0u64;
    loop {
        let n = match splice(from.as_raw_fd(), pw.as_raw_fd(), PIPE_BYTES) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if total == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                return copy_all(&mut &*from, &mut &*to);
            }
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            match splice(pr.as_raw_fd(), to.as_raw_fd(), left)? {
                0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                m => left -= m,
            }
        }
        total += n as u64;
    }
}

/// Everything from `from` into `to` until `from` ends, copied.
fn copy_all(from: &mut dyn Read, to: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which are then
    // owned here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: plain descriptors, no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_both_ways_whole_and_the_ends_pass_on() {
        // CRIU's socket pair, and a TCP connection to a "page server".
        let (criu, ours) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let joined = Joined::start(ours, tcp).unwrap();
        // 8 MiB of a pattern, as pages would be, from "CRIU".
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let writer = {
            let (mut c, d) = (criu.try_clone().unwrap(), data.clone());
            std::thread::spawn(move || {
                c.write_all(&d).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(
            got == data,
            "{} bytes of {} arrived intact",
            got.len(),
            data.len()
        );
        // The page server's answer, and its end, reach CRIU.
        server.write_all(b"ok").unwrap();
        drop(server);
        let mut answer = Vec::new();
        (&criu).read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"ok");
        drop(joined);
    }

    #[test]
    fn a_broken_connection_fails_criu_instead_of_holding_it() {
        let (criu, ours) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let _joined = Joined::start(ours, tcp).unwrap();
        // The target goes away: CRIU's reads end, and its writes fail
        // (after at most what the sockets buffer), instead of blocking.
        drop(server);
        let mut c = criu;
        let chunk = vec![0u8; 1 << 20];
        let mut failed = false;
        for _ in 0..256 {
            if c.write_all(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "256 MiB written into a connection that is gone");
    }
}
