//! System and model-dependent instructions in translated code: segment-register reads,
//! `cli`/`sti`/`cld`/`std`/`popfq`, `swapgs`, `rd/wr fs/gs base`, `push m64`, `cmpxchg16b`,
//! and the scalar extensions (BMI1/BMI2/ABM/POPCNT/ADX/MOVBE) the VM's model shows.
//!
//! **RFLAGS beyond the arithmetic flags.** The block keeps the six arithmetic flags in the
//! host flags; the other bits (IF, DF, IOPL, AC...) are the guest's `Cpu::rflags` as the run
//! was entered with, in `Ctx::flags` (which `pushfq` and the string instructions read). The
//! instructions here change those bits in [`SysCtx::flags`] and `Ctx::flags` together (with
//! flag-neutral `pext`/`pdep`), and [`leave`] copies them back after the run.
//!
//! **Privilege and interrupts.** [`enter`] computes a deny word (CPL > IOPL: `cli`/`sti`
//! #GP; CPL != 0: `swapgs` #GP; CR4.FSGSBASE or the model's FSGSBASE missing: #UD; more than
//! one vCPU: `cmpxchg16b`, see below) and POPF's writable mask; only the interpreter changes
//! CPL, IOPL, CR4, and a `popfq` that changes IOPL returns to the run loop, so the word holds
//! for a whole chain. Each instruction that needs a bit checks it first and leaves to the
//! interpreter (which raises the fault) when it is set.
//!
//! **The interrupt window of `sti` and `popfq`.** The interpreter sets `irq_check` after both
//! (and, after a `sti` that sets IF, the one-instruction STI shadow: SDM Vol. 2 "STI", Vol. 3
//! 6.8.3), and its run loop then delivers an interrupt if one is deliverable. Translated code
//! does the same without returning when nothing can be delivered: [`enter`] records in
//! [`SysCtx::waiting`] whether an interrupt may be waiting at entry ([`irq_waiting`]: an
//! `irq_check` left set, an unmasked NMI, a vector the local APIC would deliver with IF set,
//! a mailbox not merged yet), and while the run lasts the only new interrupts are other
//! threads' posts, which set the exit-request word the block heads read anyway (the LAPIC
//! timer, LAPIC and TPR writes are the run loop's and the interpreter's). At the window
//! ([`Emitter::irq_window`]) the block leaves to the run loop with `irq_check`
//! ([`SysCtx::effects`]) when IF is set and either of the two says so, and goes on otherwise:
//!
//! * `sti` that sets IF: the next instruction is translated into the same block when it may
//!   run in the shadow ([`in_shadow`]: not one that ends the block, not another `sti` or a
//!   `popfq`); the window follows it ([`Emitter::sti_window`]; after `sti; cli` IF is clear
//!   and there is none). An exit before or inside that instruction (a soft-TLB miss, a
//!   fault) leaves `irq_check` and the shadow for the run loop, which interprets it alone,
//!   as before. When the block has nothing after the `sti` it may run in the shadow (an
//!   untranslated instruction such as the `hlt` of `sti; hlt`, a branch, the page end), the
//!   block ends at the `sti` and the run loop takes the shadow and the check.
//! * `sti` with IF already set: no shadow; the window is right after it (the interpreter's
//!   `irq_check` asks for a look there too).
//! * `popfq`: a new IOPL returns to the run loop (the deny word and POPF's mask are stale);
//!   otherwise the window is right after it (no shadow), and the block goes on with the new
//!   flags in [`SysCtx::flags`] and `Ctx::flags`.
//!
//! `irq_check` stays clear where the block went on: the interpreter would have set it and
//! found nothing to deliver. Tests: `a_pending_interrupt_comes_right_after_the_sti_shadow`,
//! `an_interrupt_posted_while_the_block_runs_comes_after_the_shadow`,
//! `popfq_that_sets_if_delivers_a_pending_interrupt_right_after_it`,
//! `popfq_that_changes_iopl_ends_the_run` and the others in `sys_tests.rs`.
//!
//! **cmpxchg16b** runs as the host's `lock cmpxchg16b` on the soft TLB's host address only
//! while the VM has one vCPU: the interpreter runs it as read-then-write under a VM-wide mutex,
//! which another vCPU's host atomic would not respect.
//!
//! **Scalar extensions** are [`Kind::Generic`] (run as themselves) when the model shows their
//! feature ([`classify`] gets the model's features) and the host has it; a model without the
//! feature leaves them to the interpreter (#UD; `tzcnt`/`lzcnt` as `bsf`/`bsr`).

