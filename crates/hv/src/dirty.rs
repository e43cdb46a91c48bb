//! Reading a dirty bitmap: the one walker every dirty log goes through (KVM's per-slot logs in
//! `hv-kvm`, guest memory's own bitmap in `vmm`'s migration source).
//!
//! A dirty bitmap is a run of 64-bit words covering consecutive pages from a first page: bit `b`
//! of word `w` (least significant bit first) stands for page `first + 64 * w + b`. This is KVM's
//! `KVM_GET_DIRTY_LOG` layout and `vm_memory`'s `AtomicBitmap::get_and_reset`; written by hand
//! because neither crate offers the walk itself.

/// The page numbers whose bits are set in `words`, a bitmap starting at page `first`, in
/// ascending order.
pub fn dirty_pages(first: u64, words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    (0u64..)
        .zip(words)
        .flat_map(move |(w, &word)| SetBits(word).map(move |b| first + w * 64 + b))
}

/// The indexes of the set bits of a word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let bit = u64::from(self.0.trailing_zeros());
        // Clears the lowest set bit.
        self.0 &= self.0 - 1;
        Some(bit)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.0.count_ones() as usize;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_a_bitmap() {
        let none: Vec<u64> = dirty_pages(10, &[]).collect();
        assert!(none.is_empty());
        assert_eq!(dirty_pages(0, &[0, 0]).count(), 0);
        let pages: Vec<u64> = dirty_pages(0x100, &[0b1011, 0, 1 << 63 | 1]).collect();
        assert_eq!(pages, [0x100, 0x101, 0x103, 0x100 + 128, 0x100 + 128 + 63]);
        assert_eq!(
            dirty_pages(0, &[u64::MAX]).collect::<Vec<_>>(),
            (0..64).collect::<Vec<_>>()
        );
    }

    /// The walk agrees with a bit-by-bit reading on arbitrary words.
    #[test]
    fn agrees_with_testing_each_bit() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let words: Vec<u64> = (0..50)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x & (x >> 3)
            })
            .collect();
        let slow: Vec<u64> = (0..words.len() as u64 * 64)
            .filter(|&i| {
                words
                    .get((i / 64) as usize)
                    .is_some_and(|w| w >> (i % 64) & 1 == 1)
            })
            .map(|i| 5 + i)
            .collect();
        assert_eq!(dirty_pages(5, &words).collect::<Vec<_>>(), slow);
    }
}
