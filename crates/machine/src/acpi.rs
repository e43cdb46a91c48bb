//! ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT}, all in the reserved area at
//! [`layout::ACPI_START`].
//!
//! The platform is HW-reduced ACPI: no PM timer, no SCI, no legacy PIC or PIT. Power-off goes
//! through the FADT sleep control register (an I/O port), reset through the FADT reset register.
//! The DSDT declares `\_S5_`, the serial port (PNP0501), one `LNRO0005` (virtio-mmio) device
//! per virtio slot, each with its MMIO window and IOAPIC interrupt, and the power button.
//!
//! Power button: a HW-reduced platform has no fixed-feature button (FADT `PWR_BUTTON` is set:
//! "no fixed power button"), so the button is a control-method device `\_SB_.PWRB` (PNP0C0C,
//! Linux's `button` driver) signalled through a Generic Event Device `\_SB_.GED_` (ACPI0013,
//! Linux's built-in `evged`): an edge on IOAPIC pin [`layout::POWER_BUTTON_IRQ`] makes the guest
//! run `_EVT`, which does `Notify (\_SB_.PWRB, 0x80)`, the "button pressed" notification.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use crate::boot::VirtioSlot;
use crate::layout;

pub const OEM_ID: [u8; 6] = *b"ANYVSR";
pub const OEM_REVISION: u32 = 1;
/// RSDP address (also `boot_params.acpi_rsdp_addr`).
pub const RSDP_ADDR: u64 = layout::ACPI_START;
/// IOAPIC ID announced in the MADT.
pub const IOAPIC_ID: u8 = 0;
/// FADT IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5). Bit 1 (8042 present) is clear,
/// so Linux does not probe a keyboard controller; the i8042 ports still reset the machine.
pub const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// "ANYVISOR" in the FADT hypervisor vendor identity field.
pub const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"ANYVISOR");

const ALIGN: u64 = 64;

/// The tables, each with its guest address.
pub struct AcpiTables {
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The DSDT body (AML after the header).
pub fn dsdt_aml(virtio: &[VirtioSlot]) -> Vec<u8> {
    let mut out = Vec::new();
    let s5 = aml::Package::new(vec![&5u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut out);

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_io = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid, &com1_crs_name],
    );

    struct Virtio {
        name: String,
        uid: u32,
        mem: aml::Memory32Fixed,
        irq: aml::Interrupt,
    }
    let vdevs: Vec<Virtio> = virtio
        .iter()
        .enumerate()
        .map(|(i, s)| Virtio {
            name: format!("VR{i:02}"),
            uid: i as u32,
            mem: aml::Memory32Fixed::new(true, s.base as u32, layout::VIRTIO_MMIO_SIZE as u32),
            irq: aml::Interrupt::new(true, true, false, false, s.irq),
        })
        .collect();
    let mut vbytes = Vec::new();
    for v in &vdevs {
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &v.uid);
        let crs_t = aml::ResourceTemplate::new(vec![&v.mem, &v.irq]);
        let crs = aml::Name::new("_CRS".into(), &crs_t);
        aml::Device::new(v.name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut vbytes);
    }
    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(&self.0);
        }
    }
    let raw = Raw(vbytes);

    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &0u8);
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &0u8);
    let ged_irq = aml::Interrupt::new(true, true, false, false, layout::POWER_BUTTON_IRQ);
    let ged_crs_t = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = aml::Name::new("_CRS".into(), &ged_crs_t);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb_path, &0x80u8);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt]);

    aml::Scope::new("\\_SB_".into(), vec![&com1, &raw, &pwrb, &ged]).to_aml_bytes(&mut out);
    out
}

