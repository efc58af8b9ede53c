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
//! frames (RFC 9112; the body readers are [`super::http1`]'s):
//! - request: written as [`super::server`] put it together (request line,
//!   forwarded headers, a `content-length` of the already whole body);
//! - response head: interim 1xx answers are skipped (the gateway never sends
//!   `Expect`, but an instance may send `100 Continue` anyway); a `101` is a
//!   failure (no upgrades through the gateway);
//! - response body (section 6.3): none for HEAD, 204 and 304; chunked when
//!   `transfer-encoding` ends in `chunked` (sizes by
//!   `httparse::parse_chunk_size`, trailers read and dropped); else
//!   `content-length` (several must agree); else up to the close;
//! - the connection is kept only after an HTTP/1.1 answer without
//!   `connection: close` (or an HTTP/1.0 one with `keep-alive`) whose body
//!   had a length, with no bytes left over;
//! - the answer's headers go straight into the caller's buffer as lines,
//!   without the connection-level ones and without `content-length` (the
//!   gateway frames the body again), except on a HEAD or 304 answer, whose
//!   length describes a body that is not there.

use super::http1::{self, BodyError, ConnectionHeader, Framing, Stream};
use bytes::Bytes;
use http::Method;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Headers a response may carry (hyper's client allowed 100 too).
const MAX_HEADERS: usize = 100;
/// Bytes a response head may take (hyper's client default buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// What went wrong, as far as a retry cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeError {
    /// Nothing of the request was written: it never reached the instance.
    NotSent,
    /// The request may have reached it: the connection failed after, or
    /// the answer was not HTTP the gateway can pass on.
    Reset,
}

impl From<BodyError> for ExchangeError {
    fn from(_: BodyError) -> Self {
        ExchangeError::Reset
    }
}

/// The request as it goes out, borrowed, so a retry sends the same bytes
/// without copying them.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The whole request as it is written: head, blank line, body.
    pub wire: &'a [u8],
}

/// An instance's answer; its header lines are in the caller's buffer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    /// The lines hold the instance's `date`.
    pub dated: bool,
    /// The lines hold the instance's `content-length` (a HEAD or 304
    /// answer): the gateway adds none of its own.
    pub length_in_lines: bool,
}

/// Send `req` on `s` and read the response, whose body may take up to
/// `max_body` bytes. Its forwarded header lines are appended to `lines`.
/// Returns the answer and whether the connection may be used again.
pub async fn exchange(
    s: &mut Stream,
    req: &Outgoing<'_>,
    max_body: usize,
    lines: &mut Vec<u8>,
) -> Result<(Answer, bool), ExchangeError> {
    write_request(&mut s.io, req.wire).await?;
    let head_only = *req.method == Method::HEAD;
    let mark = lines.len();
    loop {
        lines.truncate(mark);
        let head = read_head(s, head_only, lines).await?;
        if (100..200).contains(&head.status) {
            if head.status == 101 {
                return Err(ExchangeError::Reset);
            }
            continue;
        }
        let (body, framed) = match head.framing {
            Framing::Empty => (Bytes::new(), true),
            Framing::Chunked => (http1::read_chunked(s, max_body).await?, true),
            Framing::Length(n) => (http1::read_length(s, n, max_body).await?, true),
            Framing::Close => (http1::read_to_close(s, max_body).await?, false),
        };
        let keep = framed && head.keep_alive && s.buf.is_empty();
        let answer = Answer {
            status: head.status,
            body,
            dated: head.dated,
            length_in_lines: head.length_in_lines,
        };
        return Ok((answer, keep));
    }
}

async fn write_request(io: &mut TcpStream, wire: &[u8]) -> Result<(), ExchangeError> {
    // A failure on the first write (a connection the instance had already
    // reset) leaves nothing sent; after any byte went, it may have arrived.
    match io.write(wire).await {
        Ok(n) if n > 0 => io
            .write_all(&wire[n..])
            .await
            .map_err(|_| ExchangeError::Reset),
        _ => Err(ExchangeError::NotSent),
    }
}

#[derive(Debug)]
struct Head {
    status: u16,
    keep_alive: bool,
    framing: Framing,
    dated: bool,
    length_in_lines: bool,
}

