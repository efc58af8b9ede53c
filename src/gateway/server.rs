//! The client side of an HTTP/1.1 connection: read a request (head and
//! whole body) within the limits, and write an answer.
//!
//! Why not hyper's server (which the gateway used before): at full load its
//! per-request machinery was the largest share of mosgw's user CPU left
//! after [`super::upstream`] dropped hyper's client (BENCHMARKS section 21):
//! a `HeaderMap` built and hashed for every request and answer, a
//! reference-counted `Bytes` per header value, a boxed timer armed and
//! disarmed per request for its header timeout, a cached date checked
//! against the clock per answer. Here the request head is parsed by
//! httparse (the parser hyper uses) and written at once, filtered, into the
//! bytes that go to the instance; the answer's lines come from the instance
//! the same way; one timer per connection (a [`Watchdog`]) keeps every
//! deadline.
//!
//! What a client gets (the connection is closed after each refusal):
//! - a head that is not HTTP/1.x, or a bad target, length or chunking →
//!   400; `CONNECT` → 405;
//! - a head larger than `max_header_bytes`, or over 100 headers → 431;
//! - a first head not complete within `header_timeout_ms` of the accept
//!   → 408 (a later one, of a kept connection: 408 if part of it came,
//!   else the idle connection is just closed);
//! - a body longer than `max_body_bytes` (by `Content-Length`, or as the
//!   chunks arrive) → 413; not complete within `body_timeout_ms` → 408;
//!   an answer not taken within `body_timeout_ms` → the connection is
//!   closed (a client that stops reading would hold it for good);
//! - `Expect: 100-continue` is answered with `100 Continue` before the body
//!   is read (the instance never sees it: the body is sent whole);
//! - `Transfer-Encoding` together with `Content-Length`, or on an HTTP/1.0
//!   request, or not ending in `chunked` → 400 (RFC 9112 6.1: a server may
//!   not guess, and a proxy that guesses differently from the next hop is
//!   how requests are smuggled).
//!
//! The request forwarded is the request line (an absolute-form target cut
//! to its path), the client's headers without the connection-level ones,
//! `Content-Length` and `Expect`, one `X-Forwarded-For` with the client
//! appended, our `content-length` when there is a body (or the method
//! expects one), and the body. The answer is `HTTP/1.1`, the instance's
//! status and forwarded lines, a `date` if the instance sent none, our
//! `content-length`, and `connection: close` when the connection ends
//! after it (`keep-alive` to an HTTP/1.0 client that asked for it).

use super::http1::{self, BodyError, ConnectionHeader, Framing, Stream};
use super::Limits;
use bytes::Bytes;
use http::Method;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

/// Headers a request may carry (as hyper's server: more is a 431).
const MAX_HEADERS: usize = 100;
/// Bodies up to this size go out in the same write as the head.
const COPY_BODY: usize = 16 * 1024;

/// Every deadline of a connection on one timer.
///
/// A timer armed and dropped per request cost about 3% of mosgw's CPU at
/// full load (its registration, its removal, and a clock read each). Here
/// the timer is only ever moved *earlier*: a wait with a later deadline
/// leaves it where it is, and when it fires early the wait looks at the
/// clock and sets it to its own deadline. A connection that answers
/// thousands of requests a second so moves its timer about once per
/// timeout (10 s by default) instead of twice per request.
pub struct Watchdog {
    sleep: Pin<Box<Sleep>>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self::new()
    }
}

impl Watchdog {
    pub fn new() -> Self {
        // Far enough to be "never" (the first wait moves it earlier).
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        Self {
            sleep: Box::pin(tokio::time::sleep_until(far)),
        }
    }

