//! Guest instructions to host machine code (x86-64 on x86-64).
//!
//! The glue code comes from the small hand emitter in `asm.rs` (iced-x86's `CodeAssembler`
//! was measured too slow, see there); each guest instruction is re-encoded with iced-x86's
//! `Encoder`.
//!
//! Most guest instructions are run *as themselves*: the decoded instruction is copied, its
//! guest registers replaced by host scratch registers that were loaded from the guest register
//! file, its memory operand replaced by `[rsi]` holding the host address the soft TLB gave, and
//! re-encoded. The host CPU then computes the result and every flag exactly as the guest CPU
//! would (it *is* an x86-64), undefined flags included.
//!
//! **Guest flags live in the host flags register** for the whole block, and across chained
//! blocks: the shared entry [`trampoline`] loads the six arithmetic flags with `sahf` (and an
//! `add` that sets OF) and saves them with `pushfq` when the chain returns to it. Everything the emitter puts between guest instructions is flag-neutral (`mov`,
//! `lea`, `movzx`, `shrx`/`sarx`/`shlx`, `pext`/`pdep`, `jrcxz`, `jmp`), so no per-instruction
//! flag bookkeeping is needed and flag-reading instructions (adc, sbb, jcc, cmovcc, setcc) just
//! work. The few checks that need comparisons (`div`, string instructions) save the flags with
//! `lahf; seto al` first and restore them (`add al, 0x7f; sahf`) on both ways out.
//!
//! Host register use inside a block: `rbx` = guest register file (`[u64; 16]`), `r15` = the
//! context ([`super::Ctx`]), `r14` = its soft TLB, `r13` = 12 (page shift), `r12` = guest
//! instructions left in the run's budget minus one (counting down; below 0 once spent);
//! `rsi` holds memory addresses, `rcx`/`rdx`/`rdi` are TLB scratch.
//!
//! **Register cache** ([`RegCache`]): generic instructions, `push`, `pop`, `call rel` and
//! `ret` keep guest registers in `rax` (guest rax only, so the short `rax`/`al` encodings
//! still encode) and `rbp, r8..r11` (any guest register, least recently used replaced): a
//! register is loaded at its first use in the block (not at all when the instruction only
//! writes it whole), the instruction is re-encoded on the cache's registers, and written
//! registers stay there, dirty. They are written back to the register file where it must be
//! current: before every other kind of instruction (which uses those host registers as
//! scratch, or pins guest rax/rcx/rdx to host rax/rcx/rdx: implicit operands, `cl` counts,
//! high-byte registers, `div`; the instruction then takes the uncached path, registers loaded
//! and stored around it as before), before every block exit (direct link, loop back edge,
//! jump cache), and by each exit stub that leaves before an instruction (soft-TLB miss,
//! alignment, non-canonical target): a stub records the dirty registers at its jump and
//! stores them first, so the run loop and the interpreter (a #PF, #GP) see exactly the state
//! before that instruction. The write-backs are `mov`s, flag-neutral like all glue.

use iced_x86::IcedError;

use super::asm::{
    Asm, Label, Mem, R8, R12, R13, R14, R15, RAX, RBP, RBX, RCX, RDI, RDX, RSI, RSP, at, sum,
};
use iced_x86::{
    Code, Encoder, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic as M, OpAccess,
    OpKind, Register,
};

use super::{
    C_COUNT, C_DEAD, C_EXIT, C_FLAGS, C_FS, C_GS, C_JC, C_LINK, C_LOG, C_LOG_N, C_MISS_KIND,
    C_MISS_LIN, C_NBUDGET, C_REQ, C_RIP, C_TLB, JC_SETS, JC_WAYS,
};
use crate::decode::canonical;

#[cfg(test)]
#[path = "reg_tests.rs"]
mod reg_tests;
#[path = "simd.rs"]
pub(super) mod simd;
#[path = "sys.rs"]
pub(super) mod sys;
#[path = "time.rs"]
pub(super) mod time;

/// How a guest instruction is translated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Re-encoded with host registers / `[rsi]` (`div`/`idiv` checked first, so the host
    /// never takes #DE).
    Generic,
    Nop,
    Push,
    Pop,
    CallRel,
    CallReg,
    Ret,
    JmpRel,
    JmpReg,
    JmpMem,
    Jcc,
    /// An SSE/AVX/crypto instruction run as itself (`simd.rs`).
    Simd,
    /// `call [mem]`.
    CallMem,
    /// `pushfq`: the arithmetic flags from the host, the rest as the block was entered with.
    Pushf,
    /// `leave` (64-bit).
    Leave,
    /// `stos`/`movs` (optionally `rep`) with 64-bit addresses: run by the host when DF is
    /// clear and every byte is in one page per operand, else interpreted.
    Str,
    /// `mov r/m, sreg` (`sys.rs`, as the kinds below).
    SegRead,
    /// `cli` (CPL <= IOPL, else interpreted: #GP).
    Cli,
    /// `sti`: the next instruction runs in its shadow in the same block when it can
    /// ([`sys::in_shadow`]), then the block leaves only if an interrupt may be waiting; else
    /// it ends the block and the run loop checks interrupts after the shadow.
    Sti,
    Cld,
    Std,
    /// `popfq`: leaves to the run loop when it changes IOPL or sets IF with an interrupt
    /// possibly waiting; else the block goes on.
    Popf,
    /// `iretq`: ends the block; the run loop finishes the same-level case (`sys.rs`).
    Iret,
    /// `swapgs` at CPL 0.
    Swapgs,
    /// `rdfsbase`/`rdgsbase`/`wrfsbase`/`wrgsbase` with CR4.FSGSBASE.
    FsGsBase,
    /// `push qword [mem]`.
    PushMem,
    /// `cmpxchg16b m128` (one vCPU only, see `sys.rs`).
    Cmpxchg16b,
    /// `rdtsc` (`time.rs`, as the kinds below): the host's `rdtsc` where the guest TSC is
    /// it plus a constant, else interpreted.
    Rdtsc,
    /// `rdtscp` (models with RDTSCP).
    Rdtscp,
    /// `rdpid r64` (models with RDPID).
    Rdpid,
}

impl Kind {
    /// Whether the block ends after this instruction.
    pub fn ends_block(self) -> bool {
        matches!(
            self,
            Kind::CallRel
                | Kind::CallReg
                | Kind::Ret
                | Kind::JmpRel
                | Kind::JmpReg
                | Kind::JmpMem
                | Kind::Jcc
                | Kind::CallMem
                | Kind::Iret
        )
    }

    /// Whether an instruction of this kind may follow one of kind `prev` in a block (after a
    /// `sti`, only what may run in its shadow, see `sys.rs`).
    pub fn may_follow(self, prev: Kind) -> bool {
        prev != Kind::Sti || sys::in_shadow(self)
    }
}

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// Host registers guest operands are loaded into: (64, 32, 16, 8-bit names). Index 1 (rcx) is
/// reserved for guest rcx.
const HOST: [[Register; 4]; 8] = [
    [Register::RAX, Register::EAX, Register::AX, Register::AL],
    [Register::RCX, Register::ECX, Register::CX, Register::CL],
    [Register::RDX, Register::EDX, Register::DX, Register::DL],
    [Register::RDI, Register::EDI, Register::DI, Register::DIL],
    [Register::R8, Register::R8D, Register::R8W, Register::R8L],
    [Register::R9, Register::R9D, Register::R9W, Register::R9L],
    [
        Register::R10,
        Register::R10D,
        Register::R10W,
        Register::R10L,
    ],
    [
        Register::R11,
        Register::R11D,
        Register::R11W,
        Register::R11L,
    ],
];

/// Guest GPR number (0 = rax .. 15 = r15) of a general register operand (ah, ch, dh, bh
/// included: bits 8..16 of rax, rcx, rdx, rbx); `None` for anything else.
fn gpr_num(r: Register) -> Option<usize> {
    if !r.is_gpr() {
        return None;
    }
    let full = r.full_register();
    GPR64.iter().position(|&g| g == full)
}

fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// Guest registers an instruction uses without naming them (rax, rdx: never others), all
/// loaded into the same host registers (the rewrite keeps guest rax/rcx/rdx in host
/// rax/rcx/rdx) and stored back after it.
fn implicit(m: M, op_count: u32) -> &'static [usize] {
    match m {
        M::Cbw | M::Cwde | M::Cdqe | M::Cmpxchg => &[0],
        M::Cwd | M::Cdq | M::Cqo | M::Mul | M::Div | M::Idiv => &[0, 2],
        M::Mulx => &[2],
        M::Imul if op_count == 1 => &[0, 2],
        _ => &[],
    }
}

fn gpr_of(r: Register) -> Option<usize> {
    GPR64.iter().position(|&g| g == r)
}

fn host_sized(h: usize, size: usize) -> Option<Register> {
    sized(HOST.get(h)?, size)
}

/// The register of `row` (its 64/32/16/8-bit names) for an operand of `size` bytes.
fn sized(row: &[Register; 4], size: usize) -> Option<Register> {
    let i = match size {
        8 => 0,
        4 => 1,
        2 => 2,
        1 => 3,
        _ => return None,
    };
    row.get(i).copied()
}

fn is_moffs(c: Code) -> bool {
    matches!(
        c,
        Code::Mov_AL_moffs8
            | Code::Mov_AX_moffs16
            | Code::Mov_EAX_moffs32
            | Code::Mov_RAX_moffs64
            | Code::Mov_moffs8_AL
            | Code::Mov_moffs16_AX
            | Code::Mov_moffs32_EAX
            | Code::Mov_moffs64_RAX
    )
}

fn is_movs(c: Code) -> bool {
    matches!(
        c,
        Code::Movsb_m8_m8 | Code::Movsw_m16_m16 | Code::Movsd_m32_m32 | Code::Movsq_m64_m64
    )
}

/// The memory operand is addressable by the translator: 64-bit base/index or RIP-relative,
/// no VSIB, no 32-bit address size, not a moffs form.
fn mem_ok(i: &Instruction) -> bool {
    let b = i.memory_base();
    let x = i.memory_index();
    if is_moffs(i.code()) {
        return false;
    }
    let base_ok = b == Register::None || b == Register::RIP || gpr_of(b).is_some();
    let index_ok = x == Register::None || gpr_of(x).is_some();
    let disp_ok = b == Register::RIP || i32::try_from(i.memory_displacement64() as i64).is_ok();
    base_ok && index_ok && disp_ok && !(b == Register::RIP && x != Register::None)
}

/// How `i` (decoded in 64-bit mode) is translated, or `None` if the interpreter runs it.
pub fn classify(i: &Instruction) -> Option<Kind> {
    if let Some(k) = simd::classify(i) {
        return Some(k);
    }
    let m = i.mnemonic();
    let code = i.code();
    match code {
        Code::Push_r64 => return Some(Kind::Push),
        Code::Pushq_imm8 | Code::Pushq_imm32 => return Some(Kind::Push),
        Code::Pop_r64 => return Some(Kind::Pop),
        // A spin-wait hint: nothing to do (its F3 prefix is part of the opcode).
        Code::Pause => return Some(Kind::Nop),
        Code::Call_rel32_64 => return canonical(i.near_branch64()).then_some(Kind::CallRel),
        Code::Call_rm64 if i.op0_kind() == OpKind::Register => return Some(Kind::CallReg),
        Code::Retnq | Code::Retnq_imm16 => return Some(Kind::Ret),
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => {
            return canonical(i.near_branch64()).then_some(Kind::JmpRel);
        }
        Code::Jmp_rm64 if i.op0_kind() == OpKind::Register => return Some(Kind::JmpReg),
        Code::Jmp_rm64 if i.op0_kind() == OpKind::Memory && mem_ok(i) => {
            return Some(Kind::JmpMem);
        }
        Code::Call_rm64 if i.op0_kind() == OpKind::Memory && mem_ok(i) => {
            return Some(Kind::CallMem);
        }
        Code::Pushfq => return Some(Kind::Pushf),
        Code::Leaveq => return Some(Kind::Leave),
        // Hints that never fault, which the interpreter ignores too (in every model).
        Code::Prefetchw_m8
        | Code::Prefetcht0_m8
        | Code::Prefetcht1_m8
        | Code::Prefetcht2_m8
        | Code::Prefetchnta_m8 => return Some(Kind::Nop),
        _ => {}
    }
    if i.is_jcc_short_or_near() {
        // Only the 64-bit forms (a 66 prefix makes a 16-bit target on some CPUs).
        return (i.op0_kind() == OpKind::NearBranch64 && canonical(i.near_branch64()))
            .then_some(Kind::Jcc);
    }
    if matches!(
        code,
        Code::Stosb_m8_AL
            | Code::Stosw_m16_AX
            | Code::Stosd_m32_EAX
            | Code::Stosq_m64_RAX
            | Code::Movsb_m8_m8
            | Code::Movsw_m16_m16
            | Code::Movsd_m32_m32
            | Code::Movsq_m64_m64
    ) {
        // 64-bit addresses, no FS/GS source (ES is always flat in 64-bit mode).
        let src_ok = !is_movs(code)
            || (i.op1_kind() == OpKind::MemorySegRSI
                && !matches!(i.memory_segment(), Register::FS | Register::GS));
        return (i.op0_kind() == OpKind::MemoryESRDI && src_ok && !i.has_repne_prefix())
            .then_some(Kind::Str);
    }
    if i.has_rep_prefix() || i.has_repne_prefix() {
        return None;
    }
    let allowed = matches!(
        m,
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Add
            | M::Adc
            | M::Sub
            | M::Sbb
            | M::And
            | M::Or
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Lea
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shld
            | M::Shrd
            | M::Imul
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Bswap
            | M::Xchg
            | M::Xadd
            | M::Nop
            | M::Lfence
            | M::Mul
            | M::Div
            | M::Idiv
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Cmpxchg
    ) || i.condition_code() != iced_x86::ConditionCode::None
        && matches!(
            m,
            M::Cmovo
                | M::Cmovno
                | M::Cmovb
                | M::Cmovae
                | M::Cmove
                | M::Cmovne
                | M::Cmovbe
                | M::Cmova
                | M::Cmovs
                | M::Cmovns
                | M::Cmovp
                | M::Cmovnp
                | M::Cmovl
                | M::Cmovge
                | M::Cmovle
                | M::Cmovg
                | M::Seto
                | M::Setno
                | M::Setb
                | M::Setae
                | M::Sete
                | M::Setne
                | M::Setbe
                | M::Seta
                | M::Sets
                | M::Setns
                | M::Setp
                | M::Setnp
                | M::Setl
                | M::Setge
                | M::Setle
                | M::Setg
        );
    if !allowed {
        return None;
    }
    if m == M::Nop {
        return Some(Kind::Nop);
    }
    generic_operands(i)
}

