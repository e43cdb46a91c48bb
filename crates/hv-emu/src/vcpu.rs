//! The emu vCPU: the run loop (interrupt acceptance, HLT, INIT/SIPI, timers) and state
//! conversion, plus single-instruction emulation for other backends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hv::{CpuState, DeviceIo, GuestMemory, MpState, VcpuExit, msr};
use iced_x86::{Decoder, DecoderOptions};

use crate::cpu::{CS, Cpu, IF};
use crate::decode::BlockCache;
use crate::exec::{Exc, Exec, R};
use crate::lapic::{APIC_BASE_BSP, APIC_BASE_DEFAULT, APIC_BASE_ENABLE};
use crate::mmu::Ram;
use crate::system::Event;
use crate::vm::{VmShared, lock};

/// Instructions executed by all emu vCPUs of this process (for MIPS measurements).
pub static INSTRUCTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Instructions emu does not implement that guests of this process executed (each raised #UD
/// in the guest).
pub static UNSUPPORTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs of user-mode accelerator runners by all emu vCPUs of this process.
pub static USER_RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Instructions between checks of timers, the mailbox and kicks (a few microseconds; other
/// threads' interrupts and kicks end a batch at once through the exit-request word). As long
/// as a translated run may be ([`crate::jit::MAX_RUN`]), so that a batch is one entry into
/// translated code when the guest stays in it.
const BATCH: u32 = crate::jit::MAX_RUN as u32;

struct Kicker {
    shared: Arc<VmShared>,
    id: usize,
}

impl hv::VcpuKicker for Kicker {
    fn kick(&self) {
        if let Some(v) = self.shared.vcpus.get(self.id) {
            v.kick();
        }
    }
}

/// Placeholder device access for internal state updates that touch no device (and for tests).
pub(crate) struct NoIo;

impl DeviceIo for NoIo {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _port: u16, _data: &[u8]) {}
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

pub struct EmuVcpu {
    id: u32,
    cpu: Box<Cpu>,
    memory: Arc<GuestMemory>,
    shared: Arc<VmShared>,
    clock_epoch: u64,
    blocks: BlockCache,
    /// The translator, when the VM's engine is `Jit` (and its code cache could be mapped).
    jit: Option<Box<crate::jit::Jit>>,
    /// Runs user mode on hardware (see `EmuHypervisor::with_user_accelerator`).
    user: Option<Box<dyn hv::UserModeRunner>>,
    /// Written pages reported by `user`.
    written: Vec<u64>,
    /// `cpu.tlb.epoch` when the last user-mode run returned (after dropping the translations of
    /// the pages it wrote): a different epoch at the next hand-off means the guest flushed its
    /// TLB in between, which the runner is told (`UserModeRunner::set_tlb_flushed`).
    user_tlb_epoch: Option<u64>,
    /// Whether the next user-mode stretch runs in emu or goes to `user`.
    handoff: HandOff,
    /// Instructions executed (for MIPS measurements).
    pub instructions: u64,
}

/// User-mode stretches emu ran itself instead of handing them to the accelerator, and how many
/// of those outran the runner's `emulate_below` (and went to the accelerator after all).
pub static USER_STRETCHES_EMULATED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
pub static USER_STRETCHES_OUTRAN: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Batch size while emu runs a user stretch: the stretch's end (a kernel entry) is seen at
/// this granularity.
const PROBE_BATCH: u32 = 512;
/// After this many stretches in a row outran the budget, probing backs off to one user-mode
/// entry in `2^k` (at most `MAX_PROBE_SKIP + 1`): long stretches go straight to the accelerator.
const MAX_PROBE_SKIP: u32 = 63;
/// A run after a guest TLB flush also rebuilds KVM's shadow page tables (milliseconds, see
/// docs/kvm-platform.md "Costs measured"): such a stretch must run this many times the budget
/// in emu before it is worth handing over (4 M instructions for the KVM runner's 131 072).
const FLUSHED_BUDGET_FACTOR: u64 = 32;

/// Adaptive hand-off of user mode: emu runs each user stretch itself for up to `budget`
/// instructions (the runner's `emulate_below`: syscall- and page-fault-heavy code never pays
/// the runner's fixed cost per run), and hands it to the accelerator when it runs longer; after
/// long stretches in a row it stops probing for a while (compute phases go straight to the
/// accelerator). A budget of 0 hands every stretch over.
#[derive(Default)]
struct HandOff {
    budget: u64,
    /// User instructions of the stretch emu is running (`None`: not running one).
    stretch: Option<u64>,
    /// What the running stretch may reach before it goes to the accelerator: `budget`, or
    /// `budget * FLUSHED_BUDGET_FACTOR` when the next run would rebuild the shadow page tables.
    limit: u64,
    /// The stretch outran the budget: the next user entry goes to the accelerator.
    hand_now: bool,
    /// Stretches in a row that outran the budget.
    long_in_a_row: u32,
    /// User entries to hand straight to the accelerator before probing again.
    skip: u32,
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        if self.user.is_some() {
            tracing::debug!(
                "emu vCPU {}: user-mode runs handed over (all vCPUs) {}, user stretches emu \
                 ran itself {}, of which outran the budget {}",
                self.id,
                USER_RUNS.load(Ordering::Relaxed),
                USER_STRETCHES_EMULATED.load(Ordering::Relaxed),
                USER_STRETCHES_OUTRAN.load(Ordering::Relaxed)
            );
        }
    }
}

impl HandOff {
    /// `(stop at user mode, batch budget)` for the next batch.
    fn plan(&mut self, accel_ok: bool) -> (bool, u32) {
        if !accel_ok {
            self.stretch = None;
            self.hand_now = false;
            return (false, BATCH);
        }
        if self.stretch.is_some() {
            (false, PROBE_BATCH)
        } else {
            (true, BATCH)
        }
    }

    /// A batch of `n` instructions ended, at CPL 3 when `user`.
    fn after_batch(&mut self, n: u32, user: bool) {
        let Some(s) = self.stretch.as_mut() else {
            return;
        };
        if !user {
            // The stretch ended (a kernel entry) within the budget: emu was the cheaper place.
            self.stretch = None;
            self.long_in_a_row = 0;
            self.skip = 0;
            return;
        }
        *s += u64::from(n);
        if *s >= self.limit {
            USER_STRETCHES_OUTRAN.fetch_add(1, Ordering::Relaxed);
            self.stretch = None;
            self.hand_now = true;
            self.long_in_a_row = self.long_in_a_row.saturating_add(1);
            self.skip = (1u32 << self.long_in_a_row.min(6))
                .saturating_sub(1)
                .min(MAX_PROBE_SKIP);
        }
    }

    /// At a user-mode entry: true when emu runs this stretch itself (a probe), false when it
    /// goes to the accelerator. `flushed`: the guest flushed its TLB since the last run (a
    /// context switch, typically), so a run now would also rebuild KVM's shadow page tables;
    /// such a stretch is always probed, with the larger limit, since programs that switch
    /// often (a pipe between two processes) would otherwise pay that rebuild per switch.
    fn emulate_stretch(&mut self, flushed: bool) -> bool {
        if self.stretch.is_some() {
            return true;
        }
        if std::mem::take(&mut self.hand_now) {
            return false;
        }
        if self.budget == 0 {
            return false;
        }
        if flushed {
            self.limit = self.budget.saturating_mul(FLUSHED_BUDGET_FACTOR);
        } else if self.skip > 0 {
            self.skip -= 1;
            return false;
        } else {
            self.limit = self.budget;
        }
        USER_STRETCHES_EMULATED.fetch_add(1, Ordering::Relaxed);
        self.stretch = Some(0);
        true
    }
}

impl EmuVcpu {
    pub fn new(id: u32, memory: Arc<GuestMemory>, shared: Arc<VmShared>) -> EmuVcpu {
        let mut cpu = Box::new(Cpu::new(id));
        cpu.apic_base =
            APIC_BASE_DEFAULT | APIC_BASE_ENABLE | if id == 0 { APIC_BASE_BSP } else { 0 };
        cpu.msr.pat = 0x0007_0406_0007_0406;
        if id != 0 {
            cpu.mp_state = MpState::Uninitialized;
        }
        let clock_epoch = shared.clock_epoch.load(Ordering::Acquire);
        let jit = match shared.engine {
            crate::jit::Engine::Interp => None,
            crate::jit::Engine::Jit => {
                let bytes =
                    (crate::jit::CACHE_BYTES / shared.vcpu_count.max(1) as usize).max(1 << 20);
                match crate::jit::Jit::new(bytes) {
                    Ok(j) => Some(Box::new(j)),
                    Err(e) => {
                        hv::rate_limited!(tracing::warn!(
                            "emu: vCPU {id}: no translation cache ({e}); interpreting"
                        ));
                        None
                    }
                }
            }
        };
        EmuVcpu {
            id,
            cpu,
            memory,
            shared,
            clock_epoch,
            blocks: BlockCache::new(),
            jit,
            user: None,
            written: Vec::new(),
            user_tlb_epoch: None,
            handoff: HandOff::default(),
            instructions: 0,
        }
    }

    /// Gives this vCPU a user-mode runner (or takes it away).
    pub(crate) fn set_user_runner(&mut self, runner: Option<Box<dyn hv::UserModeRunner>>) {
        self.handoff = HandOff {
            budget: runner.as_ref().map_or(0, |r| r.emulate_below()),
            ..HandOff::default()
        };
        self.user = runner;
        self.user_tlb_epoch = None;
    }

    /// Runs `f` with an execution context over this vCPU.
    fn with_exec<T>(&mut self, io: &dyn DeviceIo, f: impl FnOnce(&mut Exec<'_>) -> T) -> T {
        let ram = Ram::new(&self.memory);
        let mut ex = Exec {
            cpu: &mut self.cpu,
            mem: &self.memory,
            ram: &ram,
            io,
            vm: &self.shared,
            lapic_enabled: true,
        };
        f(&mut ex)
    }

    fn merge_mailbox(&mut self) {
        self.with_exec(&NoIo, |ex| ex.merge_mailbox());
    }

    /// Sleeps until the mailbox has something, a kick arrives, or `deadline_ns` passes.
    fn wait(&self, deadline_ns: Option<u64>) {
        let me = &self.shared.vcpus[self.id as usize];
        let mut g = lock(&me.mailbox);
        loop {
            if me.pending.load(Ordering::Acquire) || me.kicked.load(Ordering::Acquire) {
                return;
            }
            let now = self.shared.clock.host_ns();
            let dur = match deadline_ns {
                Some(d) if d <= now => return,
                Some(d) => Duration::from_nanos((d - now).min(1_000_000_000)),
                None => Duration::from_secs(1),
            };
            g = match me.cond.wait_timeout(g, dur) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    fn run_inner(&mut self, io: &dyn DeviceIo) -> R<VcpuExit> {
        let me_idx = self.id as usize;
        let memory = self.memory.clone();
        let ram = Ram::new(&memory);
        loop {
            let me = &self.shared.vcpus[me_idx];
            if me.kicked.swap(false, Ordering::AcqRel) {
                return Ok(VcpuExit::Interrupted);
            }
            let mut ex = Exec {
                cpu: &mut self.cpu,
                mem: &self.memory,
                ram: &ram,
                io,
                vm: &self.shared,
                lapic_enabled: true,
            };
            if me.pending.load(Ordering::Acquire) {
                ex.merge_mailbox();
            }
            let epoch = ex.vm.clock_epoch.load(Ordering::Acquire);
            if epoch != self.clock_epoch {
                self.clock_epoch = epoch;
                ex.write_pvclock();
            }
            let now = ex.vm.clock.host_ns();
            if ex.cpu.lapic.poll_timer(now) {
                ex.cpu.irq_check = true;
            }
            match ex.cpu.mp_state {
                MpState::Uninitialized | MpState::InitReceived | MpState::SipiReceived => {
                    self.wait(None);
                    continue;
                }
                MpState::Halted => {
                    let wake = ex.cpu.nmi_pending
                        || (ex.cpu.rflags & IF != 0 && ex.cpu.lapic.deliverable().is_some());
                    if wake {
                        ex.cpu.mp_state = MpState::Runnable;
                    } else if ex.cpu.rflags & IF == 0 {
                        return Ok(VcpuExit::Halted);
                    } else {
                        let d = ex.cpu.lapic.deadline_ns;
                        self.wait(d);
                        continue;
                    }
                }
                MpState::Runnable => {}
            }
            let accel_ok = self.user.is_some() && ex.vm.clock.accel_allowed();
            let (accel, budget) = self.handoff.plan(accel_ok);
            let (n, at_user) = match self.jit.as_deref_mut() {
                Some(jit) => ex.run_batch_jit(jit, &mut self.blocks, budget, accel)?,
                None => ex.run_batch(&mut self.blocks, budget, accel)?,
            };
            let user_now = ex.cpu.cpl == 3;
            self.instructions += u64::from(n);
            INSTRUCTIONS.fetch_add(u64::from(n), Ordering::Relaxed);
            self.handoff.after_batch(n, user_now);
            let flushed = self.user_tlb_epoch != Some(ex.cpu.tlb.epoch);
            if at_user && !self.handoff.emulate_stretch(flushed) {
                self.run_user(io, &ram)?;
            }
        }
    }

    /// Hands the vCPU, at CPL 3 in 64-bit mode with nothing to deliver, to the user-mode
    /// runner, then performs what made it return: the `syscall`, the event (through the IDT,
    /// as if emu had raised it), or nothing (a kick, the timer deadline).
    fn run_user(&mut self, io: &dyn DeviceIo, ram: &Ram<'_>) -> R<()> {
        let Some(runner) = self.user.as_mut() else {
            return Ok(());
        };
        let me = &self.shared.vcpus[self.id as usize];
        let clock = &self.shared.clock;
        let now = clock.host_ns();
        if self.cpu.lapic.poll_timer(now) {
            // The timer fired since the batch started: deliver it before going to user mode.
            self.cpu.irq_check = true;
            return Ok(());
        }
        let tsc = self.cpu.tsc_at(clock, now);
        let mut st = self.cpu.to_state(&self.shared.model.msrs, tsc, now);
        let deadline = self.cpu.lapic.deadline_ns.map(|d| clock.instant_at(d));
        me.in_user.store(true, Ordering::SeqCst);
        if me.pending.load(Ordering::SeqCst) || me.kicked.load(Ordering::SeqCst) {
            me.in_user.store(false, Ordering::SeqCst);
            return Ok(());
        }
        self.written.clear();
        USER_RUNS.fetch_add(1, Ordering::Relaxed);
        // Every guest TLB flush (MOV to CR3, INVLPG, paging-mode changes, state loads) bumps
        // the epoch; so does nothing else between two runs (`flush_frames` below is taken into
        // the recorded epoch).
        runner.set_tlb_flushed(self.user_tlb_epoch != Some(self.cpu.tlb.epoch));
        let r = runner.run(&mut st, deadline, io, &mut self.written);
        me.in_user.store(false, Ordering::SeqCst);
        // User code wrote these pages: drop decoded blocks and translations that use them.
        for &pfn in &self.written {
            self.shared.code.on_write(pfn);
        }
        if !self.written.is_empty() {
            self.cpu.tlb.flush_frames(&self.written);
        }
        self.user_tlb_epoch = Some(self.cpu.tlb.epoch);
        let exit =
            r.map_err(|e| Exc::unhandled(format!("user-mode accelerator: {}", hv::Chain(&e))))?;
        self.cpu.apply_user_state(&st);
        let mut ex = Exec {
            cpu: &mut self.cpu,
            mem: &self.memory,
            ram,
            io,
            vm: &self.shared,
            lapic_enabled: true,
        };
        if let Some(t) = st.msr(msr::IA32_TSC) {
            ex.follow_tsc(t);
        }
        match exit {
            hv::UserExit::Syscall => match ex.syscall() {
                Ok(()) => Ok(()),
                Err(Exc::Fault(v, c)) => {
                    // #UD (EFER.SCE clear): the frame points at the syscall instruction.
                    ex.cpu.rip = st.regs.rip.wrapping_sub(2);
                    ex.raise_event(v, c, Event::Exception)
                }
                Err(e) => Err(e),
            },
            // CPUID faulting (`UserModeAccelerator::user_visible_extra` is empty): user-mode
            // `cpuid` comes back as #GP(0) at the instruction; answer it from the model here.
            hv::UserExit::Event {
                vector: 13,
                error_code: Some(0),
            } if matches!(ex.fetch(), Ok(i) if i.mnemonic() == iced_x86::Mnemonic::Cpuid) => {
                ex.step()
            }
            hv::UserExit::Event { vector, error_code } => {
                ex.raise_event(vector, error_code, Event::Exception)
            }
            hv::UserExit::Interrupted => Ok(()),
        }
    }
}

impl Exec<'_> {
    /// Merges interrupts other threads posted into this vCPU's local APIC / INIT-SIPI state.
    pub fn merge_mailbox(&mut self) {
        let Some(me) = self.vm.vcpus.get(self.cpu.id as usize) else {
            return;
        };
        let m = {
            let mut g = lock(&me.mailbox);
            me.pending.store(false, Ordering::Release);
            std::mem::take(&mut *g)
        };
        for w in 0..8 {
            let mut bits = m.irr[w];
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let v = (w as u32 * 32 + b) as u8;
                self.cpu.lapic.set_irr(v, m.tmr[w] & (1 << b) != 0);
            }
        }
        if m.nmi {
            self.cpu.nmi_pending = true;
        }
        if m.init {
            let apic_base = self.cpu.apic_base;
            let id = self.cpu.lapic.id();
            let pat = self.cpu.msr.pat;
            self.cpu.reset();
            self.cpu.apic_base = apic_base;
            self.cpu.msr.pat = pat;
            self.cpu.lapic.reset(id);
            self.cpu.mp_state = MpState::InitReceived;
        }
        if let Some(v) = m.sipi
            && self.cpu.mp_state == MpState::InitReceived
        {
            let seg = &mut self.cpu.seg[CS];
            seg.selector = u16::from(v) << 8;
            seg.base = u64::from(v) << 12;
            self.cpu.rip = 0;
            self.cpu.mp_state = MpState::Runnable;
        }
        self.cpu.irq_check = true;
    }

    /// Delivers a pending NMI or the highest deliverable APIC interrupt, if allowed now.
    pub fn try_inject(&mut self) -> R<()> {
        self.cpu.irq_check = false;
        if self
            .vm
            .vcpus
            .get(self.cpu.id as usize)
            .is_some_and(|v| v.pending.load(Ordering::Acquire))
        {
            self.merge_mailbox();
            self.cpu.irq_check = false;
        }
        if self.cpu.shadow != 0 {
            self.cpu.irq_check = true;
            return Ok(());
        }
        if self.cpu.nmi_pending && !self.cpu.nmi_masked {
            self.cpu.nmi_pending = false;
            self.cpu.nmi_masked = true;
            self.cpu.mp_state = MpState::Runnable;
            return self.raise_event(2, None, Event::External);
        }
        if self.cpu.rflags & IF != 0
            && let Some(v) = self.cpu.lapic.deliverable()
        {
            self.cpu.lapic.ack(v);
            self.cpu.mp_state = MpState::Runnable;
            self.raise_event(v, None, Event::External)?;
        }
        Ok(())
    }

    /// Runs up to about `budget` instructions from the block cache, delivering interrupts at
    /// block boundaries and the exceptions instructions raise. Returns the number executed.
    ///
    /// With `stop_at_user`, returns `(n, true)` as soon as the vCPU is at CPL 3 in 64-bit mode
    /// with no interrupt deliverable, to hand it to the user-mode runner.
    pub fn run_batch(
        &mut self,
        cache: &mut BlockCache,
        budget: u32,
        stop_at_user: bool,
    ) -> R<(u32, bool)> {
        let mut n = 0u32;
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
            let slot = match self.lookup_block(cache) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    self.step()?;
                    n += 1;
                    if self.cpu.mp_state != MpState::Runnable {
                        break;
                    }
                    continue;
                }
                Err(Exc::Fault(v, c)) => {
                    self.cpu.shadow = 0;
                    self.raise_event(v, c, Event::Exception)?;
                    n += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.cpu.code_written = false;
            // Only a block's last instruction can set an interrupt shadow (STI, MOV SS, POP SS
            // end blocks), so clearing it here is clearing it before each instruction.
            self.cpu.shadow = 0;
            let block = cache.block(slot);
            'block: loop {
                for op in &block.ops {
                    // Handlers find their own address in `op.insn.ip()` (the RIP it was decoded
                    // at); RIP already points past the instruction.
                    self.cpu.rip = op.insn.next_ip() & block.ip_mask;
                    n += 1;
                    if let Err(e) = (op.handler)(self, &op.insn) {
                        self.fail(&op.insn, e)?;
                        break 'block;
                    }
                    if self.cpu.rip != op.follow || self.cpu.irq_check || self.cpu.code_written {
                        // A near branch back to the start of this block runs it again
                        // without a lookup: nothing in the block can have changed the
                        // translation, the mode or the code.
                        if self.cpu.rip == block.rip
                            && (op.insn.is_jcc_short_or_near()
                                || op.insn.is_jmp_short_or_near()
                                || op.insn.is_loop()
                                || op.insn.is_loopcc())
                            && !self.cpu.irq_check
                            && !self.cpu.code_written
                            && n < budget
                        {
                            continue 'block;
                        }
                        break 'block;
                    }
                }
                break;
            }
            if self.cpu.mp_state != MpState::Runnable {
                break;
            }
        }
        Ok((n, false))
    }

    /// Executes one instruction (uncached), delivering the exception it raises.
    pub fn step(&mut self) -> R<()> {
        self.cpu.shadow = 0;
        let insn = match self.fetch() {
            Ok(i) => i,
            Err(Exc::Fault(v, c)) => return self.raise_event(v, c, Event::Exception),
            Err(e) => return Err(e),
        };
        self.cpu.rip = insn.next_ip() & self.ip_mask();
        match self.exec(&insn) {
            Ok(()) => Ok(()),
            Err(e) => self.fail(&insn, e),
        }
    }

    /// Instruction `insn` failed: restore RIP and deliver the fault.
    ///
    /// An instruction emu does not implement (`Exc::Unhandled`) never ends the VM: it raises
    /// #UD in the guest, as on a CPU without it (a user process gets SIGILL), with one
    /// rate-limited log line and a count in [`UNSUPPORTED`]. Only `emulate_one`
    /// (`deliver_exceptions` off) returns it as an error, so the KVM backend, whose CPU may
    /// well have the instruction, does not inject a #UD the hardware would not raise.
    pub(crate) fn fail(&mut self, insn: &iced_x86::Instruction, e: Exc) -> R<()> {
        let rip = insn.ip();
        self.cpu.rip = rip;
        match e {
            Exc::Fault(v, c) => self.raise_event(v, c, Event::Exception),
            Exc::Unhandled(detail) => {
                let mnemonic = format!("{:?}", insn.mnemonic());
                let what = if *detail == mnemonic {
                    mnemonic
                } else {
                    format!("{mnemonic}: {detail}")
                };
                let msg = format!(
                    "unsupported instruction {} at rip {rip:#x} ({what})",
                    self.insn_hex(rip, insn.len())
                );
                if !self.cpu.deliver_exceptions {
                    return Err(Exc::unhandled(msg));
                }
                UNSUPPORTED.fetch_add(1, Ordering::Relaxed);
                hv::rate_limited!(tracing::warn!("emu: vCPU {}: {msg}: #UD", self.cpu.id));
                self.raise_event(6, None, Event::Exception)
            }
            e => Err(e),
        }
    }

    fn insn_hex(&mut self, rip: u64, len: usize) -> String {
        let lin = self.code_lin(rip);
        let mut s = String::new();
        for k in 0..len.min(15) {
            match self.read_lin_as(lin.wrapping_add(k as u64), 1, false) {
                Ok(b) => s.push_str(&format!("{b:02x}")),
                Err(_) => break,
            }
        }
        s
    }
}

