//! API-key credentials: the key format keygate mints, prefix classification,
//! and extraction of the presented key from request headers.
//!
//! This module owns:
//! - the key format `<prefix><body><checksum>` ([`mint`], [`checksum`],
//!   [`has_valid_checksum`]);
//! - mapping a key to its configured environment by prefix ([`PrefixRules`]);
//! - finding the one credential a request presents, and where it was found
//!   ([`extract`], [`extract_from_headers`]), for every front (hyper's
//!   `HeaderMap`, Envoy ext_authz's comma-joined header map, forward-auth).
//!
//! It must never do I/O and must never log, print or echo a key: nothing here
//! writes anywhere, and the `Debug` output of [`Credential`] redacts the key.
//! Looking the key up, comparing it against stored hashes and stripping the
//! headers before forwarding belong to other modules.

use std::cmp::Reverse;
use std::fmt;

use http::HeaderName;

use crate::headers::FieldLookup;
use rand::CryptoRng;

/// Number of random base62 characters in a minted key (≈190.5 bits).
pub const BODY_LEN: usize = 32;

/// Number of base62 characters in a key's trailing checksum.
pub const CHECKSUM_LEN: usize = 6;

/// Longest key, in bytes, that [`extract`] accepts.
pub const MAX_KEY_LEN: usize = 512;

/// Base62 digits in ascending value order; the checksum is written with these.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Bytes at or above this are rejected when drawing base62 digits, so that
/// `byte % 62` is uniform (248 = 4 × 62).
const REJECT_FROM: u8 = 248;

/// Checksum of `prefix_and_body`: its CRC-32 (IEEE, as zlib's `crc32`) written
/// in base62, most significant digit first, left-padded with `0` to
/// [`CHECKSUM_LEN`] ASCII characters.
pub fn checksum(prefix_and_body: &str) -> [u8; CHECKSUM_LEN] {
    let mut value = crc32fast::hash(prefix_and_body.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    // 62^6 > 2^32, so six digits always hold the whole value.
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits
}

/// Mints a new key `prefix` + [`BODY_LEN`] random base62 characters +
/// checksum, drawing from rand's OS-seeded CSPRNG (`rand::rng()`).
pub fn mint(prefix: &str) -> String {
    mint_with(prefix, &mut rand::rng())
}

/// [`mint`] with an explicit cryptographically secure generator.
fn mint_with<R: CryptoRng + ?Sized>(prefix: &str, rng: &mut R) -> String {
    let mut key = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
    key.push_str(prefix);
    let mut pool = [0u8; 64];
    let mut written = 0;
    while written < BODY_LEN {
        rng.fill_bytes(&mut pool);
        // Rejection sampling: only bytes below 248 are used, so each of the
        // 62 digits is equally likely.
        for &byte in pool.iter().filter(|&&b| b < REJECT_FROM) {
            if written == BODY_LEN {
                break;
            }
            key.push(char::from(BASE62[usize::from(byte % 62)]));
            written += 1;
        }
    }
    let sum = checksum(&key);
    key.extend(sum.iter().map(|&b| char::from(b)));
    key
}

/// True when `key` is `prefix` + [`BODY_LEN`] base62 chars + the right
/// [`CHECKSUM_LEN`]-char checksum.
///
/// This only tells a well-formed keygate key from a typo or a random string
/// before any lookup; it proves nothing about the key being genuine.
pub fn has_valid_checksum(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let rest = rest.as_bytes();
    if rest.len() != BODY_LEN + CHECKSUM_LEN || !all_bytes(rest, |b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (signed_len, sum) = (key.len() - CHECKSUM_LEN, &rest[BODY_LEN..]);
    // Every byte after the prefix is ASCII, so `signed_len` is a char boundary.
    key.get(..signed_len)
        .is_some_and(|signed| checksum(signed).as_slice() == sum)
}

/// One configured key prefix and what a key carrying it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRule {
    /// The prefix, e.g. `sk_live_`.
    pub prefix: String,
    /// Environment name reported for keys with this prefix, e.g. `live`.
    pub environment: String,
    /// Whether keys with this prefix must pass [`has_valid_checksum`].
    pub checksum: bool,
}

/// The configured prefixes, kept longest first so that the most specific
/// prefix wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixRules {
    rules: Vec<PrefixRule>,
}