use std::mem::offset_of;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use hv::cpu_model::{Feature, FeatureSet};
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic as M, OpKind, Register};

use super::super::{C_FLAGS, C_FS, C_GS, C_REQ, Ctx};
use super::{E, EXIT_GO, EmitError, Emitter, Kind, Src, ctx, gpr_num, greg, mem_ok};
use crate::cpu::{
    ARITH_FLAGS, CS, DF, DS, ES, FLAGS_WRITABLE, FS, GS, IF, IOPL, RF, SS, parse_descriptor,
};
use crate::exec::Exec;
use crate::jit::asm::{Mem, R8, RAX, RBP, RBX, RCX, RDX, RSI, at};

/// What translated code reads and writes for the instructions of this module (a field of
/// [`Ctx`]; set by [`enter`], read back by [`leave`]).
#[repr(C)]
#[derive(Default)]
pub struct SysCtx {
    /// Guest RFLAGS; its non-arithmetic bits are current (the arithmetic ones are in the host
    /// flags while a block runs).
    flags: u64,
    /// [`IRQ_CHECK`] | [`SHADOW`]: what the run loop does after the run.
    effects: u64,
    /// Bits of what is not allowed now ([`D_IOPL`], [`D_CPL0`], [`D_FSGS`], [`D_SMP`]).
    deny: u64,
    /// The bits POPF may change at this CPL and IOPL.
    popf_mask: u64,
    /// IA32_KERNEL_GS_BASE (`swapgs`).
    kernel_gs: u64,
    /// Segment selectors, ES..GS.
    sel: [u16; 8],
    /// The five qwords an `iretq` popped (RIP, CS, RFLAGS, RSP, SS), for [`leave`].
    frame: [u64; 5],
    /// 1 when an interrupt may have been waiting for IF at entry ([`irq_waiting`]), else 0.
    waiting: u64,
}

const C_SYS: i32 = offset_of!(Ctx, sys) as i32;
const C_SFLAGS: i32 = C_SYS + offset_of!(SysCtx, flags) as i32;
const C_EFFECTS: i32 = C_SYS + offset_of!(SysCtx, effects) as i32;
const C_SDENY: i32 = C_SYS + offset_of!(SysCtx, deny) as i32;
const C_POPF: i32 = C_SYS + offset_of!(SysCtx, popf_mask) as i32;
const C_KGS: i32 = C_SYS + offset_of!(SysCtx, kernel_gs) as i32;
const C_SEL: i32 = C_SYS + offset_of!(SysCtx, sel) as i32;
const C_FRAME: i32 = C_SYS + offset_of!(SysCtx, frame) as i32;
const C_WAIT: i32 = C_SYS + offset_of!(SysCtx, waiting) as i32;

/// The run loop sets `irq_check` after the run.
const IRQ_CHECK: u64 = 1;
/// The run loop sets the STI interrupt shadow after the run.
const SHADOW: u64 = 2;
/// The run stopped at an `iretq` whose frame is in [`SysCtx::frame`]: [`leave`] finishes it.
const IRET: u64 = 4;

/// CPL > IOPL: `cli`/`sti` raise #GP.
const D_IOPL: u64 = 1;
/// CPL != 0: `swapgs` raises #GP.
const D_CPL0: u64 = 2;
/// CR4.FSGSBASE clear or no FSGSBASE in the model: `rd/wr fs/gs base` raise #UD.
const D_FSGS: u64 = 4;
/// More than one vCPU: `cmpxchg16b` is the interpreter's (see the module doc).
const D_SMP: u64 = 8;

