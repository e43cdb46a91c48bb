//! Instruction fetch and the decoded-instruction cache.
//!
//! Entries are tagged with RIP, the physical address it maps to, the code bitness and the
//! VM-wide code generation. Writes to a guest page that holds cached code (self-modifying code,
//! the kernel's alternatives and static-key patching) bump the generation (see
//! `vm::CodeTracker`), which invalidates every entry. RIP-relative operands are resolved at
//! decode time, hence RIP in the tag.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use vm_memory::{Bytes, GuestAddress};

use crate::cpu::CS;
use crate::exec::{Exc, Exec};
use crate::mmu::Acc;

const CACHE_SIZE: usize = 1 << 14;

/// Instructions decoded (cache misses) by all vCPUs of this process.
pub static DECODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Clone, Copy, Default)]
struct Entry {
    rip: u64,
    phys: u64,
    generation: u64,
    bitness: u32,
    insn: Instruction,
}

pub struct DecodeCache {
    entries: Vec<Entry>,
    /// This vCPU's view of the VM-wide code generation.
    pub generation: u64,
    pub misses: u64,
}

impl DecodeCache {
    /// A cache with room for `2^14` instructions, or none at all when `enabled` is 0.
    pub fn new(enabled: usize) -> DecodeCache {
        DecodeCache {
            entries: if enabled != 0 {
                vec![Entry::default(); CACHE_SIZE]
            } else {
                Vec::new()
            },
            generation: 0,
            misses: 0,
        }
    }
}

#[inline]
fn slot(rip: u64) -> usize {
    ((rip ^ (rip >> 14)) as usize) & (CACHE_SIZE - 1)
}

impl Exec<'_> {
    /// Linear address of `rip` in the code segment.
    #[inline]
    pub fn code_lin(&self, rip: u64) -> u64 {
        if self.cpu.mode64() {
            rip
        } else {
            self.cpu.seg[CS].base.wrapping_add(rip) & 0xffff_ffff
        }
    }

    /// Fetches and decodes the instruction at RIP.
    pub fn fetch(&mut self) -> Result<Instruction, Exc> {
        let bitness = self.cpu.bitness();
        let rip = self.cpu.rip;
        let lin = self.code_lin(rip);
        if bitness == 64 && !canonical(lin) {
            return Err(Exc::Fault(13, Some(0)));
        }
        let user = self.cpu.cpl == 3;
        let pa = self.translate(lin, Acc::Exec, user)?;
        let use_cache = !self.cpu.cache.entries.is_empty();
        if use_cache {
            let e = &self.cpu.cache.entries[slot(rip)];
            if e.rip == rip
                && e.phys == pa
                && e.generation == self.cpu.cache.generation
                && e.bitness == bitness
            {
                return Ok(e.insn);
            }
        }
        // Mark the page before reading it, so a concurrent write invalidates what we read.
        let cacheable = use_cache && self.vm.code.mark(pa >> 12);
        let mut buf = [0u8; 15];
        let avail = (0x1000 - (lin & 0xfff) as usize).min(15);
        self.read_code(pa, &mut buf[..avail])?;
        let mut dec = Decoder::with_ip(bitness, &buf[..avail], rip, DecoderOptions::NONE);
        let mut insn = dec.decode();
        let mut crosses = false;
        if insn.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes && avail < 15 {
            crosses = true;
            let pa2 = self.translate(lin.wrapping_add(avail as u64), Acc::Exec, user)?;
            self.read_code(pa2, &mut buf[avail..])?;
            let mut dec = Decoder::with_ip(bitness, &buf, rip, DecoderOptions::NONE);
            insn = dec.decode();
        }
        if insn.is_invalid() {
            return Err(Exc::Fault(6, None));
        }
        DECODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if cacheable && !crosses {
            self.cpu.cache.misses += 1;
            let generation = self.cpu.cache.generation;
            self.cpu.cache.entries[slot(rip)] = Entry {
                rip,
                phys: pa,
                generation,
                bitness,
                insn,
            };
        }
        Ok(insn)
    }

    fn read_code(&mut self, pa: u64, buf: &mut [u8]) -> Result<(), Exc> {
        if self.mem.read_slice(buf, GuestAddress(pa)).is_ok() {
            return Ok(());
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.phys_read(pa + i as u64, 1)? as u8;
        }
        Ok(())
    }
}

#[inline]
pub fn canonical(a: u64) -> bool {
    let top = (a as i64) >> 47;
    top == 0 || top == -1
}