fn to_hv(e: Exc) -> hv::Error {
    match e {
        Exc::Unhandled(m) => hv::Error::Unhandled(*m),
        Exc::Fault(v, c) => hv::Error::Unhandled(format!("unhandled exception {v} ({c:?})")),
        Exc::Shutdown => hv::Error::Unhandled("triple fault".into()),
    }
}

impl hv::Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self, io: &dyn DeviceIo) -> hv::Result<VcpuExit> {
        self.shared.clock.enter_run();
        let r = match self.run_inner(io) {
            Ok(x) => Ok(x),
            Err(Exc::Shutdown) => Ok(VcpuExit::Shutdown),
            Err(e) => Err(to_hv(e)),
        };
        self.shared.clock.leave_run();
        r
    }

    fn kicker(&self) -> Arc<dyn hv::VcpuKicker> {
        Arc::new(Kicker {
            shared: self.shared.clone(),
            id: self.id as usize,
        })
    }

    fn state(&mut self) -> hv::Result<CpuState> {
        if self.shared.vcpus[self.id as usize]
            .pending
            .load(Ordering::Acquire)
        {
            self.merge_mailbox();
        }
        let clock = &self.shared.clock;
        let now = clock.state_ns();
        let tsc = clock
            .raw_tsc_at_state(now)
            .wrapping_add(self.cpu.msr.tsc_offset)
            .max(self.cpu.msr.tsc_floor);
        Ok(self.cpu.to_state(&self.shared.model.msrs, tsc, now))
    }

    fn set_state(&mut self, s: &CpuState) -> hv::Result<()> {
        s.validate().map_err(hv::Error::InvalidState)?;
        if s.xcr0 & !crate::avx::xcr0_supported(&self.shared.model) != 0 {
            return Err(hv::Error::InvalidState(format!(
                "XCR0 {:#x} enables state this CPU model does not have",
                s.xcr0
            )));
        }
        let now = self.shared.clock.state_ns();
        self.cpu.load_state(s);
        self.cpu.lapic.load_state(&s.lapic, now);
        if let Some(t) = s.msr(msr::IA32_TSC)
            && self.shared.clock.fixed_tsc()
            && !self.shared.clock.takes_host_tsc(t)
        {
            // A VM that moved here from another backend or host keeps its own TSC; user mode on
            // the accelerator would read the host's (it cannot be offset), so this VM's user
            // code runs in emu from now on (docs/cpu-model.md, "Time across moves"). A fresh
            // boot's TSC 0 is not a move: it takes the host TSC (`Clock::takes_host_tsc`).
            self.shared.clock.leave_host_tsc();
            hv::rate_limited!(tracing::info!(
                "vCPU {}: restored TSC differs from this host's; user mode runs in emu for this VM",
                self.id
            ));
        }
        if let Some(t) = s.msr(msr::IA32_TSC)
            && !self.shared.clock.fixed_tsc()
        {
            self.cpu.msr.tsc_offset = t.wrapping_sub(self.shared.clock.raw_tsc_at_state(now));
            self.cpu.msr.tsc_floor = 0;
        }
        self.blocks.clear();
        if let Some(j) = self.jit.as_deref_mut() {
            j.clear();
        }
        self.with_exec(&NoIo, |ex| Self::load_rest(ex, s))
    }
}