const CR4_FSGSBASE: u64 = 1 << 16;

/// Whether an interrupt may be waiting for IF to be set (or for nothing) when a run is
/// entered: what the run loop's `Exec::try_inject` would find after a `sti` or `popfq` that
/// this run does not return for. Another thread's post from now on sets the exit-request
/// word, which translated code reads itself; nothing else gives the vCPU an interrupt while
/// translated code runs (LAPIC accesses, TPR writes and the timer are the run loop's).
/// May say yes for nothing (the run then returns at the `sti`/`popfq`, as it always did),
/// never no for something.
fn irq_waiting(ex: &Exec<'_>) -> bool {
    let cpu = &*ex.cpu;
    cpu.irq_check
        || (cpu.nmi_pending && !cpu.nmi_masked)
        || cpu.lapic.deliverable().is_some()
        // Posted before the batch cleared the exit-request word, not merged yet.
        || ex
            .vm
            .vcpus
            .get(cpu.id as usize)
            .is_some_and(|v| v.pending.load(Ordering::Acquire))
}

/// Sets [`SysCtx`] up for a run of `ex`'s vCPU (before every entry).
pub(crate) fn enter(s: &mut SysCtx, ex: &Exec<'_>) {
    let cpu = &*ex.cpu;
    let (features, vcpus) = (ex.vm.features, ex.vm.vcpus.len());
    s.flags = cpu.rflags;
    s.effects = 0;
    s.waiting = u64::from(irq_waiting(ex));
    let iopl = (cpu.rflags & IOPL) >> 12;
    let cpl = u64::from(cpu.cpl);
    let mut deny = 0;
    if cpl > iopl {
        deny |= D_IOPL;
    }
    if cpl != 0 {
        deny |= D_CPL0;
    }
    if cpu.cr4 & CR4_FSGSBASE == 0 || !features.contains(Feature::Fsgsbase) {
        deny |= D_FSGS;
    }
    if vcpus > 1 {
        deny |= D_SMP;
    }
    s.deny = deny;
    // POPF (Intel SDM "POPF"): IOPL only at CPL 0, IF only if CPL <= IOPL.
    let mut w = FLAGS_WRITABLE;
    if cpl != 0 {
        w &= !IOPL;
        if cpl > iopl {
            w &= !IF;
        }
    }
    s.popf_mask = w;
    s.kernel_gs = cpu.msr.kernel_gs_base;
    for (k, sel) in s.sel.iter_mut().enumerate() {
        *sel = cpu.seg.get(k).map_or(0, |g| g.selector);
    }
}

/// Copies what translated code changed back into the vCPU (after every run, after the
/// arithmetic flags, RIP and the registers were merged), and finishes a stopped `iretq`.
pub(crate) fn leave(c: &mut Ctx, ex: &mut Exec<'_>) {
    let s = &c.sys;
    let cpu = &mut *ex.cpu;
    cpu.rflags = (s.flags & !ARITH_FLAGS) | (cpu.rflags & ARITH_FLAGS);
    cpu.seg[FS].base = c.fs;
    cpu.seg[GS].base = c.gs;
    cpu.msr.kernel_gs_base = s.kernel_gs;
    if s.effects & IRQ_CHECK != 0 {
        cpu.irq_check = true;
    }
    if s.effects & SHADOW != 0 {
        cpu.shadow |= 1;
    }
    if s.effects & IRET != 0 {
        let frame = s.frame;
        if iret_same_level(ex, &frame) {
            c.count += 1;
        } else {
            // Anything else: the interpreter runs the instruction (RIP is still at it).
            c.exit = 1;
            c.miss_kind = 0;
        }
    }
}

