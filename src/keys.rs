//! `keygate keys create | list | revoke`: editing API keys in a `keygate.snapshot/v1` file.
//!
//! This module owns the read-modify-write of the snapshot document on behalf of the
//! operator CLI: minting a key (through [`crate::credential::mint`]), storing only its
//! digest (`sha256:` or, with a pepper, `hmac-sha256:`), adding the partner when it is
//! new, revoking keys, and listing them. It also owns the rendering of what the CLI
//! prints for those commands.
//!
//! What it must never do:
//! - print a secret twice: the secret exists only in [`Created`], whose `Debug` redacts
//!   it, and [`render_created`] emits it exactly once;
//! - print a digest: [`KeySummary`] has no hash field and nothing rendered here reads one;
//! - leave a half-written file: every write goes to a temporary file in the same
//!   directory, is synced, then renamed over the target (and the directory synced);
//!   on any error the original stays untouched and the temporary file is removed;
//! - lose a concurrent edit: each read-modify-write holds an exclusive advisory lock on
//!   the sibling file `<snapshot>.lock`;
//! - drop what it does not understand: unknown fields anywhere in the document are
//!   carried through unchanged.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// The `schema` value of every document this module reads or writes.
pub const SCHEMA: &str = "keygate.snapshot/v1";

/// Characters of the key body shown after the configured prefix in the display prefix.
const DISPLAY_BODY_CHARS: usize = 4;
/// Random base62 characters after `key_` in a key id.
const KEY_ID_CHARS: usize = 12;
const MAX_PREFIX_LEN: usize = 32;

/// Everything that can go wrong; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("invalid --partner {0:?}: use 1 to 128 ASCII letters, digits or _ - . :")]
    InvalidPartner(String),
    #[error("invalid --env {0:?}: use only lowercase letters, digits, '_' or '-' (for example: live, test)")]
    InvalidEnvironment(String),
    #[error("no scopes given: pass at least one, for example --scopes analyses:read")]
    NoScopes,
    #[error("invalid scope {0:?}: use 1 to 128 printable ASCII characters, no spaces or commas")]
    InvalidScope(String),
    #[error(
        "invalid prefix {0:?}: use 1 to 32 ASCII letters, digits or '_' (for example: sk_live_)"
    )]
    InvalidPrefix(String),
    #[error("invalid --name {0:?}: a name is non-empty and has no control characters")]
    InvalidName(String),
    #[error("invalid --org {0:?}: use 1 to 128 ASCII letters, digits or _ - . :")]
    InvalidOrg(String),
    #[error("invalid --expires-at {value:?}: expected an RFC 3339 timestamp such as 2027-01-31T00:00:00Z ({reason})")]
    InvalidExpiry { value: String, reason: String },
    #[error("--expires-at {value} is not in the future (now is {now}): pick a later time")]
    ExpiryNotInFuture { value: String, now: String },
    #[error("--rate-limit must be greater than 0 (leave it out for no per-key limit)")]
    InvalidRateLimit,
    #[error(
        "environment variable {0} is not set: export the pepper there, or leave out --pepper-env"
    )]
    PepperNotSet(String),
    #[error("the pepper is empty: set it to a long random value, or leave out --pepper-env")]
    EmptyPepper,
    #[error(
        "{0} stores its keys as hmac-sha256 digests: pass --pepper-env with the variable holding \
         the sidecar's pepper (a sha256 digest would let a leaked snapshot confirm this key)"
    )]
    PepperNeeded(String),
    #[error(
        "partner {partner} already exists with org_id {existing}, not {given}: \
         leave out --org or pass the partner's own org"
    )]
    OrgMismatch {
        partner: String,
        existing: String,
        given: String,
    },
    #[error(
        "snapshot {path} does not exist: check the path (`keygate keys create` starts a new one)"
    )]
    SnapshotMissing { path: PathBuf },
    #[error("refusing to touch {path}: it is not a {SCHEMA} document ({reason})")]
    NotASnapshot { path: PathBuf, reason: String },
    #[error("snapshot {path} is malformed ({reason}): fix it by hand or restore a backup")]
    Malformed { path: PathBuf, reason: String },
    #[error("no key with id {id} in {path}: `keygate keys list --snapshot {path}` shows the ids")]
    UnknownKey { id: String, path: PathBuf },
    #[error("cannot {action} {path}: {err}")]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("internal error: credential::mint returned a secret that does not start with the prefix {0:?}")]
    MintShape(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KeysError + 'a {
    move |err| KeysError::Io {
        action,
        path: path.to_path_buf(),
        err,
    }
}

