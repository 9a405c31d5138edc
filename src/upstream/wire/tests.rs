use super::*;
use proptest::prelude::*;

fn parse(bytes: &[u8], method: Method, upgrade: bool) -> (Result<Option<Head>, WireError>, usize) {
    let mut buf = BytesMut::from(bytes);
    let r = parse_head(&mut buf, &method, upgrade);
    (r, buf.len())
}

fn head(bytes: &str) -> Head {
    match parse(bytes.as_bytes(), Method::GET, false) {
        (Ok(Some(h)), _) => h,
        other => panic!("{bytes:?}: {:?}", other.0),
    }
}

fn refused(bytes: &str) -> WireError {
    match parse(bytes.as_bytes(), Method::GET, false).0 {
        Err(e) => e,
        Ok(h) => panic!("{bytes:?} was accepted: {h:?}"),
    }
}

/// Fields as a client sent them: `Name: value` lines.
fn received(lines: &'static [u8]) -> crate::http1::Fields {
    let head = Bytes::from_static(lines);
    let base = head.as_ptr() as usize;
    let at = head
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let colon = l.iter().position(|&b| b == b':').unwrap();
            Field::at(&l[..colon], l[colon + 1..].trim_ascii(), base)
        })
        .collect();
    crate::http1::Fields::new(head, at)
}

#[test]
fn request_heads_are_framed_by_the_body_not_by_the_headers() {
    use crate::headers::{FieldEdit, RequestFields};
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example"));
    h.insert("content-length", HeaderValue::from_static("999"));
    h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    h.append("x-a", HeaderValue::from_static("1"));
    h.append("x-a", HeaderValue::from_static("2"));
    h.append("x-gone", HeaderValue::from_static("3"));
    let map = RequestFields::Map(h);
    // As an HTTP/1.1 client sent them: names as spelled, passed on as spelled.
    let head = RequestFields::Head(received(
        b"Host: api.example\r\nContent-Length: 999\r\nX-Gone: 3\r\nTRANSFER-encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n",
    ));
    let cases = [
        (RequestFraming::None, ""),
        (RequestFraming::Length(12), "content-length: 12\r\n"),
        (RequestFraming::Chunked, "transfer-encoding: chunked\r\n"),
    ];
    for (fields, spelled) in [
        (map, "host: api.example\r\nx-a: 1\r\nx-a: 2\r\n"),
        (head, "Host: api.example\r\nX-A: 1\r\nx-a: 2\r\n"),
    ] {
        let mut added = Added::new();
        added.push(
            &HeaderName::from_static("x-key-id"),
            &HeaderValue::from_static("k1"),
        );
        let mut request = crate::upstream::Outbound {
            method: Method::POST,
            target: http::uri::PathAndQuery::from_static("/v1/a?b=c"),
            fields,
            added,
            upgrade: false,
        };
        request.fields.remove(&HeaderName::from_static("x-gone"));
        for (framing, expected) in cases {
            let mut out = Vec::new();
            encode_head(&mut out, &request, framing);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("POST /v1/a?b=c HTTP/1.1\r\n{spelled}x-key-id: k1\r\n{expected}\r\n")
            );
        }
    }
    let mut out = Vec::new();
    encode_chunk(&mut out, b"hello world, 26 bytes long");
    assert_eq!(out, b"1a\r\nhello world, 26 bytes long\r\n");
}

#[test]
fn response_framing_follows_rfc_9112() {
    let cases: &[(&str, Framing, bool)] = &[
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Framing::Length(5),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            Framing::Length(0),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            Framing::Chunked,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n",
            Framing::Chunked,
            true,
        ),
        ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
        (
            "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
            Framing::Empty,
            true,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
            Framing::Empty,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
            Framing::Length(5),
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: x, Close\r\n\r\n",
            Framing::Length(5),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
            Framing::Length(5),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\n",
            Framing::Length(5),
            true,
        ),
        (
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n",
            Framing::UntilClose,
            false,
        ),
    ];
    for (bytes, framing, keep_alive) in cases {
        let h = head(bytes);
        assert_eq!(h.framing, *framing, "{bytes:?}");
        assert_eq!(h.keep_alive, *keep_alive, "{bytes:?}");
    }
    // A CONNECT's success is a tunnel: no body, and never a pooled connection.
    let (h, _) = parse(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        Method::CONNECT,
        false,
    );
    let h = h.unwrap().unwrap();
    assert_eq!((h.framing, h.keep_alive), (Framing::Empty, false));
    // A HEAD's answer has no body, whatever its length says.
    let (h, _) = parse(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        Method::HEAD,
        false,
    );
    assert_eq!(h.unwrap().unwrap().framing, Framing::Empty);
}

#[test]
fn ambiguous_framing_is_refused() {
    for bytes in [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
        "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    ] {
        assert!(matches!(refused(bytes), WireError::Framing(_)), "{bytes:?}");
    }
}