/// `iretq` in 64-bit mode to the same CPL with the current CS and SS selectors whose
/// descriptors reload to exactly the current segment registers (present, accessed, unchanged:
/// what Linux's `sync_core` does): done here as the interpreter's `iret` would do it. Returns
/// false, changing nothing, for any other case.
fn iret_same_level(ex: &mut Exec<'_>, f: &[u64; 5]) -> bool {
    let [ip, cs, fl, sp, ss] = *f;
    let (cs, ss) = (cs as u16, ss as u16);
    let cpu = &*ex.cpu;
    if !cpu.mode64()
        || cs != cpu.seg[CS].selector
        || ss != cpu.seg[SS].selector
        || u8::try_from(cs & 3).ok() != Some(cpu.cpl)
        || !crate::decode::canonical(ip)
    {
        return false;
    }
    let cpl = cpu.cpl;
    let cr2 = cpu.cr2;
    // CS as `load_cs` would load it.
    let Ok(d) = ex.read_descriptor(cs) else {
        ex.cpu.cr2 = cr2;
        return false;
    };
    let accessed = 1 << 40;
    if d & (1 << 47) == 0 || d & (1 << 43) == 0 || d & accessed == 0 {
        return false;
    }
    let mut seg = parse_descriptor((cs & !3) | u16::from(cpl), d);
    if seg.l && seg.db {
        return false;
    }
    seg.dpl = if seg.type_ & 4 != 0 { seg.dpl } else { cpl };
    if seg != ex.cpu.seg[CS] {
        return false;
    }
    // SS as `iret` would load it (a null selector in long mode, else `mov_sreg`).
    let ss_seg = if ss & !3 == 0 {
        hv::Segment {
            selector: ss,
            unusable: true,
            dpl: cpl,
            db: true,
            ..hv::Segment::default()
        }
    } else {
        let Ok(d) = ex.read_descriptor(ss) else {
            ex.cpu.cr2 = cr2;
            return false;
        };
        if d & (1 << 47) == 0 || d & accessed == 0 {
            return false;
        }
        parse_descriptor(ss, d)
    };
    let cpu = &mut *ex.cpu;
    if ss_seg != cpu.seg[SS] {
        return false;
    }
    // Flags: IOPL only at CPL 0, IF only if CPL <= IOPL (as POPF, plus RF).
    let mut w = FLAGS_WRITABLE | RF;
    if cpl != 0 {
        w &= !IOPL;
        if u64::from(cpl) > (cpu.rflags & IOPL) >> 12 {
            w &= !IF;
        }
    }
    cpu.rflags = (cpu.rflags & !w) | (fl & w) | 2;
    cpu.rip = ip;
    cpu.shadow &= !2;
    cpu.gpr[4] = sp;
    cpu.nmi_masked = false;
    cpu.irq_check = true;
    true
}

/// Host features the scalar extensions run on (checked once).
fn host_has(f: Feature) -> bool {
    static HOST: OnceLock<[bool; 7]> = OnceLock::new();
    let h = HOST.get_or_init(|| {
        [
            std::arch::is_x86_feature_detected!("bmi1"),
            std::arch::is_x86_feature_detected!("bmi2"),
            std::arch::is_x86_feature_detected!("lzcnt"),
            std::arch::is_x86_feature_detected!("popcnt"),
            std::arch::is_x86_feature_detected!("adx"),
            std::arch::is_x86_feature_detected!("movbe"),
            std::arch::is_x86_feature_detected!("cmpxchg16b"),
        ]
    });
    let k = match f {
        Feature::Bmi1 => 0,
        Feature::Bmi2 => 1,
        Feature::Abm => 2,
        Feature::Popcnt => 3,
        Feature::Adx => 4,
        Feature::Movbe => 5,
        _ => return false,
    };
    h.get(k).copied().unwrap_or(false)
}

fn host_cmpxchg16b() -> bool {
    static H: OnceLock<bool> = OnceLock::new();
    *H.get_or_init(|| std::arch::is_x86_feature_detected!("cmpxchg16b"))
}