/// Inputs of `keygate keys create`.
#[derive(Clone, Default)]
pub struct CreateOptions {
    pub partner: String,
    pub environment: String,
    /// Scope tokens; an entry may also be a comma-separated list.
    pub scopes: Vec<String>,
    /// Defaults to `sk_<environment>_` (with `-` turned into `_`).
    pub prefix: Option<String>,
    /// Defaults to the key id.
    pub name: Option<String>,
    pub org: Option<String>,
    /// RFC 3339; stored normalised to UTC seconds.
    pub expires_at: Option<String>,
    /// `None` stores `null`: no per-key limit.
    pub rate_limit_per_minute: Option<u32>,
    /// If set, the stored digest is `hmac-sha256:` keyed with these bytes.
    pub pepper: Option<Vec<u8>>,
}

impl fmt::Debug for CreateOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateOptions")
            .field("partner", &self.partner)
            .field("environment", &self.environment)
            .field("scopes", &self.scopes)
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("org", &self.org)
            .field("expires_at", &self.expires_at)
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("pepper", &self.pepper.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Reads a pepper for `--pepper-env VAR`: the raw bytes of the variable's value.
/// This is the rule the sidecar's `snapshot.pepper_env` uses, so both sides agree.
pub fn pepper_from_env(var: &str) -> Result<Vec<u8>, KeysError> {
    pepper_from(var, std::env::var_os(var))
}

fn pepper_from(var: &str, value: Option<std::ffi::OsString>) -> Result<Vec<u8>, KeysError> {
    let value = value.ok_or_else(|| KeysError::PepperNotSet(var.to_string()))?;
    let bytes = value.into_encoded_bytes();
    if bytes.is_empty() {
        return Err(KeysError::EmptyPepper);
    }
    Ok(bytes)
}

/// The result of `create`. Holds the only copy of the secret; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct Created {
    pub id: String,
    pub secret: String,
    pub display_prefix: String,
    pub name: String,
    pub partner_id: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revision: u64,
    /// The partner did not exist and was added with status `active`.
    pub partner_added: bool,
    /// The partner's status as stored in the snapshot.
    pub partner_status: String,
}

impl fmt::Debug for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Created")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("display_prefix", &self.display_prefix)
            .field("name", &self.name)
            .field("partner_id", &self.partner_id)
            .field("environment", &self.environment)
            .field("scopes", &self.scopes)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("revision", &self.revision)
            .field("partner_added", &self.partner_added)
            .field("partner_status", &self.partner_status)
            .finish()
    }
}

/// One row of `keys list`: never a secret, never a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySummary {
    pub id: String,
    pub name: Option<String>,
    pub prefix: String,
    pub partner_id: String,
    pub environment: String,
    pub status: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
}

/// The result of `revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revoked {
    pub id: String,
    pub name: Option<String>,
    pub partner_id: String,
    /// The key was revoked before; nothing was written.
    pub already_revoked: bool,
    /// The snapshot's revision after the command.
    pub revision: u64,
}

// ---------------------------------------------------------------------------
// The document. Typed where this module reads or writes a field, with every other
// field kept in `extra`, so a round trip loses nothing. No `Debug`: a record holds a hash.

#[derive(Serialize, Deserialize)]
struct Snapshot {
    schema: String,
    revision: u64,
    #[serde(default)]
    generated_at: Option<String>,
    #[serde(default)]
    partners: Vec<Partner>,
    #[serde(default)]
    keys: Vec<KeyRecord>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A partner entry, read like a key's: only `id` is typed, so a partner a keygate would
/// quarantine (no `status`, an `org_id` that is not text) never stops the tools; every other
/// field is kept as read.
#[derive(Deserialize)]
struct Partner {
    id: String,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

/// The contract's partner fields, in the order a partner is written: the rest follow as read.
const PARTNER_FIELDS: [&str; 2] = ["org_id", "status"];

impl Serialize for Partner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ordered(s, &self.id, &PARTNER_FIELDS, &self.fields)
    }
}

impl Partner {
    fn org_id(&self) -> Option<&str> {
        self.fields.get("org_id").and_then(Value::as_str)
    }

