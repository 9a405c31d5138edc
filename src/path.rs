//! Request path normalization.
//!
//! This module owns the single canonical form of a request path: the string
//! keygate matches routes against *and* the string it forwards upstream.
//! The rule of thumb is that two requests an upstream could treat as the same
//! resource must normalize to the same string, and anything ambiguous (encoded
//! separators, double encoding, `..` above the root, Tomcat-style `..;`, ...)
//! is rejected rather than guessed at.
//!
//! The canonical form, per octet: every percent-encoded octet is decoded, then
//! written raw if it is an RFC 3986 `pchar` (unreserved, sub-delims, `:`, `@`)
//! and as `%XX` with uppercase hex otherwise. Repeated `/` are merged, `.`
//! segments dropped and `..` segments resolved, all after decoding.
//!
//! It is pure: no I/O, no clock, no logging, no global state. Error values
//! never carry (or echo) the offending path.

use http::uri::PathAndQuery;

/// Options that change what [`normalize`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathOptions {
    /// Accept `;` (raw or `%3B`) in path segments. Off by default, because
    /// some upstreams (Tomcat, Jetty, Spring) strip `;`-parameters from
    /// segments, so `/admin;x` may reach `/admin`. Even when on, a segment
    /// whose part before the first `;` is empty, `.` or `..` is rejected.
    pub allow_semicolon: bool,
    /// The path reaches the upstream as the client sent it, not in the form keygate decides
    /// on: the check fronts (ext_authz, forward-auth) decide, and another proxy forwards. A
    /// path the normalizer would have to resolve (an empty segment before the last, a `.` or
    /// `..` segment, raw or percent-encoded) is then refused: the upstream may resolve it
    /// otherwise (`/a//../b` is `/a/b` to RFC 3986 and WHATWG, `/b` after merging slashes;
    /// a router matching segments literally resolves nothing), and serve another resource
    /// than the one decided on.
    pub as_sent: bool,
}

impl PathOptions {
    /// These options for a path that reaches the upstream as sent ([`PathOptions::as_sent`]).
    pub fn as_sent(self) -> Self {
        PathOptions {
            as_sent: true,
            ..self
        }
    }
}

/// Why a request path was rejected. Messages never echo the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty or does not start with `/` (e.g. `*`).
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// A raw `#` (fragment) appears in the path.
    #[error("the request path must not contain '#' (fragments are never sent to a server)")]
    Fragment,
    /// A raw `\` appears in the path.
    #[error("the request path must not contain '\\'; use '/' as the separator")]
    Backslash,
    /// A raw control byte (0x00–0x1F, 0x7F) or space appears in the path.
    #[error("the request path contains a raw control character or space; percent-encode it")]
    ControlCharacter,
    /// A `%` is not followed by two hex digits.
    #[error("the request path has a '%' that is not followed by two hex digits")]
    BadPercentEncoding,
    /// `%2F` or `%5C`: an encoded separator would be ambiguous.
    #[error("the request path contains an encoded '/' or '\\' (%2F, %5C), which is ambiguous")]
    EncodedSeparator,
    /// `%00`–`%1F` or `%7F`.
    #[error("the request path contains an encoded control character (%00-%1F, %7F)")]
    EncodedControl,
    /// `%25` followed by two hex digits: a server decoding twice would see
    /// a different path.
    #[error("the request path is double percent-encoded (%25 followed by two hex digits)")]
    DoubleEncoding,
    /// A `..` segment would go above the root.
    #[error("the request path uses '..' to go above the root")]
    AboveRoot,
    /// A `;` (raw or `%3B`) while [`PathOptions::allow_semicolon`] is off.
    #[error("the request path contains ';' (or %3B), which is not allowed")]
    Semicolon,
    /// With semicolons allowed: a segment such as `..;x`, `.;x` or `;x`,
    /// which upstreams that strip parameters read as `..`, `.` or empty.
    #[error("a request path segment is empty, '.' or '..' before its ';' parameters")]
    AmbiguousParameter,
    /// With [`PathOptions::as_sent`]: an empty segment (`//`), `.` or `..`, which the
    /// upstream would receive unresolved.
    #[error(
        "the request path has an empty, '.' or '..' segment, which would reach the API unresolved"
    )]
    Unresolved,
}

/// A normalized request path (always ASCII, always starts with `/`).
#[derive(Debug, Clone)]
pub struct NormalizedPath {
    /// The forwarded form.
    path: Form,
    /// Length of the matching form: `path` without its trailing `/`, if any
    /// (the root `/` keeps its slash).
    match_len: usize,
}

/// Where the forwarded form's text is.
#[derive(Debug, Clone)]
enum Form {
    /// Written by the normalizer (or copied from a borrowed path).
    Owned(String),
    /// The path part of the request's own target, which was canonical already: shared with
    /// it (a reference count) rather than copied (an allocation per request).
    Received(PathAndQuery),
}

impl NormalizedPath {
    /// The forwarded form: starts with `/`, and ends with `/` if the input's
    /// last segment was empty, `.` or `..` (like RFC 3986 `remove_dot_segments`).
    pub fn as_str(&self) -> &str {
        match &self.path {
            Form::Owned(path) => path,
            Form::Received(target) => target.path(),
        }
    }

    /// The form routes are matched against: [`as_str`](Self::as_str) without
    /// the trailing `/`, except for the root `/`. It has no empty segments.
    pub fn for_matching(&self) -> &str {
        &self.as_str()[..self.match_len]
    }

    /// Whether the forwarded form ends with a `/` (never true for the root).
    pub fn has_trailing_slash(&self) -> bool {
        self.match_len < self.as_str().len()
    }

