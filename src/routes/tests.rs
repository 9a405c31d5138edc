use super::*;
use proptest::prelude::*;

fn p(s: &str) -> RoutePattern {
    RoutePattern::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn table(patterns: &[&str]) -> RouteTable<String> {
    RouteTable::new(patterns.iter().map(|s| (p(s), s.to_string()))).unwrap()
}

/// The segments of a pattern as text, `|`-separated (a literal never holds `*`).
fn shape(r: &RoutePattern) -> String {
    let segs: Vec<&str> = r
        .segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => l,
            Segment::One => "*",
            Segment::Rest => "**",
        })
        .collect();
    segs.join("|")
}

#[test]
fn parse_good() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("GET /", Some("GET"), ""),
        ("GET /v1/analyses/**", Some("GET"), "v1|analyses|**"),
        ("POST /v1/analyses", Some("POST"), "v1|analyses"),
        ("* /admin/*/logs", None, "admin|*|logs"),
        ("GET /**", Some("GET"), "**"),
        ("GET /a/", Some("GET"), "a"),
        ("GET /a/*/", Some("GET"), "a|*"),
        ("  DELETE \t //a/./b/../c  ", Some("DELETE"), "a|c"),
        ("GET /%7Euser/caf%c3%a9", Some("GET"), "~user|caf%C3%A9"),
        ("GET /a/%2A", Some("GET"), "a|*"),
    ];
    for &(input, method, segments) in cases {
        let r = p(input);
        assert_eq!(r.method(), method, "{input:?}");
        assert_eq!(shape(&r), segments, "{input:?}");
        assert_eq!(r.as_str(), input.trim());
        assert_eq!(r.to_string(), input.trim());
        assert_eq!(input.parse::<RoutePattern>().as_ref(), Ok(&r));
    }
}

#[test]
fn parse_bad() {
    type Make = fn(String) -> RouteError;
    let cases: &[(&str, Make)] = &[
        ("", |_| RouteError::Empty),
        ("   ", |_| RouteError::Empty),
        ("/v1/items", |route| RouteError::MissingMethod { route }),
        ("/v1 GET", |route| RouteError::MissingMethod { route }),
        ("GET", |route| RouteError::MissingPath { route }),
        ("get /a", |route| RouteError::BadMethod { route }),
        ("G3T /a", |route| RouteError::BadMethod { route }),
        ("** /a", |route| RouteError::BadMethod { route }),
        ("GET v1", |route| RouteError::NotAbsolute { route }),
        ("GET *", |route| RouteError::NotAbsolute { route }),
        ("GET /**/a", |route| RouteError::RestNotFinal { route }),
        ("GET /a/**/**", |route| RouteError::RestNotFinal { route }),
        ("GET /*.json", |route| RouteError::BadWildcard { route }),
        ("GET /a/***", |route| RouteError::BadWildcard { route }),
        ("GET /a%2A", |route| RouteError::BadWildcard { route }),
        ("GET /a/../..", |route| RouteError::InvalidPath {
            route,
            reason: PathError::AboveRoot,
        }),
        ("GET /a;b", |route| RouteError::InvalidPath {
            route,
            reason: PathError::Semicolon,
        }),
        ("GET /a b", |route| RouteError::InvalidPath {
            route,
            reason: PathError::ControlCharacter,
        }),
    ];
    for &(input, make) in cases {
        let expected = make(input.trim().to_string());
        assert_eq!(RoutePattern::parse(input), Err(expected), "{input:?}");
    }
}

