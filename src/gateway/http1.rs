//! HTTP/1.1 framing shared by the gateway's two sides (RFC 9112): a socket
//! with its read buffer, the three ways a body is delimited, and which
//! headers belong to a connection rather than to a message.
//!
//! The parsing of heads is httparse's (the parser hyper uses), in
//! [`super::server`] for requests and [`super::upstream`] for responses.
//! What is here only counts bytes:
//! - a body is `Content-Length` bytes long (several values must agree), or
//!   chunked (sizes by `httparse::parse_chunk_size`, trailers read and
//!   dropped), or, for a response only, runs to the close;
//! - connection-level headers (RFC 9110 7.6.1: `Connection`, the names it
//!   lists, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`) are never forwarded: each hop frames
//!   its own messages.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Bytes a chunk-size line or a trailer line may take.
const MAX_LINE: usize = 4096;

/// A connection and the bytes read from it but not yet used.
pub struct Stream {
    pub io: TcpStream,
    pub buf: BytesMut,
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
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// More bytes, or [`BodyError::Broken`] at end of file or on an error.
    async fn more(&mut self) -> Result<(), BodyError> {
        match self.fill().await {
            Ok(0) | Err(_) => Err(BodyError::Broken),
            Ok(_) => Ok(()),
        }
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than allowed.
    TooLarge,
    /// Malformed framing, or the connection ended inside it.
    Broken,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a request without length or chunking; a HEAD answer).
    Empty,
    Length(usize),
    Chunked,
    /// Up to the close (responses only).
    Close,
}

/// Fold a `Content-Length` value (which may be a list, `7, 7`) into the
/// length seen so far; `None` if the values do not agree or are not
/// numbers.
pub fn content_length(value: &[u8], seen: Option<usize>) -> Option<usize> {
    let mut length = seen;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: usize = std::str::from_utf8(part).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`.
pub fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Connection-level header names, never forwarded (RFC 9110 7.6.1).
pub fn hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// What a message's `Connection` headers say.
#[derive(Debug, Default, PartialEq)]
pub struct ConnectionHeader<'a> {
    pub close: bool,
    pub keep_alive: bool,
    /// Other names it lists: connection-level too, so not forwarded.
    pub listed: Vec<&'a str>,
}

impl<'a> ConnectionHeader<'a> {
    /// From a message's headers. Most messages have at most a `close` or
    /// `keep-alive`, so `listed` rarely allocates.
    pub fn of(headers: &[httparse::Header<'a>]) -> Self {
        let mut c = ConnectionHeader::default();
        for h in headers {
            if !h.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            let Ok(v) = std::str::from_utf8(h.value) else {
                continue;
            };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case("close") {
                    c.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    c.keep_alive = true;
                } else {
                    c.listed.push(token);
                }
            }
        }
        c
    }

    /// Whether the connection stays open after this message: HTTP/1.1
    /// unless `close`; HTTP/1.0 only with `keep-alive` (RFC 9112 9.3).
    pub fn keeps_alive(&self, http10: bool) -> bool {
        !self.close && (!http10 || self.keep_alive)
    }

    /// Whether `name` is not to be forwarded: connection-level, or listed.
    pub fn drops(&self, name: &str) -> bool {
        hop_by_hop(name) || self.listed.iter().any(|l| l.eq_ignore_ascii_case(name))
    }
}

/// Append a header line `name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `n` bytes of body off the front of the stream.
pub async fn read_length(s: &mut Stream, n: usize, max: usize) -> Result<Bytes, BodyError> {
    if n > max {
        return Err(BodyError::TooLarge);
    }
    while s.buf.len() < n {
        if s.buf.capacity() - s.buf.len() < n - s.buf.len() {
            s.buf.reserve(n - s.buf.len());
        }
        s.more().await?;
    }
    Ok(s.buf.split_to(n).freeze())
}

/// Everything up to the close.
pub async fn read_to_close(s: &mut Stream, max: usize) -> Result<Bytes, BodyError> {
    loop {
        if s.buf.len() > max {
            return Err(BodyError::TooLarge);
        }
        match s.fill().await {
            Ok(0) => return Ok(s.buf.split().freeze()),
            Ok(_) => {}
            Err(_) => return Err(BodyError::Broken),
        }
    }
}

/// A chunked body, joined; its trailers are read and dropped.
pub async fn read_chunked(s: &mut Stream, max: usize) -> Result<Bytes, BodyError> {
    let mut body = BytesMut::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(&s.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    s.buf.advance(used);
                    break size;
                }
                Ok(httparse::Status::Partial) if s.buf.len() < MAX_LINE => {}
                _ => return Err(BodyError::Broken),
            }
            s.more().await?;
        };
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| BodyError::TooLarge)?;
        if body.len().saturating_add(size) > max {
            return Err(BodyError::TooLarge);
        }
        while s.buf.len() < size + 2 {
            s.more().await?;
        }
        body.extend_from_slice(&s.buf[..size]);
        if &s.buf[size..size + 2] != b"\r\n" {
            return Err(BodyError::Broken);
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
            None if s.buf.len() < MAX_LINE => s.more().await?,
            None => return Err(BodyError::Broken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_must_be_numbers_that_agree() {
        assert_eq!(content_length(b"7", None), Some(7));
        assert_eq!(content_length(b"7, 7", None), Some(7));
        assert_eq!(content_length(b"7", Some(7)), Some(7));
        assert_eq!(content_length(b"7", Some(8)), None);
        assert_eq!(content_length(b"7, 8", None), None);
        for bad in [
            &b"-1"[..],
            b"+1",
            b"x",
            b"",
            b" ",
            b"1 2",
            b"99999999999999999999999",
        ] {
            assert_eq!(content_length(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn chunked_is_the_last_coding() {
        assert!(ends_chunked(b"chunked"));
        assert!(ends_chunked(b"gzip, Chunked "));
        assert!(!ends_chunked(b"chunked, gzip"));
        assert!(!ends_chunked(b"gzip"));
        assert!(!ends_chunked(b""));
    }

    #[test]
    fn connection_headers_and_what_they_list_are_dropped() {
        let hs = [
            httparse::Header {
                name: "Connection",
                value: b"keep-alive, X-Secret",
            },
            httparse::Header {
                name: "connection",
                value: b"close",
            },
            httparse::Header {
                name: "host",
                value: b"t",
            },
        ];
        let c = ConnectionHeader::of(&hs);
        assert!(c.close && c.keep_alive);
        assert!(!c.keeps_alive(false) && !c.keeps_alive(true));
        let plain = ConnectionHeader::default();
        assert!(plain.keeps_alive(false) && !plain.keeps_alive(true));
        assert_eq!(c.listed, vec!["X-Secret"]);
        for n in ["x-secret", "Connection", "TE", "upgrade", "Keep-Alive"] {
            assert!(c.drops(n), "{n}");
        }
        assert!(!c.drops("host"));
        assert!(!c.drops("te-x"));
        assert_eq!(ConnectionHeader::of(&hs[2..]), ConnectionHeader::default());
    }
}
