//! The filled slots of the soft TLB and of the jump cache, kept in two lists: those made from a
//! global translation and the others. MOV to CR3 with CR4.PGE (a context switch) empties only
//! the others, so it visits only them instead of every filled slot (the kernel's global
//! entries, most of the soft TLB, stay where they are untouched).
//!
//! A slot moves from the global list to the other when it is refilled from a non-global
//! translation (its index then stays behind in the global list, skipped by its state); one
//! refilled from a global translation while in the other list stays there (flushed once more
//! than needed, never once too few).

/// Slot states.
const FREE: u8 = 0;
const LOCAL: u8 = 1;
const GLOBAL: u8 = 2;

pub(super) struct UsedSlots {
    /// Per slot: [`FREE`] (the entry is empty), [`LOCAL`] or [`GLOBAL`].
    state: Vec<u8>,
    /// Slots in state [`LOCAL`], each once.
    local: Vec<u16>,
    /// Slots that were [`GLOBAL`] when pushed (some may have moved on since; a slot may be
    /// here more than once, bounded by [`UsedSlots::compact`]).
    global: Vec<u16>,
    /// Slots not [`FREE`].
    live: usize,
}

impl UsedSlots {
    /// Slots `0..n` (`n` at most 65536), all free.
    pub(super) fn new(n: usize) -> UsedSlots {
        UsedSlots {
            state: vec![FREE; n],
            local: Vec::new(),
            global: Vec::new(),
            live: 0,
        }
    }

    #[cfg(test)]
    /// Filled slots.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether slot `i` is filled and kept by [`UsedSlots::flush_local`].
    pub(super) fn is_global(&self, i: usize) -> bool {
        self.state.get(i) == Some(&GLOBAL)
    }

    /// Slot `i` was filled (again); `global`: everything in it is from global translations.
    pub(super) fn fill(&mut self, i: usize, global: bool) {
        let Some(s) = self.state.get_mut(i) else {
            return;
        };
        match (*s, global) {
            (FREE, true) => {
                *s = GLOBAL;
                self.global.push(i as u16);
                self.live += 1;
            }
            (FREE, false) => {
                *s = LOCAL;
                self.local.push(i as u16);
                self.live += 1;
            }
            (GLOBAL, false) => {
                *s = LOCAL;
                self.local.push(i as u16);
            }
            _ => {}
        }
        if self.global.len() > 2 * self.state.len() {
            self.compact();
        }
    }

    /// Frees the slots that are not global, calling `clear` for each.
    pub(super) fn flush_local(&mut self, mut clear: impl FnMut(usize)) {
        for &i in &self.local {
            let i = usize::from(i);
            if let Some(s) = self.state.get_mut(i)
                && *s == LOCAL
            {
                *s = FREE;
                self.live -= 1;
                clear(i);
            }
        }
        self.local.clear();
    }

    /// Frees every slot, calling `clear` for each filled one.
    pub(super) fn flush_all(&mut self, mut clear: impl FnMut(usize)) {
        for &i in self.local.iter().chain(&self.global) {
            let i = usize::from(i);
            if let Some(s) = self.state.get_mut(i)
                && *s != FREE
            {
                *s = FREE;
                clear(i);
            }
        }
        self.local.clear();
        self.global.clear();
        self.live = 0;
    }

    /// Calls `f` for every filled slot (some possibly twice, or for a slot freed since: `f`
    /// must be harmless on an empty entry and idempotent).
    pub(super) fn for_each(&self, mut f: impl FnMut(usize)) {
        for &i in self.local.iter().chain(&self.global) {
            f(usize::from(i));
        }
    }

    /// Drops the global list's stale and repeated slots.
    fn compact(&mut self) {
        let state = &self.state;
        self.global = (0..state.len())
            .filter(|&i| state.get(i) == Some(&GLOBAL))
            .map(|i| i as u16)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_flush_frees_only_non_global_slots() {
        let mut u = UsedSlots::new(8);
        u.fill(1, true);
        u.fill(2, false);
        u.fill(3, true);
        assert_eq!(u.len(), 3);
        let mut cleared = Vec::new();
        u.flush_local(|i| cleared.push(i));
        assert_eq!(cleared, [2]);
        assert_eq!(u.len(), 2);
        assert!(u.is_global(1) && u.is_global(3) && !u.is_global(2));
        // A global slot refilled from a non-global translation goes with the next local
        // flush; one refilled from a global translation while local stays local.
        u.fill(3, false);
        u.fill(2, false);
        u.fill(2, true);
        assert_eq!(u.len(), 3);
        cleared.clear();
        u.flush_local(|i| cleared.push(i));
        cleared.sort_unstable();
        assert_eq!(cleared, [2, 3]);
        assert_eq!(u.len(), 1);
        cleared.clear();
        u.flush_all(|i| cleared.push(i));
        assert_eq!(cleared, [1]);
        assert!(u.is_empty() && !u.is_global(1));
    }

    #[test]
    fn slots_moving_between_lists_stay_bounded_and_exact() {
        let mut u = UsedSlots::new(4);
        for _ in 0..100 {
            u.fill(0, true);
            u.fill(0, false);
            u.flush_local(|_| {});
        }
        u.fill(0, true);
        assert!(u.global.len() <= 2 * 4 + 1, "{}", u.global.len());
        let mut seen = Vec::new();
        u.for_each(|i| seen.push(i));
        assert!(seen.contains(&0));
        let mut cleared = Vec::new();
        u.flush_all(|i| cleared.push(i));
        assert_eq!(cleared, [0], "a slot listed twice was cleared twice");
        assert!(u.is_empty());
    }
}
