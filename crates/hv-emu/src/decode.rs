//! Instruction fetch and the decoded-block cache.
//!
//! A block is a run of straight-line instructions decoded from one guest-physical page, each
//! with its handler and the RIP that follows it. It ends at the first instruction that can
//! branch or change how later instructions decode or are checked (far transfers, control
//! registers, descriptor tables, `sti`, ...), at the end of the page, or after `MAX_OPS`
//! instructions. Blocks live in a direct-mapped cache keyed by RIP and are tagged with the
//! physical address RIP maps to, the code bitness and the page's write generation: a write to
//! a page that holds cached code (self-modifying code, the kernel's alternatives and
//! static-key patching) bumps that page's generation (see `vm::CodeTracker`), which
//! invalidates its blocks. RIP-relative operands are resolved at decode time, hence RIP in the
//! key.
//!
//! The cache is 4-way set-associative (2048 sets, 8192 blocks, least recently used way
//! replaced), with each set's RIPs and use stamps in one host cache line apart from the blocks:
//! the direct-mapped table it replaces decoded the same blocks again and again when two hot
//! block starts shared a slot (0.53 M of its 0.67 M misses on a boot were such conflicts, and a
//! block-layer request re-decoded `psi_group_change` 20 times), while a 4x larger direct-mapped
//! table cost more CPU than it saved (more memory touched).

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic as M};

use crate::cpu::CS;
use crate::exec::{Exc, Exec, R};
use crate::mmu::Acc;

/// Instructions decoded by all vCPUs of this process.
pub static DECODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const WAYS: usize = 4;
const SETS: usize = 1 << 11;
const SLOTS: usize = SETS * WAYS;
const MAX_OPS: usize = 64;
/// Bytes read ahead when decoding a block (bounded by the end of the page).
const READ_AHEAD: usize = 1024;

/// Executes one decoded instruction; RIP already points past it.
pub type Handler = fn(&mut Exec<'_>, &Instruction) -> R<()>;

pub struct Op {
    pub insn: Instruction,
    pub handler: Handler,
    /// RIP at which the block goes on with the next op: the next instruction, or the target
    /// of a direct JMP/CALL the block was decoded through. Any other RIP after the handler
    /// (a taken conditional branch, a fault, a REP restart) leaves the block.
    pub follow: u64,
}

#[derive(Default)]
pub struct Block {
    pub rip: u64,
    phys: u64,
    bitness: u32,
    generation: u32,
    /// Mask of RIP for the block's code size.
    pub ip_mask: u64,
    /// Empty: the slot holds no block.
    pub ops: Vec<Op>,
}

/// The RIPs of one set's blocks (`u64::MAX`: none) and when each was last used.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tags {
    rip: [u64; WAYS],
    used: [u32; WAYS],
}

const NO_TAGS: Tags = Tags {
    rip: [u64::MAX; WAYS],
    used: [0; WAYS],
};

/// Decoded blocks of one vCPU.
pub struct BlockCache {
    /// Block `set * WAYS + way`.
    slots: Vec<Block>,
    tags: Vec<Tags>,
    /// Lookups so far (the use stamp; wrapping only blurs the replacement order).
    tick: u32,
    /// Blocks decoded (misses), for tests and profiles.
    pub decoded: u64,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache::new()
    }
}

impl BlockCache {
    pub fn new() -> BlockCache {
        BlockCache {
            slots: (0..SLOTS).map(|_| Block::default()).collect(),
            tags: vec![NO_TAGS; SETS],
            tick: 0,
            decoded: 0,
        }
    }

    /// The slot for a block at `rip`: the way that holds `rip` (a hit if its other tags match
    /// too), else the least recently used way of its set, which is then retagged. Either way
    /// the slot is marked used now.
    #[inline]
    fn way(&mut self, rip: u64) -> usize {
        let set = set_of(rip);
        self.tick = self.tick.wrapping_add(1);
        let Some(t) = self.tags.get_mut(set) else {
            return 0;
        };
        let way = match t.rip.iter().position(|&r| r == rip) {
            Some(w) => w,
            None => {
                let now = self.tick;
                let lru = t
                    .used
                    .iter()
                    .enumerate()
                    .max_by_key(|&(_, &u)| now.wrapping_sub(u))
                    .map_or(0, |(w, _)| w);
                if let Some(r) = t.rip.get_mut(lru) {
                    *r = rip;
                }
                lru
            }
        };
        if let Some(u) = t.used.get_mut(way) {
            *u = self.tick;
        }
        set * WAYS + way
    }

    #[inline]
    pub fn block(&self, slot: usize) -> &Block {
        &self.slots[slot]
    }