    /// Its status as a keygate reads it: as written when the entry is one a keygate takes,
    /// otherwise why a keygate leaves the partner out (and refuses its keys).
    fn status(&self) -> String {
        const STATUSES: [&str; 4] = ["active", "suspended", "deactivated", "payment_required"];
        let quarantined = |why: String| format!("quarantined by keygate ({why})");
        let status = match self.fields.get("status") {
            Some(Value::String(s)) if STATUSES.contains(&s.as_str()) => s.clone(),
            Some(Value::String(s)) => return quarantined(format!("unknown status {s:?}")),
            None => return quarantined("no status".into()),
            Some(other) => return quarantined(format!("status {other} is not text")),
        };
        match self.fields.get("org_id") {
            None | Some(Value::Null) => status,
            Some(Value::String(org)) if is_id(org) => status,
            Some(other) => quarantined(format!(
                "org_id {other} is not 1-128 of A-Z a-z 0-9 _ - . :"
            )),
        }
    }
}

/// An entry written `id` first, then the contract's fields in its order, then the rest as read.
fn ordered<S: serde::Serializer>(
    s: S,
    id: &str,
    order: &[&str],
    fields: &Map<String, Value>,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(1 + fields.len()))?;
    map.serialize_entry("id", id)?;
    for field in order {
        if let Some(value) = fields.get(*field) {
            map.serialize_entry(field, value)?;
        }
    }
    for (field, value) in fields {
        if field != "id" && !order.contains(&field.as_str()) {
            map.serialize_entry(field, value)?;
        }
    }
    map.end()
}

/// A key entry. Only `id` is read as typed: an entry a keygate would quarantine (a field
/// missing or of the wrong type) is listed with what it has and can be revoked, and never stops
/// the tools from editing the others. Every other field is kept as it was read, absent or
/// `null` alike.
#[derive(Deserialize)]
struct KeyRecord {
    id: String,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

impl KeyRecord {
    /// Whether its digest is keyed with a pepper (`hmac-sha256:`).
    fn is_peppered(&self) -> bool {
        self.fields
            .get("hash")
            .and_then(Value::as_str)
            .is_some_and(|h| h.starts_with("hmac-sha256:"))
    }
}

/// The contract's key fields, in the order a key is written: the rest follow as read.
const KEY_FIELDS: [&str; 9] = [
    "name",
    "prefix",
    "hash",
    "partner_id",
    "environment",
    "scopes",
    "status",
    "created_at",
    "expires_at",
];

impl Serialize for KeyRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ordered(s, &self.id, &KEY_FIELDS, &self.fields)
    }
}

