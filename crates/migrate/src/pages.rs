//! The MemoryPages payload (docs/migration-protocol.md §5.4): encoding on the source, checked
//! decoding on the destination.

use hv::{GuestMemory, PAGE_SIZE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, Result};

/// Pages one batch may span (base .. base + count).
pub(crate) const MAX_BATCH_PAGES: u64 = 1024;
pub(crate) const FLAG_SKIP: u8 = 0;
pub(crate) const FLAG_ZERO: u8 = 1;
pub(crate) const FLAG_DATA: u8 = 2;
const BATCH_HEADER: usize = 12;
const PAGE: usize = 4096;
const _: () = assert!(PAGE as u64 == PAGE_SIZE);
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Checks that every region is page-aligned, so page frames cover memory exactly.
pub(crate) fn check_layout(mem: &GuestMemory) -> Result<()> {
    for r in mem.iter() {
        if r.start_addr().raw_value() % PAGE_SIZE != 0 || r.len() % PAGE_SIZE != 0 {
            return Err(Error::Vm(format!(
                "guest memory region at {:#x} is not page-aligned",
                r.start_addr().raw_value()
            )));
        }
    }
    Ok(())
}

/// Every page frame of guest memory, ascending.
pub(crate) fn all_pages(mem: &GuestMemory) -> Vec<u64> {
    let mut v = Vec::new();
    let mut ranges: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            let first = r.start_addr().raw_value() / PAGE_SIZE;
            (first, first + r.len() / PAGE_SIZE)
        })
        .collect();
    ranges.sort_unstable();
    for (a, b) in ranges {
        v.extend(a..b);
    }
    v
}

/// Whether the whole page `pfn` lies inside one region of `mem`.
pub(crate) fn page_in_memory(mem: &GuestMemory, pfn: u64) -> Option<GuestAddress> {
    let gpa = pfn.checked_mul(PAGE_SIZE)?;
    let last = gpa.checked_add(PAGE_SIZE - 1)?;
    let r = mem.find_region(GuestAddress(gpa))?;
    (last <= r.last_addr().raw_value()).then_some(GuestAddress(gpa))
}

/// Sorts, deduplicates and drops frames outside guest memory.
pub(crate) fn normalize(mem: &GuestMemory, mut pfns: Vec<u64>) -> Vec<u64> {
    pfns.sort_unstable();
    pfns.dedup();
    pfns.retain(|&p| page_in_memory(mem, p).is_some());
    pfns
}

/// What one encoded batch carried.
#[derive(Default, Clone, Copy)]
pub(crate) struct BatchStats {
    pub data_pages: u64,
    pub zero_pages: u64,
}

