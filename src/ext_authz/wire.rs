//! The two messages of a Check on the wire, without building prost's owned types: [`read`]
//! borrows, straight from the received bytes, the few `CheckRequest` fields the decision reads,
//! and [`Writer`] writes a `CheckResponse` field by field into the buffer that is sent.
//!
//! prost would decode every field of the request into owned strings (the headers into a
//! `HashMap<String, String>`) and build the response from owned strings and a `HashMap` of
//! metadata, only to drop them after encoding: a third of the cost of a Check. Field numbers
//! follow envoy-types' definitions; `tests.rs` checks both halves against prost's own decoding
//! and encoding of those types. Pure: no I/O.

use bytes::BufMut;
use prost::encoding::{
    decode_key, decode_varint, encode_varint, encoded_len_varint, key_len, skip_field,
    DecodeContext, WireType,
};

/// The bytes are not a `CheckRequest` (bad varint, a length past the end, a field read with
/// the wrong wire type, a method, path, host or address that is not UTF-8). Fields keygate
/// does not read are only skipped: what prost decodes, [`read`] reads the same way, and it
/// reads some messages prost refuses (headers or unread fields that are not UTF-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// What the decision reads of a `CheckRequest`.
#[derive(Debug, Default)]
pub struct CheckFacts<'a> {
    /// `attributes.request.http` is present.
    pub http: bool,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    /// `attributes.source.address`, when it is a socket address.
    pub peer: Option<&'a str>,
    /// The `headers` map (each name once, with its last value, as prost's map keeps it), then
    /// the `header_map` list (`raw_value` when set, else `value`). Names and values are bytes,
    /// not checked to be UTF-8: Envoy passes header bytes on as they came, the decision reads
    /// them as bytes (as the proxy front does), and a request whose headers prost would refuse
    /// to decode must still be decided.
    pub headers: Vec<(&'a [u8], &'a [u8])>,
}

/// Which variant of `Address`'s oneof was read last (a later variant replaces an earlier one;
/// the same variant again merges into it, as prost does).
#[derive(Clone, Copy)]
enum Addr<'a> {
    Unset,
    Socket(&'a str),
    Other,
}

/// Read a serialized `CheckRequest`.
pub fn read(message: &[u8]) -> Result<CheckFacts<'_>, Malformed> {
    let mut facts = CheckFacts::default();
    let mut addr = Addr::Unset;
    let mut raw = Vec::new();
    for field in fields(message) {
        // CheckRequest.attributes = 1
        if let (1, value) = field? {
            attributes(bytes(value)?, &mut facts, &mut addr, &mut raw)?;
        }
    }
    facts.peer = match addr {
        Addr::Socket(a) => Some(a),
        _ => None,
    };
    // A map keeps one value per name, the last one sent: sort (stably) and keep each run's last.
    let map = &mut facts.headers;
    if map.len() > 1 {
        map.sort_by(|a, b| a.0.cmp(b.0));
        let mut kept = 0;
        for i in 0..map.len() {
            if i + 1 < map.len() && map[i + 1].0 == map[i].0 {
                continue;
            }
            map[kept] = map[i];
            kept += 1;
        }
        map.truncate(kept);
    }
    map.append(&mut raw);
    Ok(facts)
}

