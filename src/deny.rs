//! Deny reasons and their one mapping to the contract: HTTP status, `code`, `type`, message, and
//! the headers that go with them. Every front renders denials through here, so a code means the
//! same on the proxy, ext_authz and forward-auth. Messages never echo the presented key.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::path::PathError;

/// Why a request is not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    InvalidPath(PathError),
    /// A request keygate will not interpret (smuggling shapes, several `Host`s): what is wrong.
    BadRequest(&'static str),
    /// A request head over `proxy.max_header_bytes` or `proxy.max_headers`.
    HeadTooLarge,
    /// A forward-auth request on a path that is no ask (`/authz` or `/authz/<path>`).
    NotFound,
    /// No usable credential; `key_presented` when a key was offered but could not be used
    /// (malformed, or more than one), which the client is told with `error="invalid_token"`.
    AuthenticationRequired {
        key_presented: bool,
    },
    EnvironmentMismatch,
    InvalidApiKey,
    KeyRevoked,
    KeyExpired,
    AccountDeactivated,
    PartnerSuspended,
    InsufficientCredits,
    IpNotAllowed,
    ReferrerNotAllowed,
    RouteNotAllowed,
    /// The first scope the route needs that the key lacks.
    ScopeRequired(Arc<str>),
    IdempotencyKeyRequired,
    /// The first request with this Idempotency-Key is still being answered.
    IdempotencyKeyInUse,
    /// The Idempotency-Key was used before for a different request (method, path or body).
    IdempotencyKeyReused,
    /// A request body too large to fingerprint for idempotent replay.
    RequestTooLarge,
    /// A CheckRequest larger than `ext_authz.max_request_bytes`.
    CheckTooLarge,
    /// A CheckRequest arriving in pieces while others hold `ext_authz.max_buffered_bytes`:
    /// keygate's load, not the request's fault.
    Overloaded,
    /// The shared idempotency store (Redis) did not answer: the request is not run unguarded.
    IdempotencyUnavailable,
    /// Seconds until a retry can succeed.
    RateLimited {
        retry_after_secs: u64,
    },
    SnapshotUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
}

/// Every `code` a denial can carry, in the contract's order (usage counts index into it).
pub const CODES: [&str; 26] = [
    "invalid_path",
    "invalid_request",
    "not_found",
    "authentication_required",
    "key_environment_mismatch",
    "invalid_api_key",
    "key_revoked",
    "key_expired",
    "account_deactivated",
    "partner_suspended",
    "insufficient_credits",
    "ip_not_allowed",
    "referrer_not_allowed",
    "route_not_allowed",
    "scope_required",
    "idempotency_key_required",
    "idempotency_key_in_use",
    "idempotency_key_reused",
    "request_too_large",
    "idempotency_unavailable",
    "rate_limited",
    "snapshot_unavailable",
    "overloaded",
    "upstream_unavailable",
    "upstream_timeout",
    "other",
];

