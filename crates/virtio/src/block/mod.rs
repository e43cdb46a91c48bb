//! virtio-blk (virtio 1.x section 5.2) over a disk image of any format the `disk` crate opens.
//!
//! One request queue. Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else
//! completes with `VIRTIO_BLK_S_UNSUPP`. A request the device can parse but not perform (out of
//! range, not a multiple of 512 bytes, buffers outside guest memory, host I/O failure, writing a
//! read-only disk) completes with `VIRTIO_BLK_S_IOERR`. A chain without a writable status byte,
//! or one the queue cannot even walk (loops, bad indirect tables, bad indexes), puts the device
//! in `DEVICE_NEEDS_RESET`.

use std::path::{Path, PathBuf};

use hv::DirtyBitmap;
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
use iov::Way;

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
        self.transfer(Way::FileToGuest, start, guest_pieces(bufs, 0)?, mem, bounce)?;
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
            Way::GuestToFile,
            start,
            guest_pieces(readable, HEADER_LEN as u64)?,
            mem,
            bounce,
        )?;
        self.counters.bytes_written += len;
        Ok(())
    }

    /// Moves the data of one request between the disk (from byte `start`) and its guest
    /// buffers, in either direction, asking the image where each stretch of the disk lives
    /// ([`DiskFile::map`]): a stretch in the image's file moves with one `preadv`/`pwritev`
    /// straight between the file and every guest buffer it covers ([`iov`]); a stretch that
    /// reads as zeros is zero-filled in guest memory; anything else (compressed or encrypted
    /// clusters, a backing chain, formats without a mapping) goes through `read_at`/`write_at`
    /// and the bounce buffer, at most [`disk::CHUNK`] bytes at a time. Every write into guest
    /// memory marks its pages dirty (vm-memory's bitmap, read by migration).
    fn transfer(
        &mut self,
        way: Way,
        start: u64,
        pieces: impl IntoIterator<Item = (GuestAddress, u64)>,
        mem: &GuestMemory,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ()> {
        let mut slices = Vec::new();
        let mut len = 0u64;
        for (addr, l) in pieces {
            for s in mem.get_slices(addr, usize::try_from(l).map_err(|_| ())?) {
                let s = s.map_err(|_| ())?;
                len += s.len() as u64;
                slices.push(s);
            }
        }
        let disk = self.disk.as_mut();
        let warn = |e: std::io::Error| {
            hv::rate_limited!(tracing::warn!("virtio-blk {}: {e}", way.verb()));
        };
        let mut cursor = Cursor::new(&slices);
        let mut pos = start;
        let end = start.checked_add(len).ok_or(())?;
        while pos < end {
            let left = end - pos;
            let n = match disk.map(pos, left, way == Way::GuestToFile).map_err(warn)? {
                disk::Mapping::File { file, offset, len } => {
                    let n = len.min(left);
                    let part = cursor.take(n)?;
                    iov::transfer(way, file, offset, &part).map_err(warn)?;
                    n
                }
                disk::Mapping::Zero { len } if way == Way::FileToGuest => {
                    let n = len.min(left);
                    for s in cursor.take(n)? {
                        let mut at = 0;
                        while at < s.len() {
                            let k = (s.len() - at).min(ZEROS.len());
                            s.subslice(at, k)
                                .map_err(|_| ())?
                                .copy_from(ZEROS.get(..k).ok_or(())?);
                            at += k;
                        }
                    }
                    n
                }
                disk::Mapping::Zero { len } | disk::Mapping::Other { len } => {
                    let n = len.min(left).min(disk::CHUNK as u64);
                    let k = usize::try_from(n).map_err(|_| ())?;
                    if bounce.len() < k {
                        bounce.resize(k, 0);
                    }
                    let buf = bounce.get_mut(..k).ok_or(())?;
                    let part = cursor.take(n)?;
                    match way {
                        Way::FileToGuest => {
                            disk.read_at(pos, buf).map_err(warn)?;
                            let mut at = 0;
                            for s in &part {
                                s.copy_from(buf.get(at..at + s.len()).ok_or(())?);
                                at += s.len();
                            }
                        }
                        Way::GuestToFile => {
                            let mut at = 0;
                            for s in &part {
                                s.copy_to(buf.get_mut(at..at + s.len()).ok_or(())?);
                                at += s.len();
                            }
                            disk.write_at(pos, buf).map_err(warn)?;
                        }
                    }
                    n
                }
            };
            pos += n;
        }
        Ok(())
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

impl Way {
    fn verb(self) -> &'static str {
        match self {
            Way::FileToGuest => "read failed",
            Way::GuestToFile => "write failed",
        }
    }
}

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

/// A request's guest buffers, consumed from the front in pieces of given byte counts.
struct Cursor<'s, 'm> {
    slices: &'s [GuestSlice<'m>],
    /// Index of the first slice not entirely consumed, and the bytes of it consumed.
    index: usize,
    skip: usize,
}

type GuestSlice<'m> = vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, DirtyBitmap>>;

impl<'s, 'm> Cursor<'s, 'm> {
    fn new(slices: &'s [GuestSlice<'m>]) -> Self {
        Cursor {
            slices,
            index: 0,
            skip: 0,
        }
    }

    /// The next `n` bytes of the buffers, as slices (the first and last may be parts).
    fn take(&mut self, n: u64) -> Result<Vec<GuestSlice<'m>>, ()> {
        let mut left = usize::try_from(n).map_err(|_| ())?;
        let mut out = Vec::new();
        while left > 0 {
            let s = self.slices.get(self.index).ok_or(())?;
            let rest = s.offset(self.skip).map_err(|_| ())?;
            if rest.len() <= left {
                left -= rest.len();
                out.push(rest);
                self.index += 1;
                self.skip = 0;
            } else {
                out.push(rest.subslice(0, left).map_err(|_| ())?);
                self.skip += left;
                left = 0;
            }
        }
        Ok(out)
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

mod iov;
#[cfg(test)]
mod tests;
