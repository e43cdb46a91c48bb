//! VHDX (Hyper-V, [MS-VHDX] 1.0): dynamic and fixed disks, read-only. Differencing disks and
//! images whose log is not empty are refused (the log is not replayed). A writable open fails
//! with "VHDX images are read-only; ...": writing would mean keeping the headers' write GUIDs
//! and the log, which `anyvisor import` avoids by converting.
//!
//! Layout (little-endian): the file type identifier ("vhdxfile") at 0; two 4 KiB headers at 64
//! and 128 KiB ("head", CRC-32C, sequence number, log GUID and location; the valid one with the
//! higher sequence number wins); two 64 KiB region tables at 192 and 256 KiB ("regi", CRC-32C,
//! entries naming the BAT and metadata regions by GUID); the metadata region (a table of items:
//! file parameters, virtual disk size, logical sector size, ...); the BAT, one 64-bit entry per
//! payload block (state in bits 0-2, file offset in MiB in bits 20-63) with a sector bitmap
//! entry after every `chunk ratio` payload entries.
//!
//! GUIDs are compared as the bytes they are stored as (the first three fields little-endian).
//!
//! The BAT (up to 256 MiB for the largest disks) is not read at open: its pages of 512 entries
//! are read when first used and kept in a small LRU cache, and each entry is checked whenever it
//! is used; at open only the entries of the first [`OPEN_CHECK_BLOCKS`] blocks are checked, so a
//! damaged start is refused at once while a sparse file's claimed size costs nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::util::{
    ImageError, Lru, check_range, corrupt, field, in_file, le16, le32, le64, pieces,
    read_exact_or_eof, read_vec, to_usize,
};
use crate::{DiskFile, Format};

const NAME: &str = "VHDX";
/// The file type identifier's signature at offset 0.
pub(crate) const FILE_MAGIC: &[u8] = b"vhdxfile";
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: u64 = 4 * KIB;
const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_LEN: u64 = 64 * KIB;
const MAX_ENTRIES: u64 = 2047;
/// Largest virtual disk accepted: 64 TiB (the format's own limit).
const MAX_SIZE: u64 = 64 << 40;
/// Largest BAT accepted: 256 MiB of entries... capped further by the file size.
const MAX_BAT_BYTES: u64 = 256 * MIB;
/// BAT entries per cached page (4 KiB), and cached pages (2 MiB).
const BAT_PAGE: u64 = 512;
const BAT_PAGES: usize = 512;
/// Blocks whose BAT entries are checked at open; the others when used.
const OPEN_CHECK_BLOCKS: u64 = 1 << 16;

const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const VIRTUAL_DISK_ID: [u8; 16] = [
    0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46,
];
const LOGICAL_SECTOR_SIZE: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];
const PHYSICAL_SECTOR_SIZE: [u8; 16] = [
    0xc7, 0x48, 0xa3, 0xcd, 0x5d, 0x44, 0x71, 0x44, 0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56,
];
const PARENT_LOCATOR: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];

const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;

/// CRC-32C of `b` with its 4 checksum bytes at 4 taken as zero.
fn crc_without_field(b: &[u8]) -> u32 {
    let mut copy = b.to_vec();
    if let Some(c) = copy.get_mut(4..8) {
        c.fill(0);
    }
    crc32c::crc32c(&copy)
}

/// A structure with a 4-byte signature and a CRC-32C at 4: Ok if both match.
fn check_structure(b: &[u8], sig: &[u8; 4], what: &'static str) -> Result<(), ImageError> {
    if b.get(0..4) != Some(sig.as_slice()) {
        return Err(field(NAME, what, u64::from(le32(b, 0)), "bad signature"));
    }
    let stored = le32(b, 4);
    let computed = crc_without_field(b);
    if stored != computed {
        return Err(ImageError::Checksum {
            format: NAME,
            what,
            stored: stored.into(),
            computed: computed.into(),
        });
    }
    Ok(())
}

/// An open VHDX image.
pub struct Vhdx {
    file: File,
    file_len: u64,
    size: u64,
    block_size: u64,
    chunk_ratio: u64,
    /// File offset and entry count of the BAT.
    bat_off: u64,
    bat_entries: u64,
    /// BAT pages by index.
    bat: Lru<u64, Vec<u64>>,
}

