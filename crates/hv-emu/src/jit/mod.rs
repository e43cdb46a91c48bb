//! The translator: guest basic blocks become host x86-64 code (first tier).
//!
//! Chosen per VM with [`Engine`] (`ANYVISOR_EMU_ENGINE=interp|jit`, read once, or
//! `EmuHypervisor::with_engine`). The interpreter stays the reference and runs everything
//! the translator does not ([`emit::classify`] says what it does).
//!
//! A translated block is entered from [`Exec::run_batch_jit`] with the guest registers
//! (`Cpu::gpr`) and a [`Ctx`], and always returns to it with the guest state complete: RIP and
//! the arithmetic flags are copied back, so interrupts, snapshots and migration only ever see
//! whole-instruction state. Invariants (see docs/emu.md, "Translator"):
//!
//! * **Precise faults**: every memory access goes through the soft TLB in [`Ctx::tlb`] first;
//!   on a miss (or a page-crossing, misaligned-locked or non-canonical case) the block exits
//!   *before* the instruction with the exact state, and the interpreter runs that instruction
//!   (faulting through the IDT as usual), after which the TLB entry is filled.
//! * **Soft TLB** ([`SoftTlb`]: 4096 slots per privilege class, host addend per guest page):
//!   filled only from `Exec::translate` for RAM pages at the current privilege class, dropped
//!   whenever the interpreter's TLB is flushed (`Tlb::epoch`); write entries exist only for
//!   pages that hold no cached code, and are dropped whenever any page becomes code
//!   (`CodeTracker::marks`).
//! * **Stores** log their guest page in [`Ctx::log`]; after the block the run loop marks the
//!   dirty bitmap (data first, then the bit, as `Ram::write`) and tells the code tracker, so
//!   migration and self-modifying-code detection see every translated store.
//!   Write entries for pages already dirty and without code skip the log (unlogged, QEMU's
//!   NOTDIRTY); a dirty-bitmap harvest turns them back into logged ones before it returns
//!   (`VmShared::quiesce_unlogged_writes`).
//! * **Self-modifying code**: a translation is tagged with its page's write generation, like a
//!   decoded block, and is dropped when the page is written.
//! * **Chaining**: a block's exit goes straight to the next block's chained entry, through a
//!   patched jump (same guest page) or the jump cache; that entry re-checks the budget, the
//!   exit-request word and (from the jump cache, and for blocks crossing into the next page)
//!   its page's write generation, so a chain still returns within the batch budget, at once
//!   when another thread posts an interrupt or kicks, and never runs a translation of code
//!   that was overwritten before the chain entered the page (see `emit::Emitter::head_checks`).

mod asm;
mod emit;
mod index;
mod used;

use std::collections::HashMap;
use std::mem::offset_of;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use hv::MpState;
use hv_emu_jit_rt::{CodeCache, CodeRef};
use iced_x86::{Decoder, DecoderOptions};

use crate::cpu::{ARITH_FLAGS, FS, GS};
use crate::decode::{BlockCache, canonical};
use crate::exec::{Exc, Exec, R};
use crate::mmu::Acc;
use crate::system::Event;

#[cfg(test)]
use emit::classify;
pub use emit::{Kind, classify_for};

/// Guest instructions run as translated code by all vCPUs of this process.
pub static TRANSLATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Which engine runs emu vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The interpreter (decoded-block cache).
    Interp,
    /// Translated blocks, with the interpreter for everything not translated.
    Jit,
}

impl Engine {
    /// `ANYVISOR_EMU_ENGINE` (`interp` or `jit`), read once per process; `jit` when unset.
    /// Another value is reported once and ignored.
    pub fn from_env() -> Engine {
        static E: OnceLock<Engine> = OnceLock::new();
        *E.get_or_init(|| match std::env::var("ANYVISOR_EMU_ENGINE").as_deref() {
            Ok("interp") => Engine::Interp,
            Ok("jit") | Ok("") | Err(_) => Engine::Jit,
            Ok(other) => {
                tracing::warn!(
                    "ANYVISOR_EMU_ENGINE={other:?} is neither \"interp\" nor \"jit\": using jit"
                );
                Engine::Jit
            }
        })
    }
}

/// Translated-code cache of all vCPUs of one VM together.
pub const CACHE_BYTES: usize = 32 << 20;
/// Soft-TLB entries per privilege class (16 MiB of guest pages each; a user process reading
/// at random over megabytes, like xz's match finder, missed 23 M times per run with 256).
const TLB_ENTRIES: usize = 4096;
/// Logged stores per block run: at most one per instruction, and a run ends within
/// `MAX_RUN + MAX_INSNS` instructions.
const LOG_CAP: usize = 8192;
/// Instructions one entry into translated code may run: the most the blocks' budget check
/// takes (`emit::head_checks`, below 4096). Each run that ends at it costs a return to the
/// run loop and an entry (0.76 M of the boot's 2.1 M entries at 2048); the vCPU's batch
/// (`vcpu::BATCH`) is as long.
pub(crate) const MAX_RUN: u64 = 4095;
const _: () = assert!(LOG_CAP as u64 >= MAX_RUN + MAX_INSNS as u64);
const MAX_INSNS: usize = 64;
/// Times a block start is run by the interpreter before it is translated: code that runs once
/// or twice (most of a boot's init code) is cheaper to interpret than to translate. On the
/// boot 32 left 0.86 M cold runs (6.8 M interpreted instructions, each block decoded for the
/// interpreter and again for the translator) and cost about 8 % more CPU than 2; 0
/// (translate at first sight) was a little cheaper still but fills the 32 MiB code cache (90 K
/// blocks, 31.6 MB) where 2 takes 55 K blocks and 19 MB.
const HOT: u16 = 2;
/// The largest threshold (`index::RESOLVED` marks a translated block start).
const MAX_HOT: u16 = index::RESOLVED - 1;
const READ_AHEAD: usize = 1024;
/// Entries of the one-instruction cache (a power of two; see [`OneOp`]).
const ONE_OPS: usize = 1024;

/// The soft TLB, both privilege halves, as parallel arrays of `u64` by slot (so generated code
/// gets a slot's index straight from one `pext` of the address and addresses each field as
/// `[r14 + index*8 + field]`). Tags are the negated guest page *address*: a flag-free `lea` of
/// tag, address and access size minus one, shifted right by 12, is zero exactly when the
/// access's last byte is in the tagged page (and the first byte chose the slot, so a
/// page-crossing access never hits). An empty slot's tag is [`empty_tag`].
#[repr(C)]
pub struct SoftTlb {
    read: [u64; 2 * TLB_ENTRIES],
    /// Write tags of unlogged (NOTDIRTY) entries: pages the dirty bitmap already had, holding
    /// no code, when the entry was made (QEMU's idea; dropped at each dirty-bitmap harvest).
    /// Stores through them are not logged: the inline check of a store tests only this tag.
    write: [u64; 2 * TLB_ENTRIES],
    /// Write tags of logged entries: a store whose `write` tag misses tests this one out of
    /// line and appends the page to the store log.
    wlog: [u64; 2 * TLB_ENTRIES],
    /// Host address minus guest linear address of the page.
    addend: [u64; 2 * TLB_ENTRIES],
    /// Guest-physical page address (for the store log).
    pa: [u64; 2 * TLB_ENTRIES],
}

/// The tag of an empty slot: the negated address of a page whose slot index is neither
/// `slot`'s nor the next one, so no access that `slot` is chosen for (first byte in a page
/// of `slot`'s index, last byte in that page or the next) can hit it.
pub const fn empty_tag(slot: usize) -> u64 {
    ((((slot & (TLB_ENTRIES - 1)) ^ (TLB_ENTRIES / 2)) as u64) << 12).wrapping_neg()
}

const fn empty_tags() -> [u64; 2 * TLB_ENTRIES] {
    let mut t = [0u64; 2 * TLB_ENTRIES];
    let mut i = 0;
    while i < 2 * TLB_ENTRIES {
        t[i] = empty_tag(i);
        i += 1;
    }
    t
}

static EMPTY_TAGS: [u64; 2 * TLB_ENTRIES] = empty_tags();