/// The model feature a scalar extension instruction needs, if `m` is one.
fn ext_feature(m: M) -> Option<Feature> {
    Some(match m {
        M::Tzcnt | M::Andn | M::Bextr | M::Blsi | M::Blsmsk | M::Blsr => Feature::Bmi1,
        M::Bzhi | M::Mulx | M::Pdep | M::Pext | M::Rorx | M::Sarx | M::Shlx | M::Shrx => {
            Feature::Bmi2
        }
        M::Lzcnt => Feature::Abm,
        M::Popcnt => Feature::Popcnt,
        M::Adcx | M::Adox => Feature::Adx,
        M::Movbe => Feature::Movbe,
        _ => return None,
    })
}

/// Whether an instruction of kind `k` may run in a block right after a `sti` (in its
/// interrupt shadow, with the interrupt window after it, [`Emitter::sti_window`]): one that
/// does not end the block and is neither another `sti` nor a `popfq` (which have windows of
/// their own). After a `sti` followed by anything else the block ends (see the module doc).
pub(super) fn in_shadow(k: Kind) -> bool {
    !k.ends_block() && !matches!(k, Kind::Sti | Kind::Popf)
}

/// Index (ES = 0 .. GS = 5) of a segment register.
fn sreg(r: Register) -> Option<usize> {
    Some(match r {
        Register::ES => ES,
        Register::CS => CS,
        Register::SS => SS,
        Register::DS => DS,
        Register::FS => FS,
        Register::GS => GS,
        _ => return None,
    })
}

/// How this module translates `i` under a model with `features`, or `None`.
pub(super) fn classify(i: &Instruction, features: FeatureSet) -> Option<Kind> {
    let m = i.mnemonic();
    if let Some(f) = ext_feature(m) {
        if !(features.contains(f) && host_has(f)) {
            return None;
        }
        return super::generic_operands(i);
    }
    let op0_ok = || match i.op0_kind() {
        OpKind::Register => gpr_num(i.op0_register()).is_some(),
        OpKind::Memory => mem_ok(i),
        _ => false,
    };
    match i.code() {
        Code::Mov_rm16_Sreg | Code::Mov_r32m16_Sreg | Code::Mov_r64m16_Sreg => {
            (sreg(i.op1_register()).is_some() && op0_ok()).then_some(Kind::SegRead)
        }
        Code::Cli => Some(Kind::Cli),
        Code::Sti => Some(Kind::Sti),
        Code::Cld => Some(Kind::Cld),
        Code::Std => Some(Kind::Std),
        Code::Popfq => Some(Kind::Popf),
        Code::Iretq => Some(Kind::Iret),
        Code::Swapgs => Some(Kind::Swapgs),
        Code::Rdfsbase_r32
        | Code::Rdfsbase_r64
        | Code::Rdgsbase_r32
        | Code::Rdgsbase_r64
        | Code::Wrfsbase_r32
        | Code::Wrfsbase_r64
        | Code::Wrgsbase_r32
        | Code::Wrgsbase_r64 => op0_ok().then_some(Kind::FsGsBase),
        Code::Push_rm64 if i.op0_kind() == OpKind::Memory => mem_ok(i).then_some(Kind::PushMem),
        Code::Cmpxchg16b_m128 => (mem_ok(i) && host_cmpxchg16b()).then_some(Kind::Cmpxchg16b),
        _ => None,
    }
}

impl Emitter {
    /// Leaves to interpret instruction `k` when any of the `need` bits of the deny word is set.
    fn sys_allowed(&mut self, k: u32, ip: u64, need: u64) {
        let stub = self.stub(k, ip, 0);
        self.a.load(RCX, ctx(C_SDENY));
        self.a.mov_imm(RDX, need);
        self.a.bytes(&[0xc4, 0xe2, 0xf2, 0xf5, 0xca]); // pext rcx, rcx, rdx
        self.a.jmp_unless_rcx_zero(stub);
    }