impl KeyRecord {
    /// A field's text, or "" when it is absent or not text.
    fn text(&self, field: &str) -> String {
        self.fields
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    fn optional(&self, field: &str) -> Option<String> {
        self.fields
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn summary(&self) -> KeySummary {
        KeySummary {
            id: self.id.clone(),
            name: self.optional("name"),
            prefix: self.text("prefix"),
            partner_id: self.text("partner_id"),
            environment: self.text("environment"),
            status: self.text("status"),
            scopes: self
                .fields
                .get("scopes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            created_at: self.text("created_at"),
            expires_at: self.optional("expires_at"),
        }
    }
}

// ---------------------------------------------------------------------------
// Commands.

/// `keygate keys create`: mints a key, stores its digest, returns the secret once.
pub fn create(
    snapshot: &Path,
    opts: &CreateOptions,
    now: OffsetDateTime,
) -> Result<Created, KeysError> {
    let input = validate(opts, now)?;
    let now = timestamp(now);

    let target = resolve(snapshot)?;
    let mut lock = lock(&target)?;
    let mut doc = match load(&target)? {
        Some(doc) => doc,
        None => Snapshot {
            schema: SCHEMA.to_string(),
            revision: 0,
            generated_at: None,
            partners: Vec::new(),
            keys: Vec::new(),
            extra: Map::new(),
        },
    };

    // A file whose keys are peppered gets peppered keys only: an unpeppered one added to it
    // would be the one entry a leaked copy can confirm a guess against.
    if opts.pepper.is_none() && doc.keys.iter().any(KeyRecord::is_peppered) {
        return Err(KeysError::PepperNeeded(target.display().to_string()));
    }
    let (partner_added, partner_status) = ensure_partner(&mut doc, &input.partner, &input.org)?;

    let id = loop {
        let candidate = format!(
            "key_{}",
            Alphanumeric.sample_string(&mut rand::rng(), KEY_ID_CHARS)
        );
        if !doc.keys.iter().any(|k| k.id == candidate) {
            break candidate;
        }
    };
    let secret = crate::credential::mint(&input.prefix);
    let body = secret
        .strip_prefix(input.prefix.as_str())
        .filter(|b| b.chars().count() > DISPLAY_BODY_CHARS)
        .ok_or_else(|| KeysError::MintShape(input.prefix.clone()))?;
    let display_prefix = format!(
        "{}{}",
        input.prefix,
        body.chars().take(DISPLAY_BODY_CHARS).collect::<String>()
    );
    let name = input.name.unwrap_or_else(|| id.clone());

    let mut fields = Map::new();
    let mut set = |field: &str, value: Value| fields.insert(field.into(), value);
    set("name", name.clone().into());
    set("prefix", display_prefix.clone().into());
    set("hash", digest(&secret, opts.pepper.as_deref()).into());
    set("partner_id", input.partner.clone().into());
    set("environment", input.environment.clone().into());
    set("scopes", input.scopes.clone().into());
    set("status", "active".into());
    set("created_at", now.clone().into());
    set("expires_at", input.expires_at.clone().into());
    set(
        "rate_limit_per_minute",
        input.rate_limit.map_or(Value::Null, Value::from),
    );
    for field in ["allowed_cidrs", "allowed_referrers", "allowed_routes"] {
        set(field, Value::Array(Vec::new()));
    }
    doc.keys.push(KeyRecord {
        id: id.clone(),
        fields,
    });
    bump(&mut doc, &mut lock, &target, &now)?;
    save(&target, &doc)?;
    lock.note(doc.revision);

    Ok(Created {
        id,
        secret,
        display_prefix,
        name,
        partner_id: input.partner,
        environment: input.environment,
        scopes: input.scopes,
        created_at: now,
        expires_at: input.expires_at,
        revision: doc.revision,
        partner_added,
        partner_status,
    })
}

/// `keygate keys list`: every key in document order, without secrets or digests.
pub fn list(snapshot: &Path) -> Result<Vec<KeySummary>, KeysError> {
    let doc = load(snapshot)?.ok_or_else(|| KeysError::SnapshotMissing {
        path: snapshot.to_path_buf(),
    })?;
    Ok(doc.keys.iter().map(KeyRecord::summary).collect())
}

/// `keygate keys revoke`: marks the key `revoked`. Revoking twice is not an error
/// and does not bump the revision.
pub fn revoke(snapshot: &Path, key_id: &str, now: OffsetDateTime) -> Result<Revoked, KeysError> {
    let now = timestamp(now);
    let target = resolve(snapshot)?;
    let mut lock = lock(&target)?;
    let mut doc = load(&target)?.ok_or_else(|| KeysError::SnapshotMissing {
        path: snapshot.to_path_buf(),
    })?;

    let mut matching = doc.keys.iter_mut().filter(|k| k.id == key_id).peekable();
    let Some(first) = matching.peek() else {
        return Err(KeysError::UnknownKey {
            id: key_id.to_string(),
            path: snapshot.to_path_buf(),
        });
    };
    let name = first.optional("name");
    let partner_id = first.text("partner_id");
    let mut changed = false;
    for key in matching {
        if key.fields.get("status").and_then(Value::as_str) != Some("revoked") {
            key.fields.insert("status".into(), "revoked".into());
            changed = true;
        }
    }
    if changed {
        bump(&mut doc, &mut lock, &target, &now)?;
        save(&target, &doc)?;
        lock.note(doc.revision);
    }
    Ok(Revoked {
        id: key_id.to_string(),
        name,
        partner_id,
        already_revoked: !changed,
        revision: doc.revision,
    })
}

// ---------------------------------------------------------------------------
// Rendering. Returned strings have no trailing newline.

/// What `keys create` prints: the secret appears exactly once.
pub fn render_created(c: &Created, json: bool) -> String {
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            id: &'a str,
            secret: &'a str,
            prefix: &'a str,
            partner_id: &'a str,
            /// The partner's status as a keygate reads it ("active", "suspended", or why it
            /// would be quarantined): a key of a partner not active is refused.
            partner_status: &'a str,
            /// Whether this command added the partner to the file.
            partner_added: bool,
            environment: &'a str,
            scopes: &'a [String],
            created_at: &'a str,
            expires_at: Option<&'a str>,
            revision: u64,
        }
        return to_json(&Out {
            id: &c.id,
            secret: &c.secret,
            prefix: &c.display_prefix,
            partner_id: &c.partner_id,
            partner_status: &c.partner_status,
            partner_added: c.partner_added,
            environment: &c.environment,
            scopes: &c.scopes,
            created_at: &c.created_at,
            expires_at: c.expires_at.as_deref(),
            revision: c.revision,
        });
    }
    let mut out = format!(
        "Created key {} ({}) for partner {} in {}.\n",
        c.id,
        printable(&c.name),
        c.partner_id,
        c.environment
    );
    out += &format!("  prefix:   {}\n", c.display_prefix);
    out += &format!("  scopes:   {}\n", c.scopes.join(","));
    out += &format!("  created:  {}\n", c.created_at);
    out += &format!(
        "  expires:  {}\n",
        c.expires_at.as_deref().unwrap_or("never")
    );
    out += &format!("  snapshot revision {}\n", c.revision);
    if c.partner_added {
        out += &format!("  partner {} added (status active)\n", c.partner_id);
    } else if c.partner_status != "active" {
        out += &format!(
            "  note: partner {} is {}; this key is refused until the partner is active\n",
            c.partner_id,
            printable(&c.partner_status)
        );
    }
    out += "\nSecret (shown once, store it now; it cannot be shown again or recovered):\n";
    out += &c.secret;
    out
}

/// What `keys list` prints: an aligned table, or a JSON array.
pub fn render_list(keys: &[KeySummary], json: bool) -> String {
    if json {
        return to_json(&keys);
    }
    if keys.is_empty() {
        return "no keys".to_string();
    }
    let header = [
        "ID", "NAME", "PREFIX", "PARTNER", "ENV", "STATUS", "SCOPES", "CREATED", "EXPIRES",
    ];
    let rows: Vec<[String; 9]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.name.as_deref().map_or_else(|| "-".to_string(), printable),
                k.prefix.clone(),
                k.partner_id.clone(),
                k.environment.clone(),
                k.status.clone(),
                k.scopes.join(","),
                k.created_at.clone(),
                k.expires_at.clone().unwrap_or_else(|| "never".into()),
            ]
            .map(|cell| printable(&cell))
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            s += &format!("{cell:<w$}  ");
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(&header.map(String::from))];
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

