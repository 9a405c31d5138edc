//! Per-key referrer restrictions: parsing `allowed_referrers` patterns such as
//! `https://app.example.com/*` or `https://*.example.org`, and deciding whether
//! a request's `Referer` and `Origin` headers satisfy them.
//!
//! This module owns the pattern syntax and the matching rules. It parses the
//! request URL into scheme, host, port and path and compares each part on its
//! own; it never globs over the whole URL text, which would let
//! `https://evil.com/?x=.example.com/` through.
//!
//! It must never do I/O or log anything, and it never sees API keys.
//!
//! Referrer checks only stop browsers from using a key on other sites; any
//! other client can send whatever headers it likes.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// Why a referrer pattern was rejected. Each message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferrerError {
    /// The pattern is the empty string.
    #[error("referrer pattern is empty")]
    Empty,
    /// Whitespace, a control character or a non-ASCII character.
    #[error(
        "referrer pattern {0:?} contains whitespace, a control character or a non-ASCII character"
    )]
    InvalidCharacter(String),
    /// No `scheme://` at the start.
    #[error("referrer pattern {0:?} must start with `http://`, `https://` or `*://`")]
    MissingScheme(String),
    /// A scheme other than `http`, `https` or `*`.
    #[error("referrer pattern scheme {0:?} is not supported; expected `http`, `https` or `*`")]
    UnsupportedScheme(String),
    /// `user@host` in the authority.
    #[error("referrer pattern {0:?} contains user info (`@`), which is not allowed")]
    UserInfo(String),
    /// Nothing between `://` and the port or path.
    #[error("referrer pattern {0:?} has no host")]
    EmptyHost(String),
    /// A host that is not a DNS name, an IPv4 address or a bracketed IPv6
    /// address (empty label, trailing dot, percent-encoding, bad character).
    #[error("referrer pattern host {0:?} is not a valid host name or IP address")]
    InvalidHost(String),
    /// `*` anywhere in the host but as a whole leading label.
    #[error("referrer pattern host {0:?}: `*` is only allowed as a whole leading label, as in `*.example.com`")]
    InvalidWildcard(String),
    /// A port that is not a number from 1 to 65535.
    #[error("referrer pattern port {0:?} is not a number from 1 to 65535")]
    InvalidPort(String),
    /// A `?query` or `#fragment`, which requests are never matched on.
    #[error("referrer pattern {0:?} contains a query or fragment; only scheme, host, port and path are matched")]
    QueryOrFragment(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("http") {
            Some(Self::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Self::Https)
        } else {
            None
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemePattern {
    Exactly(Scheme),
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// One host name or IPv4 address, lowercase.
    Exact(String),
    /// `*.suffix`: one or more labels before `.suffix`; holds `suffix`, lowercase.
    Subdomains(String),
    /// A bracketed IPv6 literal, compared as an address.
    Ipv6(Ipv6Addr),
}

/// One allowed referrer: `scheme://host[:port][path]`.
///
/// - scheme: `http`, `https` or `*` (either), any case;
/// - host: an exact host (any case, no trailing dot), `*.suffix` for any host
///   with one or more labels before `.suffix` (not `suffix` itself), or a
///   bracketed IPv6 address;
/// - port: explicit, else the default of the request's scheme (80/443), so
///   `https://a.com` and `https://a.com:443` are the same;
/// - path: a case-sensitive glob where `*` matches any run of characters,
///   `/` included; no path or `/*` matches any path, `/` only the root.
///   Paths are compared as sent, without percent-decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrerPattern {
    scheme: SchemePattern,
    host: HostPattern,
    port: Option<u16>,
    /// `None` matches any path; otherwise a glob starting with `/`.
    path: Option<String>,
    text: String,
}

impl ReferrerPattern {
    /// Parses a pattern, rejecting anything that could match more than it
    /// appears to (user info, partial-label wildcards, queries).
    pub fn parse(s: &str) -> Result<Self, ReferrerError> {
        if s.is_empty() {
            return Err(ReferrerError::Empty);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ReferrerError::InvalidCharacter(s.to_owned()));
        }
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| ReferrerError::MissingScheme(s.to_owned()))?;
        let scheme = if scheme == "*" {
            SchemePattern::Either
        } else {
            Scheme::parse(scheme)
                .map(SchemePattern::Exactly)
                .ok_or_else(|| ReferrerError::UnsupportedScheme(scheme.to_owned()))?
        };
        if rest.contains(['?', '#']) {
            return Err(ReferrerError::QueryOrFragment(s.to_owned()));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err(ReferrerError::UserInfo(s.to_owned()));
        }
        let (host, port) = split_pattern_authority(authority)?;
        let host = parse_host_pattern(host, s)?;
        Ok(Self {
            scheme,
            host,
            port,
            path: path_glob(path),
            text: s.to_owned(),
        })
    }

    /// The pattern exactly as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn matches_site(&self, url: &RequestUrl<'_>) -> bool {
        let scheme_ok = match self.scheme {
            SchemePattern::Either => true,
            SchemePattern::Exactly(scheme) => scheme == url.scheme,
        };
        let port_ok = self.port.unwrap_or(url.scheme.default_port()) == url.port;
        let host_ok = match (&self.host, &url.host) {
            (HostPattern::Exact(want), Host::Name(name)) => want.eq_ignore_ascii_case(name),
            (HostPattern::Subdomains(suffix), Host::Name(name)) => is_subdomain(name, suffix),
            (HostPattern::Ipv6(want), Host::Ipv6(addr)) => want == addr,
            _ => false,
        };
        scheme_ok && port_ok && host_ok
    }

    fn matches_path(&self, path: &str) -> bool {
        self.path
            .as_deref()
            .is_none_or(|glob| glob_match(glob.as_bytes(), path.as_bytes()))
    }
}

