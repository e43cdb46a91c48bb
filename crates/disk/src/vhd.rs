//! VHD (Virtual PC / Hyper-V "vpc" format, Microsoft's VHD Image Format Specification 1.0):
//! fixed and dynamic disks, read and write. Differencing disks are refused.
//!
//! A 512-byte big-endian footer ends the file ("conectix", disk type, size, one's-complement
//! checksum); a dynamic disk keeps a copy of it at offset 0, a dynamic header ("cxsparse") with
//! the block allocation table (BAT) location, and data blocks of `block_size` bytes each
//! preceded by a sector bitmap (bit set: the sector holds data; clear: it reads as zeros).
//!
//! The virtual size follows qemu's rule for which field to trust: images made by Virtual PC
//! ("vpc ") and older qemu ("qemu") are sized by their CHS geometry, everything else (Hyper-V,
//! disk2vhd, qemu's "qem2", ...) by the footer's current size.
//!
//! Writing a dynamic disk appends blocks: the footer moves first (so the file always ends with a
//! valid footer), then the new block's bitmap, then its BAT entry; data is written before the
//! bitmap bits that make it visible. Blocks are allocated sparse (the data area is a hole that
//! reads as zeros) with a clear bitmap.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::raw::RawFile;
use crate::util::{
    ImageError, Lru, be32, be64, check_range, corrupt, field, in_file, invalid_input, pieces,
    read_exact_or_eof, read_vec, to_usize,
};
use crate::{DiskFile, Format, read_only};

const NAME: &str = "VHD";
const FOOTER_LEN: u64 = 512;
const DYN_HEADER_LEN: u64 = 1024;
const SECTOR: u64 = 512;
/// First bytes of a VHD footer (and of a dynamic disk, which starts with a copy of it).
pub(crate) const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const UNALLOCATED: u32 = u32::MAX;
/// Largest virtual size accepted: 2 TiB (the format's own limit is 2040 GiB).
const MAX_SIZE: u64 = 2 << 40;
/// BAT entries accepted (64 MiB of table).
const MAX_BAT_ENTRIES: u64 = 1 << 24;
/// Cached sector bitmaps (each at most 64 KiB for 256 MiB blocks).
const BITMAP_CACHE: usize = 64;

/// One's complement of the byte sum of `b` without the 4 checksum bytes at `at`.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b.iter().enumerate().fold(0u32, |s, (i, &x)| {
        if (at..at + 4).contains(&i) {
            s
        } else {
            s.wrapping_add(u32::from(x))
        }
    });
    !sum
}

/// `b` is a VHD footer: cookie and checksum match.
pub(crate) fn is_footer(b: &[u8]) -> bool {
    b.starts_with(COOKIE) && be32(b, 64) == checksum(b, 64)
}

/// A parsed and checked footer.
struct Footer {
    raw: Vec<u8>,
    disk_type: u32,
    data_offset: u64,
    size: u64,
}

fn parse_footer(b: &[u8]) -> Result<Footer, ImageError> {
    if b.get(0..8) != Some(COOKIE.as_slice()) {
        return Err(ImageError::Magic(NAME));
    }
    let stored = be32(b, 64);
    let computed = checksum(b, 64);
    if stored != computed {
        return Err(ImageError::Checksum {
            format: NAME,
            what: "footer",
            stored: stored.into(),
            computed: computed.into(),
        });
    }
    let disk_type = be32(b, 60);
    match disk_type {
        TYPE_FIXED | TYPE_DYNAMIC => {}
        TYPE_DIFFERENCING => {
            return Err(ImageError::Unsupported {
                format: NAME,
                what: "differencing disks (a parent image)".into(),
            });
        }
        t => {
            return Err(field(
                NAME,
                "disk type",
                t.into(),
                "not fixed (2) or dynamic (3)",
            ));
        }
    }
    let current_size = be64(b, 48);
    let cyls = u64::from(u16::from_be_bytes([
        b.get(56).copied().unwrap_or(0),
        b.get(57).copied().unwrap_or(0),
    ]));
    let heads = u64::from(b.get(58).copied().unwrap_or(0));
    let spt = u64::from(b.get(59).copied().unwrap_or(0));
    let chs = cyls * heads * spt * SECTOR;
    let creator = b.get(28..32).unwrap_or_default();
    let max_chs = cyls == 65535 && heads == 16 && spt == 255;
    let size = if (creator == b"vpc " || creator == b"qemu") && !max_chs {
        chs
    } else {
        current_size
    };
    if size > MAX_SIZE {
        return Err(field(NAME, "disk size", size, "above 2 TiB"));
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(field(NAME, "disk size", size, "not a multiple of 512"));
    }
    Ok(Footer {
        raw: b.to_vec(),
        disk_type,
        data_offset: be64(b, 16),
        size,
    })
}

