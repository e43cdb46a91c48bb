//! OVF descriptors (DMTF DSP0243): `References/File`, `DiskSection/Disk`, and the first
//! `VirtualSystem`'s `VirtualHardwareSection` items (CIM RASD resource types: 3 CPU, 4 memory,
//! 5/6/20 IDE/SCSI/other (SATA) controllers, 10 Ethernet, 14/15/16 floppy/CD/DVD, 17 disk,
//! 23 USB, 35 sound). Namespaces are ignored (element and attribute local names are matched),
//! since VMware, VirtualBox and others bind different prefixes.

use std::collections::HashMap;

use roxmltree::Node;

use crate::{DiskLoc, DiskSrc, Nic, Result, VmSpec, input, parse_mac, parse_xml};

fn child_text<'a>(n: Node<'a, 'a>, name: &str) -> Option<&'a str> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .and_then(|c| c.text())
        .map(str::trim)
}

fn attr<'a>(n: Node<'a, 'a>, name: &str) -> Option<&'a str> {
    n.attributes().find(|a| a.name() == name).map(|a| a.value())
}

fn find<'a>(n: Node<'a, 'a>, name: &str) -> Option<Node<'a, 'a>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// Bytes per unit of an OVF `AllocationUnits` (`byte * 2^20`, `MegaBytes`, `byte`, ...).
pub fn unit_bytes(units: &str) -> Option<u64> {
    let u: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    match u.as_str() {
        "" | "byte" | "bytes" => Some(1),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        _ => {
            let exp = u.strip_prefix("byte*2^")?;
            let e: u32 = exp.parse().ok()?;
            1u64.checked_shl(e).filter(|_| e < 63)
        }
    }
}

