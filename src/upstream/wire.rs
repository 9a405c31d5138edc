//! HTTP/1.1 toward the upstream, as bytes (RFC 9112): the request head written, the response
//! head read and the response body's framing decided, chunked bodies decoded. Pure: no I/O.
//!
//! Strict on what the upstream sends, because a response framed two ways is how a connection
//! gets desynchronized: `Content-Length` together with `Transfer-Encoding`, several lengths, a
//! transfer coding other than `chunked`, bare-LF line ends in chunked framing, or an oversized
//! head are refused (the client gets 502), never guessed at. (A head's own lines may end in a
//! bare LF, as httparse and most servers read them: the head is re-encoded for the client.)

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::http1::{self, Declared, Field};

/// Most bytes a response head (or a chunked body's trailer section) may take.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in a response head or trailer section.
const MAX_HEADERS: usize = 128;
/// Most bytes of one chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// What is wrong with the upstream's answer. Never quotes it: it may carry anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the upstream's response head is malformed")]
    MalformedHead,
    #[error("the upstream's response head is larger than {MAX_HEAD_BYTES} bytes or has more than {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("the upstream's response is framed ambiguously ({0})")]
    Framing(&'static str),
    #[error("the upstream switched protocols without being asked to")]
    UnaskedUpgrade,
    #[error("the upstream's chunked body is malformed ({0})")]
    Chunk(&'static str),
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no `Content-Length`.
    None,
    Length(u64),
    Chunked,
}

/// Fields a request gets after its own, written out as they are added instead of inserted
/// among them: keygate's identity, forwarding, request-id and (when it writes its own) Host
/// fields. The request's fields must hold none of these names; the proxy strips them first.
/// Kept as the bytes they go out as: nothing is cloned for them, and they are written in one
/// copy (and again, unchanged, when a request is retried on a fresh connection).
#[derive(Debug, Default)]
pub struct Added {
    bytes: Vec<u8>,
}

impl Added {
    /// Room for what the proxy adds to a typical request, so that one allocation does.
    const ROOM: usize = 384;

    pub fn new() -> Self {
        Added { bytes: Vec::new() }
    }

    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        // keygate frames the body itself (`encode_head`).
        debug_assert!(name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING);
        if self.bytes.capacity() == 0 {
            self.bytes.reserve(Self::ROOM);
        }
        field(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// `name: value` and its line end.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Write `METHOD target HTTP/1.1`, the request's fields, keygate's, the framing field and the
/// blank line. `Content-Length` and `Transfer-Encoding` among the request's fields are skipped:
/// `framing` says what the body really is, so a stale or client-chosen value can never frame
/// it differently.
pub fn encode_head(out: &mut Vec<u8>, head: &super::Outbound, framing: RequestFraming) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let unframed = |name: &[u8]| http1::framing_field(name).is_none();
    match &head.fields {
        crate::headers::RequestFields::Head(fields) => fields.write_lines(out, unframed),
        crate::headers::RequestFields::Map(map) => {
            // HTTP/2 may split Cookie into one field per pair; HTTP/1.1 gets them as one line
            // joined with "; " (RFC 9113 §8.2.3): a server keeping one Cookie line keeps all.
            let cookie = |n: &[u8]| n.eq_ignore_ascii_case(b"cookie");
            for (name, value) in head
                .fields
                .iter()
                .filter(|(n, _)| unframed(n) && !cookie(n))
            {
                field(out, name, value);
            }
            let mut crumbs = map.get_all(http::header::COOKIE).iter();
            if let Some(first) = crumbs.next() {
                out.extend_from_slice(b"cookie: ");
                out.extend_from_slice(first.as_bytes());
                for crumb in crumbs {
                    out.extend_from_slice(b"; ");
                    out.extend_from_slice(crumb.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(&head.added.bytes);
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            field(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// A chunk of a chunked request body: size line, data, CRLF.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked request body (request trailers are not forwarded).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 1xx, 204, 304, or a switch of protocols.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (no length, no chunking).
    UntilClose,
}

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub fields: Fields,
    pub framing: Framing,
    /// The upstream lets the connection carry another request after this answer.
    pub keep_alive: bool,
}

/// Parse a response head from the front of `buf`, consuming it (and any interim 1xx heads
/// before it). `Ok(None)`: incomplete, read more. `method` is the request's (HEAD answers have
/// no body); `upgrade`: the request asked to switch protocols, so a 101 is welcome.
///
/// The head comes back without its hop-by-hop fields (`Connection`, those it lists,
/// `Transfer-Encoding`, `Keep-Alive`…): they were about this connection, not for the client.
/// A 101 keeps them all, since the client's side switches with them.
pub fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    upgrade: bool,
) -> Result<Option<Head>, WireError> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(WireError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(WireError::HeadTooLarge),
            Err(_) => return Err(WireError::MalformedHead),
        };
        if len > MAX_HEAD_BYTES {
            return Err(WireError::HeadTooLarge);
        }
        let code = response.code.ok_or(WireError::MalformedHead)?;
        let status = StatusCode::from_u16(code).map_err(|_| WireError::MalformedHead)?;
        let version = match response.version {
            Some(1) => Version::HTTP_11,
            Some(0) => Version::HTTP_10,
            _ => return Err(WireError::MalformedHead),
        };
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints…: interim, not the answer.
            buf.advance(len);
            continue;
        }
        if status == StatusCode::SWITCHING_PROTOCOLS && !upgrade {
            return Err(WireError::UnaskedUpgrade);
        }
        // Where each field is, so that the values can share the head's bytes once split off.
        let base = buf.as_ptr() as usize;
        let mut at: Vec<Field> = response
            .headers
            .iter()
            .map(|h| Field::at(h.name.as_bytes(), h.value, base))
            .collect();
        let head = buf.split_to(len).freeze();
        // One walk over the fields for their framing and the `Connection` tokens; the tokens
        // are read where they lie (an answer has one such field with one token, if any).
        let mut declared = http1::Framing::default();
        let (mut close, mut keep_alive_token, mut names_fields) = (false, false, false);
        for f in &at {
            let (name, value) = (&head[f.name()], &head[f.value()]);
            if declared.note(name, value) || !name.eq_ignore_ascii_case(b"connection") {
                continue;
            }
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                } else if !t.is_empty() {
                    // Other tokens name fields to leave out too.
                    names_fields = true;
                }
            }
        }
        let framing = framing(status, method, version, &declared)?;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        // The names `Connection` lists (rare: no list is made without them).
        let listed: Vec<&[u8]> = if names_fields {
            at.iter()
                .filter(|f| head[f.name()].eq_ignore_ascii_case(b"connection"))
                .flat_map(|f| head[f.value()].split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        // An answer without a body keeps its Content-Length only where it means something (HEAD,
        // 304: the length a GET would get) and only if it is one number: `framing` did not
        // need to check it, and a client (an HTTP/2 one at least) refuses the answer otherwise.
        let keep_length = framing != Framing::Empty
            || ((*method == Method::HEAD || status == StatusCode::NOT_MODIFIED)
                && declared.one_length());
        if !switching {
            at.retain(|f| {
                let name = &head[f.name()];
                let hop_by_hop = crate::headers::is_hop_by_hop(name)
                    || listed.iter().any(|t| t.eq_ignore_ascii_case(name));
                let dropped_length = !keep_length && name.eq_ignore_ascii_case(b"content-length");
                !(hop_by_hop || dropped_length)
            });
        }
        drop(listed);
        // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked to.
        let persistent = match version {
            Version::HTTP_11 => !close,
            _ => !close && keep_alive_token,
        };
        let keep_alive = persistent
            && framing != Framing::UntilClose
            && !switching
            && *method != Method::CONNECT;
        return Ok(Some(Head {
            status,
            version,
            fields: Fields::new(head, at),
            framing,
            keep_alive,
        }));
    }
}

/// An answer's end-to-end header fields as they came (hop-by-hop ones and those its
/// `Connection` lists left out). The proxy's HTTP/1.1 side writes them to the client as they
/// are; a `HeaderMap` is made of them only where one is needed (HTTP/2, the idempotent store).
pub use crate::http1::Fields;

/// RFC 9112 §6.3, refusing every case where two readers could disagree on where the body ends.
fn framing(
    status: StatusCode,
    method: &Method,
    version: Version,
    declared: &http1::Framing,
) -> Result<Framing, WireError> {
    if *method == Method::HEAD
        || (*method == Method::CONNECT && status.is_success())
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    match declared.declared(version).map_err(WireError::Framing)? {
        Declared::Nothing => Ok(Framing::UntilClose),
        Declared::Length(n) => Ok(Framing::Length(n)),
        Declared::Chunked => Ok(Framing::Chunked),
    }
}

/// What [`Chunked::decode`] found next.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// Read more bytes into the buffer first.
    More,
}

/// A chunked body's decoder; it consumes from the connection's read buffer, so the bytes after
/// the body stay there.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of chunk-size lines beyond their digits and CRLF, over the whole body.
    extensions: usize,
}

/// Most bytes of chunk extensions a body may carry (as hyper allows): past it, an upstream
/// would be sending framing instead of data.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data: this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
    Done,
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&buf[..end])?;
                    self.extensions += end
                        - buf[..end]
                            .iter()
                            .take_while(|b| b.is_ascii_hexdigit())
                            .count();
                    if self.extensions > MAX_CHUNK_EXTENSIONS {
                        return Err(WireError::Chunk("too many chunk extensions"));
                    }
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Chunk("data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\n") {
                        return Err(WireError::Chunk("a bare LF"));
                    }
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, _))) if len > MAX_HEAD_BYTES => {
                            return Err(WireError::HeadTooLarge)
                        }
                        Ok(httparse::Status::Complete((len, fields))) => {
                            if has_bare_lf(&buf[..len]) {
                                return Err(WireError::Chunk("a bare LF"));
                            }
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| WireError::Chunk("a malformed trailer"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| WireError::Chunk("a malformed trailer"))?;
                                trailers.append(name, value);
                            }
                            (len, trailers)
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                            return Err(WireError::HeadTooLarge)
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                        Err(httparse::Error::TooManyHeaders) => {
                            return Err(WireError::HeadTooLarge)
                        }
                        Err(_) => return Err(WireError::Chunk("a malformed trailer")),
                    };
                    buf.advance(len);
                    self.state = ChunkState::Done;
                    return Ok(Decoded::Trailers(trailers));
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The position of the first CRLF within `max` bytes; a bare LF is an error.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    let window = &buf[..buf.len().min(max)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(WireError::Chunk("a bare LF")),
        Some(lf) if window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(WireError::Chunk("a bare LF")),
        None if buf.len() >= max => Err(WireError::Chunk("a chunk-size line too long")),
        None => Ok(None),
    }
}

fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`, at most 16 hex digits.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(WireError::Chunk("no chunk size"));
    }
    if digits > 16 {
        return Err(WireError::Chunk("a chunk size too large"));
    }
    let rest = &line[digits..];
    let after_space = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map_or(&[][..], |i| &rest[i..]);
    if !rest.is_empty() && !after_space.starts_with(b";") {
        return Err(WireError::Chunk("junk after the chunk size"));
    }
    if rest.iter().any(|&b| b == b'\r' || b == 0) {
        return Err(WireError::Chunk("a control character in a chunk extension"));
    }
    let text = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(text, 16).map_err(|_| WireError::Chunk("a chunk size too large"))
}

#[cfg(test)]
mod tests;