    /// The guest's non-arithmetic RFLAGS: clears `clear` and sets `set` (bits below 2^31),
    /// flag-neutral; both copies (see the module doc).
    fn sys_flags(&mut self, clear: u64, set: u64) -> E<()> {
        let clear = clear | set;
        let pext = |d, s, m| Instruction::with3(Code::VEX_Pext_r64_r64_rm64, d, s, m);
        let pdep = |d, s, m| Instruction::with3(Code::VEX_Pdep_r64_r64_rm64, d, s, m);
        self.a.load(RCX, ctx(C_SFLAGS));
        if clear != 0 {
            self.a.mov_imm(RDX, !clear);
            self.ins(pext(Register::RCX, Register::RCX, Register::RDX).map_err(EmitError::from))?;
            self.ins(pdep(Register::RCX, Register::RCX, Register::RDX).map_err(EmitError::from))?;
        }
        if set != 0 {
            let s = i32::try_from(set).map_err(|_| EmitError("flag bit".into()))?;
            self.a.lea(RCX, at(RCX, s));
        }
        self.a.store(ctx(C_SFLAGS), RCX);
        self.a.store(ctx(C_FLAGS), RCX);
        Ok(())
    }

    /// Back to the run loop at guest `next` after `done` instructions (not chained: the run
    /// loop acts on [`SysCtx::effects`] first).
    fn exit_to_run_loop(&mut self, done: u32, next: u64) {
        self.leave(next, EXIT_GO, done);
    }

    /// rcx = nonzero when IF is set now ([`SysCtx::flags`]) and an interrupt may be waiting:
    /// one was at entry ([`SysCtx::waiting`]) or another thread posted one since (the
    /// exit-request word). Flag-neutral; clobbers rcx and rdx only (rsi and rdi may hold a
    /// host address the next instruction reuses, see `Covered`).
    fn irq_window(&mut self) -> E<()> {
        let a = &mut self.a;
        a.load(RCX, ctx(C_SFLAGS));
        a.mov_imm(RDX, 63 - 9);
        a.shlx(RCX, RCX, RDX);
        a.mov_imm(RDX, 63);
        a.sarx(RCX, RCX, RDX); // IF ? !0 : 0
        a.load(RDX, ctx(C_REQ));
        a.load32(RDX, RDX);
        let pext = Instruction::with3(
            Code::VEX_Pext_r64_r64_rm64,
            Register::RDX,
            Register::RDX,
            Register::RCX,
        );
        self.ins(pext.map_err(EmitError::from))?; // IF ? request : 0
        let a = &mut self.a;
        a.pext_mem(RCX, RCX, ctx(C_WAIT)); // IF && waiting at entry
        a.lea(
            RCX,
            Mem {
                base: Some(RCX),
                index: Some((RDX, 1)),
                disp: 0,
            },
        );
        Ok(())
    }

    /// The end of the STI shadow, after instruction `k` (`i`), the one after a `sti` that set
    /// IF: back to the run loop (IRQ_CHECK, no SHADOW) when IF is still set and an
    /// interrupt may be waiting, else on with nothing for the run loop to do.
    pub(super) fn sti_window(&mut self, k: u32, i: &Instruction) -> E<()> {
        self.a.store_imm(ctx(C_EFFECTS), IRQ_CHECK as i32);
        self.irq_window()?;
        let stub = self.stub(k + 1, i.next_ip(), -1);
        self.a.jmp_unless_rcx_zero(stub);
        self.a.store_imm(ctx(C_EFFECTS), 0);
        // The check used rcx and rdx only, but keep the next instruction from relying on an
        // address check made before it.
        self.covered = None;
        Ok(())
    }