/// `resolve` turns a `File` href into where its bytes are (checking it stays in the package).
pub fn describe(text: &str, resolve: &mut dyn FnMut(&str) -> Result<DiskLoc>) -> Result<VmSpec> {
    let doc = parse_xml(text, "OVF descriptor")?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" {
        return input("OVF descriptor: the root element is not an Envelope");
    }
    let mut files: HashMap<&str, (&str, Option<&str>)> = HashMap::new();
    if let Some(refs) = find(env, "References") {
        for f in refs.children().filter(|c| c.tag_name().name() == "File") {
            if let (Some(id), Some(href)) = (attr(f, "id"), attr(f, "href")) {
                files.insert(id, (href, attr(f, "compression")));
            }
        }
    }
    let mut disks: HashMap<&str, &str> = HashMap::new();
    if let Some(ds) = find(env, "DiskSection") {
        for d in ds.children().filter(|c| c.tag_name().name() == "Disk") {
            if let (Some(id), Some(file)) = (attr(d, "diskId"), attr(d, "fileRef")) {
                disks.insert(id, file);
            }
        }
    }
    let mut spec = VmSpec::default();
    let vs = match find(env, "VirtualSystem") {
        Some(v) => v,
        None => {
            let coll = find(env, "VirtualSystemCollection")
                .ok_or_else(|| crate::Error::Input("OVF descriptor has no VirtualSystem".into()))?;
            let systems: Vec<_> = coll
                .children()
                .filter(|c| c.tag_name().name() == "VirtualSystem")
                .collect();
            if systems.len() > 1 {
                spec.notes.push(format!(
                    "dropped: {} more virtual systems of the collection (only the first is imported)",
                    systems.len() - 1
                ));
            }
            *systems
                .first()
                .ok_or_else(|| crate::Error::Input("OVF descriptor has no VirtualSystem".into()))?
        }
    };
    spec.name = child_text(vs, "Name")
        .or_else(|| attr(vs, "id"))
        .unwrap_or("")
        .to_string();
    let hw = find(vs, "VirtualHardwareSection").ok_or_else(|| {
        crate::Error::Input("OVF descriptor has no VirtualHardwareSection".into())
    })?;
    // Controllers by InstanceID, reported when a disk hangs on them.
    let mut controllers: HashMap<String, String> = HashMap::new();
    let mut used_controllers: Vec<String> = Vec::new();
    for item in hw.children().filter(|c| {
        matches!(
            c.tag_name().name(),
            "Item" | "StorageItem" | "EthernetPortItem"
        )
    }) {
        let rtype: u32 = child_text(item, "ResourceType")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let sub = child_text(item, "ResourceSubType").unwrap_or("");
        let name = child_text(item, "ElementName").unwrap_or("");
        let id = child_text(item, "InstanceID").unwrap_or("").to_string();
        let label = |what: &str| {
            let mut s = if name.is_empty() {
                what.to_string()
            } else {
                format!("{what} '{name}'")
            };
            if !sub.is_empty() {
                s.push_str(&format!(" ({sub})"));
            }
            s
        };
        match rtype {
            3 => {
                let q = child_text(item, "VirtualQuantity").unwrap_or("1");
                spec.cpus = Some(q.parse().map_err(|_| {
                    crate::Error::Input(format!("OVF descriptor: bad CPU count '{q}'"))
                })?);
            }
            4 => {
                let q = child_text(item, "VirtualQuantity").unwrap_or("");
                let units = child_text(item, "AllocationUnits").unwrap_or("byte * 2^20");
                let qty: u64 = q.parse().map_err(|_| {
                    crate::Error::Input(format!("OVF descriptor: bad memory size '{q}'"))
                })?;
                let unit = unit_bytes(units).ok_or_else(|| {
                    crate::Error::Input(format!("OVF descriptor: unknown memory units '{units}'"))
                })?;
                let bytes = qty.checked_mul(unit).ok_or_else(|| {
                    crate::Error::Input(format!(
                        "OVF descriptor: memory size {q} {units} overflows"
                    ))
                })?;
                spec.memory_mib = Some(bytes.div_ceil(1 << 20));
            }
            5 | 6 | 7 | 8 | 9 | 20 => {
                let what = match rtype {
                    5 => "IDE controller",
                    6 => "SCSI controller",
                    20 => "storage controller",
                    _ => "storage adapter",
                };
                controllers.insert(id, label(what));
            }
            10 => {
                let model = if sub.is_empty() { name } else { sub };
                let mac = child_text(item, "Address").and_then(parse_mac);
                spec.notes.push(format!(
                    "mapped: network adapter {} ({}) -> virtio-net",
                    spec.nics.len() + 1,
                    if model.is_empty() {
                        "unknown model"
                    } else {
                        model
                    }
                ));
                spec.nics.push(Nic {
                    model: model.to_string(),
                    mac,
                });
            }
            17 => {
                let host = child_text(item, "HostResource").unwrap_or("");
                let file_id = if let Some(d) = host
                    .strip_prefix("ovf:/disk/")
                    .or_else(|| host.strip_prefix("/disk/"))
                {
                    *disks.get(d).ok_or_else(|| {
                        crate::Error::Input(format!(
                            "OVF descriptor: disk item references unknown disk '{d}'"
                        ))
                    })?
                } else if let Some(f) = host
                    .strip_prefix("ovf:/file/")
                    .or_else(|| host.strip_prefix("/file/"))
                {
                    f
                } else {
                    return input(format!(
                        "OVF descriptor: disk item with HostResource '{host}' names no disk"
                    ));
                };
                let (href, compression) = *files.get(file_id).ok_or_else(|| {
                    crate::Error::Input(format!(
                        "OVF descriptor: disk references unknown file '{file_id}'"
                    ))
                })?;
                if let Some(c) = compression
                    && c != "identity"
                {
                    return input(format!(
                        "OVF file '{href}' is {c}-compressed; unsupported (decompress the package first)"
                    ));
                }
                if let Some(p) = child_text(item, "Parent")
                    && !used_controllers.iter().any(|u| u == p)
                {
                    used_controllers.push(p.to_string());
                }
                let loc = resolve(href)?;
                spec.disks.push(DiskSrc {
                    slot: format!("{href} ({host})"),
                    loc,
                });
            }
            14 => spec
                .notes
                .push(format!("dropped: {}", label("floppy drive"))),
            15 | 16 => spec
                .notes
                .push(format!("dropped: {}", label("CD/DVD drive"))),
            23 => spec
                .notes
                .push(format!("dropped: {}", label("USB controller"))),
            35 => spec.notes.push(format!("dropped: {}", label("sound card"))),
            _ => spec.notes.push(format!(
                "dropped: {} (resource type {rtype})",
                label("device")
            )),
        }
    }
    for c in used_controllers {
        if let Some(l) = controllers.get(&c) {
            spec.notes.insert(0, format!("mapped: {l} -> virtio-blk"));
        }
    }
    Ok(spec)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// As VMware ovftool 4.x writes it (trimmed of vmw:Config lines).
    pub const VMWARE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-7395615" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="debian12-disk1.vmdk" ovf:id="file1" ovf:size="1046528"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="0"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian12">
    <Info>A virtual machine</Info>
    <Name>debian12</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>512MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>VirtualIDEController 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>VirtualVideoCard</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:Address>0</rasd:Address>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>USB Controller (EHCI)</rasd:ElementName>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.usb.ehci</rasd:ResourceSubType>
        <rasd:ResourceType>23</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD/DVD Drive 1</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>00:50:56:8a:12:34</rasd:Address>
        <rasd:AddressOnParent>8</rasd:AddressOnParent>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>Sound Card</rasd:ElementName>
        <rasd:InstanceID>13</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.soundcard.hdaudio</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

    /// As VirtualBox 7's "Export Appliance" writes it (OVF 1.0, trimmed of vbox:Machine).
    pub const VIRTUALBOX: &str = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="ubuntu-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="10737418240" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="c9a2e1d4-0f55-4d1c-9a4e-2b8c0f1e7a11"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="ubuntu">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="94">
      <Info>The kind of installed guest operating system</Info>
      <Description>Ubuntu_64</Description>
      <vbox:OSType ovf:required="false">Ubuntu_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>ubuntu</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>2048 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>3</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>sound</rasd:Caption>
        <rasd:Description>Sound Card</rasd:Description>
        <rasd:ElementName>sound</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
        <rasd:ResourceType>35</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>cdrom1</rasd:Caption>
        <rasd:Description>CD-ROM Drive</rasd:Description>
        <rasd:ElementName>cdrom1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

    fn files(href: &str) -> Result<DiskLoc> {
        crate::check_relative(href, "OVF file reference")?;
        Ok(DiskLoc::File(href.into()))
    }

    #[test]
    fn vmware_ovf() {
        let s = describe(VMWARE, &mut files).unwrap();
        assert_eq!(s.name, "debian12");
        assert_eq!(s.cpus, Some(2));
        assert_eq!(s.memory_mib, Some(512));
        assert_eq!(s.disks.len(), 1);
        assert_eq!(s.disks[0].loc, DiskLoc::File("debian12-disk1.vmdk".into()));
        assert_eq!(s.nics.len(), 2);
        assert_eq!(s.nics[0].model, "VmxNet3");
        assert_eq!(s.nics[1].mac, Some([0, 0x50, 0x56, 0x8a, 0x12, 0x34]));
        let notes = s.notes.join("\n");
        for want in [
            "mapped: SCSI controller 'SCSI Controller 0' (VirtualSCSI) -> virtio-blk",
            "mapped: network adapter 1 (VmxNet3) -> virtio-net",
            "mapped: network adapter 2 (E1000) -> virtio-net",
            "dropped: USB controller 'USB Controller (EHCI)' (vmware.usb.ehci)",
            "dropped: CD/DVD drive 'CD/DVD Drive 1' (vmware.cdrom.remotepassthrough)",
            "dropped: device 'Sound Card' (vmware.soundcard.hdaudio) (resource type 1)",
            "dropped: device 'VirtualVideoCard' (resource type 24)",
        ] {
            assert!(notes.contains(want), "{want} not in\n{notes}");
        }
        assert!(!notes.contains("IDE"), "{notes}");
    }

    #[test]
    fn virtualbox_ovf() {
        let s = describe(VIRTUALBOX, &mut files).unwrap();
        assert_eq!(s.name, "ubuntu");
        assert_eq!(s.cpus, Some(1));
        assert_eq!(s.memory_mib, Some(2048));
        assert_eq!(s.nics[0].model, "E1000");
        let notes = s.notes.join("\n");
        assert!(
            notes.contains("mapped: storage controller 'sataController0' (AHCI) -> virtio-blk"),
            "{notes}"
        );
        assert!(
            notes.contains("dropped: sound card 'sound' (ensoniq1371)"),
            "{notes}"
        );
        assert!(notes.contains("dropped: CD/DVD drive 'cdrom1'"), "{notes}");
    }

    #[test]
    fn hostile_descriptors() {
        let traversal = VMWARE.replace("debian12-disk1.vmdk", "../../etc/shadow");
        let e = describe(&traversal, &mut files).unwrap_err().to_string();
        assert!(e.contains("outside the package"), "{e}");
        let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Envelope><x>&lol2;</x></Envelope>"#;
        let e = describe(bomb, &mut files).unwrap_err().to_string();
        assert!(e.contains("refused XML"), "{e}");
        let huge = VMWARE.replace(
            "<rasd:VirtualQuantity>512</rasd:VirtualQuantity>",
            "<rasd:VirtualQuantity>99999999999999999999</rasd:VirtualQuantity>",
        );
        assert!(describe(&huge, &mut files).is_err());
        let over = VMWARE.replace(
            "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
            "<rasd:AllocationUnits>byte * 2^60</rasd:AllocationUnits>",
        );
        let e = describe(&over, &mut files).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        let gz = VMWARE.replace(
            "ovf:id=\"file1\"",
            "ovf:id=\"file1\" ovf:compression=\"gzip\"",
        );
        assert!(
            describe(&gz, &mut files)
                .unwrap_err()
                .to_string()
                .contains("gzip")
        );
        assert!(describe("<Envelope/>", &mut files).is_err());
        assert!(describe("not xml", &mut files).is_err());
    }

    #[test]
    fn units() {
        assert_eq!(unit_bytes("byte * 2^20"), Some(1 << 20));
        assert_eq!(unit_bytes("MegaBytes"), Some(1 << 20));
        assert_eq!(unit_bytes("byte"), Some(1));
        assert_eq!(unit_bytes("byte * 2^64"), None);
        assert_eq!(unit_bytes("hertz * 10^6"), None);
    }
}
