use super::*;
use proptest::prelude::*;

const DEFAULT: PathOptions = PathOptions {
    allow_semicolon: false,
    as_sent: false,
};
const SEMI: PathOptions = PathOptions {
    allow_semicolon: true,
    as_sent: false,
};

/// (input, expected forwarded form, expected matching form) with default options.
const ACCEPTED: &[(&str, &str, &str)] = &[
    // clean paths (fast path)
    ("/", "/", "/"),
    ("/v1/analyses/123", "/v1/analyses/123", "/v1/analyses/123"),
    ("/a/b/", "/a/b/", "/a/b"),
    ("/a.b/c..d/...", "/a.b/c..d/...", "/a.b/c..d/..."),
    (
        "/a:b@c!$&'()*+,=~_-",
        "/a:b@c!$&'()*+,=~_-",
        "/a:b@c!$&'()*+,=~_-",
    ),
    // repeated slashes
    ("//", "/", "/"),
    ("///", "/", "/"),
    ("//admin", "/admin", "/admin"),
    ("/a///b", "/a/b", "/a/b"),
    ("/a//", "/a/", "/a"),
    // dot segments
    ("/.", "/", "/"),
    ("/./", "/", "/"),
    ("/a/./b/", "/a/b/", "/a/b"),
    ("/a/../admin", "/admin", "/admin"),
    ("/a/b/.", "/a/b/", "/a/b"),
    ("/a/b/..", "/a/", "/a"),
    ("/a/..", "/", "/"),
    ("/a/b/../../c", "/c", "/c"),
    ("/a/%2E/b", "/a/b", "/a/b"),
    ("/x/%2E%2e/", "/", "/"),
    ("/x/%2e%2e/admin", "/admin", "/admin"),
    ("/x/.%2e/admin", "/admin", "/admin"),
    ("/a/%2e", "/a/", "/a"),
    // decoding to canonical form
    ("/%41%42c", "/ABc", "/ABc"),
    ("/%7e%7E", "/~~", "/~~"),
    ("/%21%40%3a", "/!@:", "/!@:"),
    ("/a%20b", "/a%20b", "/a%20b"),
    ("/a%3fb", "/a%3Fb", "/a%3Fb"),
    ("/a%23b", "/a%23b", "/a%23b"),
    ("/a\"b", "/a%22b", "/a%22b"),
    (
        "/a<b>{c}|^`[d]",
        "/a%3Cb%3E%7Bc%7D%7C%5E%60%5Bd%5D",
        "/a%3Cb%3E%7Bc%7D%7C%5E%60%5Bd%5D",
    ),
    ("/a?b", "/a%3Fb", "/a%3Fb"),
    ("/50%25", "/50%25", "/50%25"),
    ("/%25", "/%25", "/%25"),
    ("/%25x", "/%25x", "/%25x"),
    ("/%25g1", "/%25g1", "/%25g1"),
    ("/%25/41", "/%25/41", "/%25/41"),
    ("/%ff%80", "/%FF%80", "/%FF%80"),
    // unicode
    ("/%e2%82%ac", "/%E2%82%AC", "/%E2%82%AC"),
    ("/€", "/%E2%82%AC", "/%E2%82%AC"),
    ("/caf\u{e9}/", "/caf%C3%A9/", "/caf%C3%A9"),
    ("/日本", "/%E6%97%A5%E6%9C%AC", "/%E6%97%A5%E6%9C%AC"),
];

/// (input, error) with default options.
const REJECTED: &[(&str, PathError)] = &[
    ("", PathError::NotAbsolute),
    ("*", PathError::NotAbsolute),
    ("a/b", PathError::NotAbsolute),
    ("%2F", PathError::NotAbsolute),
    ("/a#frag", PathError::Fragment),
    ("/#", PathError::Fragment),
    ("/a\\b", PathError::Backslash),
    ("/a b", PathError::ControlCharacter),
    ("/a\0b", PathError::ControlCharacter),
    ("/a\tb", PathError::ControlCharacter),
    ("/a\r\nb", PathError::ControlCharacter),
    ("/a\u{7f}b", PathError::ControlCharacter),
    ("/a%zz", PathError::BadPercentEncoding),
    ("/a%4", PathError::BadPercentEncoding),
    ("/a%", PathError::BadPercentEncoding),
    ("/a%%41", PathError::BadPercentEncoding),
    ("/a%4/1", PathError::BadPercentEncoding),
    ("/a%+1", PathError::BadPercentEncoding),
    ("/a/%2F/b", PathError::EncodedSeparator),
    ("/a%2fb", PathError::EncodedSeparator),
    ("/a%5Cb", PathError::EncodedSeparator),
    ("/a%5cb", PathError::EncodedSeparator),
    ("/a%00b", PathError::EncodedControl),
    ("/a%1fb", PathError::EncodedControl),
    ("/a%0A", PathError::EncodedControl),
    ("/a%7Fb", PathError::EncodedControl),
    ("/a%252Fb", PathError::DoubleEncoding),
    ("/a%2541", PathError::DoubleEncoding),
    ("/%25%32%46", PathError::DoubleEncoding),
    ("/%25a%62", PathError::DoubleEncoding),
    ("/..", PathError::AboveRoot),
    ("/../a", PathError::AboveRoot),
    ("/a/../../b", PathError::AboveRoot),
    ("/%2e%2e/admin", PathError::AboveRoot),
    ("/%2E%2e/", PathError::AboveRoot),
    ("/./..", PathError::AboveRoot),
    ("/a;b", PathError::Semicolon),
    ("/a/..;/admin", PathError::Semicolon),
    ("/a/..%3B/admin", PathError::Semicolon),
    ("/a%3bb", PathError::Semicolon),
];

