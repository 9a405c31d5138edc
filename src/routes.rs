//! Route patterns and the route table.
//!
//! This module owns the syntax of a route pattern (`METHOD /segments`, with
//! `*` for exactly one segment and a final `**` for zero or more) and the
//! matching rule: the most specific pattern wins. It is used for the config's
//! route table (pattern → required scopes) and for each key's
//! `allowed_routes` (any match allows).
//!
//! Specificity: compare matching patterns segment by segment from the left;
//! at the first position where they differ, literal > `*` > `**` (and a
//! pattern that ends there beats `**`). With identical path shapes, an exact
//! method beats `*`. A `GET` pattern also matches `HEAD` requests (an
//! upstream answers HEAD like GET); an explicit `HEAD` pattern beats `GET`.
//! A request segment's `;parameters` are ignored when it is compared with a
//! literal (`/a;x/b` matches `GET /a/b`): a request path holds `;` only when
//! `paths.allow_semicolon` is on, which is for upstreams (Tomcat, Jetty,
//! Spring) that drop the parameters before routing. Patterns never hold `;`.
//! Request methods are matched ignoring ASCII case: RFC 9110 makes `post`
//! another method than `POST`, but Django and Werkzeug upper-case the
//! method before routing, so `post` must need what `POST` needs.
//! Literal segments are compared exactly unless the lookup is asked for
//! [`Case::Insensitive`] (`routes.case_sensitive = false`), for upstreams that
//! route ignoring case (Express and ASP.NET Core by default, IIS): there
//! `/V1/Analyses` is `/v1/analyses` and must need what it needs. ASCII letters
//! only (Express folds no others; ASP.NET Core and IIS do, which the README
//! tells users of non-ASCII literals to cover with `unmatched = "deny"`);
//! other bytes compare exactly.
//!
//! It is pure: no I/O, no clock, no logging, and [`RouteTable::lookup`]
//! never allocates.

use std::collections::HashMap;
use std::fmt;

use crate::path::{normalize, PathError, PathOptions};

/// How a request's path segments compare with a pattern's literal segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Case {
    /// Byte for byte (`routes.case_sensitive = true`, the default).
    #[default]
    Sensitive,
    /// ASCII letters in either case are the same letter.
    Insensitive,
}

impl Case {
    fn same(self, literal: &str, segment: &str) -> bool {
        match self {
            Case::Sensitive => literal == segment,
            Case::Insensitive => literal.eq_ignore_ascii_case(segment),
        }
    }
}

/// The method part of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Method {
    /// `*`: any method.
    Any,
    /// An uppercase method token such as `GET`.
    Exact(Box<str>),
}

/// One segment of a pattern's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matches this exact (normalized) segment.
    Literal(Box<str>),
    /// `*`: exactly one segment.
    One,
    /// `**` (final only): zero or more segments.
    Rest,
}

/// A parsed route pattern such as `GET /v1/analyses/**` or `* /admin/*/logs`.
///
/// Equality compares the original text too; [`RouteTable::new`] detects
/// duplicates by meaning (`GET /a/` and `GET /a` are the same route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    method: Method,
    segments: Vec<Segment>,
    text: String,
}

/// Why a route pattern (or a set of them) was rejected. `route` is the
/// pattern as written (trimmed); for `Duplicate`, the second occurrence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The pattern is empty or only whitespace.
    #[error("route pattern is empty; expected e.g. \"GET /v1/items\"")]
    Empty,
    /// The pattern starts with the path (e.g. `/v1/items`).
    #[error("route {route:?}: missing the method, e.g. \"GET /v1\" or \"* /v1\"")]
    MissingMethod { route: String },
    /// The pattern has a method but no path (e.g. `GET`).
    #[error("route {route:?}: missing the path after the method")]
    MissingPath { route: String },
    /// The method is neither uppercase letters nor `*`.
    #[error("route {route:?}: the method must be uppercase letters (e.g. GET) or \"*\"")]
    BadMethod { route: String },
    /// The path does not start with `/`.
    #[error("route {route:?}: the path must start with \"/\"")]
    NotAbsolute { route: String },
    /// `**` appears somewhere other than the last segment.
    #[error("route {route:?}: \"**\" may only be the last segment")]
    RestNotFinal { route: String },
    /// A segment mixes `*` with other characters (e.g. `*.json`, `***`).
    #[error("route {route:?}: '*' must be a whole segment, \"*\" or \"**\"")]
    BadWildcard { route: String },
    /// The path is not a valid request path.
    #[error("route {route:?}: invalid path: {reason}")]
    InvalidPath { route: String, reason: PathError },
    /// The same route (same method and path once normalized) appears twice.
    #[error("route {route:?} is listed twice")]
    Duplicate { route: String },
}