impl PrefixRules {
    /// Builds the rule set. Rules are ordered by prefix length, longest first;
    /// among rules with the same prefix the one given first wins. An empty
    /// prefix is allowed and matches every key, after all longer prefixes.
    pub fn new(mut rules: Vec<PrefixRule>) -> Self {
        // Stable sort keeps the configured order among equal lengths.
        rules.sort_by_key(|rule| Reverse(rule.prefix.len()));
        Self { rules }
    }

    /// True when no prefix is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, longest prefix first.
    pub fn rules(&self) -> &[PrefixRule] {
        &self.rules
    }

    /// The rule with the longest configured prefix that `key` starts with.
    pub fn classify(&self, key: &str) -> Option<&PrefixRule> {
        self.rules.iter().find(|rule| key.starts_with(&rule.prefix))
    }
}

/// Where a credential was found, so that it can later be removed from exactly
/// those headers (and no others) before the request is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Found {
    /// The key came from `Authorization: Bearer <key>`.
    pub authorization: bool,
    /// The key came from the API-key header (`X-API-Key` by default).
    pub api_key: bool,
}

/// The outcome of looking for an API key in a request.
///
/// `Debug` is written by hand and never shows the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No key offered: no header, an empty value, `Bearer` without a token, or only other
    /// `Authorization` schemes (`Basic …`, also several of them).
    Missing,
    /// A key was offered, but not exactly one usable key: a malformed value, two different
    /// keys, more than one `Authorization` or API-key value (separate headers, or comma-joined
    /// into one), or a well-formed key next to a malformed one. Answered like [`Missing`], but
    /// the client is told its token was not accepted (RFC 6750 `error="invalid_token"`).
    ///
    /// [`Missing`]: Credential::Missing
    Unusable,
    /// Exactly one key, and the headers it was found in.
    Present {
        /// The key as presented (visible ASCII, no comma, 1..=512 bytes).
        key: &'a str,
        /// Which headers carried it.
        found: Found,
    },
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("Missing"),
            Self::Unusable => f.write_str("Unusable"),
            Self::Present { key, found } => f
                .debug_struct("Present")
                .field("key", &format_args!("<redacted, {} bytes>", key.len()))
                .field("found", found)
                .finish(),
        }
    }
}

/// What one header source (Authorization or API key) contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    /// Not offered: absent, empty, `Bearer` without a token, or another scheme.
    Unused,
    /// Offered but not a valid key (bad byte, too long, inner whitespace).
    Malformed,
    /// More than one value, or a comma inside the value; `offered` when one of them is a
    /// Bearer token (Authorization) or not empty (API key).
    Ambiguous { offered: bool },
    /// One well-formed key.
    Key(&'a str),
}

/// Finds the API key presented in a request, from raw header values.
///
/// `authorization`: every value of the Authorization header; `api_key`: every
/// value of the API-key header. Separate headers are separate values (hyper);
/// Envoy's comma-joined form is one value with commas, and both give the same
/// answer, because any comma in either header makes that source ambiguous.
///
/// Rules:
/// - a key is 1..=512 bytes of visible ASCII (0x21–0x7E) other than `,`;
/// - spaces and tabs around a value are ignored;
/// - `Authorization` counts only with the scheme `Bearer` (any case) followed
///   by spaces/tabs and the key; another scheme (`Basic …`) or `Bearer` with
///   no token is not a credential and is not reported as found;
/// - exactly one key, from one header or the same in both, is
///   [`Credential::Present`];
/// - otherwise, if a key was offered at all (a Bearer token or a non-empty
///   API-key value, well-formed or not, in any value or comma-separated part),
///   [`Credential::Unusable`]: more than one value of either header, a comma in
///   either, two different keys, a malformed value;
/// - otherwise [`Credential::Missing`] (this covers `Basic x, Basic y` and
///   comma-separated auth-params such as `Digest a=1, b=2`).
pub fn extract<'a>(authorization: &[&'a [u8]], api_key: &[&'a [u8]]) -> Credential<'a> {
    let from_authorization = authorization_source(authorization);
    let from_api_key = api_key_source(api_key);
    let found = |authorization, api_key| Found {
        authorization,
        api_key,
    };
    match (from_authorization, from_api_key) {
        (Source::Key(a), Source::Key(b)) if a == b => Credential::Present {
            key: a,
            found: found(true, true),
        },
        (Source::Key(key), Source::Unused) => Credential::Present {
            key,
            found: found(true, false),
        },
        (Source::Unused, Source::Key(key)) => Credential::Present {
            key,
            found: found(false, true),
        },
        (a, b) if a.offered() || b.offered() => Credential::Unusable,
        _ => Credential::Missing,
    }
}

impl Source<'_> {
    /// Whether this source carried anything meant as a key.
    fn offered(self) -> bool {
        match self {
            Source::Unused => false,
            Source::Malformed | Source::Key(_) => true,
            Source::Ambiguous { offered } => offered,
        }
    }
}

