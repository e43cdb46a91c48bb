//! VDI (VirtualBox), version 1.1: dynamic ("normal") and static ("fixed") images, read and
//! write. Undo and differencing images are refused.
//!
//! Layout (little-endian): a 64-byte text line, the signature 0xbeda107f at 64, the version at
//! 68, then the header: type, offsets of the block map and of the data, sector size, disk size,
//! block size, extra bytes per block, block counts. The block map has one 32-bit entry per
//! block: the index of its data block, or 0xffffffff (free) / 0xfffffffe (zeroed), both read as
//! zeros. Data block `i` starts at `offset_data + i * block_size`.
//!
//! New blocks of a dynamic image are appended after the `blocks_allocated` counted ones: the
//! block's data is written first, then the header's count, then the map entry, so a crash
//! leaves at worst an unreferenced block.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::util::{
    ImageError, check_range, corrupt, field, in_file, le32, le64, pieces, read_exact_or_eof,
    read_vec, to_usize,
};
use crate::{DiskFile, Format, Mapping, read_only};

const NAME: &str = "VDI";
/// Little-endian 0xbeda107f at offset 64.
pub(crate) const SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const FREE: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
/// Header fields read, from offset 0 (the v1.1 header ends at 72 + 384).
const HEADER_END: u64 = 72 + 384;
const OFF_BLOCKS_COUNT: u64 = 0x184;
/// Blocks accepted (64 MiB of map).
const MAX_BLOCKS: u64 = 1 << 24;
/// Largest disk accepted: 64 TiB.
const MAX_SIZE: u64 = 64 << 40;

/// An open VDI image.
pub struct Vdi {
    file: File,
    readonly: bool,
    size: u64,
    block_size: u64,
    offset_blocks: u64,
    offset_data: u64,
    map: Vec<u32>,
    allocated: u32,
}

impl Vdi {
    pub fn open(file: File, readonly: bool) -> Result<Vdi, ImageError> {
        let file_len = file.metadata()?.len();
        if file_len < HEADER_END {
            return Err(ImageError::Short(NAME));
        }
        let h = read_vec(&file, 0, HEADER_END)?;
        if h.get(64..68) != Some(SIGNATURE.as_slice()) {
            return Err(ImageError::Magic(NAME));
        }
        let version = le32(&h, 68);
        if version != VERSION_1_1 {
            return Err(field(NAME, "version", version.into(), "not 1.1"));
        }
        let header_size = u64::from(le32(&h, 72));
        if !(384..=4096).contains(&header_size) || !in_file(72, header_size, file_len) {
            return Err(field(
                NAME,
                "header size",
                header_size,
                "outside 384..4096 or the file",
            ));
        }
        let image_type = le32(&h, 76);
        match image_type {
            TYPE_NORMAL | TYPE_FIXED => {}
            3 | 4 => {
                return Err(ImageError::Unsupported {
                    format: NAME,
                    what: "undo and differencing images".into(),
                });
            }
            t => {
                return Err(field(
                    NAME,
                    "image type",
                    t.into(),
                    "not normal (1) or fixed (2)",
                ));
            }
        }
        let offset_blocks = u64::from(le32(&h, 340));
        let offset_data = u64::from(le32(&h, 344));
        let sector_size = le32(&h, 360);
        let size = le64(&h, 368);
        let block_size = u64::from(le32(&h, 376));
        let block_extra = le32(&h, 380);
        let blocks = u64::from(le32(&h, 384));
        let allocated = le32(&h, 388);
        if sector_size != 512 {
            return Err(field(NAME, "sector size", sector_size.into(), "not 512"));
        }
        if size > MAX_SIZE || !size.is_multiple_of(512) {
            return Err(field(
                NAME,
                "disk size",
                size,
                "above 64 TiB or not whole sectors",
            ));
        }
        if !block_size.is_power_of_two() || !(512..=256 << 20).contains(&block_size) {
            return Err(field(
                NAME,
                "block size",
                block_size,
                "not a power of two from 512 B to 256 MiB",
            ));
        }
        if block_extra != 0 {
            return Err(ImageError::Unsupported {
                format: NAME,
                what: "extra data in blocks".into(),
            });
        }
        if blocks > MAX_BLOCKS {
            return Err(field(NAME, "block count", blocks, "above 2^24"));
        }
        if blocks * block_size < size {
            return Err(field(
                NAME,
                "block count",
                blocks,
                "too few for the disk size",
            ));
        }
        if u64::from(allocated) > blocks {
            return Err(field(
                NAME,
                "allocated blocks",
                allocated.into(),
                "more than the block count",
            ));
        }
        if offset_blocks < 72 + header_size
            || offset_blocks + blocks * 4 > offset_data
            || !in_file(offset_blocks, blocks * 4, file_len)
        {
            return Err(field(
                NAME,
                "block map offset",
                offset_blocks,
                "overlaps the header or the data, or outside the file",
            ));
        }
        let data_end = offset_data + u64::from(allocated) * block_size;
        if data_end > file_len {
            return Err(field(
                NAME,
                "allocated blocks",
                allocated.into(),
                "data beyond the end of the file",
            ));
        }
        let map: Vec<u32> = read_vec(&file, offset_blocks, blocks * 4)?
            .chunks_exact(4)
            .map(|c| le32(c, 0))
            .collect();
        let mut used = vec![false; allocated as usize];
        for (i, &e) in map.iter().enumerate() {
            if e == FREE || e == ZERO {
                continue;
            }
            match used.get_mut(e as usize) {
                Some(u) if !*u => *u = true,
                Some(_) => {
                    return Err(field(
                        NAME,
                        "block map entry",
                        i as u64,
                        "shares its data block",
                    ));
                }
                None => {
                    return Err(field(
                        NAME,
                        "block map entry",
                        i as u64,
                        "beyond the allocated blocks",
                    ));
                }
            }
        }
        Ok(Vdi {
            file,
            readonly,
            size,
            block_size,
            offset_blocks,
            offset_data,
            map,
            allocated,
        })
    }

