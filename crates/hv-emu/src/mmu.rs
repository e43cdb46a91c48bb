//! Linear-to-physical translation (4-level paging, software TLB) and physical accesses:
//! guest RAM through `vm-memory` (so writes mark the dirty bitmap), the local APIC page, and
//! everything else through the platform's `DeviceIo`.

use std::sync::atomic::Ordering;

use hv::DirtyBitmap;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, RefSlice};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory, VolatileSlice,
};

use crate::cpu::{CR0_PG, CR0_WP, CR4_PAE, EFER_NXE};
use crate::exec::{Exc, Exec};

const TLB_SIZE: usize = 1024;
// Flags in the low bits of `TlbEntry::pa`.
const T_WRITE: u64 = 1; // writable at all levels and dirty already set
const T_USER: u64 = 2;
const T_NX: u64 = 4;
const T_GLOBAL: u64 = 8; // the leaf is global (G) and CR4.PGE was set when it was walked

/// 16 bytes, so the 1024 entries take 16 KiB of the host's L1.
#[derive(Clone, Copy)]
struct TlbEntry {
    vpn: u64,
    /// Physical page address | `T_*` flags.
    pa: u64,
}

pub struct Tlb {
    e: Vec<TlbEntry>,
    /// Bumped by every flush: the translator's host-pointer TLB (`jit`) is a cache of this one
    /// and drops its entries when this changes.
    pub epoch: u64,
    /// Bumped by every flush that may drop global entries (all but [`Tlb::flush_nonglobal`]):
    /// when only `epoch` moved, a cache of this TLB may keep its global entries.
    pub global_epoch: u64,
}

impl Tlb {
    pub fn new() -> Tlb {
        Tlb {
            e: vec![
                TlbEntry {
                    vpn: u64::MAX,
                    pa: 0,
                };
                TLB_SIZE
            ],
            epoch: 0,
            global_epoch: 0,
        }
    }

    pub fn flush_all(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.global_epoch = self.global_epoch.wrapping_add(1);
        for e in self.e.iter_mut() {
            e.vpn = u64::MAX;
        }
    }

    /// What MOV to CR3 does with CR4.PGE set (and no PCIDs): drops every translation except
    /// those of global pages (SDM Vol. 3A 4.10.4.1). Kernel pages are global in a guest
    /// without page-table isolation, so a context switch keeps them.
    pub fn flush_nonglobal(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        for e in self.e.iter_mut() {
            if e.pa & T_GLOBAL == 0 {
                e.vpn = u64::MAX;
            }
        }
    }

    /// Whether the TLB holds a global translation of `lin`.
    pub fn is_global(&self, lin: u64) -> bool {
        let vpn = lin >> 12;
        self.e
            .get((vpn as usize) & (TLB_SIZE - 1))
            .is_some_and(|e| e.vpn == vpn && e.pa & T_GLOBAL != 0)
    }

    /// Drops the translations to any of the guest page frames `frames`.
    pub fn flush_frames(&mut self, frames: &[u64]) {
        self.epoch = self.epoch.wrapping_add(1);
        self.global_epoch = self.global_epoch.wrapping_add(1);
        if frames.len() > 32 {
            self.flush_all();
            return;
        }
        for e in self.e.iter_mut() {
            if e.vpn != u64::MAX && frames.contains(&(e.pa >> 12)) {
                e.vpn = u64::MAX;
            }
        }
    }

    pub fn flush_page(&mut self, lin: u64) {
        self.epoch = self.epoch.wrapping_add(1);
        self.global_epoch = self.global_epoch.wrapping_add(1);
        let vpn = lin >> 12;
        let e = &mut self.e[(vpn as usize) & (TLB_SIZE - 1)];
        if e.vpn == vpn {
            e.vpn = u64::MAX;
        }
    }
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb::new()
    }
}

struct RamRegion<'m> {
    start: u64,
    len: u64,
    slice: VolatileSlice<'m, RefSlice<'m, DirtyBitmap>>,
    /// The dirty bits alone: vCPU stores invalidate code themselves (`note_write`), so they
    /// skip the memory's write watch (which is for writes by everyone else).
    bitmap: &'m AtomicBitmap,
    /// The bitmap has one bit per 4 KiB page (`GuestMemory::from_ranges` makes them so), so a
    /// store marks its page with `set_bit` instead of the generic range division.
    page_bits: bool,
}