impl FromStr for ReferrerPattern {
    type Err = ReferrerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ReferrerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A key's allowed referrers. Empty means no restriction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferrerSet {
    patterns: Vec<ReferrerPattern>,
}

impl ReferrerSet {
    /// A set allowing requests that match any of `patterns`.
    pub fn new(patterns: Vec<ReferrerPattern>) -> Self {
        Self { patterns }
    }

    /// True when no pattern is configured, i.e. nothing is restricted.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The configured patterns.
    pub fn patterns(&self) -> &[ReferrerPattern] {
        &self.patterns
    }

    /// Whether a request with these `Referer` and `Origin` header values is
    /// allowed. Empty set → true (no restriction).
    ///
    /// Otherwise at least one header must be present, and each one present
    /// must match some pattern: `Referer` as an absolute `http(s)` URL on
    /// scheme, host, port and path (query and fragment ignored), `Origin` as
    /// `scheme://host[:port]` on scheme, host and port. A present value that
    /// cannot be parsed — empty, `null`, user info, a percent-encoded or
    /// trailing-dot host, a non-ASCII byte, a `.`/`..` path segment — matches
    /// nothing. Pass only a single header value: callers must treat repeated
    /// `Referer` or `Origin` headers as failing.
    pub fn allows(&self, referer: Option<&[u8]>, origin: Option<&[u8]>) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        if referer.is_none() && origin.is_none() {
            return false;
        }
        let referer_ok = match referer {
            None => true,
            Some(raw) => parse_request_url(raw, true).is_some_and(|url| {
                self.patterns
                    .iter()
                    .any(|p| p.matches_site(&url) && p.matches_path(url.path))
            }),
        };
        let origin_ok = match origin {
            None => true,
            Some(raw) => parse_request_url(raw, false)
                .is_some_and(|url| self.patterns.iter().any(|p| p.matches_site(&url))),
        };
        referer_ok && origin_ok
    }
}