/// Splits a sorted, deduplicated frame list into batches of at most [`MAX_BATCH_PAGES`] span.
pub(crate) fn batches(pfns: &[u64]) -> impl Iterator<Item = &[u64]> {
    let mut rest = pfns;
    std::iter::from_fn(move || {
        let first = *rest.first()?;
        let n = rest.partition_point(|&p| p < first.saturating_add(MAX_BATCH_PAGES));
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

/// Encodes one batch (`pfns` sorted, within [`MAX_BATCH_PAGES`] of the first) into `out`,
/// reading the pages from `mem` now. With `skip_zero`, zero pages are left out entirely (the
/// destination starts zeroed); otherwise they are sent as a zero flag. Returns `None` when the
/// batch would carry nothing.
pub(crate) fn encode_batch(
    mem: &GuestMemory,
    pfns: &[u64],
    skip_zero: bool,
    out: &mut Vec<u8>,
) -> Result<Option<BatchStats>> {
    let (Some(&base), Some(&last)) = (pfns.first(), pfns.last()) else {
        return Ok(None);
    };
    let count = last
        .checked_sub(base)
        .and_then(|n| usize::try_from(n + 1).ok())
        .ok_or_else(|| Error::Vm("page batch too large or unsorted".into()))?;
    out.clear();
    out.extend_from_slice(&base.to_le_bytes());
    let count32 =
        u32::try_from(count).map_err(|_| Error::Vm("page batch too large or unsorted".into()))?;
    out.extend_from_slice(&count32.to_le_bytes());
    out.resize(BATCH_HEADER + count, FLAG_SKIP);
    let mut page = [0u8; PAGE];
    let mut stats = BatchStats::default();
    for &pfn in pfns {
        let gpa = page_in_memory(mem, pfn)
            .ok_or_else(|| Error::Vm(format!("page {pfn:#x} is outside guest memory")))?;
        mem.read_slice(&mut page, gpa)
            .map_err(|source| Error::GuestPage {
                op: "reading",
                page: pfn,
                source,
            })?;
        let flag = if page == ZERO_PAGE {
            if skip_zero {
                continue;
            }
            stats.zero_pages += 1;
            FLAG_ZERO
        } else {
            stats.data_pages += 1;
            out.extend_from_slice(&page);
            FLAG_DATA
        };
        let slot = pfn
            .checked_sub(base)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| out.get_mut(BATCH_HEADER + i))
            .ok_or_else(|| Error::Vm(format!("page {pfn:#x} is outside its batch")))?;
        *slot = flag;
    }
    if stats.data_pages == 0 && stats.zero_pages == 0 {
        return Ok(None);
    }
    Ok(Some(stats))
}

/// Checks a MemoryPages payload from the (untrusted) source completely and writes its pages
/// into `mem`. Returns the number of pages written.
pub(crate) fn apply_batch(mem: &GuestMemory, p: &[u8]) -> Result<u64> {
    let bad = |what: &str| Error::Protocol(format!("bad MemoryPages: {what}"));
    let (header, rest) = p
        .split_first_chunk::<BATCH_HEADER>()
        .ok_or_else(|| bad("truncated header"))?;
    let (base, count) = header.split_at(8);
    let base = u64::from_le_bytes(base.try_into().map_err(|_| bad("header"))?);
    let count = u32::from_le_bytes(count.try_into().map_err(|_| bad("header"))?);
    if count == 0 || u64::from(count) > MAX_BATCH_PAGES {
        return Err(bad("page count out of range"));
    }
    let count = usize::try_from(count).map_err(|_| bad("page count out of range"))?;
    let (flags, pages) = rest
        .split_at_checked(count)
        .ok_or_else(|| bad("truncated flags"))?;
    let mut data_pages = 0usize;
    for &f in flags {
        match f {
            FLAG_SKIP | FLAG_ZERO => {}
            FLAG_DATA => data_pages += 1,
            _ => return Err(bad("unknown page flag")),
        }
    }
    if p.len() != BATCH_HEADER + count + data_pages * PAGE {
        return Err(bad("length does not match its flags"));
    }
    // Check every address before writing anything.
    for (i, &f) in flags.iter().enumerate() {
        if f != FLAG_SKIP {
            let pfn = base
                .checked_add(i as u64)
                .ok_or_else(|| bad("page number overflows"))?;
            if page_in_memory(mem, pfn).is_none() {
                return Err(Error::Protocol(format!(
                    "page {pfn:#x} is outside the destination's memory"
                )));
            }
        }
    }
    let mut data = pages.chunks_exact(PAGE);
    let mut written = 0;
    for (i, &f) in flags.iter().enumerate() {
        let src: &[u8] = match f {
            FLAG_ZERO => &ZERO_PAGE,
            FLAG_DATA => data.next().ok_or_else(|| bad("missing page data"))?,
            _ => continue,
        };
        let gpa = GuestAddress((base + i as u64) * PAGE_SIZE);
        mem.write_slice(src, gpa)
            .map_err(|source| Error::GuestPage {
                op: "writing",
                page: gpa.raw_value(),
                source,
            })?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(128 * PAGE_SIZE), 16 * PAGE),
        ])
        .unwrap()
    }

    #[test]
    fn layout_and_page_lists() {
        let m = mem();
        check_layout(&m).unwrap();
        let all = all_pages(&m);
        assert_eq!(all.len(), 80);
        assert_eq!(all[64], 128);
        assert_eq!(normalize(&m, vec![200, 3, 3, 70, 130, 1]), vec![1, 3, 130]);
        let odd = GuestMemory::from_ranges(&[(GuestAddress(0), PAGE + 1)]).unwrap();
        assert!(check_layout(&odd).is_err());
    }

    #[test]
    fn batches_split_by_span() {
        let pfns: Vec<u64> = vec![0, 5, 1023, 1024, 5000, 5001];
        let b: Vec<&[u64]> = batches(&pfns).collect();
        assert_eq!(b, vec![&[0, 5, 1023][..], &[1024], &[5000, 5001]]);
    }

    #[test]
    fn encode_apply_round_trip() {
        let src = mem();
        let dst = mem();
        src.write_slice(&[1, 2, 3], GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        src.write_slice(&[9], GuestAddress(130 * PAGE_SIZE + 17))
            .unwrap();
        dst.write_slice(&[5], GuestAddress(4 * PAGE_SIZE)).unwrap();
        let mut buf = Vec::new();
        for b in batches(&all_pages(&src)) {
            if encode_batch(&src, b, false, &mut buf).unwrap().is_some() {
                apply_batch(&dst, &buf).unwrap();
            }
        }
        let (mut a, mut z) = (vec![0u8; 64 * PAGE], vec![0u8; 64 * PAGE]);
        src.read_slice(&mut a, GuestAddress(0)).unwrap();
        dst.read_slice(&mut z, GuestAddress(0)).unwrap();
        assert!(a == z);
        let mut p = [0u8; 1];
        dst.read_slice(&mut p, GuestAddress(130 * PAGE_SIZE + 17))
            .unwrap();
        assert_eq!(p[0], 9);
        // skip_zero leaves out all-zero batches.
        assert!(
            encode_batch(&src, &[10, 11], true, &mut buf)
                .unwrap()
                .is_none()
        );
    }

    fn batch(base: u64, flags: &[u8], data_pages: usize) -> Vec<u8> {
        let mut v = base.to_le_bytes().to_vec();
        v.extend_from_slice(&u32::try_from(flags.len()).unwrap().to_le_bytes());
        v.extend_from_slice(flags);
        v.resize(v.len() + data_pages * PAGE, 0xaa);
        v
    }

    #[test]
    fn hostile_batches_are_rejected() {
        let m = mem();
        apply_batch(&m, &batch(0, &[2, 1, 0], 1)).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "truncated"),
            (batch(0, &[], 0), "count"),
            (batch(0, &[2], 0), "length"),
            (batch(0, &[2], 2), "length"),
            (batch(0, &[3], 0), "flag"),
            (batch(64, &[1], 0), "outside"),
            (batch(126, &[0, 1], 0), "outside"),
            (batch(143, &[0, 1], 0), "outside"),
            (batch(u64::MAX, &[0, 1], 0), "overflow"),
            (batch(u64::MAX / PAGE_SIZE + 1, &[1], 0), "outside"),
            (batch(0, &vec![0; 1025], 0), "count"),
        ];
        for (p, want) in cases {
            let e = apply_batch(&m, &p).unwrap_err().to_string();
            assert!(e.contains(want), "{e} !~ {want}");
        }
        let mut short = batch(0, &[1, 1], 0);
        short.truncate(13);
        assert!(apply_batch(&m, &short).is_err());
    }
}
