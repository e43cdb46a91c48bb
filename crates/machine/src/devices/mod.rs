//! The platform's devices. They are plain state machines; [`crate::platform::Platform`] owns
//! them, dispatches guest accesses and saves their state.

pub mod i8042;
pub mod ioapic;
pub mod pci;
pub mod serial;

pub use ioapic::IrqLine;

/// A platform-level request raised by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformEvent {
    /// ACPI S5 (soft off).
    PowerOff,
    /// ACPI reset register or i8042 reset pulse.
    Reset,
}

/// Receives [`PlatformEvent`]s; implemented by the VMM (stops or restarts the vCPUs).
pub trait PlatformEvents: Send + Sync {
    fn request(&self, ev: PlatformEvent);
}

/// A memory-mapped device. `offset` is relative to the base it was registered at;
/// `data.len()` is 1, 2, 4 or 8.
pub trait MmioHandler: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}