#[test]
fn error_messages() {
    let cases = [
        ("GET v1", r#"route "GET v1": the path must start with "/""#),
        (
            "GET /**/a",
            r#"route "GET /**/a": "**" may only be the last segment"#,
        ),
        (
            "GET /a%2F",
            r#"route "GET /a%2F": invalid path: the request path contains an encoded '/' or '\' (%2F, %5C), which is ambiguous"#,
        ),
    ];
    for (input, msg) in cases {
        assert_eq!(RoutePattern::parse(input).unwrap_err().to_string(), msg);
    }
}

#[test]
fn duplicates() {
    let dup = |a: &str, b: &str| RouteTable::new([(p(a), ()), (p(b), ())]).err();
    let err = |route: &str| {
        Some(RouteError::Duplicate {
            route: route.into(),
        })
    };
    assert_eq!(dup("GET /a", "GET /a"), err("GET /a"));
    assert_eq!(dup("GET /a", "GET /a/"), err("GET /a/"));
    assert_eq!(dup("* /a/*", "*  //a//*"), err("*  //a//*"));
    assert_eq!(dup("GET /a/**", "GET /a/%2e/**"), err("GET /a/%2e/**"));
    assert_eq!(dup("GET /a", "POST /a"), None);
    assert_eq!(dup("GET /a", "* /a"), None);
    assert_eq!(dup("GET /a", "GET /a/**"), None);
    assert_eq!(dup("GET /a/*", "GET /a/**"), None);
}

/// (patterns, method, path, expected winner).
const LOOKUPS: &[(&[&str], &str, &str, Option<&str>)] = &[
    // precedence chain
    (
        CHAIN,
        "GET",
        "/v1/analyses/export",
        Some("GET /v1/analyses/export"),
    ),
    (CHAIN, "GET", "/v1/analyses/123", Some("GET /v1/analyses/*")),
    (CHAIN, "GET", "/v1/analyses/123/x", Some("GET /v1/**")),
    (CHAIN, "GET", "/v1/analyses", Some("GET /v1/**")),
    (CHAIN, "GET", "/v1", Some("GET /v1/**")),
    (CHAIN, "POST", "/v1/analyses/export", Some("* /**")),
    (CHAIN, "GET", "/", Some("* /**")),
    (CHAIN, "GET", "/v2", Some("* /**")),
    // literal beats `*` at the first difference, whatever comes after
    (
        &["GET /a/*/c", "GET /a/b/**"],
        "GET",
        "/a/b/c",
        Some("GET /a/b/**"),
    ),
    (
        &["GET /*/b/c", "GET /a/*/*"],
        "GET",
        "/a/b/c",
        Some("GET /a/*/*"),
    ),
    // path shape beats method
    (&["GET /a/*", "* /a/b"], "GET", "/a/b", Some("* /a/b")),
    (&["GET /a/*", "* /a/*"], "GET", "/a/b", Some("GET /a/*")),
    (&["GET /a/*", "* /a/*"], "PUT", "/a/b", Some("* /a/*")),
    // backtracking
    (
        &["GET /a/b/c", "GET /a/*/d"],
        "GET",
        "/a/b/d",
        Some("GET /a/*/d"),
    ),
    (
        &["GET /a/b/c", "GET /a/*/d"],
        "GET",
        "/a/b/c",
        Some("GET /a/b/c"),
    ),
    (&["POST /a/b", "GET /a/*"], "GET", "/a/b", Some("GET /a/*")),
    (&["POST /a/b", "GET /**"], "GET", "/a/b", Some("GET /**")),
    (
        &["GET /a/b/c", "GET /a/**"],
        "GET",
        "/a/b/x",
        Some("GET /a/**"),
    ),
    (&["GET /a/b/c", "GET /a/*/d"], "GET", "/a/b", None),
    // `**` matches zero or more segments; an exact end beats it
    (&["GET /a/**"], "GET", "/a", Some("GET /a/**")),
    (&["GET /a/**"], "GET", "/a/b/c", Some("GET /a/**")),
    (&["GET /a/**"], "GET", "/ab", None),
    (&["GET /a/**"], "GET", "/", None),
    (&["GET /a/**", "GET /a"], "GET", "/a", Some("GET /a")),
    (&["GET /a/*", "GET /a/**"], "GET", "/a", Some("GET /a/**")),
    (&["GET /a/*", "GET /a/**"], "GET", "/a/b", Some("GET /a/*")),
    // root
    (&["GET /"], "GET", "/", Some("GET /")),
    (&["GET /"], "GET", "/a", None),
    (&["GET /**"], "GET", "/", Some("GET /**")),
    (&["GET /*"], "GET", "/", None),
    (&["GET /", "GET /**"], "GET", "/", Some("GET /")),
    // HEAD and GET
    (&["GET /a"], "HEAD", "/a", Some("GET /a")),
    (&["GET /a", "HEAD /a"], "HEAD", "/a", Some("HEAD /a")),
    (&["GET /a", "HEAD /a"], "GET", "/a", Some("GET /a")),
    (&["GET /a", "* /a"], "HEAD", "/a", Some("GET /a")),
    (&["HEAD /a", "* /a"], "GET", "/a", Some("* /a")),
    (&["HEAD /a"], "GET", "/a", None),
    (&["GET /a/*", "* /a/b"], "HEAD", "/a/b", Some("* /a/b")),
    // methods ignore case: upstreams that upper-case `post` run it as POST
    (&["GET /a"], "get", "/a", Some("GET /a")),
    (&["* /a"], "get", "/a", Some("* /a")),
    (&["POST /a", "* /a"], "post", "/a", Some("POST /a")),
    (&["POST /a", "* /a"], "PoSt", "/a", Some("POST /a")),
    (&["GET /a"], "head", "/a", Some("GET /a")),
    (&["GET /a", "HEAD /a"], "Head", "/a", Some("HEAD /a")),
    (&["POST /a"], "posts", "/a", None),
    // literals are compared in normalized form
    (
        &["GET /caf%c3%a9/%7Eme"],
        "GET",
        "/caf%C3%A9/~me",
        Some("GET /caf%c3%a9/%7Eme"),
    ),
    // `;parameters` (only present with paths.allow_semicolon) are ignored for literals
    (&["GET /a/b"], "GET", "/a;jsessionid=1/b", Some("GET /a/b")),
    (&["GET /a/b"], "GET", "/a/b;x=1;y", Some("GET /a/b")),
    (&["GET /a/**"], "GET", "/a;x/b", Some("GET /a/**")),
    (&["GET /a/*"], "GET", "/a/b;x", Some("GET /a/*")),
    (&["GET /a/b", "GET /a/*"], "GET", "/a/b;x", Some("GET /a/b")),
    (&["GET /a/b"], "GET", "/ab;/b", None),
    (&["GET /a/b"], "GET", "/a/b/c", None),
    (&["GET /a/b/c"], "GET", "/a/b", None),
    (&[], "GET", "/", None),
];

const CHAIN: &[&str] = &[
    "GET /v1/analyses/export",
    "GET /v1/analyses/*",
    "GET /v1/**",
    "* /**",
];

#[test]
fn lookup_table() {
    for &(patterns, method, path, expected) in LOOKUPS {
        let t = table(patterns);
        let got = t.lookup(method, path).map(String::as_str);
        assert_eq!(got, expected, "{method} {path} in {patterns:?}");
        assert_eq!(t.matches(method, path), expected.is_some());
        // Each single pattern agrees with `RoutePattern::matches`.
        for s in patterns {
            let one = table(&[s]);
            assert_eq!(
                one.matches(method, path),
                p(s).matches(method, path),
                "{s} {method} {path}"
            );
        }
    }
}

/// (patterns, method, path, winner when letter case is ignored, winner when it is not).
type CaseRow = (
    &'static [&'static str],
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

const CASE_LOOKUPS: &[CaseRow] = &[
    // The scoped route an Express or ASP.NET Core upstream would run.
    (
        CHAIN,
        "/V1/Analyses/Export",
        Some("GET /v1/analyses/export"),
        Some("* /**"),
    ),
    (
        CHAIN,
        "/v1/ANALYSES/1",
        Some("GET /v1/analyses/*"),
        Some("GET /v1/**"),
    ),
    (CHAIN, "/V1", Some("GET /v1/**"), Some("* /**")),
    // Spelled as written: found by hashing, either way.
    (
        CHAIN,
        "/v1/analyses/export",
        Some("GET /v1/analyses/export"),
        Some("GET /v1/analyses/export"),
    ),
    // A pattern's capitals fold too.
    (&["GET /Admin/**"], "/admin/x", Some("GET /Admin/**"), None),
    (&["GET /Admin/**"], "/ADMIN", Some("GET /Admin/**"), None),
    // A literal still beats `*` when it matches only folded.
    (
        &["GET /a/*", "GET /a/b"],
        "/a/B",
        Some("GET /a/b"),
        Some("GET /a/*"),
    ),
    // Backtracking past a spelling that matches only the first segment.
    (
        &["GET /a/b/c", "GET /A/*/d"],
        "/a/b/d",
        Some("GET /A/*/d"),
        None,
    ),
    // `;parameters` are still left out; other bytes are compared exactly.
    (&["GET /a/b"], "/A;x/B", Some("GET /a/b"), None),
    (
        &["GET /caf%c3%a9"],
        "/CAF%C3%A9",
        Some("GET /caf%c3%a9"),
        None,
    ),
    // Percent-encodings are upper case in a normalized path, lower case in a folded literal.
    (
        &["GET /caf%c3%a9/x"],
        "/caf%C3%A9/X",
        Some("GET /caf%c3%a9/x"),
        None,
    ),
    // A segment longer than the lowering buffer.
    (&[LONG_ROUTE], LONG_PATH, Some(LONG_ROUTE), None),
    (&["GET /a"], "/b", None, None),
];

const LONG_ROUTE: &str = "GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/x";
const LONG_PATH: &str = "/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/x";

#[test]
fn lookup_ignoring_case() {
    for &(patterns, path, insensitive, sensitive) in CASE_LOOKUPS {
        let t = table(patterns);
        // As the config builds it when case is ignored: one branch per folded literal.
        let folded = RouteTable::folded(patterns.iter().map(|s| (p(s), s.to_string()))).unwrap();
        let got = folded
            .lookup_with("GET", path, Case::Insensitive)
            .map(String::as_str);
        assert_eq!(got, insensitive, "{path} in {patterns:?}");
        let got = t.lookup_with("GET", path, Case::Insensitive).is_some();
        assert_eq!(
            got,
            insensitive.is_some(),
            "{path} in {patterns:?}, unfolded"
        );
        let got = t
            .lookup_with("GET", path, Case::Sensitive)
            .map(String::as_str);
        assert_eq!(got, sensitive, "{path} in {patterns:?}");
        assert_eq!(t.lookup("GET", path).map(String::as_str), sensitive);
        for s in patterns {
            for case in [Case::Sensitive, Case::Insensitive] {
                assert_eq!(
                    table(&[s]).matches_with("GET", path, case),
                    p(s).matches_with("GET", path, case),
                    "{s} {path} {case:?}"
                );
            }
        }
    }
}

#[test]
fn a_key_may_hold_two_spellings_and_either_matches() {
    let t = table(&["GET /a/b", "GET /A/c"]);
    for path in ["/a/b", "/A/B", "/a/c", "/A/C"] {
        assert!(t.matches_with("GET", path, Case::Insensitive), "{path}");
    }
    assert!(!t.matches("GET", "/A/b"));
}

#[test]
fn folded_patterns_are_duplicates_by_case() {
    let folded = |a: &str, b: &str| RouteTable::folded([(p(a), ()), (p(b), ())]).err();
    assert_eq!(
        folded("GET /a/B", "GET /A/b/"),
        Some(RouteError::Duplicate {
            route: "GET /A/b/".into()
        })
    );
    assert_eq!(folded("GET /a", "POST /A"), None);
    assert_eq!(p("GET /A/*").folded().as_str(), "GET /A/*");
}

#[test]
fn len_and_is_empty() {
    let empty: RouteTable<()> = RouteTable::new([]).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.len(), 0);
    let t = table(CHAIN);
    assert!(!t.is_empty());
    assert_eq!(t.len(), 4);
}