#[test]
fn malformed_and_oversized_heads_are_refused() {
    for bytes in [
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 099 OK\r\n\r\n",
        "SMTP ready\r\n\r\n",
        "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        "HTTP/1.1 200 OK\r\nx: a\0b\r\n\r\n",
    ] {
        assert!(
            matches!(refused(bytes), WireError::MalformedHead),
            "{bytes:?}"
        );
    }
    let many: String = (0..200).map(|i| format!("x-{i}: v\r\n")).collect();
    assert_eq!(
        refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
        WireError::HeadTooLarge
    );
    let long = "a".repeat(MAX_HEAD_BYTES);
    assert_eq!(
        refused(&format!("HTTP/1.1 200 OK\r\nx: {long}\r\n\r\n")),
        WireError::HeadTooLarge
    );
    // Still incomplete but already too long: refused without waiting for the rest.
    assert_eq!(
        refused(&format!("HTTP/1.1 200 OK\r\nx: {long}")),
        WireError::HeadTooLarge
    );
}

#[test]
fn interim_answers_are_skipped_and_only_an_asked_101_is_accepted() {
    let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok";
    let (h, left) = parse(bytes, Method::POST, false);
    let h = h.unwrap().unwrap();
    assert_eq!(h.status, StatusCode::CREATED);
    assert!(h.fields.get("link").is_none());
    assert_eq!(left, 2, "the body stays in the buffer");

    let switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nframes";
    assert_eq!(
        parse(switch, Method::GET, false).0.unwrap_err(),
        WireError::UnaskedUpgrade
    );
    let (h, left) = parse(switch, Method::GET, true);
    let h = h.unwrap().unwrap();
    assert_eq!(
        (h.status, h.framing, h.keep_alive),
        (StatusCode::SWITCHING_PROTOCOLS, Framing::Empty, false)
    );
    assert_eq!(left, 6, "bytes after the 101 belong to the tunnel");
}

#[test]
fn a_head_in_pieces_is_incomplete_until_its_end() {
    let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok";
    for cut in 0..whole.len() - 2 {
        let (r, left) = parse(&whole[..cut], Method::GET, false);
        assert!(matches!(r, Ok(None)), "cut at {cut}");
        assert_eq!(left, cut, "nothing consumed at {cut}");
    }
    let h = head(std::str::from_utf8(whole).unwrap());
    assert_eq!(h.fields.get("x-a"), Some(&b"1"[..]));
    assert_eq!(h.fields.to_map().unwrap()["x-a"], "1");
    assert_eq!(h.version, Version::HTTP_11);
}

/// Body, trailers and the bytes after the body.
type Decoding = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

/// Decode all of `input`, fed `step` bytes at a time. `Err(None)`: the decoder still waited for
/// more when the input ran out; `Err(Some(_))`: it refused.
fn decode_all(input: &[u8], step: usize) -> Result<Decoding, Option<WireError>> {
    let mut decoder = Chunked::default();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let (mut body, mut trailers) = (Vec::new(), None);
    loop {
        match decoder.decode(&mut buf).map_err(Some)? {
            Decoded::Data(d) => body.extend_from_slice(&d),
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => return Ok((body, trailers, [&buf[..], &input[fed..]].concat())),
            Decoded::More if fed < input.len() => {
                let next = (fed + step).min(input.len());
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
            }
            Decoded::More => return Err(None),
        }
    }
}

#[test]
fn chunked_bodies_decode_in_any_pieces_and_leave_what_follows() {
    let input = b"5\r\nhello\r\n1;name=value\r\n \r\n6 ; ext\r\nworld!\r\n0\r\n\r\nNEXT";
    for step in [1, 2, 3, 7, input.len()] {
        let (body, trailers, rest) = decode_all(input, step).unwrap();
        assert_eq!(body, b"hello world!", "step {step}");
        assert!(trailers.is_none());
        assert_eq!(rest, b"NEXT", "step {step}");
    }
    let with_trailers = b"3\r\nabc\r\n0\r\nx-checksum: 1\r\nx-b: 2\r\n\r\n";
    for step in [1, 5, with_trailers.len()] {
        let (body, trailers, rest) = decode_all(with_trailers, step).unwrap();
        assert_eq!(body, b"abc");
        let t = trailers.expect("trailers");
        assert_eq!(
            (t["x-checksum"].as_bytes(), t["x-b"].as_bytes()),
            (&b"1"[..], &b"2"[..])
        );
        assert!(rest.is_empty());
    }
}

