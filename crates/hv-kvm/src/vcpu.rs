//! A KVM vCPU: the run loop, kicks, and the neutral state.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use hv::{CpuState, DeviceIo, FpuState, GuestMemory, Msr, VcpuExit, VcpuKicker};
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use crate::convert::{Kvm, XSAVE_EXT_START, XSAVE_HEADER};
use crate::vm::{MIRRORED_MSRS, VmShared};
use crate::{backend_err, walk};

const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LMA: u64 = 1 << 10;
const XSAVE_AREA: usize = 4096;

/// The kvm_run page of one vCPU (or user-mode runner), shared with its kicker.
#[derive(Clone, Copy)]
pub(crate) struct RunPtr(pub(crate) *mut kvm_run);

// SAFETY: the pointer is only dereferenced to reach `immediate_exit`, a byte KVM expects to be
// written by any thread at any time; kickers only do so while the owning vCPU (and so the
// mapping) is alive, which `Kick::inner` (and the runner's `Ctl::inner.run`) guards.
unsafe impl Send for RunPtr {}
// SAFETY: as above; all access goes through an atomic byte store.
unsafe impl Sync for RunPtr {}

impl RunPtr {
    pub(crate) fn set_immediate_exit(self, v: u8) {
        // SAFETY: the mapping is alive (see `RunPtr`); `immediate_exit` is a plain byte in it,
        // accessed only atomically by this crate.
        let byte = unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.0).immediate_exit)) };
        byte.store(v, Ordering::SeqCst);
    }

    /// `(size, count)` of the current KVM_EXIT_IO.
    pub(crate) fn io_size(self) -> usize {
        // SAFETY: called only while handling KVM_EXIT_IO, when `io` is the active union member;
        // a raw read of two bytes that are disjoint from the data area the exit's slice covers.
        let size =
            unsafe { std::ptr::addr_of!((*self.0).__bindgen_anon_1.io.size).read_volatile() };
        usize::from(size).max(1)
    }

    fn internal_suberror(self) -> u32 {
        // SAFETY: called only after KVM_EXIT_INTERNAL_ERROR, when `internal` is the active union
        // member; a raw read of one u32.
        unsafe { std::ptr::addr_of!((*self.0).__bindgen_anon_1.internal.suberror).read_volatile() }
    }
}

/// Serves a port or MMIO exit on `io` and returns `None`; any other exit comes back as it is.
/// Shared by the vCPU run loop and the user-mode runner (`user_accel`).
pub(crate) fn serve_io<'a>(
    exit: KvmExit<'a>,
    io: &dyn DeviceIo,
    run: RunPtr,
) -> Option<KvmExit<'a>> {
    match exit {
        // `rep outs`/`rep ins` deliver `count` elements of `size` bytes in one exit.
        KvmExit::IoOut(port, data) => {
            for chunk in data.chunks(run.io_size()) {
                io.pio_write(port, chunk);
            }
        }
        KvmExit::IoIn(port, data) => {
            for chunk in data.chunks_mut(run.io_size()) {
                io.pio_read(port, chunk);
            }
        }
        KvmExit::MmioRead(addr, data) => io.mmio_read(addr, data),
        KvmExit::MmioWrite(addr, data) => io.mmio_write(addr, data),
        other => return Some(other),
    }
    None
}

struct KickInner {
    /// `None` once the vCPU is gone.
    run: Option<RunPtr>,
    /// The thread inside `run`, if any.
    thread: Option<libc::pthread_t>,
    pending: bool,
}

struct Kick {
    inner: Mutex<KickInner>,
}