/// The RAM regions of a `GuestMemory` as volatile slices, looked up by a linear scan (there are
/// one to three regions), which is much cheaper than `GuestMemory`'s per-access lookup. Writes
/// through it mark the memory's dirty bitmap like `GuestMemory`'s own accessors.
pub struct Ram<'m> {
    regions: Vec<RamRegion<'m>>,
}

impl<'m> Ram<'m> {
    pub fn new(mem: &'m hv::GuestMemory) -> Ram<'m> {
        let regions = mem
            .iter()
            .filter_map(|r| {
                let mapping: &vm_memory::MmapRegion<DirtyBitmap> = r;
                let bitmap = mapping.bitmap().dirty();
                let page_bits = bitmap.byte_size() as u64 == r.len()
                    && bitmap.len() as u64 == r.len().div_ceil(hv::PAGE_SIZE);
                r.as_volatile_slice().ok().map(|slice| RamRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    slice,
                    bitmap,
                    page_bits,
                })
            })
            .collect();
        Ram { regions }
    }

    #[inline(always)]
    fn find(&self, pa: u64, size: usize) -> Option<(&RamRegion<'m>, usize)> {
        for r in &self.regions {
            let off = pa.wrapping_sub(r.start);
            if off < r.len && r.len - off >= size as u64 {
                return Some((r, off as usize));
            }
        }
        None
    }

    /// Reads `size` (1, 2, 4, 8) bytes of RAM at `pa`; `None` if not RAM.
    #[inline(always)]
    pub fn read(&self, pa: u64, size: usize) -> Option<u64> {
        let (region, off) = self.find(pa, size)?;
        let s = &region.slice;
        if off & (size - 1) == 0 {
            use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64};
            let r = Ordering::Relaxed;
            match size {
                1 => s
                    .get_atomic_ref::<AtomicU8>(off)
                    .ok()
                    .map(|a| u64::from(a.load(r))),
                2 => s
                    .get_atomic_ref::<AtomicU16>(off)
                    .ok()
                    .map(|a| u64::from(a.load(r))),
                4 => s
                    .get_atomic_ref::<AtomicU32>(off)
                    .ok()
                    .map(|a| u64::from(a.load(r))),
                _ => s.get_atomic_ref::<AtomicU64>(off).ok().map(|a| a.load(r)),
            }
        } else {
            let mut b = [0u8; 8];
            s.read_slice(&mut b[..size], off).ok()?;
            Some(u64::from_le_bytes(b))
        }
    }

    /// Writes `size` (1, 2, 4, 8) bytes of RAM at `pa`, marking the dirty bitmap; false if not
    /// RAM.
    #[inline(always)]
    pub fn write(&self, pa: u64, size: usize, v: u64) -> bool {
        let Some((region, off)) = self.find(pa, size) else {
            return false;
        };
        let s = &region.slice;
        if off & (size - 1) == 0 {
            use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64};
            let r = Ordering::Relaxed;
            let ok = match size {
                1 => s
                    .get_atomic_ref::<AtomicU8>(off)
                    .map(|a| a.store(v as u8, r)),
                2 => s
                    .get_atomic_ref::<AtomicU16>(off)
                    .map(|a| a.store(v as u16, r)),
                4 => s
                    .get_atomic_ref::<AtomicU32>(off)
                    .map(|a| a.store(v as u32, r)),
                _ => s.get_atomic_ref::<AtomicU64>(off).map(|a| a.store(v, r)),
            }
            .is_ok();
            // Data first, then the dirty bit (as `VolatileSlice::store` does), so a harvest
            // that clears the bit afterwards copies the new data. An aligned access stays in
            // one page.
            if region.page_bits {
                region.bitmap.set_bit(off >> 12);
            } else {
                region.bitmap.mark_dirty(off, size);
            }
            ok
        } else {
            // Byte stores rather than `write_slice`, whose bitmap slice would also call the
            // memory's write watch (for writes that are not a vCPU's; `note_write` follows).
            let bytes = v.to_le_bytes();
            for (k, &byte) in bytes.iter().take(size).enumerate() {
                match s.get_atomic_ref::<std::sync::atomic::AtomicU8>(off + k) {
                    Ok(a) => a.store(byte, Ordering::Relaxed),
                    Err(_) => return false,
                }
            }
            region.bitmap.mark_dirty(off, size);
            true
        }
    }

    /// The host address of the RAM page at `pa` (page aligned), if the whole page is RAM.
    pub fn host_page(&self, pa: u64) -> Option<u64> {
        let pa = pa & !0xfff;
        let (region, off) = self.find(pa, 0x1000)?;
        Some((region.slice.ptr_guard().as_ptr() as u64).wrapping_add(off as u64))
    }

    /// Marks the dirty bitmap for a write to RAM at `pa` done by other means (translated code);
    /// call after the data is written. False if `pa` is not RAM.
    pub fn mark_dirty(&self, pa: u64) -> bool {
        let Some((region, off)) = self.find(pa, 1) else {
            return false;
        };
        if region.page_bits {
            region.bitmap.set_bit(off >> 12);
        } else {
            region.bitmap.mark_dirty(off, 1);
        }
        true
    }

    /// Whether the dirty bitmap has the page of `pa` marked (false if not RAM).
    pub fn is_dirty(&self, pa: u64) -> bool {
        let Some((region, off)) = self.find(pa, 1) else {
            return false;
        };
        if region.page_bits {
            region.bitmap.is_bit_set(off >> 12)
        } else {
            use vm_memory::bitmap::Bitmap as _;
            region.slice.bitmap().dirty_at(off)
        }
    }

    /// Copies RAM at `pa` into `buf`; false if the range is not entirely RAM.
    pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> bool {
        match self.find(pa, buf.len()) {
            Some((r, off)) => r.slice.read_slice(buf, off).is_ok(),
            None => false,
        }
    }
}