/// [`classify`] for a VM whose CPU model shows `features`: also the system instructions and
/// the scalar extensions of that model (`sys.rs`), and the TSC reads (`time.rs`).
pub fn classify_for(i: &Instruction, features: hv::cpu_model::FeatureSet) -> Option<Kind> {
    classify(i)
        .or_else(|| sys::classify(i, features))
        .or_else(|| time::classify(i, features))
}

/// [`Kind::Generic`] if every operand of `i` is a general register, an immediate or one
/// addressable memory operand.
fn generic_operands(i: &Instruction) -> Option<Kind> {
    let mut mems = 0;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                gpr_num(i.op_register(n))?;
            }
            OpKind::Memory => {
                mems += 1;
                if !mem_ok(i) {
                    return None;
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
            | OpKind::Immediate8_2nd => {}
            _ => return None,
        }
    }
    if mems > 1 {
        return None;
    }
    Some(Kind::Generic)
}

/// `ANYVISOR_EMU_JIT_PROFILE=1` (read once; off by default): count, per mnemonic, the guest
/// instructions the jit engine hands to the interpreter because [`classify`] does not take
/// them, and print the top of the list at debug level (`ANYVISOR_LOG=debug`) when a vCPU's
/// translator is dropped. For finding what to translate next; costs one load per
/// interpreted instruction when off.
pub fn profiling() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("ANYVISOR_EMU_JIT_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Untranslated instructions run by the interpreter, by mnemonic (all vCPUs of the process).
static UNTRANSLATED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// Counts `i` as run by the interpreter because it is not translated (see [`profiling`]).
#[inline]
pub fn note_untranslated(i: &Instruction) {
    if !profiling() {
        return;
    }
    let key = i.code() as usize;
    if let Ok(mut v) = UNTRANSLATED.lock() {
        if v.len() <= key {
            v.resize(key + 1, 0);
        }
        if let Some(c) = v.get_mut(key) {
            *c += 1;
        }
    }
    if let Ok(mut v) = SAMPLES.lock() {
        if v.len() <= key {
            v.resize(key + 1, String::new());
        }
        if let Some(s) = v.get_mut(key)
            && s.is_empty()
        {
            *s = format!(
                "ip {:#x} op0 {:?} {:?} base {:?} index {:?} seg {:?} disp {:#x} classify {:?}",
                i.ip(),
                i.op0_kind(),
                i.op0_register(),
                i.memory_base(),
                i.memory_index(),
                i.memory_segment(),
                i.memory_displacement64(),
                classify(i)
            );
        }
    }
}

/// The first instruction of each form the profile counted (its operands, for the report).
static SAMPLES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The profile's top lines, most frequent first: by mnemonic, then by form (iced-x86 `Code`,
/// with a memory operand's base register, which tells e.g. a moffs or a 32-bit address).
pub fn untranslated_report() -> String {
    let Ok(v) = UNTRANSLATED.lock() else {
        return String::new();
    };
    let mut codes: Vec<(u64, Code)> = Code::values()
        .filter_map(|c| v.get(c as usize).map(|&n| (n, c)))
        .filter(|&(n, _)| n > 0)
        .collect();
    let mut by_m: Vec<(u64, M)> = Vec::new();
    for &(n, c) in &codes {
        match by_m.iter_mut().find(|r| r.1 == c.mnemonic()) {
            Some(r) => r.0 += n,
            None => by_m.push((n, c.mnemonic())),
        }
    }
    codes.sort_by_key(|r| std::cmp::Reverse(r.0));
    by_m.sort_by_key(|r| std::cmp::Reverse(r.0));
    let total: u64 = codes.iter().map(|r| r.0).sum();
    let mut out = format!("untranslated instructions run by the interpreter: {total}");
    for (n, m) in by_m.iter().take(40) {
        out.push_str(&format!("\n  {m:?} {n}"));
    }
    out.push_str("\n by form:");
    let samples = SAMPLES.lock().map(|s| s.clone()).unwrap_or_default();
    for (n, c) in codes.iter().take(60) {
        let sample = samples.get(*c as usize).map_or("", |s| s.as_str());
        out.push_str(&format!("\n  {c:?} {n}: {sample}"));
    }
    out
}

/// The most pushes or pops one soft-TLB check covers (the register cache needs no more
/// than two of its registers at a time for them; 8 keeps the range well inside a page).
const MAX_STACK_RUN: usize = 8;

/// How many instructions at the start of `rest` are pushes (`pop`: pops) that one soft-TLB
/// check may cover: `push r64` other than `push rsp` and `push imm`; `pop r64` other than
/// `pop rsp`. Each of them moves rsp by 8 and touches the 8 bytes it moved over, so a run's
/// accesses are one contiguous range next to rsp.
fn stack_run(rest: &[(Instruction, Kind)], pop: bool) -> usize {
    rest.iter()
        .take(MAX_STACK_RUN)
        .take_while(|(i, kind)| match (pop, kind) {
            (false, Kind::Push) => i.code() != Code::Push_r64 || i.op0_register() != Register::RSP,
            (true, Kind::Pop) => i.code() == Code::Pop_r64 && i.op0_register() != Register::RSP,
            _ => false,
        })
        .count()
}

/// Exit codes: every way out of generated code is a `ret` to the [`trampoline`] with guest
/// RIP in rax and, in ecx, the code in bits 7:0 and the guest instructions completed since
/// r12 was last updated in bits 31:8. Go on at RIP (the run loop looks it up).
pub const EXIT_GO: u32 = 0;
/// The interpreter runs the instruction at RIP; +1/+2: after a read/write soft-TLB miss at
/// the guest linear address in rsi.
pub const EXIT_INTERP: u32 = 1;
/// As [`EXIT_GO`], through a linkable jump whose rel32 field is at rdx.
pub const EXIT_LINK: u32 = 4;
/// As [`EXIT_GO`] from a chained entry whose page was written: its address is in rdx.
pub const EXIT_DEAD: u32 = 5;

// The budget check at block heads tests r12 >> 12 (see `Emitter::head_checks`).
const _: () = assert!(super::MAX_RUN < 4096);

/// pext mask of a soft-TLB slot index (the page number's low bits): `[r14 + rdx*8 + field]`
/// is then the slot's field of [`super::SoftTlb`]. The trampoline keeps it at
/// `[rsp + TLB_MASK_AT]`.
const TLB_MASK: u32 = (super::TLB_ENTRIES as u32 - 1) << 12;
const TLB_MASK_AT: i32 = 8;
/// pdep mask of a jump-cache set number times 32 (the set size: two 16-byte entries), at
/// `[rsp + JC_MASK_AT]`.
const JC_MASK: u32 = (JC_SETS as u32 - 1) << 5;
const JC_MASK_AT: i32 = 16;
/// pext mask of bit 63, at `[rsp + TOP_MASK_AT]`: turns the soft-TLB check's `s - 1` (all ones
/// on a hit, below 2^52 on a miss) into 1 or 0 (see [`Emitter::tlb_check_to`]).
const TOP_MASK: u64 = 1 << 63;
const TOP_MASK_AT: i32 = 24;
const _: () = assert!(
    super::TLB_ENTRIES.is_power_of_two()
        && JC_SETS.is_power_of_two()
        && JC_WAYS == 2
        && std::mem::size_of::<super::JcEntry>() == 16
        && JC_MASK < 1 << 31
);

/// The code the run loop calls every translated block through (installed once at the start
/// of the code cache, `CodeCache::install_trampoline`): `extern "sysv64" fn(regs, ctx,
/// block)`. It saves the callee-saved registers, sets up the registers blocks rely on
/// (`rbx` = guest registers, `r15` = context, `r14` = its soft TLB, `r13` = 12, `r12` =
/// instructions left in the budget minus one, counting down), loads the guest's arithmetic
/// flags into the host flags (`sahf`, and OF through a signed overflow of 0x7f + OF) and
/// calls the block. Blocks and chains of blocks leave with `ret` (the one return address on
/// the stack), rax = guest RIP and an exit code in ecx (see [`EXIT_GO`]); the trampoline
/// saves the flags first (`pushfq`), then fills the context (RIP, flags, instructions run,
/// exit kind, miss address, link site or dead entry) and restores the registers. So a block
/// has no prologue or epilogue of its own and a chain never repeats them.
/// Guest RFLAGS in rax into the host's arithmetic flags (clobbers rcx and ah): OF through a
/// signed overflow (0x7f + OF), then SF, ZF, AF, PF and CF from AH.
fn flags_from_rax(a: &mut Asm) {
    a.bytes(&[
        0x89, 0xc1, // mov ecx, eax
        0xc1, 0xe9, 0x0b, // shr ecx, 11
        0x83, 0xe1, 0x01, // and ecx, 1
        0x80, 0xc1, 0x7f, // add cl, 0x7f
        0x88, 0xc4, // mov ah, al
        0x9e, // sahf
    ]);
}

pub fn trampoline() -> Vec<u8> {
    let mut a = Asm::default();
    // push rbx, rbp, r12, r13, r14, r15
    a.bytes(&[0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57]);
    a.mov(RBX, RDI);
    a.mov(R15, RSI);
    a.load(R14, ctx(C_TLB)); // the soft-TLB half of the current CPL
    a.bytes(&[0x41, 0xbd, 12, 0, 0, 0]); // mov r13d, 12
    // r12 = -nbudget - 1 = !nbudget.
    a.load(R12, ctx(C_NBUDGET));
    a.not(R12);
    a.load(RAX, ctx(C_FLAGS));
    flags_from_rax(&mut a);
    // The masks blocks use with pdep/pext, at [rsp + TOP_MASK_AT], [rsp + JC_MASK_AT] and
    // [rsp + TLB_MASK_AT] (above the return address): push r64 / push imm32.
    a.mov_imm(RCX, TOP_MASK);
    a.bytes(&[0x51]); // push rcx
    for m in [JC_MASK, TLB_MASK] {
        a.bytes(&[0x68]);
        a.bytes(&m.to_le_bytes());
    }
    a.bytes(&[
        0xff, 0xd2, // call rdx
        0x9c, 0x5f, // pushfq; pop rdi
    ]);
    a.lea(RSP, at(RSP, 24));
    a.store(ctx(C_FLAGS), RDI);
    a.store(ctx(C_RIP), RAX);
    a.bytes(&[
        0x41, 0x89, 0xc8, // mov r8d, ecx
        0x41, 0xc1, 0xe8, 0x08, // shr r8d, 8
        0x4d, 0x29, 0xc4, // sub r12, r8
    ]);
    // count = (budget - 1) - r12
    a.load(RDI, ctx(C_NBUDGET));
    a.not(RDI);
    a.bytes(&[0x4c, 0x29, 0xe7]); // sub rdi, r12
    a.store(ctx(C_COUNT), RDI);
    let (link, dead, done) = (a.label(), a.label(), a.label());
    a.bytes(&[0x0f, 0xb6, 0xc9]); // movzx ecx, cl
    a.bytes(&[0x83, 0xf9, EXIT_LINK as u8]); // cmp ecx, EXIT_LINK
    a.jcc(4, link);
    a.bytes(&[0x83, 0xf9, EXIT_DEAD as u8]); // cmp ecx, EXIT_DEAD
    a.jcc(4, dead);
    a.bytes(&[0x85, 0xc9]); // test ecx, ecx (EXIT_GO)
    a.jcc(4, done);
    a.store_imm(ctx(C_EXIT), 1);
    a.lea(RCX, at(RCX, -(EXIT_INTERP as i32)));
    a.store(ctx(C_MISS_KIND), RCX);
    a.store(ctx(C_MISS_LIN), RSI);
    a.jmp(done);
    a.bind(link);
    a.store(ctx(C_LINK), RDX);
    a.jmp(done);
    a.bind(dead);
    a.store(ctx(C_DEAD), RDX);
    a.bind(done);
    // pop r15, r14, r13, r12, rbp, rbx; ret
    a.bytes(&[
        0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b, 0xc3,
    ]);
    let bound = a.finish();
    debug_assert!(bound);
    a.buf
}

/// `ANYVISOR_EMU_JIT_PERFMAP=1` (read once; off by default, as nothing may write host files
/// the user did not ask for): every translated block is appended to `/tmp/perf-<pid>.map`,
/// the file `perf report` reads to name samples in JIT code, as "start size guest-<rip>".
pub fn perf_map_enabled() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("ANYVISOR_EMU_JIT_PERFMAP").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// `ANYVISOR_EMU_JIT_DUMP=all|<hex guest RIP>[,...]` (read once; off by default): log at info
/// level the host bytes emitted for every block, or for the blocks starting at the given
/// RIPs, as hex (e.g. for `objdump -D -b binary -mi386:x86-64` after `xxd -r -p`).
fn dump_wanted(rip: u64) -> bool {
    static D: std::sync::OnceLock<Option<Vec<u64>>> = std::sync::OnceLock::new();
    let d = D.get_or_init(|| {
        let v = std::env::var("ANYVISOR_EMU_JIT_DUMP").ok()?;
        if v.is_empty() {
            return None;
        }
        if v == "all" {
            return Some(Vec::new());
        }
        Some(
            v.split(',')
                .filter_map(|x| u64::from_str_radix(x.trim().trim_start_matches("0x"), 16).ok())
                .collect(),
        )
    });
    d.as_ref().is_some_and(|v| v.is_empty() || v.contains(&rip))
}

/// One perf map line (perf's format: hex start, hex size, symbol name).
pub fn perf_map_line(start: u64, size: usize, name: &str) -> String {
    format!("{start:x} {size:x} {name}\n")
}

/// The symbol name of a translated block in the perf map.
pub fn perf_map_name(rip: u64) -> String {
    format!("guest-{rip:x}")
}

/// Appends a block at host address `start` to the perf map, if enabled (a failure to write
/// is logged once and turns the map off).
pub fn perf_map_note(start: u64, size: usize, name: &str) {
    use std::io::Write;
    static MAP: std::sync::Mutex<Option<Option<std::fs::File>>> = std::sync::Mutex::new(None);
    if !perf_map_enabled() {
        return;
    }
    let Ok(mut m) = MAP.lock() else { return };
    let file = m.get_or_insert_with(|| {
        let path = format!("/tmp/perf-{}.map", std::process::id());
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("ANYVISOR_EMU_JIT_PERFMAP: cannot open {path}: {e}");
                None
            }
        }
    });
    if let Some(f) = file
        && let Err(e) = f.write_all(perf_map_line(start, size, name).as_bytes())
    {
        tracing::warn!("ANYVISOR_EMU_JIT_PERFMAP: {e}");
        *file = None;
    }
}

