//! What a reload remembers of the document in force: for each key record, a fingerprint of the
//! key entry's exact JSON text it was read from, and where the record is.
//!
//! A reload whose entry has the same text as one the snapshot in force was built from takes
//! that entry's record as it is, without reading the entry again (serde, the checks, the
//! comparison with the record in force): a control plane that rewrites a large document to
//! change a few keys costs a few entries' reading, plus the splitting and fingerprinting of the
//! others. No I/O, no parsing here.
//!
//! Only the text of the entry itself is taken as read: what depends on other entries (the
//! partner, duplicate digests and ids) is checked again on every reload for every key, and the
//! caller does not look here when anything an entry's reading depends on besides its text has
//! changed (the pepper; the positions of partners, environments and scope sets, which a reload
//! keeps from the snapshot in force or does not share with it at all).

use std::hash::Hasher;
use std::sync::OnceLock;

use siphasher::sip128::{Hasher128, SipHasher24};

use super::index::HashIndex;

/// 128 bits of a keyed hash of an entry's text.
///
/// Two texts are taken as the same entry when their fingerprints are equal, so a collision
/// between a changed entry and the record it replaces (a revocation, say) would keep the old
/// record in force. What makes that negligible: the fingerprint is SipHash-2-4 with a 128-bit
/// output, under a 128-bit key drawn from the operating system's random source once per
/// process. SipHash-2-4 is the variant its designers put forward as a pseudorandom function
/// (a MAC), and the best published differential characteristic for it has probability
/// 2⁻²³⁶. Whoever writes the document (even a customer who picks a key's name) would have to
/// aim two texts at one output without knowing the key and without ever seeing an output: no
/// fingerprint leaves the process, is logged, or is compared with anything but another
/// fingerprint. By chance, two texts collide with probability 2⁻¹²⁸: a reload of a million
/// entries against a million fingerprints, with less than 2⁻⁸⁸. (SipHash-1-3, std's, is ~25%
/// cheaper here, but was analysed less; a cryptographic hash would cost about as much as
/// reading the entry on a CPU without SHA extensions, where this costs ~0.2 µs for 400 bytes;
/// keeping the texts to compare would take more memory than the records.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint([u8; 16]);

impl Fingerprint {
    pub fn of(text: &[u8]) -> Self {
        static KEY: OnceLock<[u64; 2]> = OnceLock::new();
        let [k0, k1] = *KEY.get_or_init(rand::random);
        let mut hasher = SipHasher24::new_with_keys(k0, k1);
        hasher.write(text);
        Fingerprint(hasher.finish128().as_bytes())
    }

    /// For the index: pseudorandom already.
    fn hash(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

/// An entry's text, as its fingerprint and length, and where its record is.
#[derive(Clone, Copy)]
pub(super) struct Remembered {
    pub fingerprint: Fingerprint,
    /// Bytes (`u32::MAX` for more: such an entry is then never expected, only found).
    pub len: u32,
    pub chunk: u32,
    /// In the chunk's records.
    pub position: u32,
}

/// The key entries a snapshot's records were read from, in the document's order (the order a
/// reload most likely reads them in again), and found by fingerprint (for the others).
#[derive(Default)]
pub(super) struct Memo {
    entries: Box<[Remembered]>,
    /// Positions in `entries`, by fingerprint.
    index: HashIndex,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// The chunk of an entry no reload may take by its fingerprint.
const FORGOTTEN: u32 = u32::MAX;

impl Memo {
    /// Of the entries of records in force, in the document's order. Two with the same
    /// fingerprint (only by a collision: two entries with the same text have the same digest,
    /// and neither is in force) are forgotten: their entries are read again.
    pub fn new(entries: Vec<Remembered>) -> Self {
        let mut entries = entries.into_boxed_slice();
        let mut index = HashIndex::with_capacity(entries.len());
        let mut collided = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let same = |j: u32| entries[j as usize].fingerprint == e.fingerprint;
            if let Err(first) = index.insert(e.fingerprint.hash(), i as u32, same) {
                collided.extend([first as usize, i]);
            }
        }
        for i in collided {
            entries[i].chunk = FORGOTTEN;
        }
        Memo { entries, index }
    }

    /// Where the entry with this fingerprint is, looked for at `at` first.
    pub fn find(&self, at: usize, fingerprint: &Fingerprint) -> Option<usize> {
        let found = match self.entries.get(at) {
            Some(e) if e.fingerprint == *fingerprint => Some(at),
            _ => self
                .index
                .find(fingerprint.hash(), |i| {
                    self.entries[i as usize].fingerprint == *fingerprint
                })
                .map(|i| i as usize),
        };
        found.filter(|&i| self.entries[i].chunk != FORGOTTEN)
    }

    /// The entry at `at`, unless forgotten.
    pub fn get(&self, at: usize) -> Option<Remembered> {
        self.entries
            .get(at)
            .filter(|e| e.chunk != FORGOTTEN)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remembered(text: &str, position: u32) -> Remembered {
        Remembered {
            fingerprint: Fingerprint::of(text.as_bytes()),
            len: text.len() as u32,
            chunk: 0,
            position,
        }
    }

    #[test]
    fn entries_are_found_where_they_are_looked_for_first_or_by_fingerprint() {
        let memo = Memo::new(vec![
            remembered("a", 0),
            remembered("b", 1),
            remembered("c", 2),
        ]);
        let b = Fingerprint::of(b"b");
        assert_eq!(memo.find(1, &b), Some(1));
        assert_eq!(memo.find(0, &b), Some(1));
        assert_eq!(memo.find(3, &b), Some(1));
        assert_eq!(memo.find(0, &Fingerprint::of(b"d")), None);
        assert_eq!(memo.get(2).unwrap().position, 2);
        // One byte more or less is another text.
        assert_eq!(memo.find(1, &Fingerprint::of(b"b ")), None);
        assert_eq!(memo.find(0, &Fingerprint::of(b"")), None);
    }

    #[test]
    fn two_entries_with_one_fingerprint_are_neither_found() {
        // Only a collision could do this: each might be taken for the other's text.
        let mut twin = remembered("b", 1);
        twin.fingerprint = Fingerprint::of(b"a");
        let memo = Memo::new(vec![remembered("a", 0), twin, remembered("c", 2)]);
        let a = Fingerprint::of(b"a");
        assert_eq!(memo.find(0, &a), None);
        assert_eq!(memo.find(1, &a), None);
        assert_eq!(memo.find(0, &Fingerprint::of(b"c")), Some(2));
        assert!(memo.get(0).is_none() && memo.get(1).is_none());
    }

    #[test]
    fn a_fingerprint_is_of_every_byte() {
        let text = br#"{"id":"key_1","status":"active"}"#;
        let f = Fingerprint::of(text);
        assert!(f == Fingerprint::of(text));
        for at in 0..text.len() {
            for bit in 0..8 {
                let mut flipped = *text;
                flipped[at] ^= 1 << bit;
                assert!(f != Fingerprint::of(&flipped), "byte {at} bit {bit}");
            }
            assert!(f != Fingerprint::of(&text[..at]), "cut at {at}");
        }
    }
}