/// What `keys revoke` prints.
pub fn render_revoked(r: &Revoked, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let name = r
        .name
        .as_deref()
        .filter(|n| *n != r.id)
        .map(|n| format!(" ({})", printable(n)))
        .unwrap_or_default();
    if r.already_revoked {
        format!(
            "Key {}{name} was already revoked; snapshot unchanged (revision {}).",
            r.id, r.revision
        )
    } else {
        format!(
            "Revoked key {}{name} of partner {}; snapshot revision {}.",
            r.id, r.partner_id, r.revision
        )
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("plain data serialises")
}

/// Escapes control characters so a stored string cannot break the terminal layout.
fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.escape_default().to_string()
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------
// Validation and digests.

struct Input {
    partner: String,
    environment: String,
    scopes: Vec<String>,
    prefix: String,
    name: Option<String>,
    org: Option<String>,
    expires_at: Option<String>,
    rate_limit: Option<u32>,
}

// These two rules are the ones the snapshot parser applies; an entry breaking them would be
// quarantined by the sidecar, so they are refused here instead.

/// Partner and org ids: 1-128 of `A-Z a-z 0-9 _ - . :`.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Scopes: 1-128 printable ASCII characters other than space and `,`.
fn is_scope(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

fn validate(opts: &CreateOptions, now: OffsetDateTime) -> Result<Input, KeysError> {
    if !is_id(&opts.partner) {
        return Err(KeysError::InvalidPartner(opts.partner.clone()));
    }
    let env = &opts.environment;
    if env.is_empty()
        || !env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(KeysError::InvalidEnvironment(env.clone()));
    }

    let mut scopes = BTreeSet::new();
    for scope in opts.scopes.iter().flat_map(|s| s.split(',')) {
        let scope = scope.trim();
        if !is_scope(scope) {
            return Err(KeysError::InvalidScope(scope.to_string()));
        }
        scopes.insert(scope.to_string());
    }
    if scopes.is_empty() {
        return Err(KeysError::NoScopes);
    }

    let prefix = opts
        .prefix
        .clone()
        .unwrap_or_else(|| format!("sk_{}_", env.replace('-', "_")));
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX_LEN
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(KeysError::InvalidPrefix(prefix));
    }

    if let Some(name) = &opts.name {
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(KeysError::InvalidName(name.clone()));
        }
    }
    if let Some(org) = &opts.org {
        if !is_id(org) {
            return Err(KeysError::InvalidOrg(org.clone()));
        }
    }

    let expires_at = match &opts.expires_at {
        None => None,
        Some(value) => {
            let at =
                OffsetDateTime::parse(value, &Rfc3339).map_err(|e| KeysError::InvalidExpiry {
                    value: value.clone(),
                    reason: e.to_string(),
                })?;
            let stored = try_timestamp(at).map_err(|e| KeysError::InvalidExpiry {
                value: value.clone(),
                reason: e,
            })?;
            if at <= now || stored <= timestamp(now) {
                return Err(KeysError::ExpiryNotInFuture {
                    value: value.clone(),
                    now: timestamp(now),
                });
            }
            Some(stored)
        }
    };

    if opts.rate_limit_per_minute == Some(0) {
        return Err(KeysError::InvalidRateLimit);
    }
    if opts.pepper.as_ref().is_some_and(Vec::is_empty) {
        return Err(KeysError::EmptyPepper);
    }

    Ok(Input {
        partner: opts.partner.clone(),
        environment: env.clone(),
        scopes: scopes.into_iter().collect(),
        prefix,
        name: opts.name.clone(),
        org: opts.org.clone(),
        expires_at,
        rate_limit: opts.rate_limit_per_minute,
    })
}