/// `host[:port]` of a pattern, split; the port parsed.
fn split_pattern_authority(authority: &str) -> Result<(&str, Option<u16>), ReferrerError> {
    let port_start = if authority.starts_with('[') {
        // A bracketed IPv6 literal: the port separator comes after `]`.
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    let (host, port) = authority.split_at(port_start);
    match port.strip_prefix(':') {
        None if port.is_empty() => Ok((host, None)),
        None => Err(ReferrerError::InvalidHost(authority.to_owned())),
        Some(digits) => parse_port(digits)
            .map(|p| (host, Some(p)))
            .ok_or_else(|| ReferrerError::InvalidPort(digits.to_owned())),
    }
}

fn parse_host_pattern(host: &str, text: &str) -> Result<HostPattern, ReferrerError> {
    if host.is_empty() {
        return Err(ReferrerError::EmptyHost(text.to_owned()));
    }
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .and_then(|ip| ip.parse().ok())
            .map(HostPattern::Ipv6)
            .ok_or_else(|| ReferrerError::InvalidHost(host.to_owned()));
    }
    let (suffix, subdomains) = match host.strip_prefix("*.") {
        Some(suffix) => (suffix, true),
        None => (host, false),
    };
    if suffix.contains('*') {
        return Err(ReferrerError::InvalidWildcard(host.to_owned()));
    }
    if !is_host_name(suffix) {
        return Err(ReferrerError::InvalidHost(host.to_owned()));
    }
    let suffix = suffix.to_ascii_lowercase();
    Ok(if subdomains {
        HostPattern::Subdomains(suffix)
    } else {
        HostPattern::Exact(suffix)
    })
}

/// The glob for a pattern's path: `None` for "any path" (no path, or only
/// stars after the first `/`), runs of `*` collapsed to one.
fn path_glob(path: &str) -> Option<String> {
    let any_path = match path.strip_prefix('/') {
        None => true,
        Some(rest) => !rest.is_empty() && rest.bytes().all(|b| b == b'*'),
    };
    if any_path {
        return None;
    }
    let mut glob = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '*' && glob.ends_with('*')) {
            glob.push(c);
        }
    }
    Some(glob)
}

/// A DNS-style name or IPv4 address: non-empty labels of ASCII letters,
/// digits, `-` and `_`, separated by single dots, no trailing dot.
fn is_host_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// True when `name` is `<one or more labels>.suffix` (case-insensitive).
/// `name` must already be a valid host name.
fn is_subdomain(name: &str, suffix: &str) -> bool {
    let (name, suffix) = (name.as_bytes(), suffix.as_bytes());
    if name.len() < suffix.len() + 2 {
        return false;
    }
    let (head, tail) = name.split_at(name.len() - suffix.len());
    tail.eq_ignore_ascii_case(suffix) && head.ends_with(b".")
}

/// Port digits (1..=65535), as in `:8080`.
fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&port| port != 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host<'a> {
    Name(&'a str),
    Ipv6(Ipv6Addr),
}

/// The parts of a `Referer` or `Origin` value that patterns are matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestUrl<'a> {
    scheme: Scheme,
    host: Host<'a>,
    /// Explicit, or the scheme's default.
    port: u16,
    /// Without query and fragment; `/` when empty.
    path: &'a str,
}

/// Parses `scheme://authority[/path][?query][#fragment]` (`with_path`, for
/// `Referer`) or exactly `scheme://host[:port]` (for `Origin`). `None` for
/// anything unusable.
fn parse_request_url(raw: &[u8], with_path: bool) -> Option<RequestUrl<'_>> {
    let raw = trim_ows(raw);
    if !raw.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    let (scheme, rest) = text.split_once("://")?;
    let scheme = Scheme::parse(scheme)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (host, port) = parse_request_authority(authority)?;
    let path = if with_path {
        let path = &tail[..tail.find(['?', '#']).unwrap_or(tail.len())];
        if path.is_empty() {
            "/"
        } else if is_plain_path(path) {
            path
        } else {
            return None;
        }
    } else if tail.is_empty() {
        "/"
    } else {
        return None;
    };
    Some(RequestUrl {
        scheme,
        host,
        port: port.unwrap_or(scheme.default_port()),
        path,
    })
}

/// Host and explicit port of a request authority; `None` on user info,
/// percent-encoding, an empty port or any other oddity.
fn parse_request_authority(authority: &str) -> Option<(Host<'_>, Option<u16>)> {
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (ip, after) = bracketed.split_once(']')?;
            (Host::Ipv6(ip.parse().ok()?), after)
        }
        None => {
            let (name, after) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            if !is_host_name(name) {
                return None;
            }
            (Host::Name(name), after)
        }
    };
    match port.strip_prefix(':') {
        None if port.is_empty() => Some((host, None)),
        None => None,
        Some(digits) => Some((host, Some(parse_port(digits)?))),
    }
}