/// (input, result) with `allow_semicolon`.
const WITH_SEMICOLONS: &[(&str, Result<&str, PathError>)] = &[
    ("/a;b", Ok("/a;b")),
    ("/a;jsessionid=1/b;v=2/", Ok("/a;jsessionid=1/b;v=2/")),
    ("/a%3Bb", Ok("/a;b")),
    ("/a;b/../c", Ok("/c")),
    ("/a/..;/admin", Err(PathError::AmbiguousParameter)),
    ("/a/..%3B/admin", Err(PathError::AmbiguousParameter)),
    ("/a/..%3b/admin", Err(PathError::AmbiguousParameter)),
    ("/a/%2e%2e;x/admin", Err(PathError::AmbiguousParameter)),
    ("/a/.;x/b", Err(PathError::AmbiguousParameter)),
    ("/a/;x/b", Err(PathError::AmbiguousParameter)),
    ("/;", Err(PathError::AmbiguousParameter)),
    ("/a/...;x", Ok("/a/...;x")),
    ("/a/..x;/b", Ok("/a/..x;/b")),
    ("/a#;", Err(PathError::Fragment)),
];

#[test]
fn accepted_table() {
    for &(input, forwarded, matching) in ACCEPTED {
        let n = normalize(input, DEFAULT).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(n.as_str(), forwarded, "forwarded form of {input:?}");
        assert_eq!(n.for_matching(), matching, "matching form of {input:?}");
        assert_eq!(n.has_trailing_slash(), forwarded != matching, "{input:?}");
        // Semicolons allowed changes nothing for these.
        assert_eq!(normalize(input, SEMI), Ok(n), "{input:?} with semicolons");
    }
}

#[test]
fn rejected_table() {
    for &(input, err) in REJECTED {
        assert_eq!(normalize(input, DEFAULT), Err(err), "{input:?}");
    }
}

#[test]
fn semicolon_table() {
    for &(input, expected) in WITH_SEMICOLONS {
        let got = normalize(input, SEMI);
        assert_eq!(
            got.as_ref().map(NormalizedPath::as_str),
            expected.as_ref().map(|s| *s),
            "{input:?}"
        );
    }
}

/// A path that reaches the upstream as sent (the check fronts): accepted only where nothing
/// had to be resolved, and then in the same form as for the proxy.
#[test]
fn as_sent_table() {
    let as_sent = DEFAULT.as_sent();
    for input in [
        "/",
        "/v1/analyses/1",
        "/v1/analyses/",
        "/a.b/c..d/.../.x/..y",
        "/a/%7Eb",
        "/a/%2Eb",
    ] {
        let n = normalize(input, as_sent).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(Ok(n), normalize(input, DEFAULT), "{input:?}");
    }
    for input in [
        "//",
        "//admin",
        "/v1/admin//../analyses/x",
        "/a///b",
        "/a//",
        "/.",
        "/./a",
        "/a/./b",
        "/a/.",
        "/a/..",
        "/a/../b",
        "/v1/admin/%2e%2e/analyses/1",
        "/v1/admin/%2E./analyses/1",
        "/v1/admin/.%2e/",
        "/a/%2E/b",
    ] {
        assert_eq!(
            normalize(input, as_sent),
            Err(PathError::Unresolved),
            "{input:?}"
        );
    }
    // What is refused anyway keeps its own reason.
    assert_eq!(
        normalize("/a/%2F/..", as_sent),
        Err(PathError::EncodedSeparator)
    );
    assert_eq!(normalize("/..", as_sent), Err(PathError::Unresolved));
}

#[test]
fn messages_do_not_echo_the_path() {
    let err = normalize("/secret%2Fthing", DEFAULT).unwrap_err();
    assert!(!err.to_string().contains("secret"));
    assert_eq!(
        err.to_string(),
        "the request path contains an encoded '/' or '\\' (%2F, %5C), which is ambiguous"
    );
}