    /// File offset of data block `e`.
    fn data_at(&self, e: u32) -> u64 {
        self.offset_data + u64::from(e) * self.block_size
    }

    /// Appends a data block for map entry `idx` holding `content` (a whole block).
    fn allocate(&mut self, idx: usize, content: &[u8]) -> io::Result<()> {
        let e = self.allocated;
        let count = e
            .checked_add(1)
            .filter(|&c| c < ZERO && u64::from(c) <= self.map.len() as u64)
            .ok_or_else(|| corrupt("VDI has no free data block"))?;
        self.file.write_all_at(content, self.data_at(e))?;
        self.file.sync_data()?;
        self.file
            .write_all_at(&count.to_le_bytes(), OFF_BLOCKS_COUNT)?;
        self.allocated = count;
        self.file
            .write_all_at(&e.to_le_bytes(), self.offset_blocks + idx as u64 * 4)?;
        if let Some(slot) = self.map.get_mut(idx) {
            *slot = e;
        }
        Ok(())
    }
}

impl DiskFile for Vdi {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        for (pos, n) in pieces(offset, buf.len() as u64, self.block_size) {
            let out = buf
                .get_mut(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| corrupt("VDI read"))?;
            let idx = to_usize(pos / self.block_size, "block index")?;
            match self.map.get(idx).copied() {
                None => return Err(corrupt("VDI block index")),
                Some(FREE | ZERO) => out.fill(0),
                Some(e) => {
                    read_exact_or_eof(&self.file, out, self.data_at(e) + pos % self.block_size)?
                }
            }
            done += to_usize(n, "piece length")?;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        for (pos, n) in pieces(offset, buf.len() as u64, self.block_size) {
            let data = buf
                .get(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| corrupt("VDI write"))?;
            let idx = to_usize(pos / self.block_size, "block index")?;
            let in_block = pos % self.block_size;
            match self.map.get(idx).copied() {
                None => return Err(corrupt("VDI block index")),
                Some(FREE | ZERO) => {
                    let mut block = vec![0u8; to_usize(self.block_size, "block size")?];
                    block
                        .get_mut(to_usize(in_block, "offset in block")?..)
                        .and_then(|b| b.get_mut(..data.len()))
                        .ok_or_else(|| corrupt("VDI write"))?
                        .copy_from_slice(data);
                    self.allocate(idx, &block)?;
                }
                Some(e) => self.file.write_all_at(data, self.data_at(e) + in_block)?,
            }
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
        Format::Vdi
    }

    /// Allocated blocks map to the file (read and write in place), free ones read as zeros.
    fn map(&mut self, offset: u64, len: u64, write: bool) -> io::Result<Mapping<'_>> {
        if write && self.readonly {
            return Err(read_only());
        }
        check_range(offset, len, self.size)?;
        let in_block = offset % self.block_size;
        let n = len.min(self.block_size - in_block);
        let idx = to_usize(offset / self.block_size, "block index")?;
        Ok(match self.map.get(idx).copied() {
            None => return Err(corrupt("VDI block index")),
            Some(FREE | ZERO) if !write => Mapping::Zero { len: n },
            Some(FREE | ZERO) => Mapping::Other { len: n },
            Some(e) => Mapping::File {
                file: &self.file,
                offset: self.data_at(e) + in_block,
                len: n,
            },
        })
    }

    fn readonly(&self) -> bool {
        self.readonly
    }
}

#[cfg(test)]
mod tests;