impl RoutePattern {
    /// Parse `METHOD /path`. The method is uppercase ASCII letters or `*`;
    /// the path is normalized like a request path (default options), so
    /// `//`, `.`, `..` and percent-encodings mean what they would in a
    /// request, and a trailing `/` is ignored. A segment that is exactly `*`
    /// or `**` is a wildcard; no other segment may contain `*`. (`%2A` decodes
    /// to `*`, so a literal `*` segment cannot be written.)
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let text = s.trim();
        let err = |make: fn(String) -> RouteError| make(text.to_owned());
        if text.is_empty() {
            return Err(RouteError::Empty);
        }
        let Some((method, path)) = text.split_once(|c: char| c.is_ascii_whitespace()) else {
            return Err(if text.starts_with('/') {
                err(|route| RouteError::MissingMethod { route })
            } else {
                err(|route| RouteError::MissingPath { route })
            });
        };
        let method = match method {
            "*" => Method::Any,
            m if m.bytes().all(|b| b.is_ascii_uppercase()) => Method::Exact(m.into()),
            m if m.starts_with('/') => {
                return Err(err(|route| RouteError::MissingMethod { route }))
            }
            _ => return Err(err(|route| RouteError::BadMethod { route })),
        };
        let path = path.trim_start();
        if !path.starts_with('/') {
            return Err(err(|route| RouteError::NotAbsolute { route }));
        }
        let normalized =
            normalize(path, PathOptions::default()).map_err(|reason| RouteError::InvalidPath {
                route: text.to_owned(),
                reason,
            })?;
        let mut segments = Vec::new();
        for seg in path_segments(normalized.for_matching())
            .into_iter()
            .flat_map(|r| r.split('/'))
        {
            if segments.last() == Some(&Segment::Rest) {
                return Err(err(|route| RouteError::RestNotFinal { route }));
            }
            segments.push(match seg {
                "*" => Segment::One,
                "**" => Segment::Rest,
                s if s.contains('*') => return Err(err(|route| RouteError::BadWildcard { route })),
                s => Segment::Literal(s.into()),
            });
        }
        Ok(Self {
            method,
            segments,
            text: text.to_owned(),
        })
    }

    /// The pattern as written (surrounding whitespace trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `other` is the same route however it is written (`GET /a` and `GET /a/`): the
    /// equality [`RouteTable::new`] refuses duplicates by.
    pub fn same_route(&self, other: &Self) -> bool {
        self.method == other.method && self.segments == other.segments
    }

    /// This pattern with its literal segments in ASCII lower case (the text is kept): two
    /// patterns that are one route under [`Case::Insensitive`] fold to the same route.
    pub fn folded(&self) -> Self {
        let segments = self
            .segments
            .iter()
            .map(|seg| match seg {
                Segment::Literal(l) => Segment::Literal(l.to_ascii_lowercase().into()),
                other => other.clone(),
            })
            .collect();
        Self {
            method: self.method.clone(),
            segments,
            text: self.text.clone(),
        }
    }

    /// The method token, or `None` for `*` (any method).
    pub fn method(&self) -> Option<&str> {
        match &self.method {
            Method::Any => None,
            Method::Exact(m) => Some(m),
        }
    }

    /// Whether this one pattern matches a request (`path` in matching form,
    /// see [`crate::path::NormalizedPath::for_matching`]). Ignores
    /// specificity; use a [`RouteTable`] to pick among several patterns.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.matches_with(method, path, Case::Sensitive)
    }

    /// [`Self::matches`], comparing literal segments as `case` says.
    pub fn matches_with(&self, method: &str, path: &str, case: Case) -> bool {
        let method_ok = match &self.method {
            Method::Any => true,
            Method::Exact(m) => {
                m.eq_ignore_ascii_case(method)
                    || (&**m == "GET" && method.eq_ignore_ascii_case("HEAD"))
            }
        };
        let mut rest = path_segments(path);
        for seg in &self.segments {
            match (seg, rest.and_then(split_first)) {
                (Segment::Rest, _) => return method_ok,
                (Segment::One, Some((_, r))) => rest = r,
                (Segment::Literal(l), Some((s, r))) if case.same(l, without_params(s)) => rest = r,
                _ => return false,
            }
        }
        method_ok && rest.is_none()
    }
}