async fn read_head(
    s: &mut Stream,
    head_only: bool,
    lines: &mut Vec<u8>,
) -> Result<Head, ExchangeError> {
    loop {
        if !s.buf.is_empty() {
            if let Some((n, head)) = parse_head(&s.buf, head_only, lines)? {
                bytes::Buf::advance(&mut s.buf, n);
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

/// A complete head at the front of `buf` (its length, and what it says,
/// its forwarded lines appended to `lines`), or `None` if more is needed.
fn parse_head(
    buf: &[u8],
    head_only: bool,
    lines: &mut Vec<u8>,
) -> Result<Option<(usize, Head)>, ExchangeError> {
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
        .filter(|c| (100..1000).contains(c))
        .ok_or(ExchangeError::Reset)?;
    let http10 = r.version == Some(0);
    let conn = ConnectionHeader::of(r.headers);
    let keep_alive = conn.keeps_alive(http10);
    // RFC 9112 6.3: no body after HEAD, nor in a 1xx, 204 or 304 answer;
    // a HEAD or 304 answer's length is the length of a body not sent, and
    // goes on as it is.
    let no_body = head_only || status < 200 || status == 204 || status == 304;
    let length_in_lines = head_only || status == 304;
    let mut chunked = None;
    let mut length = None;
    let mut dated = false;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(http1::ends_chunked(h.value));
            continue;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(http1::content_length(h.value, length).ok_or(ExchangeError::Reset)?);
            if length_in_lines {
                http1::put_header(lines, h.name.as_bytes(), h.value);
            }
            continue;
        }
        if conn.drops(h.name) {
            continue;
        }
        dated |= h.name.eq_ignore_ascii_case("date");
        http1::put_header(lines, h.name.as_bytes(), h.value);
    }
    let framing = match (no_body, chunked, length) {
        (true, _, _) => Framing::Empty,
        (false, Some(true), _) => Framing::Chunked,
        (false, Some(false), _) => Framing::Close,
        (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) => Framing::Close,
    };
    Ok(Some((
        n,
        Head {
            status,
            keep_alive,
            framing,
            dated,
            length_in_lines,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

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
    ) -> (Result<(Answer, bool), ExchangeError>, Stream, String) {
        let mut s = Stream::new(TcpStream::connect(addr).await.unwrap());
        let mut wire = format!("{method} /a?b=1 HTTP/1.1\r\nhost: t\r\n").into_bytes();
        if !body.is_empty() {
            wire.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(body);
        let req = Outgoing {
            method: &method,
            wire: &wire,
        };
        let mut lines = vec![];
        let r = exchange(&mut s, &req, 1 << 20, &mut lines).await;
        (r, s, String::from_utf8(lines).unwrap())
    }

    #[tokio::test]
    async fn length_framed_answer_keeps_the_connection_and_the_request_goes_as_it_is() {
        let (addr, seen) = backend(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nConnection: keep-alive\r\n\r\nhello"],
            false,
        )
        .await;
        let (r, s, lines) = send(addr, Method::POST, b"abc").await;
        let (answer, keep) = r.unwrap();
        assert!(keep);
        assert!(s.idle_ok());
        assert_eq!(answer.status, 200);
        // Forwarded: the instance's own headers, not its framing.
        assert_eq!(lines, "X-A: 1\r\n");
        assert!(!answer.dated && !answer.length_in_lines);
        assert_eq!(answer.body, "hello");
        drop(s);
        let req = String::from_utf8(seen.await.unwrap().remove(0)).unwrap();
        assert_eq!(
            req,
            "POST /a?b=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc"
        );
    }

    #[tokio::test]
    async fn chunked_answer_after_an_interim_one_is_joined_and_trailers_dropped() {
        let (addr, _seen) = backend(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"],
            false,
        )
        .await;
        let (r, _s, lines) = send(addr, Method::GET, b"").await;
        let (answer, keep) = r.unwrap();
        assert!(keep);
        assert_eq!(answer.status, 201);
        assert_eq!(answer.body, "abcde");
        assert_eq!(lines, "");
    }

    #[tokio::test]
    async fn close_delimited_and_connection_close_answers_are_not_kept() {
        let (addr, _) = backend(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"], true).await;
        let (r, _s, _) = send(addr, Method::GET, b"").await;
        let (answer, keep) = r.unwrap();
        assert!(!keep);
        assert_eq!(answer.body, "until the end");
        let (addr, _) = backend(
            vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"],
            true,
        )
        .await;
        let (r, _s, _) = send(addr, Method::GET, b"").await;
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
        let (r, _s, lines) = send(addr, Method::HEAD, b"").await;
        let (answer, keep) = r.unwrap();
        assert!(keep);
        assert!(answer.length_in_lines);
        assert_eq!(lines, "content-length: 100\r\n");
        assert!(answer.body.is_empty());
        let (addr, _) = backend(
            vec![b"HTTP/1.1 204 No Content\r\nDate: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\n"],
            false,
        )
        .await;
        let (r, _s, _) = send(addr, Method::DELETE, b"").await;
        let (answer, _) = r.unwrap();
        assert_eq!(answer.status, 204);
        assert!(answer.dated && !answer.length_in_lines);
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
            let (r, _s, _) = send(addr, Method::GET, b"").await;
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
        let (r, _s, _) = send(addr, Method::GET, b"").await;
        assert_eq!(r.err(), Some(ExchangeError::Reset));
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_seen_before_use() {
        let (addr, _) = backend(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], true).await;
        let (r, s, _) = send(addr, Method::GET, b"").await;
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
        let framing = |head: &str, head_only: bool| {
            parse_head(head.as_bytes(), head_only, &mut vec![]).map(|h| h.unwrap().1.framing)
        };
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(
                &format!("{ok}transfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n"),
                false
            ),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&format!("{ok}transfer-encoding: gzip\r\n\r\n"), false),
            Ok(Framing::Close)
        );
        assert_eq!(
            framing(&format!("{ok}content-length: 7, 7\r\n\r\n"), false),
            Ok(Framing::Length(7))
        );
        assert_eq!(framing(&format!("{ok}\r\n"), false), Ok(Framing::Close));
        assert_eq!(
            framing(&format!("{ok}content-length: 7\r\n\r\n"), true),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
                false
            ),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing(&format!("{ok}content-length: -1\r\n\r\n"), false),
            Err(ExchangeError::Reset)
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", false, &mut vec![])
                .unwrap()
                .map(|h| h.0),
            None
        );
    }
}