/// Builds the tables for `cpus` vCPUs (APIC IDs 0..cpus) and the given virtio slots.
pub fn build(cpus: u32, virtio: &[VirtioSlot]) -> AcpiTables {
    let align = |a: u64| a.div_ceil(ALIGN) * ALIGN;
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"ANYVDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(virtio));
    let dsdt = bytes(&dsdt);

    let mut fadt = FADTBuilder::new(OEM_ID, *b"ANYVFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_gas(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_gas(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();

    let mut madt = MADT::new(
        OEM_ID,
        *b"ANYVMADT",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_BASE as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, layout::IOAPIC_BASE as u32, 0));
    let madt = bytes(&madt);

    // XSDT: two entries (FADT, MADT), 36 + 16 bytes.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let fadt = bytes(&fadt.dsdt_64(dsdt_addr).finalize());

    let mut xsdt = XSDT::new(OEM_ID, *b"ANYVXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    AcpiTables {
        tables: vec![
            (RSDP_ADDR, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    }
}

impl AcpiTables {
    /// End (exclusive) of the last table.
    pub fn end(&self) -> u64 {
        self.tables
            .iter()
            .map(|(a, t)| a + t.len() as u64)
            .max()
            .unwrap_or(RSDP_ADDR)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A small independent parser that walks the tables as a guest would.
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) struct Mem(pub BTreeMap<u64, Vec<u8>>);

    impl Mem {
        pub fn from_tables(t: &AcpiTables) -> Mem {
            Mem(t.tables.iter().cloned().collect())
        }

        /// `len` bytes at `addr`, which must lie within one table.
        pub fn read(&self, addr: u64, len: usize) -> &[u8] {
            let (base, t) = self
                .0
                .range(..=addr)
                .next_back()
                .expect("address below tables");
            let off = (addr - base) as usize;
            &t[off..off + len]
        }
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a table at `addr`, checking its checksum; returns (signature, whole table).
    pub(crate) fn table(mem: &Mem, addr: u64) -> (String, Vec<u8>) {
        let hdr = mem.read(addr, 36);
        let len = u32_at(hdr, 4) as usize;
        let t = mem.read(addr, len).to_vec();
        assert_eq!(sum(&t), 0, "checksum of table at {addr:#x}");
        (String::from_utf8_lossy(&t[0..4]).into_owned(), t)
    }

    /// Walks RSDP -> XSDT -> tables; returns them by signature.
    pub(crate) fn walk(mem: &Mem, rsdp_addr: u64) -> BTreeMap<String, Vec<u8>> {
        let rsdp = mem.read(rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(rsdp[15], 2, "revision");
        let (sig, xsdt) = table(mem, u64_at(rsdp, 24));
        assert_eq!(sig, "XSDT");
        let mut out = BTreeMap::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let (sig, t) = table(mem, u64_at(&xsdt, 36 + 8 * i));
            if sig == "FACP" {
                let (dsig, dsdt) = table(mem, u64_at(&t, 140));
                assert_eq!(dsig, "DSDT");
                out.insert(dsig, dsdt);
            }
            out.insert(sig, t);
        }
        out
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn tables_checksum_and_parse() {
        for cpus in [1u32, 4] {
            let slots: Vec<VirtioSlot> =
                (0..3).map(|i| VirtioSlot::for_index(i).unwrap()).collect();
            let t = build(cpus, &slots);
            assert!(t.end() <= layout::ACPI_END);
            let mem = Mem::from_tables(&t);
            let tables = walk(&mem, RSDP_ADDR);
            assert_eq!(
                tables.keys().cloned().collect::<Vec<_>>(),
                vec!["APIC", "DSDT", "FACP"]
            );

            let madt = &tables["APIC"];
            assert_eq!(u32_at(madt, 36), layout::LAPIC_BASE as u32);
            assert_eq!(u32_at(madt, 40), 0, "no PC-AT compatible PICs");
            let mut off = 44;
            let (mut lapics, mut ioapics) = (Vec::new(), Vec::new());
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                match ty {
                    0 => {
                        assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                        lapics.push((madt[off + 2], madt[off + 3]));
                    }
                    1 => {
                        ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8)))
                    }
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapics, (0..cpus as u8).map(|i| (i, i)).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(0, layout::IOAPIC_BASE as u32, 0)]);

            let fadt = &tables["FACP"];
            assert_eq!(fadt.len(), 276);
            let flags = u32_at(fadt, 112);
            assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
            // RESET_REG: system I/O, 8 bits, port 0x604; value 1.
            assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
            assert_eq!(u64_at(fadt, 120), 0x604);
            assert_eq!(fadt[128], 1);
            // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
            assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
            assert_eq!(u64_at(fadt, 248), 0x600);
            assert_eq!(u64_at(fadt, 260), 0x601);
            assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);

            let dsdt = &tables["DSDT"];
            // Name(_S5_, Package(2) {5, 0})
            assert_eq!(
                find(
                    dsdt,
                    &[
                        0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00
                    ]
                ),
                1
            );
            assert_eq!(find(dsdt, b"COM1"), 1);
            assert_eq!(find(dsdt, b"LNRO0005"), 3);
            // The power button and the GED that notifies it on IOAPIC pin 21 (edge, high).
            assert_eq!(find(dsdt, b"PWRB"), 2, "the device and the Notify target");
            assert_eq!(find(dsdt, b"ACPI0013"), 1);
            assert_eq!(find(dsdt, b"_EVT"), 1);
            let mut ged_irq = vec![0x89, 6, 0, 0x03, 1];
            ged_irq.extend_from_slice(&layout::POWER_BUTTON_IRQ.to_le_bytes());
            assert_eq!(find(dsdt, &ged_irq), 1);
            for s in &slots {
                // Memory32Fixed descriptor: base and length.
                let mut d = vec![0x86, 9, 0, 1];
                d.extend_from_slice(&(s.base as u32).to_le_bytes());
                d.extend_from_slice(&0x1000u32.to_le_bytes());
                assert_eq!(find(dsdt, &d), 1, "slot {:#x}", s.base);
                // Extended interrupt descriptor: consumer, edge, active-high, exclusive.
                let mut irq = vec![0x89, 6, 0, 0x03, 1];
                irq.extend_from_slice(&s.irq.to_le_bytes());
                assert_eq!(find(dsdt, &irq), 1);
            }
        }
    }

    #[test]
    fn many_cpus_fit() {
        let slots: Vec<VirtioSlot> = (0..layout::MAX_VIRTIO_SLOTS)
            .map(|i| VirtioSlot::for_index(i).unwrap())
            .collect();
        let t = build(254, &slots);
        assert!(t.end() <= layout::ACPI_END);
        walk(&Mem::from_tables(&t), RSDP_ADDR);
    }
}
