//! HTTP/1.1 from the client, as bytes (RFC 9112): the request head read and its body's framing
//! decided, the response head written. Pure: no I/O.
//!
//! Strict where two readers could disagree: a request framed both by `Content-Length` and
//! `Transfer-Encoding`, with two `Content-Length` fields (equal or not), a transfer coding
//! other than a lone `chunked`, or `Transfer-Encoding` in HTTP/1.0 is refused, never guessed
//! at. A server behind keygate, or a proxy in front of it, might read such a request the other
//! way, and the bytes one of them takes for a body would be another request to the other.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Uri, Version};

pub use crate::http1::Field;
use crate::http1::{self, Declared};

/// Most header fields httparse is given room for: `proxy.max_headers`' upper bound.
pub const MAX_FIELDS: usize = 1000;

/// Limits on a request head (`proxy.max_header_bytes`, `proxy.max_headers`).
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub bytes: usize,
    pub fields: usize,
}

/// What is wrong with a request head. Never quotes it: it may carry a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Over `proxy.max_header_bytes` or `proxy.max_headers`: 431.
    #[error("the request's header section is too large")]
    TooLarge,
    /// A raw `#` in the request target: a fragment is never sent to a server, and parsers
    /// disagree on whether it ends the path (the contract's `invalid_path`).
    #[error("the request target contains '#'")]
    Fragment,
    /// A raw control byte in the request target (also `invalid_path`): told apart from other
    /// malformed request lines, which httparse refuses alike.
    #[error("the request target contains a control character")]
    ControlInTarget,
    /// Anything else: 400.
    #[error("{0}")]
    Malformed(&'static str),
}

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: neither `Content-Length` nor `Transfer-Encoding`, or a length of 0.
    Empty,
    Length(u64),
    Chunked,
}

/// A request head, with what the connection needs to know about it.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target and version; its map is empty: the fields are in `fields`.
    pub request: Request<()>,
    /// The header fields as they came (no map is built of them: the proxy reads a few and
    /// forwards the rest as they are).
    pub fields: http1::Fields,
    pub framing: BodyFraming,
    /// The client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for an interim answer before sending the body.
    pub expect_continue: bool,
    /// `TE: trailers`: the client reads trailer fields after a chunked answer.
    pub trailers: bool,
    /// An HTTP/1.1 request with an `Upgrade` field: it may switch protocols.
    pub upgrade: bool,
}

/// Parse a request head from the front of `buf`, consuming it. `Ok(None)`: incomplete, read
/// more (nothing is consumed). Empty lines before the request line are skipped (RFC 9112
/// §2.2).
pub fn parse_request(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<RequestHead>, HeadError> {
    let fields_room = limits.fields.min(MAX_FIELDS);
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut fields[..fields_room],
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.bytes => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed(
                "an HTTP version other than 1.0 or 1.1",
            ))
        }
        Err(_) if control_in_target(buf) => return Err(HeadError::ControlInTarget),
        Err(_) => return Err(HeadError::Malformed("the request head is malformed")),
    };
    if len > limits.bytes {
        return Err(HeadError::TooLarge);
    }
    let version = match request.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => {
            return Err(HeadError::Malformed(
                "an HTTP version other than 1.0 or 1.1",
            ))
        }
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(HeadError::Malformed("the request line is malformed"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HeadError::Malformed("the method is malformed"))?;
    // Where the target and each field are, so that they can share the head's bytes once it is
    // split off the buffer.
    let base = buf.as_ptr() as usize;
    let target = http1::offset(target.as_bytes(), base);
    let at: Vec<Field> = request
        .headers
        .iter()
        .map(|h| Field::at(h.name.as_bytes(), h.value, base))
        .collect();
    let head = buf.split_to(len).freeze();

    if head[http1::range(target)].contains(&b'#') {
        return Err(HeadError::Fragment);
    }
    let uri = Uri::from_maybe_shared(head.slice(http1::range(target)))
        .map_err(|_| HeadError::Malformed("the request target is malformed"))?;
    // httparse has checked every name to be a token and every value to hold no control
    // character but tab: what `HeaderName` and `HeaderValue` would check again.
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    let (mut trailers, mut hosts, mut upgrade) = (false, 0, false);
    let mut declared = http1::Framing::default();
    for f in &at {
        let (name, value) = (&head[f.name()], &head[f.value()]);
        if declared.note(name, value) {
            continue;
        }
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        // Told apart by length first: this runs for every field of every request.
        match name.len() {
            10 if is(b"connection") => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            6 if is(b"expect") => {
                expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            }
            2 if is(b"te") => {
                trailers |= value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
            }
            4 if is(b"host") => hosts += 1,
            7 if is(b"upgrade") => upgrade = true,
            _ => {}
        }
    }
    let framing = framing(version, &declared)?;
    // Two Hosts name two targets, and a server behind keygate might route by the other one.
    if hosts > 1 {
        return Err(HeadError::Malformed("more than one Host header"));
    }
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
    if version == Version::HTTP_11 && hosts == 0 {
        return Err(HeadError::Malformed("an HTTP/1.1 request without Host"));
    }
    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked to.
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    Ok(Some(RequestHead {
        request,
        fields: http1::Fields::new(head, at),
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
        trailers,
        upgrade: upgrade && version == Version::HTTP_11,
    }))
}

