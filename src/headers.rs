//! Header rules shared by every front: what is hop-by-hop, what counts as a spoofed identity
//! header, and setting identity headers after an allow. Identity headers are overwritten or
//! removed, never appended: only keygate speaks for identity.
//!
//! A request's fields come as hyper's map (HTTP/2, the forward-auth front) or, on the proxy's
//! HTTP/1.1 side, as the head keygate read ([`http1::Fields`]): no map is built for those, and
//! the rules here read both alike ([`FieldLookup`], [`FieldEdit`]). Names in a head keep the
//! client's spelling, so every rule compares them without regard to case.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderNames;
use crate::decision::Allow;
use crate::http1;

/// Reading a request's fields by name, whatever holds them.
pub trait FieldLookup {
    /// Every value of `name`, in order.
    fn values<'a: 'n, 'n>(&'a self, name: &'n HeaderName) -> Values<'a, 'n>;

    fn contains(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }
}

/// [`FieldLookup::values`]: a map's, or a head's.
pub enum Values<'a, 'n> {
    Map(http::header::ValueIter<'a, HeaderValue>),
    Head(http1::Values<'a, 'n>),
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(m) => m.next().map(HeaderValue::as_bytes),
            Values::Head(h) => h.next(),
        }
    }
}

impl DoubleEndedIterator for Values<'_, '_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Values::Map(m) => m.next_back().map(HeaderValue::as_bytes),
            Values::Head(h) => h.next_back(),
        }
    }
}

/// Taking fields out of a request (or an answer's trailers).
pub trait FieldEdit: FieldLookup {
    /// Remove every field whose name `doomed` picks. It sees names as they came: in a map lower
    /// case, in a head as the client spelled them.
    fn remove_where(&mut self, doomed: impl FnMut(&[u8]) -> bool);

    fn remove(&mut self, name: &HeaderName) {
        let name = name.as_str().as_bytes();
        self.remove_where(|n| n.eq_ignore_ascii_case(name));
    }
}

impl FieldLookup for HeaderMap {
    fn values<'a: 'n, 'n>(&'a self, name: &'n HeaderName) -> Values<'a, 'n> {
        Values::Map(self.get_all(name).iter())
    }

    fn contains(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
}

impl FieldEdit for HeaderMap {
    fn remove_where(&mut self, mut doomed: impl FnMut(&[u8]) -> bool) {
        // Allocate only in the rare case that something must go.
        if self.keys().any(|n| doomed(n.as_str().as_bytes())) {
            let names: Vec<HeaderName> = self
                .keys()
                .filter(|n| doomed(n.as_str().as_bytes()))
                .cloned()
                .collect();
            for name in names {
                HeaderMap::remove(self, name);
            }
        }
    }

    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
}

impl FieldLookup for http1::Fields {
    fn values<'a: 'n, 'n>(&'a self, name: &'n HeaderName) -> Values<'a, 'n> {
        Values::Head(http1::Fields::values(self, name.as_str().as_bytes()))
    }
}

impl FieldEdit for http1::Fields {
    fn remove_where(&mut self, doomed: impl FnMut(&[u8]) -> bool) {
        http1::Fields::remove_where(self, doomed)
    }
}

/// A request's fields on their way through the proxy: hyper's map (HTTP/2), or the head as it
/// was read (HTTP/1.1), which goes upstream as it came less what keygate takes out.
#[derive(Debug)]
pub enum RequestFields {
    Map(HeaderMap),
    Head(http1::Fields),
}

/// [`RequestFields::iter`].
pub enum Iter<'a> {
    Map(http::header::Iter<'a, HeaderValue>),
    Head(http1::Iter<'a>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Map(m) => m.next().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            Iter::Head(h) => h.next(),
        }
    }
}

/// A map's fields as `(name, value)` bytes, as [`RequestFields::iter`] gives them.
pub fn map_fields(map: &HeaderMap) -> Iter<'_> {
    Iter::Map(map.iter())
}

