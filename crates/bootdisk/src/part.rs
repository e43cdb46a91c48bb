//! Partition tables: GPT (UEFI spec, chapter 5: header and entry-array CRC32, the backup header
//! at the disk's last LBA when the primary is damaged) and MBR (four primary entries, logical
//! partitions through the chain of extended boot records).
//!
//! Written by hand: the GPT crates on crates.io (`gpt`, `gptman`) want a `Read + Seek` device
//! and write support we must not have (the image is opened read-only), and MBR is 64 bytes of
//! table; the parsing here is small and every field is bounds-checked against the disk.

use crate::{Error, Image, read_vec};

/// Where a filesystem lives on the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux and GRUB number them (MBR logical partitions start at 5).
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    pub kind: PartKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartKind {
    Gpt {
        type_guid: String,
        name: String,
    },
    Mbr {
        ptype: u8,
        bootable: bool,
    },
    /// No partition table: the filesystem starts at byte 0.
    Whole,
}

/// GPT partition types (lower-case GUID text).
pub const GPT_EFI_SYSTEM: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const GPT_BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";
pub const GPT_LINUX_SWAP: &str = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f";
/// Boot Loader Spec "extended boot loader" partition (a separate /boot).
pub const GPT_XBOOTLDR: &str = "bc13c2ff-59e6-4262-a352-b275fd779f72";

impl Partition {
    /// GRUB's device name: `hd0,gpt2`, `hd0,msdos1`, or `hd0` for a disk without a table.
    pub fn grub_device(&self) -> String {
        match self.kind {
            PartKind::Gpt { .. } => format!("hd0,gpt{}", self.number),
            PartKind::Mbr { .. } => format!("hd0,msdos{}", self.number),
            PartKind::Whole => "hd0".into(),
        }
    }

    /// Partitions that never hold a Linux boot filesystem (swap, BIOS boot, extended).
    pub fn is_unlikely_boot(&self) -> bool {
        match &self.kind {
            PartKind::Gpt { type_guid, .. } => {
                type_guid == GPT_BIOS_BOOT || type_guid == GPT_LINUX_SWAP
            }
            PartKind::Mbr { ptype, .. } => matches!(ptype, 0x05 | 0x0f | 0x85 | 0x82),
            PartKind::Whole => false,
        }
    }

    /// Ordering key: a separate /boot first (XBOOTLDR, the MBR active flag), then table order.
    pub fn boot_rank(&self) -> u8 {
        match &self.kind {
            PartKind::Gpt { type_guid, .. } if type_guid == GPT_XBOOTLDR => 0,
            PartKind::Mbr { bootable: true, .. } => 0,
            _ => 1,
        }
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            PartKind::Whole => "the whole disk (no partition table)".into(),
            _ => format!("partition {}", self.number),
        }
    }
}

/// Which table the disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
    None,
}

pub(crate) fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub(crate) fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
pub(crate) fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// GUID bytes (first three fields little-endian) as lower-case text.
pub fn guid_text(g: &[u8]) -> String {
    let b = |i: usize| g.get(i).copied().unwrap_or(0);
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b(3),
        b(2),
        b(1),
        b(0),
        b(5),
        b(4),
        b(7),
        b(6),
        b(8),
        b(9),
        b(10),
        b(11),
        b(12),
        b(13),
        b(14),
        b(15)
    )
}

/// Most GPT entries read (the spec's minimum array is 128; some tools write more).
const MAX_GPT_ENTRIES: u32 = 1024;
/// Longest EBR chain followed.
const MAX_LOGICAL: u32 = 128;

/// The partitions of `img`, and which table described them. An image without a recognised
/// table yields an empty list with [`TableKind::None`].
pub fn read_table(img: &dyn Image) -> Result<(TableKind, Vec<Partition>), Error> {
    let size = img.size();
    let mbr = read_vec(img, 0, 512.min(size))?;
    let has_mbr_sig = mbr.get(510..512) == Some(&[0x55, 0xaa][..]);
    for sector in [512u64, 4096] {
        if sector.saturating_mul(2) > size {
            continue;
        }
        let head = read_vec(img, sector, 8)?;
        if head == b"EFI PART" {
            return Ok((TableKind::Gpt, read_gpt(img, sector)?));
        }
    }
    if has_mbr_sig {
        let protective = (0..4).any(|i| mbr.get(0x1be + i * 16 + 4) == Some(&0xee));
        if protective {
            return Err(Error::BadTable(
                "protective MBR but no valid GPT header at LBA 1".into(),
            ));
        }
        if let Some(parts) = read_mbr(img, &mbr)? {
            return Ok((TableKind::Mbr, parts));
        }
    }
    Ok((TableKind::None, Vec::new()))
}

