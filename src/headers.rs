//! Header rules shared by every front: what is hop-by-hop, what counts as a spoofed identity
//! header, and setting identity headers after an allow. Identity headers are overwritten or
//! removed, never appended: only keygate speaks for identity.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::{folded_eq, HeaderNames};
use crate::decision::Allow;

/// Hop-by-hop headers (RFC 9110 §7.6.1, `Upgrade`, and the usual non-standard ones): never
/// forwarded. A `match` on the name: this runs for every header of every request and response.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Remove, in one pass over the names, what must not travel on: hop-by-hop headers, those
/// listed in `Connection`, and (`identity = Some`) every spelling of an identity header.
/// `keep_upgrade` keeps `Upgrade` for a request being upgraded. One pass instead of a remove per
/// candidate name: this runs twice per proxied request.
pub fn strip_hop_and_identity(
    h: &mut HeaderMap,
    identity: Option<&HeaderNames>,
    keep_upgrade: bool,
) {
    let listed = if h.contains_key(header::CONNECTION) {
        connection_tokens(h)
    } else {
        Vec::new()
    };
    let doomed = |name: &HeaderName| {
        let keep = keep_upgrade && name == header::UPGRADE;
        (!keep && (is_hop_by_hop(name) || listed.contains(name)))
            || identity.is_some_and(|names| is_identity_variant(name.as_str(), names))
    };
    // Allocate only in the rare case that something must go.
    if h.keys().any(doomed) {
        let names: Vec<HeaderName> = h.keys().filter(|n| doomed(n)).cloned().collect();
        for name in names {
            h.remove(name);
        }
    }
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

/// Header names listed in `Connection` (lower-cased), which are hop-by-hop too.
pub fn connection_tokens(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',') {
            let token = token.trim();
            if token.is_empty() {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.to_ascii_lowercase().as_bytes()) {
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
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        // A value that is not visible ASCII names no protocol keygate knows.
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .peekable();
    let websocket_only =
        protocols.peek().is_some() && protocols.all(|p| p.eq_ignore_ascii_case("websocket"));
    websocket_only
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Is `name` one of the identity headers, in any variant (`_` for `-`; names are lower case
/// already in a `HeaderMap`)?
pub fn is_identity_variant(name: &str, names: &HeaderNames) -> bool {
    names
        .identity()
        .iter()
        .any(|n| n.as_str().len() == name.len() && folded_eq(n.as_str(), name))
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
    added.push(names.partner_id.clone(), allow.partner.id_header.clone());
    if let Some(org) = &allow.partner.org_header {
        added.push(names.org_id.clone(), org.clone());
    }
    added.push(names.key_id.clone(), allow.key.id_header.clone());
    added.push(
        names.key_environment.clone(),
        allow.environment.header.clone(),
    );
    added.push(names.scopes.clone(), allow.scopes.header.clone());
}

/// The request id header value, for errors and logs.
pub fn request_id_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

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