/// Byte offsets of [`SoftTlb`]'s arrays from its `read` array (generated code's `r14` points
/// at the current half of `read`, so the same offsets reach the same half of each array).
pub const TLB_WRITE: i32 = offset_of!(SoftTlb, write) as i32;
pub const TLB_WLOG: i32 = offset_of!(SoftTlb, wlog) as i32;
pub const TLB_ADDEND: i32 = offset_of!(SoftTlb, addend) as i32;
pub const TLB_PA: i32 = offset_of!(SoftTlb, pa) as i32;

impl SoftTlb {
    fn new() -> Box<SoftTlb> {
        Box::new(SoftTlb {
            read: EMPTY_TAGS,
            write: EMPTY_TAGS,
            wlog: EMPTY_TAGS,
            addend: [0; 2 * TLB_ENTRIES],
            pa: [0; 2 * TLB_ENTRIES],
        })
    }

    /// Empties slot `i`.
    fn clear(&mut self, i: usize) {
        let e = empty_tag(i);
        for t in [&mut self.read, &mut self.write, &mut self.wlog] {
            if let Some(t) = t.get_mut(i) {
                *t = e;
            }
        }
    }

    /// Drops slot `i`'s write tags (logged or not).
    fn clear_writes(&mut self, i: usize) {
        let e = empty_tag(i);
        for t in [&mut self.write, &mut self.wlog] {
            if let Some(t) = t.get_mut(i) {
                *t = e;
            }
        }
    }

    /// Turns slot `i`'s unlogged write tag into a logged one.
    fn log_writes(&mut self, i: usize) {
        let e = empty_tag(i);
        if let (Some(w), Some(l)) = (self.write.get_mut(i), self.wlog.get_mut(i))
            && *w != e
        {
            *l = *w;
            *w = e;
        }
    }

    /// Fills slot `i` for the page at linear `base` (4 KiB aligned): readable, and writable
    /// (logged or not) if `write`; the slot's other page, if any, is dropped first.
    fn fill(&mut self, i: usize, base: u64, host: u64, pa: u64, write: Option<bool>) {
        let tag = base.wrapping_neg();
        let same = |t: &[u64; 2 * TLB_ENTRIES]| t.get(i) == Some(&tag);
        if !same(&self.read) && !same(&self.write) && !same(&self.wlog) {
            self.clear(i);
        }
        if let (Some(r), Some(a), Some(p)) = (
            self.read.get_mut(i),
            self.addend.get_mut(i),
            self.pa.get_mut(i),
        ) {
            *a = host.wrapping_sub(base);
            *p = pa & !0xfff;
            *r = tag;
        }
        if let Some(unlogged) = write {
            let e = empty_tag(i);
            let (set, other) = if unlogged {
                (&mut self.write, &mut self.wlog)
            } else {
                (&mut self.wlog, &mut self.write)
            };
            if let (Some(s), Some(o)) = (set.get_mut(i), other.get_mut(i)) {
                *s = tag;
                *o = e;
            }
        }
    }
}

/// The first soft-TLB index of the half for `cpl` (see [`Ctx::tlb_base`]).
fn tlb_half(cpl: u8) -> usize {
    if cpl == 3 { TLB_ENTRIES } else { 0 }
}

/// The first jump-cache entry of the half for `cpl` (see [`Ctx::jc_base`]).
fn jc_half(cpl: u8) -> usize {
    if cpl == 3 { JC_ENTRIES } else { 0 }
}

/// What translated code reads and writes besides the guest registers. The emitter addresses
/// the fields by the `C_*` offsets below.
#[repr(C)]
pub struct Ctx {
    rip: u64,
    flags: u64,
    /// 0: left at `rip` after `count` instructions; 1: the instruction at `rip` must be run by
    /// the interpreter (`miss_kind` 1/2: after a read/write TLB miss at `miss_lin`).
    exit: u64,
    count: u64,
    miss_lin: u64,
    miss_kind: u64,
    /// Minus the instructions a looping block may run.
    nbudget: u64,
    fs: u64,
    gs: u64,
    log_n: u64,
    /// Address of the vCPU's exit-request word (a `u32`, nonzero: leave at the next block
    /// head).
    req: u64,
    /// Set by an exit through a linkable jump: the address of its rel32 field.
    link: u64,
    /// Set by a block whose page was written since translation: the address of its chained
    /// entry (the jumps linked to it must be undone).
    dead: u64,
    /// Host address of the half of `tlb` generated code uses: the first for CPL 0-2, the
    /// second for CPL 3 (set at every entry). Each half is filled only at its privilege
    /// class, with that class's permission checks, so neither is emptied when the CPL changes.
    tlb_base: u64,
    tlb: Box<SoftTlb>,
    /// Host address of the half of `jc` generated code probes, by privilege class like
    /// `tlb_base` (set at every entry): an entry is made after a fetch at its class, so the
    /// other class never runs code it has not passed the fetch checks for.
    jc_base: u64,
    /// Jump cache: translations by guest RIP, for the exits whose target is not linked
    /// (returns, indirect branches, other pages). Generated code probes it and goes straight to
    /// the entry's chained entry on a hit (see [`JC_WAYS`]).
    jc: JcTable,
    log: [u64; LOG_CAP],
    /// Vector-instruction state (`simd.rs`); set at every entry.
    simd: emit::simd::SimdCtx,
    /// System-instruction state (`sys.rs`); set at every entry, read back after.
    sys: emit::sys::SysCtx,
    /// TSC-read state (`time.rs`); set at every entry.
    time: emit::time::TimeCtx,
}

/// Words of `Jit::user_pages` (64 K bits).
const USER_PAGE_WORDS: usize = 1024;

/// The word and bit of page `vpn` in `Jit::user_pages`.
fn user_page_bit(vpn: u64) -> (usize, u64) {
    let h = (vpn as usize) & (USER_PAGE_WORDS * 64 - 1);
    (h / 64, 1 << (h % 64))
}

/// Jump-cache entries per privilege class: [`JC_SETS`] sets of [`JC_WAYS`] (a power of two;
/// [`jc_index`] and the emitter agree on the hash). 1 MiB for both classes.
pub const JC_ENTRIES: usize = JC_SETS * JC_WAYS;
/// Ways per jump-cache set: two adjacent entries (32 bytes, in one host cache line), the probe
/// checks way 0 then way 1 before leaving; [`Jit::jc_fill`] puts the newest target in way 0
/// and moves way 0's to way 1 (a hit in generated code does not reorder: no stores there).
///
/// Direct-mapped, the blk benchmark's vCPU left translated code ~51 times per request through
/// a slot holding another RIP, mostly pairs of targets taken in turn (doubling the table
/// helped little, a second way nearly all). Replayed on a trace of
/// every jump-cache probe of a boot plus 4 s of blk random reads (38.7 M probes,
/// 0.36 M to empty slots): direct-mapped with 16 K entries per class, 0.55 M conflicts; 32 K,
/// 0.37 M; 2 ways × 8 K sets, 53 K; 2 × 16 K, 28 K; 4 × 8 K, 43 K; a million direct-mapped
/// entries, 1 K. Other hashes (a multiplicative one, adding `rip >> 4` or a rotation) did not
/// do better than `rip + (rip >> 12)` with two ways.
pub const JC_WAYS: usize = 2;
/// Jump-cache sets per privilege class.
pub const JC_SETS: usize = 16384;
// `used::UsedSlots` lists slots as `u16`.
const _: () = assert!(2 * JC_ENTRIES <= 1 << 16 && 2 * TLB_ENTRIES <= 1 << 16);
const _: () = assert!(JC_WAYS == 2 && JC_SETS.is_power_of_two());

/// One jump-cache set: 32 bytes, aligned so that it never straddles a host cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct JcSet([JcEntry; JC_WAYS]);

/// The jump cache's entries, both privilege classes, numbered `set * JC_WAYS + way`: the set
/// of `rip` at CPL `c` is entries `jc_index(rip) + jc_half(c)` (way 0) and the next (way 1).
/// On the heap (1 MiB: too large to build on a thread's stack).
pub struct JcTable(Box<[JcSet]>);

impl JcTable {
    fn new() -> JcTable {
        JcTable(vec![JcSet([JC_EMPTY; JC_WAYS]); 2 * JC_SETS].into_boxed_slice())
    }