/// A request path with no backslash and no `.` or `..` segment (plain or
/// percent-encoded). Browsers never send those; anything else might.
fn is_plain_path(path: &str) -> bool {
    const DOT_SEGMENTS: [&str; 6] = [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."];
    !path.contains('\\')
        && path.split('/').all(|segment| {
            !DOT_SEGMENTS
                .iter()
                .any(|dot| segment.eq_ignore_ascii_case(dot))
        })
}

/// Glob match where `*` matches any run of bytes (including none and `/`).
/// Greedy with a single backtrack point: O(pattern × text) at worst.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // After the last `*` seen: where the pattern resumes and where its run
    // of matched text ends.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                p += 1;
                backtrack = Some((p, t));
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((resume, star_end)) => {
                    p = resume;
                    t = star_end + 1;
                    backtrack = Some((resume, t));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// `value` without leading and trailing spaces and tabs.
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(patterns: &[&str]) -> ReferrerSet {
        ReferrerSet::new(
            patterns
                .iter()
                .map(|p| ReferrerPattern::parse(p).expect("test pattern"))
                .collect(),
        )
    }

    #[test]
    fn parse_accepts() {
        let cases = [
            "https://app.example.com/*",
            "https://*.example.org",
            "*://example.net",
            "HTTPS://App.Example.COM/Path",
            "http://localhost:3000/dev/*",
            "http://127.0.0.1:8080",
            "https://[::1]:8443/*",
            "https://[2001:DB8::1]",
            "https://a.com/",
            "https://a.com/app/*/view",
            "https://a.com/**",
            "https://under_score.example.com",
            "https://*.com",
        ];
        for text in cases {
            let pattern = ReferrerPattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(pattern.as_str(), text);
            assert_eq!(pattern.to_string(), text);
            assert_eq!(text.parse::<ReferrerPattern>().as_ref(), Ok(&pattern));
        }
    }

    #[test]
    fn parse_rejects() {
        use ReferrerError as E;
        let s = |v: &str| v.to_owned();
        let cases: &[(&str, ReferrerError)] = &[
            ("", E::Empty),
            (" https://a.com", E::InvalidCharacter(s(" https://a.com"))),
            (
                "https://a.com/x y",
                E::InvalidCharacter(s("https://a.com/x y")),
            ),
            ("https://é.com", E::InvalidCharacter(s("https://é.com"))),
            ("app.example.com", E::MissingScheme(s("app.example.com"))),
            ("https:/a.com", E::MissingScheme(s("https:/a.com"))),
            ("ftp://a.com", E::UnsupportedScheme(s("ftp"))),
            ("ws://a.com", E::UnsupportedScheme(s("ws"))),
            ("https*://a.com", E::UnsupportedScheme(s("https*"))),
            ("https://", E::EmptyHost(s("https://"))),
            ("https:///path", E::EmptyHost(s("https:///path"))),
            ("https://:443", E::EmptyHost(s("https://:443"))),
            ("https://user@a.com", E::UserInfo(s("https://user@a.com"))),
            (
                "https://a.com@evil.com",
                E::UserInfo(s("https://a.com@evil.com")),
            ),
            ("https://a.com:0", E::InvalidPort(s("0"))),
            ("https://a.com:65536", E::InvalidPort(s("65536"))),
            ("https://a.com:443443", E::InvalidPort(s("443443"))),
            ("https://a.com:", E::InvalidPort(s(""))),
            ("https://a.com:*", E::InvalidPort(s("*"))),
            ("https://a.com:80:80", E::InvalidPort(s("80:80"))),
            ("https://*", E::InvalidWildcard(s("*"))),
            (
                "https://*example.com",
                E::InvalidWildcard(s("*example.com")),
            ),
            (
                "https://app*.example.com",
                E::InvalidWildcard(s("app*.example.com")),
            ),
            (
                "https://a.*.example.com",
                E::InvalidWildcard(s("a.*.example.com")),
            ),
            (
                "https://*.*.example.com",
                E::InvalidWildcard(s("*.*.example.com")),
            ),
            ("https://example.com.", E::InvalidHost(s("example.com."))),
            (
                "https://*.example.com.",
                E::InvalidHost(s("*.example.com.")),
            ),
            ("https://a..com", E::InvalidHost(s("a..com"))),
            ("https://.a.com", E::InvalidHost(s(".a.com"))),
            ("https://*.", E::InvalidHost(s("*."))),
            ("https://a%2ecom", E::InvalidHost(s("a%2ecom"))),
            ("https://a.com\\x", E::InvalidHost(s("a.com\\x"))),
            ("https://[::1", E::InvalidHost(s("[::1"))),
            ("https://[zz::1]", E::InvalidHost(s("[zz::1]"))),
            ("https://[::1]x", E::InvalidHost(s("[::1]x"))),
            (
                "https://[fe80::1%25eth0]",
                E::InvalidHost(s("[fe80::1%25eth0]")),
            ),
            (
                "https://a.com/?x=1",
                E::QueryOrFragment(s("https://a.com/?x=1")),
            ),
            ("https://a.com?x", E::QueryOrFragment(s("https://a.com?x"))),
            (
                "https://a.com/#top",
                E::QueryOrFragment(s("https://a.com/#top")),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ReferrerPattern::parse(text).as_ref(), Err(want), "{text:?}");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        let message = |text: &str| {
            ReferrerPattern::parse(text)
                .map_err(|e| e.to_string())
                .err()
        };
        let got = message("ftp://a.com").unwrap_or_default();
        assert!(got.contains("\"ftp\"") && got.contains("http"), "{got}");
        let got = message("https://a.com:99999").unwrap_or_default();
        assert!(got.contains("99999") && got.contains("port"), "{got}");
        let got = message("https://app*.example.com").unwrap_or_default();
        assert!(
            got.contains("app*.example.com") && got.contains("*.example.com"),
            "{got}"
        );
    }

    #[test]
    fn empty_set_allows_everything() {
        let empty = ReferrerSet::default();
        assert!(empty.is_empty());
        assert!(empty.allows(None, None));
        assert!(empty.allows(Some(b"https://evil.com/"), Some(b"null")));
        assert!(!set(&["https://a.com"]).is_empty());
    }

    type Case = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        bool,
    );

    fn check(patterns: &[&str], cases: &[Case]) {
        let allowed = set(patterns);
        for (what, referer, origin, want) in cases {
            let got = allowed.allows(referer.map(str::as_bytes), origin.map(str::as_bytes));
            assert_eq!(
                got, *want,
                "{what}: patterns {patterns:?}, Referer {referer:?}, Origin {origin:?}"
            );
        }
    }

    #[test]
    fn exact_host_with_any_path() {
        check(
            &["https://app.example.com/*"],
            &[
                ("referer root", Some("https://app.example.com/"), None, true),
                (
                    "referer no path",
                    Some("https://app.example.com"),
                    None,
                    true,
                ),
                (
                    "referer deep path",
                    Some("https://app.example.com/a/b?c=d#e"),
                    None,
                    true,
                ),
                (
                    "referer query only",
                    Some("https://app.example.com?x"),
                    None,
                    true,
                ),
                ("host case", Some("https://APP.Example.COM/x"), None, true),
                ("scheme case", Some("HTTPS://app.example.com/x"), None, true),
                (
                    "explicit default port",
                    Some("https://app.example.com:443/x"),
                    None,
                    true,
                ),
                (
                    "surrounding spaces",
                    Some(" \thttps://app.example.com/x "),
                    None,
                    true,
                ),
                ("origin", None, Some("https://app.example.com"), true),
                (
                    "origin default port",
                    None,
                    Some("https://app.example.com:443"),
                    true,
                ),
                (
                    "both",
                    Some("https://app.example.com/x"),
                    Some("https://app.example.com"),
                    true,
                ),
                ("absent both", None, None, false),
                (
                    "suffix attack",
                    Some("https://app.example.com.evil.com/"),
                    None,
                    false,
                ),
                (
                    "host in path",
                    Some("https://evil.com/app.example.com/"),
                    None,
                    false,
                ),
                (
                    "host in query",
                    Some("https://evil.com/?x=app.example.com/"),
                    None,
                    false,
                ),
                (
                    "host in fragment",
                    Some("https://evil.com/#https://app.example.com/"),
                    None,
                    false,
                ),
                (
                    "userinfo",
                    Some("https://app.example.com@evil.com/"),
                    None,
                    false,
                ),
                (
                    "userinfo with port",
                    Some("https://app.example.com:443@evil.com/"),
                    None,
                    false,
                ),
                (
                    "userinfo allowed host",
                    Some("https://x@app.example.com/"),
                    None,
                    false,
                ),
                (
                    "backslash authority",
                    Some("https://evil.com\\@app.example.com/"),
                    None,
                    false,
                ),
                (
                    "trailing dot",
                    Some("https://app.example.com./"),
                    None,
                    false,
                ),
                (
                    "percent host",
                    Some("https://app%2eexample.com/"),
                    None,
                    false,
                ),
                (
                    "percent host 2",
                    Some("https://%61pp.example.com/"),
                    None,
                    false,
                ),
                (
                    "subdomain of exact",
                    Some("https://x.app.example.com/"),
                    None,
                    false,
                ),
                ("parent of exact", Some("https://example.com/"), None, false),
                (
                    "scheme mismatch",
                    Some("http://app.example.com/"),
                    None,
                    false,
                ),
                (
                    "port mismatch",
                    Some("https://app.example.com:8443/"),
                    None,
                    false,
                ),
                (
                    "http port on https",
                    Some("https://app.example.com:80/"),
                    None,
                    false,
                ),
                ("empty port", Some("https://app.example.com:/"), None, false),
                ("port zero", Some("https://app.example.com:0/"), None, false),
                (
                    "port overflow",
                    Some("https://app.example.com:65979/"),
                    None,
                    false,
                ),
                ("non-ascii", Some("https://app.example.com/é"), None, false),
                (
                    "control char",
                    Some("https://app.example.com/\x01"),
                    None,
                    false,
                ),
                (
                    "inner space",
                    Some("https://app.example.com/a b"),
                    None,
                    false,
                ),
                ("relative", Some("/path"), None, false),
                ("no scheme", Some("app.example.com/"), None, false),
                ("scheme-relative", Some("//app.example.com/"), None, false),
                ("other scheme", Some("ftp://app.example.com/"), None, false),
                (
                    "javascript",
                    Some("javascript://app.example.com/%0aalert(1)"),
                    None,
                    false,
                ),
                ("empty referer", Some(""), None, false),
                ("null origin", None, Some("null"), false),
                (
                    "null origin, good referer",
                    Some("https://app.example.com/"),
                    Some("null"),
                    false,
                ),
                (
                    "good origin, bad referer",
                    Some("https://evil.com/"),
                    Some("https://app.example.com"),
                    false,
                ),
                (
                    "bad origin, good referer",
                    Some("https://app.example.com/"),
                    Some("https://evil.com"),
                    false,
                ),
                (
                    "origin with path",
                    None,
                    Some("https://app.example.com/"),
                    false,
                ),
                (
                    "origin with query",
                    None,
                    Some("https://app.example.com?x"),
                    false,
                ),
                (
                    "origin scheme mismatch",
                    None,
                    Some("http://app.example.com"),
                    false,
                ),
                (
                    "origin port mismatch",
                    None,
                    Some("https://app.example.com:444"),
                    false,
                ),
                (
                    "origin userinfo",
                    None,
                    Some("https://app.example.com@evil.com"),
                    false,
                ),
                ("empty origin", None, Some(""), false),
                (
                    "comma-joined origins",
                    None,
                    Some("https://app.example.com,https://evil.com"),
                    false,
                ),
            ],
        );
    }

    #[test]
    fn subdomain_wildcard() {
        check(
            &["https://*.example.org"],
            &[
                ("one label", Some("https://a.example.org/x"), None, true),
                ("two labels", Some("https://a.b.example.org/"), None, true),
                ("case", None, Some("https://A.EXAMPLE.Org"), true),
                ("apex", Some("https://example.org/"), None, false),
                ("glued label", Some("https://evilexample.org/"), None, false),
                (
                    "suffix of label",
                    Some("https://a.evilexample.org/"),
                    None,
                    false,
                ),
                (
                    "longer tld",
                    Some("https://a.example.org.evil.com/"),
                    None,
                    false,
                ),
                ("empty label", Some("https://.example.org/"), None, false),
                ("double dot", Some("https://a..example.org/"), None, false),
                ("trailing dot", Some("https://a.example.org./"), None, false),
                (
                    "userinfo",
                    Some("https://a.example.org@evil.com/"),
                    None,
                    false,
                ),
                (
                    "userinfo reversed",
                    Some("https://evil.com@a.example.org/"),
                    None,
                    false,
                ),
                ("path", Some("https://evil.com/.example.org"), None, false),
                (
                    "query",
                    Some("https://evil.com/?x=.example.org/"),
                    None,
                    false,
                ),
                (
                    "port mismatch",
                    None,
                    Some("https://a.example.org:8443"),
                    false,
                ),
                ("scheme mismatch", None, Some("http://a.example.org"), false),
            ],
        );
    }

    #[test]
    fn paths_ports_and_schemes() {
        check(
            &[
                "http://localhost:3000/dev/*",
                "*://docs.example.net/guide/*/page",
                "https://root.example.com/",
                "https://[2001:db8::1]:8443",
                "http://10.0.0.5",
            ],
            &[
                (
                    "path glob",
                    Some("http://localhost:3000/dev/x/y"),
                    None,
                    true,
                ),
                (
                    "path glob empty run",
                    Some("http://localhost:3000/dev/"),
                    None,
                    true,
                ),
                (
                    "path prefix only",
                    Some("http://localhost:3000/dev"),
                    None,
                    false,
                ),
                (
                    "path case",
                    Some("http://localhost:3000/DEV/x"),
                    None,
                    false,
                ),
                (
                    "path sibling",
                    Some("http://localhost:3000/devtools"),
                    None,
                    false,
                ),
                (
                    "dot segments",
                    Some("http://localhost:3000/dev/../admin"),
                    None,
                    false,
                ),
                (
                    "encoded dot segments",
                    Some("http://localhost:3000/dev/%2E%2e/admin"),
                    None,
                    false,
                ),
                (
                    "backslash path",
                    Some("http://localhost:3000/dev/..\\x"),
                    None,
                    false,
                ),
                (
                    "query not path",
                    Some("http://localhost:3000/?p=/dev/x"),
                    None,
                    false,
                ),
                ("port required", Some("http://localhost/dev/x"), None, false),
                (
                    "origin ignores path glob",
                    None,
                    Some("http://localhost:3000"),
                    true,
                ),
                (
                    "any scheme http",
                    Some("http://docs.example.net/guide/a/b/page"),
                    None,
                    true,
                ),
                (
                    "any scheme https",
                    Some("https://docs.example.net/guide/x/page?q"),
                    None,
                    true,
                ),
                (
                    "any scheme default port",
                    Some("https://docs.example.net:443/guide/x/page"),
                    None,
                    true,
                ),
                (
                    "any scheme wrong default",
                    Some("https://docs.example.net:80/guide/x/page"),
                    None,
                    false,
                ),
                (
                    "inner glob miss",
                    Some("https://docs.example.net/guide/x/pages"),
                    None,
                    false,
                ),
                ("root only", Some("https://root.example.com/"), None, true),
                (
                    "root empty path",
                    Some("https://root.example.com?x"),
                    None,
                    true,
                ),
                (
                    "root only miss",
                    Some("https://root.example.com/x"),
                    None,
                    false,
                ),
                (
                    "ipv6",
                    Some("https://[2001:db8::1]:8443/x"),
                    Some("https://[2001:DB8:0::1]:8443"),
                    true,
                ),
                ("ipv6 port", None, Some("https://[2001:db8::1]"), false),
                (
                    "ipv6 other",
                    None,
                    Some("https://[2001:db8::2]:8443"),
                    false,
                ),
                (
                    "ipv6 zone",
                    None,
                    Some("https://[2001:db8::1%25eth0]:8443"),
                    false,
                ),
                (
                    "ipv6 unclosed",
                    None,
                    Some("https://[2001:db8::1:8443"),
                    false,
                ),
                ("ipv4", None, Some("http://10.0.0.5"), true),
                ("ipv4 other", None, Some("http://10.0.0.50"), false),
            ],
        );
    }

    #[test]
    fn glob_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("/", "/", true),
            ("/", "/x", false),
            ("/a/*", "/a/", true),
            ("/a/*", "/a/b/c", true),
            ("/a/*", "/a", false),
            ("/*/b", "/x/y/b", true),
            ("/*/b", "/x/y/bc", false),
            ("/*b*c", "/abbbc", true),
            ("/*b*c", "/abbbd", false),
            ("/a*", "/a", true),
            (
                "/a*a*a*a*a*b",
                "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
        ];
        for (glob, path, want) in cases {
            assert_eq!(
                glob_match(glob.as_bytes(), path.as_bytes()),
                *want,
                "{glob} vs {path}"
            );
        }
    }

    /// URL-ish strings built around the allowed hosts, with junk where
    /// bypasses hide: before the host, after it, and in the scheme.
    fn near_url() -> impl Strategy<Value = String> {
        let scheme = prop_oneof![
            4 => Just("https://".to_owned()),
            1 => Just("HTTPS://".to_owned()),
            1 => Just("http://".to_owned()),
            1 => Just("https:/".to_owned()),
            1 => "(?i:https?|ftp|\\*)?:?/{0,3}",
        ];
        let before = prop_oneof![
            2 => Just(String::new()),
            1 => "[a-z.@:%\\[\\]0-9\\\\]{0,6}",
        ];
        let host = prop_oneof![
            Just("app.example.com"),
            Just("App.Example.COM"),
            Just("a.example.org"),
            Just("x.Y.example.ORG"),
            Just("example.org"),
            Just(""),
        ];
        let after = "[a-z.@:/?#%0-9\\\\]{0,12}";
        (scheme, before, host, after).prop_map(|(s, b, h, a)| format!("{s}{b}{h}{a}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn allows_never_panics(
            referer in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            origin in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            near_referer in proptest::option::of(near_url()),
            near_origin in proptest::option::of(near_url()),
        ) {
            let allowed = set(&["https://app.example.com/*", "*://*.example.org/x/*", "http://[::1]:8080"]);
            let _ = allowed.allows(referer.as_deref(), origin.as_deref());
            let _ = allowed.allows(
                near_referer.as_deref().map(str::as_bytes),
                near_origin.as_deref().map(str::as_bytes),
            );
        }

        #[test]
        fn parse_never_panics_and_keeps_text(text in "\\PC{0,30}", near in near_url()) {
            for text in [text, near] {
                if let Ok(pattern) = ReferrerPattern::parse(&text) {
                    prop_assert_eq!(pattern.as_str(), text.as_str());
                }
            }
        }

        #[test]
        fn allowed_referers_really_are_on_the_allowed_host(url in near_url()) {
            let exact = set(&["https://app.example.com/*"]);
            if exact.allows(Some(url.as_bytes()), None) {
                let lower = url.to_ascii_lowercase();
                let rest = lower.strip_prefix("https://app.example.com");
                let rest = rest.map(|r| r.strip_prefix(":443").unwrap_or(r));
                prop_assert!(
                    rest.is_some_and(|r| r.is_empty() || r.starts_with(['/', '?', '#'])),
                    "allowed {:?}", url
                );
            }
            let wildcard = set(&["https://*.example.org"]);
            if wildcard.allows(Some(url.as_bytes()), None) {
                let lower = url.to_ascii_lowercase();
                let rest = lower.strip_prefix("https://");
                let authority = rest.map(|r| &r[..r.find(['/', '?', '#']).unwrap_or(r.len())]);
                let host = authority.map(|a| a.strip_suffix(":443").unwrap_or(a));
                prop_assert!(
                    host.is_some_and(|h| h.ends_with(".example.org") && !h.starts_with('.') && !h.contains(['@', ':'])),
                    "allowed {:?}", url
                );
            }
        }
    }
}