impl DenyReason {
    /// This denial's position in [`CODES`].
    pub fn code_index(&self) -> usize {
        let code = self.code();
        CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CODES.len() - 1)
    }

    pub fn status(&self) -> StatusCode {
        use DenyReason::*;
        match self {
            InvalidPath(_) | BadRequest(_) | IdempotencyKeyRequired => StatusCode::BAD_REQUEST,
            HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            NotFound => StatusCode::NOT_FOUND,
            IdempotencyKeyInUse => StatusCode::CONFLICT,
            IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            RequestTooLarge | CheckTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            IdempotencyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            AuthenticationRequired { .. } | InvalidApiKey | KeyRevoked | KeyExpired => {
                StatusCode::UNAUTHORIZED
            }
            InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
            EnvironmentMismatch | AccountDeactivated | PartnerSuspended | IpNotAllowed
            | ReferrerNotAllowed | RouteNotAllowed | ScopeRequired(_) => StatusCode::FORBIDDEN,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            SnapshotUnavailable | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        use DenyReason::*;
        match self {
            InvalidPath(_) => "invalid_path",
            BadRequest(_) | HeadTooLarge => "invalid_request",
            NotFound => "not_found",
            AuthenticationRequired { .. } => "authentication_required",
            EnvironmentMismatch => "key_environment_mismatch",
            InvalidApiKey => "invalid_api_key",
            KeyRevoked => "key_revoked",
            KeyExpired => "key_expired",
            AccountDeactivated => "account_deactivated",
            PartnerSuspended => "partner_suspended",
            InsufficientCredits => "insufficient_credits",
            IpNotAllowed => "ip_not_allowed",
            ReferrerNotAllowed => "referrer_not_allowed",
            RouteNotAllowed => "route_not_allowed",
            ScopeRequired(_) => "scope_required",
            IdempotencyKeyRequired => "idempotency_key_required",
            IdempotencyKeyInUse => "idempotency_key_in_use",
            IdempotencyKeyReused => "idempotency_key_reused",
            RequestTooLarge | CheckTooLarge => "request_too_large",
            IdempotencyUnavailable => "idempotency_unavailable",
            RateLimited { .. } => "rate_limited",
            SnapshotUnavailable => "snapshot_unavailable",
            Overloaded => "overloaded",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn error_type(&self) -> &'static str {
        use DenyReason::*;
        match self {
            InvalidPath(_)
            | BadRequest(_)
            | HeadTooLarge
            | NotFound
            | IdempotencyKeyRequired
            | IdempotencyKeyInUse
            | IdempotencyKeyReused
            | RequestTooLarge
            | CheckTooLarge => "invalid_request_error",
            AuthenticationRequired { .. } | InvalidApiKey | KeyRevoked | KeyExpired => {
                "authentication_error"
            }
            InsufficientCredits => "payment_error",
            EnvironmentMismatch | AccountDeactivated | PartnerSuspended | IpNotAllowed
            | ReferrerNotAllowed | RouteNotAllowed | ScopeRequired(_) => "permission_error",
            RateLimited { .. } => "rate_limit_error",
            SnapshotUnavailable
            | Overloaded
            | UpstreamUnavailable
            | UpstreamTimeout
            | IdempotencyUnavailable => "api_error",
        }
    }

    pub fn message(&self) -> String {
        use DenyReason::*;
        match self {
            InvalidPath(e) => format!("The request path is not acceptable: {e}."),
            BadRequest(why) => format!("The request is malformed: {why}."),
            HeadTooLarge => "The request's header section is larger than keygate accepts.".into(),
            NotFound => "Nothing is here: ask on /authz (nginx, Traefik) or /authz/<original path> (Envoy).".into(),
            AuthenticationRequired { key_presented: false } => "An API key is required: send it as 'Authorization: Bearer <key>' or in the API key header, once.".into(),
            AuthenticationRequired { key_presented: true } => "The request carries no usable API key: send exactly one well-formed key, as 'Authorization: Bearer <key>' or in the API key header.".into(),
            EnvironmentMismatch => "The API key belongs to another environment.".into(),
            InvalidApiKey => "The API key is not valid.".into(),
            KeyRevoked => "The API key has been revoked.".into(),
            KeyExpired => "The API key has expired.".into(),
            AccountDeactivated => "The account this API key belongs to is deactivated.".into(),
            PartnerSuspended => "The account this API key belongs to is suspended.".into(),
            InsufficientCredits => "The account this API key belongs to has no credits left.".into(),
            IpNotAllowed => "The API key may not be used from this IP address.".into(),
            ReferrerNotAllowed => "The API key may not be used from this referrer or origin.".into(),
            RouteNotAllowed => "The API key may not be used for this route.".into(),
            ScopeRequired(s) => format!("This request requires the '{s}' scope."),
            IdempotencyKeyRequired => "This request must carry an Idempotency-Key header.".into(),
            IdempotencyKeyInUse => "A request with this Idempotency-Key is still in progress; retry once it has completed.".into(),
            IdempotencyKeyReused => "This Idempotency-Key was already used for a different request.".into(),
            RequestTooLarge => "The request body is too large for an idempotent request.".into(),
            CheckTooLarge => "The request is too large for keygate to check (its headers, and any body sent along for the check).".into(),
            IdempotencyUnavailable => "Idempotency keys cannot be checked right now; retry later.".into(),
            RateLimited { .. } => "Too many requests for this API key; retry later.".into(),
            SnapshotUnavailable => "API keys cannot be checked right now; retry later.".into(),
            Overloaded => "keygate holds as many large requests as it may right now; retry shortly.".into(),
            UpstreamUnavailable => "The upstream service is unavailable.".into(),
            UpstreamTimeout => "The upstream service did not answer in time.".into(),
        }
    }

    /// The JSON body of the contract.
    pub fn body(&self, request_id: &str) -> Bytes {
        // Written by hand to keep the contract's field order; every value is escaped by serde.
        let esc = |s: &str| serde_json::to_string(s).expect("a string serializes");
        Bytes::from(format!(
            r#"{{"error":{{"type":{},"code":{},"message":{},"request_id":{}}}}}"#,
            esc(self.error_type()),
            esc(self.code()),
            esc(&self.message()),
            esc(request_id),
        ))
    }

    /// The headers that go with the body: `content-type`, `WWW-Authenticate` on 401 (with
    /// `error="invalid_token"` when a key was presented), `Retry-After` on 429 and 503.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(4);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            DenyReason::AuthenticationRequired {
                key_presented: false,
            } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\""),
                );
            }
            DenyReason::AuthenticationRequired {
                key_presented: true,
            }
            | DenyReason::InvalidApiKey
            | DenyReason::KeyRevoked
            | DenyReason::KeyExpired => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\""),
                );
            }
            DenyReason::RateLimited { retry_after_secs } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from((*retry_after_secs).max(1)),
                );
            }
            DenyReason::SnapshotUnavailable
            | DenyReason::IdempotencyUnavailable
            | DenyReason::Overloaded => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_to_the_contract() {
        let table: &[(DenyReason, u16, &str, &str)] = &[
            (
                DenyReason::InvalidPath(PathError::NotAbsolute),
                400,
                "invalid_path",
                "invalid_request_error",
            ),
            (
                DenyReason::BadRequest("two Content-Length headers"),
                400,
                "invalid_request",
                "invalid_request_error",
            ),
            (
                DenyReason::HeadTooLarge,
                431,
                "invalid_request",
                "invalid_request_error",
            ),
            (
                DenyReason::AuthenticationRequired {
                    key_presented: false,
                },
                401,
                "authentication_required",
                "authentication_error",
            ),
            (
                DenyReason::AuthenticationRequired {
                    key_presented: true,
                },
                401,
                "authentication_required",
                "authentication_error",
            ),
            (
                DenyReason::EnvironmentMismatch,
                403,
                "key_environment_mismatch",
                "permission_error",
            ),
            (
                DenyReason::InvalidApiKey,
                401,
                "invalid_api_key",
                "authentication_error",
            ),
            (
                DenyReason::KeyRevoked,
                401,
                "key_revoked",
                "authentication_error",
            ),
            (
                DenyReason::KeyExpired,
                401,
                "key_expired",
                "authentication_error",
            ),
            (
                DenyReason::AccountDeactivated,
                403,
                "account_deactivated",
                "permission_error",
            ),
            (
                DenyReason::PartnerSuspended,
                403,
                "partner_suspended",
                "permission_error",
            ),
            (
                DenyReason::InsufficientCredits,
                402,
                "insufficient_credits",
                "payment_error",
            ),
            (
                DenyReason::IpNotAllowed,
                403,
                "ip_not_allowed",
                "permission_error",
            ),
            (
                DenyReason::ReferrerNotAllowed,
                403,
                "referrer_not_allowed",
                "permission_error",
            ),
            (
                DenyReason::RouteNotAllowed,
                403,
                "route_not_allowed",
                "permission_error",
            ),
            (
                DenyReason::ScopeRequired("a:b".into()),
                403,
                "scope_required",
                "permission_error",
            ),
            (
                DenyReason::IdempotencyKeyRequired,
                400,
                "idempotency_key_required",
                "invalid_request_error",
            ),
            (
                DenyReason::RateLimited {
                    retry_after_secs: 3,
                },
                429,
                "rate_limited",
                "rate_limit_error",
            ),
            (
                DenyReason::SnapshotUnavailable,
                503,
                "snapshot_unavailable",
                "api_error",
            ),
            (
                DenyReason::UpstreamUnavailable,
                502,
                "upstream_unavailable",
                "api_error",
            ),
            (
                DenyReason::UpstreamTimeout,
                504,
                "upstream_timeout",
                "api_error",
            ),
        ];
        for (reason, status, code, kind) in table {
            assert_eq!(reason.status().as_u16(), *status, "{code}");
            assert_eq!(reason.code(), *code);
            assert_eq!(reason.error_type(), *kind, "{code}");
            let body: serde_json::Value = serde_json::from_slice(&reason.body("req_1")).unwrap();
            assert_eq!(body["error"]["code"], *code);
            assert_eq!(body["error"]["type"], *kind);
            assert_eq!(body["error"]["request_id"], "req_1");
            assert!(body["error"]["message"].as_str().unwrap().len() > 10);
            let h = reason.headers();
            assert_eq!(h[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                h.contains_key(header::WWW_AUTHENTICATE),
                *status == 401,
                "{code}"
            );
            assert_eq!(
                h.contains_key(header::RETRY_AFTER),
                matches!(*status, 429 | 503),
                "{code}"
            );
        }
    }

    #[test]
    fn scope_message_names_the_scope() {
        let m = DenyReason::ScopeRequired("analyses:write".into()).message();
        assert!(m.contains("'analyses:write'"), "{m}");
    }

    #[test]
    fn invalid_token_only_when_a_key_was_presented() {
        let missing = DenyReason::AuthenticationRequired {
            key_presented: false,
        };
        assert_eq!(
            missing.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\""
        );
        let presented = [
            DenyReason::AuthenticationRequired {
                key_presented: true,
            },
            DenyReason::InvalidApiKey,
            DenyReason::KeyRevoked,
            DenyReason::KeyExpired,
        ];
        for reason in presented {
            assert_eq!(
                reason.headers()[header::WWW_AUTHENTICATE],
                "Bearer realm=\"keygate\", error=\"invalid_token\"",
                "{reason:?}"
            );
        }
        // Both are the same code; only the message and the header tell them apart.
        assert_eq!(missing.code(), "authentication_required");
        assert_ne!(
            missing.message(),
            DenyReason::AuthenticationRequired {
                key_presented: true
            }
            .message()
        );
    }
}