/// What a block checks at its chained entry that its code is still current: the host address
/// of its guest page's write generation ([`crate::vm::CodeTracker`]) and the value it was
/// translated under; for a block whose last instruction goes on into the next page, the same
/// for that page (`next`), so a write to either page kills the block.
#[derive(Clone, Copy)]
pub struct Guard {
    pub gen_addr: u64,
    pub generation: u32,
    pub next: Option<(u64, u32)>,
}

/// A block's host code.
pub struct Emitted {
    pub bytes: Vec<u8>,
    /// Offset of the chained entry (the head checks), which the jump cache goes to.
    pub chk: u32,
    /// Offset of the body, where the run loop enters (through the trampoline).
    pub entry: u32,
    /// Bytes between the end of the page-generation checks and the body (the budget and
    /// exit-request checks, encoded alike in every block): jumps linked from a block of the
    /// same page enter at `entry - unchecked` (see [`Emitter::head_checks`]).
    pub unchecked: u32,
}

/// Where an exit stub goes back to the run loop.
/// [`SoftTlb`](super::SoftTlb) field at byte offset `field` of the slot in rdx (the current
/// half's `read` array is at r14).
fn tlb_field(field: i32) -> Mem {
    Mem {
        base: Some(R14),
        index: Some((RDX, 8)),
        disp: field,
    }
}

/// A memory operand's address expression (64-bit addressing; RIP-relative operands carry
/// their absolute address as displacement).
#[derive(Clone, Copy, PartialEq, Eq)]
struct MemKey {
    base: Register,
    index: Register,
    scale: u32,
    disp: u64,
    seg: Register,
}

impl MemKey {
    fn of(i: &Instruction) -> MemKey {
        MemKey {
            base: i.memory_base(),
            index: i.memory_index(),
            scale: i.memory_index_scale(),
            disp: i.memory_displacement64(),
            seg: i.memory_segment(),
        }
    }
}

/// After generic instruction `k` on the register cache: its soft-TLB check covered `size`
/// bytes (`write`: a write check) at its operand `key`, and rsi + rdi is the host address, for
/// instruction `k + 1` with the same operand (add_n's `adc rax, [rbx + rcx*8]` then
/// `mov [rbx + rcx*8], rax`: one check instead of two). Nothing is emitted between the two
/// but the next instruction's register-cache loads and evictions, which leave rsi and rdi
/// alone.
#[derive(Clone, Copy)]
struct Covered {
    k: u32,
    key: MemKey,
    size: usize,
    write: bool,
}

/// A store's soft-TLB check whose unlogged tag missed: the out-of-line test of its logged
/// tag (see [`Emitter::tlb`]).
struct LoggedWrite {
    slow: Label,
    /// Where the store goes on (its hit path).
    back: Label,
    /// The store's exit stub.
    stub: Label,
    size: usize,
}

/// A stack run ([`stack_run`]) whose one soft-TLB check missed goes on here: the same
/// pushes or pops, each with its own check and exit stub, from the register cache as it was
/// at the check (the same cache operations in the same order, so both versions end with the
/// same cache), then back after the run.
struct SlowRun {
    label: Label,
    back: Label,
    k: u32,
    pop: bool,
    run: Vec<Instruction>,
    cache: RegCache,
    rax_live: bool,
    /// The cache after the fast version, which the slow one must end with.
    end: RegCache,
}

struct Stub {
    label: Label,
    /// Guest instructions completed before the exit.
    done: u32,
    ip: u64,
    /// 0: interpret the instruction at `ip`; 1/2: the same after a read/write TLB miss; -1:
    /// go on at `ip` (a carried loop's back edge, budget spent or exit requested).
    miss: i32,
    /// The register cache's dirty registers where the stub is jumped to (written back first).
    spill: Spill,
}

/// Host registers of the block's register cache (see [`RegCache`]): `rax` holds guest rax
/// only (so the short `rax`/`al` forms keep their encoding), the others any guest register.
const CACHE_HOSTS: [u8; 6] = [RAX, RBP, R8, R8 + 1, R8 + 2, R8 + 3];
const NO_GUEST: u8 = 0xff;

/// Per cache slot, the guest register it holds dirty ([`NO_GUEST`] if none): what an exit
/// must write back to the register file.
type Spill = [u8; 6];

/// One host register of the cache.
#[derive(Clone, Copy)]
struct Slot {
    /// The guest register it holds, or [`NO_GUEST`].
    guest: u8,
    /// Newer than the register file.
    dirty: bool,
    /// Last use (for least-recently-used replacement).
    used: u32,
}

/// The register cache of the block being emitted: guest GPRs kept in host registers from
/// their first use by a generic instruction to the next instruction that needs the register
/// file in memory (every other kind: `flush`), written back at block exits (`writeback`)
/// and, through each exit stub's [`Spill`], on every way out before an instruction (soft-TLB
/// miss, alignment, ...), so the state the run loop sees is exact.
#[derive(Clone, Copy)]
struct RegCache {
    slots: [Slot; 6],
    tick: u32,
    /// Guest registers allocated since the block start (bit per register).
    used: u16,
    /// A register was pushed out to make room (the block does not fit the cache).
    evicted: bool,
}

/// A register-file access the cache needs emitted.
#[derive(Clone, Copy)]
enum CacheAct {
    /// `mov [rbx + 8*guest], host`
    Store(u8, u8),
    /// `mov host, [rbx + 8*guest]`
    Load(u8, u8),
}

impl RegCache {
    const EMPTY: RegCache = RegCache {
        slots: [Slot {
            guest: NO_GUEST,
            dirty: false,
            used: 0,
        }; 6],
        tick: 0,
        used: 0,
        evicted: false,
    };

    fn find(&self, g: usize) -> Option<usize> {
        self.slots.iter().position(|s| usize::from(s.guest) == g)
    }

    /// The host register of guest `g` (cached or not).
    fn host(&self, g: usize) -> Option<u8> {
        self.find(g).and_then(|s| CACHE_HOSTS.get(s).copied())
    }

    fn spill(&self) -> Spill {
        let mut sp = [NO_GUEST; 6];
        for (o, s) in sp.iter_mut().zip(self.slots.iter()) {
            if s.dirty {
                *o = s.guest;
            }
        }
        sp
    }

    /// Puts guest `g` in a host register not in `pinned` (a slot mask), loading it when
    /// `load`; pins that slot. `None` if every usable slot is pinned.
    fn alloc(
        &mut self,
        g: usize,
        load: bool,
        pinned: &mut u8,
        acts: &mut Vec<CacheAct>,
    ) -> Option<u8> {
        self.tick += 1;
        let slot = match self.find(g) {
            Some(s) => s,
            None => {
                let s = if g == 0 {
                    0
                } else {
                    (1..self.slots.len())
                        .filter(|&s| *pinned & (1 << s) == 0)
                        .min_by_key(|&s| {
                            self.slots
                                .get(s)
                                .map_or((true, 0), |x| (x.guest != NO_GUEST, x.used))
                        })?
                };
                let h = CACHE_HOSTS.get(s).copied()?;
                let old = self.slots.get_mut(s)?;
                self.evicted |= old.guest != NO_GUEST;
                self.used |= 1 << g;
                if old.dirty {
                    acts.push(CacheAct::Store(old.guest, h));
                }
                *old = Slot {
                    guest: g as u8,
                    dirty: false,
                    used: 0,
                };
                if load {
                    acts.push(CacheAct::Load(h, g as u8));
                }
                s
            }
        };
        *pinned |= 1 << slot;
        let tick = self.tick;
        let s = self.slots.get_mut(slot)?;
        s.used = tick;
        CACHE_HOSTS.get(slot).copied()
    }
}

/// The 64/32/16/8-bit name of a cache host register.
fn cache_reg(h: u8, size: usize) -> Option<Register> {
    const RBP_NAMES: [Register; 4] = [Register::RBP, Register::EBP, Register::BP, Register::BPL];
    let row = match h {
        RAX => HOST.first()?,
        RBP => &RBP_NAMES,
        // r8-r11 are rows 4-7 of the operand registers' table.
        8..=11 => HOST.get(usize::from(h) - 4)?,
        _ => return None,
    };
    sized(row, size)
}

/// Per-translation scratch: the glue emitter, exit stubs, the encoder for guest instructions.
pub struct Emitter {
    a: Asm,
    /// Where the block's back edges to its own start go (after the chained entry's
    /// page-generation check, see [`Emitter::head_checks`]).
    loop_head: Option<Label>,
    /// Loop-carried registers (see [`Emitter::block`]): where the block's back edges go
    /// with the cache kept, after the preloads at the body.
    loop_inner: Option<Label>,
    /// Something flushed the cache, or a back edge to the block start was emitted (for the
    /// loop-carried form's eligibility).
    flushed: bool,
    self_loop: bool,
    /// Host rax holds guest rax (as the last generic instruction left it; nothing since
    /// clobbered it), so the next one need not load it.
    rax_live: bool,
    /// Guest registers held in host registers (see [`RegCache`]).
    cache: RegCache,
    stubs: Vec<Stub>,
    logged: Vec<LoggedWrite>,
    /// The per-instruction versions of the block's stack runs, emitted after the body.
    slow_runs: Vec<SlowRun>,
    /// The block's instruction after the one being emitted, if it is a generic one.
    next: Option<Instruction>,
    /// See [`Covered`].
    covered: Option<Covered>,
    /// The kind of the block's instruction after the one being emitted, if any.
    following: Option<Kind>,
    /// The instruction after which [`Emitter::sti_window`] goes (the one in a `sti`'s
    /// shadow).
    window: Option<u32>,
    info: InstructionInfoFactory,
    enc: Encoder,
}

/// Why a block could not be emitted (an encoder error; never expected for checked forms).
#[derive(Debug)]
pub struct EmitError(pub String);

