//! The translator's index of block starts: what runs the code at a guest RIP.
//!
//! Keyed by (RIP, guest-physical page); an entry counts the interpreted runs of a block start
//! until it is hot, then records its translation (or that its first instruction is not
//! translated) under the page's write generation. The run loop looks an entry up after every
//! exit from translated code, so the common case must touch one host cache line:
//!
//! * a 2-way set-associative table of 32-byte entries, a set per 64-byte line (512 KiB), the
//!   most recently used way first;
//! * behind it a hash map of the entries pushed out of the table ("victims"), consulted only
//!   when the table misses. A block start that loses its way keeps its heat and its
//!   translation: a direct-mapped table reset both whenever two starts shared a slot (345 K
//!   times on a boot), so the code was translated again and cold blocks never got hot.
//!
//! Hand-written rather than a crate's map: the front table's layout (one line per set, the
//! fields the run loop compares first) is the point; the victim map is std's `HashMap` with a
//! multiply-rotate hasher for its integer keys (SipHash showed up at 1.2 % of a boot's
//! profile; the keys are guest addresses, not attacker-chosen strings, and a collision costs
//! only time).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hv_emu_jit_rt::CodeRef;

/// `Entry::heat` of an entry whose translation (or untranslatability) is recorded.
pub(super) const RESOLVED: u16 = u16::MAX;
/// `Entry::chk` of a resolved entry whose first instruction is not translated.
pub(super) const UNTRANSLATED: u16 = u16::MAX;
/// Flag in a resolved entry's `chk`: the block's last instruction crosses into the next page
/// (the run loop checks that page's translation before using it; the rest is the offset).
pub(super) const XPAGE: u16 = 0x8000;
/// `Entry::page` of an empty way (the code tracker never tracks that page: it stops at 2^28).
const NO_PAGE: u32 = u32::MAX;
const SETS: usize = 1 << 13;
/// Entries the victim map holds at most (about 6 MiB); it is emptied when full.
const VICTIMS_CAP: usize = 1 << 17;

/// One block start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub rip: u64,
    /// The translation ([`CodeRef::NONE`] while there is none).
    pub code: CodeRef,
    /// Guest-physical page number of `rip`.
    pub page: u32,
    /// The page's write generation the resolution was made under.
    pub generation: u32,
    /// How many bytes the translation's chained entry lies before `code`, where the run loop
    /// enters it ([`UNTRANSLATED`]: the first instruction is not translated).
    pub chk: u16,
    /// Interpreted runs so far, [`RESOLVED`] once translated (or found untranslatable).
    pub heat: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

impl Entry {
    fn new(rip: u64, page: u32) -> Entry {
        Entry {
            rip,
            code: CodeRef::NONE,
            page,
            generation: 0,
            chk: UNTRANSLATED,
            heat: 0,
        }
    }

    const EMPTY: Entry = Entry {
        rip: 0,
        code: CodeRef::NONE,
        page: NO_PAGE,
        generation: 0,
        chk: UNTRANSLATED,
        heat: 0,
    };
}

/// FxHash's step (rustc's hasher): rotate, xor, multiply by a 64-bit odd constant.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Victims = HashMap<(u64, u32), Entry, BuildHasherDefault<KeyHasher>>;

/// Two ways in one host cache line; way 0 is the most recently used.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Set([Entry; 2]);

/// Counters of the index (for the translator's `Stats`).
#[derive(Clone, Copy, Default, Debug)]
pub(super) struct IndexStats {
    /// Entries pushed out of the table into the victim map.
    pub evictions: u64,
    /// Entries found in the victim map and brought back.
    pub recalls: u64,
    /// Times the victim map was full and emptied.
    pub victim_flushes: u64,
}

pub(super) struct Index {
    sets: Vec<Set>,
    victims: Victims,
    pub stats: IndexStats,
}

#[inline]
fn set_of(rip: u64) -> usize {
    crate::decode::rip_hash(rip) & (SETS - 1)
}

impl Index {
    pub fn new() -> Index {
        Index {
            sets: vec![Set([Entry::EMPTY; 2]); SETS],
            victims: Victims::default(),
            stats: IndexStats::default(),
        }
    }

    /// Forgets every block start.
    pub fn clear(&mut self) {
        self.sets.fill(Set([Entry::EMPTY; 2]));
        self.victims = Victims::default();
    }

    /// The entry of (`rip`, `page`), a new one (heat 0, unresolved) if there is none. `None`
    /// only for a page the index cannot hold (at or above 2^32; the code tracker does not
    /// track such pages, so nothing there is cached anyway).
    #[inline]
    pub fn entry(&mut self, rip: u64, page: u64) -> Option<&mut Entry> {
        let page = u32::try_from(page).ok().filter(|&p| p != NO_PAGE)?;
        let s = set_of(rip);
        let [a, b] = &mut self.sets.get_mut(s)?.0;
        let hit = if a.rip == rip && a.page == page {
            true
        } else if b.rip == rip && b.page == page {
            std::mem::swap(a, b);
            true
        } else {
            false
        };
        if !hit {
            return Some(self.miss(rip, page));
        }
        let [a, _] = &mut self.sets.get_mut(s)?.0;
        Some(a)
    }

