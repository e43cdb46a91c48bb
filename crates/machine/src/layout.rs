//! The guest physical memory map and fixed addresses of the platform.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   RAM (boot structures below 1 MiB, see below)
//! 0x0009_fc00 .. 0x0010_0000   reserved (EBDA, ACPI tables at 0xe0000)
//! 0x0010_0000 .. 0xc000_0000   RAM (kernel, initrd, the rest)
//! 0xc000_0000 .. 0x1_0000_0000 MMIO hole: virtio-mmio slots, IOAPIC, local APIC
//! 0x1_0000_0000 ..             RAM above the hole
//! ```

/// Start of the MMIO hole; RAM that would fall in it is placed from 4 GiB up.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// First virtio-mmio slot; slot `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pin of virtio slot 0; slot `i` uses pin `VIRTIO_IRQ_BASE + i` (edge-triggered).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Number of virtio-mmio slots (pins 5..=20).
pub const MAX_VIRTIO_SLOTS: u32 = 16;

/// IOAPIC register window (one page).
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Local APIC register page (served by the backend, never by the platform bus).
pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// IOAPIC pin (and ISA IRQ) of the serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IOAPIC pin of the ACPI Generic Event Device (`\_SB_.GED_`): an edge on it makes the guest
/// run the GED's `_EVT`, which notifies the power button `\_SB_.PWRB` (edge-triggered).
pub const POWER_BUTTON_IRQ: u32 = 21;
/// First port of the 16550 serial port (COM1); it decodes 8 ports.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
/// ACPI sleep control register (FADT SLEEP_CONTROL_REG), 8 bits.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT SLEEP_STATUS_REG), 8 bits.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT RESET_REG), 8 bits; writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_RESET_PORT: u16 = 0x604;
pub const ACPI_RESET_VALUE: u8 = 1;

/// GDT of the 64-bit boot state.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// IDT of the 64-bit boot state (empty: limit 0).
pub const BOOT_IDT_ADDR: u64 = 0x540;
/// Linux `boot_params` ("zero page").
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Initial stack pointer of the bootstrap processor.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD (2 MiB pages covering the first GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xA000;
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line length including the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory listed as RAM in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area (reserved in e820); the RSDP is at its start.
pub const ACPI_START: u64 = 0xE0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory; kernels are loaded from here up.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Highest initrd end address when the kernel does not say otherwise.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x3800_0000;

/// Smallest and largest guest RAM sizes accepted.
pub const MIN_MEMORY: u64 = 1 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;

/// Guest RAM regions for `mem_bytes` of RAM: `(guest address, length)`, RAM below the hole
/// first, the remainder from 4 GiB. Empty for 0.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut regions = Vec::new();
    let low = mem_bytes.min(MMIO_HOLE_START);
    if low > 0 {
        regions.push((0, low));
    }
    if mem_bytes > low {
        regions.push((MMIO_HOLE_END, mem_bytes - low));
    }
    regions
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

/// e820 entry types used by the platform.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map the guest is given: `(address, length, type)`.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let low_end = low_ram_end(mem_bytes);
    let mut map = vec![(0, EBDA_START.min(low_end), E820_RAM)];
    if low_end > EBDA_START {
        map.push((EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED));
    }
    if low_end > HIGH_MEMORY_START {
        map.push((HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM));
    }
    if mem_bytes > low_end {
        map.push((MMIO_HOLE_END, mem_bytes - low_end, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn check(mem: u64) {
        let r = ram_regions(mem);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), mem, "{mem:#x}");
        for &(a, l) in &r {
            assert!(
                a + l <= MMIO_HOLE_START || a >= MMIO_HOLE_END,
                "{a:#x}+{l:#x}"
            );
        }
    }

    #[test]
    fn layouts() {
        for mem in [256 * MIB, 3 * GIB, 4 * GIB, 8 * GIB] {
            check(mem);
        }
        assert_eq!(ram_regions(256 * MIB), vec![(0, 256 * MIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(0, 3 * GIB)]);
        assert_eq!(ram_regions(4 * GIB), vec![(0, 3 * GIB), (4 * GIB, GIB)]);
        assert_eq!(ram_regions(8 * GIB), vec![(0, 3 * GIB), (4 * GIB, 5 * GIB)]);
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn virtio_slots_are_in_the_hole_and_avoid_serial() {
        let last = VIRTIO_MMIO_BASE + u64::from(MAX_VIRTIO_SLOTS) * VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START && last <= IOAPIC_BASE);
        const { assert!(VIRTIO_IRQ_BASE > SERIAL_IRQ) };
        const { assert!(VIRTIO_IRQ_BASE + MAX_VIRTIO_SLOTS <= 24) };
        const { assert!(POWER_BUTTON_IRQ >= VIRTIO_IRQ_BASE + MAX_VIRTIO_SLOTS) };
        const { assert!(POWER_BUTTON_IRQ < 24) };
    }

    #[test]
    fn e820_contents() {
        assert_eq!(
            e820_map(256 * MIB),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (MIB, 255 * MIB, E820_RAM),
            ]
        );
        let m = e820_map(8 * GIB);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2], (MIB, 3 * GIB - MIB, E820_RAM));
        assert_eq!(m[3], (4 * GIB, 5 * GIB, E820_RAM));
        // RAM in e820 plus the reserved low area equals the memory size.
        let total: u64 = m.iter().map(|e| e.1).sum();
        assert_eq!(total, 8 * GIB);
        // The ACPI area is inside a reserved entry.
        assert!(
            m.iter()
                .any(|&(a, l, t)| t == E820_RESERVED && a <= ACPI_START && a + l >= ACPI_END)
        );
    }
}