    /// Consumes `self`, returning the forwarded form.
    pub fn into_string(self) -> String {
        match self.path {
            Form::Owned(path) => path,
            Form::Received(target) => target.path().to_owned(),
        }
    }

    fn from_canonical(path: Form) -> Self {
        let mut n = Self { path, match_len: 0 };
        let len = n.as_str().len();
        n.match_len = if len > 1 && n.as_str().ends_with('/') {
            len - 1
        } else {
            len
        };
        n
    }
}

impl PartialEq for NormalizedPath {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for NormalizedPath {}

impl std::fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for NormalizedPath {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Split a request target `"path?query"` at the first `?`:
/// `(path, Some(query without '?'))`, or `(target, None)` without a `?`.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// Normalize the path part of a request target (no query) into its one
/// canonical form, or reject it. See the module docs for the rules.
pub fn normalize(path: &str, opts: PathOptions) -> Result<NormalizedPath, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_already_canonical(path) {
        return Ok(NormalizedPath::from_canonical(Form::Owned(path.to_owned())));
    }
    normalize_slow(path, opts)
}

/// [`normalize`] of `uri`'s path: the same answer, but a path that is canonical already is
/// shared with the URI's target, not copied. (Only where the target's path is the URI's: an
/// HTTP/2 CONNECT without `:authority` has an empty target whose path reads "/" but no path.)
pub fn normalize_uri(uri: &http::Uri, opts: PathOptions) -> Result<NormalizedPath, PathError> {
    let path = uri.path();
    if let Some(target) = uri.path_and_query() {
        if target.path() == path && path.starts_with('/') && is_already_canonical(path) {
            return Ok(NormalizedPath::from_canonical(Form::Received(
                target.clone(),
            )));
        }
    }
    normalize(path, opts)
}

/// Whether `b` is an RFC 3986 `pchar` that can stand for itself (unreserved,
/// sub-delims, `:` or `@`).
fn is_pchar(b: u8) -> bool {
    PCHAR[usize::from(b)]
}

/// [`is_pchar`] as a table: it is asked of every byte of every request's path.
static PCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~!$&'()*+,;=:@";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// Fast path: `path` (starting with `/`) is made only of raw `pchar`s other
/// than `;`, and has no empty segment (other than a final one), `.` or `..`.
/// Such a path is its own canonical form.
fn is_already_canonical(path: &str) -> bool {
    // One pass over the bytes (every request takes it): a segment ends at each `/`.
    let bytes = path.as_bytes();
    let dots = |seg: &[u8]| seg == b"." || seg == b"..";
    let mut start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if b == b'/' {
            let seg = &bytes[start..i];
            if seg.is_empty() || dots(seg) {
                return false;
            }
            start = i + 1;
        } else if b == b';' || !is_pchar(b) {
            return false;
        }
    }
    // The last segment may be empty (a trailing slash).
    !dots(&bytes[start..])
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode one segment's octets and append their canonical form to `out`.
fn push_canonical_segment(
    out: &mut String,
    raw: &[u8],
    opts: PathOptions,
) -> Result<(), PathError> {
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        let octet = match b {
            b'#' => return Err(PathError::Fragment),
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x20 | 0x7F => return Err(PathError::ControlCharacter),
            b'%' => {
                let (hi, lo) = match (raw.get(i + 1), raw.get(i + 2)) {
                    (Some(&h), Some(&l)) => (hex_value(h), hex_value(l)),
                    _ => (None, None),
                };
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadPercentEncoding);
                };
                i += 2;
                match hi << 4 | lo {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0x00..=0x1F | 0x7F => return Err(PathError::EncodedControl),
                    v => v,
                }
            }
            _ => b,
        };
        i += 1;
        if octet == b';' && !opts.allow_semicolon {
            return Err(PathError::Semicolon);
        }
        if is_pchar(octet) {
            out.push(char::from(octet));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(octet >> 4)]));
            out.push(char::from(HEX[usize::from(octet & 0xF)]));
        }
    }
    Ok(())
}

/// Whether a canonical segment holds a literal `%` (`%25`) followed by two
/// hex digits, which a server that decodes twice would read differently.
/// Hex digits are unreserved, so after canonicalization they are always raw.
fn has_double_encoding(seg: &[u8]) -> bool {
    seg.windows(5)
        .any(|w| &w[..3] == b"%25" && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit())
}

fn normalize_slow(path: &str, opts: PathOptions) -> Result<NormalizedPath, PathError> {
    // `out` holds "/seg1/seg2..." with no trailing slash; empty means root.
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    let mut segments = path[1..].split('/').peekable();
    while let Some(raw) = segments.next() {
        let start = out.len();
        out.push('/');
        push_canonical_segment(&mut out, raw.as_bytes(), opts)?;
        let seg = &out[start + 1..];
        if has_double_encoding(seg.as_bytes()) {
            return Err(PathError::DoubleEncoding);
        }
        if opts.allow_semicolon {
            if let Some((name, _params)) = seg.split_once(';') {
                if matches!(name, "" | "." | "..") {
                    return Err(PathError::AmbiguousParameter);
                }
            }
        }
        trailing_slash = matches!(seg, "" | "." | "..");
        // (A final empty segment is a trailing slash, kept as sent.)
        if opts.as_sent && trailing_slash && (!seg.is_empty() || segments.peek().is_some()) {
            return Err(PathError::Unresolved);
        }
        match seg {
            "" | "." => out.truncate(start),
            ".." => {
                out.truncate(start);
                let parent = out.rfind('/').ok_or(PathError::AboveRoot)?;
                out.truncate(parent);
            }
            _ => {}
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(NormalizedPath::from_canonical(Form::Owned(out)))
}

#[cfg(test)]
#[path = "path/tests.rs"]
mod tests;