impl EmuVcpu {
    /// The part of `set_state` that runs on the execution context.
    fn load_rest(ex: &mut Exec<'_>, s: &CpuState) -> hv::Result<()> {
        if let Some(d) = s.msr(msr::IA32_TSC_DEADLINE) {
            ex.set_tsc_deadline(d);
        }
        ex.cpu
            .lapic
            .set_tpr((s.sregs.cr8 as u32 & 0xf) << 4 | (ex.cpu.lapic.tpr() & 0xf));
        ex.publish_routing();
        ex.write_pvclock();
        if let Some(e) = s.events.exception {
            ex.raise_event(e.vector, e.error_code, Event::Exception)
                .map_err(to_hv)?;
        }
        if let Some(i) = s.events.interrupt {
            let kind = if i.soft {
                Event::Software
            } else {
                Event::External
            };
            ex.raise_event(i.vector, None, kind).map_err(to_hv)?;
        }
        Ok(())
    }
}

/// `hv::InstructionEmulator::emulate_one`: one instruction on a neutral state, exceptions
/// reported in `state.events` instead of delivered.
pub fn emulate_one(
    shared: &VmShared,
    state: &mut CpuState,
    memory: &GuestMemory,
    io: &dyn DeviceIo,
) -> hv::Result<()> {
    let mut cpu = Box::new(Cpu::new(0));
    cpu.load_state(state);
    cpu.deliver_exceptions = false;
    let ram = Ram::new(memory);
    let mut ex = Exec {
        cpu: &mut cpu,
        mem: memory,
        ram: &ram,
        io,
        vm: shared,
        lapic_enabled: false,
    };
    ex.step().map_err(to_hv)?;
    let reported = cpu.reported.take();
    let new = cpu.to_state(&[], 0, 0);
    state.regs = new.regs;
    let (cr8, apic_base) = (state.sregs.cr8, state.sregs.apic_base);
    state.sregs = new.sregs;
    state.sregs.cr8 = cr8;
    state.sregs.apic_base = apic_base;
    state.debug = new.debug;
    state.fpu = new.fpu;
    state.xcr0 = new.xcr0;
    if !new.xsave_ext.is_empty() || state.xcr0 & !3 == 0 {
        state.xsave_ext = new.xsave_ext;
    }
    for m in state.msrs.iter_mut() {
        if m.index != msr::IA32_TSC
            && m.index != msr::IA32_TSC_DEADLINE
            && let Some(v) = cpu.msr_value(m.index)
        {
            m.value = v;
        }
    }
    state.events.interrupt_shadow = cpu.shadow & 3;
    state.events.nmi_masked = cpu.nmi_masked;
    if cpu.mp_state == MpState::Halted {
        state.mp_state = MpState::Halted;
    }
    if let Some((vector, error_code)) = reported {
        state.events.exception = Some(hv::PendingException {
            vector,
            error_code,
            injected: false,
        });
    }
    Ok(())
}