impl std::str::FromStr for RoutePattern {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The segments of a matching-form path: `None` for the root (no segments),
/// else the text after the leading `/`.
/// A request segment without its `;parameters`, as upstreams that strip them route it.
fn without_params(segment: &str) -> &str {
    split_at_byte(segment, b';').map_or(segment, |(name, _)| name)
}

/// `s` split at the first `byte` (ASCII), which is left out. A byte search: the segments it
/// runs on are short, and this runs for every segment of every request.
fn split_at_byte(s: &str, byte: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == byte)?;
    // An ASCII byte is a whole character: both halves are still UTF-8.
    Some((&s[..i], &s[i + 1..]))
}

/// `f` of `s` in ASCII lower case; without allocating for a segment of usual length.
fn with_lowercase<R>(s: &str, f: impl FnOnce(&str) -> R) -> R {
    if !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return f(s);
    }
    let mut buf = [0u8; 128];
    match buf.get_mut(..s.len()) {
        Some(lower) => {
            lower.copy_from_slice(s.as_bytes());
            lower.make_ascii_lowercase();
            // Lowering ASCII letters keeps UTF-8 valid.
            f(std::str::from_utf8(lower).expect("ASCII lowering keeps UTF-8"))
        }
        None => f(&s.to_ascii_lowercase()),
    }
}

fn path_segments(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    (!rest.is_empty()).then_some(rest)
}

/// Split off the first segment of `Some(rest)` from [`path_segments`].
fn split_first(rest: &str) -> Option<(&str, Option<&str>)> {
    Some(match split_at_byte(rest, b'/') {
        Some((first, more)) => (first, (!more.is_empty()).then_some(more)),
        None => (rest, None),
    })
}

/// The values of the patterns that end at one trie position, by method.
#[derive(Debug, Clone, PartialEq)]
struct Terminals<T> {
    /// Exact methods; a handful at most, so a linear scan beats hashing.
    exact: Vec<(Box<str>, T)>,
    /// The `*` method.
    any: Option<T>,
}

impl<T> Default for Terminals<T> {
    fn default() -> Self {
        Self {
            exact: Vec::new(),
            any: None,
        }
    }
}

impl<T> Terminals<T> {
    fn exact(&self, method: &str) -> Option<&T> {
        self.exact
            .iter()
            .find(|(m, _)| m.eq_ignore_ascii_case(method))
            .map(|(_, v)| v)
    }

    /// Best value for `method`: exact, then `GET` for `HEAD`, then `*`.
    fn get(&self, method: &str) -> Option<&T> {
        self.exact(method)
            .or_else(|| {
                method
                    .eq_ignore_ascii_case("HEAD")
                    .then(|| self.exact("GET"))
                    .flatten()
            })
            .or(self.any.as_ref())
    }

    /// Add a value; `false` if the method is already taken.
    fn insert(&mut self, method: Method, value: T) -> bool {
        match method {
            Method::Any if self.any.is_some() => false,
            Method::Any => {
                self.any = Some(value);
                true
            }
            Method::Exact(m) if self.exact(&m).is_some() => false,
            Method::Exact(m) => {
                self.exact.push((m, value));
                true
            }
        }
    }
}

/// One trie node: the patterns whose path so far led here.
#[derive(Debug, Clone, PartialEq)]
struct Node<T> {
    /// Children by literal segment (indices into `RouteTable::nodes`).
    literal: HashMap<Box<str>, usize>,
    /// Child for a `*` segment.
    one: Option<usize>,
    /// Patterns ending exactly here.
    end: Terminals<T>,
    /// Patterns ending here with a final `**`.
    rest: Terminals<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literal: HashMap::new(),
            one: None,
            end: Terminals::default(),
            rest: Terminals::default(),
        }
    }
}

/// A set of route patterns with a value each, answering "which pattern is
/// the most specific match for this request" in time proportional to the
/// path depth (a segment trie walked depth-first in priority order).
/// Equal tables match the same requests (a reload compares a key's table with the one in force).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTable<T> {
    /// Arena of trie nodes; index 0 is the root.
    nodes: Vec<Node<T>>,
    len: usize,
    /// Built by [`RouteTable::folded`]: every literal is in lower case, so a lookup ignoring
    /// case lowers the request's segment and hashes once.
    folded: bool,
}

impl<T> RouteTable<T> {
    /// Build a table. The same route twice (same method and normalized
    /// path, whatever the spelling) is [`RouteError::Duplicate`].
    pub fn new(routes: impl IntoIterator<Item = (RoutePattern, T)>) -> Result<Self, RouteError> {
        let mut table = Self {
            nodes: vec![Node::default()],
            len: 0,
            folded: false,
        };
        for (pattern, value) in routes {
            table.insert(pattern, value)?;
        }
        Ok(table)
    }