impl RequestFields {
    /// `(name, value)` in order; a head's names as they came.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            RequestFields::Map(m) => map_fields(m),
            RequestFields::Head(h) => Iter::Head(h.iter()),
        }
    }

    /// The first value of `name`, as a header value of its own.
    pub fn get_value(&self, name: &HeaderName) -> Option<HeaderValue> {
        match self {
            RequestFields::Map(m) => m.get(name).cloned(),
            RequestFields::Head(h) => h.get_value(name.as_str().as_bytes()),
        }
    }
}

impl FieldLookup for RequestFields {
    fn values<'a: 'n, 'n>(&'a self, name: &'n HeaderName) -> Values<'a, 'n> {
        match self {
            RequestFields::Map(m) => FieldLookup::values(m, name),
            RequestFields::Head(h) => FieldLookup::values(h, name),
        }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        match self {
            RequestFields::Map(m) => m.contains_key(name),
            RequestFields::Head(h) => FieldLookup::contains(h, name),
        }
    }
}

impl FieldEdit for RequestFields {
    fn remove_where(&mut self, doomed: impl FnMut(&[u8]) -> bool) {
        match self {
            RequestFields::Map(m) => m.remove_where(doomed),
            RequestFields::Head(h) => h.remove_where(doomed),
        }
    }

    fn remove(&mut self, name: &HeaderName) {
        match self {
            RequestFields::Map(m) => FieldEdit::remove(m, name),
            RequestFields::Head(h) => FieldEdit::remove(h, name),
        }
    }
}

/// Up to the first two values of a field, and whether there were more than one: every rule
/// reads at most that much (a repeated credential or id is refused, not resolved).
#[derive(Debug, Default, Clone, Copy)]
pub struct Two<'a> {
    values: [&'a [u8]; 2],
    seen: usize,
}

impl<'a> Two<'a> {
    fn note(&mut self, value: &'a [u8]) {
        if let Some(slot) = self.values.get_mut(self.seen) {
            *slot = value;
            self.seen += 1;
        }
    }

    /// The first two values (fewer when fewer came).
    pub fn as_slice(&self) -> &[&'a [u8]] {
        &self.values[..self.seen]
    }

    /// The one value; a repeated field yields an empty one, which no rule accepts.
    pub fn single(&self) -> Option<&'a [u8]> {
        match self.seen {
            0 => None,
            1 => Some(self.values[0]),
            _ => Some(b""),
        }
    }
}

/// What the decision and the request id read of a request's fields, found in one walk over
/// them: a request has a handful of fields, and a lookup per rule walked them a dozen times.
#[derive(Debug, Default)]
pub struct Read<'a> {
    pub request_id: Two<'a>,
    pub authorization: Two<'a>,
    pub api_key: Two<'a>,
    pub referer: Two<'a>,
    pub origin: Two<'a>,
    pub idempotency_key: Two<'a>,
    /// Any of [`METHOD_OVERRIDES`], in any spelling.
    pub method_override: Two<'a>,
    /// Any of [`URL_OVERRIDES`], in any spelling.
    pub url_override: Two<'a>,
    /// Whether credential values after the first two offered a key.
    pub credential_beyond: crate::credential::Beyond,
}