    /// Entry `i` (way `i % JC_WAYS` of set `i / JC_WAYS`).
    fn get(&self, i: usize) -> Option<&JcEntry> {
        self.0.get(i / JC_WAYS)?.0.get(i % JC_WAYS)
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut JcEntry> {
        self.0.get_mut(i / JC_WAYS)?.0.get_mut(i % JC_WAYS)
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &JcEntry> {
        self.0.iter().flat_map(|s| s.0.iter())
    }
}

#[cfg(test)]
impl std::ops::Index<usize> for JcTable {
    type Output = JcEntry;
    fn index(&self, i: usize) -> &JcEntry {
        &self.0[i / JC_WAYS].0[i % JC_WAYS]
    }
}

/// One jump-cache entry: the negated guest RIP (0 after adding the RIP on a hit; 1 when
/// empty) and the host address of the translation's chained entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct JcEntry {
    neg_rip: u64,
    addr: u64,
}

const JC_EMPTY: JcEntry = JcEntry {
    neg_rip: 1,
    addr: 0,
};

/// The first entry (way 0) of `rip`'s jump-cache set in a half: `JC_WAYS * ((rip + (rip >>
/// 12)) mod JC_SETS)` (flag-free to compute in generated code).
#[inline]
pub fn jc_index(rip: u64) -> usize {
    ((rip.wrapping_add(rip >> 12) as usize) & (JC_SETS - 1)) * JC_WAYS
}

const C_RIP: i32 = offset_of!(Ctx, rip) as i32;
const C_FLAGS: i32 = offset_of!(Ctx, flags) as i32;
const C_EXIT: i32 = offset_of!(Ctx, exit) as i32;
const C_COUNT: i32 = offset_of!(Ctx, count) as i32;
const C_MISS_LIN: i32 = offset_of!(Ctx, miss_lin) as i32;
const C_MISS_KIND: i32 = offset_of!(Ctx, miss_kind) as i32;
const C_NBUDGET: i32 = offset_of!(Ctx, nbudget) as i32;
const C_FS: i32 = offset_of!(Ctx, fs) as i32;
const C_GS: i32 = offset_of!(Ctx, gs) as i32;
const C_LOG_N: i32 = offset_of!(Ctx, log_n) as i32;
const C_REQ: i32 = offset_of!(Ctx, req) as i32;
const C_LINK: i32 = offset_of!(Ctx, link) as i32;
const C_DEAD: i32 = offset_of!(Ctx, dead) as i32;
const C_TLB: i32 = offset_of!(Ctx, tlb_base) as i32;
const C_LOG: i32 = offset_of!(Ctx, log) as i32;
const C_JC: i32 = offset_of!(Ctx, jc_base) as i32;
const _: () = assert!(std::mem::size_of::<JcEntry>() == 16);

/// One decoded instruction the interpreter runs for the translator: the instruction a block
/// stopped before (a soft-TLB miss, a non-canonical target) or one it does not translate.
/// Tagged like a decoded block (RIP, physical address, the page's write generation), so
/// running it again costs a tag check instead of a fetch, a decode and the generic dispatch
/// of [`Exec::step`], or a decoded-block lookup. Only instructions wholly inside their page.
#[derive(Clone, Copy)]
struct OneOp {
    rip: u64,
    phys: u64,
    generation: u32,
    valid: bool,
    insn: iced_x86::Instruction,
    handler: crate::decode::Handler,
}

/// A handler for the empty [`OneOp`] entries (never called: `valid` is false).
fn no_op(_: &mut Exec<'_>, _: &iced_x86::Instruction) -> R<()> {
    Ok(())
}

impl OneOp {
    fn empty() -> OneOp {
        OneOp {
            rip: 0,
            phys: 0,
            generation: 0,
            valid: false,
            insn: iced_x86::Instruction::new(),
            handler: no_op,
        }
    }
}

/// What runs the code at RIP.
enum Found {
    /// A translation, the cache offset of its chained entry, and whether its last
    /// instruction crosses into the next page (nothing may be linked to it, see [`XPage`]).
    Code(CodeRef, u32, bool),
    /// The interpreter, one instruction ([`Exec::interp_one`]).
    Untranslated,
    /// The interpreter, a whole decoded block (not hot yet).
    Cold,
}

/// Counters of one vCPU's translator.
#[derive(Clone, Copy, Default, Debug)]
pub struct Stats {
    pub blocks: u64,
    pub insns: u64,
    pub emit_ns: u64,
    pub bytes: u64,
    pub flushes: u64,
    pub exits_to_interp: u64,
    /// Entries into translated code from the run loop.
    pub entries: u64,
    /// Jumps linked to another block (direct chaining), and links undone.
    pub links: u64,
    pub unlinks: u64,
    /// Chained entries that found their page written since translation.
    pub stale: u64,
    /// Guest instructions run as translated code.
    pub run: u64,
    /// Interpreter runs of cold blocks (not hot yet) and the instructions they ran.
    pub cold: u64,
    pub cold_insns: u64,
    /// Interpreter runs up to the next translatable instruction, and their instructions.
    pub untranslated: u64,
    pub untranslated_insns: u64,
    /// Block-start lookups (the index's own counters are in [`index::IndexStats`]).
    pub lookups: u64,
    /// Instructions run from the one-instruction cache, and decodes into it.
    pub one_ops: u64,
    pub one_op_decodes: u64,
    /// Returns to the run loop other than `exits_to_interp` and `stale`, by cause: through a
    /// jump not linked yet (linked at the next lookup if its target is translated by then),
    /// at the end of the run's budget, at an exit request (an interrupt posted, a kick), and
    /// the rest (jump-cache misses of returns, indirect and cross-page branches).
    pub exits_link: u64,
    pub exits_budget: u64,
    pub exits_request: u64,
    pub exits_other: u64,
    /// Blocks translated whose last instruction crosses into the next page.
    pub xpage_blocks: u64,
}

/// One vCPU's translator state.
pub struct Jit {
    cache: CodeCache,
    ctx: Box<Ctx>,
    /// Block starts: heat, translation ([`index`]).
    index: index::Index,
    emitter: emit::Emitter,
    tlb_epoch: u64,
    /// `Tlb::global_epoch` when the soft TLB was last emptied whole: while it is current, a
    /// flush that spared global pages (MOV to CR3) spares their soft-TLB entries too.
    tlb_global_epoch: u64,
    /// The soft-TLB entries that may be filled (every entry that is not empty), global or not,
    /// so flushes and harvests touch those, not all 8192.
    tlb_used: used::UsedSlots,
    cpl: u8,
    marks: u64,
    insns: Vec<(iced_x86::Instruction, Kind)>,
    /// The one-instruction cache ([`OneOp`]), direct-mapped by RIP.
    ones: Vec<OneOp>,
    /// Instructions run as translated code, not yet added to [`TRANSLATED`].
    translated: u64,
    /// Interpreted runs of a block start before it is translated.
    hot: u16,
    /// Linked jumps by the chained entry they go to: (cache offset of the rel32 field, its
    /// unlinked target).
    incoming: HashMap<u32, Vec<(u32, u32)>>,
    /// Jump-cache slots in use (cleared one by one when the cache must be emptied), and
    /// whether each was made from a global translation (kept by MOV to CR3, see
    /// [`Jit::flush_nonglobal_tlb`]).
    jc_used: used::UsedSlots,
    /// `VmShared::dirty_epoch` the unlogged write entries were made under.
    dirty_epoch: u64,
    /// The last run left through a linkable jump to `rip` (see [`PendingLink`]).
    pending: Option<PendingLink>,
    /// The next page of each block whose last instruction crosses into it, by the cache
    /// offset of the block's body (emptied with the cache).
    xpages: HashMap<u32, XPage>,
    /// Chained entries of cross-page blocks that jumps were linked to since the TLB epoch last
    /// changed, each with whether the links are undone at the next change of privilege class
    /// and its first page (virtual page number). All are undone when the TLB epoch changes;
    /// the others (kept across class changes) when a CPL-3 lookup passes in their page (see
    /// [`XPage`]).
    xpage_links: Vec<(u32, bool, u64)>,
    /// Whether `xpage_links` holds links kept across privilege-class changes.
    xpage_kept: bool,
    /// Pages (virtual page numbers, hashed to 64 K bits) where a lookup at CPL 3 passed since
    /// the jump cache was last emptied whole (see [`XPage`]); `user_pages_set`: some bit is
    /// set.
    user_pages: Vec<u64>,
    user_pages_set: bool,
    /// [`emit::Emitted::unchecked`] of every block so far (`None` before the first, or for
    /// good if two blocks ever differed: then links go to the chained entries).
    unchecked: Option<u32>,
    /// Whether `unchecked` was ever seen to differ between blocks.
    unchecked_varies: bool,
    pub stats: Stats,
}

/// The second page of a block whose last instruction crosses a page end: the guest-physical
/// page its bytes were read from, and that page's write generation then (and the host
/// address of the generation word, which the block's head compares too).
///
/// Such a block runs only where the next page's current translation is that page: the run
/// loop checks it at every lookup (`Exec::next_page_current`), and the ways in that skip the
/// lookup live only as long as the translations and the privilege that check was made under.
/// A jump-cache entry is emptied with the soft TLB (kept across MOV to CR3 only if both pages
/// are global) and lives in the half of the privilege class it was made at. A jump linked to
/// the block (made right after such a lookup, like every link) is undone at the next entry
/// into translated code under another TLB epoch (`Jit::xpage_links`) — a linked jump's source
/// block vouches only for the mapping of its own page, which is why QEMU never chains to a
/// block spanning two pages. Between two TLB flushes the next page's translation is the one
/// the check saw (or a stale one the guest did not flush, which a CPU may use too).
///
/// The privilege class matters too: a fetch of the next page allowed at CPL 0-2 may fault at
/// CPL 3 (a supervisor page) and the other way round (SMEP). Links join blocks of one page
/// only, so the linking jump's block starts in the crossing block's first page P. A block of
/// P runs at CPL 3 only after a run-loop lookup at CPL 3 passed in P (the lookup translates
/// RIP for a fetch first), entered from there, from the CPL-3 half of the jump cache (whose
/// entries are made after such lookups and live until the jump cache is emptied whole), or
/// by a link or loop from a block of P that ran at CPL 3 by the same rule. The run loop
/// notes every page where a CPL-3 lookup passed (`Jit::user_pages`, a 64 K-bit hash, cleared
/// with the whole jump cache). A link made at CPL 0-2 out of a page not noted is kept across
/// privilege-class changes, and undone by the first CPL-3 lookup that passes in that page,
/// before any block of it runs at CPL 3: until then it is taken only at CPL 0-2, where the
/// next page's check still holds while the TLB epoch lasts. Other links (made at CPL 3, or
/// out of a noted page, or a hash collision) are undone at every change of privilege class,
/// as before. Kernel code crossing pages thus keeps its links across system calls and
/// returns to user mode (the blk benchmark linked and unlinked 11-12 per request when every
/// CPL change undid them all); the rule does not depend on the U/S bits, so a page made
/// user-accessible without a TLB flush is covered too.
#[derive(Clone, Copy)]
struct XPage {
    page: u64,
    generation: u32,
    gen_addr: u64,
}

impl Jit {
    /// A translator with `cache_bytes` of code cache. Create it before the vCPU thread's
    /// seccomp filter is installed (it maps the cache).
    pub fn new(cache_bytes: usize) -> std::io::Result<Jit> {
        let mut cache = CodeCache::new(cache_bytes)?;
        if !cache.install_trampoline(&emit::trampoline()) {
            return Err(std::io::Error::other(
                "translator: no room for the trampoline",
            ));
        }
        if let Some((addr, len)) = cache.trampoline() {
            emit::perf_map_note(addr, len, "anyvisor-jit-trampoline");
        }
        let emitter = emit::Emitter::new().map_err(std::io::Error::other)?;
        Ok(Jit {
            cache,
            ctx: Box::new(Ctx {
                rip: 0,
                flags: 0,
                exit: 0,
                count: 0,
                miss_lin: 0,
                miss_kind: 0,
                nbudget: 0,
                fs: 0,
                gs: 0,
                log_n: 0,
                req: NO_REQUEST.as_ptr() as u64,
                link: 0,
                dead: 0,
                tlb_base: 0,
                tlb: SoftTlb::new(),
                jc_base: 0,
                jc: JcTable::new(),
                log: [0; LOG_CAP],
                simd: Default::default(),
                sys: Default::default(),
                time: Default::default(),
            }),
            index: index::Index::new(),
            emitter,
            tlb_epoch: u64::MAX,
            tlb_global_epoch: u64::MAX,
            tlb_used: used::UsedSlots::new(2 * TLB_ENTRIES),
            cpl: u8::MAX,
            marks: u64::MAX,
            insns: Vec::new(),
            ones: vec![OneOp::empty(); ONE_OPS],
            translated: 0,
            hot: hot_from_env().min(MAX_HOT),
            incoming: HashMap::new(),
            jc_used: used::UsedSlots::new(2 * JC_ENTRIES),
            dirty_epoch: 0,
            pending: None,
            xpages: HashMap::new(),
            xpage_links: Vec::new(),
            xpage_kept: false,
            user_pages: vec![0; USER_PAGE_WORDS],
            user_pages_set: false,
            unchecked: None,
            unchecked_varies: false,
            stats: Stats::default(),
        })
    }

