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

/// A memory-mapped device (the contract is `hv`'s, shared with `virtio`'s transports).
pub use hv::MmioHandler;