    /// Drops every block (they would be revalidated anyway; this frees memory).
    pub fn clear(&mut self) {
        for b in self.slots.iter_mut() {
            b.ops = Vec::new();
        }
        self.tags.fill(NO_TAGS);
    }
}

/// The hash of a block start's RIP that the interpreter's decoded-block cache, the
/// translator's index of block starts and its one-instruction cache take their set or slot
/// from (its low bits). The three tables differ in what they keep and how they replace
/// (4 least-recently-used ways of large decoded blocks apart from their tags; 2 ways of
/// 32-byte entries, most recent first, with a map of the evicted behind; direct-mapped
/// single instructions), so only the hash and the tests' set-filling helper are shared.
#[inline]
pub(crate) fn rip_hash(rip: u64) -> usize {
    (rip ^ (rip >> 13) ^ (rip >> 26)) as usize
}

#[inline]
fn set_of(rip: u64) -> usize {
    rip_hash(rip) & (SETS - 1)
}

/// `n` kernel-text RIPs (16 bytes apart) that `set_of` puts into one set, for the tests of
/// the set-associative tables above.
#[cfg(test)]
pub(crate) fn rips_in_one_set(set_of: fn(u64) -> usize, n: usize) -> Vec<u64> {
    let base = 0xffff_ffff_8100_0000u64;
    let want = set_of(base);
    (0..)
        .map(|k| base + k * 16)
        .filter(|&r| set_of(r) == want)
        .take(n)
        .collect()
}