/// Opens a VHD image.
pub fn open(file: File, readonly: bool) -> Result<Box<dyn DiskFile>, ImageError> {
    let file_len = file.metadata()?.len();
    if file_len < FOOTER_LEN {
        return Err(ImageError::Short(NAME));
    }
    let mut b = vec![0u8; to_usize(FOOTER_LEN, "footer length")?];
    file.read_exact_at(&mut b, file_len - FOOTER_LEN)?;
    let footer = match parse_footer(&b) {
        Ok(f) => f,
        Err(end_err) => {
            // A dynamic disk's copy at offset 0 stands in for a damaged footer (read-only: a
            // write would have to rebuild the end of the file).
            file.read_exact_at(&mut b, 0)?;
            match parse_footer(&b) {
                Ok(f) if f.disk_type == TYPE_DYNAMIC && readonly => f,
                _ => return Err(end_err),
            }
        }
    };
    if footer.disk_type == TYPE_FIXED {
        if footer.size > file_len - FOOTER_LEN {
            return Err(field(
                NAME,
                "disk size",
                footer.size,
                "larger than the fixed disk's data",
            ));
        }
        return Ok(Box::new(RawFile::window(
            file,
            0,
            footer.size,
            readonly,
            Format::Vhd,
        )));
    }
    Ok(Box::new(Dynamic::open(file, readonly, footer, file_len)?))
}

/// A dynamic VHD.
struct Dynamic {
    file: File,
    readonly: bool,
    size: u64,
    block_size: u64,
    /// Bytes of the sector bitmap in front of each block (whole sectors).
    bitmap_len: u64,
    bat_offset: u64,
    bat: Vec<u32>,
    footer: Vec<u8>,
    /// Where the footer is: the next block goes here.
    end: u64,
    bitmaps: Lru<usize, Vec<u8>>,
}