/// Kind of a memory access, for permission checks and #PF error codes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Acc {
    Read,
    Write,
    Exec,
}

const PTE_P: u64 = 1;
const PTE_W: u64 = 2;
const PTE_U: u64 = 4;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

impl Exec<'_> {
    /// Translates a linear address. `user` is the privilege of the access (CPL 3 and not an
    /// implicit supervisor access).
    #[inline]
    pub fn translate(&mut self, lin: u64, acc: Acc, user: bool) -> Result<u64, Exc> {
        if self.cpu.cr0 & CR0_PG == 0 {
            return Ok(lin & 0xffff_ffff);
        }
        let vpn = lin >> 12;
        let e = self.cpu.tlb.e[(vpn as usize) & (TLB_SIZE - 1)];
        if e.vpn == vpn {
            let ok = match acc {
                Acc::Read => true,
                Acc::Write => e.pa & T_WRITE != 0,
                Acc::Exec => e.pa & T_NX == 0,
            } && (!user || e.pa & T_USER != 0);
            if ok {
                return Ok((e.pa & !0xfff) | (lin & 0xfff));
            }
        }
        self.walk(lin, acc, user)
    }

    fn pf(&mut self, lin: u64, code: u32) -> Exc {
        self.cpu.cr2 = lin;
        Exc::Fault(14, Some(code))
    }

    #[cold]
    #[inline(never)]
    fn walk(&mut self, lin: u64, acc: Acc, user: bool) -> Result<u64, Exc> {
        let nxe = self.cpu.efer & EFER_NXE != 0;
        let mut code: u32 = 0;
        if acc == Acc::Write {
            code |= 2;
        }
        if user {
            code |= 4;
        }
        if acc == Acc::Exec && nxe {
            code |= 16;
        }
        if !self.cpu.long_mode() || self.cpu.cr4 & CR4_PAE == 0 {
            return self.walk_legacy(lin, acc, user, code);
        }
        // Canonical check is done by the caller for 64-bit; here only the walk.
        let mut table = self.cpu.cr3 & ADDR_MASK;
        let mut w = true;
        let mut u = true;
        let mut nx = false;
        let mut entries = [(0u64, 0u64); 4];
        let mut depth = 0;
        let mut level = 4;
        let (phys, page_mask) = loop {
            let index = (lin >> (12 + 9 * (level - 1))) & 0x1ff;
            let ea = table + index * 8;
            let pte = self.phys_read_u64_ram(ea).ok_or_else(|| {
                Exc::unhandled(format!(
                    "page table at {ea:#x} is outside RAM (walking {lin:#x})"
                ))
            })?;
            if pte & PTE_P == 0 {
                return Err(self.pf(lin, code));
            }
            entries[depth] = (ea, pte);
            depth += 1;
            w &= pte & PTE_W != 0;
            u &= pte & PTE_U != 0;
            nx |= nxe && pte & PTE_NX != 0;
            if level == 1 || (level <= 3 && pte & PTE_PS != 0) {
                let size_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
                break (pte & ADDR_MASK & !size_mask, size_mask);
            }
            table = pte & ADDR_MASK;
            level -= 1;
        };
        // Permission checks.
        let wp = self.cpu.cr0 & CR0_WP != 0;
        let denied =
            (user && !u) || (acc == Acc::Write && !w && (user || wp)) || (acc == Acc::Exec && nx);
        if denied {
            return Err(self.pf(lin, code | 1));
        }
        // Accessed bits on every level, dirty on the leaf for writes.
        for (i, (ea, pte)) in entries.iter().take(depth).enumerate() {
            let leaf = i + 1 == depth;
            let mut set = PTE_A;
            if leaf && acc == Acc::Write {
                set |= PTE_D;
            }
            if pte & set != set {
                self.phys_or_u64(*ea, set);
            }
        }
        let leaf = entries[depth.saturating_sub(1)].1;
        let dirty = leaf & PTE_D != 0 || acc == Acc::Write;
        let mut flags = 0;
        // Supervisor writes to read-only pages with CR0.WP=0 are allowed but not cached, so
        // they walk every time.
        if w && dirty {
            flags |= T_WRITE;
        }
        if u {
            flags |= T_USER;
        }
        if nx {
            flags |= T_NX;
        }
        if leaf & PTE_G != 0 && self.cpu.cr4 & crate::cpu::CR4_PGE != 0 {
            flags |= T_GLOBAL;
        }
        let pa = phys | (lin & page_mask);
        let vpn = lin >> 12;
        self.cpu.tlb.e[(vpn as usize) & (TLB_SIZE - 1)] = TlbEntry {
            vpn,
            pa: (pa & !0xfff) | flags,
        };
        Ok(pa)
    }

    fn walk_legacy(&mut self, lin: u64, acc: Acc, user: bool, code: u32) -> Result<u64, Exc> {
        let lin = lin & 0xffff_ffff;
        if self.cpu.cr4 & CR4_PAE != 0 {
            // PAE paging outside long mode: PDPTE from CR3, then PD/PT with 8-byte entries.
            let pdpte_addr = (self.cpu.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
            let pdpte = self.phys_read_u64_ram(pdpte_addr).unwrap_or(0);
            if pdpte & PTE_P == 0 {
                return Err(self.pf(lin, code));
            }
            let pde_addr = (pdpte & ADDR_MASK) + ((lin >> 21) & 0x1ff) * 8;
            let pde = self.phys_read_u64_ram(pde_addr).unwrap_or(0);
            if pde & PTE_P == 0 {
                return Err(self.pf(lin, code));
            }
            if pde & PTE_PS != 0 {
                self.check_legacy(lin, acc, user, code, pde, pde)?;
                self.phys_or_u64(pde_addr, PTE_A | if acc == Acc::Write { PTE_D } else { 0 });
                return Ok((pde & ADDR_MASK & !0x1f_ffff) | (lin & 0x1f_ffff));
            }
            let pte_addr = (pde & ADDR_MASK) + ((lin >> 12) & 0x1ff) * 8;
            let pte = self.phys_read_u64_ram(pte_addr).unwrap_or(0);
            if pte & PTE_P == 0 {
                return Err(self.pf(lin, code));
            }
            self.check_legacy(lin, acc, user, code, pde, pte)?;
            self.phys_or_u64(pde_addr, PTE_A);
            self.phys_or_u64(pte_addr, PTE_A | if acc == Acc::Write { PTE_D } else { 0 });
            return Ok((pte & ADDR_MASK) | (lin & 0xfff));
        }
        let pde_addr = (self.cpu.cr3 & 0xffff_f000) + (lin >> 22) * 4;
        let pde = u64::from(self.phys_read_u32_ram(pde_addr).unwrap_or(0));
        if pde & PTE_P == 0 {
            return Err(self.pf(lin, code));
        }
        if pde & PTE_PS != 0 && self.cpu.cr4 & crate::cpu::CR4_PSE != 0 {
            self.check_legacy(lin, acc, user, code, pde, pde)?;
            return Ok((pde & 0xffc0_0000) | (lin & 0x3f_ffff));
        }
        let pte_addr = (pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
        let pte = u64::from(self.phys_read_u32_ram(pte_addr).unwrap_or(0));
        if pte & PTE_P == 0 {
            return Err(self.pf(lin, code));
        }
        self.check_legacy(lin, acc, user, code, pde, pte)?;
        Ok((pte & 0xffff_f000) | (lin & 0xfff))
    }

    fn check_legacy(
        &mut self,
        lin: u64,
        acc: Acc,
        user: bool,
        code: u32,
        pde: u64,
        pte: u64,
    ) -> Result<(), Exc> {
        let w = pde & pte & PTE_W != 0;
        let u = pde & pte & PTE_U != 0;
        let wp = self.cpu.cr0 & CR0_WP != 0;
        if (user && !u) || (acc == Acc::Write && !w && (user || wp)) {
            return Err(self.pf(lin, code | 1));
        }
        Ok(())
    }

    fn phys_read_u64_ram(&self, pa: u64) -> Option<u64> {
        self.ram.read(pa, 8)
    }

    fn phys_read_u32_ram(&self, pa: u64) -> Option<u32> {
        self.ram.read(pa, 4).map(|v| v as u32)
    }

    /// Atomically ORs bits into a page-table entry in RAM (A/D bits).
    fn phys_or_u64(&mut self, pa: u64, bits: u64) {
        if let Ok(s) = self.mem.get_slice(GuestAddress(pa), 8)
            && let Ok(a) = s.get_atomic_ref::<std::sync::atomic::AtomicU64>(0)
        {
            a.fetch_or(bits, Ordering::SeqCst);
            self.ram.mark_dirty(pa);
            self.note_write(pa);
        }
    }

    #[inline]
    pub fn note_write(&mut self, pa: u64) {
        if self.vm.code.on_write(pa >> 12) {
            // Cached code of this page is stale: leave the block being executed.
            self.cpu.code_written = true;
        }
    }

    #[inline]
    fn is_lapic(&self, pa: u64) -> bool {
        self.lapic_enabled
            && self.apic_hw_enabled()
            && (pa & !0xfff) == (self.cpu.apic_base & 0x000f_ffff_ffff_f000)
    }

    /// Reads `size` (1, 2, 4, 8) bytes at a physical address that does not cross a page.
    pub fn phys_read(&mut self, pa: u64, size: usize) -> Result<u64, Exc> {
        if let Some(v) = self.ram.read(pa, size) {
            return Ok(v);
        }
        if self.is_lapic(pa) {
            return self.lapic_read(pa, size);
        }
        let mut b = [0u8; 8];
        self.io.mmio_read(pa, &mut b[..size]);
        Ok(u64::from_le_bytes(b))
    }

    #[inline]
    pub fn phys_write(&mut self, pa: u64, size: usize, v: u64) -> Result<(), Exc> {
        if self.ram.write(pa, size, v) {
            self.note_write(pa);
            return Ok(());
        }
        self.phys_write_slow(pa, size, v)
    }

    fn phys_write_slow(&mut self, pa: u64, size: usize, v: u64) -> Result<(), Exc> {
        if self.is_lapic(pa) {
            return self.lapic_write(pa, size, v);
        }
        self.io.mmio_write(pa, &v.to_le_bytes()[..size]);
        Ok(())
    }

    #[inline]
    fn user_access(&self) -> bool {
        self.cpu.cpl == 3
    }

    /// Reads `size` bytes (1..=8) at a linear address. The fast path (inside a page, TLB hit,
    /// RAM) is inlined into the handlers; everything else goes through `read_lin_as`.
    #[inline(always)]
    pub fn read_lin(&mut self, lin: u64, size: usize) -> Result<u64, Exc> {
        if (lin & 0xfff) as usize + size <= 0x1000 && self.cpu.cr0 & CR0_PG != 0 {
            let vpn = lin >> 12;
            let e = self.cpu.tlb.e[(vpn as usize) & (TLB_SIZE - 1)];
            if e.vpn == vpn
                && (self.cpu.cpl != 3 || e.pa & T_USER != 0)
                && let Some(v) = self.ram.read((e.pa & !0xfff) | (lin & 0xfff), size)
            {
                return Ok(v);
            }
        }
        self.read_lin_slow(lin, size)
    }

    #[inline(never)]
    fn read_lin_slow(&mut self, lin: u64, size: usize) -> Result<u64, Exc> {
        let user = self.user_access();
        self.read_lin_as(lin, size, user)
    }

    pub fn read_lin_as(&mut self, lin: u64, size: usize, user: bool) -> Result<u64, Exc> {
        if (lin & 0xfff) as usize + size <= 0x1000 {
            let pa = self.translate(lin, Acc::Read, user)?;
            return self.phys_read(pa, size);
        }
        let first = 0x1000 - (lin & 0xfff) as usize;
        let pa0 = self.translate(lin, Acc::Read, user)?;
        let pa1 = self.translate(lin.wrapping_add(first as u64), Acc::Read, user)?;
        let mut v = 0u64;
        for i in 0..size {
            let pa = if i < first {
                pa0 + i as u64
            } else {
                pa1 + (i - first) as u64
            };
            v |= self.phys_read(pa, 1)? << (8 * i);
        }
        Ok(v)
    }

    /// Writes `size` bytes (1..=8) at a linear address; fast path as in `read_lin`.
    #[inline(always)]
    pub fn write_lin(&mut self, lin: u64, size: usize, v: u64) -> Result<(), Exc> {
        if (lin & 0xfff) as usize + size <= 0x1000 && self.cpu.cr0 & CR0_PG != 0 {
            let vpn = lin >> 12;
            let e = self.cpu.tlb.e[(vpn as usize) & (TLB_SIZE - 1)];
            if e.vpn == vpn && e.pa & T_WRITE != 0 && (self.cpu.cpl != 3 || e.pa & T_USER != 0) {
                let pa = (e.pa & !0xfff) | (lin & 0xfff);
                if self.ram.write(pa, size, v) {
                    self.note_write(pa);
                    return Ok(());
                }
            }
        }
        self.write_lin_slow(lin, size, v)
    }

    #[inline(never)]
    fn write_lin_slow(&mut self, lin: u64, size: usize, v: u64) -> Result<(), Exc> {
        let user = self.user_access();
        self.write_lin_as(lin, size, v, user)
    }

    pub fn write_lin_as(&mut self, lin: u64, size: usize, v: u64, user: bool) -> Result<(), Exc> {
        if (lin & 0xfff) as usize + size <= 0x1000 {
            let pa = self.translate(lin, Acc::Write, user)?;
            return self.phys_write(pa, size, v);
        }
        let first = 0x1000 - (lin & 0xfff) as usize;
        let pa0 = self.translate(lin, Acc::Write, user)?;
        let pa1 = self.translate(lin.wrapping_add(first as u64), Acc::Write, user)?;
        for i in 0..size {
            let pa = if i < first {
                pa0 + i as u64
            } else {
                pa1 + (i - first) as u64
            };
            self.phys_write(pa, 1, (v >> (8 * i)) & 0xff)?;
        }
        Ok(())
    }

    /// Reads `size` bytes (1..=8) that the instruction then writes back (the destination of a
    /// read-modify-write such as `add [m], r` or `btr [m], 3`): the access is checked as a write
    /// first, so a fault has the write's error code (W=1) as on the CPU, which reports a
    /// read-modify-write operand's fault as a write even when the page is not present. Fast path
    /// as in `write_lin`.
    #[inline(always)]
    pub fn read_lin_rmw(&mut self, lin: u64, size: usize) -> Result<u64, Exc> {
        if (lin & 0xfff) as usize + size <= 0x1000 && self.cpu.cr0 & CR0_PG != 0 {
            let vpn = lin >> 12;
            let e = self.cpu.tlb.e[(vpn as usize) & (TLB_SIZE - 1)];
            if e.vpn == vpn
                && e.pa & T_WRITE != 0
                && (self.cpu.cpl != 3 || e.pa & T_USER != 0)
                && let Some(v) = self.ram.read((e.pa & !0xfff) | (lin & 0xfff), size)
            {
                return Ok(v);
            }
        }
        self.probe_write(lin, size)?;
        self.read_lin(lin, size)
    }

    /// Checks that `size` bytes at `lin` are writable without writing (for instructions that
    /// must fault before changing anything).
    pub fn probe_write(&mut self, lin: u64, size: usize) -> Result<(), Exc> {
        let user = self.user_access();
        self.translate(lin, Acc::Write, user)?;
        let last = lin.wrapping_add(size as u64 - 1);
        if last >> 12 != lin >> 12 {
            // The second page from its first byte: a fault there has that address in CR2.
            self.translate(last & !0xfff, Acc::Write, user)?;
        }
        Ok(())
    }

    pub fn read_u128(&mut self, lin: u64) -> Result<u128, Exc> {
        let lo = self.read_lin(lin, 8)?;
        let hi = self.read_lin(lin.wrapping_add(8), 8)?;
        Ok(u128::from(lo) | (u128::from(hi) << 64))
    }

    pub fn write_u128(&mut self, lin: u64, v: u128) -> Result<(), Exc> {
        self.probe_write(lin, 16)?;
        self.write_lin(lin, 8, v as u64)?;
        self.write_lin(lin.wrapping_add(8), 8, (v >> 64) as u64)
    }

    /// Locked read-modify-write of `size` bytes at `lin`: `f(old)` gives the new value, or
    /// `None` to leave memory unchanged. Returns the old value. Aligned RAM operands use a host
    /// atomic compare-exchange loop, so they are atomic against every other vCPU's accesses.
    pub fn locked_rmw(
        &mut self,
        lin: u64,
        size: usize,
        mut f: impl FnMut(u64) -> Option<u64>,
    ) -> Result<u64, Exc> {
        use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64};
        let user = self.user_access();
        let aligned = lin & (size as u64 - 1) == 0;
        if aligned {
            let pa = self.translate(lin, Acc::Write, user)?;
            if let Ok(s) = self.mem.get_slice(GuestAddress(pa), size) {
                macro_rules! cas {
                    ($t:ty, $v:ty) => {
                        if let Ok(a) = s.get_atomic_ref::<$t>(0) {
                            let mut old = a.load(Ordering::SeqCst);
                            loop {
                                let Some(new) = f(old as u64) else {
                                    return Ok(old as u64);
                                };
                                match a.compare_exchange(
                                    old,
                                    new as $v,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                ) {
                                    Ok(_) => {
                                        self.ram.mark_dirty(pa);
                                        self.note_write(pa);
                                        return Ok(old as u64);
                                    }
                                    Err(cur) => old = cur,
                                }
                            }
                        }
                    };
                }
                match size {
                    1 => cas!(AtomicU8, u8),
                    2 => cas!(AtomicU16, u16),
                    4 => cas!(AtomicU32, u32),
                    _ => cas!(AtomicU64, u64),
                }
            }
        }
        // Misaligned or not RAM: serialize with the VM-wide lock.
        let vm = self.vm;
        let _g = crate::vm::lock(&vm.atomic_lock);
        self.probe_write(lin, size)?;
        let old = self.read_lin(lin, size)?;
        if let Some(new) = f(old) {
            self.write_lin(lin, size, new)?;
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::Ram;

    #[test]
    fn ram_stores_mark_the_dirty_bitmap() {
        let mem = hv::GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .unwrap();
        let ram = Ram::new(&mem);
        assert!(ram.regions.iter().all(|r| r.page_bits));
        assert!(ram.write(0x3008, 8, 1));
        assert!(ram.write(0x100000 + 0x5002, 2, 2));
        assert!(ram.write(0x7ffd, 4, 3), "unaligned, across a page");
        assert!(!ram.write(0x20000, 8, 4), "not RAM");
        assert_eq!(ram.read(0x3008, 8), Some(1));
        assert_eq!(ram.read(0x7ffd, 4), Some(3));
        let dirty = |a: u64| {
            let (r, off) = mem.to_region_addr(GuestAddress(a)).unwrap();
            r.bitmap().dirty_at(off.0 as usize)
        };
        for a in [0x3000, 0x100000 + 0x5000, 0x7000, 0x8000] {
            assert!(dirty(a), "{a:#x} not marked");
        }
        for a in [0x0, 0x4000, 0x9000, 0x100000] {
            assert!(!dirty(a), "{a:#x} marked");
        }
    }
}
