//! VirtualBox `.vbox` machine files (XML, `http://www.virtualbox.org/` namespace): `Machine@name`,
//! `Hardware/CPU@count`, `Hardware/Memory@RAMSize` (MiB), `MediaRegistry/HardDisks/HardDisk`
//! (`uuid`, `location`), `StorageControllers/StorageController/AttachedDevice/Image@uuid`,
//! `Network/Adapter` (`enabled`, `MACAddress`, `type`), and the audio, USB and DVD/floppy
//! devices that are dropped. Differencing images (snapshots) are refused: import the VM with
//! its snapshots deleted or merged.

use std::collections::HashMap;
use std::path::Path;

use roxmltree::Node;

use crate::{
    DiskLoc, DiskSrc, Nic, Result, VmSpec, input, inside, parse_mac, parse_xml, read_descriptor,
};

fn kids<'a>(n: Node<'a, 'a>, name: &'a str) -> impl Iterator<Item = Node<'a, 'a>> + 'a {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn kid<'a>(n: Node<'a, 'a>, name: &'a str) -> Option<Node<'a, 'a>> {
    kids(n, name).next()
}

pub fn describe(path: &Path) -> Result<VmSpec> {
    let text = read_descriptor(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    describe_text(&text, &mut |loc| {
        Ok(DiskLoc::File(inside(dir, loc, "vbox disk location")?))
    })
}

/// VirtualBox adapter types by their chip names.
fn nic_model(t: &str) -> &str {
    match t {
        "Am79C970A" => "PCnet-PCI II (Am79C970A)",
        "Am79C973" => "PCnet-FAST III (Am79C973)",
        "82540EM" => "Intel PRO/1000 MT Desktop (82540EM)",
        "82543GC" => "Intel PRO/1000 T Server (82543GC)",
        "82545EM" => "Intel PRO/1000 MT Server (82545EM)",
        "virtio" => "virtio-net",
        other => other,
    }
}

pub fn describe_text(
    text: &str,
    resolve: &mut dyn FnMut(&str) -> Result<DiskLoc>,
) -> Result<VmSpec> {
    let doc = parse_xml(text, ".vbox file")?;
    let root = doc.root_element();
    let machine = kid(root, "Machine")
        .ok_or_else(|| crate::Error::Input(".vbox file has no Machine element".into()))?;
    let mut spec = VmSpec {
        name: machine.attribute("name").unwrap_or("").to_string(),
        ..VmSpec::default()
    };
    let hw = kid(machine, "Hardware")
        .ok_or_else(|| crate::Error::Input(".vbox file has no Hardware element".into()))?;
    let num = |v: &str, what: &str| -> Result<u64> {
        v.parse()
            .map_err(|_| crate::Error::Input(format!(".vbox file: bad {what} '{v}'")))
    };
    spec.cpus = Some(match kid(hw, "CPU").and_then(|c| c.attribute("count")) {
        Some(c) => u32::try_from(num(c, "CPU count")?)
            .map_err(|_| crate::Error::Input(format!(".vbox file: bad CPU count '{c}'")))?,
        None => 1,
    });
    if let Some(m) = kid(hw, "Memory").and_then(|m| m.attribute("RAMSize")) {
        spec.memory_mib = Some(num(m, "RAMSize")?);
    }
    // Hard disks by uuid; nested HardDisk elements are differencing children.
    let mut disks: HashMap<String, (String, bool)> = HashMap::new();
    if let Some(hd) = kid(machine, "MediaRegistry").and_then(|r| kid(r, "HardDisks")) {
        for d in hd
            .descendants()
            .filter(|d| d.tag_name().name() == "HardDisk")
        {
            let child = d
                .parent()
                .is_some_and(|p| p.tag_name().name() == "HardDisk");
            if let (Some(u), Some(loc)) = (d.attribute("uuid"), d.attribute("location")) {
                disks.insert(u.to_string(), (loc.to_string(), child));
            }
        }
    }
    if let Some(scs) = kid(hw, "StorageControllers").or_else(|| kid(machine, "StorageControllers"))
    {
        for sc in kids(scs, "StorageController") {
            let cname = sc.attribute("name").unwrap_or("controller");
            let ctype = sc.attribute("type").unwrap_or("");
            let mut used = false;
            for ad in kids(sc, "AttachedDevice") {
                let dtype = ad.attribute("type").unwrap_or("");
                let slot = format!(
                    "{cname} port {} device {}",
                    ad.attribute("port").unwrap_or("0"),
                    ad.attribute("device").unwrap_or("0")
                );
                if dtype != "HardDisk" {
                    spec.notes.push(format!(
                        "dropped: {} at {slot}",
                        match dtype {
                            "DVD" => "DVD drive",
                            "Floppy" => "floppy drive",
                            _ => "device",
                        }
                    ));
                    continue;
                }
                let Some(uuid) = kid(ad, "Image").and_then(|i| i.attribute("uuid")) else {
                    return input(format!(".vbox file: disk at {slot} has no image"));
                };
                let Some((loc, child)) = disks.get(uuid) else {
                    return input(format!(
                        ".vbox file: disk at {slot} names unknown image {uuid}"
                    ));
                };
                if *child {
                    return input(format!(
                        ".vbox file: disk at {slot} is a differencing image (a snapshot); delete or merge the VM's snapshots first"
                    ));
                }
                used = true;
                let l = resolve(loc)?;
                spec.disks.push(DiskSrc {
                    slot: format!("{slot} ({loc})"),
                    loc: l,
                });
            }
            if used {
                spec.notes.insert(
                    0,
                    format!("mapped: {ctype} controller '{cname}' -> virtio-blk"),
                );
            }
        }
    }
    if let Some(net) = kid(hw, "Network") {
        for a in kids(net, "Adapter") {
            if a.attribute("enabled") != Some("true") {
                continue;
            }
            let model = nic_model(a.attribute("type").unwrap_or("Am79C973")).to_string();
            let mac = a.attribute("MACAddress").and_then(parse_mac);
            spec.notes.push(format!(
                "mapped: network adapter {} ({model}) -> virtio-net",
                a.attribute("slot").unwrap_or("?")
            ));
            spec.nics.push(Nic { model, mac });
        }
    }
    if let Some(audio) = kid(hw, "AudioAdapter")
        && audio.attribute("enabled") == Some("true")
    {
        spec.notes.push(format!(
            "dropped: sound card ({})",
            audio.attribute("controller").unwrap_or("AC97")
        ));
    }
    if let Some(usb) = kid(hw, "USB").and_then(|u| kid(u, "Controllers")) {
        for c in kids(usb, "Controller") {
            spec.notes.push(format!(
                "dropped: USB controller ({})",
                c.attribute("type").unwrap_or("?")
            ));
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As VirtualBox 7.0 writes a machine file (trimmed).
    const VBOX: &str = r#"<?xml version="1.0"?>
<!--
** DO NOT EDIT THIS FILE.
** If you make changes to this file while any VirtualBox related application
** is running, your changes will be overwritten later, without taking effect.
** Use VBoxManage or the VirtualBox Manager GUI to make changes.
-->
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{5b1e3f0a-1c2d-4e5f-8a9b-0c1d2e3f4a5b}" name="fedora39" OSType="Fedora_64" snapshotFolder="Snapshots" lastStateChange="2024-01-10T10:00:00Z">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{11111111-2222-3333-4444-555555555555}" location="fedora39.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{99999999-2222-3333-4444-555555555555}" location="Snapshots/{9999}.vdi" format="VDI"/>
        </HardDisk>
        <HardDisk uuid="{66666666-2222-3333-4444-555555555555}" location="data.vdi" format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware>
      <CPU count="2">
        <PAE enabled="false"/>
        <LongMode enabled="true"/>
      </CPU>
      <Memory RAMSize="4096"/>
      <Firmware type="EFI"/>
      <Display controller="VMSVGA" VRAMSize="16"/>
      <USB>
        <Controllers>
          <Controller name="OHCI" type="OHCI"/>
          <Controller name="EHCI" type="EHCI"/>
        </Controllers>
      </USB>
      <Network>
        <Adapter slot="0" enabled="true" MACAddress="080027A1B2C3" type="82540EM">
          <NAT localhost-reachable="true"/>
        </Adapter>
        <Adapter slot="1" enabled="true" MACAddress="080027D4E5F6" type="virtio">
          <HostOnlyInterface name="vboxnet0"/>
        </Adapter>
        <Adapter slot="2" type="Am79C973"/>
      </Network>
      <AudioAdapter controller="HDA" driver="Pulse" enabled="true" enabledIn="false"/>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="2" useHostIOCache="false" Bootable="true" IDE0MasterEmulationPort="0" IDE0SlaveEmulationPort="1" IDE1MasterEmulationPort="2" IDE1SlaveEmulationPort="3">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
            <Image uuid="{11111111-2222-3333-4444-555555555555}"/>
          </AttachedDevice>
          <AttachedDevice passthrough="false" type="DVD" hotpluggable="false" port="1" device="0"/>
        </StorageController>
        <StorageController name="IDE" type="PIIX4" PortCount="2" useHostIOCache="true" Bootable="true">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="1">
            <Image uuid="{66666666-2222-3333-4444-555555555555}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"#;

    fn res(n: &str) -> Result<DiskLoc> {
        crate::check_relative(n, "vbox disk location")?;
        Ok(DiskLoc::File(n.into()))
    }

    #[test]
    fn virtualbox_7_machine() {
        let s = describe_text(VBOX, &mut res).unwrap();
        assert_eq!(s.name, "fedora39");
        assert_eq!(s.cpus, Some(2));
        assert_eq!(s.memory_mib, Some(4096));
        assert_eq!(s.disks.len(), 2);
        assert_eq!(s.disks[0].loc, DiskLoc::File("fedora39.vdi".into()));
        assert_eq!(s.nics.len(), 2);
        assert_eq!(s.nics[0].mac, Some([8, 0, 0x27, 0xa1, 0xb2, 0xc3]));
        let notes = s.notes.join("\n");
        for want in [
            "mapped: AHCI controller 'SATA' -> virtio-blk",
            "mapped: PIIX4 controller 'IDE' -> virtio-blk",
            "dropped: DVD drive at SATA port 1 device 0",
            "mapped: network adapter 0 (Intel PRO/1000 MT Desktop (82540EM)) -> virtio-net",
            "mapped: network adapter 1 (virtio-net) -> virtio-net",
            "dropped: sound card (HDA)",
            "dropped: USB controller (OHCI)",
        ] {
            assert!(notes.contains(want), "{want} not in\n{notes}");
        }
    }

    #[test]
    fn snapshots_and_traversal_are_refused() {
        let snap = VBOX.replace(
            "<Image uuid=\"{11111111-2222-3333-4444-555555555555}\"/>",
            "<Image uuid=\"{99999999-2222-3333-4444-555555555555}\"/>",
        );
        let e = describe_text(&snap, &mut res).unwrap_err().to_string();
        assert!(e.contains("differencing"), "{e}");
        let up = VBOX.replace("location=\"data.vdi\"", "location=\"/home/u/data.vdi\"");
        let e = describe_text(&up, &mut res).unwrap_err().to_string();
        assert!(e.contains("outside the package"), "{e}");
    }
}