/// `AttributeContext`: source = 1, request = 4 (context_extensions = 10 is a map).
fn attributes<'a>(
    m: &'a [u8],
    facts: &mut CheckFacts<'a>,
    addr: &mut Addr<'a>,
    raw: &mut Vec<(&'a [u8], &'a [u8])>,
) -> Result<(), Malformed> {
    for field in fields_with_maps(m, &[10]) {
        match field? {
            (1, v) => {
                // Peer.address = 1 (labels = 3 is a map)
                for field in fields_with_maps(bytes(v)?, &[3]) {
                    if let (1, v) = field? {
                        address(bytes(v)?, addr)?;
                    }
                }
            }
            (4, v) => {
                // Request.http = 2
                for field in fields(bytes(v)?) {
                    if let (2, v) = field? {
                        facts.http = true;
                        http_request(bytes(v)?, facts, raw)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `Address`: the oneof socket_address = 1 (`SocketAddress.address` = 2), pipe = 2,
/// envoy_internal_address = 3.
fn address<'a>(m: &'a [u8], addr: &mut Addr<'a>) -> Result<(), Malformed> {
    for field in fields(m) {
        match field? {
            (1, v) => {
                let mut a = match *addr {
                    Addr::Socket(a) => a,
                    _ => "",
                };
                for field in fields(bytes(v)?) {
                    if let (2, v) = field? {
                        a = string(v)?;
                    }
                }
                *addr = Addr::Socket(a);
            }
            (2 | 3, v) => {
                bytes(v)?;
                *addr = Addr::Other;
            }
            _ => {}
        }
    }
    Ok(())
}

/// `HttpRequest`: method = 2, headers = 3 (a map), path = 4, host = 5, header_map = 13.
fn http_request<'a>(
    m: &'a [u8],
    facts: &mut CheckFacts<'a>,
    raw: &mut Vec<(&'a [u8], &'a [u8])>,
) -> Result<(), Malformed> {
    for field in fields_with_maps(m, &[3]) {
        match field? {
            (2, v) => facts.method = string(v)?,
            (4, v) => facts.path = string(v)?,
            (5, v) => facts.host = string(v)?,
            (3, v) => {
                // A map entry: key = 1, value = 2.
                let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
                for field in fields(bytes(v)?) {
                    match field? {
                        (1, v) => name = bytes(v)?,
                        (2, v) => value = bytes(v)?,
                        _ => {}
                    }
                }
                facts.headers.push((name, value));
            }
            (13, v) => {
                // HeaderMap.headers = 1, each a HeaderValue: key = 1, value = 2, raw_value = 3.
                for field in fields(bytes(v)?) {
                    if let (1, v) = field? {
                        let (mut name, mut value, mut raw_value): (&[u8], &[u8], &[u8]) =
                            (b"", b"", b"");
                        for field in fields(bytes(v)?) {
                            match field? {
                                (1, v) => name = bytes(v)?,
                                (2, v) => value = bytes(v)?,
                                (3, v) => raw_value = bytes(v)?,
                                _ => {}
                            }
                        }
                        let value = if raw_value.is_empty() {
                            value
                        } else {
                            raw_value
                        };
                        raw.push((name, value));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A field's value as far as this reader looks at it.
#[derive(Clone, Copy)]
enum Value<'a> {
    Delimited(&'a [u8]),
    /// Any other wire type (already skipped).
    Other,
}

fn bytes(v: Value<'_>) -> Result<&[u8], Malformed> {
    match v {
        Value::Delimited(b) => Ok(b),
        Value::Other => Err(Malformed),
    }
}

fn string(v: Value<'_>) -> Result<&str, Malformed> {
    std::str::from_utf8(bytes(v)?).map_err(|_| Malformed)
}

/// The fields of one message, in wire order: (field number, value). Fields numbered in `maps`
/// are map fields, read as length-delimited whatever their wire type, as prost reads them.
struct Fields<'a> {
    buf: &'a [u8],
    maps: &'static [u32],
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf, maps: &[] }
}

fn fields_with_maps<'a>(buf: &'a [u8], maps: &'static [u32]) -> Fields<'a> {
    Fields { buf, maps }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let next = (|| {
            let (tag, wire) = decode_key(&mut self.buf).map_err(|_| Malformed)?;
            if wire != WireType::LengthDelimited && !self.maps.contains(&tag) {
                skip_field(wire, tag, &mut self.buf, DecodeContext::default())
                    .map_err(|_| Malformed)?;
                return Ok((tag, Value::Other));
            }
            let len = decode_varint(&mut self.buf).map_err(|_| Malformed)?;
            let len = usize::try_from(len).map_err(|_| Malformed)?;
            if len > self.buf.len() {
                return Err(Malformed);
            }
            let (value, rest) = self.buf.split_at(len);
            self.buf = rest;
            Ok((tag, Value::Delimited(value)))
        })();
        if next.is_err() {
            // Stop after the first error.
            self.buf = &[];
        }
        Some(next)
    }
}

/// The encoded length of a length-delimited field of `len` bytes.
pub const fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A string field of proto3 (omitted when empty, as prost omits it).
pub const fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

/// Writes protobuf fields into a buffer; the caller gives each message's length first (the
/// `*_len` functions beside each writer compute it).
pub struct Writer<'b, B: BufMut>(pub &'b mut B);

impl<B: BufMut> Writer<'_, B> {
    /// A varint; most here (keys of small field numbers, short lengths) are one byte.
    #[inline]
    fn put_varint(&mut self, v: u64) {
        if v < 0x80 {
            self.0.put_u8(v as u8);
        } else {
            encode_varint(v, self.0);
        }
    }

    fn key(&mut self, tag: u32, wire: WireType) {
        self.put_varint(u64::from(tag << 3 | wire as u32));
    }

    /// The key and length of an embedded message (or string) of `len` bytes; its content follows.
    pub fn delimited(&mut self, tag: u32, len: usize) {
        self.key(tag, WireType::LengthDelimited);
        self.put_varint(len as u64);
    }

    /// A proto3 string field: nothing when empty.
    pub fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(tag, s.as_bytes());
        }
    }

    /// A length-delimited field that is always written (a oneof member, a repeated element).
    pub fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.delimited(tag, b.len());
        self.0.put_slice(b);
    }

    /// Bytes already encoded.
    pub fn raw(&mut self, b: &[u8]) {
        self.0.put_slice(b);
    }

    /// A varint field (an int32, enum or bool), written even when zero.
    pub fn varint(&mut self, tag: u32, v: u64) {
        self.key(tag, WireType::Varint);
        self.put_varint(v);
    }
}

/// The encoded length of a varint field (written even when zero).
pub const fn varint_len(tag: u32, v: u64) -> usize {
    key_len(tag) + encoded_len_varint(v)
}

#[cfg(test)]
mod tests;