/// RFC 3339 in UTC, whole seconds, `Z` suffix. Lexicographic order is time order.
fn try_timestamp(t: OffsetDateTime) -> Result<String, String> {
    let t = t
        .checked_to_offset(UtcOffset::UTC)
        .ok_or("out of range in UTC")?;
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).map_err(|e| e.to_string())
}

/// [`try_timestamp`] for the clock, whose year is always within RFC 3339's range.
fn timestamp(t: OffsetDateTime) -> String {
    try_timestamp(t).expect("the current time formats as RFC 3339")
}

/// The stored form of a key's digest.
fn digest(secret: &str, pepper: Option<&[u8]>) -> String {
    match pepper {
        None => format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes()))),
        Some(pepper) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC accepts keys of any length");
            mac.update(secret.as_bytes());
            format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
        }
    }
}

/// Adds the partner if missing; returns (added, status).
fn ensure_partner(
    doc: &mut Snapshot,
    partner: &str,
    org: &Option<String>,
) -> Result<(bool, String), KeysError> {
    if let Some(p) = doc.partners.iter().find(|p| p.id == partner) {
        if let Some(given) = org {
            if p.org_id() != Some(given.as_str()) {
                return Err(KeysError::OrgMismatch {
                    partner: partner.to_string(),
                    existing: match p.fields.get("org_id") {
                        Some(Value::String(o)) => printable(o),
                        None | Some(Value::Null) => "(none)".into(),
                        Some(other) => format!("{} (not text)", printable(&other.to_string())),
                    },
                    given: given.clone(),
                });
            }
        }
        return Ok((false, p.status()));
    }
    let mut fields = Map::new();
    fields.insert("org_id".into(), org.clone().into());
    fields.insert("status".into(), "active".into());
    doc.partners.push(Partner {
        id: partner.to_string(),
        fields,
    });
    Ok((true, "active".into()))
}

/// The next revision: past the file's, and past any these tools wrote before through `lock`
/// (a file restored from a backup, or made again, would otherwise go back to a revision lower
/// than the one a running keygate has in force, which refuses it: an edit, a revocation
/// included, would never take effect).
fn bump(doc: &mut Snapshot, lock: &mut Lock, path: &Path, now: &str) -> Result<(), KeysError> {
    doc.revision = doc
        .revision
        .max(lock.written())
        .checked_add(1)
        .ok_or_else(|| KeysError::Malformed {
            path: path.to_path_buf(),
            reason: "revision is at its maximum".into(),
        })?;
    doc.generated_at = Some(now.to_string());
    Ok(())
}

