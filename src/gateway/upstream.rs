//! One HTTP/1.1 exchange with an instance, on the request's own task: write
//! the request, read the whole response, say whether the connection may be
//! kept.
//!
//! Why not hyper's client connection (which the gateway used before): it runs
//! each connection's I/O on a task of its own. A request went to that task
//! through a channel and its response came back through a oneshot and a
//! body channel, so every request crossed the runtime's queue twice and
//! paid for hyper's dispatcher on both sides. At full load mosgw spent
//! 6.2 us of user CPU per request against nginx's 2.8 (`perf`, BENCHMARKS
//! section 20), and that was its gap to nginx's maximum rate: the kernel's
//! share was the same for both. Driving hyper's connection on the
//! request's task instead cost more (section 6: each queued request woke
//! the task that was already running). Here the exchange is plain reads
//! and writes on the pooled socket.
//!
//! The parsing is httparse's, the parser hyper itself uses; this module only
//! frames (RFC 9112):
//! - request: `METHOD target HTTP/1.1`, the forwarded headers, and a
//!   `content-length` of the (already whole) body;
//! - response head: interim 1xx answers are skipped (the gateway never sends
//!   `Expect`, but an instance may send `100 Continue` anyway); a `101` is a
//!   failure (no upgrades through the gateway);
//! - response body (section 6.3): none for HEAD, 204 and 304; chunked when
//!   `transfer-encoding` ends in `chunked` (sizes by
//!   `httparse::parse_chunk_size`, trailers read and dropped); else
//!   `content-length` (several must agree); else up to the close;
//! - the connection is kept only after an HTTP/1.1 answer without
//!   `connection: close` (or an HTTP/1.0 one with `keep-alive`) whose body
//!   had a length, with no bytes left over.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body_util::Full;
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers a response may carry (hyper's client allowed 100 too).
const MAX_HEADERS: usize = 100;
/// Bytes a response head may take (hyper's client default buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Bytes a chunk-size line or a trailer line may take.
const MAX_LINE: usize = 4096;
/// Bodies up to this size go out in the same write as the head.
const COPY_BODY: usize = 16 * 1024;

/// What went wrong, as far as a retry cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeError {
    /// Nothing of the request was written: it never reached the instance.
    NotSent,
    /// The request may have reached it: the connection failed after, or
    /// the answer was not HTTP the gateway can pass on.
    Reset,
}

/// The request as it goes out: the forwarded parts, borrowed, so a retry
/// sends the same ones without copying them.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Origin form (`/path?query`).
    pub target: &'a str,
    /// Hop-by-hop headers already removed; `content-length` and `expect`
    /// are written here, not copied.
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

/// A connection to an instance and the bytes read from it but not yet used.
pub struct Stream {
    pub io: TcpStream,
    buf: BytesMut,
}

impl Stream {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(8192),
        }
    }

    /// Whether an idle kept connection still looks usable: nothing to read
    /// (a closed one reads end-of-file, a confused one has bytes nobody
    /// asked for). Uses the runtime's readiness, so mostly no system call.
    pub fn idle_ok(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// More bytes into the buffer; `Ok(0)` at end of file.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        self.io.read_buf(&mut self.buf).await
    }
}

/// Send `req` on `s` and read the response, whose body may take up to
/// `max_body` bytes. Returns the response (no `content-length` and no
/// hop-by-hop framing headers: the gateway's server side frames it again)
/// and whether the connection may be used again.
pub async fn exchange(
    s: &mut Stream,
    req: &Outgoing<'_>,
    max_body: usize,
) -> Result<(Response<Full<Bytes>>, bool), ExchangeError> {
    write_request(&mut s.io, req).await?;
    let head_only = *req.method == Method::HEAD;
    loop {
        let head = read_head(s).await?;
        if head.status.is_informational() {
            if head.status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(ExchangeError::Reset);
            }
            continue;
        }
        let no_body = head_only
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        let (body, framed) = if no_body {
            (Bytes::new(), true)
        } else {
            match framing(&head.headers)? {
                Framing::Chunked => (read_chunked(s, max_body).await?, true),
                Framing::Length(n) => (read_length(s, n, max_body).await?, true),
                Framing::Close => (read_to_close(s, max_body).await?, false),
            }
        };
        let keep = framed && head.keep_alive && s.buf.is_empty();
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        return Ok((resp, keep));
    }
}