/// Fields by which many servers (ASP.NET Core, Symfony, Express's method-override, Google's
/// APIs) run a request as another method than the one it was sent with.
pub const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether `name` is one of [`METHOD_OVERRIDES`], in any case and with `_` for `-` (CGI-style
/// servers read `x_http_method_override` as the same field). Most names differ in length.
pub fn is_method_override(name: &[u8]) -> bool {
    matches!(name.len(), 13 | 17 | 22)
        && METHOD_OVERRIDES
            .iter()
            .any(|m| folded_eq_any_case(m.as_bytes(), name))
}

/// Fields by which some servers (IIS's URL Rewrite, and PHP frameworks that read what it sets:
/// older Symfony and Zend releases among them) route a request to another URL than the one it
/// was sent to.
pub const URL_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Whether `name` is one of [`URL_OVERRIDES`], in any case and with `_` for `-`.
pub fn is_url_override(name: &[u8]) -> bool {
    matches!(name.len(), 13 | 14)
        && URL_OVERRIDES
            .iter()
            .any(|u| folded_eq_any_case(u.as_bytes(), name))
}

/// A URL override as a front reads it whose caller joins a repeated field's values with commas
/// (Envoy: ext_authz over gRPC, and its HTTP service's `/authz/<path>` asks): a value with a
/// comma may be two, which joined could spell the request's own path, so it counts as a repeat
/// (an empty value, which names no path).
pub fn joined_url_override(value: &[u8]) -> &[u8] {
    if value.contains(&b',') {
        b""
    } else {
        value
    }
}

impl<'a> Read<'a> {
    pub fn of(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>, names: &HeaderNames) -> Self {
        let mut read = Read::default();
        let wanted = [
            &names.request_id,
            &names.credentials.authorization,
            &names.credentials.api_key,
            &header::REFERER,
            &header::ORIGIN,
            &names.idempotency_key,
        ]
        .map(|n| n.as_str().as_bytes());
        for (name, value) in fields {
            // Lengths first: most names differ in length. Every name is checked, so that two
            // settings naming the same field both see it.
            for (i, wanted) in wanted.iter().enumerate() {
                if name.len() != wanted.len() || !name.eq_ignore_ascii_case(wanted) {
                    continue;
                }
                let two = match i {
                    0 => &mut read.request_id,
                    1 => &mut read.authorization,
                    2 => &mut read.api_key,
                    3 => &mut read.referer,
                    4 => &mut read.origin,
                    _ => &mut read.idempotency_key,
                };
                // A third credential value is not kept, but whether it offered a key counts.
                if two.as_slice().len() == 2 {
                    let beyond = &mut read.credential_beyond;
                    match i {
                        1 => beyond.authorization |= crate::credential::offers_bearer(value),
                        2 => beyond.api_key |= crate::credential::offers_api_key(value),
                        _ => {}
                    }
                }
                two.note(value);
            }
            // An empty one asks for nothing (servers ignore it too).
            if is_method_override(name) && !value.trim_ascii().is_empty() {
                read.method_override.note(value);
            }
            // An empty one too: servers that test for the field's presence route it to `/`.
            if is_url_override(name) {
                read.url_override.note(value);
            }
        }
        read
    }

    /// The credential the request presents (as [`crate::credential::extract_from_headers`] finds
    /// it by lookups).
    pub fn credential(&self) -> crate::credential::Credential<'a> {
        crate::credential::extract_first_two(
            self.authorization.as_slice(),
            self.api_key.as_slice(),
            self.credential_beyond,
        )
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1, `Upgrade`, and the obsolete ones still seen), about one
/// connection and never passed on; `name` in any case. Most names are told apart by their
/// length alone: this runs for every field of every request and answer.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |h: &[u8]| name.eq_ignore_ascii_case(h);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// A field named like one that frames a message or is hop-by-hop, but with `_` or `.` for `-`
/// (`Transfer_Encoding`, `Content_Length`, `Keep_Alive`): CGI-style servers read it as that
/// field, which would give them a second framing beside the one keygate sends. `name` in any
/// case. This runs for every field of every request: the length picks the one name it could
/// be, and the byte where that name has its `-` settles almost every field.
pub fn is_underscored_framing(name: &[u8]) -> bool {
    let (dashed, at) = match name.len() {
        10 => ("keep-alive", 4),
        14 => ("content-length", 7),
        16 => ("proxy-connection", 5),
        17 => ("transfer-encoding", 8),
        18 => ("proxy-authenticate", 5),
        19 => ("proxy-authorization", 5),
        _ => return false,
    };
    matches!(name[at], b'_' | b'.') && folded_eq_any_case(dashed.as_bytes(), name)
}

/// Remove, in one pass over the names, what must not travel on: hop-by-hop headers (also when
/// spelled with `_`, and `Content_Length`), those listed in `Connection`, and
/// (`identity = Some`) every spelling of an identity header.
/// `keep_upgrade` keeps `Upgrade` for a request being upgraded.
pub fn strip_hop_and_identity(
    h: &mut impl FieldEdit,
    identity: Option<&HeaderNames>,
    keep_upgrade: bool,
) {
    let listed = connection_tokens(h);
    h.remove_where(|name| {
        let keep = keep_upgrade && name.eq_ignore_ascii_case(b"upgrade");
        (!keep
            && (is_hop_by_hop(name)
                || is_underscored_framing(name)
                || listed
                    .iter()
                    .any(|t| t.as_str().as_bytes().eq_ignore_ascii_case(name))))
            || identity.is_some_and(|names| is_spoofed(name, names))
    });
}

/// Leave in an answer's trailer section only what a trailer may say (RFC 9110 §6.5.1): no
/// hop-by-hop field, nothing about framing, routing or the content's form, and (with
/// `identity`) no identity or request-id field, which only keygate sets.
pub fn strip_trailers(t: &mut HeaderMap, identity: Option<&HeaderNames>) {
    strip_hop_and_identity(t, identity, false);
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::HOST,
        header::DATE,
        header::CACHE_CONTROL,
        header::SET_COOKIE,
    ] {
        t.remove(name);
    }
}

