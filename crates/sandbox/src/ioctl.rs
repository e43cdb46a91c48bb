//! The ioctl request numbers the filters let through, computed with the kernel's `_IOC` formula
//! (`include/uapi/asm-generic/ioctl.h`) from the argument structs' sizes in `kvm-bindings`, so a
//! struct whose size changes changes its number too. The test below pins every number to the
//! value `<linux/kvm.h>` gives on x86-64.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irq_level, kvm_irq_routing,
    kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// The ioctl type byte of every KVM request (`KVMIO`).
const KVMIO: u64 = 0xAE;

/// `_IOC(dir, type, nr, size)`: direction in bits 30-31, argument size in bits 16-29, type in
/// bits 8-15, number in bits 0-7.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(IOC_NONE, KVMIO, nr, 0)
}
const fn ior(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ, KVMIO, nr, size)
}
const fn iow(nr: u64, size: usize) -> u64 {
    ioc(IOC_WRITE, KVMIO, nr, size)
}
const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, KVMIO, nr, size)
}

// vCPU ioctls.
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior(0x81, size_of::<kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(0x82, size_of::<kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(0x83, size_of::<kvm_sregs>());
pub const KVM_SET_SREGS: u64 = iow(0x84, size_of::<kvm_sregs>());
pub const KVM_GET_MSRS: u64 = iowr(0x88, size_of::<kvm_msrs>());
pub const KVM_SET_MSRS: u64 = iow(0x89, size_of::<kvm_msrs>());
pub const KVM_GET_FPU: u64 = ior(0x8c, size_of::<kvm_fpu>());
pub const KVM_SET_FPU: u64 = iow(0x8d, size_of::<kvm_fpu>());
pub const KVM_GET_LAPIC: u64 = ior(0x8e, size_of::<kvm_lapic_state>());
pub const KVM_SET_LAPIC: u64 = iow(0x8f, size_of::<kvm_lapic_state>());
pub const KVM_GET_MP_STATE: u64 = ior(0x98, size_of::<kvm_mp_state>());
pub const KVM_SET_MP_STATE: u64 = iow(0x99, size_of::<kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u64 = iow(0xa0, size_of::<kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(0xa1, size_of::<kvm_debugregs>());
pub const KVM_SET_DEBUGREGS: u64 = iow(0xa2, size_of::<kvm_debugregs>());
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_XSAVE: u64 = ior(0xa4, size_of::<kvm_xsave>());
pub const KVM_SET_XSAVE: u64 = iow(0xa5, size_of::<kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(0xa6, size_of::<kvm_xcrs>());
pub const KVM_SET_XCRS: u64 = iow(0xa7, size_of::<kvm_xcrs>());
pub const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
pub const KVM_GET_XSAVE2: u64 = ior(0xcf, size_of::<kvm_xsave>());

// VM ioctls.
pub const KVM_GET_DIRTY_LOG: u64 = iow(0x42, size_of::<kvm_dirty_log>());
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, size_of::<kvm_userspace_memory_region>());
pub const KVM_IRQ_LINE: u64 = iow(0x61, size_of::<kvm_irq_level>());
pub const KVM_SET_CLOCK: u64 = iow(0x7b, size_of::<kvm_clock_data>());
pub const KVM_GET_CLOCK: u64 = ior(0x7c, size_of::<kvm_clock_data>());
pub const KVM_SIGNAL_MSI: u64 = iow(0xa5, size_of::<kvm_msi>());
pub const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, size_of::<kvm_irq_routing>());
pub const KVM_IRQFD: u64 = iow(0x76, size_of::<kvm_irqfd>());

// Terminal ioctls (`asm-generic/ioctls.h`): the console's raw mode is set and restored with them.
pub const TCGETS: u64 = 0x5401;
pub const TCSETS: u64 = 0x5402;
pub const TCSETSW: u64 = 0x5403;
pub const TCSETSF: u64 = 0x5404;

/// What the vCPU thread itself runs: `KVM_RUN`, the register reads and writes a run loop may
/// do on an exit, and the interrupt a device model raises while handling an exit.
pub const VCPU_RUN: &[u64] = &[KVM_RUN, KVM_KVMCLOCK_CTRL];

/// Every vCPU state read and write (`hv::Vcpu::state` / `set_state`): done by the vCPU thread,
/// and by the API or migration thread while the VM is paused.
pub const VCPU_STATE: &[u64] = &[
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
];

/// Interrupt delivery into the guest (split irqchip: the IOAPIC is in userspace and sends MSIs).
pub const INTERRUPTS: &[u64] = &[KVM_SIGNAL_MSI, KVM_IRQ_LINE];

/// Keeping the IOAPIC pins' MSI routes and irqfds in line with the redirection entries the
/// guest writes (plain KVM): done by the vCPU thread that takes the IOAPIC write.
pub const IRQ_ROUTING: &[u64] = &[KVM_SET_GSI_ROUTING, KVM_IRQFD];

/// Whole-VM state a snapshot or migration reads and writes: the dirty log (and the memory slot
/// flags that switch it on and off) and the kvmclock.
pub const VM_STATE: &[u64] = &[
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_CLOCK,
    KVM_SET_CLOCK,
];

/// Reading and restoring the terminal's mode (`vmm::exit::cleanup`, which the panic hook runs on
/// whatever thread panicked).
pub const TERMINAL: &[u64] = &[TCGETS, TCSETS, TCSETSW, TCSETSF];

#[cfg(test)]
mod tests {
    use super::*;

    /// The values printed by a C program including `<linux/kvm.h>` and `<termios.h>` on x86-64.
    #[test]
    fn numbers_match_linux_headers() {
        let expected: &[(u64, u64)] = &[
            (KVM_RUN, 0x0000_ae80),
            (KVM_GET_REGS, 0x8090_ae81),
            (KVM_SET_REGS, 0x4090_ae82),
            (KVM_GET_SREGS, 0x8138_ae83),
            (KVM_SET_SREGS, 0x4138_ae84),
            (KVM_GET_FPU, 0x81a0_ae8c),
            (KVM_SET_FPU, 0x41a0_ae8d),
            (KVM_GET_MSRS, 0xc008_ae88),
            (KVM_SET_MSRS, 0x4008_ae89),
            (KVM_GET_LAPIC, 0x8400_ae8e),
            (KVM_SET_LAPIC, 0x4400_ae8f),
            (KVM_GET_MP_STATE, 0x8004_ae98),
            (KVM_SET_MP_STATE, 0x4004_ae99),
            (KVM_GET_VCPU_EVENTS, 0x8040_ae9f),
            (KVM_SET_VCPU_EVENTS, 0x4040_aea0),
            (KVM_GET_DEBUGREGS, 0x8080_aea1),
            (KVM_SET_DEBUGREGS, 0x4080_aea2),
            (KVM_GET_XSAVE, 0x9000_aea4),
            (KVM_SET_XSAVE, 0x5000_aea5),
            (KVM_GET_XSAVE2, 0x9000_aecf),
            (KVM_GET_XCRS, 0x8188_aea6),
            (KVM_SET_XCRS, 0x4188_aea7),
            (KVM_GET_TSC_KHZ, 0x0000_aea3),
            (KVM_KVMCLOCK_CTRL, 0x0000_aead),
            (KVM_SIGNAL_MSI, 0x4020_aea5),
            (KVM_IRQ_LINE, 0x4008_ae61),
            (KVM_SET_GSI_ROUTING, 0x4008_ae6a),
            (KVM_IRQFD, 0x4020_ae76),
            (KVM_GET_DIRTY_LOG, 0x4010_ae42),
            (KVM_SET_USER_MEMORY_REGION, 0x4020_ae46),
            (KVM_GET_CLOCK, 0x8030_ae7c),
            (KVM_SET_CLOCK, 0x4030_ae7b),
            (TCGETS, 0x5401),
            (TCSETSF, 0x5404),
        ];
        for (i, (got, want)) in expected.iter().enumerate() {
            assert_eq!(got, want, "entry {i}: {got:#x} != {want:#x}");
        }
    }
}