/// Independent reference: scan every pattern, keep the most specific.
fn naive<'a>(
    patterns: &'a [RoutePattern],
    method: &str,
    path: &str,
    case: Case,
) -> Option<&'a RoutePattern> {
    fn rank(seg: Option<&Segment>) -> u8 {
        match seg {
            Some(Segment::Literal(_)) => 3,
            Some(Segment::One) => 2,
            None => 1, // the pattern ended here
            Some(Segment::Rest) => 0,
        }
    }
    fn method_rank(p: &RoutePattern, method: &str) -> u8 {
        match p.method() {
            Some(m) if m.eq_ignore_ascii_case(method) => 3,
            Some("GET") if method.eq_ignore_ascii_case("HEAD") => 2,
            Some(_) => 0,
            None => 1,
        }
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let matches = |p: &RoutePattern| {
        let shape_ok = match p.segments.split_last() {
            Some((Segment::Rest, init)) => {
                segs.len() >= init.len() && fits(init, &segs[..init.len()], case)
            }
            _ => p.segments.len() == segs.len() && fits(&p.segments, &segs, case),
        };
        shape_ok && method_rank(p, method) > 0
    };
    fn fits(pattern: &[Segment], segs: &[&str], case: Case) -> bool {
        pattern.iter().zip(segs).all(|(p, s)| match p {
            Segment::Literal(l) => {
                let s = s.split(';').next().unwrap_or(s);
                match case {
                    Case::Sensitive => **l == *s,
                    Case::Insensitive => l.to_lowercase() == s.to_lowercase(),
                }
            }
            Segment::One => true,
            Segment::Rest => unreachable!(),
        })
    }
    let key = |p: &RoutePattern| {
        let shape: Vec<u8> = (0..=segs.len()).map(|i| rank(p.segments.get(i))).collect();
        (shape, method_rank(p, method))
    };
    patterns
        .iter()
        .filter(|p| matches(p))
        .max_by_key(|p| key(p))
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    let method = prop::sample::select(vec!["GET", "HEAD", "POST", "*"]);
    let seg = prop::sample::select(vec!["a", "b", "c", "B", "*"]);
    let segs = prop::collection::vec(seg, 0..4);
    (method, segs, any::<bool>()).prop_map(|(m, segs, rest)| {
        let mut path: String = segs.iter().map(|s| format!("/{s}")).collect();
        if rest {
            path.push_str("/**");
        }
        if path.is_empty() {
            path.push('/');
        }
        format!("{m} {path}")
    })
}

