//! A hash index of positions in a `Vec` the index does not own: the snapshot's digest lookup
//! and, while a snapshot is built, its duplicate-id check.
//!
//! Each slot is 8 bytes, 32 bits of the hash and a position; the entries themselves (digests,
//! ids) live once, in the records, and the caller says whether a position holds what it looks
//! for. A 1,000,000-key index is 16 MiB where a `HashMap<[u8; 32], u32>` is 74 MiB. Open
//! addressing with linear probing, at most 3/4 full; the stored hash bits spare a look at the
//! record for all but the slots that very likely match.

use std::hash::Hasher;
use std::sync::OnceLock;

use siphasher::sip128::{Hasher128, SipHasher13};

/// A slot: the high 32 bits of the entry's hash, and its position (`EMPTY` when free).
#[derive(Debug, Clone, Copy)]
struct Slot {
    tag: u32,
    position: u32,
}

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Default)]
pub(super) struct HashIndex {
    slots: Box<[Slot]>,
    len: usize,
    /// What it was made for: fewer than `slots`, so a probe always ends at a free slot.
    capacity: usize,
}

impl HashIndex {
    /// An index with room for `entries` positions (below `u32::MAX`).
    pub fn with_capacity(entries: usize) -> Self {
        if entries == 0 {
            return Self::default();
        }
        let slots = (entries + entries / 3 + 1).next_power_of_two();
        let free = Slot {
            tag: 0,
            position: EMPTY,
        };
        Self {
            slots: vec![free; slots].into_boxed_slice(),
            len: 0,
            capacity: entries,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The position of an entry with this `hash` that `is_it` accepts.
    pub fn find(&self, hash: u64, mut is_it: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let (tag, mask) = ((hash >> 32) as u32, self.slots.len() - 1);
        let mut i = hash as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot.position == EMPTY {
                return None;
            }
            if slot.tag == tag && is_it(slot.position) {
                return Some(slot.position);
            }
            i = (i + 1) & mask;
        }
    }

    /// Add `position` under `hash`, unless an entry that `is_same` accepts is there already:
    /// then its position, and nothing is added.
    ///
    /// Panics when more positions are added than the index was made for.
    pub fn insert(
        &mut self,
        hash: u64,
        position: u32,
        mut is_same: impl FnMut(u32) -> bool,
    ) -> Result<(), u32> {
        assert!(position != EMPTY, "HashIndex: position {EMPTY} is reserved");
        let (tag, mask) = ((hash >> 32) as u32, self.slots.len() - 1);
        let mut i = hash as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.position == EMPTY {
                assert!(
                    self.len < self.capacity,
                    "HashIndex: more entries than it was made for"
                );
                *slot = Slot { tag, position };
                self.len += 1;
                return Ok(());
            }
            if slot.tag == tag && is_same(slot.position) {
                return Err(slot.position);
            }
            i = (i + 1) & mask;
        }
    }

    /// What looking up a digest it does not hold costs, summed over every home slot such a
    /// lookup can start from (the slots walked before a free one), and the number of slots: the
    /// sum over each run of `n` occupied slots of `n(n+1)/2`. Their ratio is the mean cost of
    /// an unknown key's lookup, ~3 for an evenly filled index; one run of all the entries makes
    /// it about half of them.
    #[cfg(test)]
    pub fn unknown_lookup_cost(&self) -> (usize, usize) {
        // Start after a free slot (there always is one), so no run is cut in two by the wrap.
        let Some(free) = self.slots.iter().position(|s| s.position == EMPTY) else {
            return (0, self.slots.len());
        };
        let (mut total, mut run) = (0, 0);
        for i in 1..=self.slots.len() {
            if self.slots[(free + i) % self.slots.len()].position == EMPTY {
                total += run * (run + 1) / 2;
                run = 0;
            } else {
                run += 1;
            }
        }
        (total, self.slots.len())
    }
}

/// A digest's hash, in two independent halves: `index`, what a chunk's [`HashIndex`] files it
/// under, and `chunk`, the bits that choose its chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct DigestHash {
    pub index: u64,
    pub chunk: u64,
}

/// The hash of a digest: SipHash-1-3 (128 bits) of all 32 bytes, under a key drawn once per
/// process. Honest digests are uniformly distributed already, but the snapshot's author chooses
/// them: taking their first bytes as the hash would let a document whose digests share those
/// bytes (a fixture's `sha256:00…01`, `…02`, or a crafted one) file every key on one probe
/// chain, and make each load quadratic and each unknown key's lookup a walk through all of
/// them. Stable for the life of the process, so a reload puts a key where it was (~20 ns).
pub(super) fn digest_hash(digest: &[u8; 32]) -> DigestHash {
    static KEY: OnceLock<[u64; 2]> = OnceLock::new();
    let [k0, k1] = *KEY.get_or_init(rand::random);
    let mut hasher = SipHasher13::new_with_keys(k0, k1);
    hasher.write(digest);
    let hash = hasher.finish128();
    DigestHash {
        index: hash.h1,
        chunk: hash.h2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_was_inserted_and_refuses_duplicates() {
        let entries: Vec<u64> = (0..1000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let mut index = HashIndex::with_capacity(entries.len());
        assert!(index.is_empty());
        for (i, &e) in entries.iter().enumerate() {
            assert_eq!(
                index.insert(e, i as u32, |p| entries[p as usize] == e),
                Ok(())
            );
        }
        for (i, &e) in entries.iter().enumerate() {
            assert_eq!(index.find(e, |p| entries[p as usize] == e), Some(i as u32));
            assert_eq!(
                index.insert(e, 0, |p| entries[p as usize] == e),
                Err(i as u32)
            );
        }
        assert_eq!(index.find(7, |p| entries[p as usize] == 7), None);
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_the_caller() {
        // Every entry has the same hash: each probe goes past the others.
        let names = ["a", "b", "c", "d"];
        let mut index = HashIndex::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            assert_eq!(
                index.insert(42, i as u32, |p| names[p as usize] == *n),
                Ok(())
            );
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(index.find(42, |p| names[p as usize] == *n), Some(i as u32));
        }
        assert_eq!(index.find(42, |_| false), None);
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let index = HashIndex::with_capacity(0);
        assert!(index.is_empty());
        assert_eq!(index.find(1, |_| true), None);
    }
}
