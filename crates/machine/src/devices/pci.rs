//! PCI configuration mechanism #1 (ports 0xcf8/0xcfc) with one device behind it: a host
//! bridge at 00:00.0. Nothing else is on the bus; every other bus, slot and function reads as
//! absent (vendor 0xffff).
//!
//! Why it exists: the platform has no PCI devices (virtio is virtio-mmio), but x86 Linux prints
//! `PCI: Fatal: No config space access function found` at every boot unless it finds a
//! configuration access method, and its conf1 probe (`pci_check_type1` in
//! arch/x86/pci/direct.c) only accepts the ports when the bus holds a host bridge or a VGA
//! device (its "sanity check"). A host bridge and the address latch are the whole device: the
//! guest finds conf1, and without a `PNP0A03` root in the DSDT ACPI Linux enumerates nothing.
//!
//! Written by hand: the register file is a dozen read-only bytes and one latch; the PCI crates
//! of other VMMs (cloud-hypervisor's `pci`, the `vm-device` bus) bring a device model, BAR
//! allocation and MSI plumbing this platform has no use for.
//!
//! The bridge has the ids QEMU's generic PCIe host bridge uses (vendor 0x1b36 Red Hat,
//! device 0x0008, documented in QEMU's `docs/specs/pci-ids.rst` as the id for virtual host
//! bridges), so no driver or quirk for a real chipset matches it. Class 06/00/00 (host
//! bridge), header type 0 (single function), no BARs, no capabilities, read-only: writes to its
//! configuration space are dropped.

use serde::{Deserialize, Serialize};

/// CONFIG_ADDRESS: a dword register at this port.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// CONFIG_DATA: four ports, byte `i` of the addressed configuration dword at `0xcfc + i`.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;

/// Bits of CONFIG_ADDRESS that hold state: enable (31), bus (23:16), device (15:11),
/// function (10:8), register (7:2). Bits 30:24 are reserved and bits 1:0 read as 0.
pub const ADDRESS_MASK: u32 = 0x80ff_fffc;
const ENABLE: u32 = 1 << 31;

/// Host bridge identity (see the module doc).
pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x0008;
/// Base class 0x06 (bridge), subclass 0x00 (host bridge), programming interface 0.
pub const CLASS_HOST_BRIDGE: u8 = 0x06;

/// Saved state: the CONFIG_ADDRESS latch. Absent from snapshots older than the device
/// (`#[serde(default)]` in `PlatformState`): the latch then starts at 0, as at power-on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHostState {
    pub config_address: u32,
}

impl PciHostState {
    pub fn validate(&self) -> Result<(), String> {
        if self.config_address & !ADDRESS_MASK != 0 {
            return Err(format!(
                "PCI CONFIG_ADDRESS {:#x} has reserved bits set",
                self.config_address
            ));
        }
        Ok(())
    }
}

/// The configuration mechanism and its host bridge.
#[derive(Default)]
pub struct PciHost {
    s: PciHostState,
}

/// The host bridge's configuration space byte at `offset` (0..256).
fn bridge_config_byte(offset: u8) -> u8 {
    let [vendor_lo, vendor_hi] = VENDOR_ID.to_le_bytes();
    let [device_lo, device_hi] = DEVICE_ID.to_le_bytes();
    match offset {
        0x00 => vendor_lo,
        0x01 => vendor_hi,
        0x02 => device_lo,
        0x03 => device_hi,
        0x0b => CLASS_HOST_BRIDGE,
        // Command, status, revision, subclass, programming interface, header type 0 and the
        // rest: zero (no BARs, no capabilities list, no interrupt pin).
        _ => 0,
    }
}

impl PciHost {
    /// Whether the access is one this device decodes: a dword at CONFIG_ADDRESS, or anything
    /// inside CONFIG_DATA. Narrower accesses to 0xcf8..=0xcfb are not decoded (on real
    /// chipsets they are other registers, such as 0xcf9 reset control; here nothing).
    pub fn claims(port: u16, len: usize) -> bool {
        (port == CONFIG_ADDRESS_PORT && len == 4)
            || (CONFIG_DATA_PORT..CONFIG_DATA_PORT + 4).contains(&port)
    }