/// Whether execution must leave the block after `i`: it may branch somewhere decoding cannot
/// follow, or change the mode, paging, privilege, interrupt acceptance or anything else
/// decoding and checks depend on. Conditional branches do not end a block (a taken one leaves
/// it at run time); direct JMP/CALL are handled by the caller.
fn ends_block(i: &Instruction) -> bool {
    match i.flow_control() {
        FlowControl::Next | FlowControl::ConditionalBranch => {}
        _ => return true,
    }
    match i.mnemonic() {
        M::Mov => (0..i.op_count()).any(|n| {
            i.op_kind(n) == iced_x86::OpKind::Register && {
                let r = i.op_register(n);
                crate::exec::is_cr(r) || crate::exec::is_dr(r) || crate::exec::is_sreg(r)
            }
        }),
        M::Pop => {
            i.op_kind(0) == iced_x86::OpKind::Register && crate::exec::is_sreg(i.op_register(0))
        }
        M::Lss
        | M::Lds
        | M::Les
        | M::Lfs
        | M::Lgs
        | M::Lgdt
        | M::Lidt
        | M::Lldt
        | M::Ltr
        | M::Lmsw
        | M::Clts
        | M::Invlpg
        | M::Wrmsr
        | M::Sti
        | M::Cli
        | M::Popf
        | M::Popfd
        | M::Popfq
        | M::Hlt
        | M::Swapgs
        | M::Cpuid
        | M::Wbinvd
        | M::Invd
        | M::Fxrstor
        | M::Fxrstor64
        | M::Ldmxcsr
        | M::Rsm => true,
        _ => false,
    }
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

    /// The cached block starting at RIP, decoding it on a miss. `None`: the instruction at RIP
    /// cannot be cached (it crosses a page, or its page is not tracked RAM); run it with
    /// [`Exec::step`]. Errors are faults of the instruction fetch.
    pub fn lookup_block(&mut self, cache: &mut BlockCache) -> R<Option<usize>> {
        let bitness = self.cpu.bitness();
        let rip = self.cpu.rip;
        let lin = self.code_lin(rip);
        if bitness == 64 && !canonical(lin) {
            return Err(Exc::Fault(13, Some(0)));
        }
        let user = self.cpu.cpl == 3;
        let pa = self.translate(lin, Acc::Exec, user)?;
        let page = pa >> 12;
        let s = cache.way(rip);
        let b = &cache.slots[s];
        if b.rip == rip
            && b.phys == pa
            && b.bitness == bitness
            && !b.ops.is_empty()
            && self.vm.code.generation(page) == Some(b.generation)
        {
            return Ok(Some(s));
        }
        // Mark the page before reading it, so a concurrent write invalidates what we read.
        let Some(generation) = self.vm.code.mark(page) else {
            return Ok(None);
        };
        let avail = (0x1000 - (lin & 0xfff) as usize).min(READ_AHEAD);
        let mut buf = [0u8; READ_AHEAD];
        if !self.ram.read_bytes(pa, &mut buf[..avail]) {
            return Ok(None);
        }
        let ip_mask = self.ip_mask();
        cache.decoded += 1;
        let b = &mut cache.slots[s];
        b.ops.clear();
        b.rip = rip;
        b.phys = pa;
        b.bitness = bitness;
        b.generation = generation;
        b.ip_mask = ip_mask;
        let mut dec = Decoder::with_ip(bitness, &buf[..avail], rip, DecoderOptions::NONE);
        let mut n = 0u64;
        while b.ops.len() < MAX_OPS && dec.can_decode() {
            let insn = dec.decode();
            if insn.is_invalid() {
                if dec.last_error() != DecoderError::NoMoreBytes && b.ops.is_empty() {
                    return Err(Exc::Fault(6, None));
                }
                // Crosses the end of what was read: the next block starts there.
                break;
            }
            n += 1;
            let mut follow = insn.next_ip() & ip_mask;
            let mut end = ends_block(&insn);
            if bitness == 64
                && matches!(
                    insn.code(),
                    iced_x86::Code::Jmp_rel8_64
                        | iced_x86::Code::Jmp_rel32_64
                        | iced_x86::Code::Call_rel32_64
                )
            {
                // Decode on at a forward target within what was read (the same page).
                let t = insn.near_branch64();
                let off = t.wrapping_sub(rip);
                end = !(t > insn.ip() && off < avail as u64);
                if !end {
                    follow = t;
                    dec.set_ip(t);
                    if dec.set_position(off as usize).is_err() {
                        end = true;
                    }
                }
            }
            b.ops.push(Op {
                handler: crate::fast::handler(&insn),
                follow,
                insn,
            });
            if end {
                break;
            }
        }
        DECODES.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if b.ops.is_empty() {
            return Ok(None);
        }
        Ok(Some(s))
    }

    /// Fetches and decodes the instruction at RIP without caching.
    pub fn fetch(&mut self) -> Result<Instruction, Exc> {
        let bitness = self.cpu.bitness();
        let rip = self.cpu.rip;
        let lin = self.code_lin(rip);
        if bitness == 64 && !canonical(lin) {
            return Err(Exc::Fault(13, Some(0)));
        }
        let user = self.cpu.cpl == 3;
        let pa = self.translate(lin, Acc::Exec, user)?;
        let mut buf = [0u8; 15];
        let avail = (0x1000 - (lin & 0xfff) as usize).min(15);
        self.read_code(pa, &mut buf[..avail])?;
        let mut dec = Decoder::with_ip(bitness, &buf[..avail], rip, DecoderOptions::NONE);
        let mut insn = dec.decode();
        if insn.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes && avail < 15 {
            let pa2 = self.translate(lin.wrapping_add(avail as u64), Acc::Exec, user)?;
            self.read_code(pa2, &mut buf[avail..])?;
            let mut dec = Decoder::with_ip(bitness, &buf, rip, DecoderOptions::NONE);
            insn = dec.decode();
        }
        if insn.is_invalid() {
            return Err(Exc::Fault(6, None));
        }
        DECODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(insn)
    }

    fn read_code(&mut self, pa: u64, buf: &mut [u8]) -> Result<(), Exc> {
        if self.ram.read_bytes(pa, buf) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// RIPs that all fall into one set.
    fn same_set(n: usize) -> Vec<u64> {
        rips_in_one_set(set_of, n)
    }

    #[test]
    fn block_starts_sharing_a_set_keep_their_ways() {
        let mut c = BlockCache::new();
        let rips = same_set(WAYS);
        let slots: Vec<usize> = rips.iter().map(|&r| c.way(r)).collect();
        let mut distinct = slots.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), WAYS, "{slots:?}");
        // Round and round: every start finds its way again.
        for _ in 0..3 {
            for (&r, &s) in rips.iter().zip(&slots) {
                assert_eq!(c.way(r), s);
            }
        }
    }

    #[test]
    fn the_least_recently_used_way_is_replaced() {
        let mut c = BlockCache::new();
        let rips = same_set(WAYS + 1);
        let slots: Vec<usize> = rips[..WAYS].iter().map(|&r| c.way(r)).collect();
        // Use all but the second again: the second is the least recently used.
        for (k, &r) in rips[..WAYS].iter().enumerate() {
            if k != 1 {
                c.way(r);
            }
        }
        assert_eq!(c.way(rips[WAYS]), slots[1]);
        // The others are still where they were.
        for k in [0, 2, 3] {
            assert_eq!(c.way(rips[k]), slots[k]);
        }
        c.clear();
        assert!(c.tags.iter().all(|t| t.rip == [u64::MAX; WAYS]));
    }
}
