//! Guest instructions to host machine code (x86-64 on x86-64).
//!
//! The emitter is iced-x86's `CodeAssembler` (already a dependency for decoding; its
//! `BlockEncoder` fixes up the branches inside a block). A hand-written emitter would be
//! faster per instruction, but the measured cost (docs/emu.md, "Translator") is small next to
//! how rarely a block is translated, so the crate's encoder is used.
//!
//! Most guest instructions are run *as themselves*: the decoded instruction is copied, its
//! guest registers replaced by host scratch registers that were loaded from the guest register
//! file, its memory operand replaced by `[rsi]` holding the host address the soft TLB gave, and
//! re-encoded. The host CPU then computes the result and every flag exactly as the guest CPU
//! would (it *is* an x86-64), undefined flags included.
//!
//! **Guest flags live in the host flags register** for the whole block: the prologue loads the
//! six arithmetic flags with `sahf` (and an `add` that sets OF), the epilogue saves them with
//! `pushfq`. Everything the emitter puts between guest instructions is flag-neutral (`mov`,
//! `lea`, `movzx`, `shrx`/`sarx`/`shlx`, `jrcxz`, `jmp`), so no per-instruction flag
//! bookkeeping is needed and flag-reading instructions (adc, sbb, jcc, cmovcc, setcc) just work.
//!
//! Host register use inside a block: `rbx` = guest register file (`[u64; 16]`), `r15` = the
//! context ([`super::Ctx`]), `r14` = its soft TLB, `r13` = 12 (page shift), `r12` = guest
//! instructions completed, `rbp` = a guest stack pointer being updated; `rsi` holds memory
//! addresses, `rcx`/`rdx`/`rdi` are TLB scratch, and guest operands are loaded into
//! `rax, rcx, rdx, rdi, r8..r11` (guest `rcx` always into host `rcx`, so `cl` shift counts
//! work).

use iced_x86::code_asm::*;
use iced_x86::{
    Code, Encoder, Instruction, InstructionInfoFactory, Mnemonic as M, OpAccess, OpKind, Register,
};

use super::{
    C_COUNT, C_EXIT, C_FLAGS, C_FS, C_GS, C_LOG, C_LOG_N, C_MISS_KIND, C_MISS_LIN, C_NBUDGET,
    C_RIP, C_TLB,
};
use crate::decode::canonical;

/// How a guest instruction is translated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Re-encoded with host registers / `[rsi]`.
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
        )
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

/// Guest GPR number (0 = rax .. 15 = r15) of a general register operand; `None` for anything
/// else, including the legacy high-byte registers (ah, ch, dh, bh), which are not translated.
fn gpr_num(r: Register) -> Option<usize> {
    if !r.is_gpr() || matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        return None;
    }
    let full = r.full_register();
    GPR64.iter().position(|&g| g == full)
}

fn gpr_of(r: Register) -> Option<usize> {
    GPR64.iter().position(|&g| g == r)
}

fn host_sized(h: usize, size: usize) -> Option<Register> {
    let row = HOST.get(h)?;
    match size {
        8 => Some(row[0]),
        4 => Some(row[1]),
        2 => Some(row[2]),
        1 => Some(row[3]),
        _ => None,
    }
}

