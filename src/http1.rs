//! What keygate's two HTTP/1.1 sides share: the server ([`crate::server`]) and the upstream
//! client ([`crate::upstream`]). Where a head's fields lie once it is split off the read
//! buffer ([`Field`]), RFC 9112 §6.3's reading of a message's framing fields, strict on every
//! ambiguity ([`declared_framing`]), and a stream with bytes already read put back in front
//! ([`Rewind`]). Pure, but for `Rewind`'s I/O passing through.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Version;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A header field's name and value as places in its head (start, end): small and `Copy`, and
/// valid once the head is split off the buffer httparse read it from.
#[derive(Debug, Default, Clone, Copy)]
pub struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

impl Field {
    /// Where `name` and `value` lie in the buffer starting at address `base` (both lie inside
    /// it, and a head is far below 4 GiB).
    pub fn at(name: &[u8], value: &[u8], base: usize) -> Self {
        Field {
            name: offset(name, base),
            value: offset(value, base),
        }
    }

    pub fn name(&self) -> Range<usize> {
        range(self.name)
    }

    pub fn value(&self) -> Range<usize> {
        range(self.value)
    }
}

/// `part`'s place in the buffer starting at address `base`.
pub fn offset(part: &[u8], base: usize) -> (u32, u32) {
    let start = part.as_ptr() as usize - base;
    (start as u32, (start + part.len()) as u32)
}

pub fn range((start, end): (u32, u32)) -> Range<usize> {
    start as usize..end as usize
}

/// What a message's framing fields say about its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// Neither `Content-Length` nor `Transfer-Encoding`.
    Nothing,
    Length(u64),
    Chunked,
}

/// RFC 9112 §6.3, refusing every case where two readers could disagree on where the body
/// ends: both fields, `Transfer-Encoding` in HTTP/1.0, a transfer coding other than one
/// `chunked`, more than one `Content-Length` (even equal), or one that is not a number.
pub fn declared_framing(
    version: Version,
    head: &[u8],
    fields: &[Field],
) -> Result<Declared, &'static str> {
    let named = |name: &'static [u8]| {
        fields
            .iter()
            .filter(move |f| head[f.name()].eq_ignore_ascii_case(name))
            .map(|f| &head[f.value()])
    };
    let mut codings = named(b"transfer-encoding");
    let mut lengths = named(b"content-length");
    let length = lengths.next();
    if let Some(coding) = codings.next() {
        if length.is_some() {
            return Err("both Transfer-Encoding and Content-Length");
        }
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in HTTP/1.0");
        }
        if codings.next().is_some() || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err("a transfer coding other than chunked");
        }
        return Ok(Declared::Chunked);
    }
    match length {
        None => Ok(Declared::Nothing),
        Some(_) if lengths.next().is_some() => Err("more than one Content-Length"),
        Some(digits) => parse_length(digits)
            .map(Declared::Length)
            .ok_or("a Content-Length that is not a number"),
    }
}

/// A `Content-Length` value: 1 to 19 digits, nothing else.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// A stream with bytes already read from it put back in front: a connection sniffed as HTTP/2
/// and handed to another server, or one that switched protocols with bytes of the new one
/// already read past the 101.
pub struct Rewind<T> {
    io: T,
    pending: Bytes,
}

impl<T> Rewind<T> {
    pub fn new(io: T, pending: Bytes) -> Self {
        Rewind { io, pending }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(head: &str, version: Version) -> Result<Declared, &'static str> {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let (_, parsed) = match httparse::parse_headers(head.as_bytes(), &mut fields) {
            Ok(httparse::Status::Complete(c)) => c,
            other => panic!("{head:?}: {other:?}"),
        };
        let base = head.as_ptr() as usize;
        let at: Vec<Field> = parsed
            .iter()
            .map(|h| Field::at(h.name.as_bytes(), h.value, base))
            .collect();
        declared_framing(version, head.as_bytes(), &at)
    }

    #[test]
    fn framing_fields_are_read_one_way_only() {
        let v11 = Version::HTTP_11;
        assert_eq!(declared("x: 1\r\n\r\n", v11), Ok(Declared::Nothing));
        assert_eq!(
            declared("Content-Length: 42\r\n\r\n", v11),
            Ok(Declared::Length(42))
        );
        assert_eq!(
            declared("transfer-encoding: Chunked \r\n\r\n", v11),
            Ok(Declared::Chunked)
        );
        for bad in [
            "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Content-Length: 1\r\ncontent-length: 1\r\n\r\n",
            "Content-Length: 1,1\r\n\r\n",
            "Content-Length: 99999999999999999999\r\n\r\n",
            "Transfer-Encoding: gzip, chunked\r\n\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(declared(bad, v11).is_err(), "{bad:?}");
        }
        assert!(declared("Transfer-Encoding: chunked\r\n\r\n", Version::HTTP_10).is_err());
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_length(b""), None);
    }
}
