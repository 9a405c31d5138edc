use super::*;
use http::header::HeaderValue;
use proptest::prelude::*;

const LIMITS: HeadLimits = HeadLimits {
    bytes: 16 * 1024,
    fields: 100,
};

fn parse(bytes: &[u8], limits: HeadLimits) -> (Result<Option<RequestHead>, HeadError>, usize) {
    let mut buf = BytesMut::from(bytes);
    let r = parse_request(&mut buf, limits);
    (r, buf.len())
}

fn head(bytes: &str) -> RequestHead {
    match parse(bytes.as_bytes(), LIMITS) {
        (Ok(Some(h)), _) => h,
        other => panic!("{bytes:?}: {:?}", other.0),
    }
}

fn refused(bytes: &str) -> HeadError {
    match parse(bytes.as_bytes(), LIMITS).0 {
        Err(e) => e,
        Ok(h) => panic!("{bytes:?} was accepted: {h:?}"),
    }
}

#[test]
fn a_request_head_is_read_whole_and_only_the_head_is_consumed() {
    let bytes = b"\r\nGET /v1/a?b=c HTTP/1.1\r\nHost: api\r\nX-A: 1\r\nx-a: 2\r\n\r\nNEXT";
    let (r, left) = parse(bytes, LIMITS);
    let h = r.unwrap().unwrap();
    assert_eq!(
        left, 4,
        "the bytes after the head stay for the body or the next request"
    );
    assert_eq!(h.request.method(), Method::GET);
    assert_eq!(h.request.uri(), "/v1/a?b=c");
    assert_eq!(h.request.version(), Version::HTTP_11);
    assert!(
        h.request.headers().is_empty(),
        "the fields are not in a map"
    );
    assert_eq!(h.fields.get("host"), Some(&b"api"[..]));
    let xa: Vec<_> = h.fields.values(b"X-a").collect();
    assert_eq!(xa, [b"1", b"2"]);
    let names: Vec<_> = h.fields.iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [&b"Host"[..], b"X-A", b"x-a"],
        "as the client spelled them"
    );
    assert_eq!(h.framing, BodyFraming::Empty);
    assert!(h.keep_alive);
    assert!(!h.expect_continue);
    // Incomplete: nothing consumed, read more.
    for cut in [1, 10, bytes.len() - 6] {
        let (r, left) = parse(&bytes[..cut], LIMITS);
        assert!(matches!(r, Ok(None)), "{cut}");
        assert_eq!(left, cut);
    }
}

#[test]
fn body_framing_follows_rfc_9112_and_refuses_every_ambiguity() {
    let ok: &[(&str, BodyFraming)] = &[
        ("POST / HTTP/1.1\r\nHost: h\r\n\r\n", BodyFraming::Empty),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
            BodyFraming::Empty,
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n",
            BodyFraming::Length(12),
        ),
        (
            "POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n",
            BodyFraming::Length(3),
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            BodyFraming::Chunked,
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding:  Chunked \r\n\r\n",
            BodyFraming::Chunked,
        ),
    ];
    for (bytes, framing) in ok {
        assert_eq!(head(bytes).framing, *framing, "{bytes:?}");
    }
    let bad = [
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        // Not a field name (a space before the colon), a folded line, bare CR.
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\rX-B: 2\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
        "GET / HTTP/1.2\r\n\r\n",
        "GET /\r\n\r\n",
        "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
        "G\0T / HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n",
    ];
    for bytes in bad {
        assert!(
            matches!(refused(bytes), HeadError::Malformed(_)),
            "{bytes:?}"
        );
    }
}

#[test]
fn http_1_1_needs_a_host_and_te_trailers_is_read() {
    assert!(matches!(
        refused("GET / HTTP/1.1\r\nX-A: 1\r\n\r\n"),
        HeadError::Malformed(_)
    ));
    assert!(head("GET / HTTP/1.0\r\n\r\n").fields.is_empty());
    assert!(head("GET / HTTP/1.1\r\nHost: h\r\nTE: gzip, Trailers\r\n\r\n").trailers);
    assert!(!head("GET / HTTP/1.1\r\nHost: h\r\nTE: gzip\r\n\r\n").trailers);
    assert!(head("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").upgrade);
    assert!(!head("GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n").upgrade);
    assert!(!head("GET / HTTP/1.1\r\nHost: h\r\n\r\n").upgrade);
}

