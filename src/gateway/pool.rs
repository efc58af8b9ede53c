//! Keep-alive connections to one instance, which the gateway can close on
//! demand before the instance is frozen.
//!
//! Why not hyper-util's pooled client: its pool cannot be told "close every
//! connection to this host now", which is what a freeze needs (CRIU refuses
//! a job with an established connection). Here a connection is a plain
//! socket that [`super::upstream`] speaks HTTP/1.1 on, from the request's own
//! task; closing it is dropping it, so the socket is gone when `drain`
//! returns.

use super::http1::Stream;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Idle connections kept per instance.
pub const MAX_IDLE: usize = 256;

pub struct Conn {
    pub addr: SocketAddr,
    pub stream: Stream,
}

/// Open a connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        addr,
        stream: Stream::new(stream),
    })
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Conn>>,
    /// Set while the instance is drained for a freeze: connections coming
    /// back from requests are closed, not kept.
    draining: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map(|g| g.len()).unwrap_or(0);
        f.debug_struct("Pool")
            .field("idle", &idle)
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Pool {
    /// An idle connection to `addr` that is still open.
    pub fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut g = self.idle.lock().ok()?;
        while let Some(c) = g.pop() {
            if c.addr == addr && c.stream.idle_ok() {
                return Some(c);
            }
            // Stale (closed by the instance, or the instance moved):
            // dropped, which closes it.
        }
        None
    }

    /// Give a connection back after a complete exchange (closed instead
    /// while draining, or when enough are kept).
    pub fn put(&self, c: Conn) {
        if self.draining.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut g) = self.idle.lock() {
            if g.len() < MAX_IDLE {
                g.push(c);
            }
        }
    }

    /// Stop keeping connections and close the idle ones (for a freeze).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        if let Ok(mut g) = self.idle.lock() {
            g.clear();
        }
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
        use super::super::upstream::{exchange, Outgoing};
        let (addr, closed) = backend();
        let pool = Pool::default();
        let mut c = connect(addr, Duration::from_secs(1)).await.unwrap();
        let req = Outgoing {
            method: &http::Method::GET,
            wire: b"GET / HTTP/1.1\r\nhost: t\r\n\r\n",
        };
        let (r, keep) = exchange(&mut c.stream, &req, 1024, &mut vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(keep);
        pool.put(c);
        assert_eq!(pool.idle_count(), 1);
        let (addr2, closed2) = backend();
        let c2 = connect(addr2, Duration::from_secs(1)).await.unwrap();
        pool.drain();
        assert_eq!(pool.idle_count(), 0);
        // The backend saw the close by the time drain returned (give the
        // kernel a moment to deliver the FIN to its thread).
        closed
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("the pooled connection was closed");
        // While draining, a connection coming back is closed, not kept.
        pool.put(c2);
        assert_eq!(pool.idle_count(), 0);
        closed2
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("a returned connection is closed while draining");
        // Back to normal: kept again; a connection to an old address of a
        // moved instance is never handed out (and is dropped on the way).
        pool.resume();
        let (addr3, closed3) = backend();
        pool.put(connect(addr3, Duration::from_secs(1)).await.unwrap());
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
