//! The KVM fast paths with tiny guests: an ioeventfd takes a guest MMIO write without an exit to
//! the VMM, an irqfd delivers its routed MSI to a halted guest. Each needs /dev/kvm and prints
//! `SKIP: no /dev/kvm` without it.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Access, CODE, Guest, MMIO, asm, done, kvm};
use hv::{CpuModel, EventFd, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn nonblocking() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// Kicks the vCPU after `limit` so a broken test fails instead of hanging.
fn watchdog(k: Arc<dyn hv::VcpuKicker>, finished: Arc<AtomicBool>, limit: Duration) {
    std::thread::spawn(move || {
        let t = Instant::now();
        while !finished.load(Ordering::SeqCst) && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(5));
        }
        k.kick();
    });
}

#[test]
fn ioevent_takes_matching_writes_without_an_exit() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    let notify = MMIO + 0x50;
    let (q0, q1, any) = (nonblocking(), nonblocking(), nonblocking());
    g.vm.register_ioevent(notify, 4, Some(0), &q0).unwrap();
    g.vm.register_ioevent(notify, 4, Some(1), &q1).unwrap();
    g.vm.register_ioevent(MMIO + 0x100, 8, None, &any).unwrap();
    g.load(&asm(CODE, |a| {
        a.mov(dword_ptr(notify), 1)?;
        a.mov(dword_ptr(notify), 1)?;
        a.mov(dword_ptr(notify), 0)?;
        a.mov(dword_ptr(notify), 2)?; // no fd for this value: an ordinary exit
        a.mov(word_ptr(notify), 1)?; // other width: an ordinary exit
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.mov(qword_ptr(MMIO + 0x100), rax)?;
        done(a)
    }));
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert_eq!(q1.read().unwrap(), 2);
    assert_eq!(q0.read().unwrap(), 1);
    assert_eq!(any.read().unwrap(), 1);
    assert_eq!(
        g.io.take(),
        vec![
            Access::MmioWrite(notify, 2u32.to_le_bytes().to_vec()),
            Access::MmioWrite(notify, 1u16.to_le_bytes().to_vec()),
        ]
    );

    // Unregistered: the same write exits to the VMM again.
    g.vm.unregister_ioevent(notify, 4, Some(1), &q1).unwrap();
    g.load(&asm(CODE, |a| {
        a.mov(dword_ptr(notify), 1)?;
        done(a)
    }));
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert!(q1.read().is_err(), "nothing signalled after unregistering");
    assert_eq!(
        g.io.take(),
        vec![Access::MmioWrite(notify, 1u32.to_le_bytes().to_vec())]
    );
    assert!(g.vm.register_ioevent(notify, 3, Some(1), &q1).is_err());
}

/// Writes the guest program: enable the local APIC, tell the test (port 0x80), then `sti; hlt`
/// in a loop. The handler for `vector` writes the vector to MMIO + 0x30 and ends the run.
fn halted_guest(g: &mut Guest, vector: u8) {
    g.map_apic_window();
    let handler = CODE + 0x800;
    g.mem
        .write_slice(
            &asm(handler, |a| {
                a.mov(byte_ptr(MMIO + 0x30), u32::from(vector))?;
                a.mov(rax, 0xfee0_00b0u64)?;
                a.mov(dword_ptr(rax), 0)?; // EOI
                done(a)
            }),
            GuestAddress(handler),
        )
        .unwrap();
    g.set_idt_gate(u64::from(vector), handler);
    g.load(&asm(CODE, |a| {
        a.mov(rax, 0xfee0_00f0u64)?;
        a.mov(dword_ptr(rax), 0x1ff)?; // SVR: APIC enabled
        a.out(0x80, al)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.sti()?;
        a.hlt()?;
        a.jmp(top)
    }));
}

fn wait_for_port(io: &common::Recorder, port: u16) {
    let t = Instant::now();
    while io.port_bytes(port).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn irqfd_delivers_the_routed_vector_to_a_halted_guest() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    halted_guest(&mut g, 0x41);
    let irqfd = nonblocking();
    // A stale route for the GSI is replaced; another GSI's route is kept.
    g.vm.set_msi_route(5, 0xfee0_0000, 0x99).unwrap();
    g.vm.set_msi_route(6, 0xfee0_0000, 0x42).unwrap();
    g.vm.set_msi_route(5, 0xfee0_0000, 0x41).unwrap();
    g.vm.register_irqfd(5, &irqfd).unwrap();
    assert!(g.vm.set_msi_route(24, 0xfee0_0000, 0x41).is_err());

    let finished = Arc::new(AtomicBool::new(false));
    watchdog(g.vcpu.kicker(), finished.clone(), Duration::from_secs(10));
    let run = std::thread::scope(|s| {
        let testkit::Guest { vcpu, io, .. } = &mut *g;
        let runner = s.spawn(|| vcpu.run(&**io));
        wait_for_port(io, 0x80);
        // Let the guest reach `hlt`.
        std::thread::sleep(Duration::from_millis(50));
        irqfd.write(1).unwrap();
        runner.join().unwrap()
    });
    finished.store(true, Ordering::SeqCst);
    assert_eq!(run.unwrap(), VcpuExit::Interrupted);
    assert!(
        g.io.take()
            .contains(&Access::MmioWrite(MMIO + 0x30, vec![0x41])),
        "the handler of the routed vector ran"
    );
    g.vm.unregister_irqfd(5, &irqfd).unwrap();
}

/// A count written while the irqfd is unregistered is delivered when it is registered again:
/// what lets the VMM deassign an irqfd while a pin is masked without losing an edge.
#[test]
fn irqfd_count_pending_at_registration_is_delivered() {
    let Some(h) = kvm() else { return };
    let mut g = Guest::new(&h, CpuModel::portable());
    halted_guest(&mut g, 0x43);
    let irqfd = nonblocking();
    g.vm.set_msi_route(7, 0xfee0_0000, 0x43).unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    watchdog(g.vcpu.kicker(), finished.clone(), Duration::from_secs(10));
    let run = std::thread::scope(|s| {
        let testkit::Guest { vcpu, io, vm, .. } = &mut *g;
        let runner = s.spawn(|| vcpu.run(&**io));
        wait_for_port(io, 0x80);
        std::thread::sleep(Duration::from_millis(50));
        irqfd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !io.take()
                .contains(&Access::MmioWrite(MMIO + 0x30, vec![0x43])),
            "nothing delivered before registration"
        );
        vm.register_irqfd(7, &irqfd).unwrap();
        runner.join().unwrap()
    });
    finished.store(true, Ordering::SeqCst);
    assert_eq!(run.unwrap(), VcpuExit::Interrupted);
    assert!(
        g.io.take()
            .contains(&Access::MmioWrite(MMIO + 0x30, vec![0x43])),
        "the pending count was delivered"
    );
}