async fn write_request(io: &mut TcpStream, req: &Outgoing<'_>) -> Result<(), ExchangeError> {
    let mut out = Vec::with_capacity(256 + req.body.len().min(COPY_BODY));
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::EXPECT {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A length whenever there is a body, and for the methods that expect
    // one even when it is empty (as hyper's client did).
    let needs_length =
        !req.body.is_empty() || matches!(*req.method, Method::POST | Method::PUT | Method::PATCH);
    if needs_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(req.body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let big = req.body.len() > COPY_BODY;
    if !big {
        out.extend_from_slice(req.body);
    }
    // A failure on the first write (a connection the instance had already
    // reset) leaves nothing sent; after any byte went, it may have arrived.
    match io.write(&out).await {
        Ok(n) if n > 0 => {
            io.write_all(&out[n..])
                .await
                .map_err(|_| ExchangeError::Reset)?;
        }
        _ => return Err(ExchangeError::NotSent),
    }
    if big {
        io.write_all(req.body)
            .await
            .map_err(|_| ExchangeError::Reset)?;
    }
    Ok(())
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
}

async fn read_head(s: &mut Stream) -> Result<Head, ExchangeError> {
    loop {
        if !s.buf.is_empty() {
            if let Some(head) = parse_head(&mut s.buf)? {
                return Ok(head);
            }
            if s.buf.len() >= MAX_HEAD_BYTES {
                return Err(ExchangeError::Reset);
            }
        }
        match s.fill().await {
            Ok(0) | Err(_) => return Err(ExchangeError::Reset),
            Ok(_) => {}
        }
    }
}

/// A complete head off the front of `buf`, or `None` if more is needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    // Uninitialised slots: filling 100 empty headers first cost a 3 KiB
    // memset per response.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut r, buf, &mut slots);
    let n = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ExchangeError::Reset),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Reset)?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut close = version == Version::HTTP_10;
    // Names now, values as places in the head: each value becomes a slice
    // of the head's bytes rather than a copy.
    let start = buf.as_ptr() as usize;
    let mut found = Vec::with_capacity(r.headers.len());
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| ExchangeError::Reset)?;
        if name == http::header::CONNECTION {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        let at = h.value.as_ptr() as usize - start;
        found.push((name, at..at + h.value.len()));
    }
    let raw = buf.split_to(n).freeze();
    let mut headers = HeaderMap::with_capacity(found.len());
    for (name, at) in found {
        let value =
            HeaderValue::from_maybe_shared(raw.slice(at)).map_err(|_| ExchangeError::Reset)?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        keep_alive: !close,
    }))
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(usize),
    Close,
}

fn framing(h: &HeaderMap) -> Result<Framing, ExchangeError> {
    if let Some(te) = h
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for v in h.get_all(http::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n: usize = std::str::from_utf8(part.trim_ascii())
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or(ExchangeError::Reset)?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Reset);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

async fn read_length(s: &mut Stream, n: usize, max: usize) -> Result<Bytes, ExchangeError> {
    if n > max {
        return Err(ExchangeError::Reset);
    }
    while s.buf.len() < n {
        if s.buf.capacity() - s.buf.len() < n - s.buf.len() {
            s.buf.reserve(n - s.buf.len());
        }
        match s.fill().await {
            Ok(0) | Err(_) => return Err(ExchangeError::Reset),
            Ok(_) => {}
        }
    }
    Ok(s.buf.split_to(n).freeze())
}

async fn read_to_close(s: &mut Stream, max: usize) -> Result<Bytes, ExchangeError> {
    loop {
        if s.buf.len() > max {
            return Err(ExchangeError::Reset);
        }
        match s.fill().await {
            Ok(0) => return Ok(s.buf.split().freeze()),
            Ok(_) => {}
            Err(_) => return Err(ExchangeError::Reset),
        }
    }
}

async fn read_chunked(s: &mut Stream, max: usize) -> Result<Bytes, ExchangeError> {
    let mut body = BytesMut::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(&s.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    s.buf.advance(used);
                    break size;
                }
                Ok(httparse::Status::Partial) if s.buf.len() < MAX_LINE => {}
                _ => return Err(ExchangeError::Reset),
            }
            more(s).await?;
        };
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| ExchangeError::Reset)?;
        if body.len() + size > max {
            return Err(ExchangeError::Reset);
        }
        while s.buf.len() < size + 2 {
            more(s).await?;
        }
        body.extend_from_slice(&s.buf[..size]);
        if &s.buf[size..size + 2] != b"\r\n" {
            return Err(ExchangeError::Reset);
        }
        s.buf.advance(size + 2);
    }
    // Trailers (dropped), up to the empty line.
    loop {
        match s.buf.windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                s.buf.advance(2);
                return Ok(body.freeze());
            }
            Some(end) => s.buf.advance(end + 2),
            None if s.buf.len() < MAX_LINE => more(s).await?,
            None => return Err(ExchangeError::Reset),
        }
    }
}

