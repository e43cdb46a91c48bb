//! End-to-end tests of the KVM backend with tiny 64-bit guest programs. Each needs /dev/kvm and
//! prints `SKIP: no /dev/kvm` without it.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Access, CODE, DATA, Guest, IN_VALUE, MMIO, asm, done, kvm};
use hv::{CpuModel, CpuState, Hypervisor, VcpuExit, VmConfig};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn port_io_including_rep_ins_outs() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    g.mem.write_slice(b"abcd", GuestAddress(DATA)).unwrap();
    g.load(&asm(CODE, |a| {
        a.mov(al, 0x42)?;
        a.out(0x80, al)?;
        a.mov(dx, 0xe9)?;
        a.mov(rsi, DATA)?;
        a.mov(ecx, 4)?;
        a.rep().outsb()?;
        a.mov(dx, 0x60)?;
        a.in_(al, dx)?;
        a.out(0x81, al)?;
        a.mov(dx, 0x62)?;
        a.mov(rdi, DATA + 0x100)?;
        a.mov(ecx, 3)?;
        a.rep().insw()?;
        done(a)
    }));
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    let log = g.io.take();
    let mut expected = vec![Access::PioOut(0x80, vec![0x42])];
    expected.extend(b"abcd".iter().map(|&b| Access::PioOut(0xe9, vec![b])));
    expected.push(Access::PioIn(0x60, 1));
    expected.push(Access::PioOut(0x81, vec![IN_VALUE]));
    expected.extend((0..3).map(|_| Access::PioIn(0x62, 2)));
    assert_eq!(log, expected);
    let mut buf = [0u8; 6];
    g.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(buf, [IN_VALUE; 6]);
}

#[test]
fn mmio_read_and_write() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    g.load(&asm(CODE, |a| {
        a.mov(eax, 0x1122_3344)?;
        a.mov(dword_ptr(MMIO), eax)?;
        a.mov(rbx, qword_ptr(MMIO + 8))?;
        a.mov(qword_ptr(DATA), rbx)?;
        a.mov(byte_ptr(MMIO + 0x20), 0x77)?;
        done(a)
    }));
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert_eq!(
        g.io.take(),
        vec![
            Access::MmioWrite(MMIO, 0x1122_3344u32.to_le_bytes().to_vec()),
            Access::MmioRead(MMIO + 8, 8),
            Access::MmioWrite(MMIO + 0x20, vec![0x77]),
        ]
    );
    let v: u64 = g.mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(v, 0x1716_1514_1312_1110);
}

/// On this host KVM's emulator refuses `int3` in 64-bit mode; the backend completes it itself.
#[test]
fn int3_reaches_the_guest_breakpoint_handler() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    let handler = CODE + 0x800;
    g.mem
        .write_slice(
            &asm(handler, |a| {
                a.mov(rax, qword_ptr(rsp))?; // return RIP
                a.mov(qword_ptr(MMIO + 0x10), rax)?;
                a.iretq()
            }),
            GuestAddress(handler),
        )
        .unwrap();
    g.set_idt_gate(3, handler);
    g.load(&asm(CODE, |a| {
        a.nop()?;
        a.int3()?;
        a.mov(byte_ptr(MMIO + 0x18), 1)?;
        a.int3()?;
        done(a)
    }));
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert_eq!(
        g.io.take(),
        vec![
            Access::MmioWrite(MMIO + 0x10, (CODE + 2).to_le_bytes().to_vec()),
            Access::MmioWrite(MMIO + 0x18, vec![1]),
            Access::MmioWrite(MMIO + 0x10, (CODE + 11).to_le_bytes().to_vec()),
        ]
    );
}

#[test]
fn kick_before_run_and_during_run() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    let spin = asm(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.jmp(top)
    });
    g.load(&spin);
    let kicker = g.vcpu.kicker();
    kicker.kick();
    let t = Instant::now();
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert!(t.elapsed() < Duration::from_millis(50));

    // The kick was consumed: the next run only stops at the next kick.
    let k = kicker.clone();
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.kick();
    });
    let t = Instant::now();
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );
    th.join().unwrap();
    assert!(g.vcpu.state().unwrap().regs.rax > 0, "the guest ran");
}

/// Everything except the guest TSC, which moves between two reads.
fn without_tsc(s: &CpuState) -> CpuState {
    let mut s = s.clone();
    s.msrs.retain(|m| m.index != hv::state::msr::IA32_TSC);
    s
}