impl Kick {
    fn lock(&self) -> MutexGuard<'_, KickInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Kicker(Arc<Kick>);

impl VcpuKicker for Kicker {
    fn kick(&self) {
        let mut k = self.0.lock();
        let Some(run) = k.run else {
            return;
        };
        k.pending = true;
        run.set_immediate_exit(1);
        if let Some(thread) = k.thread {
            // SAFETY: `thread` is set only while that thread is inside `KvmVcpu::run`, which
            // clears it under this lock before returning, so the thread is alive. The signal's
            // handler does nothing; it only makes KVM_RUN return EINTR.
            unsafe {
                libc::pthread_kill(thread, kick_signal());
            }
        }
    }
}

pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler once per process. SA_RESTART keeps the signal from
/// failing the blocking calls devices make from the vCPU thread; KVM_RUN returns EINTR anyway.
pub(crate) fn install_kick_handler() -> hv::Result<()> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
        // async-signal-safe function that does nothing; RESULT is written only here, inside
        // `call_once`.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick_signal as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            RESULT = libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
        }
    });
    // SAFETY: RESULT is only written inside `call_once`, which has completed.
    let r = unsafe { RESULT };
    if r != 0 {
        return Err(hv::Error::Backend {
            op: "sigaction",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Splits the model's MSRs into those KVM reads back and those it refuses. MSRs mirrored by the
/// special registers are handled there and belong to neither list.
pub(crate) fn probe_msrs(fd: &VcpuFd, model: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for &m in model {
        if MIRRORED_MSRS.contains(&m) {
            continue;
        }
        let entry = kvm_msr_entry {
            index: m,
            ..Default::default()
        };
        let read = Msrs::from_entries(&[entry])
            .ok()
            .and_then(|mut msrs| fd.get_msrs(&mut msrs).ok());
        if read == Some(1) {
            ok.push(m);
        } else {
            refused.push(m);
        }
    }
    (ok, refused)
}

/// A vCPU of a [`crate::KvmVm`].
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    shared: Arc<VmShared>,
    run: RunPtr,
    kick: Arc<Kick>,
}

/// Clears the running thread when `run` returns, however it returns.
struct RunningGuard<'a>(&'a Kick);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().thread = None;
    }
}

enum Next {
    Continue,
    Return(VcpuExit),
    Interrupted,
    CompleteInstruction,
}

impl KvmVcpu {
    pub(crate) fn new(id: u32, mut fd: VcpuFd, shared: Arc<VmShared>) -> hv::Result<KvmVcpu> {
        install_kick_handler()?;
        let run = RunPtr(fd.get_kvm_run() as *mut kvm_run);
        Ok(KvmVcpu {
            id,
            fd,
            shared,
            run,
            kick: Arc::new(Kick {
                inner: Mutex::new(KickInner {
                    run: Some(run),
                    thread: None,
                    pending: false,
                }),
            }),
        })
    }

    /// Takes a kick if one is pending. An EINTR without a kick (some other signal) is not one.
    fn take_kick(&self) -> bool {
        let mut k = self.kick.lock();
        if k.pending {
            k.pending = false;
            self.run.set_immediate_exit(0);
            true
        } else {
            false
        }
    }

    fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    /// End of the standard-format XSAVE image for the components `xcr0` enables, from CPUID
    /// leaf 0xD (the model's, else what KVM supports).
    fn xsave_end(&self, xcr0: u64) -> usize {
        let mut end = XSAVE_EXT_START;
        for bit in 2..63u32 {
            if xcr0 & (1 << bit) == 0 {
                continue;
            }
            let leaf = self.shared.model.lookup(0xd, bit).copied().or_else(|| {
                self.shared
                    .host
                    .supported_cpuid
                    .iter()
                    .find(|e| e.function == 0xd && e.index == bit)
                    .map(crate::cpuid::entry_from_kvm)
            });
            if let Some(l) = leaf {
                end = end.max(l.ebx as usize + l.eax as usize);
            }
        }
        end.min(XSAVE_AREA)
    }

    fn get_fpu_and_xsave(&self, xcr0: u64) -> hv::Result<(FpuState, Vec<u8>)> {
        if !self.shared.host.has_xsave {
            let f = self.fd.get_fpu().map_err(backend_err("KVM_GET_FPU"))?;
            return Ok((FpuState::from(Kvm(f)), Vec::new()));
        }
        let x = self.fd.get_xsave().map_err(backend_err("KVM_GET_XSAVE"))?;
        let bytes: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut legacy = [0u8; 512];
        legacy.copy_from_slice(&bytes[..512]);
        let fpu = FpuState::from_fxsave(&legacy);
        if xcr0 & !3 == 0 {
            return Ok((fpu, Vec::new()));
        }
        let mut ext = bytes[XSAVE_HEADER..self.xsave_end(xcr0)].to_vec();
        // x87/SSE live in `fpu`; their XSTATE_BV bits are implied (set again on restore).
        ext[0] &= !3;
        Ok((fpu, ext))
    }