impl Drop for Emitter {
    fn drop(&mut self) {
        if profiling() {
            tracing::debug!("{}", untranslated_report());
        }
    }
}

impl From<IcedError> for EmitError {
    fn from(e: IcedError) -> Self {
        EmitError(e.to_string())
    }
}

impl std::fmt::Display for EmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type E<T> = Result<T, EmitError>;

/// A guest register's slot in the register file (`rbx`).
fn greg(g: usize) -> Mem {
    at(RBX, 8 * g as i32)
}

fn ctx(off: i32) -> Mem {
    at(R15, off)
}

fn host_num(h: usize) -> u8 {
    [RAX, RCX, RDX, RDI, R8, R8 + 1, R8 + 2, R8 + 3]
        .get(h)
        .copied()
        .unwrap_or(RAX)
}

/// The x86 condition number of a condition code.
fn cc_num(cc: iced_x86::ConditionCode) -> Option<u8> {
    use iced_x86::ConditionCode as C;
    Some(match cc {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        C::None => return None,
    })
}

/// A guest instruction rewritten onto host registers and `[rsi]`.
struct Rewrite {
    out: Instruction,
    /// Host register index (into `HOST`) per guest register, `usize::MAX` if unused.
    host_of: [usize; 16],
    written: [bool; 16],
    /// Some(written) when the instruction accesses memory.
    mem: Option<bool>,
    /// Per guest register: only written, whole (32 or 64 bits, so the old value does not
    /// survive): the host register need not be loaded first.
    write_only: [bool; 16],
}

fn rewrite(info: &mut InstructionInfoFactory, i: &Instruction) -> Option<Rewrite> {
    let access = info.info(i);
    let is_write = |a: OpAccess| {
        matches!(
            a,
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        )
    };
    let mut r = Rewrite {
        out: *i,
        host_of: [usize::MAX; 16],
        written: [false; 16],
        mem: None,
        write_only: [true; 16],
    };
    // Guest rax, rcx, rdx stay in host rax, rcx, rdx (`cl` counts, implicit operands, high
    // bytes); the others take the next free host register. With a high-byte register
    // (encodable only without REX) every register goes to one of rax, rcx, rdx.
    let regs = || (0..i.op_count()).filter(|&n| i.op_kind(n) == OpKind::Register);
    let high = regs().any(|n| is_high_byte(i.op_register(n)));
    let imp = implicit(i.mnemonic(), i.op_count());
    let fixed_used =
        |h: usize| imp.contains(&h) || regs().any(|n| gpr_num(i.op_register(n)) == Some(h));
    let pool: Vec<usize> = if high {
        (0..3).filter(|&h| !fixed_used(h)).collect()
    } else {
        vec![3, 4, 5, 6, 7]
    };
    let mut next = 0usize;
    for &g in imp {
        *r.host_of.get_mut(g)? = g;
        *r.written.get_mut(g)? = true;
        *r.write_only.get_mut(g)? = false;
    }
    // bsf/bsr leave the destination as it was for a zero source (on the host too).
    let keeps = matches!(i.mnemonic(), M::Bsf | M::Bsr);
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let reg = i.op_register(n);
                let g = gpr_num(reg)?;
                let slot = r.host_of.get_mut(g)?;
                if *slot == usize::MAX {
                    *slot = if g <= 2 {
                        g
                    } else {
                        let h = *pool.get(next)?;
                        next += 1;
                        h
                    };
                }
                let h = if is_high_byte(reg) {
                    [Register::AH, Register::CH, Register::DH]
                        .get(*slot)
                        .copied()?
                } else {
                    host_sized(*slot, reg.size())?
                };
                if is_write(access.op_access(n)) {
                    *r.written.get_mut(g)? = true;
                }
                if access.op_access(n) != OpAccess::Write
                    || reg.size() < 4
                    || is_high_byte(reg)
                    || keeps
                {
                    *r.write_only.get_mut(g)? = false;
                }
                r.out.set_op_register(n, h);
            }
            OpKind::Memory => {
                r.mem = Some(is_write(access.op_access(n)));
                r.out.set_memory_base(Register::RSI);
                r.out.set_memory_index(Register::None);
                r.out.set_memory_index_scale(1);
                r.out.set_memory_displacement64(0);
                r.out.set_memory_displ_size(0);
                r.out.set_segment_prefix(Register::None);
            }
            _ => {}
        }
    }
    Some(r)
}

impl Emitter {
    pub fn new() -> Result<Emitter, IcedError> {
        Ok(Emitter {
            a: Asm::default(),
            loop_head: None,
            loop_inner: None,
            flushed: false,
            self_loop: false,
            rax_live: false,
            cache: RegCache::EMPTY,
            stubs: Vec::new(),
            logged: Vec::new(),
            slow_runs: Vec::new(),
            next: None,
            covered: None,
            following: None,
            window: None,
            info: InstructionInfoFactory::new(),
            enc: Encoder::new(64),
        })
    }

    /// Host code for the block `insns` (each with its [`Kind`]) starting at guest `rip`.
    /// The last instruction either ends the block (a branch) or the block falls through to the
    /// instruction after it. The code is position independent.
    ///
    /// Layout: the chained entry `chk` (offset 0) is where other blocks' linked jumps and the
    /// block's own back edges arrive: it leaves (with the state exactly at the block start)
    /// when the run's instruction budget is spent, when the vCPU's exit-request word is set,
    /// or when the guest page was written since translation (then it also reports itself
    /// dead, so the run loop unlinks the jumps into it), and falls through into the body,
    /// where the run loop enters through the shared trampoline ([`trampoline`]; it just
    /// looked the block up). Exit stubs follow the body; every way out is a `ret` to the
    /// trampoline with an exit code in ecx (see [`EXIT_GO`]).
    ///
    /// A block that loops to its own start, uses at most the cache's registers and nothing
    /// that empties the cache is emitted a second time with its registers **carried around
    /// the loop**: loaded once at the body (and counted dirty from there on, so every exit
    /// writes them back), and the back edge checks the budget and the exit-request word
    /// itself (leaving through a stub that writes them back) and jumps past the loads.
    pub fn block(&mut self, rip: u64, insns: &[(Instruction, Kind)], guard: Guard) -> E<Emitted> {
        let first = self.block_with(rip, insns, guard, None)?;
        let carried = self.cache.used;
        let e = if self.self_loop
            && !self.flushed
            && !self.cache.evicted
            && (carried & !1).count_ones() < CACHE_HOSTS.len() as u32
        {
            self.block_with(rip, insns, guard, Some(carried))?
        } else {
            first
        };
        if dump_wanted(rip) {
            let hex: String = e.bytes.iter().map(|b| format!("{b:02x}")).collect();
            tracing::info!(
                "ANYVISOR_EMU_JIT_DUMP: block {rip:#x} ({} guest instructions, {} bytes, chained \
                 entry +{:#x}, body +{:#x}): {hex}",
                insns.len(),
                e.bytes.len(),
                e.chk,
                e.entry
            );
        }
        Ok(e)
    }