/// A CPL-0 program that leaves non-trivial state: GPRs, MSRs, debug registers, flags. (No x87
/// or SSE: on this host CPL 0 runs in KVM's instruction emulator, which has neither; the FPU
/// state is seeded through `set_state` instead.)
fn busy_program(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, 0x1234_5678_9abc_def0u64)?;
    a.mov(r15, rax)?;
    a.mov(ecx, hv::state::msr::IA32_LSTAR)?;
    a.mov(eax, 0xdead_b000u32)?;
    a.mov(edx, 0xffff_ffffu32)?;
    a.wrmsr()?;
    a.mov(ecx, hv::state::msr::IA32_KERNEL_GS_BASE)?;
    a.mov(eax, 0x5000u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.mov(rax, 0x4000u64)?;
    a.mov(dr0, rax)?;
    a.stc()?;
    a.out(0x80, al)?;
    done(a)
}

#[test]
fn state_round_trips_after_running() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    g.load(&asm(CODE, busy_program));
    let mut s = g.vcpu.state().unwrap();
    s.fpu.xmm[3][..8].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
    s.fpu.st[7] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f, 0, 0, 0, 0, 0, 0]; // 1.0
    s.fpu.fsw = 0x3800; // TOP = 7
    s.fpu.ftw = 0x80;
    s.fpu.mxcsr = 0x1fa0;
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    let first = g.vcpu.state().unwrap();
    assert_eq!(first.fpu, s.fpu);
    assert_eq!(first.regs.r15, 0x1234_5678_9abc_def0);
    assert_eq!(
        first.fpu.xmm[3][..8],
        0x1234_5678_9abc_def0u64.to_le_bytes()
    );
    assert_eq!(
        first.msr(hv::state::msr::IA32_LSTAR),
        Some(0xffff_ffff_dead_b000)
    );
    assert_eq!(first.msr(hv::state::msr::IA32_KERNEL_GS_BASE), Some(0x5000));
    assert_eq!(first.debug.dr0, 0x4000);
    assert_eq!(first.regs.rflags & 1, 1);
    assert!(first.msr(hv::state::msr::IA32_TSC).is_some_and(|t| t > 0));
    assert!(first.msr(hv::state::msr::IA32_EFER).is_some());
    assert_eq!(first.lapic.regs.len(), hv::LAPIC_PAGE_SIZE);
    assert_eq!(first.mp_state, hv::MpState::Runnable);
    let indices: Vec<u32> = first.msrs.iter().map(|m| m.index).collect();
    println!("MSRs in state: {indices:#x?}");

    g.vcpu.set_state(&first).unwrap();
    let second = g.vcpu.state().unwrap();
    assert_eq!(without_tsc(&second), without_tsc(&first));

    // And the restored vCPU keeps running from there (spinning until kicked).
    let k = g.vcpu.kicker();
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        k.kick();
    });
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    th.join().unwrap();
    assert_eq!(g.vcpu.state().unwrap().regs.rip, second.regs.rip);
}

/// With the host model (XSAVE components available), XCR0 and the AVX upper halves round-trip.
#[test]
fn xsave_state_round_trips_with_host_model() {
    let Some(h) = kvm() else { return };
    let model = h.host_cpu_model().unwrap();
    let mut g = Guest::new(&h, model);
    g.load(&asm(CODE, busy_program));
    let mut s = g.vcpu.state().unwrap();
    s.sregs.cr4 |= 1 << 18; // OSXSAVE
    s.xcr0 = 0x7;
    // YMM_Hi128 is component 2 at offset 576 of the image; xsave_ext starts at 512 (header).
    s.xsave_ext = vec![0; 576 - 512 + 256];
    s.xsave_ext[0] = 0x4; // XSTATE_BV: AVX
    for (i, b) in s.xsave_ext[64..].iter_mut().enumerate() {
        *b = i as u8;
    }
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    let first = g.vcpu.state().unwrap();
    assert_eq!(first.xcr0, 0x7);
    assert_eq!(
        first.xsave_ext[64..],
        s.xsave_ext[64..],
        "ymm upper halves kept"
    );
    g.vcpu.set_state(&first).unwrap();
    assert_eq!(without_tsc(&g.vcpu.state().unwrap()), without_tsc(&first));
}

#[test]
fn dirty_log_reports_pages_the_guest_wrote() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    g.load(&asm(CODE, |a| {
        a.mov(qword_ptr(DATA + 0x3000), rax)?;
        a.mov(qword_ptr(0x15_0008u64), rax)?;
        done(a)
    }));
    g.vm.set_dirty_tracking(true).unwrap();
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    let pages = g.vm.take_dirty_log().unwrap();
    assert!(pages.contains(&((DATA + 0x3000) >> 12)), "{pages:x?}");
    assert!(pages.contains(&0x150), "{pages:x?}");
    assert!(!pages.contains(&0x1ff));
    // Forgotten once taken.
    assert!(!g.vm.take_dirty_log().unwrap().contains(&0x150));
    g.vm.set_dirty_tracking(false).unwrap();
}

