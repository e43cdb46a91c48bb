//! The bitmap behind [`GuestMemory`](crate::GuestMemory): vm-memory's `AtomicBitmap` (one dirty
//! bit per 4 KiB page, harvested by live migration) plus an optional [`WriteWatch`] told about
//! every write made through `GuestMemory`'s own accessors.
//!
//! vm-memory calls [`Bitmap::mark_dirty`] after each write it makes (`write_slice`,
//! `write_obj`, `store`, `read_volatile_from`, ...): that is how virtio devices' DMA, boot
//! loading, an incoming migration and a backend's clock pages reach guest RAM. A backend that
//! caches guest code (emu's decoded blocks and translations) installs a watch with
//! [`watch_writes`] so that those writes invalidate what it cached from the written pages,
//! without any device knowing about it. Writers that invalidate code themselves (emu's own
//! stores) mark [`DirtyBitmap::dirty`] directly and skip the watch.
//!
//! Hand-written rather than taken from a crate: vm-memory offers no bitmap with a callback, and
//! the seam has to be the memory's bitmap type, which vm-memory makes generic for this purpose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Told about writes into guest RAM made through [`GuestMemory`](crate::GuestMemory)'s accessors.
pub trait WriteWatch: Send + Sync {
    /// Guest-physical pages (numbers, 4 KiB) `first..=last` were written. Called by the writing
    /// thread after the data is in memory and before its write call returns, so before the
    /// writer can tell anyone (a used ring, an interrupt) that the data is there.
    fn written(&self, first: u64, last: u64);
}

struct Watch {
    /// Guest-physical address of the region this bitmap covers.
    base: u64,
    sink: Arc<dyn WriteWatch>,
}

/// The bitmap of one guest RAM region: dirty bits, and the region's [`WriteWatch`] if any.
pub struct DirtyBitmap {
    dirty: AtomicBitmap,
    /// Whether `watch` holds a watch: the only cost of a write when nobody watches.
    watched: AtomicBool,
    watch: RwLock<Option<Watch>>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("dirty", &self.dirty)
            .field("watched", &self.watched.load(Ordering::Relaxed))
            .finish()
    }
}

impl DirtyBitmap {
    fn from_dirty(dirty: AtomicBitmap) -> DirtyBitmap {
        DirtyBitmap {
            dirty,
            watched: AtomicBool::new(false),
            watch: RwLock::new(None),
        }
    }

    /// The dirty bits alone: marking them does not call the watch. For writers that invalidate
    /// cached code themselves.
    pub fn dirty(&self) -> &AtomicBitmap {
        &self.dirty
    }

    /// Returns the dirty bits (one `u64` per 64 pages) and clears them.
    pub fn get_and_reset(&self) -> Vec<u64> {
        self.dirty.get_and_reset()
    }

    fn set_watch(&self, watch: Option<Watch>) {
        let mut w = self.watch.write().unwrap_or_else(|p| p.into_inner());
        self.watched.store(watch.is_some(), Ordering::Release);
        *w = watch;
    }

    #[cold]
    fn notify(&self, offset: usize, len: usize) {
        let w = self.watch.read().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = w.as_ref() {
            let start = w
                .base
                .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX));
            let end =
                start.saturating_add(u64::try_from(len.saturating_sub(1)).unwrap_or(u64::MAX));
            w.sink.written(start >> 12, end >> 12);
        }
    }
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        DirtyBitmap::from_dirty(AtomicBitmap::default())
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len);
        if len != 0 && self.watched.load(Ordering::Acquire) {
            self.notify(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap::from_dirty(AtomicBitmap::with_len(len))
    }
}

/// Makes `sink` see every write into `memory` made through its accessors from now on (each
/// region's bitmap holds it). One watch per memory: a second call replaces the first.
pub fn watch_writes(memory: &crate::GuestMemory, sink: Arc<dyn WriteWatch>) {
    for region in memory.iter() {
        let mapping: &vm_memory::MmapRegion<DirtyBitmap> = region;
        mapping.bitmap().set_watch(Some(Watch {
            base: region.start_addr().0,
            sink: sink.clone(),
        }));
    }
}

/// Removes `sink` from `memory` if it is the installed watch (a later [`watch_writes`] by
/// someone else stays).
pub fn unwatch_writes(memory: &crate::GuestMemory, sink: &Arc<dyn WriteWatch>) {
    for region in memory.iter() {
        let mapping: &vm_memory::MmapRegion<DirtyBitmap> = region;
        let b = mapping.bitmap();
        let ours = b
            .watch
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(&w.sink, sink));
        if ours {
            b.set_watch(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, u64)>>);

    impl WriteWatch for Log {
        fn written(&self, first: u64, last: u64) {
            self.0.lock().unwrap().push((first, last));
        }
    }

    fn take(log: &Log) -> Vec<(u64, u64)> {
        std::mem::take(&mut *log.0.lock().unwrap())
    }

    #[test]
    fn watch_sees_guest_physical_pages_of_every_region() {
        let mem = crate::GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap();
        mem.write_obj(1u32, GuestAddress(0x5000)).unwrap();
        let log = Arc::new(Log::default());
        let sink: Arc<dyn WriteWatch> = log.clone();
        watch_writes(&mem, sink.clone());
        mem.write_obj(1u32, GuestAddress(0x5ffe)).unwrap();
        mem.write_slice(&[7u8; 0x2001], GuestAddress(0x1_0000_3fff))
            .unwrap();
        let mut f: &[u8] = &[1u8; 100];
        mem.read_exact_volatile_from(GuestAddress(0x8000), &mut f, 100)
            .unwrap();
        let got = take(&log);
        assert!(got.contains(&(5, 6)), "{got:x?}");
        assert!(got.contains(&(0x10_0003, 0x10_0005)), "{got:x?}");
        assert!(got.contains(&(8, 8)), "{got:x?}");
        // Dirty bits are kept as before, and the bare bits skip the watch.
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        let mapping: &vm_memory::MmapRegion<DirtyBitmap> = region;
        mapping.bitmap().dirty().mark_dirty(0x9000, 1);
        assert!(take(&log).is_empty());
        // Another sink's removal leaves ours; ours removes it.
        let other: Arc<dyn WriteWatch> = Arc::new(Log::default());
        unwatch_writes(&mem, &other);
        mem.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        assert_eq!(take(&log), vec![(7, 7)]);
        unwatch_writes(&mem, &sink);
        mem.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        assert!(take(&log).is_empty());
    }
}