    /// `f`'s output, or `None` if `deadline` passed first.
    pub async fn within<F: Future>(&mut self, deadline: Instant, f: F) -> Option<F::Output> {
        let deadline = tokio::time::Instant::from_std(deadline);
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        tokio::pin!(f);
        loop {
            tokio::select! {
                biased;
                r = &mut f => return Some(r),
                () = &mut self.sleep => {
                    if tokio::time::Instant::now() >= deadline {
                        return None;
                    }
                    self.sleep.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// A request refused: its status and a sentence for the client. The
/// connection is closed after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub why: String,
}

fn refuse(status: u16, why: impl Into<String>) -> Refusal {
    Refusal {
        status,
        why: why.into(),
    }
}

/// A request read whole; what it goes out as is in the caller's `wire`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    /// Where the target is in `wire` (for the access log).
    pub target: Range<usize>,
    /// The connection stays open after the answer.
    pub keep_alive: bool,
    pub http10: bool,
}

/// The head of a request, parsed; its forwarded form is in `wire`.
#[derive(Debug, PartialEq)]
struct Head {
    req: Request,
    framing: Framing,
    expect_continue: bool,
}

/// Read the next request on `s` into `wire` (cleared first): head and
/// whole body. `Ok(None)`: the client closed, or an idle kept connection
/// timed out; nothing to answer. A refusal is to be answered, then the
/// connection closed.
pub async fn read_request(
    s: &mut Stream,
    wd: &mut Watchdog,
    lim: &Limits,
    waiting_since: Instant,
    first: bool,
    client_ip: &[u8],
    wire: &mut Vec<u8>,
) -> Result<Option<Request>, Refusal> {
    let head_deadline = waiting_since + Duration::from_millis(lim.header_timeout_ms);
    // A head not yet complete leaves nothing in `wire`: cleared once.
    wire.clear();
    let head = loop {
        if !s.buf.is_empty() {
            if let Some((n, head)) = parse_head(&s.buf, lim.max_header_bytes, client_ip, wire)? {
                bytes::Buf::advance(&mut s.buf, n);
                break head;
            }
            if s.buf.len() >= lim.max_header_bytes {
                return Err(too_large_head(lim));
            }
        }
        match wd.within(head_deadline, s.fill()).await {
            None if first || !s.buf.is_empty() => {
                return Err(refuse(408, "the request head did not arrive in time"))
            }
            None | Some(Err(_)) | Some(Ok(0)) => return Ok(None),
            Some(Ok(_)) => {}
        }
    };
    let Head {
        req,
        framing,
        expect_continue,
    } = head;
    let needs_length = matches!(req.method, Method::POST | Method::PUT | Method::PATCH);
    let body = match framing {
        Framing::Empty | Framing::Close => Bytes::new(),
        Framing::Length(n) if n > lim.max_body_bytes => return Err(too_large_body(lim)),
        Framing::Length(n) if s.buf.len() >= n => s.buf.split_to(n).freeze(),
        _ => {
            if expect_continue {
                // A client that asked waits for this before it sends.
                let _ = s.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            }
            let deadline = Instant::now() + Duration::from_millis(lim.body_timeout_ms);
            let max = lim.max_body_bytes;
            let read = async {
                match framing {
                    Framing::Length(n) => http1::read_length(s, n, max).await,
                    _ => http1::read_chunked(s, max).await,
                }
            };
            match wd.within(deadline, read).await {
                None => return Err(refuse(408, "the request body did not arrive in time")),
                Some(Err(BodyError::TooLarge)) => return Err(too_large_body(lim)),
                Some(Err(BodyError::Broken)) => {
                    return Err(refuse(400, "bad request body: malformed or cut short"))
                }
                Some(Ok(b)) => b,
            }
        }
    };
    if !body.is_empty() || needs_length {
        http1::put_header(wire, b"content-length", body.len().to_string().as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    wire.extend_from_slice(&body);
    Ok(Some(req))
}

fn too_large_head(lim: &Limits) -> Refusal {
    refuse(
        431,
        format!("request head larger than {} bytes", lim.max_header_bytes),
    )
}

fn too_large_body(lim: &Limits) -> Refusal {
    refuse(
        413,
        format!("request body larger than {} bytes", lim.max_body_bytes),
    )
}

/// A complete request head at the front of `buf` (its length, what it
/// says), written forwarded into `wire` up to its last header line; or
/// `None` if more is needed.
fn parse_head(
    buf: &[u8],
    max_head: usize,
    client_ip: &[u8],
    wire: &mut Vec<u8>,
) -> Result<Option<(usize, Head)>, Refusal> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut r, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(
                431,
                format!("more than {MAX_HEADERS} request headers"),
            ))
        }
        Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
    };
    if n > max_head {
        return Err(refuse(
            431,
            format!("request head larger than {max_head} bytes"),
        ));
    }
    let (Some(method), Some(target)) = (r.method, r.path) else {
        return Err(refuse(400, "malformed request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| refuse(400, "malformed request method"))?;
    if method == Method::CONNECT {
        return Err(refuse(405, "CONNECT is not supported"));
    }
    let target = origin_form(target).ok_or_else(|| refuse(400, "bad request target"))?;
    let http10 = r.version == Some(0);
    let conn = ConnectionHeader::of(r.headers);
    let keep_alive = conn.keeps_alive(http10);

    wire.extend_from_slice(method.as_str().as_bytes());
    wire.push(b' ');
    let at = wire.len();
    wire.extend_from_slice(target.as_bytes());
    let target_at = at..wire.len();
    wire.extend_from_slice(b" HTTP/1.1\r\n");

    let mut chunked = None;
    let mut length = None;
    let mut expect_continue = false;
    let mut forwarded_for: Option<Vec<u8>> = None;
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(http1::ends_chunked(h.value));
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                http1::content_length(h.value, length)
                    .ok_or_else(|| refuse(400, "bad content-length"))?,
            );
            continue;
        }
        if name.eq_ignore_ascii_case("expect") {
            expect_continue |= h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Several are one list (RFC 9110 5.3): joined, ours last.
            let v = forwarded_for.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(h.value.trim_ascii());
            continue;
        }
        if conn.drops(name) {
            continue;
        }
        http1::put_header(wire, name.as_bytes(), h.value);
    }
    match forwarded_for {
        None => http1::put_header(wire, b"x-forwarded-for", client_ip),
        Some(mut v) => {
            if !v.is_empty() {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip);
            http1::put_header(wire, b"x-forwarded-for", &v);
        }
    }
    let framing = match (chunked, length) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                400,
                "both transfer-encoding and content-length: ambiguous framing",
            ))
        }
        (Some(_), None) if http10 => {
            return Err(refuse(400, "transfer-encoding in an HTTP/1.0 request"))
        }
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(refuse(400, "transfer-encoding must end in chunked")),
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    Ok(Some((
        n,
        Head {
            req: Request {
                method,
                target: target_at,
                keep_alive,
                http10,
            },
            framing,
            expect_continue: expect_continue && !http10,
        },
    )))
}

