//! The guest-visible platform of anyvisor: memory map, devices, ACPI tables and the Linux boot
//! state. Everything here is identical on every hypervisor backend; the specification is
//! `docs/platform.md`.
//!
//! * [`layout`]: where RAM, the MMIO hole, virtio slots and the interrupt controllers live.
//! * [`memory`]: creates guest RAM with a dirty bitmap.
//! * [`boot`]: loads a Linux kernel (bzImage or ELF vmlinux), writes boot parameters, the e820
//!   map and ACPI tables, and returns the initial state of every vCPU.
//! * [`platform`]: the device bus (serial, i8042, ACPI power management, IOAPIC, registered
//!   MMIO devices) behind [`hv::DeviceIo`], with saveable state.

pub mod acpi;
pub mod boot;
pub mod devices;
/// Fuzz entry points: only in fuzzing builds (`--features fuzzing`, as `fuzz/Cargo.toml` sets)
/// and this crate's own tests; production builds do not carry them.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod layout;
pub mod memory;
pub mod platform;

pub use boot::{BootConfig, VirtioSlot, load_linux};
pub use devices::{IrqLine, MmioHandler, PlatformEvent, PlatformEvents};
pub use memory::create_guest_memory;
pub use platform::{Platform, PlatformCounters, PlatformState};