    fn block_with(
        &mut self,
        rip: u64,
        insns: &[(Instruction, Kind)],
        guard: Guard,
        carry: Option<u16>,
    ) -> E<Emitted> {
        self.a.reset();
        self.stubs.clear();
        self.logged.clear();
        self.slow_runs.clear();
        self.covered = None;
        self.window = None;
        self.loop_head = None;
        self.loop_inner = None;
        self.flushed = false;
        self.self_loop = false;
        let chk = self.a.label();
        let body = self.a.label();
        self.head_checks(rip, chk, guard)?;
        self.a.bind(body);
        let mut ended = false;
        self.rax_live = false;
        self.cache = RegCache::EMPTY;
        if let Some(mask) = carry {
            let regs: Vec<(usize, bool)> = (0..16)
                .filter(|g| mask & (1 << g) != 0)
                .map(|g| (g, true))
                .collect();
            if !regs.is_empty() {
                self.cached_regs(&regs)?;
            }
            for s in self.cache.slots.iter_mut() {
                s.dirty = s.guest != NO_GUEST;
            }
            let inner = self.a.label();
            self.a.bind(inner);
            self.loop_inner = Some(inner);
        }
        // Instructions after `k` that a stack run (see [`stack_run`]) already emitted.
        let mut skip = 0usize;
        for (k, (i, kind)) in insns.iter().enumerate() {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            self.next = insns
                .get(k + 1)
                .and_then(|(n, nk)| (*nk == Kind::Generic).then_some(*n));
            self.following = insns.get(k + 1).map(|(_, nk)| *nk);
            let k = k as u32;
            // Every kind but these reads or writes the register file in memory (or pins
            // guest registers to host ones): the cache is written back and emptied first.
            let cached = match kind {
                Kind::Generic | Kind::Nop | Kind::Jcc | Kind::JmpRel => true,
                Kind::Push | Kind::CallRel | Kind::Ret => true,
                Kind::Pop => i.op0_register() != Register::RSP,
                _ => false,
            };
            if !cached {
                self.flush();
            }
            if *kind != Kind::Generic {
                self.rax_live = false;
            }
            match kind {
                Kind::Nop => {}
                Kind::Generic => {
                    if !self.generic_cached(k, i)? {
                        self.flush();
                        self.generic(k, i)?;
                    }
                }
                Kind::Simd => self.simd(k, i)?,
                Kind::Pushf => self.pushf(k, i.ip())?,
                Kind::Str => self.string(k, i)?,
                Kind::SegRead
                | Kind::Cli
                | Kind::Sti
                | Kind::Cld
                | Kind::Std
                | Kind::Popf
                | Kind::Iret
                | Kind::Swapgs
                | Kind::FsGsBase
                | Kind::PushMem
                | Kind::Cmpxchg16b => ended = self.sys(k, i, *kind)?,
                Kind::Rdtsc | Kind::Rdtscp | Kind::Rdpid => self.time(k, i, *kind)?,
                Kind::Leave => {
                    self.a.load(RSI, greg(5));
                    self.a.mov(RBP, RSI);
                    self.tlb(k, i.ip(), 8, false);
                    self.a.load(RAX, at(RSI, 0));
                    self.a.lea(RBP, at(RBP, 8));
                    self.a.store(greg(4), RBP);
                    self.a.store(greg(5), RAX);
                }
                Kind::CallMem => {
                    self.address(i);
                    self.tlb(k, i.ip(), 8, false);
                    self.a.load(R8, at(RSI, 0));
                    self.check_canonical(R8, k, i.ip());
                    self.push(k, i.ip(), Src::Imm(i.next_ip()));
                    self.a.mov(RAX, R8);
                    self.exit_dynamic(k + 1);
                    ended = true;
                }
                Kind::Push if stack_run(insns.get(k as usize..).unwrap_or(&[]), false) > 1 => {
                    let run = insns.get(k as usize..).unwrap_or(&[]);
                    let run = run.get(..stack_run(run, false)).unwrap_or(&[]);
                    self.stack_run_fast(k, run, false)?;
                    skip = run.len() - 1;
                }
                Kind::Pop if stack_run(insns.get(k as usize..).unwrap_or(&[]), true) > 1 => {
                    let run = insns.get(k as usize..).unwrap_or(&[]);
                    let run = run.get(..stack_run(run, true)).unwrap_or(&[]);
                    self.stack_run_fast(k, run, true)?;
                    skip = run.len() - 1;
                }
                Kind::Push => {
                    let v = match i.code() {
                        Code::Push_r64 => Src::Reg(gpr_of(i.op0_register()).unwrap_or(0)),
                        _ => Src::Imm(i.immediate(0)),
                    };
                    self.push_cached(k, i.ip(), v)?;
                }
                Kind::Pop if i.op0_register() != Register::RSP => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.pop_cached(k, i.ip(), g)?;
                }
                Kind::Pop => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.pop_to(k, i.ip());
                    self.a.lea(RBP, at(RBP, 8));
                    self.a.store(greg(4), RBP);
                    self.a.store(greg(g), RAX);
                }
                Kind::CallRel => {
                    self.push_cached(k, i.ip(), Src::Imm(i.next_ip()))?;
                    self.exit_static(rip, i.near_branch64(), k + 1, chk);
                    ended = true;
                }
                Kind::CallReg => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.a.load(R8, greg(g));
                    self.check_canonical(R8, k, i.ip());
                    self.push(k, i.ip(), Src::Imm(i.next_ip()));
                    self.a.mov(RAX, R8);
                    self.exit_dynamic(k + 1);
                    ended = true;
                }
                Kind::Ret => {
                    let extra = if i.code() == Code::Retnq_imm16 {
                        i32::from(i.immediate16())
                    } else {
                        0
                    };
                    let hsp = self.cached_regs(&[(4, true)])?;
                    self.a.mov(RSI, hsp);
                    self.tlb(k, i.ip(), 8, false);
                    self.a.load(RDI, at(RSI, 0));
                    self.check_canonical(RDI, k, i.ip());
                    self.a.lea(hsp, at(hsp, 8 + extra));
                    self.set_dirty(4);
                    self.writeback();
                    self.a.mov(RAX, RDI);
                    self.exit_dynamic(k + 1);
                    ended = true;
                }
                Kind::JmpRel => {
                    self.exit_static(rip, i.near_branch64(), k + 1, chk);
                    ended = true;
                }
                Kind::JmpReg => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.a.load(RAX, greg(g));
                    self.check_canonical(RAX, k, i.ip());
                    self.exit_dynamic(k + 1);
                    ended = true;
                }
                Kind::JmpMem => {
                    self.address(i);
                    self.tlb(k, i.ip(), 8, false);
                    self.a.load(RAX, at(RSI, 0));
                    self.check_canonical(RAX, k, i.ip());
                    self.exit_dynamic(k + 1);
                    ended = true;
                }
                Kind::Jcc => {
                    let taken = self.a.label();
                    let cc = cc_num(i.condition_code())
                        .ok_or_else(|| EmitError("jcc without a condition".into()))?;
                    self.a.jcc(cc, taken);
                    // Each way out writes back what is dirty at the branch.
                    let at_branch = self.cache;
                    self.exit_static(rip, i.next_ip(), k + 1, chk);
                    self.cache = at_branch;
                    self.a.bind(taken);
                    self.exit_static(rip, i.near_branch64(), k + 1, chk);
                    ended = true;
                }
            }
            if self.window == Some(k) {
                self.sti_window(k, i)?;
            }
            if ended {
                break;
            }
        }
        if !ended {
            let next = insns.last().map_or(rip, |(i, _)| i.next_ip());
            self.exit_static(rip, next, insns.len() as u32, chk);
        }
        let slow_runs = std::mem::take(&mut self.slow_runs);
        for r in &slow_runs {
            self.a.bind(r.label);
            self.cache = r.cache;
            self.rax_live = r.rax_live;
            self.stack_run_code(r.k, &r.run, r.pop, None)?;
            let same = |c: &RegCache| c.slots.map(|s| (s.guest, s.dirty));
            if same(&self.cache) != same(&r.end) {
                return Err(EmitError("stack run versions disagree".into()));
            }
            self.a.jmp(r.back);
        }
        self.slow_runs = slow_runs;
        self.logged_writes();
        // Exit stubs: state is exactly as before instruction `done`.
        let stubs = std::mem::take(&mut self.stubs);
        for s in &stubs {
            self.a.bind(s.label);
            for (&g, &h) in s.spill.iter().zip(CACHE_HOSTS.iter()) {
                if g != NO_GUEST {
                    self.a.store(greg(usize::from(g)), h);
                }
            }
            let code = match u32::try_from(s.miss) {
                Ok(m) => EXIT_INTERP + m,
                Err(_) => EXIT_GO,
            };
            self.leave(s.ip, code, s.done);
        }
        self.stubs = stubs;
        let a = &mut self.a;
        if !a.finish() {
            return Err(EmitError("unbound label".into()));
        }
        let pos = |l| {
            a.pos(l)
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| EmitError("unbound label".into()))
        };
        let (chk, entry) = (pos(chk)?, pos(body)?);
        let looped = self.loop_head.map(pos).transpose()?.unwrap_or(chk);
        Ok(Emitted {
            chk,
            entry,
            unchecked: entry.saturating_sub(looped),
            bytes: a.buf.clone(),
        })
    }

    /// Returns to the trampoline: guest RIP `rip`, exit code `code`, `done` more guest
    /// instructions completed (flag-neutral, like all glue: the trampoline saves the flags).
    fn leave(&mut self, rip: u64, code: u32, done: u32) {
        self.a.mov_imm(RAX, rip);
        self.a.mov_imm(RCX, u64::from(done << 8 | code));
        self.a.ret();
    }

    /// The chained entry (see [`Emitter::block`]) at `chk`, preceded by its two ways out
    /// (budget spent or exit requested; page written); flag-neutral like all glue.
    ///
    /// The block's back edges to its own start enter after the page-generation check
    /// ([`Emitter::loop_head`]), and so do jumps linked from other blocks of the same guest
    /// page (the run loop's `Jit::link`, [`Emitted::unchecked`] bytes before the body; not into a
    /// block whose last instruction crosses into the next page, which keeps that page's
    /// check): every entry into the page from outside (the run loop, the jump cache, another
    /// page's block) checks the generation, and a link is only made after a lookup found
    /// the target current, so a chain that entered the page at a current block only meets
    /// blocks translated under that same generation. This vCPU's translated code cannot have written the page
    /// (a page with translations has no soft-TLB write entries: they are all dropped at the
    /// run's entry when a page becomes code), and a write by another vCPU or a device is seen
    /// when the loop leaves, at the latest when the budget is spent (MAX_RUN instructions),
    /// as the SDM allows for cross-modifying code: the executing processor runs the new code
    /// only after a serializing instruction, and none is translated.
    fn head_checks(&mut self, rip: u64, chk: Label, guard: Guard) -> E<()> {
        let out = self.a.label();
        let dead = self.a.label();
        let looped = self.a.label();
        self.loop_head = Some(looped);
        // The two ways out come first, before the chained entry, so that every check below
        // branches back to them only when it fails: in code that runs once in a while (cold
        // in the branch predictor), a conditional branch is predicted not taken, and a taken
        // one costs a misprediction. (A check that branched over a `jmp` on success, as
        // `jmp_unless_rcx_zero` does, paid one per check and block entry.)
        self.a.bind(dead);
        self.a.lea_label(RDX, chk);
        self.leave(rip, EXIT_DEAD, 0);
        self.a.bind(out);
        self.leave(rip, EXIT_GO, 0);
        let a = &mut self.a;
        let far = || EmitError("head check out of reach".into());
        a.bind(chk);
        // The page's write generation (and the next page's, for a block whose last
        // instruction crosses into it): ecx = current - translated (0 when unchanged); then
        // rcx - 1 rotated by 32 has a zero low half exactly when that difference was not 0.
        for (addr, generation) in
            std::iter::once((guard.gen_addr, guard.generation)).chain(guard.next)
        {
            a.mov_imm(RCX, addr);
            a.load32(RCX, RCX);
            a.lea32(RCX, RCX, (generation as i32).wrapping_neg());
            a.lea(RCX, at(RCX, -1));
            a.rorx(RCX, RCX, 32);
            if !a.jrcxz_back(dead, true) {
                return Err(far());
            }
        }
        a.bind(looped);
        // Budget: r12 counts down (see [`trampoline`]) from below MAX_RUN and is negative
        // once spent (by less than a block, MAX_INSNS): r12 >> 12 (arithmetic) is 0 or -1,
        // plus 1 is 0 exactly when spent.
        a.sarx(RCX, R12, R13);
        a.lea(RCX, at(RCX, 1));
        if !a.jrcxz_back(out, false) {
            return Err(far());
        }
        // The exit-request word (interrupts, kicks and pauses from other threads): 0, or 1
        // when set (`VcpuShared::post`/`kick` store only 1); minus 1 is 0 exactly when set.
        a.load(RCX, ctx(C_REQ));
        a.load32(RCX, RCX);
        a.lea32(RCX, RCX, -1);
        if !a.jrcxz_back(out, false) {
            return Err(far());
        }
        Ok(())
    }

    /// An exit stub leaving before instruction `done` (at `ip`), which writes back the
    /// registers the cache holds dirty now: jump to it before the cache changes.
    fn stub(&mut self, done: u32, ip: u64, miss: i32) -> Label {
        let spill = self.cache.spill();
        if let Some(s) = self
            .stubs
            .iter()
            .find(|s| s.done == done && s.ip == ip && s.miss == miss && s.spill == spill)
        {
            return s.label;
        }
        let label = self.a.label();
        self.stubs.push(Stub {
            label,
            done,
            ip,
            miss,
            spill,
        });
        label
    }

    /// Stores the cache's dirty registers to the register file (flag-neutral); they stay
    /// cached, clean.
    fn writeback(&mut self) {
        for (s, &h) in self.cache.slots.iter_mut().zip(CACHE_HOSTS.iter()) {
            if s.dirty {
                self.a.store(greg(usize::from(s.guest)), h);
                s.dirty = false;
            }
        }
    }

    /// [`Emitter::writeback`], then forgets the cache (the next code may use its host
    /// registers as scratch). Host rax still holds guest rax if the cache had it there.
    fn flush(&mut self) {
        self.flushed = true;
        self.writeback();
        if self.cache.find(0).is_some() {
            self.rax_live = true;
        }
        self.cache = RegCache::EMPTY;
    }

    /// Goes on at guest `target` after `done` instructions. A branch to the block's own start
    /// loops through its chained entry's budget and exit-request checks (see
    /// [`Emitter::head_checks`]); a branch to another place of the block's guest page
    /// leaves through a jump the run loop may later link to the target's translation (a
    /// target in the same virtual page is in the same physical page, so the link stays right
    /// while this block's own translation is: QEMU's rule for direct chaining); other targets
    /// go through the jump cache.
    fn exit_static(&mut self, rip: u64, target: u64, done: u32, chk: Label) {
        if target == rip {
            self.self_loop = true;
            if let Some(inner) = self.loop_inner {
                // Registers carried around the loop: the head's budget and exit-request
                // checks here, leaving through a stub that writes them back.
                let out = self.stub(0, rip, -1);
                let a = &mut self.a;
                a.lea(R12, at(R12, -(done as i32)));
                a.shrx(RCX, R12, R13);
                a.jmp_unless_rcx_zero(out);
                a.load(RCX, ctx(C_REQ));
                a.load32(RCX, RCX);
                a.jmp_unless_rcx_zero(out);
                a.jmp(inner);
                return;
            }
        }
        self.writeback();
        let a = &mut self.a;
        a.lea(R12, at(R12, -(done as i32)));
        if target == rip {
            a.jmp(self.loop_head.unwrap_or(chk));
            return;
        }
        if target >> 12 == rip >> 12 {
            let stub = a.label();
            let site = a.label();
            a.jmp_site(stub, site);
            a.bind(stub);
            a.lea_label(RDX, site);
            self.leave(target, EXIT_LINK, 0);
        } else {
            a.mov_imm(RAX, target);
            self.jump_cache();
        }
    }

    /// Goes on at guest RIP = rax: straight to its translation if the jump cache has it in
    /// either way of its set, else back to the run loop (which fills the entry). Flag-neutral
    /// like all glue (`mov`, `lea`, `shrx`, `pdep`, `jrcxz`, `jmp`).
    fn jump_cache(&mut self) {
        let way1 = self.a.label();
        let miss = self.a.label();
        let a = &mut self.a;
        // rcx = (rip + (rip >> 12)) mod JC_SETS, see `jc_index`.
        a.shrx(RCX, RAX, R13);
        a.lea(RCX, sum(RCX, RAX));
        // rdi = the 32-byte set, in the half of the current privilege class.
        a.pdep_mem(RCX, RCX, at(RSP, JC_MASK_AT));
        a.load(RDI, ctx(C_JC));
        a.lea(RDI, sum(RDI, RCX));
        // Each way: rcx = its negated RIP + rax, zero on a hit; then its translation.
        for (way, next) in [(0, way1), (16, miss)] {
            if way != 0 {
                a.bind(way1);
            }
            a.load(RCX, at(RDI, way));
            a.lea(RCX, sum(RCX, RAX));
            a.jmp_unless_rcx_zero(next);
            a.jmp_mem(RDI, way + 8);
        }
        a.bind(miss);
        a.mov_imm(RCX, u64::from(EXIT_GO));
        a.ret();
    }

    /// Goes on at guest RIP = rax after `done` instructions (through the jump cache).
    fn exit_dynamic(&mut self, done: u32) {
        debug_assert!(self.cache.spill() == [NO_GUEST; 6]);
        self.a.lea(R12, at(R12, -(done as i32)));
        self.jump_cache();
    }

    /// Interprets instruction `k` instead when `r` is not canonical (the #GP is raised by the
    /// interpreter with the state before the instruction).
    fn check_canonical(&mut self, r: u8, k: u32, ip: u64) {
        let stub = self.stub(k, ip, 0);
        let a = &mut self.a;
        a.mov_imm(RDX, 47);
        a.sarx(RCX, r, RDX);
        a.lea(RCX, at(RCX, 1));
        a.mov_imm(RDX, 1);
        a.shrx(RCX, RCX, RDX);
        a.jmp_unless_rcx_zero(stub);
    }

    /// rsi = guest linear address of `i`'s memory operand (with the FS/GS base).
    fn address(&mut self, i: &Instruction) {
        self.effective(i);
        let seg = match i.memory_segment() {
            Register::FS => Some(C_FS),
            Register::GS => Some(C_GS),
            _ => None,
        };
        if let Some(off) = seg {
            self.a.load(RCX, ctx(off));
            self.a.lea(
                RSI,
                Mem {
                    base: Some(RSI),
                    index: Some((RCX, 1)),
                    disp: 0,
                },
            );
        }
    }

    /// rsi = effective address (offset) of `i`'s memory operand.
    fn effective(&mut self, i: &Instruction) {
        let a = &mut self.a;
        let b = i.memory_base();
        let x = gpr_of(i.memory_index());
        let disp = i.memory_displacement64();
        if b == Register::RIP || (b == Register::None && x.is_none()) {
            a.mov_imm(RSI, disp);
            return;
        }
        let disp = disp as i64 as i32;
        let scale = i.memory_index_scale();
        // Cached address registers are used where they are.
        let cache = &self.cache;
        let mut reg = |g: usize, scratch: u8| match cache.host(g) {
            Some(h) => h,
            None => {
                a.load(scratch, greg(g));
                scratch
            }
        };
        match (gpr_of(b), x) {
            (Some(b), Some(x)) => {
                let hb = reg(b, RSI);
                let hx = reg(x, RDI);
                a.lea(
                    RSI,
                    Mem {
                        base: Some(hb),
                        index: Some((hx, scale)),
                        disp,
                    },
                );
            }
            (Some(b), None) => {
                let hb = reg(b, RSI);
                if disp != 0 || hb != RSI {
                    a.lea(RSI, at(hb, disp));
                }
            }
            (None, Some(x)) => {
                let hx = reg(x, RDI);
                a.lea(
                    RSI,
                    Mem {
                        base: None,
                        index: Some((hx, scale)),
                        disp,
                    },
                );
            }
            (None, None) => a.mov_imm(RSI, disp as i64 as u64),
        }
    }

    /// Soft-TLB check of `size` bytes (1 to 4096) at guest linear rsi; on a hit rsi = host
    /// address, on a miss exit to interpret instruction `k`. Clobbers rcx, rdx, rdi; flags
    /// untouched. A store's inline check tests the unlogged write tag only; its miss goes to
    /// out-of-line code ([`Emitter::logged_writes`]) that tests the logged tag, appends the
    /// page to the store log and comes back, so a store to a page already dirty costs what a
    /// load does.
    fn tlb(&mut self, k: u32, ip: u64, size: usize, write: bool) {
        let stub = self.stub(k, ip, if write { 2 } else { 1 });
        self.tlb_to(stub, size, write);
    }

    /// [`Emitter::tlb`] leaving the host address as rsi + rdi (rsi still the guest linear
    /// address, rdi the slot's addend): an instruction re-encoded with `[rsi + rdi]` needs
    /// no `lea` of its own.
    fn tlb_check(&mut self, k: u32, ip: u64, size: usize, write: bool) {
        let stub = self.stub(k, ip, if write { 2 } else { 1 });
        self.tlb_check_to(stub, size, write);
    }

    /// [`Emitter::tlb`] whose miss goes to `miss` instead of an exit stub.
    fn tlb_to(&mut self, miss: Label, size: usize, write: bool) {
        self.tlb_check_to(miss, size, write);
        self.a.lea(
            RSI,
            Mem {
                base: Some(RSI),
                index: Some((RDI, 1)),
                disp: 0,
            },
        );
    }

    /// [`Emitter::tlb_check`] whose miss goes to `stub`.
    fn tlb_check_to(&mut self, stub: Label, size: usize, write: bool) {
        let a = &mut self.a;
        a.pext_mem(RDX, RSI, at(RSP, TLB_MASK_AT)); // the slot of the first byte's page
        a.load(RDI, tlb_field(if write { super::TLB_WRITE } else { 0 })); // -page
        // Zero iff the last byte is in the slot's page.
        a.lea(
            RCX,
            Mem {
                base: Some(RSI),
                index: Some((RDI, 1)),
                disp: size as i32 - 1,
            },
        );
        a.shrx(RCX, RCX, R13);
        // rcx is 0 on a hit and below 2^52 on a miss. In code that runs rarely (cold in the
        // branch predictor) a conditional branch is predicted not taken (see `head_checks`),
        // so the check's branch is taken only on a miss: minus 1, bit 63 of rcx (pext) is 1
        // exactly on a hit, and `Asm::jrcxz_far` reaches the far target without a taken
        // branch on the way on. Inside a one-block loop (hot, its branches predicted) the
        // three extra instructions would only cost: there the hit branches over a `jmp`.
        let hot = self.loop_inner.is_some();
        if !hot {
            a.lea(RCX, at(RCX, -1));
            a.pext_mem(RCX, RCX, at(RSP, TOP_MASK_AT));
        }
        let jump = |a: &mut Asm, to: Label| {
            if hot {
                a.jmp_unless_rcx_zero(to);
            } else {
                a.jrcxz_far(to, RDI);
            }
        };
        if write {
            let slow = a.label();
            let back = a.label();
            jump(a, slow);
            a.bind(back);
            self.logged.push(LoggedWrite {
                slow,
                back,
                stub,
                size,
            });
        } else {
            jump(a, stub);
        }
        self.a.load(RDI, tlb_field(super::TLB_ADDEND));
    }

    /// The out-of-line halves of the block's store checks (see [`Emitter::tlb`]): with rdx the
    /// slot, a hit on the logged write tag appends the page to the store log and goes back
    /// to the store; a miss leaves through the store's exit stub.
    fn logged_writes(&mut self) {
        let logged = std::mem::take(&mut self.logged);
        let a = &mut self.a;
        for w in &logged {
            a.bind(w.slow);
            a.load(RDI, tlb_field(super::TLB_WLOG));
            a.lea(
                RCX,
                Mem {
                    base: Some(RSI),
                    index: Some((RDI, 1)),
                    disp: w.size as i32 - 1,
                },
            );
            a.shrx(RCX, RCX, R13);
            a.jmp_unless_rcx_zero(w.stub);
            a.load(RDI, tlb_field(super::TLB_PA));
            a.load(RCX, ctx(C_LOG_N));
            a.store(
                Mem {
                    base: Some(R15),
                    index: Some((RCX, 8)),
                    disp: C_LOG,
                },
                RDI,
            );
            a.lea(RCX, at(RCX, 1));
            a.store(ctx(C_LOG_N), RCX);
            a.jmp(w.back);
        }
    }

    /// Exits to interpret instruction `k` unless rsi is aligned to `size` (locked accesses:
    /// a split lock would be slow or trap on the host; the interpreter serializes them).
    fn check_aligned(&mut self, k: u32, ip: u64, size: usize) {
        if size <= 1 {
            return;
        }
        let stub = self.stub(k, ip, 0);
        let a = &mut self.a;
        a.mov_imm(RDX, u64::from(64 - size.trailing_zeros()));
        a.shlx(RCX, RSI, RDX);
        a.jmp_unless_rcx_zero(stub);
    }

    /// Host rax still holding guest rax (left by the uncached path) joins the cache.
    fn adopt_rax(&mut self) {
        if self.rax_live
            && self.cache.find(0).is_none()
            && let Some(s0) = self.cache.slots.get_mut(0)
        {
            *s0 = Slot {
                guest: 0,
                dirty: false,
                used: 0,
            };
        }
        self.rax_live = false;
    }

    /// Puts the guest registers `regs` (number, whether its value is needed) in the cache
    /// and returns the host register of the first (emitting the loads and evictions).
    fn cached_regs(&mut self, regs: &[(usize, bool)]) -> E<u8> {
        self.adopt_rax();
        let mut pinned = 0u8;
        let mut acts = Vec::new();
        let mut first = None;
        for &(g, load) in regs {
            let h = self
                .cache
                .alloc(g, load, &mut pinned, &mut acts)
                .ok_or_else(|| EmitError("register cache full".into()))?;
            first.get_or_insert(h);
        }
        self.emit_acts(&acts);
        first.ok_or_else(|| EmitError("no register".into()))
    }

    fn emit_acts(&mut self, acts: &[CacheAct]) {
        for act in acts {
            match *act {
                CacheAct::Store(g, h) => self.a.store(greg(usize::from(g)), h),
                CacheAct::Load(h, g) => self.a.load(h, greg(usize::from(g))),
            }
        }
    }

    fn set_dirty(&mut self, g: usize) {
        if let Some(slot) = self.cache.find(g).and_then(|x| self.cache.slots.get_mut(x)) {
            slot.dirty = true;
        }
    }

    /// `push` on the register cache (guest rsp and the source register cached; rsp updated
    /// after the store, so a TLB miss leaves before the instruction).
    fn push_cached(&mut self, k: u32, ip: u64, v: Src) -> E<()> {
        let hsp = match v {
            Src::Reg(g) => self.cached_regs(&[(4, true), (g, true)])?,
            _ => self.cached_regs(&[(4, true)])?,
        };
        let src = match v {
            Src::Reg(g) => self.cache.host(g),
            _ => None,
        };
        self.a.lea(RSI, at(hsp, -8));
        self.tlb(k, ip, 8, true);
        match (v, src) {
            (Src::Reg(_), Some(h)) => self.a.store(at(RSI, 0), h),
            (Src::Imm(x), _) => {
                self.a.mov_imm(RDX, x);
                self.a.store(at(RSI, 0), RDX);
            }
            _ => return Err(EmitError("push source".into())),
        }
        self.a.lea(hsp, at(hsp, -8));
        self.set_dirty(4);
        Ok(())
    }

    /// `pop` to guest register `g` (not rsp) on the register cache. `g` is taken into the
    /// cache before the TLB check without its value: if it was not cached dirty the exit
    /// stub does not write it, if it was it holds the value before the `pop`.
    fn pop_cached(&mut self, k: u32, ip: u64, g: usize) -> E<()> {
        let hsp = self.cached_regs(&[(4, true), (g, false)])?;
        let hg = self
            .cache
            .host(g)
            .ok_or_else(|| EmitError("pop destination".into()))?;
        self.a.mov(RSI, hsp);
        self.tlb(k, ip, 8, false);
        self.a.load(hg, at(RSI, 0));
        self.a.lea(hsp, at(hsp, 8));
        self.set_dirty(4);
        self.set_dirty(g);
        Ok(())
    }

    /// A run of pushes or pops ([`stack_run`]) starting at instruction `k`: one soft-TLB
    /// check (a write check for pushes) covers the run's whole range next to rsp, and rsp
    /// moves once after the last. Between the check and the accesses nothing can fault or
    /// leave: they hit, and the register cache's loads and evictions are plain
    /// register-file accesses. Where the range crosses a page end or any of it misses, the
    /// run goes on out of line ([`SlowRun`]): each instruction with its own check, so a miss
    /// or a fault happens at exactly the instruction whose access needs it.
    fn stack_run_fast(&mut self, k: u32, run: &[(Instruction, Kind)], pop: bool) -> E<()> {
        // rsp into the cache first (its loads and evictions run before the check, on both
        // ways): the slow version starts from the cache as it is at the check, and its own
        // request for rsp emits nothing. Starting it from the cache before this request
        // would redo an eviction whose host register already holds rsp.
        self.cached_regs(&[(4, true)])?;
        let slow = SlowRun {
            label: self.a.label(),
            back: self.a.label(),
            k,
            pop,
            run: run.iter().map(|(i, _)| *i).collect(),
            cache: self.cache,
            rax_live: self.rax_live,
            end: RegCache::EMPTY,
        };
        self.stack_run_code(k, &slow.run, pop, Some(slow.label))?;
        self.a.bind(slow.back);
        self.slow_runs.push(SlowRun {
            end: self.cache,
            ..slow
        });
        Ok(())
    }

    /// The code of a stack run: with `fast` (the label a miss of the run's check goes to),
    /// one check for the whole run; without, a check per instruction (rsp moved after each,
    /// as `push`/`pop` on the cache do). Both make the same register-cache requests in the
    /// same order.
    fn stack_run_code(
        &mut self,
        k: u32,
        run: &[Instruction],
        pop: bool,
        fast: Option<Label>,
    ) -> E<()> {
        let n = run.len() as i32;
        let hsp = self.cached_regs(&[(4, true)])?;
        if let Some(miss) = fast {
            if pop {
                self.a.mov(RSI, hsp);
            } else {
                self.a.lea(RSI, at(hsp, -8 * n));
            }
            self.tlb_to(miss, 8 * run.len(), !pop);
        }
        for (j, i) in run.iter().enumerate() {
            let (kj, j) = (k + j as u32, j as i32);
            let g = gpr_of(i.op0_register());
            if pop {
                let g = g.ok_or_else(|| EmitError("pop destination".into()))?;
                // The destination is taken into the cache before the check (slow version),
                // without its value: see `pop_cached`.
                let hsp = self.cached_regs(&[(4, true), (g, false)])?;
                let h = self
                    .cache
                    .host(g)
                    .ok_or_else(|| EmitError("pop destination".into()))?;
                let off = if fast.is_some() {
                    8 * j
                } else {
                    self.a.mov(RSI, hsp);
                    self.tlb(kj, i.ip(), 8, false);
                    0
                };
                self.a.load(h, at(RSI, off));
                self.set_dirty(g);
                if fast.is_none() {
                    self.a.lea(hsp, at(hsp, 8));
                    self.set_dirty(4);
                }
            } else {
                let src = match (i.code(), g) {
                    (Code::Push_r64, Some(g)) => Some(g),
                    _ => None,
                };
                let hsp = match src {
                    Some(g) => self.cached_regs(&[(4, true), (g, true)])?,
                    None => self.cached_regs(&[(4, true)])?,
                };
                // The j-th push stores 8 * (j + 1) bytes below the old rsp.
                let off = if fast.is_some() {
                    8 * (n - 1 - j)
                } else {
                    self.a.lea(RSI, at(hsp, -8));
                    self.tlb(kj, i.ip(), 8, true);
                    0
                };
                match src.and_then(|g| self.cache.host(g)) {
                    Some(h) => self.a.store(at(RSI, off), h),
                    None if src.is_some() => return Err(EmitError("push source".into())),
                    None => {
                        self.a.mov_imm(RDX, i.immediate(0));
                        self.a.store(at(RSI, off), RDX);
                    }
                }
                if fast.is_none() {
                    self.a.lea(hsp, at(hsp, -8));
                    self.set_dirty(4);
                }
            }
        }
        let hsp = self.cached_regs(&[(4, true)])?;
        if fast.is_some() {
            self.a.lea(hsp, at(hsp, if pop { 8 * n } else { -8 * n }));
        }
        self.set_dirty(4);
        Ok(())
    }

    /// Pushes `v` on the guest stack (guest rsp updated only after the store).
    fn push(&mut self, k: u32, ip: u64, v: Src) {
        self.a.load(RSI, greg(4));
        self.a.lea(RSI, at(RSI, -8));
        self.a.mov(RBP, RSI);
        self.tlb(k, ip, 8, true);
        match v {
            Src::Reg(g) => self.a.load(RAX, greg(g)),
            Src::Imm(x) => self.a.mov_imm(RAX, x),
            Src::R8 => self.a.mov(RAX, R8),
        }
        self.a.store(at(RSI, 0), RAX);
        self.a.store(greg(4), RBP);
    }

    /// rax = the qword at guest rsp, rbp = guest rsp (not yet updated).
    fn pop_to(&mut self, k: u32, ip: u64) {
        self.a.load(RSI, greg(4));
        self.a.mov(RBP, RSI);
        self.tlb(k, ip, 8, false);
        self.a.load(RAX, at(RSI, 0));
    }

    /// A generic instruction on the register cache: its guest registers (operands and
    /// address) are taken from, or loaded into, cache host registers and the instruction is
    /// re-encoded on them; written registers stay in the cache, dirty. Returns `false` (and
    /// emits nothing) for what the cache does not take: implicit operands, high-byte
    /// registers, `div`/`idiv`, `bt*` with a memory operand and a register offset, or a form
    /// that does not encode on the cache's registers (fixed `cl` counts, `xchg rax` short
    /// forms with another register...); [`Emitter::generic`] runs those.
    fn generic_cached(&mut self, k: u32, i: &Instruction) -> E<bool> {
        let Some(r) = rewrite(&mut self.info, i) else {
            return Ok(false);
        };
        let m = i.mnemonic();
        let regs = || (0..i.op_count()).filter(|&n| i.op_kind(n) == OpKind::Register);
        let bit_reg = r.mem.is_some()
            && matches!(m, M::Bt | M::Bts | M::Btr | M::Btc)
            && i.op1_kind() == OpKind::Register;
        if !implicit(m, i.op_count()).is_empty()
            || matches!(m, M::Div | M::Idiv)
            || bit_reg
            || regs().any(|n| is_high_byte(i.op_register(n)))
        {
            return Ok(false);
        }
        self.adopt_rax();
        let mut c = self.cache;
        let mut acts = Vec::new();
        let mut pinned = 0u8;
        if r.mem.is_some() && i.memory_base() != Register::RIP {
            for reg in [i.memory_base(), i.memory_index()] {
                if let Some(g) = gpr_of(reg)
                    && c.alloc(g, true, &mut pinned, &mut acts).is_none()
                {
                    return Ok(false);
                }
            }
        }
        for (g, &h) in r.host_of.iter().enumerate() {
            let load = !r.write_only.get(g).copied().unwrap_or(false);
            if h != usize::MAX && c.alloc(g, load, &mut pinned, &mut acts).is_none() {
                return Ok(false);
            }
        }
        let mut out = r.out;
        for n in regs() {
            let reg = i.op_register(n);
            let host = gpr_num(reg)
                .and_then(|g| c.host(g))
                .and_then(|h| cache_reg(h, reg.size()));
            let Some(host) = host else {
                return Ok(false);
            };
            out.set_op_register(n, host);
        }
        // The host address is rsi + rdi after the soft-TLB check (`tlb_check`); rdi is none
        // of the cache's registers.
        if r.mem.is_some() && m != M::Lea {
            out.set_memory_index(Register::RDI);
            out.set_memory_index_scale(1);
        }
        if self.enc.encode(&out, 0).is_err() {
            let mut b = self.enc.take_buffer();
            b.clear();
            self.enc.set_buffer(b);
            return Ok(false);
        }
        let mut bytes = self.enc.take_buffer();
        self.cache = c;
        self.emit_acts(&acts);
        let covered = self.covered.take();
        if let Some(write) = r.mem {
            if m == M::Lea {
                self.effective(i);
            } else {
                let size = i.memory_size().size();
                let key = MemKey::of(i);
                let done = covered.is_some_and(|c| {
                    c.k.checked_add(1) == Some(k)
                        && c.key == key
                        && c.size >= size
                        && (c.write || !write)
                });
                // rsi + rdi still is the host address of the previous instruction's check,
                // which covered this access too (see `Covered`).
                if !done {
                    self.address(i);
                    let mut check = (size, write);
                    if i.has_lock_prefix() || m == M::Xchg {
                        self.check_aligned(k, i.ip(), size);
                    } else if let Some(n) = self.shares_operand(i, &r) {
                        check = (size.max(n.0), write || n.1);
                        self.covered = Some(Covered {
                            k,
                            key,
                            size: check.0,
                            write: check.1,
                        });
                    }
                    self.tlb_check(k, i.ip(), check.0, check.1);
                }
            }
        }
        self.a.bytes(&bytes);
        bytes.clear();
        self.enc.set_buffer(bytes);
        for (g, &w) in r.written.iter().enumerate() {
            if w {
                self.set_dirty(g);
            }
        }
        Ok(true)
    }

    /// The next instruction's (size, write) when it is a generic instruction accessing the
    /// same memory operand as `i` (whose rewrite is `r`) at the same address: same address
    /// expression, none of its registers written by `i`, no lock/xchg alignment check and no
    /// `bt*` register offset. `i`'s soft-TLB check then covers both accesses (the larger
    /// size, a write check if either writes; a write entry is only made where a read is
    /// allowed too), and the next instruction reuses the host address left in rsi + rdi.
    fn shares_operand(&mut self, i: &Instruction, r: &Rewrite) -> Option<(usize, bool)> {
        let n = self.next?;
        let key = MemKey::of(i);
        if MemKey::of(&n) != key
            || matches!(n.mnemonic(), M::Lea | M::Xchg)
            || n.has_lock_prefix()
            || (matches!(n.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
                && n.op1_kind() == OpKind::Register)
        {
            return None;
        }
        for reg in [key.base, key.index] {
            if let Some(g) = gpr_of(reg)
                && r.written.get(g).copied().unwrap_or(true)
            {
                return None;
            }
        }
        let write = rewrite(&mut self.info, &n)?.mem?;
        Some((n.memory_size().size(), write))
    }

    /// An instruction re-encoded with host registers and `[rsi]`.
    fn generic(&mut self, k: u32, i: &Instruction) -> E<()> {
        let r = rewrite(&mut self.info, i)
            .ok_or_else(|| EmitError("not a translatable operand".into()))?;
        // bt/bts/btr/btc [mem], reg: the register's signed bit offset reaches outside the
        // addressed operand (Intel SDM "BT"): the address moves by whole operands here, and
        // the host instruction gets the offset within the operand only.
        let bit_reg = r.mem.is_some()
            && matches!(i.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
            && i.op1_kind() == OpKind::Register;
        if let Some(write) = r.mem {
            if i.mnemonic() == M::Lea {
                self.effective(i);
            } else {
                self.address(i);
                if bit_reg {
                    self.bit_address(i)?;
                }
                let size = i.memory_size().size();
                if i.has_lock_prefix() || i.mnemonic() == M::Xchg {
                    self.check_aligned(k, i.ip(), size);
                }
                self.tlb(k, i.ip(), size, write);
            }
        }
        if matches!(i.mnemonic(), M::Div | M::Idiv) {
            self.div_check(k, i)?; // saves the flags in rax
            self.rax_live = false;
        }
        for (g, &h) in r.host_of.iter().enumerate() {
            let skip = r.write_only.get(g).copied().unwrap_or(false)
                || (g == 0 && h == 0 && self.rax_live);
            if h != usize::MAX && !skip {
                self.a.load(host_num(h), greg(g));
            }
        }
        // After it, host rax is guest rax if the instruction uses guest rax (loaded, or
        // written and stored back whole), unless the bit-offset masking below changes it; it
        // is something else if another guest register went there (high-byte forms).
        let rax_guest = r.host_of.iter().position(|&h| h == 0);
        let masked = bit_reg && gpr_num(i.op1_register()) == Some(0);
        self.rax_live = match rax_guest {
            Some(0) => !masked,
            Some(_) => false,
            None => self.rax_live,
        };
        if bit_reg {
            // Offset mod the operand's bits, flag-free (r11 is never an operand here: one
            // register, in rax/rcx/rdx or the first of the pool).
            let g = gpr_num(i.op1_register()).unwrap_or(0);
            let h = host_num(r.host_of.get(g).copied().unwrap_or(0));
            let keep = (i.op1_register().size() * 8).trailing_zeros();
            self.a.mov_imm(R8 + 3, u64::from(64 - keep));
            self.a.shlx(h, h, R8 + 3);
            self.a.shrx(h, h, R8 + 3);
        }
        self.enc.encode(&r.out, 0)?;
        let mut bytes = self.enc.take_buffer();
        self.a.bytes(&bytes);
        bytes.clear();
        self.enc.set_buffer(bytes);
        for (g, &h) in r.host_of.iter().enumerate() {
            if h != usize::MAX && r.written.get(g).copied().unwrap_or(false) {
                self.a.store(greg(g), host_num(h));
            }
        }
        Ok(())
    }

    /// rsi (the linear address of a `bt*` memory operand) += the operands the register bit
    /// offset (signed, operand-sized) moves by, times the operand size. Flag-free.
    fn bit_address(&mut self, i: &Instruction) -> E<()> {
        const R9: u8 = R8 + 1;
        let reg = i.op1_register();
        let g = gpr_num(reg).ok_or_else(|| EmitError("bt offset".into()))?;
        let size = reg.size();
        self.a.load(R9, greg(g));
        match size {
            2 => self.ins(
                Instruction::with2(Code::Movsx_r64_rm16, Register::R9, Register::R9W)
                    .map_err(EmitError::from),
            )?,
            4 => self.ins(
                Instruction::with2(Code::Movsxd_r64_rm32, Register::R9, Register::R9D)
                    .map_err(EmitError::from),
            )?,
            _ => {}
        }
        self.a.mov_imm(RDX, u64::from((size * 8).trailing_zeros()));
        self.a.sarx(R9, R9, RDX);
        self.a.lea(
            RSI,
            Mem {
                base: Some(RSI),
                index: Some((R9, size as u32)),
                disp: 0,
            },
        );
        Ok(())
    }

    /// One glue instruction through the encoder (for the forms `Asm` has no helper for).
    fn ins(&mut self, i: E<Instruction>) -> E<()> {
        self.enc.encode(&i?, 0)?;
        let mut bytes = self.enc.take_buffer();
        self.a.bytes(&bytes);
        bytes.clear();
        self.enc.set_buffer(bytes);
        Ok(())
    }

    /// `dst` (r9, r10 or r11) = the `size`-byte value at `m`, zero- or sign-extended.
    fn load_ext(&mut self, dst: Register, m: MemoryOperand, size: usize, signed: bool) -> E<()> {
        let d32 = match dst {
            Register::R9 => Register::R9D,
            Register::R10 => Register::R10D,
            _ => Register::R11D,
        };
        let i = match (size, signed) {
            (8, _) => Instruction::with2(Code::Mov_r64_rm64, dst, m),
            (4, true) => Instruction::with2(Code::Movsxd_r64_rm32, dst, m),
            (4, false) => Instruction::with2(Code::Mov_r32_rm32, d32, m),
            (2, true) => Instruction::with2(Code::Movsx_r64_rm16, dst, m),
            (2, false) => Instruction::with2(Code::Movzx_r32_rm16, d32, m),
            (1, true) => Instruction::with2(Code::Movsx_r64_rm8, dst, m),
            _ => Instruction::with2(Code::Movzx_r32_rm8, d32, m),
        };
        self.ins(i.map_err(EmitError::from))
    }

    /// Before a `div`/`idiv` (memory operand already at host rsi, operands not yet loaded):
    /// exits to the interpreter, flags untouched, when the host would raise #DE (a zero
    /// divisor or a quotient too large), so the guest gets its #DE from the interpreter at
    /// the instruction. `idiv` runs here only for a dividend that is the sign extension of
    /// its low half (what `cqo`/`cdq` make) and a divisor other than 0 and -1, where the
    /// quotient always fits; every other case is interpreted.
    fn div_check(&mut self, k: u32, i: &Instruction) -> E<()> {
        use iced_x86::MemoryOperand as Mo;
        let signed = i.mnemonic() == M::Idiv;
        let (divisor, size) = match i.op0_kind() {
            OpKind::Memory => (Mo::with_base(Register::RSI), i.memory_size().size()),
            _ => {
                let r = i.op0_register();
                let g = gpr_num(r).ok_or_else(|| EmitError("div operand".into()))?;
                let off = 8 * g as i64 + i64::from(is_high_byte(r));
                (Mo::with_base_displ(Register::RBX, off), r.size())
            }
        };
        let stub = self.stub(k, i.ip(), 0);
        let (bad, ok) = (self.a.label(), self.a.label());
        // ah = SF ZF AF PF CF, al = OF (restored below with `add al, 0x7f; sahf`).
        self.a.bytes(&[0x9f, 0x0f, 0x90, 0xc0]);
        self.load_ext(Register::R9, divisor, size, signed)?;
        let hi = if size == 1 { 1 } else { 16 };
        self.load_ext(
            Register::R10,
            Mo::with_base_displ(Register::RBX, hi),
            size,
            signed,
        )?;
        if signed {
            self.load_ext(Register::R11, Mo::with_base(Register::RBX), size, true)?;
            self.ins(
                Instruction::with2(Code::Test_rm64_r64, Register::R9, Register::R9)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(4, bad);
            self.ins(
                Instruction::with2(Code::Cmp_rm64_imm8, Register::R9, -1i32)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(4, bad);
            self.ins(
                Instruction::with2(Code::Sar_rm64_imm8, Register::R11, 63u32)
                    .map_err(EmitError::from),
            )?;
            self.ins(
                Instruction::with2(Code::Cmp_r64_rm64, Register::R10, Register::R11)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(5, bad);
        } else {
            // hi >= divisor: a quotient wider than the operand, or a zero divisor.
            self.ins(
                Instruction::with2(Code::Cmp_r64_rm64, Register::R10, Register::R9)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(3, bad);
        }
        self.a.bytes(&[0x04, 0x7f, 0x9e]);
        self.a.jmp(ok);
        self.a.bind(bad);
        self.a.bytes(&[0x04, 0x7f, 0x9e]);
        self.a.jmp(stub);
        self.a.bind(ok);
        Ok(())
    }

    /// `stos`/`movs` (see [`Kind::Str`]): with flags saved (lahf/seto), checks that DF is
    /// clear, the count (rcx, or 1 without `rep`) is 1..=4096/size and each operand's bytes
    /// are in one page; then the TLB (source read, destination write) and the host runs the
    /// instruction itself on the host addresses; the guest's rdi/rsi advance and rcx ends 0.
    /// Anything else, and a TLB miss, leaves to the interpreter before the instruction.
    fn string(&mut self, k: u32, i: &Instruction) -> E<()> {
        use iced_x86::MemoryOperand as Mo;
        const R9: u8 = R8 + 1;
        const R10: u8 = R8 + 2;
        let size = i.memory_size().size();
        let movs = is_movs(i.code());
        let rep = i.has_rep_prefix();
        let ip = i.ip();
        let scale = u32::try_from(size).map_err(|_| EmitError("string size".into()))?;
        let stub = self.stub(k, ip, 0);
        let (bad, ok) = (self.a.label(), self.a.label());
        self.a.bytes(&[0x9f, 0x0f, 0x90, 0xc0]); // lahf; seto al
        if rep {
            self.a.load(R9, greg(1));
            self.a.lea(R10, at(R9, -1));
            let max = (4096 / size as i32) - 1;
            self.ins(
                Instruction::with2(Code::Cmp_rm64_imm32, Register::R10, max)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(7, bad); // ja: rcx = 0 or too many
        } else {
            self.a.mov_imm(R9, 1);
        }
        self.ins(
            Instruction::with2(
                Code::Test_rm64_imm32,
                Mo::with_base_displ(Register::R15, i64::from(C_FLAGS)),
                0x400u32,
            )
            .map_err(EmitError::from),
        )?;
        self.a.jcc(5, bad); // DF set
        let ops: &[(usize, u8)] = if movs {
            &[(7, RSI), (6, R8)]
        } else {
            &[(7, RSI)]
        };
        for &(g, h) in ops {
            self.a.load(h, greg(g));
            self.a.lea(
                RDX,
                Mem {
                    base: Some(h),
                    index: Some((R9, scale)),
                    disp: -1,
                },
            );
            let hr = if h == RSI {
                Register::RSI
            } else {
                Register::R8
            };
            self.ins(
                Instruction::with2(Code::Xor_r64_rm64, Register::RDX, hr).map_err(EmitError::from),
            )?;
            self.ins(
                Instruction::with2(Code::Shr_rm64_imm8, Register::RDX, 12u32)
                    .map_err(EmitError::from),
            )?;
            self.a.jcc(5, bad); // the last byte is in another page
        }
        self.a.bytes(&[0x04, 0x7f, 0x9e]); // add al, 0x7f; sahf
        self.a.jmp(ok);
        self.a.bind(bad);
        self.a.bytes(&[0x04, 0x7f, 0x9e]);
        self.a.jmp(stub);
        self.a.bind(ok);
        if movs {
            self.a.mov(RSI, R8);
            self.tlb(k, ip, size, false);
            self.a.mov(R8, RSI);
        }
        self.a.load(RSI, greg(7));
        self.tlb(k, ip, size, true);
        self.a.mov(RDI, RSI);
        if movs {
            self.a.mov(RSI, R8);
        } else {
            self.a.load(RAX, greg(0));
        }
        self.a.mov(RCX, R9);
        self.ins(Ok(*i))?;
        for &(g, _) in ops {
            self.a.load(RDX, greg(g));
            self.a.lea(
                RDX,
                Mem {
                    base: Some(RDX),
                    index: Some((R9, scale)),
                    disp: 0,
                },
            );
            self.a.store(greg(g), RDX);
        }
        if rep {
            self.a.store_imm(greg(1), 0);
        }
        Ok(())
    }

    /// `pushfq`: the guest's RFLAGS image is the host's arithmetic flags (the guest's, in the
    /// block) and the other bits as the run was entered with (no translated instruction
    /// changes them), VM and RF cleared as the CPU pushes them. Flag-neutral (pext/pdep mask).
    fn pushf(&mut self, k: u32, ip: u64) -> E<()> {
        use crate::cpu::{ARITH_FLAGS, RF, VM};
        let pext = |d, s, m| Instruction::with3(Code::VEX_Pext_r64_r64_rm64, d, s, m);
        let pdep = |d, s, m| Instruction::with3(Code::VEX_Pdep_r64_r64_rm64, d, s, m);
        self.a.bytes(&[0x9c, 0x41, 0x58]); // pushfq; pop r8
        self.a.mov_imm(RDX, ARITH_FLAGS);
        self.ins(pext(Register::R8, Register::R8, Register::RDX).map_err(EmitError::from))?;
        self.ins(pdep(Register::R8, Register::R8, Register::RDX).map_err(EmitError::from))?;
        self.a.load(RCX, ctx(C_FLAGS));
        self.a.mov_imm(RDX, !(ARITH_FLAGS | VM | RF));
        self.ins(pext(Register::RCX, Register::RCX, Register::RDX).map_err(EmitError::from))?;
        self.ins(pdep(Register::RCX, Register::RCX, Register::RDX).map_err(EmitError::from))?;
        self.a.lea(
            R8,
            Mem {
                base: Some(R8),
                index: Some((RCX, 1)),
                disp: 0,
            },
        );
        self.push(k, ip, Src::R8);
        Ok(())
    }

    /// Whether the generic rewrite of `i` encodes (checked per instruction at translation, so
    /// one odd form ends the block instead of failing it).
    pub fn encodes(&mut self, i: &Instruction) -> bool {
        let Some(r) = rewrite(&mut self.info, i) else {
            return false;
        };
        let ok = self.enc.encode(&r.out, 0).is_ok();
        let mut b = self.enc.take_buffer();
        b.clear();
        self.enc.set_buffer(b);
        ok
    }
}

enum Src {
    Reg(usize),
    Imm(u64),
    /// Host r8 (which the stack's TLB check leaves alone).
    R8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{ARITH_FLAGS, CF, OF, ZF};

    #[test]
    fn perf_map_lines_are_what_perf_reads() {
        assert_eq!(
            perf_map_line(
                0x7f12_3456_7000,
                0x2e0,
                &perf_map_name(0xffff_ffff_8100_0010)
            ),
            "7f1234567000 2e0 guest-ffffffff81000010\n"
        );
        // Three fields, the first two hex without prefix (perf's `parse_perf_map` format).
        let l = perf_map_line(16, 255, "anyvisor-jit-trampoline");
        let f: Vec<_> = l.trim_end().split(' ').collect();
        assert_eq!(f, ["10", "ff", "anyvisor-jit-trampoline"]);
    }

    /// Runs `block` (emitted with `Asm`) through the real trampoline of a translator.
    fn run(block: impl Fn(&mut Asm), flags: u64, budget: u64) -> super::super::Jit {
        let mut jit = super::super::Jit::new(1 << 20).unwrap();
        let mut a = Asm::default();
        block(&mut a);
        assert!(a.finish());
        let r = jit.cache.push(&a.buf).unwrap();
        jit.ctx.flags = flags;
        jit.ctx.nbudget = budget.wrapping_neg();
        let mut regs = [0u64; 16];
        jit.cache.enter(r, &mut regs, &mut *jit.ctx).unwrap();
        jit
    }

    #[test]
    fn trampoline_fills_the_context_for_each_exit() {
        // Interpret after a write miss: 3 instructions done, rsi = the address.
        let jit = run(
            |a| {
                a.mov_imm(RSI, 0x5008);
                a.mov_imm(RAX, 0x40_1000);
                a.mov_imm(RCX, u64::from(3 << 8 | (EXIT_INTERP + 2)));
                a.ret();
            },
            0x202 | CF | OF | ZF,
            100,
        );
        let ctx = &jit.ctx;
        assert_eq!(
            (ctx.rip, ctx.exit, ctx.miss_kind, ctx.miss_lin),
            (0x40_1000, 1, 2, 0x5008)
        );
        assert_eq!(ctx.count, 3);
        assert_eq!(
            ctx.flags & ARITH_FLAGS,
            CF | OF | ZF,
            "flags survive the round trip"
        );
        // Go on at RIP after 2 + 5 instructions (r12 counts down), no flags set.
        let jit = run(
            |a| {
                a.lea(R12, at(R12, -2));
                a.mov_imm(RAX, 0x40_2000);
                a.mov_imm(RCX, u64::from(5 << 8 | EXIT_GO));
                a.ret();
            },
            0x202,
            100,
        );
        let ctx = &jit.ctx;
        assert_eq!((ctx.rip, ctx.exit, ctx.count), (0x40_2000, 0, 7));
        assert_eq!(ctx.flags & ARITH_FLAGS, 0);
        assert_eq!((ctx.link, ctx.dead), (0, 0));
        // A linkable jump and a dead entry report their address in rdx.
        for (code, link, dead) in [(EXIT_LINK, 0x1234, 0), (EXIT_DEAD, 0, 0x1234)] {
            let jit = run(
                |a| {
                    a.mov_imm(RDX, 0x1234);
                    a.mov_imm(RAX, 0x40_3000);
                    a.mov_imm(RCX, u64::from(code));
                    a.ret();
                },
                0x202 | OF,
                1,
            );
            let ctx = &jit.ctx;
            assert_eq!(
                (ctx.link, ctx.dead, ctx.exit, ctx.count),
                (link, dead, 0, 0)
            );
            assert_eq!(ctx.flags & ARITH_FLAGS, OF);
        }
        // The budget as blocks see it: r12 = budget - 1, so r12 >> 12 is 0 until spent.
        let jit = run(
            |a| {
                a.mov(RAX, R12);
                a.mov_imm(RCX, u64::from(EXIT_GO));
                a.ret();
            },
            0x202,
            2048,
        );
        let ctx = &jit.ctx;
        assert_eq!((ctx.rip, ctx.count), (2047, 0));
        // The pdep masks blocks find above the return address.
        for (at_, mask) in [
            (TLB_MASK_AT, u64::from(TLB_MASK)),
            (JC_MASK_AT, u64::from(JC_MASK)),
            (TOP_MASK_AT, TOP_MASK),
        ] {
            let jit = run(
                |a| {
                    a.load(RAX, at(RSP, at_));
                    a.mov_imm(RCX, u64::from(EXIT_GO));
                    a.ret();
                },
                0x202,
                1,
            );
            assert_eq!(jit.ctx.rip, mask);
        }
    }
}