    /// Drops every translation (guest memory was replaced, e.g. a restored snapshot).
    pub fn clear(&mut self) {
        self.flush_code();
        self.index.clear();
        self.flush_tlb();
        self.ones.fill(OneOp::empty());
    }

    /// Decodes the instructions of the block at `rip` (its bytes up to the page end, and past
    /// it when the caller read the start of the next page) that the translator takes into
    /// `insns`. `check_encodes`: also end the block before a generic instruction whose host
    /// form does not encode. An instruction that reaches the page end is the block's last
    /// (nothing of the next page but its own bytes is translated). Returns whether decoding
    /// stopped at an instruction cut off by the end of `bytes` (one crossing into a page
    /// that was not read).
    fn decode_block(
        &mut self,
        bytes: &[u8],
        rip: u64,
        features: hv::cpu_model::FeatureSet,
        check_encodes: bool,
    ) -> bool {
        let mut dec = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
        let page_end = (rip | 0xfff).wrapping_add(1);
        self.insns.clear();
        let mut cut = false;
        while self.insns.len() < MAX_INSNS && dec.can_decode() {
            let i = dec.decode();
            if i.is_invalid() {
                cut = dec.last_error() == iced_x86::DecoderError::NoMoreBytes;
                break;
            }
            let Some(kind) = classify_for(&i, features) else {
                break;
            };
            if self.insns.last().is_some_and(|&(_, p)| !kind.may_follow(p)) {
                break;
            }
            if check_encodes && kind == Kind::Generic && !self.emitter.encodes(&i) {
                break;
            }
            self.insns.push((i, kind));
            // `page_end` is 0 on the last page of the address space, where nothing crosses.
            if kind.ends_block() || (page_end != 0 && i.next_ip() >= page_end) {
                break;
            }
        }
        crate::decode::DECODES.fetch_add(self.insns.len() as u64, Ordering::Relaxed);
        cut
    }

    /// Empties the code cache: every translation and link is gone.
    fn flush_code(&mut self) {
        // The index keeps its entries: their `CodeRef`s are refused from now on, and a hot
        // block start is translated again at its next lookup.
        self.cache.clear();
        self.incoming.clear();
        self.xpages.clear();
        self.xpage_links.clear();
        self.xpage_kept = false;
        self.flush_jc();
        self.pending = None;
        self.stats.flushes += 1;
    }

    /// Points the jump at `site` (a linkable exit of some block) to `to`, an entry of the
    /// block whose chained entry is `chk` (where its head reports it dead, see
    /// [`Jit::unlink_into`]).
    fn link(&mut self, site: u32, chk: u32, to: u32) {
        let Some(orig) = self.cache.jump_target(site) else {
            return;
        };
        if self.cache.patch_jump(site, to) {
            self.incoming.entry(chk).or_default().push((site, orig));
            self.stats.links += 1;
        }
    }

    /// Undoes the links into cross-page blocks whose first page is `vpn` (see [`XPage`]).
    fn unlink_xpage_from(&mut self, vpn: u64) {
        if !self.xpage_links.iter().any(|&(_, _, p)| p == vpn) {
            return;
        }
        let links = std::mem::take(&mut self.xpage_links);
        for &(chk, _, p) in &links {
            if p == vpn {
                self.unlink_into(chk);
            }
        }
        self.xpage_links = links.into_iter().filter(|&(_, _, p)| p != vpn).collect();
        self.xpage_kept = self.xpage_links.iter().any(|&(_, bound, _)| !bound);
    }