/// Decodes one instruction for diagnostics (used by tests and the boot example).
pub fn disassemble(bytes: &[u8], bitness: u32, rip: u64) -> String {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    format!("{:?}", d.decode().mnemonic())
}

#[cfg(test)]
mod tests {
    use super::HandOff;

    /// Runs user batches of `n` instructions until the stretch is handed over or ends;
    /// returns the user instructions emu ran itself before handing over (None: never).
    fn hand_over_after(h: &mut HandOff, flushed: bool, n: u32, max: u64) -> Option<u64> {
        if !h.emulate_stretch(flushed) {
            return Some(0);
        }
        let mut ran = 0;
        while ran < max {
            h.after_batch(n, true);
            ran += u64::from(n);
            if !h.emulate_stretch(flushed) {
                return Some(ran);
            }
        }
        None
    }

    #[test]
    fn a_stretch_after_a_tlb_flush_runs_longer_in_emu_before_it_is_handed_over() {
        let mut h = HandOff {
            budget: 32_768,
            ..HandOff::default()
        };
        // Without a flush, a stretch goes over at the budget.
        assert_eq!(hand_over_after(&mut h, false, 512, 1 << 24), Some(32_768));
        // After a flush (the next run rebuilds KVM's shadow pages), at 32 times the budget.
        assert_eq!(
            hand_over_after(&mut h, true, 512, 1 << 24),
            Some(32_768 * 32)
        );
    }

    #[test]
    fn after_a_flush_a_stretch_is_probed_even_while_long_stretches_skip_probing() {
        let mut h = HandOff {
            budget: 1_000,
            ..HandOff::default()
        };
        for _ in 0..4 {
            // Long stretches in a row: probing backs off.
            let _ = hand_over_after(&mut h, false, 500, 1 << 20);
        }
        assert!(h.skip > 0);
        assert!(
            !h.emulate_stretch(false),
            "skipped: straight to the accelerator"
        );
        assert!(h.emulate_stretch(true), "after a flush: probed in emu");
        // It ended in the kernel within the larger limit: emu was the cheaper place.
        h.after_batch(5_000, false);
        assert!(h.stretch.is_none());
    }
}