// ---------------------------------------------------------------------------
// Files: resolve, lock, load, atomic save.

/// The real path of the snapshot (following symlinks), so that every writer locks
/// and replaces the same file whichever path it was given.
fn resolve(path: &Path) -> Result<PathBuf, KeysError> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or_else(|| KeysError::Io {
                action: "use",
                path: path.to_path_buf(),
                err: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
            })?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = fs::canonicalize(parent).map_err(io_err("open directory", parent))?;
            Ok(dir.join(name))
        }
        Err(e) => Err(io_err("open", path)(e)),
    }
}

fn open_private(opts: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// The exclusive advisory lock on `<snapshot>.lock`, held until dropped. The lock file is left
/// in place (removing it would let two writers lock different files), and holds the highest
/// revision written to the snapshot through it.
struct Lock {
    file: File,
    writable: bool,
}

impl Lock {
    /// The highest revision these tools wrote to the snapshot (0: none known).
    fn written(&mut self) -> u64 {
        let mut text = String::new();
        let _ = self
            .file
            .seek(io::SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_string(&mut text));
        // A mark no edit could have reached (another tool's junk) is no mark.
        text.trim()
            .parse()
            .ok()
            .filter(|mark| *mark < u64::MAX / 2)
            .unwrap_or(0)
    }

    /// Note `revision` as written (best effort: a lock file this user may only read keeps its
    /// older mark).
    fn note(&mut self, revision: u64) {
        if self.writable {
            let _ = self
                .file
                .set_len(0)
                .and_then(|()| self.file.seek(io::SeekFrom::Start(0)))
                .and_then(|_| self.file.write_all(format!("{revision}\n").as_bytes()));
        }
    }
}

/// Lock the snapshot `target` for an edit. A lock file this run makes gets the snapshot's owner
/// and mode (so a `sudo` edit does not lock the service account out); one already there is
/// opened as it is, read-only when this user may only read it. Never through a symlink, and
/// only a regular file of one link: whoever may write the directory could otherwise point
/// `keys.json.lock` at another file, which a root edit would hand over and overwrite.
fn lock(target: &Path) -> Result<Lock, KeysError> {
    let mut name = target.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    // Never through a symlink; made (O_EXCL) private, given the snapshot's owner and mode below.
    let open = |write: bool, create: bool| {
        let mut opts = OpenOptions::new();
        opts.read(true).write(write).create_new(create);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
        }
        open_private(&mut opts).open(&path)
    };
    let (file, writable) = match open(true, true) {
        Ok(file) => {
            if let Ok(meta) = fs::metadata(target) {
                keep_owner(&file, &meta);
                let _ = file.set_permissions(meta.permissions());
            }
            (file, true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match open(true, false) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => (
                open(false, false).map_err(io_err("open lock file", &path))?,
                false,
            ),
            Err(e) => return Err(io_err("open lock file", &path)(e)),
        },
        Err(e) => return Err(io_err("create lock file", &path)(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = file
            .metadata()
            .map_err(io_err("inspect lock file", &path))?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(io_err("use lock file", &path)(io::Error::other(
                "not a regular file of its own (one link): remove it",
            )));
        }
    }
    if file.try_lock().is_err() {
        eprintln!(
            "waiting for {}: another keys command is editing the snapshot",
            path.display()
        );
        file.lock().map_err(io_err("lock", &path))?;
    }
    Ok(Lock { file, writable })
}

/// `None` if the file does not exist.
fn load(path: &Path) -> Result<Option<Snapshot>, KeysError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let not_snapshot = |reason: String| KeysError::NotASnapshot {
        path: path.to_path_buf(),
        reason,
    };
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| not_snapshot(format!("not valid JSON: {e}")))?;
    // A field twice in one object: a keygate reads such an entry as broken and leaves it out,
    // but read here the last copy would win and be written back alone (an entry both revoked
    // and active, quarantined, would come back active at an unrelated edit).
    serde_json::from_slice::<NoDuplicates>(&bytes).map_err(|e| KeysError::Malformed {
        path: path.to_path_buf(),
        reason: format!(
            "a field appears twice in one object (line {}, column {}): a keygate leaves such an entry out; fix it by hand before editing with keys",
            e.line(),
            e.column()
        ),
    })?;
    let Value::Object(obj) = &value else {
        return Err(not_snapshot("not a JSON object".into()));
    };
    match obj.get("schema") {
        Some(Value::String(s)) if s == SCHEMA => {}
        // Described as the loader describes it: never echoed if it is not keygate's.
        Some(Value::String(other)) => {
            let shown = crate::snapshot::DocumentError::schema(Some(other));
            return Err(not_snapshot(shown.to_string()));
        }
        Some(_) => return Err(not_snapshot("schema is not a string".into())),
        None => return Err(not_snapshot("no schema field".into())),
    }
    // serde quotes the offending value: a key pasted into the wrong field stays unshown.
    let malformed = |what: String, e: serde_json::Error| KeysError::Malformed {
        path: path.to_path_buf(),
        reason: format!("{what}{}", crate::snapshot::parse::redact(&e)),
    };
    let Value::Object(mut obj) = value else {
        unreachable!("checked above")
    };
    // Each entry on its own, so that a problem names the entry it is in.
    let mut entries = |field: &str| match obj.remove(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => Ok(list),
        Some(_) => Err(malformed(
            String::new(),
            serde::de::Error::custom(format!("{field} is not a list")),
        )),
    };
    let (keys, partners) = (entries("keys")?, entries("partners")?);
    let mut doc: Snapshot =
        serde_json::from_value(Value::Object(obj)).map_err(|e| malformed(String::new(), e))?;
    // Each entry read alone, so that a problem names the entry it is in.
    fn each<T: serde::de::DeserializeOwned>(
        list: Vec<Value>,
        what: &str,
        malformed: &impl Fn(String, serde_json::Error) -> KeysError,
    ) -> Result<Vec<T>, KeysError> {
        list.into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value(v).map_err(|e| malformed(format!("{what} entry {i}: "), e))
            })
            .collect()
    }
    doc.keys = each(keys, "key", &malformed)?;
    doc.partners = each(partners, "partner", &malformed)?;
    Ok(Some(doc))
}