/// RFC 9112 §6.3 for requests (see [`http1::Framing::declared`]): without framing fields, no
/// body.
fn framing(version: Version, declared: &http1::Framing) -> Result<BodyFraming, HeadError> {
    match declared.declared(version).map_err(HeadError::Malformed)? {
        Declared::Nothing | Declared::Length(0) => Ok(BodyFraming::Empty),
        Declared::Length(n) => Ok(BodyFraming::Length(n)),
        Declared::Chunked => Ok(BodyFraming::Chunked),
    }
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body. `keep_length`: the answer's own `Content-Length` is written as it is (HEAD
    /// and 304 answers describe the body a GET would get).
    NoBody {
        keep_length: bool,
    },
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    UntilClose,
}

/// What the response says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1's default: nothing said.
    Default,
    /// `Connection: keep-alive`, for an HTTP/1.0 client that asked for it.
    KeepAlive,
    /// `Connection: close`.
    Close,
    /// A switch of protocols: the answer's own `Connection` and `Upgrade` fields go as they are.
    Upgrade,
}

/// The fields an answer carries outside its map (see [`super::PassedFields`]).
#[derive(Clone, Copy, Default)]
pub struct Outside<'a> {
    /// The upstream's, as it sent them.
    pub passed: Option<&'a crate::upstream::wire::Fields>,
    /// keygate's, in place of the upstream's of that name.
    pub own: Option<(&'a http::HeaderName, &'a http::HeaderValue)>,
}

/// Write the status line, the fields from `outside` (an upstream's as they came, then keygate's
/// own; except those `headers` names), `headers` (without framing or connection fields, which
/// `framing` and `persistence` decide), a `Date` when the answer has none, and the blank line.
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    outside: Outside<'_>,
    framing: ResponseFraming,
    persistence: Persistence,
    date: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let keep_length = matches!(framing, ResponseFraming::NoBody { keep_length: true });
    let upgrade = persistence == Persistence::Upgrade;
    let mut dated = !headers.is_empty() && headers.contains_key(header::DATE);
    for (name, value) in outside.passed.into_iter().flat_map(|p| p.iter()) {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        let skip = (is("content-length") && !keep_length)
            || is("transfer-encoding")
            || headers
                .keys()
                .any(|k| name.eq_ignore_ascii_case(k.as_str().as_bytes()));
        if skip {
            continue;
        }
        dated |= is("date");
        field(out, name, value);
    }
    if let Some((name, value)) = outside.own.filter(|(name, _)| !headers.contains_key(*name)) {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in headers {
        let skip = (*name == header::CONTENT_LENGTH && !keep_length)
            || *name == header::TRANSFER_ENCODING
            || (!upgrade && (*name == header::CONNECTION || name.as_str() == "keep-alive"));
        if !skip {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !dated {
        field(out, b"date", date);
    }
    match framing {
        ResponseFraming::Length(n) => {
            field(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        ResponseFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ResponseFraming::NoBody { .. } | ResponseFraming::UntilClose => {}
    }
    match persistence {
        Persistence::Default | Persistence::Upgrade => {}
        Persistence::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        Persistence::Close => out.extend_from_slice(b"connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The chunk framing before `len` bytes of data.
pub fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk and `trailers` (request-side fields such as hop-by-hop ones are the
/// caller's to leave out), ending a chunked body.
pub fn encode_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The HTTP/2 connection preface: a client speaking h2c with prior knowledge starts with it.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `bytes`, the start of a connection, is (so far) the HTTP/2 preface.
pub fn may_be_h2(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    bytes[..n] == H2_PREFACE[..n]
}

/// The `Date` field's value for the current second (of the coarse wall clock), formatted once
/// per second per thread.
pub fn date() -> Bytes {
    use std::cell::RefCell;
    use std::time::{Duration, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, Bytes)> = const { RefCell::new((u64::MAX, Bytes::new())) };
    }
    let second = crate::clock::wall_second();
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != second {
            let now = UNIX_EPOCH + Duration::from_secs(second);
            *c = (second, Bytes::from(httpdate::fmt_http_date(now)));
        }
        c.1.clone()
    })
}

/// Whether the request line that httparse refused has a control byte (or DEL) in its target:
/// after the method and its space, before the ` HTTP/` that ends the line (or the line's end).
fn control_in_target(buf: &[u8]) -> bool {
    // httparse skips empty lines before a request line (a stray CRLF after a body).
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line = buf[start..]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(space) = line.iter().position(|&b| b == b' ') else {
        return false;
    };
    let rest = &line[space + 1..];
    let end = rest
        .windows(6)
        .rposition(|w| w == b" HTTP/")
        .unwrap_or(rest.len());
    rest[..end].iter().any(|&b| b < 0x20 || b == 0x7F)
}

#[cfg(test)]
mod tests;