/// The target as an instance expects it: origin form (`/path?query`) and
/// `*` as they came; an absolute form (a proxy request) cut to its path.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') || target == "*" {
        return Some(target);
    }
    let scheme_end = target.find("://")?;
    if !target[..scheme_end].eq_ignore_ascii_case("http")
        && !target[..scheme_end].eq_ignore_ascii_case("https")
    {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        // `http://host?q` has an empty path: "/" would drop the query, and
        // such a target is too odd to repair.
        Some(_) => None,
        None => Some("/"),
    }
}

/// Buffers above this are let go after a request.
const KEEP_BUFFER: usize = 64 * 1024;

/// Let go of a connection's buffers if a large request grew them.
pub fn shrink(wire: &mut Vec<u8>, read: &mut bytes::BytesMut) {
    if wire.capacity() > KEEP_BUFFER {
        *wire = Vec::with_capacity(1024);
    }
    if read.capacity() > KEEP_BUFFER && read.len() < 8192 {
        let mut fresh = bytes::BytesMut::with_capacity(8192);
        fresh.extend_from_slice(read);
        *read = fresh;
    }
}

/// What goes back to the client.
pub struct Reply<'a> {
    pub status: u16,
    /// Header lines (`name: value\r\n` each).
    pub lines: &'a [u8],
    pub body: &'a [u8],
    /// The lines carry a `date`.
    pub dated: bool,
    /// The lines carry the length (a HEAD or 304 answer forwarded).
    pub length_in_lines: bool,
    /// Close the connection after it.
    pub close: bool,
}