fn read_gpt(img: &dyn Image, sector: u64) -> Result<Vec<Partition>, Error> {
    let last_lba = img.size() / sector - 1;
    let primary = gpt_header(img, sector, 1);
    let header = match primary {
        Ok(h) => h,
        Err(why) => gpt_header(img, sector, last_lba).map_err(|backup| {
            Error::BadTable(format!(
                "GPT primary header: {why}; backup header: {backup}"
            ))
        })?,
    };
    let bytes = u64::from(header.entries) * u64::from(header.entry_size);
    let start = header
        .entries_lba
        .checked_mul(sector)
        .filter(|s| s.saturating_add(bytes) <= img.size())
        .ok_or_else(|| Error::BadTable("GPT entry array lies outside the disk".into()))?;
    let array = read_vec(img, start, bytes)?;
    if crc32fast::hash(&array) != header.entries_crc {
        return Err(Error::BadTable(
            "GPT partition entry array CRC mismatch".into(),
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks(header.entry_size as usize).enumerate() {
        let tguid = e.get(0..16).unwrap_or(&[0; 16]);
        if tguid.iter().all(|&b| b == 0) {
            continue;
        }
        let (Some(first), Some(last)) = (le64(e, 32), le64(e, 40)) else {
            continue;
        };
        if last < first || last > last_lba {
            return Err(Error::BadTable(format!(
                "GPT partition {} lies outside the disk",
                i + 1
            )));
        }
        let name: Vec<u16> = e
            .get(56..128)
            .unwrap_or(&[])
            .chunks(2)
            .map(|c| {
                u16::from_le_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&c| c != 0)
            .collect();
        parts.push(Partition {
            number: u32::try_from(i + 1).unwrap_or(u32::MAX),
            start: first * sector,
            size: (last - first + 1) * sector,
            kind: PartKind::Gpt {
                type_guid: guid_text(tguid),
                name: String::from_utf16_lossy(&name),
            },
        });
    }
    Ok(parts)
}

struct GptHeader {
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn gpt_header(img: &dyn Image, sector: u64, lba: u64) -> Result<GptHeader, String> {
    let mut h = read_vec(img, lba * sector, sector).map_err(|e| e.to_string())?;
    if h.get(0..8) != Some(&b"EFI PART"[..]) {
        return Err("no \"EFI PART\" signature".into());
    }
    let bad = || "truncated header".to_string();
    let hsize = le32(&h, 12).ok_or_else(bad)? as usize;
    if !(92..=h.len()).contains(&hsize) {
        return Err(format!("header size {hsize} out of range"));
    }
    let crc = le32(&h, 16).ok_or_else(bad)?;
    if let Some(f) = h.get_mut(16..20) {
        f.fill(0);
    }
    if crc32fast::hash(h.get(..hsize).ok_or_else(bad)?) != crc {
        return Err("header CRC mismatch".into());
    }
    let entries = le32(&h, 80).ok_or_else(bad)?;
    let entry_size = le32(&h, 84).ok_or_else(bad)?;
    if entries > MAX_GPT_ENTRIES {
        return Err(format!(
            "{entries} partition entries (at most {MAX_GPT_ENTRIES} read)"
        ));
    }
    if entry_size < 128 || entry_size % 8 != 0 || entry_size > 4096 {
        return Err(format!("partition entry size {entry_size}"));
    }
    Ok(GptHeader {
        entries_lba: le64(&h, 72).ok_or_else(bad)?,
        entries,
        entry_size,
        entries_crc: le32(&h, 88).ok_or_else(bad)?,
    })
}

/// The MBR's partitions, or `None` when the four entries do not look like a partition table
/// (a filesystem boot sector also ends in 55 AA).
fn read_mbr(img: &dyn Image, mbr: &[u8]) -> Result<Option<Vec<Partition>>, Error> {
    let sectors = img.size() / 512;
    let mut parts = Vec::new();
    let mut extended = None;
    for i in 0..4u32 {
        let at = 0x1be + i as usize * 16;
        let (Some(&status), Some(&ptype), Some(lba), Some(count)) = (
            mbr.get(at),
            mbr.get(at + 4),
            le32(mbr, at + 8),
            le32(mbr, at + 12),
        ) else {
            return Ok(None);
        };
        if status != 0 && status != 0x80 {
            return Ok(None);
        }
        if ptype == 0 || count == 0 {
            continue;
        }
        if u64::from(lba) + u64::from(count) > sectors || lba == 0 {
            return Ok(None);
        }
        if matches!(ptype, 0x05 | 0x0f | 0x85) {
            extended = Some((u64::from(lba), u64::from(count)));
        }
        parts.push(Partition {
            number: i + 1,
            start: u64::from(lba) * 512,
            size: u64::from(count) * 512,
            kind: PartKind::Mbr {
                ptype,
                bootable: status == 0x80,
            },
        });
    }
    if parts.is_empty() {
        return Ok(None);
    }
    if let Some((ext_start, ext_len)) = extended {
        // Each EBR: entry 0 is the logical partition (relative to this EBR), entry 1 links to
        // the next EBR (relative to the extended partition's start).
        let mut ebr = ext_start;
        let mut number = 5;
        while number < 5 + MAX_LOGICAL {
            let sec = read_vec(img, ebr * 512, 512)?;
            if sec.get(510..512) != Some(&[0x55, 0xaa][..]) {
                return Err(Error::BadTable(format!(
                    "extended boot record at sector {ebr} has no 55 AA signature"
                )));
            }
            let (Some(&ptype), Some(rel), Some(count)) = (
                sec.get(0x1be + 4),
                le32(&sec, 0x1be + 8),
                le32(&sec, 0x1be + 12),
            ) else {
                break;
            };
            if ptype != 0 && count != 0 {
                let start = ebr + u64::from(rel);
                if start + u64::from(count) > ext_start + ext_len {
                    return Err(Error::BadTable(format!(
                        "logical partition {number} lies outside the extended partition"
                    )));
                }
                parts.push(Partition {
                    number,
                    start: start * 512,
                    size: u64::from(count) * 512,
                    kind: PartKind::Mbr {
                        ptype,
                        bootable: sec.get(0x1be) == Some(&0x80),
                    },
                });
                number += 1;
            }
            let (Some(&ntype), Some(next)) = (sec.get(0x1ce + 4), le32(&sec, 0x1ce + 8)) else {
                break;
            };
            if ntype == 0 || next == 0 {
                break;
            }
            let n = ext_start + u64::from(next);
            if n <= ebr || n >= ext_start + ext_len {
                return Err(Error::BadTable("extended boot record chain loops".into()));
            }
            ebr = n;
        }
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::MemImage;

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    /// A GPT with 128 entries of 128 bytes, as sgdisk/sfdisk write it.
    pub(crate) fn gpt_disk(size: usize, parts: &[(&str, u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; size];
        // Protective MBR.
        put(&mut d, 0x1be + 4, &[0xee]);
        put(&mut d, 0x1be + 8, &1u32.to_le_bytes());
        put(
            &mut d,
            0x1be + 12,
            &u32::try_from(size / 512 - 1).unwrap().to_le_bytes(),
        );
        put(&mut d, 510, &[0x55, 0xaa]);
        let mut array = vec![0u8; 128 * 128];
        for (i, (tguid, first, last)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..];
            put(e, 0, &guid_bytes(tguid));
            put(e, 16, &[u8::try_from(i + 1).unwrap(); 16]);
            put(e, 32, &first.to_le_bytes());
            put(e, 40, &last.to_le_bytes());
            let name: Vec<u8> = "part"
                .encode_utf16()
                .flat_map(|c| c.to_le_bytes())
                .collect();
            put(e, 56, &name);
        }
        put(&mut d, 1024, &array);
        let mut h = vec![0u8; 92];
        put(&mut h, 0, b"EFI PART");
        put(&mut h, 8, &0x10000u32.to_le_bytes());
        put(&mut h, 12, &92u32.to_le_bytes());
        put(&mut h, 24, &1u64.to_le_bytes());
        put(&mut h, 72, &2u64.to_le_bytes());
        put(&mut h, 80, &128u32.to_le_bytes());
        put(&mut h, 84, &128u32.to_le_bytes());
        put(&mut h, 88, &crc32fast::hash(&array).to_le_bytes());
        let crc = crc32fast::hash(&h);
        put(&mut h, 16, &crc.to_le_bytes());
        put(&mut d, 512, &h);
        d
    }

    fn guid_bytes(text: &str) -> [u8; 16] {
        let hex: Vec<u8> = text
            .replace('-', "")
            .as_bytes()
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect();
        let mut g = [0u8; 16];
        g.copy_from_slice(&hex);
        g[0..4].reverse();
        g[4..6].reverse();
        g[6..8].reverse();
        g
    }

    const LINUX_FS: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

    #[test]
    fn gpt_parses_and_checks_crcs() {
        let d = gpt_disk(
            2 << 20,
            &[(GPT_BIOS_BOOT, 34, 2047), (LINUX_FS, 2048, 2047 + 10)],
        );
        let (k, p) = read_table(&MemImage(d.clone())).unwrap();
        assert_eq!(k, TableKind::Gpt);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].number, 2);
        assert_eq!(p[1].start, 2048 * 512);
        assert_eq!(p[1].size, 10 * 512);
        assert_eq!(p[1].grub_device(), "hd0,gpt2");
        assert!(p[0].is_unlikely_boot());
        assert_eq!(
            p[1].kind,
            PartKind::Gpt {
                type_guid: LINUX_FS.into(),
                name: "part".into()
            }
        );
        // A flipped bit in the header: its CRC fails, and there is no backup header.
        let mut bad = d.clone();
        bad[512 + 40] ^= 1;
        let e = read_table(&MemImage(bad)).unwrap_err().to_string();
        assert!(e.contains("header CRC mismatch"), "{e}");
        // A flipped bit in the entry array.
        let mut bad = d.clone();
        bad[1024 + 128 + 33] ^= 1;
        let e = read_table(&MemImage(bad)).unwrap_err().to_string();
        assert!(e.contains("entry array CRC"), "{e}");
        // The backup header (at the last LBA) is used when the primary is damaged.
        let mut bak = d.clone();
        let mut h = d[512..512 + 92].to_vec();
        let last = (d.len() / 512 - 1) as u64;
        h[16..20].fill(0);
        h[24..32].copy_from_slice(&last.to_le_bytes());
        h[32..40].copy_from_slice(&1u64.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let at = usize::try_from(last).unwrap() * 512;
        bak[at..at + 92].copy_from_slice(&h);
        bak[512 + 40] ^= 1;
        let (_, p) = read_table(&MemImage(bak)).unwrap();
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn gpt_partition_outside_disk_is_refused() {
        let d = gpt_disk(1 << 20, &[(LINUX_FS, 2048, 1 << 30)]);
        let e = read_table(&MemImage(d)).unwrap_err().to_string();
        assert!(e.contains("outside the disk"), "{e}");
    }

    #[test]
    fn guid_text_is_mixed_endian() {
        assert_eq!(guid_text(&guid_bytes(GPT_EFI_SYSTEM)), GPT_EFI_SYSTEM);
    }

    fn mbr_entry(d: &mut [u8], i: usize, status: u8, ptype: u8, lba: u32, count: u32) {
        let at = 0x1be + i * 16;
        d[at] = status;
        d[at + 4] = ptype;
        put(d, at + 8, &lba.to_le_bytes());
        put(d, at + 12, &count.to_le_bytes());
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let mut d = vec![0u8; 8 << 20];
        mbr_entry(&mut d, 0, 0x80, 0x83, 2048, 4096);
        mbr_entry(&mut d, 1, 0, 0x05, 8192, 8192);
        put(&mut d, 510, &[0x55, 0xaa]);
        // EBR 1 at 8192: logical at +63, link to the EBR at ext+4096.
        let e1 = 8192 * 512;
        mbr_entry(&mut d[e1..], 0, 0, 0x83, 63, 1000);
        mbr_entry(&mut d[e1..], 1, 0, 0x05, 4096, 2000);
        put(&mut d, e1 + 510, &[0x55, 0xaa]);
        let e2 = (8192 + 4096) * 512;
        mbr_entry(&mut d[e2..], 0, 0, 0x82, 63, 1000);
        put(&mut d, e2 + 510, &[0x55, 0xaa]);
        let (k, p) = read_table(&MemImage(d.clone())).unwrap();
        assert_eq!(k, TableKind::Mbr);
        let numbers: Vec<u32> = p.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 2, 5, 6]);
        assert_eq!(p[2].start, (8192 + 63) * 512);
        assert_eq!(p[3].start, (8192 + 4096 + 63) * 512);
        assert_eq!(p[0].grub_device(), "hd0,msdos1");
        assert_eq!(p[0].boot_rank(), 0);
        assert!(p[3].is_unlikely_boot());
        // A chain that points back at itself is refused.
        let mut looped = d.clone();
        put(&mut looped, e2 + 0x1ce + 4, &[0x05]);
        put(&mut looped, e2 + 0x1ce + 8, &0u32.to_le_bytes());
        put(&mut looped, e2 + 0x1ce + 8, &1u32.to_le_bytes());
        let e = read_table(&MemImage(looped)).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
    }

    #[test]
    fn no_table() {
        let (k, p) = read_table(&MemImage(vec![0u8; 1 << 20])).unwrap();
        assert_eq!(k, TableKind::None);
        assert!(p.is_empty());
        // A boot sector whose "entries" are code is not a table.
        let mut d = vec![0x90u8; 1 << 20];
        put(&mut d, 510, &[0x55, 0xaa]);
        assert_eq!(read_table(&MemImage(d)).unwrap().0, TableKind::None);
        // A protective MBR without a GPT.
        let mut d = vec![0u8; 1 << 20];
        mbr_entry(&mut d, 0, 0, 0xee, 1, 2047);
        put(&mut d, 510, &[0x55, 0xaa]);
        assert!(read_table(&MemImage(d)).is_err());
    }
}