#[test]
fn split_target_table() {
    let cases: &[(&str, (&str, Option<&str>))] = &[
        ("/a", ("/a", None)),
        ("/a?", ("/a", Some(""))),
        ("/a?b=1", ("/a", Some("b=1"))),
        ("/a?b?c", ("/a", Some("b?c"))),
        ("?x", ("", Some("x"))),
        ("", ("", None)),
    ];
    for &(target, expected) in cases {
        assert_eq!(split_target(target), expected, "{target:?}");
    }
}

/// The proxy normalizes its request URI's path through `normalize_uri`: every path of the
/// tables, with and without a query, in origin and absolute form, gets `normalize`'s answer
/// for the URI's path, forms and all.
#[test]
fn a_uri_normalizes_as_its_path() {
    let accepted = ACCEPTED.iter().map(|&(input, _, _)| input);
    let rejected = REJECTED.iter().map(|&(input, _)| input);
    let semicolons = WITH_SEMICOLONS.iter().map(|&(input, _)| input);
    for path in accepted.chain(rejected).chain(semicolons) {
        let query = format!("{path}?q=1&r=%2F..");
        let absolute = format!("http://api.example{path}");
        for target in [path.to_owned(), query, absolute] {
            // Not every table path is a target http accepts (a raw space, a `#`): those never
            // reach the proxy as one.
            let Ok(parsed) = http::Uri::try_from(target.as_str()) else {
                continue;
            };
            for opts in [DEFAULT, SEMI] {
                let got = normalize_uri(&parsed, opts);
                let want = normalize(parsed.path(), opts);
                assert_eq!(got, want, "{target:?}");
                if let (Ok(got), Ok(want)) = (got, want) {
                    assert_eq!(got.for_matching(), want.for_matching(), "{target:?}");
                    assert_eq!(got.has_trailing_slash(), want.has_trailing_slash());
                    assert_eq!(got.to_string(), want.to_string());
                    assert_eq!(got.into_string(), want.into_string());
                }
            }
        }
    }
}

/// An HTTP/2 CONNECT without `:authority` reaches the proxy as a URI of no parts: its empty
/// target's path reads "/", but the URI has no path, and none is made up for it.
#[test]
fn a_uri_without_a_path_is_not_given_one() {
    let empty = http::Uri::from_parts(http::uri::Parts::default()).unwrap();
    assert_eq!(empty.path(), "");
    assert_eq!(empty.path_and_query().map(|t| t.path()), Some("/"));
    assert_eq!(normalize_uri(&empty, DEFAULT), Err(PathError::NotAbsolute));
    // Absolute form without a path: the URI's path is "/", as HTTP/1.1 reads it.
    let bare = http::Uri::from_static("http://api.example?x=1");
    assert_eq!(normalize_uri(&bare, DEFAULT).unwrap().as_str(), "/");
}

#[test]
fn display_and_into_string() {
    let n = normalize("/a//b/", DEFAULT).unwrap();
    assert_eq!(n.to_string(), "/a/b/");
    assert_eq!(n.as_ref(), "/a/b/");
    assert_eq!(n.into_string(), "/a/b/");
}

/// Pieces that are fine on their own (combinations may still be rejected).
const GOOD: &[&str] = &[
    "/",
    "/",
    "/",
    "//",
    "a",
    "b",
    "Z",
    "0",
    "3",
    "f",
    "~",
    "-",
    ".",
    "..",
    ":",
    "@",
    "!",
    "*",
    "=",
    "%2e",
    "%2E",
    "%25",
    "%41",
    "%34",
    "%7e",
    "%3F",
    "%20",
    "%e2%82%ac",
    "\"",
    "é",
    "€",
    "?",
];
/// Pieces that are rejected (`;` only without `allow_semicolon`).
const BAD: &[&str] = &[
    ";", "%3B", "%", "%4", "%zz", "%2F", "%2f", "%5C", "%00", "%1f", "%7F", "#", "\\", " ", "\t",
    "\u{7f}",
];

fn pieces() -> impl Strategy<Value = String> {
    let piece = prop_oneof![12 => prop::sample::select(GOOD), 1 => prop::sample::select(BAD)];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn path_like() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => pieces().prop_map(|s| format!("/{s}")),
        1 => pieces(),
    ]
}

/// A path made of unreserved characters only, plus where to encode or double.
fn plain_path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[A-Za-z0-9._~-]{0,6}", 0..6)
}