/// Header names listed in `Connection` (lower-cased), which are hop-by-hop too. Allocates
/// nothing when there is no `Connection`.
pub fn connection_tokens(headers: &impl FieldLookup) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for value in headers.values(&header::CONNECTION) {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.is_empty() {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                out.push(name);
            }
        }
    }
    out
}

/// Does `Connection` ask for an upgrade to WebSocket, the one upgrade keygate forwards?
///
/// Every protocol `Upgrade` names must be `websocket`: an upstream picks one from the list, and
/// an `h2c` upgrade would turn the connection into HTTP/2 whose requests keygate never sees
/// (h2c smuggling). A request asking for anything else is forwarded as a plain request, without
/// `Upgrade`.
pub fn wants_upgrade(headers: &impl FieldLookup) -> bool {
    let mut protocols = headers
        .values(&header::UPGRADE)
        // A value that is not visible ASCII names no protocol keygate knows.
        .flat_map(|v| std::str::from_utf8(v).unwrap_or("?").split(','))
        .map(str::trim)
        .peekable();
    let websocket_only =
        protocols.peek().is_some() && protocols.all(|p| p.eq_ignore_ascii_case("websocket"));
    websocket_only
        && headers
            .values(&header::CONNECTION)
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// What a request must not pass on, from anyone: an identity header in any spelling (only
/// keygate speaks for identity), or a credential header spelled with `_` for `-` (`X_API_Key`),
/// which keygate never reads as a credential but a CGI-style server reads as the credential
/// header, beside the key keygate checked.
pub fn is_spoofed(name: &[u8], names: &HeaderNames) -> bool {
    is_identity_variant(name, names) || is_underscored_credential(name, names)
}

/// The fields an external authorizer's caller must remove from the original request (Envoy's
/// `headers_to_remove`, the forward-auth front's `x-envoy-auth-headers-to-remove`), lower-case,
/// each once: the credential where it was found (unless credentials are forwarded); `x-org-id`
/// for a partner without an org, also when the caller did not show the client's copy (Envoy's
/// `allowed_headers`, Istio's `includeRequestHeadersInCheck`: removing an absent field does
/// nothing); and every [`is_spoofed`] name among `sent` (the request's field names, any case)
/// that keygate does not set itself (`sets`, asked of a lower-case name).
pub fn to_remove<'a>(
    names: &'a HeaderNames,
    credential: &crate::credential::Credential<'_>,
    has_org: bool,
    sent: impl Iterator<Item = &'a [u8]>,
    sets: impl Fn(&str) -> bool,
) -> Vec<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    let mut remove: Vec<Cow<'a, str>> = Vec::new();
    if !has_org {
        remove.push(names.org_id.as_str().into());
    }
    if let crate::credential::Credential::Present { found, .. } = credential {
        if !names.forward_credentials {
            if found.authorization {
                remove.push(names.credentials.authorization.as_str().into());
            }
            if found.api_key {
                remove.push(names.credentials.api_key.as_str().into());
            }
        }
    }
    for name in sent {
        // These are ASCII, spelled like an identity or credential header's name in any case.
        if !is_spoofed(name, names) {
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let lower: Cow<'a, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        if !sets(&lower) && !remove.contains(&lower) {
            remove.push(lower);
        }
    }
    remove
}

