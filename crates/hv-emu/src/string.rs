//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP prefixes.
//!
//! A REP instruction runs at most `CHUNK` iterations per step and then re-executes, so
//! interrupts are taken between chunks. `rep movs`/`rep stos` on RAM (either direction) copy or
//! fill the elements that stay within one page of each operand at once, with the state a fault
//! leaves exactly that of the per-element loop (`string_bulk`).

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};
use vm_memory::{Bytes, GuestAddress};

use crate::cpu::*;
use crate::exec::{Exc, Exec, R, alu, mask};
use crate::mmu::Acc;

const CHUNK: u64 = 16384;

fn addr_size(i: &Instruction) -> usize {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return 8,
            _ => {}
        }
    }
    // INS/OUTS with DX operand also have one memory operand, handled above.
    8
}

impl Exec<'_> {
    pub fn string(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let size = match mn {
            M::Movsb | M::Stosb | M::Lodsb | M::Scasb | M::Cmpsb | M::Insb | M::Outsb => 1,
            M::Movsw | M::Stosw | M::Lodsw | M::Scasw | M::Cmpsw | M::Insw | M::Outsw => 2,
            M::Movsd | M::Stosd | M::Lodsd | M::Scasd | M::Cmpsd | M::Insd | M::Outsd => 4,
            _ => 8,
        };
        let asz = addr_size(i);
        let am = mask(asz);
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let step: u64 = if self.flag(DF) {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let src_seg = i.memory_segment();
        if matches!(
            mn,
            M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
        ) {
            self.check_io_priv()?;
        }
        let mut done: u64 = 0;
        loop {
            if rep {
                let c = self.cpu.gpr[1] & am;
                if c == 0 {
                    return Ok(());
                }
                if done >= CHUNK {
                    // Resume this instruction after giving interrupts a chance.
                    self.cpu.rip = i.ip();
                    return Ok(());
                }
                if matches!(
                    mn,
                    M::Movsb
                        | M::Movsw
                        | M::Movsd
                        | M::Movsq
                        | M::Stosb
                        | M::Stosw
                        | M::Stosd
                        | M::Stosq
                ) {
                    let n = self.string_bulk(mn, size, asz, c, src_seg)?;
                    if n > 0 {
                        done += n;
                        continue;
                    }
                }
            }
            let si = self.cpu.gpr[6] & am;
            let di = self.cpu.gpr[7] & am;
            let mut stop = false;
            match mn {
                M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                    let s = self.seg_lin(src_seg, si);
                    let d = self.seg_lin(Register::ES, di);
                    let v = self.read_lin(s, size)?;
                    self.write_lin(d, size, v)?;
                    self.adv(6, asz, step);
                    self.adv(7, asz, step);
                }
                M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                    let d = self.seg_lin(Register::ES, di);
                    let v = self.cpu.gpr[0] & mask(size);
                    self.write_lin(d, size, v)?;
                    self.adv(7, asz, step);
                }
                M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                    let s = self.seg_lin(src_seg, si);
                    let v = self.read_lin(s, size)?;
                    self.set_gpr_sized(0, size, v);
                    self.adv(6, asz, step);
                }
                M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
                    let d = self.seg_lin(Register::ES, di);
                    let v = self.read_lin(d, size)?;
                    let f = alu(7, size, self.cpu.gpr[0], v, false).1;
                    self.set_flags(ARITH_FLAGS, f);
                    self.adv(7, asz, step);
                    stop = true;
                }
                M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                    let s = self.seg_lin(src_seg, si);
                    let d = self.seg_lin(Register::ES, di);
                    let a = self.read_lin(s, size)?;
                    let b = self.read_lin(d, size)?;
                    let f = alu(7, size, a, b, false).1;
                    self.set_flags(ARITH_FLAGS, f);
                    self.adv(6, asz, step);
                    self.adv(7, asz, step);
                    stop = true;
                }
                M::Insb | M::Insw | M::Insd => {
                    let d = self.seg_lin(Register::ES, di);
                    self.probe_write(d, size)?;
                    let port = self.cpu.gpr[2] as u16;
                    let mut b = [0u8; 8];
                    self.io.pio_read(port, &mut b[..size]);
                    self.write_lin(d, size, u64::from_le_bytes(b))?;
                    self.adv(7, asz, step);
                }
                M::Outsb | M::Outsw | M::Outsd => {
                    let s = self.seg_lin(src_seg, si);
                    let v = self.read_lin(s, size)?;
                    let port = self.cpu.gpr[2] as u16;
                    self.io.pio_write(port, &v.to_le_bytes()[..size]);
                    self.adv(6, asz, step);
                }
                _ => return Err(Exc::unhandled(format!("{mn:?}"))),
            }
            if !rep {
                return Ok(());
            }
            let c = (self.cpu.gpr[1] & am).wrapping_sub(1) & am;
            self.set_gpr_sized(1, asz, c);
            done += 1;
            if stop {
                let z = self.flag(ZF);
                if (i.has_rep_prefix() && !z) || (i.has_repne_prefix() && z) {
                    return Ok(());
                }
            }
        }
    }

    fn adv(&mut self, reg: usize, asz: usize, step: u64) {
        let v = (self.cpu.gpr[reg] & mask(asz)).wrapping_add(step);
        self.set_gpr_sized(reg, asz, v);
    }

    /// `rep movs/stos` over RAM, both directions: the elements from the current one on that
    /// lie inside one page of each operand (and do not wrap the index registers) are done in
    /// one copy or fill. Returns the number of elements done (0 = take the per-element path).
    ///
    /// Exact against the per-element loop: the source is translated before the destination
    /// (the order of the first element's accesses, so a fault reports the same address and
    /// error code and leaves the same accessed/dirty bits), a fault leaves the registers at the
    /// element it happened on (earlier chunks are complete, this one has done nothing), and
    /// ranges where an element would read a byte an earlier element of the chunk wrote (a
    /// forward copy to a destination just above its source, or a backward one just below)
    /// take the per-element path.
    fn string_bulk(
        &mut self,
        mn: M,
        size: usize,
        asz: usize,
        count: u64,
        src_seg: Register,
    ) -> R<u64> {
        let am = mask(asz);
        let sz = size as u64;
        let back = self.flag(DF);
        let di = self.cpu.gpr[7] & am;
        let si = self.cpu.gpr[6] & am;
        let d = self.seg_lin(Register::ES, di);
        let is_movs = matches!(mn, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
        let s = if is_movs {
            self.seg_lin(src_seg, si)
        } else {
            0
        };
        // Elements of one operand that stay in the page of its current element, and in the
        // index register's range.
        let run = |lin: u64, idx: u64| -> u64 {
            let off = lin & 0xfff;
            if off + sz > 0x1000 {
                return 0;
            }
            let (in_page, in_reg) = if back {
                (off / sz + 1, (idx / sz).saturating_add(1))
            } else {
                ((0x1000 - off) / sz, ((am - idx) / sz).saturating_add(1))
            };
            in_page.min(in_reg)
        };
        let mut n = run(d, di).min(count).min(CHUNK);
        if is_movs {
            n = n.min(run(s, si));
        }
        if n < 2 {
            return Ok(0);
        }
        let len = n * sz;
        // Lowest address of the chunk on an operand whose current element is at `lin`.
        let low = |lin: u64| if back { lin - (len - sz) } else { lin };
        let user = self.cpu.cpl == 3;
        let mut buf = [0u8; 4096];
        let Some(chunk) = buf.get_mut(..len as usize) else {
            return Ok(0);
        };
        // The source is read (RAM only: no side effects) before the destination is
        // translated, as the first element does.
        let slo = if is_movs {
            let slo = low(self.translate(s, Acc::Read, user)?);
            if !self.ram.read_bytes(slo, chunk) {
                return Ok(0);
            }
            Some(slo)
        } else {
            let v = self.cpu.gpr[0].to_le_bytes();
            for (k, b) in chunk.iter_mut().enumerate() {
                *b = v.get(k % size).copied().unwrap_or(0);
            }
            None
        };
        let dlo = low(self.translate(d, Acc::Write, user)?);
        if let Some(slo) = slo {
            let overlaps = if back {
                dlo < slo && slo < dlo + len
            } else {
                slo < dlo && dlo < slo + len
            };
            if overlaps {
                return Ok(0);
            }
        }
        if self.ram.host_page(dlo).is_none()
            || self.mem.write_slice(chunk, GuestAddress(dlo)).is_err()
        {
            return Ok(0);
        }
        self.note_write(dlo);
        let adv = if back { len.wrapping_neg() } else { len };
        self.adv(7, asz, adv);
        if is_movs {
            self.adv(6, asz, adv);
        }
        let c = (self.cpu.gpr[1] & am).wrapping_sub(n) & am;
        self.set_gpr_sized(1, asz, c);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    //! The bulk `rep movs`/`rep stos` path against the architectural definition: the same
    //! instruction without `rep`, run once per element with the count decremented in between,
    //! under 4-level paging with a not-present page, a read-only page and two linear pages
    //! aliasing one physical page. Registers, flags, CR2, the fault, and all of memory (data
    //! and the page tables' accessed/dirty bits) must agree.

    use iced_x86::{Decoder, DecoderOptions, Instruction};
    use vm_memory::{Bytes, GuestAddress};

    use crate::cpu::*;
    use crate::exec::{Exc, mask};
    use crate::testutil::{Rng, assert_same_memory, exec};
    use crate::vm::VmShared;

    const MEM: usize = 1 << 20;
    /// Linear pages 0x10..0x30 are the data pages (identity-mapped but for these).
    const ABSENT: u64 = 0x18;
    const READ_ONLY: u64 = 0x1c;
    /// Linear page `ALIAS` maps the physical page `ALIAS + 1`.
    const ALIAS: u64 = 0x20;

    fn memory(seed: u64) -> hv::GuestMemory {
        let m = hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let fill: Vec<u8> = (0..MEM / 8)
            .flat_map(|k| (k as u64).wrapping_mul(seed | 1).to_le_bytes())
            .collect();
        m.write_slice(&fill, GuestAddress(0)).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 (linear 0..2 MiB); A and D
        // clear everywhere, so the walks' updates show in memory.
        let table = |at: u64, k: u64, v: u64| m.write_obj(v, GuestAddress(at + 8 * k)).unwrap();
        for at in [0x1000u64, 0x2000, 0x3000, 0x4000] {
            for k in 0..512 {
                table(at, k, 0);
            }
        }
        table(0x1000, 0, 0x2000 | 7);
        table(0x2000, 0, 0x3000 | 7);
        table(0x3000, 0, 0x4000 | 7);
        for page in 0x10..0x30u64 {
            let pte = match page {
                ABSENT => 0,
                READ_ONLY => (page << 12) | 5,
                ALIAS => ((ALIAS + 1) << 12) | 7,
                _ => (page << 12) | 7,
            };
            table(0x4000, page, pte);
        }
        m
    }

    fn cpu(rng: &mut Rng, asz: usize) -> Cpu {
        let mut c = crate::testutil::cpu64(rng, 0x10000, 0x20000, 1);
        c.cr0 = CR0_PE | CR0_PG | CR0_WP;
        c.cr4 = CR4_PAE;
        c.cr3 = 0x1000;
        // Addresses near page boundaries half of the time.
        for r in [6, 7] {
            if rng.next() & 1 == 0 {
                let page = 0x10 + rng.next() % 0x20;
                let off = (rng.next() % 24).wrapping_sub(12);
                c.gpr[r] = (page << 12).wrapping_add(off);
            }
            if asz == 4 {
                c.gpr[r] |= rng.next() << 32;
            }
        }
        c.gpr[1] = match rng.next() % 4 {
            0 => rng.next() % 8,
            1 => rng.next() % 600,
            _ => rng.next() % 9000,
        };
        if asz == 4 {
            c.gpr[1] |= rng.next() << 32;
        }
        if rng.next() & 1 == 0 {
            c.rflags |= DF;
        }
        c
    }

    fn decode(bytes: &[u8]) -> Instruction {
        let i = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
        assert!(!i.is_invalid(), "{bytes:x?}");
        i
    }

    /// Runs `i` (a `rep` form) to the end or to a fault, as the run loop would (it
    /// re-executes after every chunk); with `per_element`, runs `one` (the same without
    /// `rep`) once per element instead.
    fn run(
        c: &mut Cpu,
        mem: &hv::GuestMemory,
        vm: &VmShared,
        i: &Instruction,
        one: &Instruction,
        asz: usize,
        per_element: bool,
    ) -> Result<(), Exc> {
        exec(c, mem, vm, |ex| {
            let am = mask(asz);
            for _ in 0..100_000 {
                let count = ex.cpu.gpr[1] & am;
                if count == 0 {
                    return Ok(());
                }
                ex.cpu.rip = i.next_ip();
                if per_element {
                    ex.string(one)?;
                    let v = count.wrapping_sub(1) & am;
                    ex.set_gpr_sized(1, asz, v);
                } else {
                    ex.string(i)?;
                }
            }
            panic!("no end");
        })
    }

    /// Raw encodings: code_asm has no address-size override for string instructions.
    const FORMS: [(&str, &[u8]); 8] = [
        ("movsb", &[0xa4]),
        ("movsw", &[0x66, 0xa5]),
        ("movsd", &[0xa5]),
        ("movsq", &[0x48, 0xa5]),
        ("stosb", &[0xaa]),
        ("stosw", &[0x66, 0xab]),
        ("stosd", &[0xab]),
        ("stosq", &[0x48, 0xab]),
    ];

    #[test]
    fn bulk_rep_movs_stos_match_the_per_element_loop() {
        let vm = VmShared::new(hv::CpuModel::portable(), 1, 1_000_000, MEM as u64);
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut faults = 0;
        let mut backward = 0;
        for (name, body) in FORMS {
            for addr32 in [false, true] {
                let asz = if addr32 { 4 } else { 8 };
                let pre: &[u8] = if addr32 { &[0x67] } else { &[] };
                let rep = decode(&[pre, &[0xf3], body].concat());
                let one = decode(&[pre, body].concat());
                for _ in 0..150 {
                    let seed = rng.next();
                    let mut a = cpu(&mut Rng(seed | 1), asz);
                    let mut b = cpu(&mut Rng(seed | 1), asz);
                    let (ma, mb) = (memory(seed), memory(seed));
                    let ra = run(&mut a, &ma, &vm, &rep, &one, asz, false);
                    let rb = run(&mut b, &mb, &vm, &rep, &one, asz, true);
                    let ctx = format!("{name} addr32 {addr32} seed {seed:#x}");
                    assert_eq!(format!("{ra:?}"), format!("{rb:?}"), "{ctx}: result");
                    assert_eq!(a.gpr, b.gpr, "{ctx}: registers");
                    assert_eq!(a.rflags, b.rflags, "{ctx}: flags");
                    assert_eq!(a.cr2, b.cr2, "{ctx}: cr2");
                    assert_same_memory(&ma, &mb, MEM, &ctx);
                    faults += usize::from(ra.is_err());
                    backward += usize::from(a.rflags & DF != 0);
                }
            }
        }
        // The generator must reach the cases this is about.
        assert!(faults > 300, "{faults} faults");
        assert!(backward > 800, "{backward} backward");
    }

    fn one_case(bytes: &[u8], set: impl Fn(&mut Cpu)) -> (Cpu, hv::GuestMemory, Result<(), Exc>) {
        let vm = VmShared::new(hv::CpuModel::portable(), 1, 1_000_000, MEM as u64);
        let mut c = cpu(&mut Rng(7), 8);
        set(&mut c);
        let m = memory(3);
        let i = decode(bytes);
        let r = run(&mut c, &m, &vm, &i, &i, 8, false);
        (c, m, r)
    }

    /// Runs `bytes` from the state `set` makes: it must stop at a page fault with error code
    /// `error`, leaving CR2, RDI and RCX as `want` says.
    fn faults(
        bytes: &[u8],
        set: impl Fn(&mut Cpu),
        error: u32,
        want: (u64, u64, u64),
    ) -> (Cpu, hv::GuestMemory) {
        let (c, m, r) = one_case(bytes, set);
        assert!(
            matches!(r, Err(Exc::Fault(14, Some(e))) if e == error),
            "{r:?}"
        );
        assert_eq!((c.cr2, c.gpr[7], c.gpr[1]), want);
        (c, m)
    }

    /// The state of a forward copy of `count` elements from `src` to `dst`.
    fn forward(src: u64, dst: u64, count: u64) -> impl Fn(&mut Cpu) {
        move |c| {
            c.rflags &= !DF;
            c.gpr[6] = src;
            c.gpr[7] = dst;
            c.gpr[1] = count;
        }
    }

    #[test]
    fn a_fault_on_the_second_page_stops_at_its_first_element() {
        // Forward: 0x100 quadwords from 0x17f80 (16 in page 0x17, then page 0x18 is absent).
        let from = forward(0x17f80, 0x12000, 0x100);
        let (c, _) = faults(&[0xf3, 0x48, 0xa5], from, 0, (0x18000, 0x12080, 0xf0));
        assert_eq!(c.gpr[6], 0x18000);
        // Backward: stores from 0x19010 down into the absent page 0x18 after 3 elements
        // (0x19010, 0x19008, 0x19000), then a write fault at 0x18ff8.
        let backward = |c: &mut Cpu| {
            c.rflags |= DF;
            c.gpr[7] = 0x19010;
            c.gpr[1] = 10;
        };
        faults(&[0xf3, 0x48, 0xab], backward, 2, (0x18ff8, 0x18ff8, 7));
        // A read-only destination page: write fault with P=1, nothing stored.
        let read_only = |c: &mut Cpu| {
            c.rflags &= !DF;
            c.gpr[0] = 0xab;
            c.gpr[7] = 0x1bffe;
            c.gpr[1] = 4;
        };
        let (_, m) = faults(&[0xf3, 0xaa], read_only, 3, (0x1c000, 0x1c000, 2));
        let b: u8 = m.read_obj(GuestAddress(0x1bfff)).unwrap();
        assert_eq!(b, 0xab);
    }

    #[test]
    fn overlapping_copies_keep_element_order() {
        // Forward by one byte over itself: the first byte is replicated (memset-like).
        let (_, m, r) = one_case(&[0xf3, 0xa4], forward(0x12100, 0x12101, 0x200));
        assert!(r.is_ok());
        let first: u8 = m.read_obj(GuestAddress(0x12100)).unwrap();
        let mut got = [0u8; 0x201];
        m.read_slice(&mut got, GuestAddress(0x12100)).unwrap();
        assert!(got.iter().all(|&b| b == first));
        // Forward one page to its alias: linear 0x20000 is physical 0x21000, so copying
        // from 0x21000 to 0x20008 overlaps physically, and replicates the first quadword.
        let (_, m, r) = one_case(&[0xf3, 0x48, 0xa5], forward(0x21000, 0x20008, 0x40));
        assert!(r.is_ok());
        let q0: u64 = m.read_obj(GuestAddress(0x21000)).unwrap();
        for k in 0..=0x40u64 {
            let q: u64 = m.read_obj(GuestAddress(0x21000 + 8 * k)).unwrap();
            assert_eq!(q, q0, "quadword {k}");
        }
    }
}