impl Dynamic {
    fn open(
        file: File,
        readonly: bool,
        footer: Footer,
        file_len: u64,
    ) -> Result<Dynamic, ImageError> {
        let hoff = footer.data_offset;
        if !in_file(hoff, DYN_HEADER_LEN, file_len) {
            return Err(field(
                NAME,
                "data offset",
                hoff,
                "dynamic header outside the file",
            ));
        }
        let h = read_vec(&file, hoff, DYN_HEADER_LEN)?;
        if h.get(0..8) != Some(DYN_COOKIE.as_slice()) {
            return Err(field(
                NAME,
                "dynamic header cookie",
                be64(&h, 0),
                "not cxsparse",
            ));
        }
        let stored = be32(&h, 36);
        let computed = checksum(&h, 36);
        if stored != computed {
            return Err(ImageError::Checksum {
                format: NAME,
                what: "dynamic header",
                stored: stored.into(),
                computed: computed.into(),
            });
        }
        let bat_offset = be64(&h, 16);
        let max_entries = u64::from(be32(&h, 28));
        let block_size = u64::from(be32(&h, 32));
        if !block_size.is_power_of_two() || !(SECTOR..=256 << 20).contains(&block_size) {
            return Err(field(
                NAME,
                "block size",
                block_size,
                "not a power of two from 512 B to 256 MiB",
            ));
        }
        let needed = footer.size.div_ceil(block_size);
        if max_entries < needed {
            return Err(field(
                NAME,
                "max table entries",
                max_entries,
                "too few for the disk size",
            ));
        }
        if needed > MAX_BAT_ENTRIES {
            return Err(field(NAME, "max table entries", needed, "above 2^24"));
        }
        if !in_file(bat_offset, needed * 4, file_len) {
            return Err(field(
                NAME,
                "table offset",
                bat_offset,
                "BAT outside the file",
            ));
        }
        let bat: Vec<u32> = read_vec(&file, bat_offset, needed * 4)?
            .chunks_exact(4)
            .map(|c| be32(c, 0))
            .collect();
        let bitmap_len = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        // Blocks must lie after the metadata and inside the file.
        let meta_end = (bat_offset + needed * 4)
            .max(hoff + DYN_HEADER_LEN)
            .max(FOOTER_LEN);
        for &e in &bat {
            if e == UNALLOCATED {
                continue;
            }
            let off = u64::from(e) * SECTOR;
            if off < meta_end || !in_file(off, bitmap_len + block_size, file_len) {
                return Err(field(
                    NAME,
                    "BAT entry",
                    off,
                    "block overlaps the metadata or lies outside the file",
                ));
            }
        }
        let end = (file_len - FOOTER_LEN).next_multiple_of(SECTOR);
        Ok(Dynamic {
            file,
            readonly,
            size: footer.size,
            block_size,
            bitmap_len,
            bat_offset,
            bat,
            footer: footer.raw,
            end,
            bitmaps: Lru::new(BITMAP_CACHE),
        })
    }

    /// (BAT index, offset in block) of virtual offset `pos`.
    fn locate(&self, pos: u64) -> io::Result<(usize, u64)> {
        // pos < size <= 2 TiB: the index fits, and the checked conversion says so without a cast.
        Ok((
            to_usize(pos / self.block_size, "block index")?,
            pos % self.block_size,
        ))
    }

    fn block_offset(&self, idx: usize) -> io::Result<Option<u64>> {
        match self.bat.get(idx) {
            None => Err(corrupt("VHD BAT index")),
            Some(&UNALLOCATED) => Ok(None),
            Some(&e) => Ok(Some(u64::from(e) * SECTOR)),
        }
    }

    fn bitmap(&mut self, idx: usize, block: u64) -> io::Result<&mut Vec<u8>> {
        if self.bitmaps.get_mut(&idx).is_none() {
            let mut b = vec![0u8; to_usize(self.bitmap_len, "bitmap length")?];
            read_exact_or_eof(&self.file, &mut b, block)?;
            return Ok(self.bitmaps.insert(idx, b));
        }
        self.bitmaps
            .get_mut(&idx)
            .ok_or_else(|| corrupt("VHD bitmap cache"))
    }

