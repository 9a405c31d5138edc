//! A snapshot document kept as its entries, by id: what a `keygate.sync.v1` hub diffs to make
//! deltas and what a sync client applies them to. Kept only by keygates that serve or follow
//! Watch (the fronts need only the indexed [`super::Snapshot`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::parse::{RawDocument, SCHEMA};
use super::{DocumentError, Snapshot};

/// Entries by id. An id that a document lists twice keeps both entries (and both are then
/// quarantined by the index, as in a file). Entries without a usable id act as absent keys
/// anyway and are not kept.
pub type Entries = BTreeMap<Box<str>, Vec<Box<RawValue>>>;

#[derive(Debug, Clone, Default)]
pub struct Document {
    pub revision: u64,
    pub generated_at: Option<String>,
    pub partners: Entries,
    pub keys: Entries,
}

#[derive(Deserialize)]
struct JustId<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// The `id` of an entry, if it has a string one.
pub fn entry_id(raw: &RawValue) -> Option<Box<str>> {
    serde_json::from_str::<JustId<'_>>(raw.get())
        .ok()
        .map(|j| j.id.into())
}

fn collect(raw: &[&RawValue]) -> Entries {
    let mut found: Vec<(Box<str>, &RawValue)> = raw
        .iter()
        .filter_map(|value| entry_id(value).map(|id| (id, *value)))
        .collect();
    // Stable: the entries of an id keep the document's order. Documents are mostly written in
    // id order already, and a map made from sorted entries is built in one pass instead of
    // one descent per entry.
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut grouped: Vec<(Box<str>, Vec<Box<RawValue>>)> = Vec::with_capacity(found.len());
    for (id, value) in found {
        match grouped.last_mut() {
            Some((last, entries)) if *last == id => entries.push(value.to_owned()),
            _ => grouped.push((id, vec![value.to_owned()])),
        }
    }
    grouped.into_iter().collect()
}

impl Document {
    /// Read a `keygate.snapshot/v1` document (envelope errors only; entries are checked when
    /// indexed).
    pub fn from_json(bytes: &[u8]) -> Result<Self, DocumentError> {
        let env: RawDocument<'_> = serde_json::from_slice(bytes)
            .map_err(|e| DocumentError::Json(format!("line {} column {}", e.line(), e.column())))?;
        match env.schema.as_deref() {
            Some(SCHEMA) => {}
            other => return Err(DocumentError::schema(other)),
        }
        Ok(Self {
            revision: env.revision,
            generated_at: env.generated_at,
            partners: collect(&env.partners),
            keys: collect(&env.keys),
        })
    }

    /// SHA-256 over what the document says: its revision, `generated_at`, and each list's
    /// entries by id (each length-prefixed, so no two documents run together alike). Two
    /// keygates holding the same document compute the same digest however they came by it
    /// (a file, a Full snapshot, deltas): `keygate.sync.v1` resumes a stream only on it.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(&self.revision.to_le_bytes());
        put(self.generated_at.as_deref().unwrap_or("").as_bytes());
        for entries in [&self.partners, &self.keys] {
            put(&(entries.len() as u64).to_le_bytes());
            for (id, values) in entries {
                put(id.as_bytes());
                put(&(values.len() as u64).to_le_bytes());
                for v in values {
                    put(v.get().as_bytes());
                }
            }
        }
        h.finalize().into()
    }

    /// The document as `keygate.snapshot/v1` JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.keys.len() * 320);
        out.extend_from_slice(b"{\"schema\":\"");
        out.extend_from_slice(SCHEMA.as_bytes());
        out.extend_from_slice(format!("\",\"revision\":{}", self.revision).as_bytes());
        if let Some(g) = &self.generated_at {
            out.extend_from_slice(b",\"generated_at\":");
            out.extend_from_slice(&serde_json::to_vec(g).expect("a string serializes"));
        }
        for (name, entries) in [("partners", &self.partners), ("keys", &self.keys)] {
            out.extend_from_slice(format!(",\"{name}\":[").as_bytes());
            let mut first = true;
            for e in entries.values().flatten() {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(e.get().as_bytes());
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}\n");
        out
    }

    /// Index the document (see [`super::build`]), sharing the keys that did not change with
    /// `base`, the snapshot in force, if any.
    pub fn index(&self, pepper: Option<Arc<[u8]>>, base: Option<&Snapshot>) -> Snapshot {
        let partners: Vec<&RawValue> = self.partners.values().flatten().map(|b| &**b).collect();
        let keys: Vec<&RawValue> = self.keys.values().flatten().map(|b| &**b).collect();
        super::parse::build_with_base(
            self.revision,
            self.generated_at.clone(),
            &partners,
            &keys,
            pepper,
            base,
        )
    }
}