async fn more(s: &mut Stream) -> Result<(), ExchangeError> {
    match s.fill().await {
        Ok(0) | Err(_) => Err(ExchangeError::Reset),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on loopback that reads one request head (and a body of the
    /// given length), records it, and answers with `answer` bytes; then
    /// closes or keeps reading as told.
    async fn backend(
        answers: Vec<&'static [u8]>,
        close_after: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut seen = vec![];
            for a in answers {
                let mut req = vec![];
                let mut b = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut b).await.unwrap();
                    assert!(n > 0, "client closed early");
                    req.extend_from_slice(&b[..n]);
                }
                seen.push(req);
                c.write_all(a).await.unwrap();
            }
            if close_after {
                drop(c);
            } else {
                let mut b = [0u8; 64];
                let _ = c.read(&mut b).await;
            }
            seen
        });
        (addr, task)
    }

    async fn send(
        addr: std::net::SocketAddr,
        method: Method,
        body: &'static [u8],
    ) -> (Result<(Response<Full<Bytes>>, bool), ExchangeError>, Stream) {
        let mut s = Stream::new(TcpStream::connect(addr).await.unwrap());
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("t"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        let body = Bytes::from_static(body);
        let req = Outgoing {
            method: &method,
            target: "/a?b=1",
            headers: &h,
            body: &body,
        };
        let r = exchange(&mut s, &req, 1 << 20).await;
        (r, s)
    }

    async fn body_of(r: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt;
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn length_framed_answer_keeps_the_connection_and_the_request_is_framed_once() {
        let (addr, seen) = backend(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"],
            false,
        )
        .await;
        let (r, s) = send(addr, Method::POST, b"abc").await;
        let (resp, keep) = r.unwrap();
        assert!(keep);
        assert!(s.idle_ok());
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-a"], "1");
        assert_eq!(body_of(resp).await, "hello");
        drop(s);
        let req = String::from_utf8(seen.await.unwrap().remove(0)).unwrap();
        assert!(req.starts_with("POST /a?b=1 HTTP/1.1\r\n"), "{req}");
        // The client's length and expect are not copied; ours is the body's.
        assert_eq!(req.matches("content-length").count(), 1, "{req}");
        assert!(req.contains("content-length: 3\r\n"), "{req}");
        assert!(!req.contains("expect"), "{req}");
        assert!(req.ends_with("\r\n\r\nabc"), "{req}");
    }

    #[tokio::test]
    async fn chunked_answer_after_an_interim_one_is_joined_and_trailers_dropped() {
        let (addr, _seen) = backend(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"],
            false,
        )
        .await;
        let (r, _s) = send(addr, Method::GET, b"").await;
        let (resp, keep) = r.unwrap();
        assert!(keep);
        assert_eq!(resp.status(), 201);
        assert_eq!(body_of(resp).await, "abcde");
    }

    #[tokio::test]
    async fn close_delimited_and_connection_close_answers_are_not_kept() {
        let (addr, _) = backend(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"], true).await;
        let (r, _s) = send(addr, Method::GET, b"").await;
        let (resp, keep) = r.unwrap();
        assert!(!keep);
        assert_eq!(body_of(resp).await, "until the end");
        let (addr, _) = backend(
            vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"],
            true,
        )
        .await;
        let (r, _s) = send(addr, Method::GET, b"").await;
        assert!(!r.unwrap().1);
        // HTTP/1.0 without keep-alive: not kept; with it: kept.
        let (addr, _) = backend(
            vec![b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            true,
        )
        .await;
        assert!(!send(addr, Method::GET, b"").await.0.unwrap().1);
        let (addr, _) = backend(
            vec![b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\nok"],
            false,
        )
        .await;
        assert!(send(addr, Method::GET, b"").await.0.unwrap().1);
    }

    #[tokio::test]
    async fn head_and_no_content_answers_have_no_body() {
        let (addr, _) = backend(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"],
            false,
        )
        .await;
        let (r, _s) = send(addr, Method::HEAD, b"").await;
        let (resp, keep) = r.unwrap();
        assert!(keep);
        assert_eq!(resp.headers()["content-length"], "100");
        assert!(body_of(resp).await.is_empty());
        let (addr, _) = backend(vec![b"HTTP/1.1 204 No Content\r\n\r\n"], false).await;
        let (r, _s) = send(addr, Method::DELETE, b"").await;
        assert_eq!(r.unwrap().0.status(), 204);
    }

    #[tokio::test]
    async fn broken_answers_are_failures_that_may_have_reached_the_instance() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
            b"",
        ] {
            let (addr, _) = backend(vec![bad], true).await;
            let (r, _s) = send(addr, Method::GET, b"").await;
            assert_eq!(
                r.err(),
                Some(ExchangeError::Reset),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (addr, _) = backend(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5000000\r\n\r\n"],
            true,
        )
        .await;
        let (r, _s) = send(addr, Method::GET, b"").await;
        assert_eq!(r.err(), Some(ExchangeError::Reset));
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_seen_before_use() {
        let (addr, _) = backend(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], true).await;
        let (r, s) = send(addr, Method::GET, b"").await;
        assert!(r.unwrap().1);
        // The instance closes it after answering: once the close is seen,
        // the connection is no longer usable.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while s.idle_ok() {
            assert!(std::time::Instant::now() < deadline, "close not seen");
            s.io.readable().await.unwrap();
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
            pairs
                .iter()
                .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect()
        };
        assert_eq!(
            framing(&h(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "3")
            ])),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&h(&[("transfer-encoding", "gzip")])),
            Ok(Framing::Close)
        );
        assert_eq!(
            framing(&h(&[("content-length", "7, 7")])),
            Ok(Framing::Length(7))
        );
        assert_eq!(framing(&h(&[])), Ok(Framing::Close));
        assert_eq!(
            framing(&h(&[("content-length", "-1")])),
            Err(ExchangeError::Reset)
        );
    }
}