    fn set_fpu_and_xsave(&self, fpu: &FpuState, ext: &[u8]) -> hv::Result<()> {
        if !self.shared.host.has_xsave {
            if !ext.is_empty() {
                return Err(hv::Error::Incompatible(
                    "extended XSAVE state but KVM has no XSAVE support".into(),
                ));
            }
            return self
                .fd
                .set_fpu(&Kvm::<kvm_fpu>::from(fpu).0)
                .map_err(backend_err("KVM_SET_FPU"));
        }
        if XSAVE_HEADER + ext.len() > XSAVE_AREA {
            return Err(hv::Error::InvalidState(format!(
                "extended XSAVE state of {} bytes does not fit the {XSAVE_AREA}-byte area",
                ext.len()
            )));
        }
        let mut bytes = [0u8; XSAVE_AREA];
        bytes[..512].copy_from_slice(&fpu.to_fxsave());
        bytes[XSAVE_HEADER..XSAVE_HEADER + ext.len()].copy_from_slice(ext);
        bytes[XSAVE_HEADER] |= 3;
        // XCOMP_BV must be 0 (standard format).
        bytes[XSAVE_HEADER + 8..XSAVE_HEADER + 16].fill(0);
        let mut x = kvm_xsave::default();
        for (w, b) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        // SAFETY: `x` is a complete kvm_xsave of the legacy 4096-byte size, which is what
        // KVM_SET_XSAVE reads (no components beyond 4 KiB are enabled for this VM).
        unsafe { self.fd.set_xsave(&x) }.map_err(backend_err("KVM_SET_XSAVE"))
    }