    /// A read of `data.len()` bytes at `port`; call only when [`PciHost::claims`] says so.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS_PORT {
            for (d, b) in data.iter_mut().zip(self.s.config_address.to_le_bytes()) {
                *d = b;
            }
            return;
        }
        let lane = port.wrapping_sub(CONFIG_DATA_PORT);
        for (i, d) in data.iter_mut().enumerate() {
            *d = u16::try_from(i)
                .ok()
                .and_then(|i| lane.checked_add(i))
                .filter(|&l| l < 4)
                .and_then(|l| self.config_byte(l))
                .unwrap_or(0xff);
        }
    }

    /// A write at `port`; call only when [`PciHost::claims`] says so.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS_PORT
            && let Ok(v) = <[u8; 4]>::try_from(data)
        {
            self.s.config_address = u32::from_le_bytes(v) & ADDRESS_MASK;
        }
        // CONFIG_DATA writes: the bridge is read-only and nothing else exists.
    }

    /// Byte `lane` (0..4) of the dword CONFIG_ADDRESS selects, or `None` (reads as 0xff) when
    /// the mechanism is disabled or the function does not exist.
    fn config_byte(&self, lane: u16) -> Option<u8> {
        let a = self.s.config_address;
        // Bus, device and function (bits 23:8) all zero: the host bridge.
        if a & ENABLE == 0 || a & 0x00ff_ff00 != 0 {
            return None;
        }
        let reg = u8::try_from(a & 0xfc).ok()?;
        let lane = u8::try_from(lane).ok()?;
        Some(bridge_config_byte(reg | lane))
    }

    pub fn state(&self) -> PciHostState {
        self.s.clone()
    }

    pub fn restore(&mut self, s: &PciHostState) -> Result<(), String> {
        s.validate()?;
        self.s = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outl(p: &mut PciHost, port: u16, v: u32) {
        assert!(PciHost::claims(port, 4));
        p.write(port, &v.to_le_bytes());
    }

    fn inl(p: &PciHost, port: u16) -> u32 {
        let mut b = [0; 4];
        p.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_read(p: &mut PciHost, bus: u32, dev: u32, func: u32, reg: u32, len: usize) -> u32 {
        outl(
            p,
            0xcf8,
            ENABLE | bus << 16 | dev << 11 | func << 8 | (reg & 0xfc),
        );
        let port = 0xcfc + (reg & 3) as u16;
        assert!(PciHost::claims(port, len));
        let mut b = [0; 4];
        p.read(port, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    /// What Linux's `pci_check_type1` does: the latch reads back 0x80000000, then the sanity
    /// check finds a host bridge by class at 00:00.0.
    #[test]
    fn linux_conf1_probe_passes() {
        let mut p = PciHost::default();
        // outb(0x01, 0xcfb) is not the address register.
        assert!(!PciHost::claims(0xcfb, 1));
        let saved = inl(&p, 0xcf8);
        outl(&mut p, 0xcf8, 0x8000_0000);
        assert_eq!(inl(&p, 0xcf8), 0x8000_0000);
        outl(&mut p, 0xcf8, saved);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x0a, 2), 0x0600);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x00, 2), 0x1b36);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x00, 4), 0x0008_1b36);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x08, 4), 0x0600_0000);
        // Header type 0, single function.
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x0e, 1), 0);
    }

    #[test]
    fn only_the_host_bridge_exists() {
        let mut p = PciHost::default();
        for (bus, dev, func) in [(0, 0, 1), (0, 1, 0), (0, 31, 7), (1, 0, 0), (255, 0, 0)] {
            assert_eq!(cfg_read(&mut p, bus, dev, func, 0, 4), 0xffff_ffff);
            assert_eq!(cfg_read(&mut p, bus, dev, func, 0, 2), 0xffff);
        }
        // Disabled: nothing answers, not even the bridge.
        outl(&mut p, 0xcf8, 0);
        assert_eq!(inl(&p, 0xcfc), 0xffff_ffff);
    }

    #[test]
    fn bytes_and_words_at_every_lane() {
        let mut p = PciHost::default();
        let dword = cfg_read(&mut p, 0, 0, 0, 0, 4).to_le_bytes();
        for lane in 0..4u16 {
            let mut b = [0u8; 1];
            p.read(0xcfc + lane, &mut b);
            assert_eq!(b[0], dword[usize::from(lane)]);
        }
        let mut w = [0u8; 2];
        p.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        // A word at 0xcff: the byte past CONFIG_DATA reads as 0xff.
        p.read(0xcff, &mut w);
        assert_eq!(w, [0x00, 0xff]);
    }

    #[test]
    fn latch_masks_reserved_bits_and_ignores_narrow_writes() {
        let mut p = PciHost::default();
        outl(&mut p, 0xcf8, 0xffff_ffff);
        assert_eq!(inl(&p, 0xcf8), ADDRESS_MASK);
        assert!(!PciHost::claims(0xcf8, 2) && !PciHost::claims(0xcf8, 1));
        assert!(!PciHost::claims(0xcf9, 4) && !PciHost::claims(0xcf7, 4));
        assert!(PciHost::claims(0xcfd, 1) && !PciHost::claims(0xd00, 1));
        p.write(0xcf8, &[0, 0]);
        assert_eq!(inl(&p, 0xcf8), ADDRESS_MASK);
    }

    #[test]
    fn configuration_space_is_read_only() {
        let mut p = PciHost::default();
        let before: Vec<u32> = (0..64)
            .map(|r| cfg_read(&mut p, 0, 0, 0, r * 4, 4))
            .collect();
        for r in 0..64u32 {
            outl(&mut p, 0xcf8, ENABLE | (r * 4));
            // BAR sizing writes all-ones; the bridge has no BARs.
            p.write(0xcfc, &[0xff; 4]);
            p.write(0xcfd, &[0x55]);
        }
        let after: Vec<u32> = (0..64)
            .map(|r| cfg_read(&mut p, 0, 0, 0, r * 4, 4))
            .collect();
        assert_eq!(before, after);
        assert_eq!(before.iter().skip(1).filter(|&&v| v != 0).count(), 1);
    }

    #[test]
    fn state_round_trip_and_validation() {
        let mut p = PciHost::default();
        outl(&mut p, 0xcf8, ENABLE | 0x0a);
        let st = p.state();
        assert_eq!(st.config_address, ENABLE | 0x08);
        let mut q = PciHost::default();
        q.restore(&st).unwrap();
        assert_eq!(inl(&q, 0xcfc), inl(&p, 0xcfc));
        assert_eq!(inl(&q, 0xcfc), 0x0600_0000);
        for bad in [1, 2, 0x4000_0000, 0x0100_0000] {
            let s = PciHostState {
                config_address: ENABLE | bad,
            };
            assert!(q.restore(&s).is_err());
            assert_eq!(q.state(), st);
        }
    }
}