/// [`is_spoofed`]'s second half: `name` spells a credential header with `_` or `.` for `-`.
fn is_underscored_credential(name: &[u8], names: &HeaderNames) -> bool {
    let credentials = &names.credentials;
    [&credentials.authorization, &credentials.api_key]
        .into_iter()
        .any(|n| {
            let n = n.as_str().as_bytes();
            n.len() == name.len() && joined_otherwise(name) && folded_eq_any_case(n, name)
        })
}

/// Is `name` (any case) one of the identity headers, in any variant (`_` or `.` for `-`)?
pub fn is_identity_variant(name: &[u8], names: &HeaderNames) -> bool {
    names
        .identity()
        .iter()
        .any(|n| folded_eq_any_case(n.as_str().as_bytes(), name))
}

/// `lower` (a lower-case name) and `name` spell the same header, in any case and with `_` or
/// `.` for `-`: how CGI-style servers read them (PHP's variable registration turns `.` into
/// `_`, as Apache 2.2's environment did every character not a letter or a digit, so `X.Org.Id`
/// arrives as `HTTP_X_ORG_ID`).
pub fn folded_eq_any_case(lower: &[u8], name: &[u8]) -> bool {
    let joiner = |b: u8| matches!(b, b'_' | b'-' | b'.');
    lower.len() == name.len()
        && lower
            .iter()
            .zip(name)
            .all(|(&x, &y)| x == y.to_ascii_lowercase() || (joiner(x) && joiner(y)))
}

/// Whether `name` is spelled with a `_` or a `.` where a field name has `-` (see
/// [`folded_eq_any_case`]).
pub fn joined_otherwise(name: &[u8]) -> bool {
    name.iter().any(|b| matches!(b, b'_' | b'.'))
}

/// Set the identity headers of an allow (inbound variants must have been stripped already).
pub fn set_identity(headers: &mut HeaderMap, names: &HeaderNames, allow: &Allow<'_>) {
    headers.insert(names.partner_id.clone(), allow.partner.id_header.clone());
    match &allow.partner.org_header {
        Some(org) => headers.insert(names.org_id.clone(), org.clone()),
        None => headers.remove(&names.org_id),
    };
    headers.insert(names.key_id.clone(), allow.key.id_header.clone());
    headers.insert(
        names.key_environment.clone(),
        allow.environment.header.clone(),
    );
    headers.insert(names.scopes.clone(), allow.scopes.header.clone());
}

/// The same fields as [`set_identity`], for a request whose map holds none of their names
/// (stripped): written after its own fields instead of inserted.
pub fn set_identity_fields(
    added: &mut crate::upstream::Added,
    names: &HeaderNames,
    allow: &Allow<'_>,
) {
    added.push(&names.partner_id, &allow.partner.id_header);
    if let Some(org) = &allow.partner.org_header {
        added.push(&names.org_id, org);
    }
    added.push(&names.key_id, &allow.key.id_header);
    added.push(&names.key_environment, &allow.environment.header);
    added.push(&names.scopes, &allow.scopes.header);
}

