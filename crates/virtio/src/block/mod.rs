//! virtio-blk (virtio 1.x section 5.2) over a disk image of any format the `disk` crate opens.
//!
//! One request queue. Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else
//! completes with `VIRTIO_BLK_S_UNSUPP`. A request the device can parse but not perform (out of
//! range, not a multiple of 512 bytes, buffers outside guest memory, host I/O failure, writing a
//! read-only disk) completes with `VIRTIO_BLK_S_IOERR`. A chain without a writable status byte,
//! or one the queue cannot even walk (loops, bad indirect tables, bad indexes), puts the device
//! in `DEVICE_NEEDS_RESET`.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, Permissions};

use crate::chain::{self, Seg};
use crate::{
    COMMON_FEATURES, Counters, DeviceError, DeviceState, GuestMemory, VirtioDevice,
    read_config_bytes,
};
pub use disk::{DiskFile, Format};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the queue size minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest chain accepted, counting indirect descriptors (header + data + status).
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
pub const SECTOR_SIZE: u64 = 512;
/// Limits advertised for DISCARD and WRITE_ZEROES: one range of at most 4 GiB - 512 per request.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX as u64 / SECTOR_SIZE) as u32;
pub const MAX_DISCARD_SEG: u32 = 1;
/// Size of the device config space we fill (up to and including write_zeroes_may_unmap).
const CONFIG_LEN: usize = 60;
const HEADER_LEN: usize = 16;
const DISCARD_SEG_LEN: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk's own error names the path and what failed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
}

/// What a block device is built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// `None`: detected from the content (`disk::detect_format`).
    pub format: Option<Format>,
}

/// Saved state of a block device. The image content is not part of it: restore reopens the
/// same configuration and checks that it presents the same disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub readonly: bool,
    pub features: u64,
    pub counters: Counters,
}

/// A virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskFile>,
    readonly: bool,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    counters: Counters,
    /// Kept across requests (at most [`disk::CHUNK`] bytes): a fresh 1 MiB buffer per request
    /// cost an mmap, a munmap and 256 page faults each time.
    bounce: Vec<u8>,
    queue_sizes: [u16; 1],
}

impl Block {
    pub fn new(config: BlockConfig) -> Result<Block, Error> {
        let disk = disk::open(
            &config.path,
            disk::OpenOptions::readonly(config.readonly).format(config.format),
        )?;
        Ok(Block::with_disk(disk, config.readonly, &config.path))
    }

