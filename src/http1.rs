//! What keygate's two HTTP/1.1 sides share: the server ([`crate::server`]) and the upstream
//! client ([`crate::upstream`]). Where a head's fields lie once it is split off the read
//! buffer ([`Field`]), RFC 9112 §6.3's reading of a message's framing fields, strict on every
//! ambiguity ([`Framing`]), and a stream with bytes already read put back in front
//! ([`Rewind`]). Pure, but for `Rewind`'s I/O passing through.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
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

    /// Taken out of its head ([`Fields::remove_where`]): a field's name is never empty.
    fn is_removed(&self) -> bool {
        self.name.0 == self.name.1
    }
}

/// A head's header fields as they came: its bytes and where each field lies, in order. Names
/// keep the sender's spelling, so they are compared without regard to case. httparse has
/// checked every name to be a token and every value to hold no control character but tab. A
/// field taken out is marked, not moved: nothing is copied for it.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    head: Bytes,
    at: Vec<Field>,
}

impl Fields {
    /// The fields at `at` of `head` (the places [`Field::at`] gave, relative to its start).
    pub fn new(head: Bytes, at: Vec<Field>) -> Self {
        Fields { head, at }
    }

    /// `(name, value)` in the order they came.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            head: &self.head,
            at: self.at.iter(),
        }
    }

    /// Every value of `name` (any case), in order.
    pub fn values<'a: 'n, 'n>(&'a self, name: &'n [u8]) -> Values<'a, 'n> {
        Values {
            head: &self.head,
            at: self.at.iter(),
            name,
        }
    }

    /// The first value of `name` (any case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.values(name.as_bytes()).next()
    }

    /// The first value of `name` (any case) as a header value sharing the head's bytes.
    pub fn get_value(&self, name: &[u8]) -> Option<HeaderValue> {
        let f = self
            .at
            .iter()
            .find(|f| !f.is_removed() && self.head[f.name()].eq_ignore_ascii_case(name))?;
        HeaderValue::from_maybe_shared(self.head.slice(f.value())).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Take out every field whose name (as it came) `doomed` picks.
    pub fn remove_where(&mut self, mut doomed: impl FnMut(&[u8]) -> bool) {
        for f in &mut self.at {
            if !f.is_removed() && doomed(&self.head[f.name()]) {
                f.name = (0, 0);
            }
        }
    }

    /// Append the fields to `map`, except those whose name `map` holds already (keygate's own
    /// values win, as an insert after them would).
    pub fn merge_into(&self, map: &mut HeaderMap) -> Result<(), http::Error> {
        let own: Vec<HeaderName> = map.keys().cloned().collect();
        map.reserve(self.at.len());
        for f in self.at.iter().filter(|f| !f.is_removed()) {
            let name = HeaderName::from_bytes(&self.head[f.name()])?;
            if own.contains(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(self.head.slice(f.value()))?;
            map.append(name, value);
        }
        Ok(())
    }

    /// Write the fields `keep` picks, in order, each as `name: value` and a line end. Lines the
    /// sender wrote exactly so, one after the other, are copied from the head as one run:
    /// the same bytes, fewer copies.
    pub fn write_lines(&self, out: &mut Vec<u8>, mut keep: impl FnMut(&[u8]) -> bool) {
        let head = &self.head[..];
        let mut run = 0..0;
        for f in self.at.iter().filter(|f| !f.is_removed()) {
            let (name, value) = (f.name(), f.value());
            if !keep(&head[name.clone()]) {
                continue;
            }
            let line = name.start..value.end + 2;
            let as_written = head.get(name.end..value.start) == Some(b": ")
                && head.get(value.end..line.end) == Some(b"\r\n");
            if as_written && run.end == line.start && !run.is_empty() {
                run.end = line.end;
                continue;
            }
            out.extend_from_slice(&head[run]);
            run = 0..0;
            if as_written {
                run = line;
            } else {
                for part in [&head[name], b": ", &head[value], b"\r\n"] {
                    out.extend_from_slice(part);
                }
            }
        }
        out.extend_from_slice(&head[run]);
    }

    /// The same as a new map.
    pub fn to_map(&self) -> Result<HeaderMap, http::Error> {
        let mut map = HeaderMap::new();
        self.merge_into(&mut map)?;
        Ok(map)
    }
}

/// [`Fields::iter`].
pub struct Iter<'a> {
    head: &'a [u8],
    at: std::slice::Iter<'a, Field>,
}

impl<'a> Iter<'a> {
    fn pair(&self, f: &Field) -> (&'a [u8], &'a [u8]) {
        (&self.head[f.name()], &self.head[f.value()])
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let f = self.at.by_ref().find(|f| !f.is_removed())?;
        Some(self.pair(f))
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let f = self.at.by_ref().rfind(|f| !f.is_removed())?;
        Some(self.pair(f))
    }
}

/// [`Fields::values`].
pub struct Values<'a, 'n> {
    head: &'a [u8],
    at: std::slice::Iter<'a, Field>,
    name: &'n [u8],
}