/// The request id header value, for errors and logs.
pub fn request_id_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscored_framing_names() {
        for name in [
            "Transfer_Encoding",
            "content_length",
            "KEEP_ALIVE",
            "proxy_connection",
            "Proxy_Authenticate",
            "proxy_authorization",
            "Transfer.Encoding",
            "Content.Length",
            "proxy.authorization",
        ] {
            assert!(is_underscored_framing(name.as_bytes()), "{name}");
        }
        for name in [
            "Transfer-Encoding",
            "content-length",
            "keep-alive",
            "user-agent",
            "x_forwarded",
            "content_lengthy",
            "content-_ength",
            "transfer_encodin",
            "",
        ] {
            assert!(!is_underscored_framing(name.as_bytes()), "{name}");
        }
    }

    fn names() -> HeaderNames {
        HeaderNames {
            credentials: crate::credential::CredentialHeaders::default(),
            forward_credentials: false,
            partner_id: HeaderName::from_static("x-partner-id"),
            org_id: HeaderName::from_static("x-org-id"),
            key_id: HeaderName::from_static("x-key-id"),
            key_environment: HeaderName::from_static("x-key-environment"),
            scopes: HeaderName::from_static("x-scopes"),
            request_id: HeaderName::from_static("x-request-id"),
            idempotency_key: HeaderName::from_static("idempotency-key"),
        }
    }

    /// One walk over the fields reads what the lookups one by one read: first values, repeats,
    /// any case, for HTTP/1.1's fields as received and for hyper's map alike.
    #[test]
    fn one_walk_reads_what_the_lookups_read() {
        let names = names();
        let table: &[&[(&str, &str)]] = &[
            &[],
            &[("x-api-key", "sk_live_a")],
            &[("X-API-KEY", "sk_live_a"), ("x-api-key", "sk_live_b")],
            &[
                ("Authorization", "Bearer sk_live_a"),
                ("X-Api-Key", "sk_live_a"),
            ],
            &[("authorization", "Bearer a"), ("AUTHORIZATION", "Bearer b")],
            &[
                ("authorization", "Basic a"),
                ("Authorization", "Basic b"),
                ("authorization", "Bearer c"),
            ],
            &[
                ("authorization", "Basic a"),
                ("Authorization", "Basic b"),
                ("authorization", "Basic c"),
            ],
            &[("x-api-key", ""), ("x-api-key", ""), ("X-Api-Key", "k")],
            &[
                ("Referer", "https://a.example/"),
                ("Origin", "https://a.example"),
            ],
            &[
                ("referer", "https://a.example/"),
                ("REFERER", "https://b.example/"),
            ],
            &[("Idempotency-Key", "k1"), ("x-request-id", "req-1")],
            &[("idempotency-key", "k1"), ("IDEMPOTENCY-KEY", "k2")],
            &[
                ("X-Request-Id", "a"),
                ("x-request-id", "b"),
                ("x-request-id", "c"),
            ],
            &[
                ("x-api-keys", "sk_live_a"),
                ("x-api-ke", "sk_live_a"),
                ("origin2", "x"),
            ],
            &[("X-HTTP-Method-Override", "DELETE")],
            &[("x_http_method", "PUT"), ("x-method-override", "PUT")],
            &[("x-http-method-override", ""), ("x-http-method", "PUT")],
            &[
                ("x-http-method-overrid", "PUT"),
                ("x-method-overrides", "PUT"),
            ],
            &[("X-Original-URL", "/admin"), ("x-api-key", "sk_live_a")],
            &[("x_rewrite_url", "/admin?x=1")],
            &[("x-original-url", "/a"), ("X-REWRITE-URL", "/a")],
            &[("x-original-url", " "), ("x-rewrite-url", "/b")],
            &[("x-original-uri", "/admin"), ("x-rewrite-urls", "/admin")],
        ];
        let path = crate::path::normalize("/a", crate::path::PathOptions::default());
        for fields in table {
            let text: String = fields
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect();
            let head = bytes::Bytes::from(text);
            let base = head.as_ptr() as usize;
            let mut at = Vec::new();
            let mut map = HeaderMap::new();
            let mut offset = 0;
            for (n, v) in *fields {
                let name = &head[offset..offset + n.len()];
                let value = &head[offset + n.len() + 2..offset + n.len() + 2 + v.len()];
                at.push(http1::Field::at(name, value, base));
                offset += n.len() + v.len() + 4;
                map.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let received = http1::Fields::new(head.clone(), at);
            // Looked up one by one: the first two values of each credential field; one value
            // of the others, empty when repeated.
            let single = |name: &HeaderName| {
                let mut values = FieldLookup::values(&map, name);
                let first = values.next()?;
                Some(if values.next().is_some() {
                    &b""[..]
                } else {
                    first
                })
            };
            // The one value of the fields `is` picks (in any spelling; an empty one counts only
            // with `empty`); empty when more than one came.
            let one_of = |is: fn(&[u8]) -> bool, empty: bool| {
                let mut all = map
                    .iter()
                    .filter(|(n, v)| {
                        is(n.as_str().as_bytes())
                            && (empty || !v.as_bytes().trim_ascii().is_empty())
                    })
                    .map(|(_, v)| v.as_bytes());
                let first = all.next()?;
                Some(if all.next().is_some() {
                    &b""[..]
                } else {
                    first
                })
            };
            let one_by_one = crate::decision::RequestFacts {
                method: "GET",
                path: path.as_ref().map_err(|e| *e),
                host: None,
                client_ip: None,
                credential: crate::credential::extract_from_headers(&map, &names.credentials),
                referer: single(&header::REFERER),
                origin: single(&header::ORIGIN),
                idempotency_key: single(&names.idempotency_key),
                method_override: one_of(is_method_override, false),
                url_override: one_of(is_url_override, true),
            };
            let ids: Vec<&[u8]> = FieldLookup::values(&map, &names.request_id).collect();
            for read in [
                Read::of(received.iter(), &names),
                Read::of(map_fields(&map), &names),
            ] {
                let facts =
                    crate::decision::RequestFacts::from_read("GET", &path, None, None, &read);
                assert_eq!(
                    format!("{facts:?}"),
                    format!("{one_by_one:?}"),
                    "{fields:?}"
                );
                let prefixes = crate::credential::PrefixRules::new(Vec::new());
                let want_id = crate::request_id::accept(ids.iter().copied(), &prefixes);
                let got = read.request_id.as_slice().iter().copied();
                let got_id = crate::request_id::accept(got, &prefixes);
                assert_eq!(got_id, want_id, "{fields:?}");
            }
        }
    }

    #[test]
    fn only_websocket_upgrades_are_forwarded() {
        let table: &[(&[&str], &[&str], bool)] = &[
            (&["Upgrade"], &["websocket"], true),
            (&["keep-alive, upgrade"], &["WebSocket"], true),
            (&["x", "Upgrade"], &["websocket"], true),
            (&["Upgrade"], &[], false),
            (&[], &["websocket"], false),
            (&["close"], &["websocket"], false),
            (&["Upgrade, HTTP2-Settings"], &["h2c"], false),
            (&["Upgrade"], &["websocket, h2c"], false),
            (&["Upgrade"], &["websocket", "h2c"], false),
            (&["Upgrade"], &["websocket/13"], false),
            (&["Upgrade"], &["TLS/1.2"], false),
            (&["Upgrade"], &[""], false),
        ];
        for (connection, upgrade, want) in table {
            let mut h = HeaderMap::new();
            for v in *connection {
                h.append(header::CONNECTION, HeaderValue::from_str(v).unwrap());
            }
            for v in *upgrade {
                h.append(header::UPGRADE, HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(wants_upgrade(&h), *want, "{connection:?} {upgrade:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(
            header::UPGRADE,
            HeaderValue::from_bytes(b"websocket\xff").unwrap(),
        );
        assert!(
            !wants_upgrade(&h),
            "a non-ASCII Upgrade is no WebSocket upgrade"
        );
    }
}
