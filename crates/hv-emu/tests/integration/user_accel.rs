//! The user-mode accelerator hook, with a fake accelerator whose runner interprets user code
//! with emu's own `InstructionEmulator` and leaves user mode the way a hardware runner does
//! (`Syscall` past the instruction, `Event` for exceptions, `Interrupted` on kicks and the
//! deadline). Checks: syscall semantics, exception delivery from user mode, written pages drop
//! stale decoded blocks, the guest TSC follows the runner's, and MSIs / the APIC timer interrupt
//! a vCPU that is inside the runner.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hv::{
    CpuState, DeviceIo, GuestMemory, InstructionEmulator, UserExit, UserModeAccelerator,
    UserModeRunner, VcpuExit, VcpuKicker, msr,
};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

const TSC_KHZ: u32 = 1_500_000;
/// The runner reports the TSC this far ahead of what it was given (2 s at `TSC_KHZ`).
const TSC_JUMP: u64 = 3_000_000_000;
const USER: u64 = CODE + 0x1000;
const SYSCALL_ENTRY: u64 = CODE + 0x2000;
const HANDLER: u64 = CODE + 0x3000;
/// Offset of the patchable immediate in the syscall entry (`mov rdx, imm64` after `mov rdi`).
const PATCH_AT: u64 = SYSCALL_ENTRY + 10 + 2;

/// What the fake runner does besides running code.
#[derive(Default)]
struct Script {
    /// On this run (1-based), write `0x2222_2222` over the syscall entry's immediate.
    patch_on_run: Option<u32>,
    /// Report the patched page in `written`.
    report_written: bool,
    /// `host_tsc()` returns this plus the ticks since the accelerator was made.
    host_tsc_base: Option<u64>,
    /// User-mode `cpuid` raises #GP(0) at the instruction, as KVM's runner does with CPUID
    /// faulting on.
    cpuid_faults: bool,
    /// The runner's `emulate_below` (0: every user stretch is handed over).
    emulate_below: u64,
}

struct Shared {
    created: Instant,
    runs: AtomicU32,
    reported_tsc: AtomicU64,
    script: Script,
    log: Mutex<Vec<String>>,
    /// What emu said before each run: whether the guest flushed its TLB since the last one.
    tlb_flushed: Mutex<Vec<bool>>,
}

struct FakeAccel {
    shared: Arc<Shared>,
}

struct FakeKick {
    flag: AtomicBool,
}