impl<'a> Values<'a, '_> {
    /// Whether `f` is named `name`: lengths first, since most names differ in length (a field
    /// taken out has none, so it never matches).
    fn named(&self, f: &Field) -> bool {
        (f.name.1 - f.name.0) as usize == self.name.len()
            && self.head[f.name()].eq_ignore_ascii_case(self.name)
    }
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            let f = self.at.next()?;
            if self.named(f) {
                return Some(&self.head[f.value()]);
            }
        }
    }
}

impl<'a> DoubleEndedIterator for Values<'a, '_> {
    fn next_back(&mut self) -> Option<&'a [u8]> {
        loop {
            let f = self.at.next_back()?;
            if self.named(f) {
                return Some(&self.head[f.value()]);
            }
        }
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

/// The two fields that frame a message's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingField {
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding`.
    Coding,
}

/// Which framing field `name` (any case) is, if any; told apart by length first, since this
/// runs for every field of every message.
pub fn framing_field(name: &[u8]) -> Option<FramingField> {
    match name.len() {
        14 if name.eq_ignore_ascii_case(b"content-length") => Some(FramingField::Length),
        17 if name.eq_ignore_ascii_case(b"transfer-encoding") => Some(FramingField::Coding),
        _ => None,
    }
}

/// A head's framing fields (`Content-Length`, `Transfer-Encoding`), noted while its fields are
/// walked once for whatever else the reader wants of them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Framing<'a> {
    lengths: usize,
    length: Option<&'a [u8]>,
    codings: usize,
    coding: Option<&'a [u8]>,
}

impl<'a> Framing<'a> {
    /// Note the field `name: value` if it is a framing field (true when it was one).
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) -> bool {
        let (count, first) = match framing_field(name) {
            Some(FramingField::Length) => (&mut self.lengths, &mut self.length),
            Some(FramingField::Coding) => (&mut self.codings, &mut self.coding),
            None => return false,
        };
        *count += 1;
        first.get_or_insert(value);
        true
    }

    /// Exactly one `Content-Length`, and it is a number.
    pub fn one_length(&self) -> bool {
        self.lengths == 1 && self.length.and_then(parse_length).is_some()
    }

    /// RFC 9112 §6.3, refusing every case where two readers could disagree on where the body
    /// ends: both fields, `Transfer-Encoding` in HTTP/1.0, a transfer coding other than one
    /// `chunked`, more than one `Content-Length` (even equal), or one that is not a number.
    pub fn declared(&self, version: Version) -> Result<Declared, &'static str> {
        if let Some(coding) = self.coding {
            if self.lengths > 0 {
                return Err("both Transfer-Encoding and Content-Length");
            }
            if version == Version::HTTP_10 {
                return Err("Transfer-Encoding in HTTP/1.0");
            }
            if self.codings > 1 || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err("a transfer coding other than chunked");
            }
            return Ok(Declared::Chunked);
        }
        match self.length {
            None => Ok(Declared::Nothing),
            Some(_) if self.lengths > 1 => Err("more than one Content-Length"),
            Some(digits) => parse_length(digits)
                .map(Declared::Length)
                .ok_or("a Content-Length that is not a number"),
        }
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
        let mut framing = Framing::default();
        for f in &at {
            framing.note(&head.as_bytes()[f.name()], &head.as_bytes()[f.value()]);
        }
        framing.declared(version)
    }

    fn fields_of(head: &'static str) -> Fields {
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let (_, parsed) = match httparse::parse_headers(head.as_bytes(), &mut parsed) {
            Ok(httparse::Status::Complete(c)) => c,
            other => panic!("{head:?}: {other:?}"),
        };
        let base = head.as_ptr() as usize;
        let at = parsed
            .iter()
            .map(|h| Field::at(h.name.as_bytes(), h.value, base))
            .collect();
        Fields::new(Bytes::from_static(head.as_bytes()), at)
    }

    #[test]
    fn lines_are_written_as_each_field_alone_would_be() {
        let heads = [
            "Host: a\r\nX-One: 1\r\nx-two: 2\r\n\r\n",
            "Host:a\r\nX-Spaced:   v  \r\nX-Tab:\tt\r\nX-Empty:\r\nX-Empty2: \r\nLast: z\r\n\r\n",
            "A: 1\r\nContent-Length: 5\r\nB: 2\r\nSecret: s\r\nC: 3\r\nD: 4\r\n\r\n",
            "A: 1\nB: 2\r\nC: 3\n\n",
        ];
        for head in heads {
            for taken in [None, Some("secret"), Some("a"), Some("d"), Some("x-one")] {
                let mut fields = fields_of(head);
                if let Some(t) = taken {
                    fields.remove_where(|n| n.eq_ignore_ascii_case(t.as_bytes()));
                }
                let keep = |n: &[u8]| !n.eq_ignore_ascii_case(b"content-length");
                let mut want = Vec::new();
                for (name, value) in fields.iter().filter(|(n, _)| keep(n)) {
                    want.extend_from_slice(&[name, b": ", value, b"\r\n"].concat());
                }
                let mut got = b"before\r\n".to_vec();
                fields.write_lines(&mut got, keep);
                assert_eq!(
                    String::from_utf8_lossy(&got[8..]),
                    String::from_utf8_lossy(&want),
                    "{head:?} less {taken:?}"
                );
            }
        }
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