    /// Instruction `k` of the block, a kind of this module. Returns whether it ended the block.
    pub(super) fn sys(&mut self, k: u32, i: &Instruction, kind: Kind) -> E<bool> {
        let ip = i.ip();
        match kind {
            Kind::SegRead => {
                let s = sreg(i.op1_register()).ok_or_else(|| EmitError("sreg".into()))?;
                let sel =
                    MemoryOperand::with_base_displ(Register::R15, i64::from(C_SEL) + 2 * s as i64);
                if i.op0_kind() == OpKind::Memory {
                    self.address(i);
                    self.tlb(k, ip, 2, true);
                    self.ins(
                        Instruction::with2(Code::Movzx_r32_rm16, Register::ECX, sel)
                            .map_err(EmitError::from),
                    )?;
                    self.ins(
                        Instruction::with2(
                            Code::Mov_rm16_r16,
                            MemoryOperand::with_base(Register::RSI),
                            Register::CX,
                        )
                        .map_err(EmitError::from),
                    )?;
                } else {
                    // Any register size: the interpreter zero-extends the selector.
                    let g = gpr_num(i.op0_register()).ok_or_else(|| EmitError("gpr".into()))?;
                    self.ins(
                        Instruction::with2(Code::Movzx_r32_rm16, Register::ECX, sel)
                            .map_err(EmitError::from),
                    )?;
                    self.a.store(greg(g), RCX);
                }
            }
            Kind::Cli => {
                self.sys_allowed(k, ip, D_IOPL);
                self.sys_flags(IF, 0)?;
            }
            Kind::Cld => self.sys_flags(DF, 0)?,
            Kind::Std => self.sys_flags(0, DF)?,
            Kind::Sti => {
                self.sys_allowed(k, ip, D_IOPL);
                // effects = IRQ_CHECK, plus SHADOW when IF was clear.
                let a = &mut self.a;
                a.load(RCX, ctx(C_SFLAGS));
                a.not(RCX);
                a.mov_imm(RDX, 9);
                a.shrx(RCX, RCX, RDX);
                a.mov_imm(RDX, 63);
                a.shlx(RCX, RCX, RDX);
                a.shrx(RCX, RCX, RDX);
                a.lea(
                    RCX,
                    Mem {
                        base: None,
                        index: Some((RCX, 2)),
                        disp: IRQ_CHECK as i32,
                    },
                );
                a.store(ctx(C_EFFECTS), RCX);
                if !self.following.is_some_and(in_shadow) {
                    // Nothing the block can run in the shadow: the run loop interprets it.
                    self.sys_flags(0, IF)?;
                    self.exit_to_run_loop(k + 1, i.next_ip());
                    return Ok(true);
                }
                // IF was set already: no shadow, the window is right after `sti` (the
                // interpreter's `irq_check`). The check reads IF before this `sti` sets it,
                // so it leaves only then, with IF and `effects` (IRQ_CHECK) as they are.
                self.irq_window()?;
                let stub = self.stub(k + 1, i.next_ip(), -1);
                self.a.jmp_unless_rcx_zero(stub);
                self.sys_flags(0, IF)?;
                // The next instruction (in the shadow if IF was clear: an exit before or in it
                // leaves SHADOW for the run loop), then the window after it,
                // [`Emitter::sti_window`] (after a `sti` that found IF set, a second look for
                // what another thread posted meanwhile).
                self.window = Some(k + 1);
            }
            Kind::Popf => {
                self.pop_to(k, ip);
                // New RFLAGS = (old & !mask) | (value & mask) | 2, and in rdx the IOPL bits
                // it changes; the host flags are overwritten below anyway.
                self.a.load(RCX, ctx(C_POPF));
                self.a.load(RDX, ctx(C_SFLAGS));
                self.a.bytes(&[
                    0x48, 0x21, 0xc8, // and rax, rcx
                    0x48, 0xf7, 0xd1, // not rcx
                    0x48, 0x21, 0xca, // and rdx, rcx
                    0x48, 0x09, 0xd0, // or rax, rdx
                    0x48, 0x83, 0xc8, 0x02, // or rax, 2
                ]);
                self.a.load(RDX, ctx(C_SFLAGS));
                self.a.bytes(&[
                    0x48, 0x31, 0xc2, // xor rdx, rax
                    0x81, 0xe2, 0x00, 0x30, 0x00, 0x00, // and edx, IOPL
                ]);
                self.a.store(ctx(C_SFLAGS), RAX);
                self.a.store(ctx(C_FLAGS), RAX);
                self.a.lea(RBP, at(RBP, 8));
                self.a.store(greg(4), RBP);
                self.a.store_imm(ctx(C_EFFECTS), IRQ_CHECK as i32);
                // The arithmetic flags into the host flags, as the trampoline does (rdx kept).
                super::flags_from_rax(&mut self.a);
                // A new IOPL makes the deny word and POPF's mask stale: back to the run loop,
                // as when IF is set now and an interrupt may be waiting (no shadow).
                let stub = self.stub(k + 1, i.next_ip(), -1);
                self.a.mov(RCX, RDX);
                self.a.jmp_unless_rcx_zero(stub);
                self.irq_window()?;
                self.a.jmp_unless_rcx_zero(stub);
                self.a.store_imm(ctx(C_EFFECTS), 0);
            }
            Kind::Iret => {
                // The frame into the context; `leave` checks and finishes it (or has the
                // interpreter run it). Nothing of the guest state changes here.
                self.a.load(RSI, greg(4));
                self.tlb(k, ip, 40, false);
                for q in 0..5 {
                    self.a.load(RCX, at(RSI, 8 * q));
                    self.a.store(ctx(C_FRAME + 8 * q), RCX);
                }
                self.a.store_imm(ctx(C_EFFECTS), IRET as i32);
                self.exit_to_run_loop(k, ip);
                return Ok(true);
            }
            Kind::Swapgs => {
                self.sys_allowed(k, ip, D_CPL0);
                self.a.load(RCX, ctx(C_GS));
                self.a.load(RDX, ctx(C_KGS));
                self.a.store(ctx(C_GS), RDX);
                self.a.store(ctx(C_KGS), RCX);
            }
            Kind::FsGsBase => {
                self.sys_allowed(k, ip, D_FSGS);
                let off = if matches!(i.mnemonic(), M::Rdfsbase | M::Wrfsbase) {
                    C_FS
                } else {
                    C_GS
                };
                let r = i.op0_register();
                let g = gpr_num(r).ok_or_else(|| EmitError("gpr".into()))?;
                let write = matches!(i.mnemonic(), M::Wrfsbase | M::Wrgsbase);
                let (reg, reg32) = if write {
                    (R8, Register::R8D)
                } else {
                    (RCX, Register::ECX)
                };
                if write {
                    self.a.load(R8, greg(g));
                } else {
                    self.a.load(RCX, ctx(off));
                }
                if r.size() == 4 {
                    self.ins(
                        Instruction::with2(Code::Mov_r32_rm32, reg32, reg32)
                            .map_err(EmitError::from),
                    )?;
                }
                if write {
                    self.check_canonical(R8, k, ip);
                    self.a.store(ctx(off), R8);
                } else {
                    self.a.store(greg(g), reg);
                }
            }
            Kind::PushMem => {
                self.address(i);
                self.tlb(k, ip, 8, false);
                self.a.load(R8, at(RSI, 0));
                self.push(k, ip, Src::R8);
            }
            Kind::Cmpxchg16b => {
                self.sys_allowed(k, ip, D_SMP);
                self.address(i);
                self.check_aligned(k, ip, 16);
                self.tlb(k, ip, 16, true);
                let a = &mut self.a;
                a.load(RAX, greg(0));
                a.load(RDX, greg(2));
                a.load(RCX, greg(1));
                a.mov(R8, RBX);
                a.load(RBX, at(R8, 24));
                a.bytes(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]); // lock cmpxchg16b [rsi]
                a.mov(RBX, R8);
                a.store(greg(0), RAX);
                a.store(greg(2), RDX);
            }
            _ => return Err(EmitError(format!("{kind:?} is not a system kind"))),
        }
        Ok(false)
    }
}

#[cfg(test)]
#[path = "sys_tests.rs"]
mod tests;