    /// Records that a lookup at CPL 3 passed in page `vpn`.
    fn note_user_page(&mut self, vpn: u64) {
        let (w, b) = user_page_bit(vpn);
        if let Some(x) = self.user_pages.get_mut(w) {
            *x |= b;
            self.user_pages_set = true;
        }
    }

    /// Whether a lookup at CPL 3 may have passed in page `vpn` since the jump cache was last
    /// emptied whole.
    fn user_page(&self, vpn: u64) -> bool {
        let (w, b) = user_page_bit(vpn);
        self.user_pages.get(w).is_none_or(|x| x & b != 0)
    }

    /// Undoes every link into the chained entry `chk` (its block is no longer current).
    fn unlink_into(&mut self, chk: u32) {
        for (site, orig) in self.incoming.remove(&chk).unwrap_or_default() {
            self.cache.patch_jump(site, orig);
            self.stats.unlinks += 1;
        }
    }

    /// Empties the soft-TLB and jump-cache entries that are not global, after a flush of the
    /// interpreter's TLB that spared global pages (MOV to CR3 with CR4.PGE): a jump-cache
    /// entry made from a global translation is still what a fetch at the same CPL would find.
    fn flush_nonglobal_tlb(&mut self) {
        let tlb = &mut self.ctx.tlb;
        self.tlb_used.flush_local(|i| tlb.clear(i));
        let jc = &mut self.ctx.jc;
        self.jc_used.flush_local(|i| {
            if let Some(e) = jc.get_mut(i) {
                *e = JC_EMPTY;
            }
        });
    }

    fn flush_tlb(&mut self) {
        let tlb = &mut self.ctx.tlb;
        self.tlb_used.flush_all(|i| tlb.clear(i));
        self.flush_jc();
    }

    /// Empties the jump cache (both halves): its entries hold for one address space and code
    /// cache.
    fn flush_jc(&mut self) {
        if self.user_pages_set {
            self.user_pages.fill(0);
            self.user_pages_set = false;
        }
        let jc = &mut self.ctx.jc;
        self.jc_used.flush_all(|i| {
            if let Some(e) = jc.get_mut(i) {
                *e = JC_EMPTY;
            }
        });
    }

    /// Remembers in the jump cache of privilege class `cpl` that `rip` runs the code whose
    /// chained entry is `chk`; `global`: the TLB's translation of `rip` is global. An entry
    /// for `rip` already in the set is replaced where it is; else the new one goes to way 0,
    /// after way 0's (if any) moved to way 1 (whose entry is dropped) with its global state.
    fn jc_fill(&mut self, rip: u64, chk: u32, global: bool, cpl: u8) {
        let Some(addr) = self.cache.address_of(chk) else {
            return;
        };
        let i0 = jc_index(rip) | jc_half(cpl);
        let i1 = i0 | 1;
        let neg_rip = rip.wrapping_neg();
        let jc = &mut self.ctx.jc;
        let (Some(&w0), Some(&w1)) = (jc.get(i0), jc.get(i1)) else {
            return;
        };
        let i = if w0.neg_rip == neg_rip {
            i0
        } else if w1.neg_rip == neg_rip {
            i1
        } else if w0.neg_rip == JC_EMPTY.neg_rip {
            i0
        } else {
            if let Some(e) = jc.get_mut(i1) {
                *e = w0;
                let g = self.jc_used.is_global(i0);
                self.jc_used.fill(i1, g);
            }
            i0
        };
        if let Some(e) = jc.get_mut(i) {
            *e = JcEntry { neg_rip, addr };
            self.jc_used.fill(i, global);
        }
    }

    fn flush_writes(&mut self) {
        let tlb = &mut self.ctx.tlb;
        self.tlb_used.for_each(|i| tlb.clear_writes(i));
    }

