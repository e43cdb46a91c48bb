//! Guest page-table walk, for fetching the bytes of an instruction KVM could not complete.

use hv::{GuestMemory, SpecialRegisters};
use vm_memory::{Bytes, GuestAddress};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

fn read_u64(mem: &GuestMemory, gpa: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(gpa)).ok()
}

fn read_u32(mem: &GuestMemory, gpa: u64) -> Option<u32> {
    mem.read_obj::<u32>(GuestAddress(gpa)).ok()
}

/// Linear → guest-physical under the paging mode of `sregs`. `None` when not mapped.
pub fn translate(sregs: &SpecialRegisters, mem: &GuestMemory, la: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(la & 0xffff_ffff);
    }
    if sregs.efer & EFER_LMA != 0 {
        let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = sregs.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let entry = read_u64(mem, table + ((la >> shift) & 0x1ff) * 8)?;
            if entry & PRESENT == 0 {
                return None;
            }
            if level <= 3 && level > 1 && entry & PAGE_SIZE_BIT != 0 {
                let size = 1u64 << shift;
                return Some((entry & ADDR_MASK & !(size - 1)) | (la & (size - 1)));
            }
            table = entry & ADDR_MASK;
        }
        return Some(table | (la & 0xfff));
    }
    if sregs.cr4 & CR4_PAE != 0 {
        let la = la & 0xffff_ffff;
        let pdpte = read_u64(mem, (sregs.cr3 & 0xffff_ffe0) + (la >> 30) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & ADDR_MASK) + ((la >> 21) & 0x1ff) * 8)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PAGE_SIZE_BIT != 0 {
            return Some((pde & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff));
        }
        let pte = read_u64(mem, (pde & ADDR_MASK) + ((la >> 12) & 0x1ff) * 8)?;
        if pte & PRESENT == 0 {
            return None;
        }
        return Some((pte & ADDR_MASK) | (la & 0xfff));
    }
    let la = la & 0xffff_ffff;
    let pde = u64::from(read_u32(mem, (sregs.cr3 & 0xffff_f000) + (la >> 22) * 4)?);
    if pde & PRESENT == 0 {
        return None;
    }
    if sregs.cr4 & CR4_PSE != 0 && pde & PAGE_SIZE_BIT != 0 {
        // 4 MiB page; bits 20:13 are physical-address bits 39:32 (PSE-36).
        let high = ((pde >> 13) & 0xff) << 32;
        return Some(high | (pde & 0xffc0_0000) | (la & 0x3f_ffff));
    }
    let pte = u64::from(read_u32(
        mem,
        (pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4,
    )?);
    if pte & PRESENT == 0 {
        return None;
    }
    Some((pte & 0xffff_f000) | (la & 0xfff))
}

/// Up to [`MAX_INSN_LEN`] bytes at CS:RIP, stopping early at an unmapped page or memory that is
/// not RAM.
pub fn fetch_instruction(sregs: &SpecialRegisters, mem: &GuestMemory, rip: u64) -> Vec<u8> {
    let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cs.l;
    let base = if long_mode { 0 } else { sregs.cs.base };
    let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
    for i in 0..MAX_INSN_LEN as u64 {
        let mut la = base.wrapping_add(rip).wrapping_add(i);
        if !long_mode {
            la &= 0xffff_ffff;
        }
        let Some(gpa) = translate(sregs, mem, la) else {
            break;
        };
        let mut b = [0u8; 1];
        if mem.read_slice(&mut b, GuestAddress(gpa)).is_err() {
            break;
        }
        bytes.push(b[0]);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap_or_default()
    }

    #[test]
    fn long_mode_4k_and_2m_pages() {
        let m = mem();
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).is_ok();
        // PML4[0] -> 0x2000; PDPT[0] -> 0x3000; PD[0] -> 2 MiB page at 0x20_0000;
        // PD[1] -> PT at 0x4000; PT[5] -> 0x7000.
        assert!(w(0x1000, 0x2003) && w(0x2000, 0x3003) && w(0x3000, 0x20_0083));
        assert!(w(0x3008, 0x4003) && w(0x4000 + 5 * 8, 0x7003));
        let s = SpecialRegisters {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        assert_eq!(translate(&s, &m, 0x1234), Some(0x20_1234));
        assert_eq!(translate(&s, &m, 0x20_5abc), Some(0x7abc));
        assert_eq!(translate(&s, &m, 0x20_6000), None);
        assert_eq!(translate(&s, &m, 0x80_0000_0000), None);
    }

    #[test]
    fn fetch_stops_at_unmapped_page() {
        let m = mem();
        assert!(
            m.write_slice(&[0x90, 0xcc], GuestAddress(0x3f_fffe))
                .is_ok()
        );
        let s = SpecialRegisters::default(); // paging off: linear = physical
        assert_eq!(fetch_instruction(&s, &m, 0x3f_fffe), vec![0x90, 0xcc]);
    }

    #[test]
    fn legacy_paging_4m_page() {
        let m = mem();
        assert!(
            m.write_obj(0x0040_0083u32, GuestAddress(0x1000 + 4))
                .is_ok()
        );
        let s = SpecialRegisters {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            ..Default::default()
        };
        assert_eq!(translate(&s, &m, 0x0040_1234), Some(0x0040_1234));
        assert_eq!(translate(&s, &m, 0x1234), None);
    }
}
