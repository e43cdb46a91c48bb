//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP prefixes.
//!
//! A REP instruction runs at most `CHUNK` iterations per step and then re-executes, so
//! interrupts are taken between chunks. Forward `rep movs`/`rep stos` on RAM copy or fill a
//! page-sized run at a time.

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
                if step == size as u64
                    && matches!(
                        mn,
                        M::Movsb
                            | M::Movsw
                            | M::Movsd
                            | M::Movsq
                            | M::Stosb
                            | M::Stosw
                            | M::Stosd
                            | M::Stosq
                    )
                {
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

    /// Forward `rep movs/stos` over RAM within one page of each operand. Returns the number of
    /// elements done (0 = take the slow path).
    fn string_bulk(
        &mut self,
        mn: M,
        size: usize,
        asz: usize,
        count: u64,
        src_seg: Register,
    ) -> R<u64> {
        let am = mask(asz);
        let di = self.cpu.gpr[7] & am;
        let d = self.seg_lin(Register::ES, di);
        let user = self.cpu.cpl == 3;
        let mut bytes = 0x1000 - (d & 0xfff);
        let is_movs = matches!(mn, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
        let s = if is_movs {
            let si = self.cpu.gpr[6] & am;
            let s = self.seg_lin(src_seg, si);
            bytes = bytes.min(0x1000 - (s & 0xfff));
            s
        } else {
            0
        };
        // Whole elements only, and no wrap of the index registers.
        let mut n = (bytes / size as u64).min(count).min(CHUNK);
        if asz < 8 {
            n = n.min(((am - di) / size as u64).max(1));
        }
        if n < 2 {
            return Ok(0);
        }
        let len = (n as usize) * size;
        let dpa = self.translate(d, Acc::Write, user)?;
        let mut buf = [0u8; 4096];
        if is_movs {
            let spa = self.translate(s, Acc::Read, user)?;
            // Overlap where forward element copy differs from a block copy: slow path.
            if dpa > spa && dpa < spa + len as u64 {
                return Ok(0);
            }
            if self
                .mem
                .read_slice(&mut buf[..len], GuestAddress(spa))
                .is_err()
            {
                return Ok(0);
            }
        } else {
            let v = self.cpu.gpr[0].to_le_bytes();
            for (k, b) in buf[..len].iter_mut().enumerate() {
                *b = v[k % size];
            }
        }
        if self
            .mem
            .write_slice(&buf[..len], GuestAddress(dpa))
            .is_err()
        {
            return Ok(0);
        }
        self.note_write(dpa);
        let adv = n * size as u64;
        self.adv(7, asz, adv);
        if is_movs {
            self.adv(6, asz, adv);
        }
        let c = (self.cpu.gpr[1] & am).wrapping_sub(n) & am;
        self.set_gpr_sized(1, asz, c);
        Ok(n)
    }
}
