//! Keep-alive connections to one instance, which the gateway can close on
//! demand before the instance is frozen.
//!
//! Why not hyper-util's pooled client: its pool cannot be told "close every
//! connection to this host now, and tell me when the sockets are gone",
//! which is what a freeze needs (CRIU refuses a job with an established
//! connection). Here each connection is a hyper `http1` client connection
//! whose driver runs on a task of its own; closing means dropping the
//! sender, which ends the driver, and awaiting the task, which drops the
//! socket.

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Idle connections kept per instance.
pub const MAX_IDLE: usize = 256;
/// How long closing waits for a connection's driver before aborting it.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

pub struct Conn {
    pub addr: SocketAddr,
    pub sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Conn {
    /// Close: drop the sender and wait (bounded) for the socket to go.
    pub async fn close(self) {
        let Conn { sender, task, .. } = self;
        drop(sender);
        let abort = task.abort_handle();
        if tokio::time::timeout(CLOSE_WAIT, task).await.is_err() {
            abort.abort();
        }
    }
}

/// Open a connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        // Its error is the request's error, seen by the sender.
        let _ = conn.await;
    });
    Ok(Conn { addr, sender, task })
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Conn>>,
    /// Set while the instance is drained for a freeze: connections coming
    /// back from requests are closed, not kept.
    draining: AtomicBool,
}

impl Pool {
    /// An idle connection to `addr` that is still open.
    pub fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut g = self.idle.lock().ok()?;
        while let Some(c) = g.pop() {
            if c.addr == addr && !c.sender.is_closed() && c.sender.is_ready() {
                return Some(c);
            }
            // Stale (closed by the backend, or the instance moved): the
            // driver has ended or ends as the sender goes.
            drop(c);
        }
        None
    }

    /// Give a connection back after a complete exchange.
    pub async fn put(&self, c: Conn) {
        if self.draining.load(Ordering::Acquire) || c.sender.is_closed() {
            c.close().await;
            return;
        }
        let extra = match self.idle.lock() {
            Ok(mut g) if g.len() < MAX_IDLE => {
                g.push(c);
                None
            }
            _ => Some(c),
        };
        if let Some(c) = extra {
            c.close().await;
        }
    }

    /// Stop keeping connections and close the idle ones (for a freeze).
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let all: Vec<Conn> = match self.idle.lock() {
            Ok(mut g) => g.drain(..).collect(),
            Err(_) => vec![],
        };
        futures::future::join_all(all.into_iter().map(Conn::close)).await;
    }

    /// The instance is back: keep connections again.
    pub fn resume(&self) {
        self.draining.store(false, Ordering::Release);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|g| g.len()).unwrap_or(0)
    }
}
