//! The platform bus (16550 serial, i8042, ACPI sleep and reset registers, IOAPIC, an MMIO
//! device) under guest port and MMIO accesses, serial input, interrupt edges and save/restore
//! round trips: never panic, and always accept its own saved state. Format: `machine::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    machine::fuzz::platform_io(data);
});