impl Vhdx {
    pub fn open(file: File, readonly: bool) -> Result<Vhdx, ImageError> {
        let file_len = file.metadata()?.len();
        if file_len < REGION_OFFSETS[1] + REGION_LEN {
            return Err(ImageError::Short(NAME));
        }
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0)?;
        if magic.as_slice() != FILE_MAGIC {
            return Err(ImageError::Magic(NAME));
        }
        // The current header: the valid one with the higher sequence number.
        let mut best: Option<(u64, Vec<u8>)> = None;
        let mut first_err = None;
        for off in HEADER_OFFSETS {
            let h = read_vec(&file, off, HEADER_LEN)?;
            match check_structure(&h, b"head", "header") {
                Ok(()) => {
                    let seq = le64(&h, 8);
                    if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        best = Some((seq, h));
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((_, h)) = best else {
            return Err(first_err.unwrap_or(ImageError::Magic(NAME)));
        };
        let version = le16(&h, 66);
        if version != 1 {
            return Err(field(NAME, "header version", version.into(), "not 1"));
        }
        if h.get(48..64).is_some_and(|g| g.iter().any(|&b| b != 0)) {
            return Err(ImageError::Unsupported {
                format: NAME,
                what: "images with a non-empty log (open them once in Hyper-V or run \
                       `qemu-img check -r all` to replay it)"
                    .into(),
            });
        }
        if !readonly {
            return Err(ImageError::ReadOnly(NAME.into()));
        }

        // Region table: the first valid copy.
        let mut regions = None;
        let mut first_err = None;
        for off in REGION_OFFSETS {
            let r = read_vec(&file, off, REGION_LEN)?;
            match check_structure(&r, b"regi", "region table") {
                Ok(()) => {
                    regions = Some(r);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(r) = regions else {
            return Err(first_err.unwrap_or(ImageError::Magic(NAME)));
        };
        let count = u64::from(le32(&r, 8));
        if count > MAX_ENTRIES {
            return Err(field(NAME, "region table entry count", count, "above 2047"));
        }
        let mut bat_region = None;
        let mut meta_region = None;
        for i in 0..to_usize(count, "region table entry count")? {
            let e = r.get(16 + i * 32..16 + (i + 1) * 32).unwrap_or_default();
            let guid = e.get(0..16).unwrap_or_default();
            let off = le64(e, 16);
            let len = u64::from(le32(e, 24));
            let required = le32(e, 28) & 1 != 0;
            let slot = if guid == BAT_GUID {
                &mut bat_region
            } else if guid == METADATA_GUID {
                &mut meta_region
            } else if required {
                return Err(ImageError::Unsupported {
                    format: NAME,
                    what: "an unknown required region".into(),
                });
            } else {
                continue;
            };
            if !off.is_multiple_of(MIB) || off < MIB || len == 0 || !len.is_multiple_of(MIB) {
                return Err(field(
                    NAME,
                    "region offset",
                    off,
                    "not a non-zero MiB multiple past 1 MiB",
                ));
            }
            if !in_file(off, len, file_len) {
                return Err(field(NAME, "region offset", off, "region outside the file"));
            }
            *slot = Some((off, len));
        }
        let (bat_off, bat_len) =
            bat_region.ok_or_else(|| field(NAME, "region table", count, "no BAT region"))?;
        let (meta_off, meta_len) =
            meta_region.ok_or_else(|| field(NAME, "region table", count, "no metadata region"))?;

        // Metadata.
        let mt = read_vec(&file, meta_off, (64 * KIB).min(meta_len))?;
        if mt.get(0..8) != Some(b"metadata".as_slice()) {
            return Err(field(NAME, "metadata table", le64(&mt, 0), "bad signature"));
        }
        let n = u64::from(le16(&mt, 10));
        if n > MAX_ENTRIES {
            return Err(field(NAME, "metadata entry count", n, "above 2047"));
        }
        let mut block_size = None;
        let mut has_parent = false;
        let mut size = None;
        let mut logical = None;
        for i in 0..to_usize(n, "metadata entry count")? {
            let e = mt.get(32 + i * 32..32 + (i + 1) * 32).unwrap_or_default();
            let guid = e.get(0..16).unwrap_or_default();
            let off = u64::from(le32(e, 16));
            let len = u64::from(le32(e, 20));
            let flags = le32(e, 24);
            let item = |want: u64| -> Result<Vec<u8>, ImageError> {
                if len < want || off < 64 * KIB || !in_file(off, len, meta_len) {
                    return Err(field(
                        NAME,
                        "metadata item offset",
                        off,
                        "outside the metadata region",
                    ));
                }
                Ok(read_vec(&file, meta_off + off, want)?)
            };
            if guid == FILE_PARAMETERS {
                let v = item(8)?;
                block_size = Some(u64::from(le32(&v, 0)));
                has_parent = le32(&v, 4) & 2 != 0;
            } else if guid == VIRTUAL_DISK_SIZE {
                size = Some(le64(&item(8)?, 0));
            } else if guid == LOGICAL_SECTOR_SIZE {
                logical = Some(u64::from(le32(&item(4)?, 0)));
            } else if guid == VIRTUAL_DISK_ID || guid == PHYSICAL_SECTOR_SIZE {
            } else if guid == PARENT_LOCATOR {
                has_parent = true;
            } else if flags & 4 != 0 {
                return Err(ImageError::Unsupported {
                    format: NAME,
                    what: "an unknown required metadata item".into(),
                });
            }
        }
        if has_parent {
            return Err(ImageError::Unsupported {
                format: NAME,
                what: "differencing disks (a parent image)".into(),
            });
        }
        let missing = |what: &'static str| field(NAME, "metadata", 0, what);
        let block_size = block_size.ok_or_else(|| missing("no file parameters"))?;
        let size = size.ok_or_else(|| missing("no virtual disk size"))?;
        let logical = logical.ok_or_else(|| missing("no logical sector size"))?;
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(field(
                NAME,
                "block size",
                block_size,
                "not a power of two from 1 to 256 MiB",
            ));
        }
        if logical != 512 && logical != 4096 {
            return Err(field(
                NAME,
                "logical sector size",
                logical,
                "not 512 or 4096",
            ));
        }
        if size == 0 || size > MAX_SIZE || !size.is_multiple_of(logical) {
            return Err(field(
                NAME,
                "virtual disk size",
                size,
                "zero, above 64 TiB or not whole sectors",
            ));
        }
        let chunk_ratio = ((1u64 << 23) * logical) / block_size;
        let blocks = size.div_ceil(block_size);
        let entries = blocks + (blocks - 1) / chunk_ratio;
        if entries * 8 > bat_len.min(MAX_BAT_BYTES) {
            return Err(field(
                NAME,
                "BAT region length",
                bat_len,
                "too small for the disk size",
            ));
        }
        if !in_file(bat_off, entries * 8, file_len) {
            return Err(field(
                NAME,
                "BAT region offset",
                bat_off,
                "outside the file",
            ));
        }
        let mut v = Vhdx {
            file,
            file_len,
            size,
            block_size,
            chunk_ratio,
            bat_off,
            bat_entries: entries,
            bat: Lru::new(BAT_PAGES),
        };
        for b in 0..blocks.min(OPEN_CHECK_BLOCKS) {
            v.block(b)?;
        }
        Ok(v)
    }

    /// Where payload block `b` is: `None` reads as zeros.
    fn block(&mut self, b: u64) -> Result<Option<u64>, ImageError> {
        let i = b + b / self.chunk_ratio;
        if i >= self.bat_entries {
            return Err(field(NAME, "BAT index", i, "outside the BAT"));
        }
        let page = i / BAT_PAGE;
        if self.bat.get_mut(&page).is_none() {
            let first = page * BAT_PAGE;
            let n = BAT_PAGE.min(self.bat_entries - first);
            let t = read_vec(&self.file, self.bat_off + first * 8, n * 8)?
                .chunks_exact(8)
                .map(|c| le64(c, 0))
                .collect();
            self.bat.insert(page, t);
        }
        let e = self
            .bat
            .get_mut(&page)
            .and_then(|t| t.get((i % BAT_PAGE) as usize).copied())
            .ok_or_else(|| field(NAME, "BAT index", i, "outside the BAT"))?;
        match e & 7 {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => Ok(None),
            PAYLOAD_FULLY_PRESENT => {
                let off = (e >> 20) * MIB;
                let want = self.block_size.min(self.size - b * self.block_size);
                if off < MIB || !in_file(off, want, self.file_len) {
                    return Err(field(NAME, "BAT entry", e, "block outside the file"));
                }
                Ok(Some(off))
            }
            _ => Err(field(
                NAME,
                "BAT entry",
                e,
                "state not valid for a disk without parent",
            )),
        }
    }
}

impl DiskFile for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        for (pos, n) in pieces(offset, buf.len() as u64, self.block_size) {
            let out = buf
                .get_mut(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| corrupt("VHDX read"))?;
            // The entry is checked each time it is used.
            match self
                .block(pos / self.block_size)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                None => out.fill(0),
                Some(at) => read_exact_or_eof(&self.file, out, at + pos % self.block_size)?,
            }
            done += to_usize(n, "piece length")?;
        }
        Ok(())
    }

    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(crate::read_only())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn readonly(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