    /// Brings (`rip`, `page`) into way 0 of its set (from the victim map, or new), moving way 0
    /// to way 1 and way 1 to the victim map.
    #[cold]
    #[inline(never)]
    fn miss(&mut self, rip: u64, page: u32) -> &mut Entry {
        let e = match self.victims.remove(&(rip, page)) {
            Some(e) => {
                self.stats.recalls += 1;
                e
            }
            None => Entry::new(rip, page),
        };
        let Some(set) = self.sets.get_mut(set_of(rip)) else {
            // Not reached (`set_of` is below the table's length): keep it in the map.
            return self.victims.entry((rip, page)).or_insert(e);
        };
        let [a, b] = &mut set.0;
        let old = std::mem::replace(b, std::mem::replace(a, e));
        // An entry that never ran (heat 0) is not worth keeping.
        if old.page != NO_PAGE && old.heat != 0 {
            if self.victims.len() >= VICTIMS_CAP {
                self.victims = Victims::default();
                self.stats.victim_flushes += 1;
            }
            self.victims.insert((old.rip, old.page), old);
            self.stats.evictions += 1;
        }
        a
    }

    /// Entries held (table and victim map), for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| s.0.iter())
            .filter(|e| e.page != NO_PAGE)
            .count()
            + self.victims.len()
    }

    /// Whether (`rip`, `page`) has an entry, without touching the replacement order.
    #[cfg(test)]
    pub fn peek(&self, rip: u64, page: u32) -> Option<Entry> {
        let in_set = self
            .sets
            .get(set_of(rip))
            .and_then(|s| s.0.iter().find(|e| e.rip == rip && e.page == page).copied());
        in_set.or_else(|| self.victims.get(&(rip, page)).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RIPs that all fall into one set.
    fn same_set(n: usize) -> Vec<u64> {
        crate::decode::rips_in_one_set(set_of, n)
    }

    #[test]
    fn block_starts_sharing_a_set_keep_their_heat_and_translation() {
        let mut ix = Index::new();
        let rips = same_set(6);
        // The first one is resolved (as if translated), the others heat up.
        let e = ix.entry(rips[0], 7).unwrap();
        e.heat = RESOLVED;
        e.chk = 12;
        e.generation = 3;
        for round in 1..=5u16 {
            for &r in &rips[1..] {
                let e = ix.entry(r, 7).unwrap();
                assert_eq!(e.heat, round - 1, "heat of {r:#x} kept across evictions");
                e.heat += 1;
            }
        }
        let e = ix.entry(rips[0], 7).unwrap();
        assert_eq!((e.heat, e.chk, e.generation), (RESOLVED, 12, 3));
        assert!(ix.stats.evictions > 0 && ix.stats.recalls > 0);
        assert_eq!(ix.len(), 6);
    }

    #[test]
    fn the_physical_page_is_part_of_the_key() {
        let mut ix = Index::new();
        let rip = 0x40_1000;
        ix.entry(rip, 5).unwrap().heat = RESOLVED;
        // The same RIP in another address space is another block start.
        let e = ix.entry(rip, 9).unwrap();
        assert_eq!(e.heat, 0);
        assert_eq!(ix.peek(rip, 5).map(|e| e.heat), Some(RESOLVED));
        // A page the code tracker cannot track is not indexed.
        assert!(ix.entry(rip, 1 << 32).is_none());
        assert!(ix.entry(rip, u64::from(NO_PAGE)).is_none());
    }

    #[test]
    fn the_most_recent_way_is_hit_first_and_clear_forgets_everything() {
        let mut ix = Index::new();
        let rips = same_set(3);
        ix.entry(rips[0], 1).unwrap().heat = 1;
        ix.entry(rips[1], 1).unwrap().heat = 2;
        // rips[0] is in way 1 now; a hit moves it to way 0, so rips[1] is the one evicted.
        assert_eq!(ix.entry(rips[0], 1).unwrap().heat, 1);
        ix.entry(rips[2], 1).unwrap().heat = 3;
        assert_eq!(ix.stats.evictions, 1);
        assert!(ix.victims.contains_key(&(rips[1], 1)));
        ix.clear();
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.entry(rips[0], 1).unwrap().heat, 0);
    }

    #[test]
    fn the_victim_map_is_bounded() {
        let mut ix = Index::new();
        for k in 0..(VICTIMS_CAP + 2 * SETS + 8) as u64 {
            ix.entry(0x40_0000 + 16 * k, 1).unwrap().heat = 1;
        }
        assert!(ix.victims.len() <= VICTIMS_CAP);
        assert_eq!(ix.stats.victim_flushes, 1);
    }
}
