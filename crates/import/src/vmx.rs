//! VMware `.vmx`: `key = "value"` lines (keys case-insensitive, `|XX` hex escapes in values).
//! Read: `displayName`, `numvcpus`, `memsize` (MiB), disks on `scsiN:M`, `sataN:M`, `nvmeN:M`,
//! `ideN:M` (`.present`, `.fileName`, `.deviceType`), `ethernetN` (`.virtualDev`,
//! `.address`/`.generatedAddress`), and the USB, sound, floppy, serial and CD-ROM devices that
//! are dropped. Disk files must lie next to the .vmx.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{DiskLoc, DiskSrc, Nic, Result, VmSpec, input, inside, parse_mac, read_descriptor};

/// `key = "value"` lines, keys lower-cased.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        m.insert(k.trim().to_ascii_lowercase(), unescape(v));
    }
    m
}

/// VMware writes special characters as `|XX` (hex).
fn unescape(v: &str) -> String {
    let mut out = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'|'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Ok(s) = std::str::from_utf8(h)
            && let Ok(x) = u8::from_str_radix(s, 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn truthy(m: &BTreeMap<String, String>, k: &str) -> bool {
    m.get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

pub fn describe(path: &Path) -> Result<VmSpec> {
    let text = read_descriptor(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    describe_text(&text, &mut |name| {
        Ok(DiskLoc::File(inside(dir, name, "vmx disk file")?))
    })
}

pub fn describe_text(
    text: &str,
    resolve: &mut dyn FnMut(&str) -> Result<DiskLoc>,
) -> Result<VmSpec> {
    let m = parse(text);
    let mut spec = VmSpec {
        name: m.get("displayname").cloned().unwrap_or_default(),
        ..VmSpec::default()
    };
    if let Some(c) = m.get("numvcpus") {
        spec.cpus = Some(
            c.parse()
                .map_err(|_| crate::Error::Input(format!("vmx: bad numvcpus '{c}'")))?,
        );
    }
    if let Some(mem) = m.get("memsize") {
        spec.memory_mib = Some(
            mem.parse()
                .map_err(|_| crate::Error::Input(format!("vmx: bad memsize '{mem}'")))?,
        );
    }
    // Devices: BUS N:M, boot order scsi, sata, nvme, ide.
    let mut controllers_used: Vec<String> = Vec::new();
    for bus in ["scsi", "sata", "nvme", "ide"] {
        let mut slots: Vec<(u32, u32, String)> = m
            .keys()
            .filter_map(|k| {
                let rest = k.strip_prefix(bus)?;
                let (slot, field) = rest.split_once('.')?;
                if field != "present" {
                    return None;
                }
                let (c, u) = slot.split_once(':')?;
                Some((c.parse().ok()?, u.parse().ok()?, format!("{bus}{slot}")))
            })
            .collect();
        slots.sort();
        for (c, _, slot) in slots {
            if !truthy(&m, &format!("{slot}.present")) {
                continue;
            }
            let file = m
                .get(&format!("{slot}.filename"))
                .cloned()
                .unwrap_or_default();
            let dtype = m
                .get(&format!("{slot}.devicetype"))
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_default();
            let is_disk = match dtype.as_str() {
                "" => file.to_ascii_lowercase().ends_with(".vmdk"),
                d => d.contains("harddisk") || d == "disk",
            };
            if !is_disk {
                spec.notes.push(format!(
                    "dropped: {} at {slot} ({})",
                    if dtype.contains("cdrom") || file.to_ascii_lowercase().ends_with(".iso") {
                        "CD-ROM drive"
                    } else {
                        "device"
                    },
                    if dtype.is_empty() {
                        "no device type"
                    } else {
                        &dtype
                    }
                ));
                continue;
            }
            if file.is_empty() {
                return input(format!("vmx: disk {slot} has no fileName"));
            }
            let ctl = format!("{bus}{c}");
            if !controllers_used.contains(&ctl) {
                controllers_used.push(ctl);
            }
            let loc = resolve(&file)?;
            spec.disks.push(DiskSrc {
                slot: format!("{slot} ({file})"),
                loc,
            });
        }
    }
    for ctl in controllers_used {
        let kind = match ctl.trim_end_matches(|c: char| c.is_ascii_digit()) {
            "scsi" => "SCSI controller",
            "sata" => "SATA controller",
            "nvme" => "NVMe controller",
            _ => "IDE controller",
        };
        let dev = m
            .get(&format!("{ctl}.virtualdev"))
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        spec.notes
            .push(format!("mapped: {kind} {ctl}{dev} -> virtio-blk"));
    }
    let mut eth: Vec<u32> = m
        .keys()
        .filter_map(|k| {
            k.strip_prefix("ethernet")?
                .strip_suffix(".present")?
                .parse()
                .ok()
        })
        .collect();
    eth.sort();
    for n in eth {
        let p = format!("ethernet{n}");
        if !truthy(&m, &format!("{p}.present")) {
            continue;
        }
        let model = m
            .get(&format!("{p}.virtualdev"))
            .cloned()
            .unwrap_or_else(|| "vlance".into());
        let mac = m
            .get(&format!("{p}.address"))
            .or_else(|| m.get(&format!("{p}.generatedaddress")))
            .and_then(|a| parse_mac(a));
        spec.notes.push(format!(
            "mapped: network adapter {p} ({model}) -> virtio-net"
        ));
        spec.nics.push(Nic { model, mac });
    }
    for (key, what) in [
        ("usb.present", "USB controller (usb)"),
        ("ehci.present", "USB 2 controller (ehci)"),
        ("usb_xhci.present", "USB 3 controller (usb_xhci)"),
        ("sound.present", "sound card"),
        ("floppy0.present", "floppy drive"),
        (
            "serial0.present",
            "serial port serial0 (the guest console is anyvisor's ttyS0)",
        ),
        ("parallel0.present", "parallel port"),
    ] {
        if truthy(&m, key) {
            let dev = if key == "sound.present" {
                m.get("sound.virtualdev")
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            spec.notes.push(format!("dropped: {what}{dev}"));
        }
    }
    if m.get("firmware")
        .is_some_and(|f| f.eq_ignore_ascii_case("efi"))
    {
        spec.notes.push(
            "mapped: firmware efi -> direct kernel boot from the disk (docs/boot-from-disk.md)"
                .into(),
        );
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As VMware Workstation 17 writes it (trimmed).
    const VMX: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "20"
pciBridge0.present = "TRUE"
vmci0.present = "TRUE"
hpet0.present = "TRUE"
nvram = "Debian 12.x 64-bit.nvram"
virtualHW.productCompatibility = "hosted"
powerType.powerOff = "soft"
displayName = "Debian 12.x 64|2Dbit"
guestOS = "debian12-64"
firmware = "efi"
numvcpus = "4"
cpuid.coresPerSocket = "2"
memsize = "2048"
scsi0.virtualDev = "lsilogic"
scsi0.present = "TRUE"
scsi0:0.fileName = "Debian 12.x 64-bit.vmdk"
scsi0:0.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
scsi0:1.present = "TRUE"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "/isos/debian-12.5.0-amd64-netinst.iso"
sata0:1.present = "TRUE"
usb.present = "TRUE"
ehci.present = "TRUE"
usb_xhci.present = "TRUE"
sound.present = "TRUE"
sound.virtualDev = "hdaudio"
sound.fileName = "-1"
sound.autodetect = "TRUE"
floppy0.present = "FALSE"
ethernet0.connectionType = "nat"
ethernet0.addressType = "generated"
ethernet0.virtualDev = "e1000"
ethernet0.present = "TRUE"
ethernet0.generatedAddress = "00:0c:29:3a:5b:7c"
ethernet1.virtualDev = "vmxnet3"
ethernet1.present = "TRUE"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:00:00:01"
ethernet2.present = "FALSE"
"#;

    #[test]
    fn workstation_vmx() {
        let mut names = Vec::new();
        let s = describe_text(VMX, &mut |n| {
            crate::check_relative(n, "vmx disk file")?;
            names.push(n.to_string());
            Ok(DiskLoc::File(n.into()))
        })
        .unwrap();
        assert_eq!(s.name, "Debian 12.x 64-bit");
        assert_eq!(s.cpus, Some(4));
        assert_eq!(s.memory_mib, Some(2048));
        assert_eq!(names, ["Debian 12.x 64-bit.vmdk", "data.vmdk"]);
        assert_eq!(s.nics.len(), 2);
        assert_eq!(s.nics[0].mac, Some([0, 0x0c, 0x29, 0x3a, 0x5b, 0x7c]));
        assert_eq!(s.nics[1].model, "vmxnet3");
        let notes = s.notes.join("\n");
        for want in [
            "mapped: SCSI controller scsi0 (lsilogic) -> virtio-blk",
            "dropped: CD-ROM drive at sata0:1 (cdrom-image)",
            "mapped: network adapter ethernet0 (e1000) -> virtio-net",
            "mapped: network adapter ethernet1 (vmxnet3) -> virtio-net",
            "dropped: USB controller (usb)",
            "dropped: USB 3 controller (usb_xhci)",
            "dropped: sound card (hdaudio)",
            "mapped: firmware efi",
        ] {
            assert!(notes.contains(want), "{want} not in\n{notes}");
        }
        assert!(!notes.contains("floppy"), "{notes}");
    }

    #[test]
    fn traversal_and_bad_numbers() {
        let bad = VMX.replace("\"data.vmdk\"", "\"../../other/data.vmdk\"");
        let e = describe_text(&bad, &mut |n| {
            crate::check_relative(n, "vmx disk file")?;
            Ok(DiskLoc::File(n.into()))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("outside the package"), "{e}");
        let bad = VMX.replace("numvcpus = \"4\"", "numvcpus = \"lots\"");
        assert!(describe_text(&bad, &mut |n| Ok(DiskLoc::File(n.into()))).is_err());
    }
}