/// What changed from one set of entries to the next: ids whose entries differ (with all the new
/// entries for that id, in id order), and ids that are gone (in id order). Both maps are walked
/// once, side by side, in id order.
pub fn diff(old: &Entries, new: &Entries) -> (Vec<Box<RawValue>>, Vec<Box<str>>) {
    let same = |a: &[Box<RawValue>], b: &[Box<RawValue>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.get() == b.get())
    };
    let mut upsert = Vec::new();
    let mut remove = Vec::new();
    let mut olds = old.iter().peekable();
    for (id, entries) in new {
        // The old ids before this one are gone.
        while let Some((gone, _)) = olds.next_if(|(o, _)| *o < id) {
            remove.push(gone.clone());
        }
        let held = olds.next_if(|(o, _)| *o == id);
        if !held.is_some_and(|(_, o)| same(o, entries)) {
            upsert.extend(entries.iter().cloned());
        }
    }
    remove.extend(olds.map(|(gone, _)| gone.clone()));
    (upsert, remove)
}

/// Apply upserts (grouped by id: the entries given for an id replace all held for it) and
/// removals to `entries`. An upserted entry without a usable id is skipped and reported.
pub fn apply(
    entries: &mut Entries,
    upsert: impl IntoIterator<Item = Box<RawValue>>,
    remove: impl IntoIterator<Item = Box<str>>,
) -> usize {
    let mut skipped = 0;
    let mut replaced: BTreeMap<Box<str>, Vec<Box<RawValue>>> = BTreeMap::new();
    for e in upsert {
        match entry_id(&e) {
            Some(id) => replaced.entry(id).or_default().push(e),
            None => skipped += 1,
        }
    }
    for id in remove {
        entries.remove(&id);
    }
    entries.extend(replaced);
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(keys: &[(&str, &str)]) -> Document {
        let keys: Vec<String> = keys
            .iter()
            .map(|(id, status)| format!(r#"{{"id":"{id}","status":"{status}"}}"#))
            .collect();
        let text = format!(
            r#"{{"schema":"keygate.snapshot/v1","revision":3,"partners":[{{"id":"p","status":"active"}}],"keys":[{}]}}"#,
            keys.join(",")
        );
        Document::from_json(text.as_bytes()).unwrap()
    }

    /// The digest follows the content, not how it was come by: the same after a round trip
    /// through JSON and after deltas; another status, revision or `generated_at` changes it.
    #[test]
    fn the_digest_is_the_content() {
        let a = doc(&[("a", "active"), ("b", "active")]);
        let same = Document::from_json(&a.to_json()).unwrap();
        assert_eq!(a.digest(), same.digest());
        let revoked = doc(&[("a", "active"), ("b", "revoked")]);
        assert_ne!(a.digest(), revoked.digest());
        let (upsert, remove) = diff(&a.keys, &revoked.keys);
        let mut patched = a.clone();
        apply(&mut patched.keys, upsert, remove);
        assert_eq!(patched.digest(), revoked.digest());
        let mut later = a.clone();
        later.revision += 1;
        assert_ne!(a.digest(), later.digest());
        let mut stamped = a.clone();
        stamped.generated_at = Some("2026-12-03T00:00:00Z".into());
        assert_ne!(a.digest(), stamped.digest());
        // An id's entries and the next id's cannot be run together alike.
        assert_ne!(
            doc(&[("ab", "active")]).digest(),
            doc(&[("a", "bactive")]).digest()
        );
    }

    #[test]
    fn diff_then_apply_gives_the_new_entries() {
        let old = doc(&[("a", "active"), ("b", "active"), ("c", "active")]);
        let new = doc(&[("a", "active"), ("b", "revoked"), ("d", "active")]);
        let (upsert, remove) = diff(&old.keys, &new.keys);
        let ids: Vec<_> = upsert.iter().map(|e| entry_id(e).unwrap()).collect();
        assert_eq!(ids, vec!["b".into(), "d".into()] as Vec<Box<str>>);
        assert_eq!(remove, vec![Box::<str>::from("c")]);
        let mut held = old.keys.clone();
        assert_eq!(apply(&mut held, upsert, remove), 0);
        let as_text = |e: &Entries| -> Vec<String> {
            e.values().flatten().map(|r| r.get().to_owned()).collect()
        };
        assert_eq!(as_text(&held), as_text(&new.keys));
    }

    #[test]
    fn a_duplicated_id_travels_as_a_group() {
        let old = doc(&[("a", "active")]);
        let new = doc(&[("a", "active"), ("a", "revoked")]);
        let (upsert, remove) = diff(&old.keys, &new.keys);
        assert_eq!(upsert.len(), 2);
        let mut held = old.keys.clone();
        apply(&mut held, upsert, remove);
        assert_eq!(held["a"].len(), 2);
    }

    #[test]
    fn json_round_trip() {
        let d = doc(&[("a", "active"), ("b", "revoked")]);
        let again = Document::from_json(&d.to_json()).unwrap();
        assert_eq!(again.revision, 3);
        assert_eq!(again.keys.len(), 2);
        assert_eq!(again.partners.len(), 1);
        assert!(Document::from_json(b"{\"schema\":\"x\",\"revision\":1}").is_err());
    }

    /// The diff as it was first written, one lookup per id: the walk must say the same.
    fn diff_by_lookup(old: &Entries, new: &Entries) -> (Vec<String>, Vec<Box<str>>) {
        let mut upsert = Vec::new();
        for (id, entries) in new {
            let same = old.get(id).is_some_and(|o| {
                o.len() == entries.len() && o.iter().zip(entries).all(|(a, b)| a.get() == b.get())
            });
            if !same {
                upsert.extend(entries.iter().map(|e| e.get().to_owned()));
            }
        }
        let remove = old
            .keys()
            .filter(|id| !new.contains_key(*id))
            .cloned()
            .collect();
        (upsert, remove)
    }

    proptest::proptest! {
        /// Any two documents (ids from a small set, so that they overlap, repeat and interleave,
        /// in any order): the walk finds what the lookups find, and applying it to the old
        /// entries gives the new ones, grouped in the document's order.
        #[test]
        fn the_walk_finds_what_lookups_find(
            old in proptest::collection::vec((0u8..12, 0u8..3), 0..20),
            new in proptest::collection::vec((0u8..12, 0u8..3), 0..20),
        ) {
            const STATUS: [&str; 3] = ["active", "revoked", "disabled"];
            let as_doc = |entries: &[(u8, u8)]| {
                let ids: Vec<(String, &str)> = entries
                    .iter()
                    .map(|(id, s)| (format!("k{id}"), STATUS[*s as usize]))
                    .collect();
                let borrowed: Vec<(&str, &str)> = ids.iter().map(|(i, s)| (i.as_str(), *s)).collect();
                doc(&borrowed)
            };
            let (old, new) = (as_doc(&old), as_doc(&new));
            let (upsert, remove) = diff(&old.keys, &new.keys);
            let texts: Vec<String> = upsert.iter().map(|e| e.get().to_owned()).collect();
            proptest::prop_assert_eq!((texts, remove.clone()), diff_by_lookup(&old.keys, &new.keys));
            let mut held = old.keys.clone();
            apply(&mut held, upsert, remove);
            let as_text = |e: &Entries| -> Vec<String> {
                e.values().flatten().map(|r| r.get().to_owned()).collect()
            };
            proptest::prop_assert_eq!(as_text(&held), as_text(&new.keys));
        }
    }

    /// Entries of one id stay in the document's order, wherever the id's entries are.
    #[test]
    fn entries_are_grouped_by_id_in_document_order() {
        let d = doc(&[
            ("b", "active"),
            ("a", "active"),
            ("b", "revoked"),
            ("a", "disabled"),
        ]);
        let texts: Vec<Vec<&str>> = d
            .keys
            .values()
            .map(|v| v.iter().map(|r| r.get()).collect())
            .collect();
        assert_eq!(
            texts,
            vec![
                vec![
                    r#"{"id":"a","status":"active"}"#,
                    r#"{"id":"a","status":"disabled"}"#
                ],
                vec![
                    r#"{"id":"b","status":"active"}"#,
                    r#"{"id":"b","status":"revoked"}"#
                ],
            ]
        );
    }
}