/// Names of the headers a credential may arrive in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHeaders {
    /// Carries `Bearer <key>`; `authorization` by default.
    pub authorization: HeaderName,
    /// Carries the bare key; `x-api-key` by default. Should differ from
    /// `authorization`.
    pub api_key: HeaderName,
}

impl Default for CredentialHeaders {
    fn default() -> Self {
        Self {
            authorization: http::header::AUTHORIZATION,
            api_key: HeaderName::from_static("x-api-key"),
        }
    }
}

/// Whether the values of the credential headers after the first two offered a key (see
/// [`extract_first_two`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Beyond {
    /// A later Authorization value holds a Bearer token ([`offers_bearer`]).
    pub authorization: bool,
    /// A later API-key value is not empty ([`offers_api_key`]).
    pub api_key: bool,
}

/// [`extract`] from the first two values of each header, and whether the values after them
/// offered a key: with three values or more no key is usable, but whether one was offered
/// (`error="invalid_token"`) must not depend on where it came, nor on the front (ext_authz
/// gets every value, joined).
pub fn extract_first_two<'a>(
    authorization: &[&'a [u8]],
    api_key: &[&'a [u8]],
    beyond: Beyond,
) -> Credential<'a> {
    match extract(authorization, api_key) {
        Credential::Missing if beyond.authorization || beyond.api_key => Credential::Unusable,
        found => found,
    }
}

/// Whether an Authorization value (or one of its comma-separated parts) holds a Bearer token.
pub fn offers_bearer(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| bearer_token(part).is_some())
}

/// Whether an API-key value (or one of its comma-separated parts) is not empty.
pub fn offers_api_key(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| !trim_ows(part).is_empty())
}

/// [`extract`] over a request's fields (hyper's map, or a head as received), where repeated
/// headers are separate values. Does not allocate: two values per header are read, and the
/// rest only looked at for an offered key.
pub fn extract_from_headers<'a>(
    headers: &'a impl FieldLookup,
    names: &CredentialHeaders,
) -> Credential<'a> {
    let (authorization, authorization_len, more_bearer) =
        first_two(headers, &names.authorization, offers_bearer);
    let (api_key, api_key_len, more_api_key) = first_two(headers, &names.api_key, offers_api_key);
    extract_first_two(
        &authorization[..authorization_len],
        &api_key[..api_key_len],
        Beyond {
            authorization: more_bearer,
            api_key: more_api_key,
        },
    )
}

/// Up to the first two values of `name`, how many there are of those, and whether any later
/// value `offers` a key.
fn first_two<'a>(
    headers: &'a impl FieldLookup,
    name: &HeaderName,
    offers: fn(&[u8]) -> bool,
) -> ([&'a [u8]; 2], usize, bool) {
    let mut values: [&[u8]; 2] = [&[], &[]];
    let mut len = 0;
    let mut later = false;
    for value in headers.values(name) {
        match values.get_mut(len) {
            Some(slot) => {
                *slot = value;
                len += 1;
            }
            None => later = later || offers(value),
        }
    }
    (values, len, later)
}

fn authorization_source<'a>(values: &[&'a [u8]]) -> Source<'a> {
    let value = match values {
        [] => return Source::Unused,
        [value] if !value.contains(&b',') => trim_ows(value),
        _ => {
            let offered = values.iter().any(|value| offers_bearer(value));
            return Source::Ambiguous { offered };
        }
    };
    match bearer_token(value) {
        None => Source::Unused,
        Some(token) => as_key(token).map_or(Source::Malformed, Source::Key),
    }
}

/// The token of `Bearer <token>` (any case, spaces and tabs around it ignored), if `value` has
/// that scheme and a token.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim_ows(value);
    let scheme_len = value.iter().position(|&b| is_ows(b)).unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_len);
    let token = trim_ows(rest);
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

fn api_key_source<'a>(values: &[&'a [u8]]) -> Source<'a> {
    let value = match values {
        [] => return Source::Unused,
        [value] if !value.contains(&b',') => trim_ows(value),
        _ => {
            let offered = values.iter().any(|value| offers_api_key(value));
            return Source::Ambiguous { offered };
        }
    };
    if value.is_empty() {
        Source::Unused
    } else {
        as_key(value).map_or(Source::Malformed, Source::Key)
    }
}