#[test]
fn vm_clock_round_trips_and_tsc_mismatch_is_refused() {
    let Some(h) = kvm() else { return };
    let g = Guest::new(&h, CpuModel::portable());
    let s = g.vm.state().unwrap();
    assert_eq!(s.tsc_khz, h.host_tsc_khz());
    let later = hv::VmState {
        clock_ns: s.clock_ns + 5_000_000_000,
        ..s
    };
    g.vm.set_state(&later).unwrap();
    let now = g.vm.state().unwrap();
    assert!(now.clock_ns >= later.clock_ns && now.clock_ns < later.clock_ns + 1_000_000_000);
    let other = hv::VmState {
        tsc_khz: s.tsc_khz / 2,
        ..s
    };
    assert!(matches!(
        g.vm.set_state(&other),
        Err(hv::Error::Incompatible(_))
    ));

    // A guest TSC below the host's cannot be presented without TSC scaling.
    let mem = Arc::new(hv::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let r = h.create_vm(VmConfig {
        memory: mem,
        cpu_model: CpuModel::portable(),
        vcpus: 1,
        tsc_khz: Some(h.host_tsc_khz() / 2),
    });
    match r {
        Err(hv::Error::Incompatible(m)) => println!("half-speed TSC: {m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => println!("half-speed TSC accepted (host has TSC scaling)"),
    }
}

#[test]
fn cpu_model_checks() {
    let Some(h) = kvm() else { return };
    h.check_cpu_model(&CpuModel::portable()).unwrap();
    let host = h.host_cpu_model().unwrap();
    assert!(host.name.starts_with("host:kvm:"));
    assert_eq!(host, h.host_cpu_model().unwrap(), "stable digest");
    h.check_cpu_model(&host).unwrap();
    let mut m = CpuModel::portable();
    for e in &mut m.cpuid {
        if e.function == 7 {
            e.ebx |= 1 << 16; // AVX-512F: the host CPU has it, KVM does not offer it
        }
    }
    let err = h.check_cpu_model(&m).unwrap_err().to_string();
    assert_eq!(
        err,
        "CPU model portable-v2 needs CPUID.0x7.0:ebx bit 16 which KVM on this host cannot provide"
    );
}

/// Split irqchip: an MSI sent with `signal_msi` reaches the in-kernel local APIC and the guest's
/// handler; the guest enables its APIC through the APIC page (kernel-handled MMIO).
#[test]
fn msi_reaches_the_guest_handler() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    g.map_apic_window();
    let handler = CODE + 0x800;
    g.mem
        .write_slice(
            &asm(handler, |a| {
                a.mov(byte_ptr(MMIO + 0x30), 0x40)?;
                a.mov(rax, 0xfee0_00b0u64)?;
                a.mov(dword_ptr(rax), 0)?; // EOI
                done(a)
            }),
            GuestAddress(handler),
        )
        .unwrap();
    g.set_idt_gate(0x40, handler);
    g.load(&asm(CODE, |a| {
        a.mov(rax, 0xfee0_00f0u64)?;
        a.mov(dword_ptr(rax), 0x1ff)?; // SVR: APIC enabled
        a.out(0x80, al)?; // tell the test the APIC is on
        a.sti()?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.jmp(spin)
    }));
    let vm = g.vm.clone();
    let io = g.io.clone();
    let k = g.vcpu.kicker();
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fin = finished.clone();
    let sender = std::thread::spawn(move || {
        let t = Instant::now();
        while io.port_bytes(0x80).is_empty() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.signal_msi(0xfee0_0000, 0x40).unwrap();
        // Watchdog: the test fails instead of hanging.
        let t = Instant::now();
        while !fin.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        k.kick();
    });
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        g.io.take()
            .contains(&Access::MmioWrite(MMIO + 0x30, vec![0x40])),
        "interrupt handler ran"
    );
    sender.join().unwrap();
}

/// APs start in "wait for INIT" under the in-kernel local APIC.
#[test]
fn application_processors_wait_for_init() {
    let Some(h) = kvm() else { return };
    let mem = Arc::new(hv::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let vm = h
        .create_vm(VmConfig {
            memory: mem,
            cpu_model: CpuModel::portable(),
            vcpus: 2,
            tsc_khz: None,
        })
        .unwrap();
    let mut bsp = vm.create_vcpu(0).unwrap();
    let mut ap = vm.create_vcpu(1).unwrap();
    assert_eq!(bsp.state().unwrap().mp_state, hv::MpState::Runnable);
    let s = ap.state().unwrap();
    assert_eq!(s.mp_state, hv::MpState::Uninitialized);
    assert_eq!(s.lapic.get(hv::LapicState::ID) >> 24, 1);
    ap.set_state(&s).unwrap();
    assert!(vm.create_vcpu(2).is_err());
}