    /// A device over an already open image; `path` only names the serial number.
    pub fn with_disk(disk: Box<dyn DiskFile>, readonly: bool, path: &Path) -> Block {
        let mut features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let capacity = disk.size() / SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        Block {
            disk,
            readonly,
            features,
            acked_features: 0,
            config,
            serial: serial_for(path),
            counters: Counters::default(),
            bounce: Vec::new(),
            queue_sizes: [QUEUE_SIZE],
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors() * SECTOR_SIZE
    }

    /// Handles one chain; returns the bytes written into it (data and status).
    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, DeviceError> {
        self.counters.requests += 1;
        let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
            self.counters.invalid_descriptors += 1;
        })?;
        let status_seg = segs[segs.len() - 1];
        if !status_seg.writable || status_seg.len == 0 {
            self.counters.invalid_descriptors += 1;
            return Err(DeviceError::NoStatus);
        }
        let status_addr = status_seg
            .addr
            .checked_add(u64::from(status_seg.len) - 1)
            .filter(|a| mem.address_in_range(*a))
            .ok_or_else(|| {
                self.counters.invalid_descriptors += 1;
                DeviceError::Memory(status_seg.addr.raw_value())
            })?;
        let (status, written) = self.execute(&segs, mem);
        mem.write_obj(status, status_addr)
            .map_err(|_| DeviceError::Memory(status_addr.raw_value()))?;
        if u32::from(status) != VIRTIO_BLK_S_OK {
            self.counters.errors += 1;
        }
        Ok(written.saturating_add(1))
    }

    /// Performs the request; returns the status byte and the data bytes written to the guest.
    fn execute(&mut self, segs: &[Seg], mem: &GuestMemory) -> (u8, u32) {
        const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
        const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
        // Device-readable buffers come first, then device-writable ones.
        let split = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
        if segs[split..].iter().any(|s| !s.writable) {
            return (IOERR, 0);
        }
        let readable = &segs[..split];
        // The writable buffers without the status byte.
        let mut writable = segs[split..].to_vec();
        if let Some(last) = writable.last_mut() {
            last.len -= 1;
        }
        let mut header = [0u8; HEADER_LEN];
        if copy_from_guest(mem, readable, 0, &mut header).is_err() {
            return (IOERR, 0);
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        match req_type {
            VIRTIO_BLK_T_IN => match self.read(sector, &writable, mem) {
                Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
                Err(()) => (IOERR, 0),
            },
            VIRTIO_BLK_T_OUT => match self.write(sector, readable, mem) {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(()) => (IOERR, 0),
            },
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    hv::rate_limited!(tracing::warn!("virtio-blk flush failed: {e}"));
                    (IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let room = total_len(&writable).min(self.serial.len() as u64) as usize;
                match copy_to_guest(mem, &writable, 0, &self.serial[..room]) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, room as u32),
                    Err(()) => (IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    return (UNSUPP, 0);
                }
                (self.discard_or_zero(req_type, readable, mem), 0)
            }
            _ => (UNSUPP, 0),
        }
    }

    /// Byte range of a data transfer, if it is whole sectors inside the disk.
    fn data_range(&self, sector: u64, len: u64) -> Result<u64, ()> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(());
        }
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(())?;
        let end = start.checked_add(len).ok_or(())?;
        if end > self.capacity_bytes() {
            return Err(());
        }
        Ok(start)
    }

    fn read(&mut self, sector: u64, bufs: &[Seg], mem: &GuestMemory) -> Result<u32, ()> {
        let mut bounce = std::mem::take(&mut self.bounce);
        let r = self.read_with(sector, bufs, mem, &mut bounce);
        self.bounce = bounce;
        r
    }

    fn read_with(
        &mut self,
        sector: u64,
        bufs: &[Seg],
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<u32, ()> {
        let len = total_len(bufs);
        let start = self.data_range(sector, len)?;
        check_guest(mem, bufs, Permissions::Write)?;
        self.transfer(Dir::FromDisk, start, guest_pieces(bufs, 0)?, mem, bounce)?;
        self.counters.bytes_read += len;
        // `len` is a sum of u32 lengths within one chain, which virtio-queue caps at u32::MAX.
        u32::try_from(len).map_err(|_| ())
    }

    fn write(&mut self, sector: u64, readable: &[Seg], mem: &GuestMemory) -> Result<(), ()> {
        if self.readonly {
            return Err(());
        }
        let mut bounce = std::mem::take(&mut self.bounce);
        let r = self.write_with(sector, readable, mem, &mut bounce);
        self.bounce = bounce;
        r
    }

    fn write_with(
        &mut self,
        sector: u64,
        readable: &[Seg],
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        let len = total_len(readable)
            .checked_sub(HEADER_LEN as u64)
            .ok_or(())?;
        let start = self.data_range(sector, len)?;
        check_guest(mem, readable, Permissions::Read)?;
        self.transfer(
            Dir::ToDisk,
            start,
            guest_pieces(readable, HEADER_LEN as u64)?,
            mem,
            bounce,
        )?;
        self.counters.bytes_written += len;
        Ok(())
    }

    /// Moves the data of one request between the disk (from byte `start`) and its guest
    /// pieces, in either direction: a large piece goes straight between disk and guest memory,
    /// small neighbours are gathered into one run of at most [`disk::CHUNK`] bytes.
    fn transfer(
        &mut self,
        dir: Dir,
        start: u64,
        pieces: impl IntoIterator<Item = (GuestAddress, u64)>,
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        let disk = self.disk.as_mut();
        let mut pos = start;
        let mut run = Run::default();
        for (addr, l) in pieces {
            if l >= DIRECT_MIN {
                run.flush(dir, disk, mem, bounce)?;
                let (mut addr, mut left) = (addr, l);
                while left > 0 {
                    let n = match dir {
                        Dir::FromDisk => read_piece(disk, mem, pos, addr, left, bounce)?,
                        Dir::ToDisk => write_piece(disk, mem, pos, addr, left, bounce)?,
                    };
                    left -= n;
                    addr = addr.checked_add(n).ok_or(())?;
                    pos += n;
                }
            } else {
                if run.len + l > disk::CHUNK as u64 {
                    run.flush(dir, disk, mem, bounce)?;
                }
                run.push(pos, addr, l);
                pos += l;
            }
        }
        run.flush(dir, disk, mem, bounce)
    }

    fn discard_or_zero(&mut self, req_type: u32, readable: &[Seg], mem: &GuestMemory) -> u8 {
        const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
        let Some(len) = total_len(readable).checked_sub(HEADER_LEN as u64) else {
            return IOERR;
        };
        if len == 0 || !len.is_multiple_of(DISCARD_SEG_LEN) {
            return IOERR;
        }
        let count = len / DISCARD_SEG_LEN;
        if count > u64::from(MAX_DISCARD_SEG) {
            return VIRTIO_BLK_S_UNSUPP as u8;
        }
        for i in 0..count {
            let mut seg = [0u8; 16];
            if copy_from_guest(mem, readable, HEADER_LEN as u64 + i * 16, &mut seg).is_err() {
                return IOERR;
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Only the unmap bit (0) is defined, and only for WRITE_ZEROES.
            let allowed = if req_type == VIRTIO_BLK_T_WRITE_ZEROES {
                1
            } else {
                0
            };
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
            if num > MAX_DISCARD_SECTORS {
                return IOERR;
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            let Ok(start) = self.data_range(sector, bytes) else {
                return IOERR;
            };
            let r = if req_type == VIRTIO_BLK_T_DISCARD {
                self.disk.discard(start, bytes)
            } else {
                self.disk.write_zeroes(start, bytes)
            };
            if let Err(e) = r {
                hv::rate_limited!(tracing::warn!(
                    "virtio-blk discard/write-zeroes failed: {e}"
                ));
                return IOERR;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }
}

/// Moves the first bytes of disk range `[pos, pos + left)` into guest memory at `addr`; returns
/// how many. Ranges the image maps to its file go straight from the file into guest memory
/// (`read(2)` into the mapped guest pages, no copy in between); zero ranges are filled; the rest
/// goes through `read_at` and `bounce` (at most [`disk::CHUNK`] bytes, allocated on first use).
fn read_piece(
    disk: &mut dyn DiskFile,
    mem: &GuestMemory,
    pos: u64,
    addr: GuestAddress,
    left: u64,
    bounce: &mut Vec<u8>,
) -> Result<u64, ()> {
    let warn = |e: std::io::Error| hv::rate_limited!(tracing::warn!("virtio-blk read failed: {e}"));
    match disk.map(pos, left, false).map_err(warn)? {
        disk::Mapping::File { file, offset, len } => {
            let n = len.min(left);
            let mut f = file;
            f.seek(SeekFrom::Start(offset)).map_err(warn)?;
            mem.read_exact_volatile_from(addr, &mut f, n as usize)
                .map_err(|e| hv::rate_limited!(tracing::warn!("virtio-blk read failed: {e}")))?;
            Ok(n)
        }
        disk::Mapping::Zero { len } => {
            let n = len.min(left).min(ZEROS.len() as u64);
            mem.write_slice(ZEROS.get(..n as usize).ok_or(())?, addr)
                .map_err(|_| ())?;
            Ok(n)
        }
        disk::Mapping::Other { len } => {
            let n = len.min(left).min(disk::CHUNK as u64);
            if bounce.len() < n as usize {
                bounce.resize(n as usize, 0);
            }
            let buf = bounce.get_mut(..n as usize).ok_or(())?;
            disk.read_at(pos, buf).map_err(warn)?;
            mem.write_slice(buf, addr).map_err(|_| ())?;
            Ok(n)
        }
    }
}

/// Moves guest memory at `addr` into the first bytes of disk range `[pos, pos + left)`, like
/// [`read_piece`] the other way (`write(2)` from the guest pages where the image maps the range
/// to its file).
fn write_piece(
    disk: &mut dyn DiskFile,
    mem: &GuestMemory,
    pos: u64,
    addr: GuestAddress,
    left: u64,
    bounce: &mut Vec<u8>,
) -> Result<u64, ()> {
    let warn =
        |e: std::io::Error| hv::rate_limited!(tracing::warn!("virtio-blk write failed: {e}"));
    match disk.map(pos, left, true).map_err(warn)? {
        disk::Mapping::File { file, offset, len } => {
            let n = len.min(left);
            let mut f = file;
            f.seek(SeekFrom::Start(offset)).map_err(warn)?;
            mem.write_all_volatile_to(addr, &mut f, n as usize)
                .map_err(|e| hv::rate_limited!(tracing::warn!("virtio-blk write failed: {e}")))?;
            Ok(n)
        }
        disk::Mapping::Zero { len } | disk::Mapping::Other { len } => {
            let n = len.min(left).min(disk::CHUNK as u64);
            if bounce.len() < n as usize {
                bounce.resize(n as usize, 0);
            }
            let buf = bounce.get_mut(..n as usize).ok_or(())?;
            mem.read_slice(buf, addr).map_err(|_| ())?;
            disk.write_at(pos, buf).map_err(warn)?;
            Ok(n)
        }
    }
}

/// Guest buffers at least this long move directly between the image file and guest memory.
/// Shorter ones (Linux often sends a 1 MiB request as 256 buffers of one page) are gathered
/// into one bounce buffer, so that the request costs one host read or write rather than a seek
/// and a read or write per page.
const DIRECT_MIN: u64 = 64 * 1024;

/// The guest buffers of `segs` after the first `skip` bytes, as (address, length).
fn guest_pieces(segs: &[Seg], mut skip: u64) -> Result<Vec<(GuestAddress, u64)>, ()> {
    let mut v = Vec::with_capacity(segs.len());
    for s in segs {
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        v.push((s.addr.checked_add(skip).ok_or(())?, slen - skip));
        skip = 0;
    }
    Ok(v)
}

/// Short guest buffers for consecutive disk bytes from `start`, moved with one disk access.
#[derive(Default)]
struct Run {
    start: u64,
    len: u64,
    bufs: Vec<(GuestAddress, u64)>,
}

/// Which way a request's data moves.
#[derive(Clone, Copy)]
enum Dir {
    FromDisk,
    ToDisk,
}

impl Run {
    /// Moves the gathered run the request's way ([`Run::read`] or [`Run::write`]).
    fn flush(
        &mut self,
        dir: Dir,
        disk: &mut dyn DiskFile,
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        match dir {
            Dir::FromDisk => self.read(disk, mem, bounce),
            Dir::ToDisk => self.write(disk, mem, bounce),
        }
    }

    fn push(&mut self, pos: u64, addr: GuestAddress, len: u64) {
        if self.bufs.is_empty() {
            self.start = pos;
        }
        self.bufs.push((addr, len));
        self.len += len;
    }

    /// Reads the run from the disk into its guest buffers, and empties it.
    fn read(
        &mut self,
        disk: &mut dyn DiskFile,
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        if self.bufs.is_empty() {
            return Ok(());
        }
        let n = usize::try_from(self.len).map_err(|_| ())?;
        if bounce.len() < n {
            bounce.resize(n, 0);
        }
        let buf = bounce.get_mut(..n).ok_or(())?;
        disk.read_at(self.start, buf)
            .map_err(|e| hv::rate_limited!(tracing::warn!("virtio-blk read failed: {e}")))?;
        let mut at = 0usize;
        for &(addr, l) in &self.bufs {
            let piece = buf.get(at..at + l as usize).ok_or(())?;
            mem.write_slice(piece, addr).map_err(|_| ())?;
            at += l as usize;
        }
        *self = Run::default();
        Ok(())
    }

    /// Writes the run's guest buffers to the disk, and empties it.
    fn write(
        &mut self,
        disk: &mut dyn DiskFile,
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        if self.bufs.is_empty() {
            return Ok(());
        }
        let n = usize::try_from(self.len).map_err(|_| ())?;
        if bounce.len() < n {
            bounce.resize(n, 0);
        }
        let buf = bounce.get_mut(..n).ok_or(())?;
        let mut at = 0usize;
        for &(addr, l) in &self.bufs {
            let piece = buf.get_mut(at..at + l as usize).ok_or(())?;
            mem.read_slice(piece, addr).map_err(|_| ())?;
            at += l as usize;
        }
        disk.write_at(self.start, buf)
            .map_err(|e| hv::rate_limited!(tracing::warn!("virtio-blk write failed: {e}")))?;
        *self = Run::default();
        Ok(())
    }
}

/// Zeros written into guest memory for ranges that read as zeros.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// GET_ID answer: the image's file name, cut to 20 bytes (no terminator when it fills them).
fn serial_for(path: &Path) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or_default();
    let n = name.len().min(serial.len());
    serial[..n].copy_from_slice(&name[..n]);
    serial
}

fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Every buffer lies in guest memory.
fn check_guest(mem: &GuestMemory, segs: &[Seg], access: Permissions) -> Result<(), ()> {
    for s in segs {
        if s.len > 0 && !vm_memory::GuestMemory::check_range(mem, s.addr, s.len as usize, access) {
            return Err(());
        }
    }
    Ok(())
}

/// Walks `segs` as one byte stream from `skip`, calling `f(addr, range of buf)` per piece.
fn walk(
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = ((slen - skip) as usize).min(len - done);
        let addr = s.addr.checked_add(skip).ok_or(())?;
        f(addr, done..done + n)?;
        done += n;
        skip = 0;
    }
    if done == len { Ok(()) } else { Err(()) }
}

fn copy_from_guest(mem: &GuestMemory, segs: &[Seg], skip: u64, buf: &mut [u8]) -> Result<(), ()> {
    let len = buf.len();
    walk(segs, skip, len, |addr, r| {
        mem.read_slice(&mut buf[r], addr).map_err(|_| ())
    })
}

fn copy_to_guest(mem: &GuestMemory, segs: &[Seg], skip: u64, buf: &[u8]) -> Result<(), ()> {
    walk(segs, skip, buf.len(), |addr, r| {
        mem.write_slice(&buf[r], addr).map_err(|_| ())
    })
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Ok(false);
        }
        chain::drain(queue, mem, |c| self.handle(c, mem))
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            capacity_sectors: self.capacity_sectors(),
            readonly: self.readonly,
            features: self.features,
            counters: self.counters,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Block(s) = state else {
            return Err(DeviceError::State("not a block device".into()));
        };
        if s.capacity_sectors != self.capacity_sectors() {
            return Err(DeviceError::State("disk capacity differs".into()));
        }
        if s.readonly != self.readonly || s.features != self.features {
            return Err(DeviceError::State("disk configuration differs".into()));
        }
        self.counters = s.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