    /// Reads `buf` from block `idx` at `in_block`, honouring the sector bitmap.
    fn read_piece(&mut self, idx: usize, in_block: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(block) = self.block_offset(idx)? else {
            buf.fill(0);
            return Ok(());
        };
        let data = block + self.bitmap_len;
        let bitmap = self.bitmap(idx, block)?.clone();
        let present = |sector: u64| {
            bitmap
                .get((sector / 8) as usize)
                .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
        };
        let mut done = 0usize;
        // Runs of sectors with the same bitmap state.
        while done < buf.len() {
            let pos = in_block + done as u64;
            let state = present(pos / SECTOR);
            let mut end = pos;
            while end < in_block + buf.len() as u64 && present(end / SECTOR) == state {
                end = (end / SECTOR + 1) * SECTOR;
            }
            let n = to_usize(end.min(in_block + buf.len() as u64) - pos, "run length")?;
            let out = buf
                .get_mut(done..done + n)
                .ok_or_else(|| corrupt("VHD read"))?;
            if state {
                read_exact_or_eof(&self.file, out, data + pos)?;
            } else {
                out.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    /// Appends a block for BAT entry `idx`: footer first, then the empty bitmap, then the
    /// BAT entry.
    fn allocate(&mut self, idx: usize) -> io::Result<u64> {
        let block = self.end;
        let sector = u32::try_from(block / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| io::Error::other("VHD file too large for another block"))?;
        let new_end = block + self.bitmap_len + self.block_size;
        self.file.write_all_at(&self.footer, new_end)?;
        self.file.sync_data()?;
        let bitmap = vec![0u8; to_usize(self.bitmap_len, "bitmap length")?];
        self.file.write_all_at(&bitmap, block)?;
        self.file.sync_data()?;
        let slot = self
            .bat
            .get_mut(idx)
            .ok_or_else(|| corrupt("VHD BAT index"))?;
        *slot = sector;
        self.file
            .write_all_at(&sector.to_be_bytes(), self.bat_offset + idx as u64 * 4)?;
        self.end = new_end;
        self.bitmaps.insert(idx, bitmap);
        Ok(block)
    }

    /// Writes whole sectors `buf` into block `idx` at `in_block` (sector aligned).
    fn write_sectors(&mut self, idx: usize, in_block: u64, buf: &[u8]) -> io::Result<()> {
        let block = match self.block_offset(idx)? {
            Some(b) => b,
            None => self.allocate(idx)?,
        };
        self.file
            .write_all_at(buf, block + self.bitmap_len + in_block)?;
        let first = in_block / SECTOR;
        let count = buf.len() as u64 / SECTOR;
        let bitmap = self.bitmap(idx, block)?;
        let mut changed = false;
        for s in first..first + count {
            if let Some(b) = bitmap.get_mut((s / 8) as usize) {
                let bit = 0x80 >> (s % 8);
                changed |= *b & bit == 0;
                *b |= bit;
            }
        }
        if changed {
            let lo = (first / 8) as usize;
            let hi = to_usize((first + count).div_ceil(8), "bitmap offset")?.min(bitmap.len());
            let bytes = bitmap.get(lo..hi).unwrap_or_default().to_vec();
            self.file.write_all_at(&bytes, block + lo as u64)?;
        }
        Ok(())
    }
}

impl DiskFile for Dynamic {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        for (pos, n) in pieces(offset, buf.len() as u64, self.block_size) {
            let (idx, in_block) = self.locate(pos)?;
            let out = buf
                .get_mut(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| corrupt("VHD read"))?;
            self.read_piece(idx, in_block, out)?;
            done += to_usize(n, "piece length")?;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        check_range(offset, buf.len() as u64, self.size)?;
        // Widen to whole sectors (a sector's bitmap bit covers all of it).
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).next_multiple_of(SECTOR);
        let mut whole;
        let data = if start == offset && end == offset + buf.len() as u64 {
            buf
        } else {
            whole = vec![0u8; to_usize(end - start, "write length")?];
            self.read_at(start, &mut whole)?;
            let at = to_usize(offset - start, "offset in write")?;
            whole
                .get_mut(at..at + buf.len())
                .ok_or_else(|| invalid_input("VHD write"))?
                .copy_from_slice(buf);
            &whole[..]
        };
        let mut done = 0usize;
        for (pos, n) in pieces(start, end - start, self.block_size) {
            let (idx, in_block) = self.locate(pos)?;
            let part = data
                .get(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| invalid_input("VHD write"))?;
            self.write_sectors(idx, in_block, part)?;
            done += to_usize(n, "piece length")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn readonly(&self) -> bool {
        self.readonly
    }
}

#[cfg(test)]
mod tests;
