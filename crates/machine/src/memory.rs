//! Guest RAM.

use vm_memory::GuestAddress;

use crate::layout::{MAX_MEMORY, MIN_MEMORY, ram_regions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "memory size {0:#x} is invalid: it must be a multiple of 4 KiB between 1 MiB and 1 TiB"
    )]
    BadSize(u64),
    #[error("cannot allocate guest memory")]
    Allocate(#[source] hv::Flat<vm_memory::mmap::FromRangesError>),
}

/// Checks a guest RAM size: a non-zero multiple of 4 KiB, at least 1 MiB, at most 1 TiB.
pub fn check_size(mem_bytes: u64) -> Result<(), Error> {
    if !mem_bytes.is_multiple_of(hv::PAGE_SIZE) || !(MIN_MEMORY..=MAX_MEMORY).contains(&mem_bytes) {
        return Err(Error::BadSize(mem_bytes));
    }
    Ok(())
}

/// Creates guest RAM laid out by [`ram_regions`]: anonymous private mappings, each with an
/// [`hv::DirtyBitmap`]: a dirty bit per 4 KiB page (the host page size on x86-64), harvested by
/// live migration, and the write watch a backend that caches guest code (emu) installs, so
/// that device DMA and the VMM's own writes invalidate that code.
pub fn create_guest_memory(mem_bytes: u64) -> Result<hv::GuestMemory, Error> {
    check_size(mem_bytes)?;
    let mut ranges = Vec::new();
    for (addr, len) in ram_regions(mem_bytes) {
        let len = usize::try_from(len).map_err(|_| Error::BadSize(mem_bytes))?;
        ranges.push((GuestAddress(addr), len));
    }
    hv::GuestMemory::from_ranges(&ranges).map_err(|e| Error::Allocate(hv::Flat(e)))
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        for bad in [0, 4095, (1 << 20) + 1, 4096, (1 << 40) + 4096] {
            assert!(matches!(create_guest_memory(bad), Err(Error::BadSize(_))));
        }
    }

    /// Records the pages a write watch is told about.
    #[derive(Default)]
    struct Pages(std::sync::Mutex<Vec<(u64, u64)>>);

    impl hv::WriteWatch for Pages {
        fn written(&self, first: u64, last: u64) {
            self.0.lock().unwrap().push((first, last));
        }
    }

    #[test]
    fn device_writes_reach_the_write_watch_with_guest_physical_pages() {
        // 3.5 GiB: one region below the 3 GiB hole and one at 4 GiB (mapped lazily).
        let mem = create_guest_memory(3584 << 20).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let pages = std::sync::Arc::new(Pages::default());
        hv::watch_writes(&mem, pages.clone());
        // A virtio-blk read into a buffer that straddles two pages above 4 GiB, and a used
        // ring update below.
        let mut disk: &[u8] = &[0x90; 0x1000];
        mem.read_exact_volatile_from(GuestAddress(0x1_0000_0800), &mut disk, 0x1000)
            .unwrap();
        mem.write_obj(1u16, GuestAddress(0x7002)).unwrap();
        assert_eq!(
            *pages.0.lock().unwrap(),
            vec![(0x10_0000, 0x10_0001), (7, 7)]
        );
        let region = mem.find_region(GuestAddress(0x1_0000_0000)).unwrap();
        assert!(region.bitmap().dirty_at(0x1000));
    }

    #[test]
    fn creates_regions_and_tracks_dirty_pages() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_u32, GuestAddress(0x5000)).unwrap();
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x6000));
    }
}