#[test]
fn a_raw_fragment_is_refused_not_cut_off() {
    for target in ["/a#b", "/a?q=1#b", "/a#/../admin", "#"] {
        assert_eq!(
            refused(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n")),
            HeadError::Fragment
        );
    }
}

#[test]
fn a_raw_control_byte_in_the_target_is_told_apart() {
    for target in [
        "/a\u{0}b",
        "/a\u{1}",
        "/a\tb",
        "/a\u{7f}",
        "/\u{1b}[2J",
        "/a?q=\u{0}",
    ] {
        assert_eq!(
            refused(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n")),
            HeadError::ControlInTarget,
            "{target:?}"
        );
    }
    // After the empty lines httparse skips (a stray CRLF after the previous body).
    assert_eq!(
        refused("\r\n\r\nGET /a\u{1} HTTP/1.1\r\nHost: h\r\n\r\n"),
        HeadError::ControlInTarget
    );
    // Elsewhere in the head: malformed, not a path.
    for head in [
        "G\u{0}T / HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\u{0}\r\n\r\n",
    ] {
        assert!(matches!(refused(head), HeadError::Malformed(_)), "{head:?}");
    }
}

#[test]
fn connection_and_expect_are_read_from_every_field() {
    let cases: &[(&str, bool, bool)] = &[
        ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", true, false),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            false,
            false,
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: x-a, Close\r\n\r\n",
            false,
            false,
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: x-a\r\nConnection: close\r\n\r\n",
            false,
            false,
        ),
        ("GET / HTTP/1.0\r\n\r\n", false, false),
        (
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            true,
            false,
        ),
        (
            "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
            false,
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            true,
            true,
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
            true,
            true,
        ),
        (
            "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            false,
            false,
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: something\r\nContent-Length: 3\r\n\r\n",
            true,
            false,
        ),
    ];
    for (bytes, keep_alive, expect) in cases {
        let h = head(bytes);
        assert_eq!(h.keep_alive, *keep_alive, "{bytes:?}");
        assert_eq!(h.expect_continue, *expect, "{bytes:?}");
    }
}

#[test]
fn heads_over_the_limits_are_too_large() {
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    assert_eq!(refused(&big), HeadError::TooLarge);
    // Incomplete but already over the limit: refused without waiting for the rest.
    let (r, _) = parse(&big.as_bytes()[..17 * 1024], LIMITS);
    assert_eq!(r.unwrap_err(), HeadError::TooLarge);
    let many: String = (0..101).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    assert_eq!(
        refused(&format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n")),
        HeadError::TooLarge
    );
    let some: String = (0..99).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    assert_eq!(
        head(&format!("GET / HTTP/1.1\r\nHost: h\r\n{some}\r\n"))
            .fields
            .iter()
            .count(),
        100
    );
}

#[test]
fn response_heads_carry_keygates_framing_only() {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("content-length", HeaderValue::from_static("999"));
    h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    let date = b"Wed, 02 Dec 2026 07:00:00 GMT";
    let cases: &[(ResponseFraming, Persistence, &str)] = &[
        (
            ResponseFraming::Length(5),
            Persistence::Default,
            "content-length: 5\r\n",
        ),
        (
            ResponseFraming::Chunked,
            Persistence::Close,
            "transfer-encoding: chunked\r\nconnection: close\r\n",
        ),
        (
            ResponseFraming::UntilClose,
            Persistence::Close,
            "connection: close\r\n",
        ),
        (
            ResponseFraming::NoBody { keep_length: false },
            Persistence::KeepAlive,
            "connection: keep-alive\r\n",
        ),
    ];
    for (framing, persistence, tail) in cases {
        let mut out = Vec::new();
        encode_response_head(
            &mut out,
            StatusCode::OK,
            &h,
            Outside::default(),
            *framing,
            *persistence,
            date,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Wed, 02 Dec 2026 07:00:00 GMT\r\n{tail}\r\n"
            ),
            "{framing:?}"
        );
    }
    // HEAD and 304 keep the answer's own length; a 101 its own Connection; a Date is kept.
    let mut out = Vec::new();
    h.insert(
        "date",
        HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
    );
    encode_response_head(
        &mut out,
        StatusCode::NOT_MODIFIED,
        &h,
        Outside::default(),
        ResponseFraming::NoBody { keep_length: true },
        Persistence::Default,
        date,
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{text}");
    assert!(text.contains("content-length: 999\r\n"), "{text}");
    assert!(!text.contains("connection"), "{text}");
    assert_eq!(text.matches("date: ").count(), 1, "{text}");
    let mut out = Vec::new();
    let mut up = HeaderMap::new();
    up.insert("connection", HeaderValue::from_static("upgrade"));
    up.insert("upgrade", HeaderValue::from_static("websocket"));
    encode_response_head(
        &mut out,
        StatusCode::SWITCHING_PROTOCOLS,
        &up,
        Outside::default(),
        ResponseFraming::NoBody { keep_length: false },
        Persistence::Upgrade,
        date,
    );
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
        "{text}"
    );
    let mut out = Vec::new();
    encode_chunk_size(&mut out, 26);
    encode_last_chunk(&mut out, Some(&up));
    assert_eq!(
        out,
        b"1a\r\n0\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
}

#[test]
fn the_h2_preface_is_recognized_from_its_first_byte() {
    assert!(may_be_h2(b"P"));
    assert!(may_be_h2(b"PRI * HTTP/2.0\r\n"));
    assert!(may_be_h2(H2_PREFACE));
    assert!(!may_be_h2(b"POST / HTTP/1.1\r\nHost: h\r\n"));
    assert!(!may_be_h2(b"GET"));
    assert_eq!(date().len(), 29);
}

proptest! {
    /// Any bytes: a head, a refusal or "read more", never a panic; what is consumed is a
    /// prefix, and a head's body framing is one of the three.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (r, left) = parse(&bytes, LIMITS);
        match r {
            Ok(None) | Err(_) => prop_assert_eq!(left, bytes.len()),
            Ok(Some(_)) => prop_assert!(left < bytes.len()),
        }
    }

    /// Heads made of valid parts parse to what they say, with their Content-Length.
    #[test]
    fn well_formed_heads_parse_to_what_they_say(
        path in "/[a-z0-9/._~%-]{0,40}",
        names in proptest::collection::vec("x-[a-z]{1,10}", 0..20),
        len in 0u64..1_000_000,
    ) {
        let fields: String = names.iter().map(|n| format!("{n}: v\r\n")).collect();
        let text = format!("PUT {path} HTTP/1.1\r\nHost: h\r\n{fields}Content-Length: {len}\r\n\r\n");
        let h = head(&text);
        prop_assert_eq!(h.request.uri().path(), path.as_str());
        prop_assert_eq!(h.fields.iter().count(), names.len() + 2);
        let want = if len == 0 { BodyFraming::Empty } else { BodyFraming::Length(len) };
        prop_assert_eq!(h.framing, want);
    }
}
