//! Raw images: disk byte N is file byte N (regular files and block devices).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use vmm_sys_util::fallocate::{FallocateMode, fallocate};

use crate::util::check_range;
use crate::{CHUNK, DiskFile, Format, read_only};

/// A raw image: disk byte N is file byte `base + N` (`base` is 0 but for windows into other
/// formats' files: VHD fixed, VMDK flat extents).
pub struct RawFile {
    file: File,
    base: u64,
    size: u64,
    readonly: bool,
    format: Format,
}

impl RawFile {
    pub fn new(mut file: File, readonly: bool) -> io::Result<Self> {
        // Seeking also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawFile {
            file,
            base: 0,
            size,
            readonly,
            format: Format::Raw,
        })
    }

    /// `size` bytes of `file` from `base`, presented as an image of `format`. The caller has
    /// checked that the window lies inside the file.
    pub(crate) fn window(
        file: File,
        base: u64,
        size: u64,
        readonly: bool,
        format: Format,
    ) -> RawFile {
        RawFile {
            file,
            base,
            size,
            readonly,
            format,
        }
    }

    /// File offset of disk offset `offset`, if `[offset, offset + len)` is inside the disk.
    fn at(&self, offset: u64, len: u64) -> io::Result<u64> {
        check_range(offset, len, self.size)?;
        offset
            .checked_add(self.base)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
    }
}

impl DiskFile for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = self.at(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, at)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        let at = self.at(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, at)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        let at = self.at(offset, len)?;
        // Advisory: a file system without hole punching keeps the data, which is allowed.
        let _ = fallocate(&self.file, FallocateMode::PunchHole, true, at, len);
        Ok(())
    }

    fn format(&self) -> Format {
        self.format
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        let at = self.at(offset, len)?;
        if fallocate(&self.file, FallocateMode::ZeroRange, true, at, len).is_ok() {
            return Ok(());
        }
        write_zeroes_slowly(&self.file, at, len)
    }
}

pub(crate) fn write_zeroes_slowly(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(zeros.len(), |r| r.min(zeros.len()));
        let at = offset
            .checked_add(done)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        file.write_all_at(zeros.get(..n).unwrap_or_default(), at)?;
        done += n as u64;
    }
    Ok(())
}