/// Write `reply` to the client of `req` (None: a request refused before
/// it was read); `out` is a scratch buffer.
pub async fn write_reply(
    io: &mut tokio::net::TcpStream,
    req: Option<&Request>,
    reply: &Reply<'_>,
    now: Instant,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::io::Write;
    out.clear();
    // Into the buffer as it grows: no string made per answer. (A write
    // into a Vec cannot fail.)
    let reason = http::StatusCode::from_u16(reply.status)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", reply.status);
    out.extend_from_slice(reply.lines);
    if !reply.dated {
        DATE.with(|d| out.extend_from_slice(d.borrow_mut().at(now)));
    }
    let head_only = req.is_some_and(|r| r.method == Method::HEAD);
    let bodiless = reply.status < 200 || reply.status == 204 || reply.status == 304;
    if !bodiless && !reply.length_in_lines {
        let _ = write!(out, "content-length: {}\r\n", reply.body.len());
    }
    if reply.close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if req.is_some_and(|r| r.http10) {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let body = if head_only || bodiless {
        &[][..]
    } else {
        reply.body
    };
    if body.len() <= COPY_BODY {
        out.extend_from_slice(body);
        io.write_all(out).await
    } else {
        io.write_all(out).await?;
        io.write_all(body).await
    }
}

/// A `date` header line, made again at most once a second.
struct DateLine {
    made: Option<Instant>,
    line: Vec<u8>,
}

impl DateLine {
    fn at(&mut self, now: Instant) -> &[u8] {
        let stale = self
            .made
            .is_none_or(|m| now.saturating_duration_since(m) >= Duration::from_secs(1));
        if stale {
            self.line.clear();
            self.line.extend_from_slice(b"date: ");
            self.line
                .extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
            self.line.extend_from_slice(b"\r\n");
            self.made = Some(now);
        }
        &self.line
    }
}

thread_local! {
    static DATE: std::cell::RefCell<DateLine> = const {
        std::cell::RefCell::new(DateLine { made: None, line: Vec::new() })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<(usize, Head, String)>, Refusal> {
        let mut wire = vec![];
        parse_head(raw.as_bytes(), 16 << 10, b"10.0.0.9", &mut wire)
            .map(|o| o.map(|(n, h)| (n, h, String::from_utf8(wire).unwrap())))
    }

    fn status(raw: &str) -> u16 {
        parse(raw).expect_err(raw).status
    }

    #[test]
    fn a_request_head_is_forwarded_without_its_framing_and_hop_by_hop_headers() {
        let raw = "POST /a?b=1 HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nContent-Length: 5\r\nExpect: 100-continue\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\nhello";
        let (n, head, wire) = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], "hello");
        assert_eq!(
            wire,
            "POST /a?b=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.9\r\n"
        );
        assert_eq!(&wire[head.req.target.clone()], "/a?b=1");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.expect_continue);
        assert!(head.req.keep_alive && !head.req.http10);
        assert_eq!(head.req.method, Method::POST);
        // A plain GET: the client's address is the whole list.
        let (_, head, wire) = parse("GET / HTTP/1.1\r\nhost: t\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            wire,
            "GET / HTTP/1.1\r\nhost: t\r\nx-forwarded-for: 10.0.0.9\r\n"
        );
        assert_eq!(head.framing, Framing::Empty);
        // More is needed.
        assert_eq!(parse("GET / HTTP/1.1\r\nhost: t\r\n").unwrap(), None);
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let ka = |raw: &str| parse(raw).unwrap().unwrap().1.req.keep_alive;
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn bad_heads_are_refused_with_the_right_status() {
        assert_eq!(status("NOT HTTP AT ALL\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status("GET nowhere HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("CONNECT h:443 HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n"),
            400
        );
        let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let mut wire = vec![];
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(
            parse_head(big.as_bytes(), 8192, b"ip", &mut wire)
                .unwrap_err()
                .status,
            431
        );
        // Chunked (its last coding) is a body to read.
        let (_, head, _) = parse("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
    }

    #[test]
    fn absolute_targets_are_cut_to_their_path() {
        assert_eq!(origin_form("/x?y"), Some("/x?y"));
        assert_eq!(origin_form("*"), Some("*"));
        assert_eq!(origin_form("http://h:1/x?y"), Some("/x?y"));
        assert_eq!(origin_form("HTTP://h"), Some("/"));
        assert_eq!(origin_form("http://h?q"), None);
        assert_eq!(origin_form("ftp://h/x"), None);
        assert_eq!(origin_form("h:443"), None);
    }

    #[test]
    fn large_buffers_are_let_go() {
        let mut wire = Vec::with_capacity(1 << 20);
        let mut read = bytes::BytesMut::with_capacity(1 << 20);
        read.extend_from_slice(b"GET / HT");
        shrink(&mut wire, &mut read);
        assert!(wire.capacity() <= KEEP_BUFFER);
        assert!(read.capacity() <= KEEP_BUFFER);
        assert_eq!(&read[..], b"GET / HT");
        // Small ones are kept as they are.
        let mut wire = Vec::with_capacity(2048);
        let p = wire.as_ptr();
        shrink(&mut wire, &mut read);
        assert_eq!(wire.as_ptr(), p);
    }

    #[test]
    fn the_date_line_is_made_again_after_a_second() {
        let mut d = DateLine {
            made: None,
            line: vec![],
        };
        let t0 = Instant::now();
        let first = d.at(t0).to_vec();
        assert!(first.starts_with(b"date: ") && first.ends_with(b" GMT\r\n"));
        assert_eq!(d.made, Some(t0));
        d.at(t0 + Duration::from_millis(500));
        assert_eq!(d.made, Some(t0));
        d.at(t0 + Duration::from_millis(1000));
        assert_eq!(d.made, Some(t0 + Duration::from_millis(1000)));
    }

    #[tokio::test]
    async fn the_watchdog_keeps_each_deadline_on_one_timer() {
        let ms = Duration::from_millis;
        let mut wd = Watchdog::new();
        let t0 = Instant::now();
        // Done in time.
        assert_eq!(wd.within(t0 + ms(100), async { 7 }).await, Some(7));
        // A later deadline: the timer fires at the earlier one, looks, and
        // waits on to its own.
        let slow = tokio::time::sleep(ms(250));
        assert_eq!(wd.within(t0 + ms(1000), slow).await, Some(()));
        assert!(t0.elapsed() < ms(900), "{:?}", t0.elapsed());
        // An earlier one than the timer's: it is moved.
        let never = std::future::pending::<()>();
        let t1 = Instant::now();
        assert_eq!(wd.within(t1 + ms(100), never).await, None);
        let waited = t1.elapsed();
        assert!(waited >= ms(100) && waited < ms(600), "{waited:?}");
    }
}