impl VcpuKicker for FakeKick {
    fn kick(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

struct FakeRunner {
    memory: Arc<GuestMemory>,
    emu: hv_emu::Emulator,
    kick: Arc<FakeKick>,
    shared: Arc<Shared>,
}

impl UserModeAccelerator for FakeAccel {
    fn create_runner(
        &self,
        _vcpu_id: u32,
        memory: Arc<GuestMemory>,
    ) -> hv::Result<Box<dyn UserModeRunner>> {
        Ok(Box::new(FakeRunner {
            memory,
            emu: hv_emu::Emulator::new(hv::CpuModel::portable()),
            kick: Arc::new(FakeKick {
                flag: AtomicBool::new(false),
            }),
            shared: self.shared.clone(),
        }))
    }

    fn tsc_khz(&self) -> u32 {
        TSC_KHZ
    }

    fn host_tsc(&self) -> Option<u64> {
        let base = self.shared.script.host_tsc_base?;
        let ns = self.shared.created.elapsed().as_nanos() as u64;
        Some(base + ns * u64::from(TSC_KHZ) / 1_000_000)
    }
}

impl UserModeRunner for FakeRunner {
    fn run(
        &mut self,
        state: &mut CpuState,
        deadline: Option<Instant>,
        io: &dyn DeviceIo,
        written: &mut Vec<u64>,
    ) -> hv::Result<UserExit> {
        assert_eq!(state.sregs.cs.dpl, 3, "handed a state outside user mode");
        assert!(state.sregs.cs.l && state.sregs.efer & (1 << 10) != 0);
        let run = self.shared.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if self.shared.script.patch_on_run == Some(run) {
            // As hardware writes: a plain store, no accessor (whose bitmap would tell emu's
            // write watch), so only `written` tells emu about it.
            let s = self.memory.get_slice(GuestAddress(PATCH_AT), 8).unwrap();
            for (k, b) in 0x2222_2222u64.to_le_bytes().into_iter().enumerate() {
                s.get_atomic_ref::<AtomicU8>(k)
                    .unwrap()
                    .store(b, Ordering::SeqCst);
            }
            if self.shared.script.report_written {
                written.push(PATCH_AT >> 12);
            }
        }
        let tsc_in = state.msr(msr::IA32_TSC).expect("IA32_TSC in the state");
        let start = Instant::now();
        let exit = loop {
            if self.kick.flag.swap(false, Ordering::SeqCst)
                || deadline.is_some_and(|d| Instant::now() >= d)
                || start.elapsed() > Duration::from_secs(20)
            {
                break UserExit::Interrupted;
            }
            // The test's user code is identity-mapped: RIP is its physical address.
            let mut op = [0u8; 2];
            self.memory
                .read_slice(&mut op, GuestAddress(state.regs.rip))
                .unwrap();
            if op == [0x0f, 0x05] {
                state.regs.rip += 2;
                break UserExit::Syscall;
            }
            if op == [0x0f, 0xa2] && self.shared.script.cpuid_faults {
                break UserExit::Event {
                    vector: 13,
                    error_code: Some(0),
                };
            }
            self.emu.emulate_one(state, &self.memory, io)?;
            if let Some(e) = state.events.exception.take() {
                break UserExit::Event {
                    vector: e.vector,
                    error_code: e.error_code,
                };
            }
        };
        let tsc_out = tsc_in + TSC_JUMP;
        self.shared.reported_tsc.store(tsc_out, Ordering::SeqCst);
        state.set_msr(msr::IA32_TSC, tsc_out);
        self.shared
            .log
            .lock()
            .unwrap()
            .push(format!("run {run}: {exit:?} at {:#x}", state.regs.rip));
        Ok(exit)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kick.clone()
    }

    fn set_tlb_flushed(&mut self, flushed: bool) {
        self.shared.tlb_flushed.lock().unwrap().push(flushed);
    }

    fn emulate_below(&self) -> u64 {
        self.shared.script.emulate_below
    }
}

fn accel(script: Script) -> (hv_emu::EmuHypervisor, Arc<Shared>) {
    let shared = Arc::new(Shared {
        created: Instant::now(),
        runs: AtomicU32::new(0),
        reported_tsc: AtomicU64::new(0),
        script,
        log: Mutex::new(Vec::new()),
        tlb_flushed: Mutex::new(Vec::new()),
    });
    let a = FakeAccel {
        shared: shared.clone(),
    };
    (
        hv_emu::EmuHypervisor::with_user_accelerator(Arc::new(a)),
        shared,
    )
}

/// Kernel code: enable the local APIC, program SYSCALL (user CS 0x2b / SS 0x23, entry at
/// `SYSCALL_ENTRY`), run `timer` (APIC timer setup, or nothing), then `sysretq` to `USER` with
/// RFLAGS = `user_flags`.
fn kernel(user_flags: i32, timer: bool) -> Vec<u8> {
    asm(|a| {
        a.mov(rsi, 0xfee0_00f0u64)?;
        a.mov(dword_ptr(rsi), 0x1ff)?;
        syscall_msrs(a, SYSCALL_ENTRY)?;
        a.mov(ecx, msr::IA32_FMASK)?;
        a.mov(eax, 0x200)?;
        a.wrmsr()?;
        if timer {
            // One-shot APIC timer, vector 0x41, divide by 1, 2 ms.
            a.mov(rsi, 0xfee0_03e0u64)?;
            a.mov(dword_ptr(rsi), 0xb)?;
            a.mov(rsi, 0xfee0_0320u64)?;
            a.mov(dword_ptr(rsi), 0x41)?;
            a.mov(rsi, 0xfee0_0380u64)?;
            a.mov(dword_ptr(rsi), 2_000_000)?;
        }
        a.mov(rcx, USER)?;
        a.mov(r11, user_flags as u64)?;
        a.sysretq()
    })
}

/// The syscall entry: stores the patchable immediate at `DATA + 8 * rax`, then the TSC at
/// `DATA + 0x40`, and returns to user mode.
fn syscall_entry() -> Vec<u8> {
    let code = asm_at(64, SYSCALL_ENTRY, |a| {
        a.mov(rdi, DATA)?;
        a.mov(rdx, 0x1111_1111u64)?;
        a.mov(qword_ptr(rdi + rax * 8), rdx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(qword_ptr(rdi + 0x40), rax)?;
        a.sysretq()
    });
    // `mov rdi, imm64` is 10 bytes; `mov rdx, imm64` has its immediate 2 bytes in.
    assert_eq!(&code[10..12], &[0x48, 0xba]);
    code
}

/// A handler for external vectors: records `0x100 | vector` at `EXC`, the interrupted CS at
/// `EXC + 16`, and halts with IF=0.
fn irq_handler(vector: u8) -> Vec<u8> {
    asm_at(64, HANDLER, |a| {
        a.mov(rsi, EXC)?;
        a.mov(qword_ptr(rsi), 0x100 + i32::from(vector))?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(rsi + 16), rax)?;
        a.cli()?;
        a.hlt()
    })
}

/// A guest whose pages are all user-accessible, with RSP0 in the TSS (at address 0).
fn user_guest(hv: &hv_emu::EmuHypervisor, kernel: &[u8], user: &[u8]) -> Guest {
    let g = guest_with_tsc(hv, kernel, 1, None);
    testkit::identity_map(&g.mem, PML4, true).expect("user pages");
    g.mem.write_obj(STACK, GuestAddress(4)).expect("TSS RSP0");
    g.write_code(SYSCALL_ENTRY, &syscall_entry());
    g.write_code(USER, user);
    g
}

fn two_syscalls_then_ud2() -> Vec<u8> {
    asm_at(64, USER, |a| {
        a.xor(eax, eax)?;
        a.syscall()?;
        a.mov(eax, 1)?;
        a.syscall()?;
        a.ud2()
    })
}

#[test]
fn syscalls_and_exceptions_leave_the_runner() {
    let (hv, shared) = accel(Script {
        patch_on_run: Some(2),
        report_written: true,
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    assert_eq!(
        g.vm.tsc_khz(),
        TSC_KHZ,
        "the VM runs at the accelerator's TSC rate"
    );
    assert_eq!(g.run(), VcpuExit::Halted);
    let log = shared.log.lock().unwrap().clone();
    assert_eq!(shared.runs.load(Ordering::SeqCst), 3, "{log:?}");
    // Both syscalls reached the kernel entry; the second one ran the patched code.
    assert_eq!(g.read_u64(DATA), 0x1111_1111, "{log:?}");
    assert_eq!(
        g.read_u64(DATA + 8),
        0x2222_2222,
        "stale block after a reported write"
    );
    // ud2 in user mode arrived through the IDT: frame RIP = the ud2, CS = user code.
    assert_eq!(g.exception(), Some((6, 0)));
    let st = g.state();
    let ud2_at = USER + 2 + 2 + 5 + 2;
    assert_eq!(g.read_u64(st.regs.rsp), ud2_at);
    assert_eq!(g.read_u64(st.regs.rsp + 8), 0x2b);
    assert_eq!(g.read_u64(st.regs.rsp + 24), STACK, "user RSP in the frame");
    // The kernel's rdtsc after the second run is at least what the runner reported then.
    let kernel_tsc = g.read_u64(DATA + 0x40);
    assert!(kernel_tsc >= 2 * TSC_JUMP, "kernel TSC {kernel_tsc}");
    assert!(st.msr(msr::IA32_TSC).unwrap() >= shared.reported_tsc.load(Ordering::SeqCst));
}

#[test]
fn other_tsc_rate_runs_without_the_accelerator() {
    // A VM created for another TSC rate (restored, migrated) interprets user mode itself.
    let (hv, shared) = accel(Script::default());
    let mut g = guest_with(&hv, &kernel(0x2, false), 1);
    testkit::identity_map(&g.mem, PML4, true).expect("user pages");
    g.mem.write_obj(STACK, GuestAddress(4)).unwrap();
    g.write_code(SYSCALL_ENTRY, &syscall_entry());
    g.write_code(USER, &two_syscalls_then_ud2());
    assert_eq!(g.vm.tsc_khz(), 2_000_000);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(shared.runs.load(Ordering::SeqCst), 0);
    assert_eq!(g.exception(), Some((6, 0)));
    assert_eq!(g.read_u64(DATA + 8), 0x1111_1111);
}

#[test]
fn unreported_writes_leave_stale_code() {
    // The same run without the page in `written`: the kernel runs its cached block, which is
    // what makes the check above meaningful.
    let (hv, shared) = accel(Script {
        patch_on_run: Some(2),
        report_written: false,
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(shared.runs.load(Ordering::SeqCst), 3);
    assert_eq!(
        g.read_u64(PATCH_AT),
        0x2222_2222,
        "the runner patched the entry"
    );
    assert_eq!(g.read_u64(DATA + 8), 0x1111_1111);
}

#[test]
fn msi_kicks_the_runner() {
    let (hv, shared) = accel(Script::default());
    let spin = asm_at(64, USER, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    let mut g = user_guest(&hv, &kernel(0x202, false), &spin);
    g.set_gate(0x40, HANDLER);
    g.write_code(HANDLER, &irq_handler(0x40));
    let vm = g.vm.clone();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        vm.signal_msi(0xfee0_0000, 0x40).unwrap();
    });
    let start = Instant::now();
    assert_eq!(g.run(), VcpuExit::Halted);
    sender.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the MSI waited for the runner"
    );
    assert!(shared.runs.load(Ordering::SeqCst) >= 1);
    assert_eq!(g.read_u64(EXC), 0x140);
    assert_eq!(g.read_u64(EXC + 16), 0x2b, "interrupted in user mode");
}

#[test]
fn apic_timer_deadline_ends_the_run() {
    let (hv, shared) = accel(Script::default());
    let spin = asm_at(64, USER, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    let mut g = user_guest(&hv, &kernel(0x202, true), &spin);
    g.set_gate(0x41, HANDLER);
    g.write_code(HANDLER, &irq_handler(0x41));
    let start = Instant::now();
    assert_eq!(g.run(), VcpuExit::Halted);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(shared.runs.load(Ordering::SeqCst) >= 1);
    assert_eq!(g.read_u64(EXC), 0x141);
    assert_eq!(g.read_u64(EXC + 16), 0x2b, "interrupted in user mode");
}

#[test]
fn host_tsc_is_the_guest_tsc() {
    // An accelerator whose user code reads the host TSC: the kernel reads the same counter,
    // and TSC writes are dropped (user code would not see them).
    const BASE: u64 = 1 << 50;
    let (hv, _shared) = accel(Script {
        host_tsc_base: Some(BASE),
        ..Script::default()
    });
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.rdtsc()?;
        a.mov(dword_ptr(rdi), eax)?;
        a.mov(dword_ptr(rdi + 4), edx)?;
        a.mov(ecx, msr::IA32_TSC)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdtsc()?;
        a.mov(dword_ptr(rdi + 8), eax)?;
        a.mov(dword_ptr(rdi + 12), edx)?;
        a.hlt()
    });
    let mut g = guest_with_tsc(&hv, &code, 1, None);
    assert_eq!(g.run(), VcpuExit::Halted);
    let (t1, t2) = (g.read_u64(DATA), g.read_u64(DATA + 8));
    assert!(t1 >= BASE && t2 >= t1, "{t1:#x} {t2:#x}");
    assert!(g.state().msr(msr::IA32_TSC).unwrap() >= t2);
}

#[test]
fn a_runner_report_does_not_move_a_host_tsc() {
    // With the host's TSC as the guest's, the runner's own TSC report (here 2 s ahead, as a
    // late or preempted read would make it differ) must not become an offset: user code keeps
    // reading the host TSC, so the kernel must too, or user-mode time jumps.
    const BASE: u64 = 1 << 50;
    let (hv, shared) = accel(Script {
        host_tsc_base: Some(BASE),
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    assert_eq!(g.run(), VcpuExit::Halted);
    let host_now =
        BASE + shared.created.elapsed().as_nanos() as u64 * u64::from(TSC_KHZ) / 1_000_000;
    let kernel_tsc = g.read_u64(DATA + 0x40);
    assert!(
        kernel_tsc >= BASE && kernel_tsc <= host_now,
        "kernel TSC {kernel_tsc:#x} outside [{BASE:#x}, {host_now:#x}]: the report moved it"
    );
}

#[test]
fn a_restored_foreign_tsc_leaves_the_accelerator() {
    // A VM moved here from another backend or host: its TSC is not the host's, and user code
    // on the accelerator would read the host's unoffset counter. The VM keeps its own TSC and
    // runs user mode in emu (no runner call), so the guest sees no jump.
    const BASE: u64 = 1 << 50;
    let (hv, shared) = accel(Script {
        host_tsc_base: Some(BASE),
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    let mut st = g.state();
    st.set_msr(msr::IA32_TSC, 5_000_000);
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(
        shared.runs.load(Ordering::SeqCst),
        0,
        "user mode went to the runner"
    );
    let kernel_tsc = g.read_u64(DATA + 0x40);
    assert!(
        (5_000_000..BASE).contains(&kernel_tsc),
        "kernel TSC {kernel_tsc:#x} did not continue from the restored 5000000"
    );
    assert_eq!(g.exception(), Some((6, 0)));
}

#[test]
fn a_restored_host_tsc_keeps_the_accelerator() {
    // The same move on this host within a pause (the TSC the state holds is the host's): the
    // runner is used as before.
    const BASE: u64 = 1 << 50;
    let (hv, shared) = accel(Script {
        host_tsc_base: Some(BASE),
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    let mut st = g.state();
    st.set_msr(msr::IA32_TSC, BASE);
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(shared.runs.load(Ordering::SeqCst), 3);
}

#[test]
fn a_reset_tsc_takes_the_host_tsc_and_keeps_the_accelerator() {
    // A fresh boot (or reboot): `machine::boot` loads every vCPU with TSC 0, the reset value.
    // That is not a moved VM: the guest TSC becomes the host's and user mode goes to the runner.
    const BASE: u64 = 1 << 50;
    let (hv, shared) = accel(Script {
        host_tsc_base: Some(BASE),
        ..Script::default()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &two_syscalls_then_ud2());
    let mut st = g.state();
    st.set_msr(msr::IA32_TSC, 0);
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(shared.runs.load(Ordering::SeqCst), 3);
    let kernel_tsc = g.read_u64(DATA + 0x40);
    assert!(
        kernel_tsc >= BASE,
        "kernel TSC {kernel_tsc:#x} is not the host's (from {BASE:#x})"
    );
}

#[test]
fn faulted_user_cpuid_is_answered_from_the_model() {
    // With CPUID faulting the runner returns #GP(0) at a user `cpuid`; emu executes it with the
    // VM's model and user code continues. Without that, the guest kernel would get #GP (13).
    let (hv, shared) = accel(Script {
        cpuid_faults: true,
        ..Script::default()
    });
    let user = asm_at(64, USER, |a| {
        a.mov(eax, 1)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(rdi, DATA + 0x80)?;
        a.mov(dword_ptr(rdi), ecx)?;
        a.mov(dword_ptr(rdi + 4), ebx)?;
        a.ud2()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &user);
    assert_eq!(g.run(), VcpuExit::Halted);
    let log = shared.log.lock().unwrap().clone();
    assert_eq!(g.exception(), Some((6, 0)), "{log:?}");
    let model = hv::CpuModel::portable().cpuid_value(0, 1, 1, 0);
    assert_eq!(
        g.read_u64(DATA + 0x80) as u32,
        model[2],
        "leaf 1 ECX from the model"
    );
    assert!(shared.runs.load(Ordering::SeqCst) >= 2, "{log:?}");
}

/// The runner is told before each run whether the guest kernel flushed its TLB since the last
/// one (KVM's runner keeps its shadow page tables only when it did not): the first run counts as
/// flushed, a plain syscall does not flush, `invlpg` and a CR3 reload do.
#[test]
fn guest_tlb_flushes_are_reported_to_the_runner() {
    let (hv, shared) = accel(Script::default());
    let entry = asm_at(64, SYSCALL_ENTRY, |a| {
        let mut not_invlpg = a.create_label();
        let mut done = a.create_label();
        a.cmp(eax, 1)?;
        a.jne(not_invlpg)?;
        a.invlpg(byte_ptr(DATA))?;
        a.jmp(done)?;
        a.set_label(&mut not_invlpg)?;
        a.cmp(eax, 2)?;
        a.jne(done)?;
        a.mov(rdx, cr3)?;
        a.mov(cr3, rdx)?;
        a.set_label(&mut done)?;
        a.sysretq()
    });
    let user = asm_at(64, USER, |a| {
        for n in [0, 1, 0, 2, 0] {
            a.mov(eax, n)?;
            a.syscall()?;
        }
        a.ud2()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &user);
    g.write_code(SYSCALL_ENTRY, &entry);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((6, 0)));
    let log = shared.log.lock().unwrap().clone();
    assert_eq!(shared.runs.load(Ordering::SeqCst), 6, "{log:?}");
    assert_eq!(
        *shared.tlb_flushed.lock().unwrap(),
        [true, false, true, false, true, false],
        "{log:?}"
    );
}

/// With a runner that says short stretches are cheaper in emu (`emulate_below`), emu runs user
/// code between syscalls itself and hands over only a stretch that outruns the budget (here a
/// 2 000 000-instruction loop, from the loop on: no run has happened yet, so a run would also
/// build KVM's shadow page tables and the stretch must outrun 32 times the budget); right after
/// such a stretch the next user entry goes straight to the runner.
#[test]
fn short_user_stretches_stay_in_emu_and_long_ones_go_to_the_runner() {
    let (hv, shared) = accel(Script {
        emulate_below: 32_768,
        ..Script::default()
    });
    let user = asm_at(64, USER, |a| {
        a.xor(eax, eax)?;
        a.syscall()?;
        a.mov(eax, 1)?;
        a.syscall()?;
        a.mov(ecx, 1_000_000)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, 2)?;
        a.syscall()?;
        a.ud2()
    });
    let mut g = user_guest(&hv, &kernel(0x2, false), &user);
    assert_eq!(g.run(), VcpuExit::Halted);
    let log = shared.log.lock().unwrap().clone();
    for k in 0..3 {
        assert_eq!(
            g.read_u64(DATA + 8 * k),
            0x1111_1111,
            "syscall {k}: {log:?}"
        );
    }
    assert_eq!(g.exception(), Some((6, 0)));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log[0].starts_with("run 1: Syscall"), "{log:?}");
    assert!(log[1].starts_with("run 2: Event"), "{log:?}");
}