fn check_output(s: &str, opts: PathOptions) {
    let b = s.as_bytes();
    assert!(s.starts_with('/'), "{s:?}");
    assert!(!s.contains("//"), "{s:?}");
    for seg in s[1..].split('/') {
        assert!(seg != "." && seg != "..", "{s:?}");
    }
    assert!(!s.contains(['#', '\\']), "{s:?}");
    if !opts.allow_semicolon {
        assert!(!s.contains(';'), "{s:?}");
    }
    assert!(b.iter().all(|&c| c > 0x20 && c < 0x7F), "{s:?}");
    for (i, _) in s.match_indices('%') {
        let hex = &b[i + 1..i + 3];
        assert!(
            hex.iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
            "{s:?}"
        );
        assert!(hex != b"2F" && hex != b"5C", "{s:?}");
        if hex == b"25" {
            let next = b.get(i + 3..i + 5);
            assert!(
                !next.is_some_and(|n| n.iter().all(u8::is_ascii_hexdigit)),
                "{s:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// As sent: accepted exactly when the normalizer resolves nothing (no `.` or `..` segment,
    /// raw or encoded; no empty segment but a last one), and then as for the proxy.
    #[test]
    fn as_sent_resolves_nothing(input in path_like(), semi in any::<bool>()) {
        let opts = PathOptions { allow_semicolon: semi, as_sent: false };
        let resolving = input.strip_prefix('/').is_some_and(|rest| {
            let segments: Vec<String> = rest
                .split('/')
                .map(|s| s.replace("%2e", ".").replace("%2E", "."))
                .collect();
            segments.iter().enumerate().any(|(i, s)| {
                s == "." || s == ".." || (s.is_empty() && i + 1 < segments.len())
            })
        });
        match (normalize(&input, opts), normalize(&input, opts.as_sent())) {
            (Ok(n), Ok(sent)) => prop_assert!(!resolving && n == sent, "{:?}", input),
            (Ok(_), Err(e)) => prop_assert!(resolving && e == PathError::Unresolved, "{:?}: {}", input, e),
            (Err(e), Ok(_)) => prop_assert!(false, "{:?}: accepted as sent only ({})", input, e),
            (Err(_), Err(_)) => {}
        }
    }

    #[test]
    fn idempotent(input in path_like(), semi in any::<bool>()) {
        let opts = PathOptions { allow_semicolon: semi, as_sent: false };
        if let Ok(n) = normalize(&input, opts) {
            let again = normalize(n.as_str(), opts);
            prop_assert_eq!(again.as_ref(), Ok(&n));
            // The matching form is canonical too.
            let m = normalize(n.for_matching(), opts).unwrap();
            prop_assert_eq!(m.as_str(), n.for_matching());
        }
    }

    #[test]
    fn output_is_clean(input in path_like(), semi in any::<bool>()) {
        let opts = PathOptions { allow_semicolon: semi, as_sent: false };
        if let Ok(n) = normalize(&input, opts) {
            check_output(n.as_str(), opts);
            check_output(n.for_matching(), opts);
            prop_assert!(n.for_matching() == "/" || !n.for_matching().ends_with('/'));
        }
    }

    #[test]
    fn a_uri_normalizes_as_its_path_too(input in path_like(), query in "[a-z=&%/.]{0,8}", semi in any::<bool>()) {
        let opts = PathOptions { allow_semicolon: semi, as_sent: false };
        if let Ok(uri) = http::Uri::try_from(format!("{input}?{query}")) {
            prop_assert_eq!(normalize_uri(&uri, opts), normalize(uri.path(), opts));
        }
    }

    #[test]
    fn never_panics(input in any::<String>(), semi in any::<bool>()) {
        let opts = PathOptions { allow_semicolon: semi, as_sent: false };
        let _ = normalize(&input, opts);
        let _ = normalize(&format!("/{input}"), opts);
        let _ = split_target(&input);
    }

    #[test]
    fn equivalent_spellings(
        segments in plain_path(),
        trailing in any::<bool>(),
        encode in prop::collection::vec(any::<(bool, bool)>(), 64),
        doubles in prop::collection::vec(any::<bool>(), 8),
    ) {
        let mut plain = String::new();
        for seg in &segments {
            plain.push('/');
            plain.push_str(seg);
        }
        if trailing || plain.is_empty() {
            plain.push('/');
        }
        // Same path with some unreserved octets percent-encoded (either
        // case) and some slashes doubled.
        let mut variant = String::new();
        let (mut i, mut j) = (0, 0);
        for c in plain.chars() {
            if c == '/' {
                variant.push_str(if doubles[j % doubles.len()] { "//" } else { "/" });
                j += 1;
                continue;
            }
            let (enc, lower) = encode[i % encode.len()];
            i += 1;
            match (enc, lower) {
                (false, _) => variant.push(c),
                (true, false) => variant.push_str(&format!("%{:02X}", c as u32)),
                (true, true) => variant.push_str(&format!("%{:02x}", c as u32)),
            }
        }
        let a = normalize(&plain, DEFAULT);
        let b = normalize(&variant, DEFAULT);
        prop_assert_eq!(&a, &b, "{:?} vs {:?}", plain, variant);
    }
}
