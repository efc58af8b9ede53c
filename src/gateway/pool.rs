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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-connection HTTP server on loopback that answers each request
    /// and reports when the client closed the connection.
    fn backend() -> (SocketAddr, std::sync::mpsc::Receiver<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                }
            }
            let _ = tx.send(());
        });
        (addr, rx)
    }

    // Multi-threaded: the test blocks its thread waiting for the backend,
    // while a dropped connection's driver must still run to close it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_closes_pooled_connections_and_keeps_no_new_ones() {
        let (addr, closed) = backend();
        let pool = Pool::default();
        let mut c = connect(addr, Duration::from_secs(1)).await.unwrap();
        let req = hyper::Request::get("/")
            .header("host", "t")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = c.sender.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        drop(r);
        pool.put(c).await;
        assert_eq!(pool.idle_count(), 1);
        let (addr2, closed2) = backend();
        let c2 = connect(addr2, Duration::from_secs(1)).await.unwrap();
        pool.drain().await;
        assert_eq!(pool.idle_count(), 0);
        // The backend saw the close by the time drain returned (give the
        // kernel a moment to deliver the FIN to its thread).
        closed
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("the pooled connection was closed");
        // While draining, a connection coming back is closed, not kept.
        pool.put(c2).await;
        assert_eq!(pool.idle_count(), 0);
        closed2
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("a returned connection is closed while draining");
        // Back to normal: kept again; a connection to an old address of a
        // moved instance is never handed out (and is dropped on the way).
        pool.resume();
        let (addr3, closed3) = backend();
        pool.put(connect(addr3, Duration::from_secs(1)).await.unwrap())
            .await;
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.take(addr).is_none(), "not for another address");
        assert_eq!(pool.idle_count(), 0);
        closed3
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("the stale connection was closed");
        assert!(
            connect("127.0.0.1:1".parse().unwrap(), Duration::from_millis(200))
                .await
                .is_err()
        );
    }
}