#[test]
fn malformed_chunks_are_refused() {
    let cases: &[(&[u8], &str)] = &[
        (b"5\nhello\r\n0\r\n\r\n", "a bare LF"),
        (b"\r\n", "no chunk size"),
        (b"\n", "a bare LF"),
        (b"x\r\n", "no chunk size"),
        (b"5 5\r\nhello\r\n0\r\n\r\n", "junk after the chunk size"),
        (b"5 \r\nhello\r\n0\r\n\r\n", "junk after the chunk size"),
        (b"-5\r\n", "no chunk size"),
        (b"5\r\nhelloXX0\r\n\r\n", "data not followed by CRLF"),
        (b"5\r\nhello\n0\r\n\r\n", "data not followed by CRLF"),
        (b"11111111111111111\r\n", "a chunk size too large"),
        (b"0\r\nbad trailer\r\n\r\n", "a malformed trailer"),
        (b"5\r\nhello\r\n0\r\n\n", "a bare LF"),
        (b"0\r\nx-a: 1\nx-b: 2\r\n\r\n", "a bare LF"),
    ];
    for (input, reason) in cases {
        assert_eq!(
            decode_all(input, 1),
            Err(Some(WireError::Chunk(reason))),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    let long_line = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
    assert_eq!(
        decode_all(long_line.as_bytes(), 4096),
        Err(Some(WireError::Chunk("a chunk-size line too long")))
    );
    // Extensions within each line's limit, but too many over the body.
    let many: String = (0..10)
        .map(|_| format!("1;{}\r\na\r\n", "e".repeat(2000)))
        .collect();
    assert_eq!(
        decode_all(many.as_bytes(), 4096),
        Err(Some(WireError::Chunk("too many chunk extensions")))
    );
    // Still waiting, not refused: an unfinished body.
    assert_eq!(decode_all(b"5\r\nhel", 1), Err(None));
    // The largest 16-digit size is a size, not an overflow.
    let mut decoder = Chunked::default();
    let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
    assert_eq!(
        decoder.decode(&mut buf),
        Ok(Decoded::Data(Bytes::from_static(b"ab")))
    );
}

proptest! {
    #[test]
    fn chunked_roundtrip(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..8), step in 1usize..50) {
        let mut encoded = Vec::new();
        for c in &chunks {
            encode_chunk(&mut encoded, c);
        }
        encoded.extend_from_slice(LAST_CHUNK);
        let (body, trailers, rest) = decode_all(&encoded, step).expect("decodes");
        prop_assert_eq!(body, chunks.concat());
        prop_assert!(trailers.is_none());
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&bytes, Method::GET, true);
        let _ = decode_all(&bytes, 3);
    }
}

#[test]
fn hop_by_hop_fields_stay_with_the_connection_unless_it_switches() {
    let h = head(
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: keep-alive, X-Secret\r\nkeep-alive: timeout=5\r\nx-secret: 1\r\nproxy-connection: x\r\ntrailer: x\r\nupgrade: h2c\r\nx-kept: yes\r\n\r\nok",
    );
    let names: Vec<&[u8]> = h.fields.iter().map(|(n, _)| n).collect();
    assert_eq!(names, [&b"content-length"[..], b"x-kept"]);
    assert!(h.keep_alive);
    let (h, _) = parse(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        Method::GET,
        true,
    );
    let h = h.unwrap().unwrap();
    let map = h.fields.to_map().unwrap();
    assert_eq!(map["upgrade"], "websocket");
    assert_eq!(map["connection"], "upgrade");
    // keygate's own values win over the upstream's when merged.
    let mut own = HeaderMap::new();
    own.insert("upgrade", HeaderValue::from_static("mine"));
    h.fields.merge_into(&mut own).unwrap();
    assert_eq!(own.get_all("upgrade").iter().collect::<Vec<_>>(), ["mine"]);
    assert_eq!(own["connection"], "upgrade");
}

#[test]
fn hop_by_hop_names_are_told_apart_in_any_case() {
    let hop_by_hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let end_to_end = [
        "content-length",
        "content-type",
        "date",
        "x-upstream",
        "tk",
        "trailers",
        "upgrade-insecure-requests",
        "connectioN-x",
        "keep_alive",
    ];
    for name in hop_by_hop {
        for spelled in [name.to_owned(), name.to_ascii_uppercase()] {
            assert!(
                crate::headers::is_hop_by_hop(spelled.as_bytes()),
                "{spelled}"
            );
        }
    }
    for name in end_to_end {
        for spelled in [name.to_owned(), name.to_ascii_uppercase()] {
            assert!(
                !crate::headers::is_hop_by_hop(spelled.as_bytes()),
                "{spelled}"
            );
        }
    }
}

#[test]
fn a_bodyless_answer_keeps_its_length_only_where_it_means_something() {
    let cases: &[(&str, Method, Option<&str>)] = &[
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            Method::HEAD,
            Some("5"),
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            Method::HEAD,
            None,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n",
            Method::HEAD,
            None,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            Method::GET,
            Some("10"),
        ),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 1, 2\r\n\r\n",
            Method::GET,
            None,
        ),
        (
            "HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n",
            Method::GET,
            None,
        ),
    ];
    for (bytes, method, want) in cases {
        let h = parse(bytes.as_bytes(), method.clone(), false)
            .0
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty, "{bytes:?}");
        let got = h
            .fields
            .get("content-length")
            .map(|v| std::str::from_utf8(v).unwrap());
        assert_eq!(got, *want, "{bytes:?}");
    }
}
