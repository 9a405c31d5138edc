//! `x-request-id`: keep the caller's when it is well formed, otherwise mint one. Well formed means
//! 1–128 characters of `A-Z a-z 0-9 - _ . : /`, so it is safe in a header, a log line and a JSON
//! body without escaping.

use http::HeaderValue;
use rand::Rng;

use crate::credential::PrefixRules;

/// The caller's id if exactly one, well-formed value was sent that does not look like a key:
/// neither starting with one of the configured key prefixes nor ending in the checksum of the
/// contract's key format. An id is logged, echoed and forwarded, and a key put in the wrong
/// header by mistake must not be.
pub fn accept<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
    prefixes: &PrefixRules,
) -> Option<HeaderValue> {
    let first = values.next()?;
    if values.next().is_some() || !acceptable(first, prefixes) {
        return None;
    }
    HeaderValue::from_bytes(first).ok()
}

/// Well formed and not key-like (see [`accept`]).
pub fn acceptable(v: &[u8], prefixes: &PrefixRules) -> bool {
    is_well_formed(v)
        && std::str::from_utf8(v)
            .is_ok_and(|id| prefixes.classify(id).is_none() && !ends_in_its_checksum(id))
}

/// Whether `id` ends in the contract's checksum of what comes before it: a key in the
/// contract's format, whatever its prefix, and whether or not `[[key_prefixes]]` are configured.
/// (Any other id does by a chance of one in 62⁶, about 2·10⁻¹¹.)
fn ends_in_its_checksum(id: &str) -> bool {
    use crate::credential::{checksum, CHECKSUM_LEN};
    id.len() > CHECKSUM_LEN + 8 && {
        let (rest, sum) = id.split_at(id.len() - CHECKSUM_LEN);
        checksum(rest) == sum.as_bytes()
    }
}

pub fn is_well_formed(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// A new id: 128 random bits as 32 lowercase hex digits, in one reference-counted allocation
/// (an id is kept for the log and sent on, so it is cloned: a `Bytes` made from a copied slice
/// would allocate again, and move its bytes, at its first clone).
pub fn mint() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::rng().random();
    let mut buf = [0u8; 32];
    for (pair, byte) in buf.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> PrefixRules {
        PrefixRules::new(Vec::new())
    }

    #[test]
    fn accepts_only_one_well_formed_value() {
        let ok = HeaderValue::from_static("req-123_abc.def:1/2");
        let accept = |v: &mut dyn Iterator<Item = &HeaderValue>| {
            super::accept(v.map(HeaderValue::as_bytes), &none())
        };
        assert_eq!(accept(&mut [&ok].into_iter()), Some(ok.clone()));
        let table: &[&[u8]] = &[b"", b"has space", b"quote\"", b"<script>", &[b'a'; 129]];
        for bad in table {
            let v = HeaderValue::from_bytes(bad).unwrap_or(HeaderValue::from_static(" "));
            assert_eq!(accept(&mut [&v].into_iter()), None, "{bad:?}");
        }
        assert_eq!(
            accept(&mut [&ok, &ok].into_iter()),
            None,
            "two values are not one id"
        );
        assert_eq!(accept(&mut std::iter::empty()), None);
    }

    /// A key sent as the request id by mistake is not kept (it would be logged and forwarded).
    #[test]
    fn refuses_ids_that_start_like_a_key() {
        let prefixes = PrefixRules::new(vec![crate::credential::PrefixRule {
            prefix: "sk_live_".into(),
            environment: "live".into(),
            checksum: true,
        }]);
        let key = HeaderValue::from_str(&crate::credential::mint("sk_live_")).unwrap();
        assert_eq!(accept([key.as_bytes()].into_iter(), &prefixes), None);
        let id = HeaderValue::from_static("sk_test_not_ours-123");
        assert_eq!(
            accept([id.as_bytes()].into_iter(), &prefixes),
            Some(id.clone())
        );
        assert!(!acceptable(key.as_bytes(), &prefixes));
    }

    /// With no `[[key_prefixes]]` at all, a key in the contract's format is still known by
    /// its checksum, whatever its prefix.
    #[test]
    fn refuses_ids_that_end_in_a_keys_checksum() {
        for prefix in ["sk_live_", "pk_", "anything-"] {
            let key = crate::credential::mint(prefix);
            assert_eq!(accept([key.as_bytes()].into_iter(), &none()), None, "{key}");
            // The same with one character changed is someone's id.
            let mut other = key.into_bytes();
            other[prefix.len()] = if other[prefix.len()] == b'a' {
                b'b'
            } else {
                b'a'
            };
            assert!(acceptable(&other, &none()));
        }
        for id in [
            "9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e",
            "req-123",
            "a1b2c3d4e5f6a7b8c9",
        ] {
            assert!(acceptable(id.as_bytes(), &none()), "{id}");
        }
        assert!(acceptable(mint().as_bytes(), &none()));
    }

    #[test]
    fn minted_ids_are_well_formed_and_distinct() {
        let a = mint();
        let b = mint();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(is_well_formed(a.as_bytes()));
    }
}
