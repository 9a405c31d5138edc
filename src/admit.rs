//! Between a request's facts and its answer, the same on every front: the decision (checks
//! 0–11, [`decide_attributed`]), the key's rate limit (check 12), and what is counted of them
//! (per-key usage; the request's [`Note`], for `/metrics` and the decision log). The fronts
//! only translate: facts in, and [`Admitted`] or [`Refused`] out to their own wire.

use crate::config::Policy;
use crate::decision::{decide_attributed, Allow, RequestFacts, Verdict};
use crate::deny::DenyReason;
use crate::ratelimit::{Outcome, RateLimits, Status};
use crate::snapshot::Snapshot;
use crate::telemetry::Note;
use crate::usage::Usage;

/// An allowed request, with its key's `X-RateLimit-*` values when the key has a quota.
pub struct Admitted<'s> {
    pub allow: Allow<'s>,
    pub limit: Option<Status>,
}

/// A refused request: why, and the key's `X-RateLimit-*` values when the rate limit refused it.
pub struct Refused {
    pub reason: DenyReason,
    pub limit: Option<Status>,
}

/// Decides the request, applies its key's rate limit when allowed, and counts the outcome once:
/// the key (and partner) the request was decided for and the verdict go into `note`, and the
/// key's usage into `usage`. `snapshot` is `None` when none may be served.
pub async fn admit<'s>(
    snapshot: Option<&'s Snapshot>,
    policy: &Policy,
    facts: &RequestFacts<'_>,
    now_ms: i64,
    limits: &RateLimits,
    usage: &Usage,
    note: &mut Note,
) -> Result<Admitted<'s>, Refused> {
    let (verdict, key) = decide_attributed(snapshot, policy, facts, now_ms);
    let allow = match verdict {
        Verdict::Allow(allow) => allow,
        Verdict::Deny(reason) => {
            usage.denied(key, &reason);
            note.deny(&reason);
            if let Some(k) = key {
                note.key(&k.id_header, None);
            }
            return Err(Refused {
                reason,
                limit: None,
            });
        }
    };
    // Noted before the rate limit's wait, for a client that leaves during it (499).
    note.key(&allow.key.id_header, Some(&allow.partner.id_header));
    let limit = match limits.check(&allow).await.map(Outcome::verdict) {
        Some(Err((reason, status))) => {
            usage.denied(Some(allow.key), &reason);
            note.deny(&reason);
            return Err(Refused {
                reason,
                limit: Some(status),
            });
        }
        Some(Ok(status)) => Some(status),
        None => None,
    };
    note.allow();
    usage.allowed(allow.key, now_ms);
    Ok(Admitted { allow, limit })
}