fn asm64(r: Register) -> Option<AsmRegister64> {
    Some(match r {
        Register::RAX => rax,
        Register::RCX => rcx,
        Register::RDX => rdx,
        Register::RDI => rdi,
        Register::R8 => r8,
        Register::R9 => r9,
        Register::R10 => r10,
        Register::R11 => r11,
        _ => return None,
    })
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
    let m = i.mnemonic();
    let code = i.code();
    match code {
        Code::Push_r64 => return Some(Kind::Push),
        Code::Pushq_imm8 | Code::Pushq_imm32 => return Some(Kind::Push),
        Code::Pop_r64 => return Some(Kind::Pop),
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
        _ => {}
    }
    if i.is_jcc_short_or_near() {
        return canonical(i.near_branch64()).then_some(Kind::Jcc);
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
    if m == M::Imul && i.op_count() < 2 {
        return None;
    }
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
    // A register bit offset reaches outside the addressed operand.
    if mems == 1
        && matches!(m, M::Bt | M::Bts | M::Btr | M::Btc)
        && i.op1_kind() == OpKind::Register
    {
        return None;
    }
    Some(Kind::Generic)
}

/// Where an exit stub goes back to the run loop.
struct Stub {
    label: CodeLabel,
    /// Guest instructions completed before the exit.
    done: u32,
    ip: u64,
    /// 0: interpret the instruction at `ip`; 1/2: the same after a read/write TLB miss.
    miss: i32,
}

/// Per-translation scratch: the assembler, exit stubs, encoder for checks.
pub struct Emitter {
    a: CodeAssembler,
    stubs: Vec<Stub>,
    info: InstructionInfoFactory,
    enc: Encoder,
}

/// Why a block could not be emitted (an encoder error; never expected for checked forms).
#[derive(Debug)]
pub struct EmitError(pub String);

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

impl Emitter {
    pub fn new() -> Result<Emitter, IcedError> {
        Ok(Emitter {
            a: CodeAssembler::new(64)?,
            stubs: Vec::new(),
            info: InstructionInfoFactory::new(),
            enc: Encoder::new(64),
        })
    }

    /// Host code for the block `insns` (each with its [`Kind`]) starting at guest `rip`.
    /// The last instruction either ends the block (a branch) or the block falls through to the
    /// instruction after it. Returns the machine code, position independent.
    pub fn block(&mut self, rip: u64, insns: &[(Instruction, Kind)]) -> E<Vec<u8>> {
        self.a.reset();
        self.stubs.clear();
        let mut epi = self.a.create_label();
        let mut head = self.a.create_label();
        let a = &mut self.a;
        // Prologue.
        a.push(rbx)?;
        a.push(rbp)?;
        a.push(r12)?;
        a.push(r13)?;
        a.push(r14)?;
        a.push(r15)?;
        a.mov(rbx, rdi)?;
        a.mov(r15, rsi)?;
        a.lea(r14, qword_ptr(r15 + C_TLB))?;
        a.mov(r13d, 12)?;
        a.xor(r12d, r12d)?;
        // Guest arithmetic flags into the host flags: OF through a signed overflow, then the
        // other five from AH.
        a.mov(rax, qword_ptr(r15 + C_FLAGS))?;
        a.mov(ecx, eax)?;
        a.shr(ecx, 11)?;
        a.and(ecx, 1)?;
        a.add(cl, 0x7f)?;
        a.mov(ah, al)?;
        a.sahf()?;
        a.set_label(&mut head)?;
        let mut ended = false;
        for (k, (i, kind)) in insns.iter().enumerate() {
            let k = k as u32;
            match kind {
                Kind::Nop => {}
                Kind::Generic => self.generic(k, i)?,
                Kind::Push => {
                    let v = match i.code() {
                        Code::Push_r64 => Src::Reg(gpr_of(i.op0_register()).unwrap_or(0)),
                        _ => Src::Imm(i.immediate(0)),
                    };
                    self.push(k, i.ip(), v)?;
                }
                Kind::Pop => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.pop_to(k, i.ip(), 0)?;
                    self.a.lea(rbp, qword_ptr(rbp + 8))?;
                    self.a.mov(qword_ptr(rbx + 32), rbp)?;
                    self.a.mov(qword_ptr(rbx + 8 * g as i32), rax)?;
                }
                Kind::CallRel => {
                    self.push(k, i.ip(), Src::Imm(i.next_ip()))?;
                    self.exit_static(i.near_branch64(), k + 1, epi)?;
                    ended = true;
                }
                Kind::CallReg => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.a.mov(r8, qword_ptr(rbx + 8 * g as i32))?;
                    self.check_canonical(r8, k, i.ip())?;
                    self.push(k, i.ip(), Src::Imm(i.next_ip()))?;
                    self.a.mov(rax, r8)?;
                    self.exit_dynamic(k + 1, epi)?;
                    ended = true;
                }
                Kind::Ret => {
                    self.pop_to(k, i.ip(), 0)?;
                    self.check_canonical(rax, k, i.ip())?;
                    let extra = if i.code() == Code::Retnq_imm16 {
                        i32::from(i.immediate16())
                    } else {
                        0
                    };
                    self.a.lea(rbp, qword_ptr(rbp + 8 + extra))?;
                    self.a.mov(qword_ptr(rbx + 32), rbp)?;
                    self.exit_dynamic(k + 1, epi)?;
                    ended = true;
                }
                Kind::JmpRel => {
                    let t = i.near_branch64();
                    if t == rip {
                        self.back_edge(rip, k + 1, head, epi)?;
                    } else {
                        self.exit_static(t, k + 1, epi)?;
                    }
                    ended = true;
                }
                Kind::JmpReg => {
                    let g = gpr_of(i.op0_register()).unwrap_or(0);
                    self.a.mov(rax, qword_ptr(rbx + 8 * g as i32))?;
                    self.check_canonical(rax, k, i.ip())?;
                    self.exit_dynamic(k + 1, epi)?;
                    ended = true;
                }
                Kind::JmpMem => {
                    self.address(i)?;
                    self.tlb(k, i.ip(), 8, false)?;
                    self.a.mov(rax, qword_ptr(rsi))?;
                    self.check_canonical(rax, k, i.ip())?;
                    self.exit_dynamic(k + 1, epi)?;
                    ended = true;
                }
                Kind::Jcc => {
                    let mut taken = self.a.create_label();
                    self.jcc(i.condition_code(), taken)?;
                    self.exit_static(i.next_ip(), k + 1, epi)?;
                    self.a.set_label(&mut taken)?;
                    let t = i.near_branch64();
                    if t == rip {
                        self.back_edge(rip, k + 1, head, epi)?;
                    } else {
                        self.exit_static(t, k + 1, epi)?;
                    }
                    ended = true;
                }
            }
            if ended {
                break;
            }
        }
        if !ended {
            let next = insns.last().map_or(rip, |(i, _)| i.next_ip());
            self.exit_static(next, insns.len() as u32, epi)?;
        }
        // Exit stubs: state is exactly as before instruction `done`.
        let stubs = std::mem::take(&mut self.stubs);
        for mut s in stubs {
            let a = &mut self.a;
            a.set_label(&mut s.label)?;
            a.mov(qword_ptr(r15 + C_MISS_LIN), rsi)?;
            a.mov(qword_ptr(r15 + C_MISS_KIND), s.miss)?;
            a.mov(rax, s.ip)?;
            a.mov(qword_ptr(r15 + C_RIP), rax)?;
            a.lea(r12, qword_ptr(r12 + s.done as i32))?;
            a.mov(qword_ptr(r15 + C_EXIT), 1)?;
            a.jmp(epi)?;
        }
        let a = &mut self.a;
        a.set_label(&mut epi)?;
        a.mov(qword_ptr(r15 + C_COUNT), r12)?;
        a.pushfq()?;
        a.pop(rax)?;
        a.mov(qword_ptr(r15 + C_FLAGS), rax)?;
        a.pop(r15)?;
        a.pop(r14)?;
        a.pop(r13)?;
        a.pop(r12)?;
        a.pop(rbp)?;
        a.pop(rbx)?;
        a.ret()?;
        Ok(self.a.assemble(0)?)
    }

    fn jcc(&mut self, cc: iced_x86::ConditionCode, l: CodeLabel) -> E<()> {
        use iced_x86::ConditionCode as C;
        let a = &mut self.a;
        match cc {
            C::o => a.jo(l)?,
            C::no => a.jno(l)?,
            C::b => a.jb(l)?,
            C::ae => a.jae(l)?,
            C::e => a.je(l)?,
            C::ne => a.jne(l)?,
            C::be => a.jbe(l)?,
            C::a => a.ja(l)?,
            C::s => a.js(l)?,
            C::ns => a.jns(l)?,
            C::p => a.jp(l)?,
            C::np => a.jnp(l)?,
            C::l => a.jl(l)?,
            C::ge => a.jge(l)?,
            C::le => a.jle(l)?,
            C::g => a.jg(l)?,
            C::None => return Err(EmitError("jcc without a condition".into())),
        }
        Ok(())
    }

    fn stub(&mut self, done: u32, ip: u64, miss: i32) -> CodeLabel {
        let label = self.a.create_label();
        self.stubs.push(Stub {
            label,
            done,
            ip,
            miss,
        });
        label
    }

    /// Leaves with guest RIP = `target` after `done` instructions.
    fn exit_static(&mut self, target: u64, done: u32, epi: CodeLabel) -> E<()> {
        let a = &mut self.a;
        a.mov(rax, target)?;
        a.mov(qword_ptr(r15 + C_RIP), rax)?;
        a.lea(r12, qword_ptr(r12 + done as i32))?;
        a.mov(qword_ptr(r15 + C_EXIT), 0)?;
        Ok(a.jmp(epi)?)
    }

    /// Leaves with guest RIP = rax after `done` instructions.
    fn exit_dynamic(&mut self, done: u32, epi: CodeLabel) -> E<()> {
        let a = &mut self.a;
        a.mov(qword_ptr(r15 + C_RIP), rax)?;
        a.lea(r12, qword_ptr(r12 + done as i32))?;
        a.mov(qword_ptr(r15 + C_EXIT), 0)?;
        Ok(a.jmp(epi)?)
    }

    /// A branch back to the block's head: loop while the instruction budget lasts.
    fn back_edge(&mut self, rip: u64, done: u32, head: CodeLabel, epi: CodeLabel) -> E<()> {
        let mut out = self.a.create_label();
        let a = &mut self.a;
        a.lea(r12, qword_ptr(r12 + done as i32))?;
        // rcx = count - budget; its sign bit says whether budget is left.
        a.mov(rcx, qword_ptr(r15 + C_NBUDGET))?;
        a.lea(rcx, qword_ptr(rcx + r12))?;
        a.mov(edx, 63)?;
        a.shrx(rcx, rcx, rdx)?;
        a.jrcxz(out)?;
        a.jmp(head)?;
        a.set_label(&mut out)?;
        a.mov(rax, rip)?;
        a.mov(qword_ptr(r15 + C_RIP), rax)?;
        a.mov(qword_ptr(r15 + C_EXIT), 0)?;
        Ok(a.jmp(epi)?)
    }

    /// Interprets instruction `k` instead when `r` is not canonical (the #GP is raised by the
    /// interpreter with the state before the instruction).
    fn check_canonical(&mut self, r: AsmRegister64, k: u32, ip: u64) -> E<()> {
        let stub = self.stub(k, ip, 0);
        let mut ok = self.a.create_label();
        let a = &mut self.a;
        a.mov(edx, 47)?;
        a.sarx(rcx, r, rdx)?;
        a.lea(rcx, qword_ptr(rcx + 1))?;
        a.mov(edx, 1)?;
        a.shrx(rcx, rcx, rdx)?;
        a.jrcxz(ok)?;
        a.jmp(stub)?;
        a.set_label(&mut ok)?;
        Ok(())
    }

    /// rsi = guest linear address of `i`'s memory operand (with the FS/GS base).
    fn address(&mut self, i: &Instruction) -> E<()> {
        self.effective(i)?;
        let seg = match i.memory_segment() {
            Register::FS => Some(C_FS),
            Register::GS => Some(C_GS),
            _ => None,
        };
        if let Some(off) = seg {
            self.a.mov(rcx, qword_ptr(r15 + off))?;
            self.a.lea(rsi, qword_ptr(rsi + rcx))?;
        }
        Ok(())
    }

    /// rsi = effective address (offset) of `i`'s memory operand.
    fn effective(&mut self, i: &Instruction) -> E<()> {
        let a = &mut self.a;
        let b = i.memory_base();
        let x = gpr_of(i.memory_index());
        let disp = i.memory_displacement64();
        if b == Register::RIP || (b == Register::None && x.is_none()) {
            return Ok(a.mov(rsi, disp)?);
        }
        let disp = disp as i64 as i32;
        let scale = i.memory_index_scale();
        match (gpr_of(b), x) {
            (Some(b), Some(x)) => {
                a.mov(rsi, qword_ptr(rbx + 8 * b as i32))?;
                a.mov(rdi, qword_ptr(rbx + 8 * x as i32))?;
                Ok(a.lea(rsi, qword_ptr(rsi + rdi * scale + disp))?)
            }
            (Some(b), None) => {
                a.mov(rsi, qword_ptr(rbx + 8 * b as i32))?;
                Ok(a.lea(rsi, qword_ptr(rsi + disp))?)
            }
            (None, Some(x)) => {
                a.mov(rdi, qword_ptr(rbx + 8 * x as i32))?;
                Ok(a.lea(rsi, qword_ptr(rdi * scale + disp))?)
            }
            (None, None) => Ok(a.mov(rsi, disp as i64 as u64)?),
        }
    }

    /// Soft-TLB check of `size` bytes at guest linear rsi; on a hit rsi = host address (and a
    /// write is logged for the dirty bitmap), on a miss exit to interpret instruction `k`.
    fn tlb(&mut self, k: u32, ip: u64, size: usize, write: bool) -> E<()> {
        let stub = self.stub(k, ip, if write { 2 } else { 1 });
        let mut hit = self.a.create_label();
        let a = &mut self.a;
        a.lea(rdx, qword_ptr(rsi + (size as i32 - 1)))?;
        a.shrx(rdx, rdx, r13)?; // vpn of the last byte
        a.shrx(rcx, rsi, r13)?;
        a.movzx(ecx, cl)?; // index of the first byte's page
        a.lea(rcx, qword_ptr(rcx * 4))?;
        a.lea(rdi, qword_ptr(r14 + rcx * 8))?; // 32-byte entries
        a.mov(rcx, qword_ptr(rdi + if write { 8 } else { 0 }))?; // -vpn
        a.lea(rcx, qword_ptr(rcx + rdx))?;
        a.jrcxz(hit)?;
        a.jmp(stub)?;
        a.set_label(&mut hit)?;
        a.mov(rcx, qword_ptr(rdi + 16))?;
        a.lea(rsi, qword_ptr(rsi + rcx))?;
        if write {
            a.mov(rcx, qword_ptr(r15 + C_LOG_N))?;
            a.mov(rdx, qword_ptr(rdi + 24))?;
            a.mov(qword_ptr(r15 + rcx * 8 + C_LOG), rdx)?;
            a.lea(rcx, qword_ptr(rcx + 1))?;
            a.mov(qword_ptr(r15 + C_LOG_N), rcx)?;
        }
        Ok(())
    }

    /// Exits to interpret instruction `k` unless rsi is aligned to `size` (locked accesses:
    /// a split lock would be slow or trap on the host; the interpreter serializes them).
    fn check_aligned(&mut self, k: u32, ip: u64, size: usize) -> E<()> {
        if size <= 1 {
            return Ok(());
        }
        let stub = self.stub(k, ip, 0);
        let mut ok = self.a.create_label();
        let a = &mut self.a;
        a.mov(edx, 64 - size.trailing_zeros())?;
        a.shlx(rcx, rsi, rdx)?;
        a.jrcxz(ok)?;
        a.jmp(stub)?;
        a.set_label(&mut ok)?;
        Ok(())
    }

    /// Pushes `v` on the guest stack (guest rsp updated only after the store).
    fn push(&mut self, k: u32, ip: u64, v: Src) -> E<()> {
        self.a.mov(rsi, qword_ptr(rbx + 32))?;
        self.a.lea(rsi, qword_ptr(rsi - 8))?;
        self.a.mov(rbp, rsi)?;
        self.tlb(k, ip, 8, true)?;
        match v {
            Src::Reg(g) => self.a.mov(rax, qword_ptr(rbx + 8 * g as i32))?,
            Src::Imm(x) => self.a.mov(rax, x)?,
        }
        self.a.mov(qword_ptr(rsi), rax)?;
        Ok(self.a.mov(qword_ptr(rbx + 32), rbp)?)
    }

    /// rax = the qword at guest rsp + `off`, rbp = guest rsp (not yet updated).
    fn pop_to(&mut self, k: u32, ip: u64, off: i32) -> E<()> {
        self.a.mov(rsi, qword_ptr(rbx + 32))?;
        self.a.mov(rbp, rsi)?;
        if off != 0 {
            self.a.lea(rsi, qword_ptr(rsi + off))?;
        }
        self.tlb(k, ip, 8, false)?;
        Ok(self.a.mov(rax, qword_ptr(rsi))?)
    }

    /// An instruction re-encoded with host registers and `[rsi]`.
    fn generic(&mut self, k: u32, i: &Instruction) -> E<()> {
        let info = self.info.info(i);
        let mut written = [false; 16];
        let mut host_of = [usize::MAX; 16];
        let mut next = 0usize;
        let pool = [0usize, 2, 3, 4, 5, 6, 7];
        let mut out = *i;
        let mut mem_write = None;
        for n in 0..i.op_count() {
            match i.op_kind(n) {
                OpKind::Register => {
                    let r = i.op_register(n);
                    let Some(g) = gpr_num(r) else {
                        return Err(EmitError("not a translatable register".into()));
                    };
                    if host_of[g] == usize::MAX {
                        host_of[g] = if g == 1 {
                            1
                        } else {
                            let h = pool
                                .get(next)
                                .copied()
                                .ok_or_else(|| EmitError("too many registers".into()))?;
                            next += 1;
                            h
                        };
                    }
                    if matches!(
                        info.op_access(n),
                        OpAccess::Write
                            | OpAccess::ReadWrite
                            | OpAccess::CondWrite
                            | OpAccess::ReadCondWrite
                    ) {
                        written[g] = true;
                    }
                    let h = host_sized(host_of[g], r.size())
                        .ok_or_else(|| EmitError("register size".into()))?;
                    out.set_op_register(n, h);
                }
                OpKind::Memory => {
                    mem_write = Some(matches!(
                        info.op_access(n),
                        OpAccess::Write
                            | OpAccess::ReadWrite
                            | OpAccess::CondWrite
                            | OpAccess::ReadCondWrite
                    ));
                }
                _ => {}
            }
        }
        if let Some(write) = mem_write {
            out.set_memory_base(Register::RSI);
            out.set_memory_index(Register::None);
            out.set_memory_index_scale(1);
            out.set_memory_displacement64(0);
            out.set_memory_displ_size(0);
            out.set_segment_prefix(Register::None);
            if i.mnemonic() == M::Lea {
                self.effective(i)?;
            } else {
                self.address(i)?;
                let size = i.memory_size().size();
                if i.has_lock_prefix() || i.mnemonic() == M::Xchg {
                    self.check_aligned(k, i.ip(), size)?;
                }
                self.tlb(k, i.ip(), size, write)?;
            }
        }
        // The rewritten instruction encodes: `encodes` was checked when the block was chosen.
        for (g, &h) in host_of.iter().enumerate() {
            if h != usize::MAX
                && let Some(r) = HOST.get(h).and_then(|row| asm64(row[0]))
            {
                self.a.mov(r, qword_ptr(rbx + 8 * g as i32))?;
            }
        }
        self.a.add_instruction(out)?;
        for (g, &h) in host_of.iter().enumerate() {
            if h != usize::MAX
                && written[g]
                && let Some(r) = HOST.get(h).and_then(|row| asm64(row[0]))
            {
                self.a.mov(qword_ptr(rbx + 8 * g as i32), r)?;
            }
        }
        Ok(())
    }

    /// Whether the generic rewrite of `i` encodes (checked per instruction at translation, so
    /// one odd form ends the block instead of failing it).
    pub fn encodes(&mut self, i: &Instruction) -> bool {
        let mut out = *i;
        let mut next = 0usize;
        let pool = [0usize, 2, 3, 4, 5, 6, 7];
        let mut host_of = [usize::MAX; 16];
        for n in 0..i.op_count() {
            match i.op_kind(n) {
                OpKind::Register => {
                    let r = i.op_register(n);
                    let Some(g) = gpr_num(r) else { return false };
                    if host_of[g] == usize::MAX {
                        host_of[g] = if g == 1 {
                            1
                        } else {
                            let Some(&h) = pool.get(next) else {
                                return false;
                            };
                            next += 1;
                            h
                        };
                    }
                    let Some(h) = host_sized(host_of[g], r.size()) else {
                        return false;
                    };
                    out.set_op_register(n, h);
                }
                OpKind::Memory => {
                    out.set_memory_base(Register::RSI);
                    out.set_memory_index(Register::None);
                    out.set_memory_index_scale(1);
                    out.set_memory_displacement64(0);
                    out.set_memory_displ_size(0);
                    out.set_segment_prefix(Register::None);
                }
                _ => {}
            }
        }
        self.enc.encode(&out, 0).is_ok()
    }
}

enum Src {
    Reg(usize),
    Imm(u64),
}