    /// A table of [`RoutePattern::folded`] patterns, for lookups with [`Case::Insensitive`]:
    /// one branch per literal whatever its spelling, so the most specific route wins as it
    /// would for a lower-case request, and two patterns that differ only in case are
    /// [`RouteError::Duplicate`].
    pub fn folded(routes: impl IntoIterator<Item = (RoutePattern, T)>) -> Result<Self, RouteError> {
        let mut table = Self::new(routes.into_iter().map(|(p, v)| (p.folded(), v)))?;
        table.folded = true;
        Ok(table)
    }

    fn insert(&mut self, pattern: RoutePattern, value: T) -> Result<(), RouteError> {
        let mut node = 0;
        let mut ends_with_rest = false;
        for seg in &pattern.segments {
            let next_free = self.nodes.len();
            let child = match seg {
                Segment::Rest => {
                    ends_with_rest = true;
                    break;
                }
                Segment::One => *self.nodes[node].one.get_or_insert(next_free),
                Segment::Literal(l) => *self.nodes[node]
                    .literal
                    .entry(l.clone())
                    .or_insert(next_free),
            };
            if child == next_free {
                self.nodes.push(Node::default());
            }
            node = child;
        }
        let node = &mut self.nodes[node];
        let terminals = if ends_with_rest {
            &mut node.rest
        } else {
            &mut node.end
        };
        if !terminals.insert(pattern.method, value) {
            return Err(RouteError::Duplicate {
                route: pattern.text,
            });
        }
        self.len += 1;
        Ok(())
    }

    /// The value of the most specific pattern matching `method` and `path`
    /// (`path` in matching form: [`crate::path::NormalizedPath::for_matching`]).
    /// Methods are matched ignoring ASCII case (see the module docs). Never
    /// allocates.
    pub fn lookup(&self, method: &str, path: &str) -> Option<&T> {
        self.lookup_with(method, path, Case::Sensitive)
    }

    /// [`Self::lookup`], comparing literal segments as `case` says. Under
    /// [`Case::Insensitive`] a segment spelled as a literal is found by hashing
    /// as usual; only one spelled otherwise scans that node's literals.
    ///
    /// For the most specific match ignoring case, build the table from
    /// [`RoutePattern::folded`] patterns (the config's route table is): two
    /// spellings of one literal are otherwise two branches, searched one after
    /// the other, and only whether anything matches is exact (all a key's
    /// `allowed_routes` need).
    pub fn lookup_with(&self, method: &str, path: &str, case: Case) -> Option<&T> {
        self.walk(0, method, path_segments(path), case)
    }

    /// Depth-first in priority order: literal child, `*` child, then `**`
    /// here; backtracks when a branch has no terminal for `method`. The
    /// recursion depth is bounded by the longest pattern, not the path.
    fn walk(&self, node: usize, method: &str, rest: Option<&str>, case: Case) -> Option<&T> {
        let n = &self.nodes[node];
        match rest.and_then(split_first) {
            None => {
                if let Some(v) = n.end.get(method) {
                    return Some(v);
                }
            }
            Some((first, more)) => {
                let first = without_params(first);
                let literal = if case == Case::Insensitive && self.folded {
                    with_lowercase(first, |lower| n.literal.get(lower).copied())
                } else {
                    n.literal.get(first).copied()
                };
                if let Some(child) = literal {
                    if let Some(v) = self.walk(child, method, more, case) {
                        return Some(v);
                    }
                }
                if case == Case::Insensitive && !self.folded {
                    // The other spellings of `first` among the literals (tried above as
                    // written); more than one only in a key's own `allowed_routes`.
                    let others = n
                        .literal
                        .iter()
                        .filter(|(l, _)| &***l != first && case.same(l, first));
                    for (_, &child) in others {
                        if let Some(v) = self.walk(child, method, more, case) {
                            return Some(v);
                        }
                    }
                }
                if let Some(child) = n.one {
                    if let Some(v) = self.walk(child, method, more, case) {
                        return Some(v);
                    }
                }
            }
        }
        n.rest.get(method)
    }

    /// Whether any pattern matches `method` and `path` (matching form).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.lookup(method, path).is_some()
    }

    /// [`Self::matches`], comparing literal segments as `case` says.
    pub fn matches_with(&self, method: &str, path: &str, case: Case) -> bool {
        self.lookup_with(method, path, case).is_some()
    }

    /// Number of patterns in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no patterns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
#[path = "routes/tests.rs"]
mod tests;