/// Any JSON value, read only to refuse an object holding a field twice.
struct NoDuplicates;

impl<'de> Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicates)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicates {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = BTreeSet::new();
        while let Some(field) = map.next_key::<String>()? {
            if !seen.insert(field) {
                return Err(serde::de::Error::custom("a field appears twice"));
            }
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
}

fn save(target: &Path, doc: &Snapshot) -> Result<(), KeysError> {
    let mut bytes = serde_json::to_vec_pretty(doc).expect("plain data serialises");
    bytes.push(b'\n');
    write_atomic(target, &bytes)
}

/// Replaces `target` with `bytes` so that readers see the old or the new content,
/// never a mix, and the new content survives a crash once this returns `Ok`.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), KeysError> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let existing = match fs::metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("inspect", target)(e)),
    };

    let (tmp_path, mut file) = loop {
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            Alphanumeric.sample_string(&mut rand::rng(), 8)
        ));
        match open_private(OpenOptions::new().write(true).create_new(true)).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create a temporary file in", dir)(e)),
        }
    };

    let written = (|| {
        file.write_all(bytes).map_err(io_err("write", &tmp_path))?;
        if let Some(meta) = &existing {
            keep_owner(&file, meta);
            file.set_permissions(meta.permissions())
                .map_err(io_err("set permissions on", &tmp_path))?;
        }
        file.sync_all().map_err(io_err("sync", &tmp_path))?;
        drop(file);
        fs::rename(&tmp_path, target).map_err(io_err("replace", target))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp_path);
        return Err(e);
    }
    sync_dir(dir)
}

/// Best effort: a snapshot edited by root keeps belonging to the service account.
#[cfg(unix)]
fn keep_owner(file: &File, meta: &fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let same = file
        .metadata()
        .is_ok_and(|m| m.uid() == meta.uid() && m.gid() == meta.gid());
    if !same {
        // The owner only root may give; the group, a member of it too: asked apart, so that
        // a group member's edit keeps the group (the sidecar may read the file through it).
        let _ = std::os::unix::fs::fchown(file, Some(meta.uid()), None);
        let _ = std::os::unix::fs::fchown(file, None, Some(meta.gid()));
    }
}

#[cfg(not(unix))]
fn keep_owner(_: &File, _: &fs::Metadata) {}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), KeysError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(
        "sync directory (the snapshot was replaced but may not be durable)",
        dir,
    ))
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> Result<(), KeysError> {
    Ok(())
}

#[cfg(test)]
#[path = "keys/tests.rs"]
mod tests;