    /// Makes every write entry log its stores again (a dirty-bitmap harvest happened).
    fn log_all_writes(&mut self) {
        let tlb = &mut self.ctx.tlb;
        self.tlb_used.for_each(|i| tlb.log_writes(i));
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        tracing::debug!("emu translator: {:?} {:?}", self.stats, self.index.stats);
    }
}

/// A jump that may be linked to the translation the run loop looks up next, if nothing
/// changed in between (same RIP, TLB epoch, CPL and cache contents).
#[derive(Clone, Copy)]
struct PendingLink {
    site: u32,
    rip: u64,
    epoch: u64,
    cpl: u8,
    flushes: u64,
}

/// An exit-request word that nobody sets (a vCPU without shared state, in tests).
static NO_REQUEST: AtomicU32 = AtomicU32::new(0);

/// `ANYVISOR_EMU_JIT_HOT`: interpreted runs of a block start before it is translated (read
/// once; default [`HOT`]). 0 translates everything at first sight, which is how the test
/// suites exercise the translator on short test programs.
fn hot_from_env() -> u16 {
    static H: OnceLock<u16> = OnceLock::new();
    *H.get_or_init(|| {
        std::env::var("ANYVISOR_EMU_JIT_HOT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(HOT)
    })
}

impl Exec<'_> {
    /// [`Exec::run_batch`] with translated blocks where the translator has them.
    pub fn run_batch_jit(
        &mut self,
        jit: &mut Jit,
        blocks: &mut BlockCache,
        budget: u32,
        stop_at_user: bool,
    ) -> R<(u32, bool)> {
        let mut n = 0u32;
        // The exit-request word: cleared here, after the run loop looked at what sets it
        // (kicks, posted interrupts), so one set from now on ends this batch at the next block
        // head.
        let vm = self.vm;
        let req = vm
            .vcpus
            .get(self.cpu.id as usize)
            .map_or(&NO_REQUEST, |v| &v.exit_req);
        if req.load(Ordering::Relaxed) != 0 {
            req.store(0, Ordering::SeqCst);
        }
        jit.ctx.req = req.as_ptr() as u64;
        while n < budget {
            if self.cpu.irq_check {
                self.try_inject()?;
                if self.cpu.mp_state != MpState::Runnable {
                    break;
                }
            }
            if stop_at_user
                && self.cpu.cpl == 3
                && !self.cpu.irq_check
                && self.cpu.mode64()
                && self.cpu.mp_state == MpState::Runnable
            {
                return Ok((n, true));
            }
            if self.cpu.shadow != 0 {
                // An interrupt waits for the end of the shadow: one instruction, then check.
                self.step()?;
                n += 1;
                continue;
            }
            if !self.cpu.mode64() {
                let (k, at_user) = self.run_batch(blocks, 1, stop_at_user)?;
                n += k;
                if at_user {
                    return Ok((n, true));
                }
                if k == 0 || self.cpu.mp_state != MpState::Runnable {
                    break;
                }
                continue;
            }
            let code = match self.jit_lookup(jit) {
                Ok(c) => c,
                Err(Exc::Fault(v, c)) => {
                    self.cpu.shadow = 0;
                    self.raise_event(v, c, Event::Exception)?;
                    n += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.cpu.shadow = 0;
            if self.cpu.cpl == 3 {
                // The page passed a fetch at CPL 3: its blocks may run there from now on (see
                // [`XPage`]).
                let vpn = self.cpu.rip >> 12;
                jit.note_user_page(vpn);
                if jit.xpage_kept {
                    jit.unlink_xpage_from(vpn);
                }
            }
            if let (Some(p), Found::Code(c, chk, xpage)) = (jit.pending.take(), &code)
                && p.rip == self.cpu.rip
                && p.epoch == self.cpu.tlb.epoch
                && p.cpl == self.cpu.cpl
                && p.flushes == jit.stats.flushes
            {
                // A link comes from a block of the same page: past the target's
                // page-generation check (see `emit::Emitter::head_checks`), except into a
                // block that also checks the next page's.
                let to = match jit.unchecked.and_then(|u| c.offset().checked_sub(u)) {
                    Some(to) if !*xpage && to >= *chk => to,
                    _ => *chk,
                };
                jit.link(p.site, *chk, to);
                if *xpage && !jit.xpage_links.iter().any(|&(c, _, _)| c == *chk) {
                    // Kept across class changes only if the source (in the same first page)
                    // cannot run at CPL 3: see [`XPage`].
                    let vpn = self.cpu.rip >> 12;
                    let bound = self.cpu.cpl == 3 || jit.user_page(vpn);
                    jit.xpage_links.push((*chk, bound, vpn));
                    jit.xpage_kept |= !bound;
                }
            }
            if let Found::Code(_, chk, xpage) = &code {
                // A jump-cache entry of a cross-page block survives MOV to CR3 only if both
                // pages' translations do.
                let rip = self.cpu.rip;
                let global = self.cpu.tlb.is_global(rip)
                    && (!*xpage || self.cpu.tlb.is_global((rip | 0xfff).wrapping_add(1)));
                jit.jc_fill(self.cpu.rip, *chk, global, self.cpu.cpl);
            }
            n += match code {
                Found::Code(c, _, _) => {
                    let k = self.jit_run(jit, c, budget - n)?;
                    if req.load(Ordering::Relaxed) != 0 {
                        n += k;
                        break;
                    }
                    k
                }
                Found::Untranslated => {
                    self.interp_one(jit, true)?;
                    let k = 1;
                    jit.stats.untranslated += 1;
                    jit.stats.untranslated_insns += u64::from(k);
                    k
                }
                Found::Cold => {
                    let k = self.interp_block(blocks)?;
                    jit.stats.cold += 1;
                    jit.stats.cold_insns += u64::from(k);
                    k
                }
            };
            if self.cpu.mp_state != MpState::Runnable {
                break;
            }
        }
        TRANSLATED.fetch_add(std::mem::take(&mut jit.translated), Ordering::Relaxed);
        Ok((n, false))
    }

    /// The translation of the block at RIP (64-bit mode), translating it on a miss. `None`:
    /// the instruction at RIP is not translated.
    ///
    /// A block whose last instruction crosses into the next page (see [`XPage`]) is used only
    /// while the next page translates, for an instruction fetch at the current privilege, to
    /// the physical page it was translated from and that page keeps its write generation;
    /// when it does not translate, the block start runs cold (the interpreter's fetch raises
    /// the #PF, with CR2 the next page's address, if the instruction gets that far).
    fn jit_lookup(&mut self, jit: &mut Jit) -> R<Found> {
        let rip = self.cpu.rip;
        if !canonical(rip) {
            return Err(Exc::Fault(13, Some(0)));
        }
        let user = self.cpu.cpl == 3;
        let pa = self.translate(rip, Acc::Exec, user)?;
        let page = pa >> 12;
        jit.stats.lookups += 1;
        let Some(e) = jit.index.entry(rip, page) else {
            return Ok(Found::Cold);
        };
        let mut next_unmapped = false;
        if e.heat == index::RESOLVED && self.vm.code.generation(page) == Some(e.generation) {
            if e.chk == index::UNTRANSLATED {
                return Ok(Found::Untranslated);
            }
            let (code, delta) = (e.code, e.chk);
            if jit.cache.is_valid(code) {
                let chk = code.offset() - u32::from(delta & !index::XPAGE);
                if delta & index::XPAGE == 0 {
                    return Ok(Found::Code(code, chk, false));
                }
                match self.next_page_current(jit, rip, code.offset()) {
                    Some(true) => return Ok(Found::Code(code, chk, true)),
                    Some(false) => {}
                    None => next_unmapped = true,
                }
            }
        }
        if next_unmapped {
            return Ok(Found::Cold);
        }
        let Some(e) = jit.index.entry(rip, page) else {
            return Ok(Found::Cold);
        };
        if e.heat < jit.hot {
            e.heat += 1;
            return Ok(Found::Cold);
        }
        let Some(generation) = self.vm.code.mark(page) else {
            return Ok(Found::Cold);
        };
        let avail = (0x1000 - (rip & 0xfff) as usize).min(READ_AHEAD);
        let mut buf = [0u8; READ_AHEAD + 15];
        let Some(bytes) = buf.get_mut(..avail) else {
            return Ok(Found::Cold);
        };
        if !self.ram.read_bytes(pa, bytes) {
            return Ok(Found::Cold);
        }
        let t0 = std::time::Instant::now();
        // The generic instructions' host encodings are not checked up front (the emitter
        // encodes each one anyway): only when the block fails to emit is it decoded again with
        // the check, so that one odd form ends the block instead of failing it.
        let mut len = avail;
        let mut next = None;
        if jit.decode_block(&buf[..len], rip, self.vm.features, false) {
            // The block ran into an instruction cut off at the page end: if the next page is
            // mapped and executable now, decode again with its first bytes.
            match self.read_next_page(rip, buf.get_mut(avail..).unwrap_or(&mut [])) {
                Some(x) => {
                    len = avail + 15;
                    jit.decode_block(&buf[..len], rip, self.vm.features, false);
                    next = Some(x);
                }
                // The block's first instruction: left unresolved (interpreted, and translated
                // once the next page is mapped) rather than recorded as untranslated.
                None if jit.insns.is_empty() => {
                    jit.stats.emit_ns += t0.elapsed().as_nanos() as u64;
                    return Ok(Found::Cold);
                }
                None => {}
            }
        }
        let page_end = (rip | 0xfff).wrapping_add(1);
        let crosses = |insns: &[(iced_x86::Instruction, Kind)]| {
            page_end != 0 && insns.last().is_some_and(|(i, _)| i.next_ip() > page_end)
        };
        let mut guard = emit::Guard {
            gen_addr: self.vm.code.generation_addr(page).unwrap_or(0),
            generation,
            next: None,
        };
        let mut xpage = None;
        if let Some(x) = next
            && crosses(&jit.insns)
        {
            guard.next = Some((x.gen_addr, x.generation));
            xpage = Some(x);
        }
        let mut chk = 0;
        let code = if jit.insns.is_empty() || guard.gen_addr == 0 {
            None
        } else {
            let out = match jit.emitter.block(rip, &jit.insns, guard) {
                Ok(out) => out,
                Err(_) => {
                    jit.decode_block(&buf[..len], rip, self.vm.features, true);
                    if !crosses(&jit.insns) {
                        guard.next = None;
                        xpage = None;
                    }
                    jit.emitter
                        .block(rip, &jit.insns, guard)
                        .map_err(|e| Exc::unhandled(format!("translator: {e}")))?
                }
            };
            let r = match jit.cache.push(&out.bytes) {
                Some(r) => r,
                None => {
                    jit.flush_code();
                    jit.cache
                        .push(&out.bytes)
                        .ok_or_else(|| Exc::unhandled("translator: block larger than the cache"))?
                }
            };
            chk = r.offset() + out.chk;
            if emit::perf_map_enabled()
                && let Some(addr) = jit.cache.address_of(r.offset())
            {
                emit::perf_map_note(addr, out.bytes.len(), &emit::perf_map_name(rip));
            }
            let r = r
                .advanced(out.entry)
                .ok_or_else(|| Exc::unhandled("translator: block entry outside the block"))?;
            if !jit.unchecked_varies && jit.unchecked.is_none_or(|u| u == out.unchecked) {
                jit.unchecked = Some(out.unchecked);
            } else {
                jit.unchecked_varies = true;
                jit.unchecked = None;
            }
            jit.stats.blocks += 1;
            jit.stats.insns += jit.insns.len() as u64;
            jit.stats.bytes += out.bytes.len() as u64;
            if let Some(x) = xpage {
                jit.stats.xpage_blocks += 1;
                jit.xpages.insert(r.offset(), x);
            }
            Some(r)
        };
        jit.stats.emit_ns += t0.elapsed().as_nanos() as u64;
        // A chained entry too far before the block's entry for the index's 15 bits (not seen: it
        // is the block's first byte, the entry follows the head checks) leaves the block start
        // unresolved, so it is translated again next time.
        let flag = if xpage.is_some() { index::XPAGE } else { 0 };
        let delta = match code {
            None => Some(index::UNTRANSLATED),
            Some(c) => c
                .offset()
                .checked_sub(chk)
                .and_then(|d| u16::try_from(d).ok())
                .filter(|&d| d < index::XPAGE)
                .map(|d| d | flag),
        };
        if let (Some(e), Some(delta)) = (jit.index.entry(rip, page), delta) {
            e.code = code.unwrap_or(hv_emu_jit_rt::CodeRef::NONE);
            e.generation = generation;
            e.chk = delta;
            e.heat = index::RESOLVED;
        }
        Ok(code.map_or(Found::Untranslated, |c| {
            Found::Code(c, chk, xpage.is_some())
        }))
    }

    /// The physical address of the page after `rip`'s, translated for an instruction fetch at
    /// the current privilege; `None` when it does not translate (no fault raised: CR2 kept).
    fn next_page_phys(&mut self, rip: u64) -> Option<u64> {
        let lin = (rip | 0xfff).checked_add(1).filter(|&l| canonical(l))?;
        let cr2 = self.cpu.cr2;
        match self.translate(lin, Acc::Exec, self.cpu.cpl == 3) {
            Ok(pa) => Some(pa),
            Err(_) => {
                self.cpu.cr2 = cr2;
                None
            }
        }
    }

    /// The page after `rip`'s, for a block whose last instruction crosses into it: translates
    /// it for an instruction fetch at the current privilege (no fault is raised: CR2 is kept),
    /// marks it as code and reads its first bytes into `buf`. `None` when it is not mapped
    /// executable RAM (the block then ends before the crossing instruction, which the
    /// interpreter runs and faults on).
    fn read_next_page(&mut self, rip: u64, buf: &mut [u8]) -> Option<XPage> {
        let pa = self.next_page_phys(rip)?;
        let page = pa >> 12;
        let generation = self.vm.code.mark(page)?;
        let gen_addr = self.vm.code.generation_addr(page)?;
        if !self.ram.read_bytes(pa, buf) {
            return None;
        }
        Some(XPage {
            page,
            generation,
            gen_addr,
        })
    }

    /// Whether the cross-page block whose body is at cache offset `body` (at `rip`) may run:
    /// its next page translates (fetch, current privilege) to the physical page it was made
    /// from, whose write generation is unchanged. `None`: the next page does not translate
    /// now (no fault raised, CR2 kept).
    fn next_page_current(&mut self, jit: &Jit, rip: u64, body: u32) -> Option<bool> {
        let x = jit.xpages.get(&body).copied();
        let pa = self.next_page_phys(rip)?;
        Some(x.is_some_and(|x| {
            x.page == pa >> 12 && self.vm.code.generation(x.page) == Some(x.generation)
        }))
    }

    /// Runs one translated block (and the instruction it stopped before, if any). Returns the
    /// instructions executed.
    fn jit_run(&mut self, jit: &mut Jit, code: CodeRef, left: u32) -> R<u32> {
        if !jit.xpage_links.is_empty() {
            // Jumps linked to cross-page blocks hold for the translations they were linked
            // under, and those out of a page user mode may fetch for the privilege class too
            // (see [`XPage`]).
            let all = jit.tlb_epoch != self.cpu.tlb.epoch;
            let class = (jit.cpl == 3) != (self.cpu.cpl == 3);
            if all || class {
                let links = std::mem::take(&mut jit.xpage_links);
                for &(chk, bound, _) in &links {
                    if all || bound {
                        jit.unlink_into(chk);
                    }
                }
                if !all {
                    jit.xpage_links = links.into_iter().filter(|&(_, bound, _)| !bound).collect();
                }
                jit.xpage_kept = !jit.xpage_links.is_empty();
            }
        }
        if jit.tlb_epoch != self.cpu.tlb.epoch {
            if jit.tlb_global_epoch == self.cpu.tlb.global_epoch {
                jit.flush_nonglobal_tlb();
            } else {
                jit.flush_tlb();
                jit.tlb_global_epoch = self.cpu.tlb.global_epoch;
            }
            jit.tlb_epoch = self.cpu.tlb.epoch;
        }
        if jit.cpl != self.cpu.cpl {
            // The soft TLB and the jump cache have a half per privilege class: nothing to empty.
            jit.cpl = self.cpu.cpl;
            jit.ctx.tlb_base = jit
                .ctx
                .tlb
                .read
                .get(tlb_half(self.cpu.cpl))
                .map_or(0, |e| e as *const u64 as u64);
            jit.ctx.jc_base = jit
                .ctx
                .jc
                .get(jc_half(self.cpu.cpl))
                .map_or(0, |e| e as *const JcEntry as u64);
        }
        let marks = self.vm.code.marks();
        if marks != jit.marks {
            jit.flush_writes();
            jit.marks = marks;
        }
        // Announce the dirty epoch this run's unlogged write entries belong to (see
        // `VmShared::quiesce_unlogged_writes`): publish, then re-check, so a harvest either
        // sees this run and waits for it, or this run sees the new epoch.
        let vm = self.vm;
        let active = vm.vcpus.get(self.cpu.id as usize).map(|v| &v.jit_active);
        let epoch = loop {
            let e = vm.dirty_epoch.load(Ordering::SeqCst);
            let Some(a) = active else { break e };
            a.store(e, Ordering::SeqCst);
            if vm.dirty_epoch.load(Ordering::SeqCst) == e {
                break e;
            }
        };
        if epoch != jit.dirty_epoch {
            jit.log_all_writes();
            jit.dirty_epoch = epoch;
        }
        let ctx = &mut *jit.ctx;
        ctx.flags = self.cpu.rflags;
        ctx.exit = 0;
        ctx.count = 0;
        ctx.log_n = 0;
        ctx.miss_kind = 0;
        ctx.nbudget = u64::from(left).min(MAX_RUN).wrapping_neg();
        ctx.fs = self.cpu.seg[FS].base;
        ctx.gs = self.cpu.seg[GS].base;
        ctx.link = 0;
        ctx.dead = 0;
        emit::simd::enter(&mut ctx.simd, self.cpu, self.vm.features);
        emit::sys::enter(&mut ctx.sys, self);
        emit::time::enter(&mut ctx.time, self.cpu, &self.vm.clock);
        jit.stats.entries += 1;
        let called = jit.cache.enter(code, &mut self.cpu.gpr, ctx);
        if let Some(a) = active {
            // Release is enough here: a harvest that reads 0 must see this run's stores, and
            // needs no ordering with what this thread loads next (the publication above is the
            // store-then-load pair that needs SeqCst). A plain store instead of an `xchg`.
            a.store(0, Ordering::Release);
        }
        if called.is_err() {
            // Unreachable in practice (lookup checked it); translate again next time.
            return Ok(0);
        }
        let (link, dead, exit, rip) = (ctx.link, ctx.dead, ctx.exit, ctx.rip);
        if exit == 0 && dead == 0 {
            let budget = u64::from(left).min(MAX_RUN);
            let n = if link != 0 {
                &mut jit.stats.exits_link
            } else if ctx.count >= budget {
                &mut jit.stats.exits_budget
            } else if vm
                .vcpus
                .get(self.cpu.id as usize)
                .is_some_and(|v| v.exit_req.load(Ordering::Relaxed) != 0)
            {
                &mut jit.stats.exits_request
            } else {
                &mut jit.stats.exits_other
            };
            *n += 1;
        }
        if dead != 0
            && let Some(chk) = jit.cache.offset_of(dead)
        {
            jit.stats.stale += 1;
            jit.unlink_into(chk);
        }
        if exit == 0
            && link != 0
            && let Some(site) = jit.cache.offset_of(link)
        {
            jit.pending = Some(PendingLink {
                site,
                rip,
                epoch: self.cpu.tlb.epoch,
                cpl: self.cpu.cpl,
                flushes: jit.stats.flushes,
            });
        }
        let ctx = &mut *jit.ctx;
        self.cpu.rflags = (self.cpu.rflags & !ARITH_FLAGS) | (ctx.flags & ARITH_FLAGS);
        self.cpu.rip = ctx.rip;
        emit::sys::leave(ctx, self);
        let mut last = u64::MAX;
        let logged = (ctx.log_n as usize).min(LOG_CAP);
        for &pa in ctx.log.get(..logged).unwrap_or(&[]) {
            if pa != last {
                self.ram.mark_dirty(pa);
                self.note_write(pa);
                last = pa;
            }
        }
        let mut n = ctx.count as u32;
        jit.translated += ctx.count;
        jit.stats.run += ctx.count;
        if ctx.exit == 1 {
            let (kind, lin) = (ctx.miss_kind, ctx.miss_lin);
            jit.stats.exits_to_interp += 1;
            if kind != 0 {
                self.jit_fill(jit, lin, kind == 2);
            }
            self.interp_one(jit, false)?;
            n += 1;
        }
        Ok(n)
    }

    /// Fills the soft-TLB entry of `lin` if the page is RAM and accessible (no fault is
    /// raised here: the interpreter runs the instruction next and raises it).
    fn jit_fill(&mut self, jit: &mut Jit, lin: u64, write: bool) {
        if !canonical(lin) {
            return;
        }
        let user = self.cpu.cpl == 3;
        let cr2 = self.cpu.cr2;
        let acc = if write { Acc::Write } else { Acc::Read };
        let pa = match self.translate(lin, acc, user) {
            Ok(pa) => pa,
            Err(_) => {
                self.cpu.cr2 = cr2;
                return;
            }
        };
        let Some(host) = self.ram.host_page(pa) else {
            return;
        };
        if write && self.vm.code.is_marked(pa >> 12) {
            return;
        }
        // The entry must not outlive a flush that happened while filling (the walk itself
        // does not flush, but keep the check cheap and explicit).
        if jit.tlb_epoch != self.cpu.tlb.epoch {
            return;
        }
        let vpn = lin >> 12;
        let slot = ((vpn as usize) & (TLB_ENTRIES - 1)) | tlb_half(self.cpu.cpl);
        let global = self.cpu.tlb.is_global(lin);
        // A read and a write fill of one page agree; a global page's entry survives MOV to
        // CR3 only if every fill of it was global (`fill` keeps a non-global one so).
        jit.tlb_used.fill(slot, global);
        // Unlogged only if the page is dirty already (the bitmap has it since the last
        // harvest: `jit.dirty_epoch` is current, checked at every entry) and holds no code
        // (`is_marked` above; a page that becomes code drops all write entries).
        let write = write.then(|| self.ram.is_dirty(pa));
        jit.ctx.tlb.fill(slot, lin & !0xfff, host, pa, write);
    }

    /// Runs the one instruction at RIP (64-bit mode) with the interpreter, from the
    /// one-instruction cache ([`OneOp`]), delivering the exception it raises: what
    /// [`Exec::step`] does, which it falls back to for what the cache does not hold (an
    /// instruction crossing its page, code outside tracked RAM, an invalid encoding).
    /// `untranslated`: the translator does not take this instruction (counted for
    /// `ANYVISOR_EMU_JIT_PROFILE`), rather than a translated one after a soft-TLB miss.
    fn interp_one(&mut self, jit: &mut Jit, untranslated: bool) -> R<()> {
        self.cpu.shadow = 0;
        let rip = self.cpu.rip;
        if !canonical(rip) {
            return self.step();
        }
        let user = self.cpu.cpl == 3;
        let pa = match self.translate(rip, Acc::Exec, user) {
            Ok(pa) => pa,
            Err(Exc::Fault(v, c)) => return self.raise_event(v, c, Event::Exception),
            Err(e) => return Err(e),
        };
        let page = pa >> 12;
        let i = crate::decode::rip_hash(rip) & (ONE_OPS - 1);
        let Some(e) = jit.ones.get_mut(i) else {
            return self.step();
        };
        if !(e.valid
            && e.rip == rip
            && e.phys == pa
            && self.vm.code.generation(page) == Some(e.generation))
        {
            // Mark the page before reading it, so a concurrent write invalidates what is read.
            let Some(generation) = self.vm.code.mark(page) else {
                return self.step();
            };
            let mut buf = [0u8; 15];
            let avail = (0x1000 - (rip & 0xfff) as usize).min(buf.len());
            let Some(bytes) = buf.get_mut(..avail) else {
                return self.step();
            };
            if !self.ram.read_bytes(pa, bytes) {
                return self.step();
            }
            let insn = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
            if insn.is_invalid() {
                // #UD, or the instruction goes on in the next page: `step` sorts it out.
                return self.step();
            }
            crate::decode::DECODES.fetch_add(1, Ordering::Relaxed);
            jit.stats.one_op_decodes += 1;
            *e = OneOp {
                rip,
                phys: pa,
                generation,
                valid: true,
                insn,
                handler: crate::fast::handler(&insn),
            };
        }
        jit.stats.one_ops += 1;
        let (insn, handler) = (e.insn, e.handler);
        if untranslated {
            emit::note_untranslated(&insn);
        }
        self.cpu.rip = insn.next_ip() & self.ip_mask();
        match handler(self, &insn) {
            Ok(()) => Ok(()),
            Err(err) => self.fail(&insn, err),
        }
    }

    /// Runs the interpreter's decoded block at RIP.
    fn interp_block(&mut self, blocks: &mut BlockCache) -> R<u32> {
        let slot = match self.lookup_block(blocks) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.step()?;
                return Ok(1);
            }
            Err(Exc::Fault(v, c)) => {
                self.raise_event(v, c, Event::Exception)?;
                return Ok(1);
            }
            Err(e) => return Err(e),
        };
        self.cpu.code_written = false;
        let block = blocks.block(slot);
        let mut n = 0;
        for op in block.ops.iter() {
            self.cpu.rip = op.insn.next_ip() & block.ip_mask;
            n += 1;
            if let Err(e) = (op.handler)(self, &op.insn) {
                self.fail(&op.insn, e)?;
                break;
            }
            if self.cpu.rip != op.follow || self.cpu.irq_check || self.cpu.code_written {
                break;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
#[path = "jc_tests.rs"]
mod jc_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
#[path = "xpage_tests.rs"]
mod xpage_tests;

/// Runs guest code from `state` on one engine for about `budget` instructions (whole blocks),
/// with exceptions reported instead of delivered: the run stops at the first one (left in
/// `state.events.exception`), at `hlt`, or when the budget is spent. Returns whether it
/// stopped by itself (an exception or `hlt`), i.e. whether two engines must agree on the
/// resulting state. For differential testing and fuzzing of the translator (which
/// translates every block here at first sight).
pub fn run_engine(
    engine: Engine,
    model: &hv::CpuModel,
    state: &mut hv::CpuState,
    memory: &hv::GuestMemory,
    io: &dyn hv::DeviceIo,
    budget: u32,
) -> hv::Result<bool> {
    use crate::cpu::Cpu;
    use vm_memory::GuestMemoryBackend as _;
    let shared = crate::vm::VmShared::new(
        model.clone(),
        1,
        crate::clock::default_tsc_khz(),
        memory.last_addr().0,
    );
    let mut cpu = Box::new(Cpu::new(0));
    cpu.load_state(state);
    cpu.deliver_exceptions = false;
    let ram = crate::mmu::Ram::new(memory);
    let mut jit = match engine {
        Engine::Interp => None,
        Engine::Jit => {
            let mut j = Jit::new(1 << 20).map_err(|e| hv::Error::Unhandled(e.to_string()))?;
            // Translate at first sight: the point of a differential run.
            j.hot = 0;
            Some(j)
        }
    };
    let mut blocks = BlockCache::new();
    let mut ex = Exec {
        cpu: &mut cpu,
        mem: memory,
        ram: &ram,
        io,
        vm: &shared,
        lapic_enabled: false,
    };
    let mut n = 0u32;
    let mut done = false;
    while n < budget {
        let r = match jit.as_mut() {
            Some(j) => ex.run_batch_jit(j, &mut blocks, 1, false),
            None => ex.run_batch(&mut blocks, 1, false),
        };
        let k = match r {
            Ok((k, _)) => k,
            Err(Exc::Unhandled(m)) => return Err(hv::Error::Unhandled(*m)),
            Err(_) => {
                done = true;
                break;
            }
        };
        n += k.max(1);
        if ex.cpu.reported.is_some() || ex.cpu.mp_state != MpState::Runnable {
            done = true;
            break;
        }
    }
    let reported = cpu.reported.take();
    let new = cpu.to_state(&[], 0, 0);
    state.regs = new.regs;
    state.sregs = new.sregs;
    state.events.exception = reported.map(|(vector, error_code)| hv::PendingException {
        vector,
        error_code,
        injected: false,
    });
    Ok(done)
}

/// Whether no instruction of `code` (decoded straight through as 64-bit code) leaves a flag
/// undefined. Differential runs compare engines only on such code: the translator computes
/// undefined flags as the host CPU does, the interpreter its own way, and a branch on one
/// sends the two runs different ways.
pub fn flags_defined_throughout(code: &[u8]) -> bool {
    Decoder::with_ip(64, code, 0, DecoderOptions::NONE)
        .into_iter()
        .all(|i| i.rflags_undefined() == 0)
}