/// `token` as a key, if it meets the key rules.
fn as_key(token: &[u8]) -> Option<&str> {
    let well_formed = !token.is_empty()
        && token.len() <= MAX_KEY_LEN
        && all_bytes(token, |b| b.is_ascii_graphic() & (b != b','));
    if well_formed {
        std::str::from_utf8(token).ok()
    } else {
        None
    }
}

/// Whether `test` holds for every byte of `bytes`. Every byte is looked at, with no early exit,
/// so that the compiler makes a vector loop of it: keys are tens of bytes and nearly always
/// pass, where a loop that may stop at each byte costs several instructions a byte.
fn all_bytes(bytes: &[u8], test: impl Fn(u8) -> bool) -> bool {
    bytes.iter().fold(true, |all, &b| all & test(b))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `value` without leading and trailing spaces and tabs.
fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| !is_ows(b))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};
    use proptest::prelude::*;
    use rand::{CryptoRng, RngCore};

    const AUTH: Found = Found {
        authorization: true,
        api_key: false,
    };
    const API: Found = Found {
        authorization: false,
        api_key: true,
    };
    const BOTH: Found = Found {
        authorization: true,
        api_key: true,
    };

    fn present(key: &str, found: Found) -> Credential<'_> {
        Credential::Present { key, found }
    }

    fn run<'a>(authorization: &[&'a str], api_key: &[&'a str]) -> Credential<'a> {
        let authorization: Vec<&[u8]> = authorization.iter().map(|v| v.as_bytes()).collect();
        let api_key: Vec<&[u8]> = api_key.iter().map(|v| v.as_bytes()).collect();
        extract(&authorization, &api_key)
    }

    #[test]
    fn checksum_vectors_match_zlib_crc32() {
        // Computed with Python: base62(zlib.crc32(s.encode())), 6 digits.
        let cases: &[(&str, &[u8; CHECKSUM_LEN])] = &[
            ("", b"000000"),
            // 0xCBF43926 = 3421780262 = 3·62^5 + 45·62^4 + 35·62^3 + 27·62^2 + 22·62 + 14
            ("123456789", b"3jZRME"),
            ("sk_live_00000000000000000000000000000000", b"2UYg5A"),
            ("sk_test_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", b"2176iF"),
            ("sk_live_0123456789ABCDEFGHIJKLMNOPQRSTUV", b"28hqg7"),
            ("pk_aB3aB3aB3aB3aB3aB3aB3aB3aB3aB3xY", b"1B6Of9"),
        ];
        for (input, want) in cases {
            assert_eq!(&checksum(input), *want, "checksum({input:?})");
        }
    }

    #[test]
    fn checksum_of_largest_crc_fits_six_digits() {
        // 0xFFFFFFFF in base62 is 4gfFC3; no CRC needs a seventh digit.
        assert!(62u64.pow(CHECKSUM_LEN as u32) > u64::from(u32::MAX));
    }

    #[test]
    fn has_valid_checksum_table() {
        let good = "sk_live_000000000000000000000000000000002UYg5A";
        let cases: &[(&str, &str, bool)] = &[
            (good, "sk_live_", true),
            (
                "sk_live_0123456789ABCDEFGHIJKLMNOPQRSTUV28hqg7",
                "sk_live_",
                true,
            ),
            ("000000000000000000000000000000002UYg5A", "", false),
            (good, "sk_test_", false),
            (good, "", false),
            (
                "sk_live_000000000000000000000000000000002UYg5B",
                "sk_live_",
                false,
            ),
            (
                "sk_live_000000000000000000000000000000002uYg5A",
                "sk_live_",
                false,
            ),
            (
                "sk_live_100000000000000000000000000000002UYg5A",
                "sk_live_",
                false,
            ),
            (
                "sk_live_00000000000000000000000000000002UYg5A",
                "sk_live_",
                false,
            ),
            (
                "sk_live_0000000000000000000000000000000002UYg5A",
                "sk_live_",
                false,
            ),
            (
                "sk_live_000000000000000000000000000000002UYg5A ",
                "sk_live_",
                false,
            ),
            (
                "sk_live_0000000000000000000000000000000_2UYg5A",
                "sk_live_",
                false,
            ),
            (
                "sk_live_000000000000000000000000000000é2UYg5A",
                "sk_live_",
                false,
            ),
            ("sk_live_", "sk_live_", false),
            ("", "", false),
        ];
        for (key, prefix, want) in cases {
            assert_eq!(
                has_valid_checksum(key, prefix),
                *want,
                "{key:?} / {prefix:?}"
            );
        }
    }

    #[test]
    fn minted_keys_have_the_format() {
        for prefix in ["sk_live_", "", "pk_", "é_"] {
            let key = mint(prefix);
            assert_eq!(key.len(), prefix.len() + BODY_LEN + CHECKSUM_LEN);
            assert!(key.starts_with(prefix));
            assert!(key[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric()));
            assert!(has_valid_checksum(&key, prefix), "prefix {prefix:?}");
        }
        assert_ne!(mint("sk_"), mint("sk_"));
    }

    /// Replays fixed bytes; marked crypto only to drive `mint_with` in tests.
    struct Replay(Vec<u8>, usize);

    impl RngCore for Replay {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            for d in dst {
                *d = self.0[self.1 % self.0.len()];
                self.1 += 1;
            }
        }
    }

    impl CryptoRng for Replay {}

    #[test]
    fn mint_rejects_biased_bytes() {
        // 248..=255 are skipped; 0 → '0', 61 → 'z', 62 → '0', 247 → 247 % 62 = 61 → 'z'.
        let mut rng = Replay(vec![255, 0, 248, 61, 62, 250, 247, 10], 0);
        let key = mint_with("p_", &mut rng);
        let body = &key[2..2 + BODY_LEN];
        assert_eq!(body, &"0z0zA".repeat(7)[..BODY_LEN]);
        assert!(has_valid_checksum(&key, "p_"));
    }

    #[test]
    fn mint_skips_rejected_bytes_until_it_has_enough() {
        let mut rng = Replay(vec![255; 63].into_iter().chain([5]).collect(), 0);
        let key = mint_with("", &mut rng);
        assert_eq!(&key[..BODY_LEN], "5".repeat(BODY_LEN));
    }

    #[test]
    fn minted_digits_are_roughly_uniform() {
        let mut counts = [0u32; 62];
        let mut rng = rand::rng();
        for _ in 0..400 {
            let key = mint_with("", &mut rng);
            for b in key[..BODY_LEN].bytes() {
                let index = BASE62.iter().position(|&d| d == b).unwrap_or(usize::MAX);
                counts[index] += 1;
            }
        }
        // 12_800 draws, 206.5 expected per digit; the bounds are > 8 sigma wide.
        for (digit, count) in counts.iter().enumerate() {
            assert!((90..=330).contains(count), "digit {digit}: {count}");
        }
    }

    fn rule(prefix: &str, environment: &str) -> PrefixRule {
        PrefixRule {
            prefix: prefix.into(),
            environment: environment.into(),
            checksum: true,
        }
    }

    #[test]
    fn classify_table() {
        let rules = PrefixRules::new(vec![
            rule("sk_", "generic"),
            rule("sk_live_", "live"),
            rule("sk_test_", "test"),
            rule("sk_live_", "shadowed"),
            rule("sk_live_eu_", "live-eu"),
        ]);
        assert!(!rules.is_empty());
        let cases: &[(&str, Option<&str>)] = &[
            ("sk_live_abc", Some("live")),
            ("sk_live_eu_abc", Some("live-eu")),
            ("sk_test_abc", Some("test")),
            ("sk_other", Some("generic")),
            ("sk_", Some("generic")),
            ("sk", None),
            ("SK_live_abc", None),
            ("pk_live_abc", None),
            ("", None),
        ];
        for (key, want) in cases {
            let got = rules.classify(key).map(|r| r.environment.as_str());
            assert_eq!(got, *want, "{key:?}");
        }
        let lengths: Vec<usize> = rules.rules().iter().map(|r| r.prefix.len()).collect();
        assert_eq!(lengths, [11, 8, 8, 8, 3]);
    }

    #[test]
    fn classify_empty_prefix_is_fallback_and_empty_rules_match_nothing() {
        let rules = PrefixRules::new(vec![rule("", "any"), rule("sk_", "sk")]);
        assert_eq!(
            rules.classify("sk_x").map(|r| r.environment.as_str()),
            Some("sk")
        );
        assert_eq!(
            rules.classify("zz").map(|r| r.environment.as_str()),
            Some("any")
        );
        let none = PrefixRules::new(Vec::new());
        assert!(none.is_empty());
        assert_eq!(none.classify("sk_x"), None);
    }

    #[test]
    fn extract_authorization_only() {
        let long_ok = "k".repeat(MAX_KEY_LEN);
        let long_bad = "k".repeat(MAX_KEY_LEN + 1);
        let bearer_ok = format!("Bearer {long_ok}");
        let bearer_bad = format!("Bearer {long_bad}");
        let cases: &[(&[&str], Credential)] = &[
            (&[], Credential::Missing),
            (&["Bearer abc"], present("abc", AUTH)),
            (&["bearer abc"], present("abc", AUTH)),
            (&["BEARER abc"], present("abc", AUTH)),
            (&["BeArEr abc"], present("abc", AUTH)),
            (&["Bearer\tabc"], present("abc", AUTH)),
            (&["Bearer \t  abc"], present("abc", AUTH)),
            (&[" \tBearer abc \t"], present("abc", AUTH)),
            (
                &["Bearer sk_live_x!~\"#$%&'()*+-./:;<=>?@[\\]^_`{|}"],
                present("sk_live_x!~\"#$%&'()*+-./:;<=>?@[\\]^_`{|}", AUTH),
            ),
            (&[&bearer_ok], present(&long_ok, AUTH)),
            (&[&bearer_bad], Credential::Unusable),
            (&[""], Credential::Missing),
            (&["   "], Credential::Missing),
            (&["Bearer"], Credential::Missing),
            (&["Bearer "], Credential::Missing),
            (&["Bearer \t  "], Credential::Missing),
            (&["Basic dXNlcjpwYXNz"], Credential::Missing),
            (&["Token abc"], Credential::Missing),
            (&["abc"], Credential::Missing),
            (&["Bearerabc"], Credential::Missing),
            (&["Bearer: abc"], Credential::Missing),
            (&["Bearer a b"], Credential::Unusable),
            (&["Bearer a\tb"], Credential::Unusable),
            (&["Bearer ké"], Credential::Unusable),
            (&["Bearer a\u{7f}"], Credential::Unusable),
            (&["Bearer a\rb"], Credential::Unusable),
            (&["Bearer a,b"], Credential::Unusable),
            (&["Bearer a,"], Credential::Unusable),
            (&["Bearer a, Bearer b"], Credential::Unusable),
            (&["Bearer a, Bearer a"], Credential::Unusable),
            (&["Basic x, Bearer a"], Credential::Unusable),
            (&["Digest a=1, b=2"], Credential::Missing),
            (&[",Bearer a"], Credential::Unusable),
            (&["Bearer a", "Bearer a"], Credential::Unusable),
            (&["Bearer a", "Bearer b"], Credential::Unusable),
            (&["Bearer a", "Basic x"], Credential::Unusable),
            (&["Basic x", "Basic y"], Credential::Missing),
            (&["Basic x", ""], Credential::Missing),
            (&["Bearer", "Bearer \t"], Credential::Missing),
            (&["Bearer ,x"], Credential::Missing),
            (&["", "Bearer a"], Credential::Unusable),
        ];
        for (authorization, want) in cases {
            assert_eq!(
                run(authorization, &[]),
                *want,
                "Authorization {authorization:?}"
            );
        }
    }

    #[test]
    fn extract_api_key_only() {
        let long_ok = "k".repeat(MAX_KEY_LEN);
        let long_bad = "k".repeat(MAX_KEY_LEN + 1);
        let cases: &[(&[&str], Credential)] = &[
            (&["abc"], present("abc", API)),
            (&[" \tabc\t "], present("abc", API)),
            (&["Bearer"], present("Bearer", API)),
            (&[&long_ok], present(&long_ok, API)),
            (&[&long_bad], Credential::Unusable),
            (&[""], Credential::Missing),
            (&[" \t"], Credential::Missing),
            (&[" , "], Credential::Missing),
            (&["", ""], Credential::Missing),
            (&["Bearer abc"], Credential::Unusable),
            (&["a b"], Credential::Unusable),
            (&["aé"], Credential::Unusable),
            (&["a\0b"], Credential::Unusable),
            (&["a,b"], Credential::Unusable),
            (&["abc,"], Credential::Unusable),
            (&[",abc"], Credential::Unusable),
            (&["abc, abc"], Credential::Unusable),
            (&["a b,c"], Credential::Unusable),
            (&["abc", "abc"], Credential::Unusable),
            (&["abc", "def"], Credential::Unusable),
            (&["abc", ""], Credential::Unusable),
        ];
        for (api_key, want) in cases {
            assert_eq!(run(&[], api_key), *want, "X-API-Key {api_key:?}");
        }
    }

    #[test]
    fn extract_both_sources() {
        type Case<'a> = (&'a [&'a str], &'a [&'a str], Credential<'a>);
        let cases: &[Case] = &[
            (&["Bearer abc"], &["abc"], present("abc", BOTH)),
            (&["bearer  abc "], &[" abc"], present("abc", BOTH)),
            (&["Bearer abc"], &["ABC"], Credential::Unusable),
            (&["Bearer abc"], &["def"], Credential::Unusable),
            // A non-Bearer Authorization is left alone; the API key is used.
            (&["Basic dXNlcjpwYXNz"], &["abc"], present("abc", API)),
            // A second source that was not offered does not block the first.
            (&["Bearer abc"], &[""], present("abc", AUTH)),
            (&["Bearer"], &["abc"], present("abc", API)),
            (&[""], &["abc"], present("abc", API)),
            // A second source that was offered but malformed does.
            (&["Bearer abc"], &["a b"], Credential::Unusable),
            (&["Bearer a b"], &["abc"], Credential::Unusable),
            (&["Bearer abc"], &["abcé"], Credential::Unusable),
            (&["Bearer a b"], &["c d"], Credential::Unusable),
            (&["Basic x"], &["c d"], Credential::Unusable),
            (&["Basic x"], &[""], Credential::Missing),
            // Any ambiguity wins.
            (&["Bearer abc"], &["abc,abc"], Credential::Unusable),
            (
                &["Bearer abc", "Bearer abc"],
                &["abc"],
                Credential::Unusable,
            ),
            (&["Bearer abc"], &["abc", "abc"], Credential::Unusable),
            (&["Digest a=1, b=2"], &["abc"], Credential::Unusable),
            (&["Bearer a,b"], &["c d"], Credential::Unusable),
        ];
        for (authorization, api_key, want) in cases {
            assert_eq!(
                run(authorization, api_key),
                *want,
                "Authorization {authorization:?}, X-API-Key {api_key:?}"
            );
        }
    }

    fn map(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            let value = HeaderValue::from_bytes(value).expect("test header value");
            headers.append(HeaderName::from_static(name), value);
        }
        headers
    }

    #[test]
    fn extract_from_header_map() {
        let names = CredentialHeaders::default();
        type Case<'a> = (&'a [(&'static str, &'a [u8])], Credential<'static>);
        let cases: &[Case] = &[
            (&[], Credential::Missing),
            (&[("authorization", b"Bearer abc")], present("abc", AUTH)),
            (&[("x-api-key", b"abc")], present("abc", API)),
            (
                &[("authorization", b"Bearer abc"), ("x-api-key", b"abc")],
                present("abc", BOTH),
            ),
            (
                &[
                    ("authorization", b"Bearer abc"),
                    ("authorization", b"Bearer abc"),
                ],
                Credential::Unusable,
            ),
            (
                &[
                    ("x-api-key", b"a"),
                    ("x-api-key", b"a"),
                    ("x-api-key", b"a"),
                ],
                Credential::Unusable,
            ),
            (&[("x-api-key", b"ab\xff")], Credential::Unusable),
            (
                &[("authorization", b"Bearer \xc3\xa9")],
                Credential::Unusable,
            ),
            (
                &[("authorization", b"Basic x"), ("x-api-key", b"abc")],
                present("abc", API),
            ),
            (&[("x-other-key", b"abc")], Credential::Missing),
            // Only two values are kept; a key offered in a later one still counts as offered.
            (
                &[
                    ("authorization", b"Basic x"),
                    ("authorization", b"Basic y"),
                    ("authorization", b"Bearer abc"),
                ],
                Credential::Unusable,
            ),
            (
                &[
                    ("authorization", b"Basic x"),
                    ("authorization", b"Basic y"),
                    ("authorization", b"Basic z"),
                ],
                Credential::Missing,
            ),
            (
                &[
                    ("x-api-key", b""),
                    ("x-api-key", b" "),
                    ("x-api-key", b"abc"),
                ],
                Credential::Unusable,
            ),
            (
                &[("x-api-key", b""), ("x-api-key", b""), ("x-api-key", b",")],
                Credential::Missing,
            ),
        ];
        for (pairs, want) in cases {
            let headers = map(pairs);
            assert_eq!(extract_from_headers(&headers, &names), *want, "{pairs:?}");
        }
    }

    #[test]
    fn extract_from_header_map_with_custom_names() {
        let names = CredentialHeaders {
            authorization: HeaderName::from_static("proxy-authorization"),
            api_key: HeaderName::from_static("x-keygate-key"),
        };
        let headers = map(&[
            ("authorization", b"Bearer other"),
            ("x-keygate-key", b"abc"),
        ]);
        assert_eq!(extract_from_headers(&headers, &names), present("abc", API));
        let headers = map(&[
            ("proxy-authorization", b"Bearer abc"),
            ("x-api-key", b"zzz"),
        ]);
        assert_eq!(extract_from_headers(&headers, &names), present("abc", AUTH));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let shown = format!("{:?}", present("sk_live_secret", BOTH));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("14 bytes"), "{shown}");
        assert_eq!(format!("{:?}", Credential::Missing), "Missing");
        assert_eq!(format!("{:?}", Credential::Unusable), "Unusable");
    }

    /// Values that look like header values: arbitrary bytes, or near-misses
    /// of the Bearer syntax.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            "[ \t]{0,2}(?i:bearer)?[ \t]{0,3}[!-~ ,é]{0,12}[ \t]{0,2}".prop_map(String::into_bytes),
            "(Bearer )?(ab|cd)".prop_map(String::into_bytes),
        ]
    }

    /// All the values of one header: mostly none or one, sometimes two.
    fn values() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop_oneof![
            1 => Just(Vec::new()),
            3 => proptest::collection::vec(header_value(), 1..=1),
            1 => proptest::collection::vec(header_value(), 2..=2),
        ]
    }

    /// True when `part` points into `whole` (a sub-slice, not just equal text).
    fn within(part: &str, whole: &[u8]) -> bool {
        let (part, whole) = (part.as_bytes().as_ptr_range(), whole.as_ptr_range());
        whole.start <= part.start && part.end <= whole.end
    }

    proptest! {
        #[test]
        fn extract_never_panics_and_keys_come_from_inputs(auth in values(), api in values()) {
            let auth_refs: Vec<&[u8]> = auth.iter().map(Vec::as_slice).collect();
            let api_refs: Vec<&[u8]> = api.iter().map(Vec::as_slice).collect();
            if let Credential::Present { key, found } = extract(&auth_refs, &api_refs) {
                prop_assert!(!key.is_empty() && key.len() <= MAX_KEY_LEN);
                prop_assert!(key.bytes().all(|b| b.is_ascii_graphic() && b != b','));
                prop_assert!(found.authorization || found.api_key);
                prop_assert!(auth.iter().chain(&api).any(|value| within(key, value)));
                prop_assert!(!found.authorization
                    || (auth.len() == 1 && trim_ows(&auth[0]).ends_with(key.as_bytes())));
                prop_assert!(!found.api_key || (api.len() == 1 && trim_ows(&api[0]) == key.as_bytes()));
            }
        }

        #[test]
        fn envoy_comma_joined_values_agree_with_separate_headers(auth in values(), api in values()) {
            let auth_refs: Vec<&[u8]> = auth.iter().map(Vec::as_slice).collect();
            let api_refs: Vec<&[u8]> = api.iter().map(Vec::as_slice).collect();
            let auth_joined = auth.join(&b","[..]);
            let api_joined = api.join(&b","[..]);
            let auth_envoy: Vec<&[u8]> = if auth.is_empty() { vec![] } else { vec![&auth_joined] };
            let api_envoy: Vec<&[u8]> = if api.is_empty() { vec![] } else { vec![&api_joined] };
            prop_assert_eq!(extract(&auth_refs, &api_refs), extract(&auth_envoy, &api_envoy));
        }

        #[test]
        fn minted_keys_validate_and_any_one_char_change_is_caught(
            prefix in "[a-z_]{0,10}",
            index in 0usize..(BODY_LEN + CHECKSUM_LEN),
            replacement in proptest::sample::select(BASE62.to_vec()),
        ) {
            let key = mint(&prefix);
            prop_assert!(has_valid_checksum(&key, &prefix));
            let mut bytes = key.clone().into_bytes();
            let at = prefix.len() + index;
            prop_assume!(bytes[at] != replacement);
            bytes[at] = replacement;
            let changed = String::from_utf8(bytes).expect("ASCII edit");
            prop_assert!(!has_valid_checksum(&changed, &prefix));
        }

        #[test]
        fn has_valid_checksum_never_panics(key in "\\PC{0,50}", prefix in "\\PC{0,10}") {
            let _ = has_valid_checksum(&key, &prefix);
        }
    }
}