fn request_strategy() -> impl Strategy<Value = (&'static str, String)> {
    let method = prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "get", "head", "Post"]);
    let seg = prop::sample::select(vec!["a", "b", "c", "d", "a;x", "b;", "A", "B;x"]);
    let path = prop::collection::vec(seg, 0..5).prop_map(|segs| {
        let p: String = segs.iter().map(|s| format!("/{s}")).collect();
        if p.is_empty() {
            "/".to_string()
        } else {
            p
        }
    });
    (method, path)
}

proptest! {
    #[test]
    fn lookup_agrees_with_naive(
        raw in prop::collection::vec(pattern_strategy(), 0..12),
        requests in prop::collection::vec(request_strategy(), 1..16),
    ) {
        let mut patterns: Vec<RoutePattern> = Vec::new();
        for s in &raw {
            let pat = p(s);
            let dup = patterns
                .iter()
                .any(|q| q.method == pat.method && q.segments == pat.segments);
            if !dup {
                patterns.push(pat);
            }
        }
        let table = RouteTable::new(patterns.iter().cloned().enumerate().map(|(i, p)| (p, i))).unwrap();
        prop_assert_eq!(table.len(), patterns.len());
        for (method, path) in &requests {
            let expected = naive(&patterns, method, path, Case::Sensitive).map(RoutePattern::as_str);
            let got = table.lookup(method, path).map(|&i| patterns[i].as_str());
            prop_assert_eq!(got, expected, "{} {} in {:?}", method, path, raw);
        }
    }

    /// Ignoring case, with the patterns a config accepts then (none the same route folded):
    /// the one most specific match. With two spellings of one route (a key's own list), at
    /// least whether anything matches.
    #[test]
    fn lookup_ignoring_case_agrees_with_naive(
        raw in prop::collection::vec(pattern_strategy(), 0..12),
        requests in prop::collection::vec(request_strategy(), 1..16),
    ) {
        let all: Vec<RoutePattern> = raw.iter().map(|s| p(s)).collect();
        let mut distinct: Vec<RoutePattern> = Vec::new();
        for pat in &all {
            if !distinct.iter().any(|q| q.folded().same_route(&pat.folded())) {
                distinct.push(pat.clone());
            }
        }
        let table = RouteTable::folded(distinct.iter().cloned().enumerate().map(|(i, p)| (p, i))).unwrap();
        let mut exact: Vec<RoutePattern> = Vec::new();
        for pat in &all {
            if !exact.iter().any(|q| q.same_route(pat)) {
                exact.push(pat.clone());
            }
        }
        let any = RouteTable::new(exact.iter().cloned().map(|p| (p, ()))).unwrap();
        for (method, path) in &requests {
            let expected = naive(&distinct, method, path, Case::Insensitive).map(RoutePattern::as_str);
            let got = table
                .lookup_with(method, path, Case::Insensitive)
                .map(|&i| distinct[i].as_str());
            prop_assert_eq!(got, expected, "{} {} in {:?}", method, path, raw);
            prop_assert_eq!(
                any.matches_with(method, path, Case::Insensitive),
                naive(&exact, method, path, Case::Insensitive).is_some(),
                "{} {} in {:?}", method, path, raw
            );
        }
    }
}