    fn get_xcr0(&self) -> hv::Result<u64> {
        if !self.shared.host.has_xcrs {
            return Ok(0);
        }
        let x = self.fd.get_xcrs().map_err(backend_err("KVM_GET_XCRS"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Ok(x.xcrs[..n]
            .iter()
            .find(|c| c.xcr == 0)
            .map_or(0, |c| c.value))
    }

    fn set_xcr0(&self, xcr0: u64) -> hv::Result<()> {
        if !self.shared.host.has_xcrs {
            return if xcr0 & !3 == 0 {
                Ok(())
            } else {
                Err(hv::Error::Incompatible(
                    "XCR0 set but KVM has no XCRS support".into(),
                ))
            };
        }
        let set = |v: u64| {
            let mut x = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            x.xcrs[0].xcr = 0;
            x.xcrs[0].value = v;
            self.fd.set_xcrs(&x)
        };
        // XCR0 bit 0 (x87) is architecturally always set; "0" means the guest never wrote it.
        match set(xcr0 | 1) {
            Ok(()) => Ok(()),
            // x87|SSE without XSAVE in the model: KVM only accepts its reset value.
            Err(_) if xcr0 & !3 == 0 => set(1).map_err(backend_err("KVM_SET_XCRS")),
            Err(e) => Err(backend_err("KVM_SET_XCRS")(e)),
        }
    }

    fn get_msrs(&self, sregs: &hv::SpecialRegisters) -> hv::Result<Vec<Msr>> {
        let list = self.shared.msrs.get().cloned().unwrap_or_default();
        let mut out = Vec::with_capacity(list.len() + MIRRORED_MSRS.len());
        if !list.is_empty() {
            let entries: Vec<kvm_msr_entry> = list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| hv::Error::InvalidState("too many MSRs".into()))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(backend_err("KVM_GET_MSRS"))?;
            if n != entries.len() {
                return Err(hv::Error::Incompatible(format!(
                    "KVM refused to read MSR {:#x}",
                    entries[n.min(entries.len() - 1)].index
                )));
            }
            out.extend(msrs.as_slice().iter().map(|e| Msr {
                index: e.index,
                value: e.data,
            }));
        }
        for &m in MIRRORED_MSRS {
            if !self.shared.model.msrs.contains(&m) {
                continue;
            }
            let value = match m {
                hv::state::msr::IA32_APIC_BASE => sregs.apic_base,
                hv::state::msr::IA32_EFER => sregs.efer,
                hv::state::msr::IA32_FS_BASE => sregs.fs.base,
                _ => sregs.gs.base,
            };
            out.push(Msr { index: m, value });
        }
        out.sort_by_key(|m| m.index);
        Ok(out)
    }

    fn set_msrs(&self, msrs: &[Msr], before: Option<&[Msr]>) -> hv::Result<()> {
        let list = self.shared.msrs.get().cloned().unwrap_or_default();
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .filter(|m| list.contains(&m.index))
            .filter(|m| before.is_none_or(|b| !b.contains(m)))
            // Writing the wall-clock MSR makes KVM write the structure at that address; 0 is
            // "never set" and must not scribble on guest page 0.
            .filter(|m| !(m.index == hv::state::msr::KVM_WALL_CLOCK_NEW && m.value == 0))
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        crate::set_msrs(&self.fd, &entries)
    }

    fn read_state(&self) -> hv::Result<CpuState> {
        let regs = self.fd.get_regs().map_err(backend_err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(backend_err("KVM_GET_SREGS"))?;
        let sregs = hv::SpecialRegisters::from(Kvm(sregs));
        let debug = self
            .fd
            .get_debug_regs()
            .map_err(backend_err("KVM_GET_DEBUGREGS"))?;
        let mut xcr0 = self.get_xcr0()?;
        let (fpu, xsave_ext) = self.get_fpu_and_xsave(xcr0)?;
        if sregs.cr4 & CR4_OSXSAVE == 0 && xcr0 == 1 {
            xcr0 = 0; // KVM's reset value: the guest has not enabled XSAVE
        }
        let msrs = self.get_msrs(&sregs)?;
        let lapic = self.fd.get_lapic().map_err(backend_err("KVM_GET_LAPIC"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(backend_err("KVM_GET_VCPU_EVENTS"))?;
        let mp = self
            .fd
            .get_mp_state()
            .map_err(backend_err("KVM_GET_MP_STATE"))?;
        Ok(CpuState {
            regs: Kvm(regs).into(),
            sregs,
            debug: Kvm(debug).into(),
            fpu,
            xcr0,
            xsave_ext,
            msrs,
            lapic: Kvm(lapic).into(),
            events: Kvm(events).into(),
            mp_state: Kvm(mp).try_into()?,
        })
    }

    /// Writes `state`; with `before`, only the parts that differ from it (so the guest TSC and
    /// other untouched state are not disturbed after completing one instruction).
    fn write_state(&self, s: &CpuState, before: Option<&CpuState>) -> hv::Result<()> {
        s.validate().map_err(hv::Error::InvalidState)?;
        let changed = |f: &dyn Fn(&CpuState) -> bool| before.is_none_or(f);
        if changed(&|b| b.regs != s.regs) {
            self.fd
                .set_regs(&Kvm::<kvm_regs>::from(&s.regs).0)
                .map_err(backend_err("KVM_SET_REGS"))?;
        }
        if changed(&|b| b.sregs != s.sregs) {
            self.fd
                .set_sregs(&Kvm::<kvm_sregs>::from(&s.sregs).0)
                .map_err(backend_err("KVM_SET_SREGS"))?;
        }
        if changed(&|b| b.fpu != s.fpu || b.xsave_ext != s.xsave_ext) {
            self.set_fpu_and_xsave(&s.fpu, &s.xsave_ext)?;
        }
        if changed(&|b| b.xcr0 != s.xcr0) {
            self.set_xcr0(s.xcr0)?;
        }
        if changed(&|b| b.debug != s.debug) {
            self.fd
                .set_debug_regs(&Kvm::from(&s.debug).0)
                .map_err(backend_err("KVM_SET_DEBUGREGS"))?;
        }
        if changed(&|b| b.lapic != s.lapic) {
            self.fd
                .set_lapic(&Kvm::<kvm_lapic_state>::try_from(&s.lapic)?.0)
                .map_err(backend_err("KVM_SET_LAPIC"))?;
        }
        self.set_msrs(&s.msrs, before.map(|b| b.msrs.as_slice()))?;
        if changed(&|b| b.events != s.events) {
            self.fd
                .set_vcpu_events(&Kvm::<kvm_vcpu_events>::from(&s.events).0)
                .map_err(backend_err("KVM_SET_VCPU_EVENTS"))?;
        }
        if changed(&|b| b.mp_state != s.mp_state) {
            self.fd
                .set_mp_state(Kvm::from(s.mp_state).0)
                .map_err(backend_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// KVM's instruction emulator gave up: complete the instruction here (int3 in 64-bit mode)
    /// or through the [`hv::InstructionEmulator`], or fail with the instruction bytes.
    fn complete_instruction(&mut self, io: &dyn DeviceIo) -> hv::Result<()> {
        let suberror = self.run.internal_suberror();
        let before = self.read_state()?;
        let rip = before.regs.rip;
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(hv::Error::Unhandled(format!(
                "KVM internal error {suberror} at rip {rip:#x}"
            )));
        }
        let bytes = walk::fetch_instruction(&before.sregs, self.memory(), rip);
        let unhandled = || {
            hv::Error::Unhandled(format!(
                "cannot complete instruction {bytes:02x?} at rip {rip:#x}"
            ))
        };
        let long_mode = before.sregs.efer & EFER_LMA != 0 && before.sregs.cs.l;
        if long_mode && bytes.first() == Some(&0xcc) && before.events.exception.is_none() {
            // int3: the trap pushes the address after the instruction.
            let mut after = before.clone();
            after.regs.rip = rip.wrapping_add(1);
            after.events.exception = Some(hv::PendingException {
                vector: 3,
                error_code: None,
                injected: true,
            });
            return self.write_state(&after, Some(&before));
        }
        let Some(emulator) = self.shared.emulator.clone() else {
            return Err(unhandled());
        };
        let mut after = before.clone();
        emulator
            .emulate_one(&mut after, &self.shared.memory, io)
            .map_err(|e| match e {
                hv::Error::Unhandled(m) => hv::Error::Unhandled(m),
                _ => unhandled(),
            })?;
        if after.regs.rip == before.regs.rip && after.events == before.events {
            return Err(unhandled()); // no progress: never loop on the same instruction
        }
        self.write_state(&after, Some(&before))
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let mut k = self.kick.lock();
        k.run = None;
        k.thread = None;
    }
}

impl hv::Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self, io: &dyn DeviceIo) -> hv::Result<VcpuExit> {
        let kick = self.kick.clone();
        // SAFETY: pthread_self has no preconditions.
        kick.lock().thread = Some(unsafe { libc::pthread_self() });
        let _running = RunningGuard(&kick);
        let run_ptr = self.run;
        loop {
            let next = match self.fd.run().map(|exit| serve_io(exit, io, run_ptr)) {
                Ok(None) => Next::Continue,
                // All platform interrupts are edge-triggered: nothing to do on EOI.
                Ok(Some(KvmExit::IoapicEoi(_))) => Next::Continue,
                Ok(Some(KvmExit::Hlt)) => Next::Return(VcpuExit::Halted),
                Ok(Some(KvmExit::Shutdown)) => Next::Return(VcpuExit::Shutdown),
                Ok(Some(KvmExit::Intr)) => Next::Interrupted,
                Ok(Some(KvmExit::InternalError)) => Next::CompleteInstruction,
                Ok(Some(KvmExit::FailEntry(reason, _))) => {
                    return Err(hv::Error::Unhandled(format!(
                        "KVM could not enter the guest (hardware reason {reason:#x})"
                    )));
                }
                Ok(Some(other)) => {
                    return Err(hv::Error::Unhandled(format!(
                        "unexpected KVM exit {other:?}"
                    )));
                }
                Err(e) if e.errno() == libc::EINTR => Next::Interrupted,
                Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => return Err(backend_err("KVM_RUN")(e)),
            };
            match next {
                Next::Continue => {}
                Next::Return(exit) => return Ok(exit),
                Next::Interrupted => {
                    if self.take_kick() {
                        return Ok(VcpuExit::Interrupted);
                    }
                }
                Next::CompleteInstruction => self.complete_instruction(io)?,
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(Kicker(self.kick.clone()))
    }

    fn state(&mut self) -> hv::Result<CpuState> {
        self.read_state()
    }

    fn set_state(&mut self, state: &CpuState) -> hv::Result<()> {
        self.write_state(state, None)
    }
}
