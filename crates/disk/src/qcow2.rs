//! qcow2 images, versions 2 and 3 (format summary in `docs/qcow2.md`).
//!
//! Supported: any cluster size from 512 B to 2 MiB, refcount widths 1..64 bits, zero-flag
//! clusters, backing files (only with `backing=on`: any format, opened read-only, relative to the
//! image's directory, regular files only, no loops; see [`crate::policy`]),
//! reads and writes (new clusters and L2 tables are appended; refcounts are kept exact, growing
//! the refcount table when needed; partially written clusters are copied from the backing file).
//!
//! Refused at open with an error: encryption, compressed clusters, external data files, extended
//! L2 entries, non-zlib compression type, unknown incompatible features; for writing also
//! internal snapshots and images marked dirty or corrupt (read-only opening accepts those).
//!
//! Write ordering keeps the image consistent between requests: a new cluster's refcount is
//! written before the cluster is referenced, so an interrupted write can leak a cluster but never
//! leaves a referenced cluster without a refcount. The dirty bit is never set.
//!
//! Opening is bounded by fixed caps, not by what the header claims: the L1 and refcount tables
//! are read whole (at most 32 MiB and 8 MiB), but L2 tables, whose number a sparse file can
//! inflate for free, are checked when first used (each time one is read into the cache); at
//! open only the first [`OPEN_SCAN_BYTES`] of them are, so that an image of compressed clusters
//! is refused with a clear message at once.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::policy::{Link, PolicyError, Role, Walk};
use crate::util::{Lru, be32, be64, corrupt, read_exact_or_eof, to_usize};
use crate::{DiskFile, Format, Mapping, QCOW2_MAGIC};

/// Largest L1 table accepted (as qemu): 32 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (as qemu): 8 MiB.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted: 2^56 - 1 bytes, the reach of an L2 entry's offset field.
const MAX_VIRTUAL_SIZE: u64 = (1 << 56) - 1;
/// Memory for cached L2 tables and refcount blocks, per image (at least two of each).
const L2_CACHE_BYTES: u64 = 4 << 20;
const REFBLOCK_CACHE_BYTES: u64 = 1 << 20;

fn cache_entries(cluster_size: u64, budget: u64) -> usize {
    usize::try_from(budget / cluster_size).map_or(2, |n| n.max(2))
}

/// L2 table bytes checked at open; the rest are checked when first read.
const OPEN_SCAN_BYTES: u64 = 8 << 20;
/// Longest backing file name (as qemu).
const MAX_BACKING_NAME: u32 = 1023;

/// Host offset bits of L1 and standard L2 entries: 9..=55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly one: it may be written in place.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeros.
const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be zero (1..=8, 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero (0..=8, 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Header field offsets written after open.
const HDR_AUTOCLEAR: u64 = 88;
const HDR_REFTABLE: u64 = 48;
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error")]
    Io(#[from] io::Error),
    #[error("not a qcow2 image")]
    Magic,
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("file too short for a qcow2 header")]
    Short,
    #[error("invalid header: {0}")]
    Header(String),
    #[error("encrypted images are not supported")]
    Encrypted,
    #[error("compressed clusters are not supported (convert with `qemu-img convert -O qcow2`)")]
    Compressed,
    #[error("unsupported incompatible feature bits {0:#x}")]
    Incompatible(u64),
    #[error("images with internal snapshots can only be opened read-only")]
    Snapshots,
    #[error("image is marked dirty or corrupt; repair it with `qemu-img check -r all`")]
    Dirty,
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("backing file {path}")]
    Backing {
        path: PathBuf,
        #[source]
        source: Box<crate::Error>,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Where a guest cluster's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Not allocated here: backing file, or zeros.
    Unallocated,
    /// Zero flag (v3); `host` is a preallocated cluster (0 if none), refcount one if `copied`.
    Zero { host: u64, copied: bool },
    /// Data at `host`; written in place only if `copied`.
    Data { host: u64, copied: bool },
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: File,
    readonly: bool,
    version: u32,
    cluster_bits: u32,
    cluster_size: u64,
    /// L2 entries per table (cluster_size / 8).
    l2_entries: u64,
    virtual_size: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    refcount_order: u32,
    reftable_offset: u64,
    reftable: Vec<u64>,
    /// First host offset after every cluster in use: new clusters go here.
    end: u64,
    /// File length at open. Clusters we allocate later are always written whole; a cluster
    /// that was there before may be cut short by the end of the file (it reads zeros past it).
    open_len: u64,
    backing: Option<Box<dyn DiskFile>>,
    /// Where the backing file is and what it is (for [`DiskFile::chain`]).
    backing_link: Option<Link>,
    /// Recently used L2 tables by host offset (at most [`CACHE_BYTES`] of them), kept in step
    /// with every L2 entry written.
    l2_cache: Lru<u64, Vec<u64>>,
    /// Recently used refcount blocks by host offset, kept in step with every refcount written.
    refblock_cache: Lru<u64, Vec<u8>>,
}

struct Header {
    version: u32,
    backing_offset: u64,
    backing_size: u32,
    cluster_bits: u32,
    size: u64,
    crypt: u32,
    l1_size: u32,
    l1_offset: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
    nb_snapshots: u32,
    incompatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
}

impl Header {
    fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < V2_HEADER_LEN {
            return Err(Error::Short);
        }
        if b[0..4] != QCOW2_MAGIC {
            return Err(Error::Magic);
        }
        let version = be32(b, 4);
        let mut h = Header {
            version,
            backing_offset: be64(b, 8),
            backing_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt: be32(b, 32),
            l1_size: be32(b, 36),
            l1_offset: be64(b, 40),
            reftable_offset: be64(b, 48),
            reftable_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
        };
        match version {
            2 => {}
            3 => {
                if b.len() < V3_HEADER_LEN {
                    return Err(Error::Short);
                }
                h.incompatible = be64(b, 72);
                h.autoclear = be64(b, 88);
                h.refcount_order = be32(b, 96);
                h.header_length = be32(b, 100);
            }
            v => return Err(Error::Version(v)),
        }
        Ok(h)
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

fn read_table(file: &File, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let len = usize::try_from(entries * 8).map_err(|_| corrupt("table too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
}

impl Qcow2 {
    /// Opens an image from `file` (its path resolves a relative backing file name); a backing
    /// file is opened only if `walk` allows it.
    pub fn open(file: File, path: &Path, readonly: bool, walk: &mut Walk) -> Result<Qcow2, Error> {
        let file_len = file.metadata()?.len();
        let mut hdr = vec![0u8; V3_HEADER_LEN];
        read_exact_or_eof(&file, &mut hdr, 0)?;
        if file_len < V2_HEADER_LEN as u64 {
            return Err(Error::Short);
        }
        let h = Header::parse(&hdr)?;
        let bad = |m: &str| Err(Error::Header(m.to_string()));

        if !(9..=21).contains(&h.cluster_bits) {
            return bad("cluster size outside 512 B..2 MiB");
        }
        let cluster_size = 1u64 << h.cluster_bits;
        if h.crypt != 0 {
            return Err(Error::Encrypted);
        }
        if h.version == 3 {
            if usize::try_from(h.header_length).is_ok_and(|l| l < V3_HEADER_LEN)
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cluster_size
            {
                return bad("header length");
            }
            if u64::from(h.header_length) > file_len {
                return Err(Error::Short);
            }
            if h.refcount_order > 6 {
                return bad("refcount order above 6");
            }
            // External data file, non-zlib compression, extended L2 entries and anything
            // unknown change how the image must be read: refuse them all.
            let refused = h.incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
            if refused != 0 {
                return Err(Error::Incompatible(refused));
            }
            if !readonly && h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
                return Err(Error::Dirty);
            }
        }
        if !readonly && h.nb_snapshots != 0 {
            return Err(Error::Snapshots);
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return bad("virtual size too large");
        }
        let l2_entries = cluster_size / 8;
        let l2_bits = h.cluster_bits - 3;
        let l1_reach_bits = h.cluster_bits + l2_bits;
        let needed_l1 = align_up(h.size, 1 << l1_reach_bits).unwrap_or(u64::MAX) >> l1_reach_bits;
        if u64::from(h.l1_size) < needed_l1 {
            return bad("L1 table too small for the virtual size");
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return bad("L1 table too large");
        }
        let in_file = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        if h.l1_size > 0
            && (!h.l1_offset.is_multiple_of(cluster_size) || !in_file(h.l1_offset, l1_bytes))
        {
            return bad("L1 table offset outside the file or unaligned");
        }
        let reftable_bytes = u64::from(h.reftable_clusters) * cluster_size;
        if h.reftable_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return bad("refcount table size");
        }
        if !h.reftable_offset.is_multiple_of(cluster_size)
            || !in_file(h.reftable_offset, reftable_bytes)
        {
            return bad("refcount table offset outside the file or unaligned");
        }

        let l1 = read_table(&file, h.l1_offset, u64::from(h.l1_size))?;
        let reftable = read_table(&file, h.reftable_offset, reftable_bytes / 8)?;
        for &e in &reftable {
            if e & (cluster_size - 1) != 0 || (e != 0 && !in_file(e, cluster_size)) {
                return Err(Error::Corrupt("refcount block offset".into()));
            }
        }

        // Backing file name and format.
        let backing = if h.backing_offset != 0 {
            if h.backing_size == 0
                || h.backing_size > MAX_BACKING_NAME
                || !in_file(h.backing_offset, u64::from(h.backing_size))
            {
                return bad("backing file name");
            }
            let mut name = vec![0u8; h.backing_size as usize];
            file.read_exact_at(&mut name, h.backing_offset)?;
            let name = String::from_utf8(name)
                .map_err(|_| Error::Header("backing file name is not UTF-8".into()))?;
            if !walk.backing() {
                return Err(PolicyError::BackingOff(name).into());
            }
            let format = read_backing_format(&file, &h, cluster_size)?;
            let bpath = Path::new(&name);
            let bpath = if bpath.is_absolute() {
                bpath.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(bpath)
            };
            let img = crate::open_in(&bpath, true, format, walk, Role::Named).map_err(|e| {
                Error::Backing {
                    path: bpath.clone(),
                    source: Box::new(e),
                }
            })?;
            let link = Link {
                path: bpath,
                format: img.format(),
                role: "backing",
            };
            Some((img, link))
        } else {
            None
        };
        let (backing, backing_link) = backing.unzip();

        let end =
            align_up(file_len, cluster_size).ok_or_else(|| Error::Header("file size".into()))?;
        let mut q = Qcow2 {
            file,
            readonly,
            version: h.version,
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_entries,
            virtual_size: h.size,
            l1_offset: h.l1_offset,
            l1,
            refcount_order: h.refcount_order,
            reftable_offset: h.reftable_offset,
            reftable,
            end,
            open_len: file_len,
            backing,
            backing_link,
            l2_cache: Lru::new(cache_entries(cluster_size, L2_CACHE_BYTES)),
            refblock_cache: Lru::new(cache_entries(cluster_size, REFBLOCK_CACHE_BYTES)),
        };
        q.scan(file_len, OPEN_SCAN_BYTES)?;
        if !readonly && h.version == 3 && h.autoclear != 0 {
            // We maintain none of the autoclear extensions (e.g. bitmaps): they become invalid.
            q.file.write_all_at(&0u64.to_be_bytes(), HDR_AUTOCLEAR)?;
        }
        Ok(q)
    }

    /// Checks every L1 entry (offsets aligned and inside the file, no reserved bits; the table
    /// is at most 32 MiB) and the L2 tables they point to up to `budget` bytes of them, each
    /// distinct one once ([`check_l2`]). The tables past the budget are checked when first read.
    fn scan(&mut self, file_len: u64, budget: u64) -> Result<(), Error> {
        let cs = self.cluster_size;
        let mut seen = HashSet::new();
        let mut scanned = 0u64;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            if e & L1_RESERVED != 0 {
                return Err(Error::Corrupt(format!("L1 entry {i} has reserved bits")));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off.checked_add(cs).is_none_or(|x| x > file_len) {
                return Err(Error::Corrupt(format!("L2 table {i} outside the file")));
            }
            if scanned >= budget || !seen.insert(off) {
                continue;
            }
            scanned += cs;
            let table = read_table(&self.file, off, self.l2_entries)?;
            check_l2(&table, self.version)?;
        }
        Ok(())
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    fn l2_table(&mut self, off: u64) -> io::Result<&mut Vec<u64>> {
        if self.l2_cache.get_mut(&off).is_none() {
            let t = read_table(&self.file, off, self.l2_entries)?;
            check_l2(&t, self.version)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return Ok(self.l2_cache.insert(off, t));
        }
        self.l2_cache
            .get_mut(&off)
            .ok_or_else(|| corrupt("L2 cache"))
    }

    /// The refcount block at `off`, from the cache or the file.
    fn refblock(&mut self, off: u64) -> io::Result<&mut Vec<u8>> {
        if self.refblock_cache.get_mut(&off).is_none() {
            let len = usize::try_from(self.cluster_size).map_err(|_| corrupt("cluster size"))?;
            let mut b = vec![0u8; len];
            read_exact_or_eof(&self.file, &mut b, off)?;
            return Ok(self.refblock_cache.insert(off, b));
        }
        self.refblock_cache
            .get_mut(&off)
            .ok_or_else(|| corrupt("refcount block cache"))
    }

    fn indexes(&self, guest: u64) -> io::Result<(usize, usize)> {
        let cluster = guest >> self.cluster_bits;
        let l1 = cluster >> self.l2_bits();
        let l2 = cluster & (self.l2_entries - 1);
        // l1 < l1.len() (validated against the virtual size), l2 < l2_entries: both fit, and
        // the checked conversion says so without a cast.
        Ok((to_usize(l1, "L1 index")?, to_usize(l2, "L2 index")?))
    }

    fn lookup(&mut self, guest: u64) -> io::Result<Cluster> {
        let (l1i, l2i) = self.indexes(guest)?;
        let l1e = *self.l1.get(l1i).ok_or_else(|| corrupt("L1 index"))?;
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok(Cluster::Unallocated);
        }
        let cs = self.cluster_size;
        let version = self.version;
        let e = *self
            .l2_table(l2off)?
            .get(l2i)
            .ok_or_else(|| corrupt("L2 index"))?;
        if e & COMPRESSED != 0 {
            return Err(corrupt("compressed cluster"));
        }
        if e & L2_RESERVED != 0 {
            return Err(corrupt("L2 entry reserved bits"));
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if host & (cs - 1) != 0 {
            return Err(corrupt("unaligned data cluster"));
        }
        if version >= 3 && e & ZERO != 0 {
            return Ok(Cluster::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Data { host, copied })
    }

    fn read_backing(&mut self, guest: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = usize::try_from(bsize.saturating_sub(guest)).unwrap_or(usize::MAX);
        let n = avail.min(buf.len());
        if n > 0 {
            b.read_at(guest, &mut buf[..n])?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Splits `[offset, offset + len)` into pieces that stay within one cluster.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + use<> {
        let cs = self.cluster_size;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let n = (cs - (pos & (cs - 1))).min(end - pos);
            let p = (pos, n);
            pos += n;
            Some(p)
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access beyond the end of the disk",
            ));
        }
        Ok(())
    }

    fn writable(&self) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only image",
            ));
        }
        Ok(())
    }

    // ---- refcounts ----

    fn refblock_entries(&self) -> u64 {
        (self.cluster_size * 8) >> self.refcount_order
    }

    /// Location of cluster `idx`'s refcount: (reftable index, byte offset in block, bit shift).
    fn refcount_pos(&self, idx: u64) -> (u64, u64, u32) {
        let per = self.refblock_entries();
        let bit = (idx % per) << self.refcount_order;
        (idx / per, bit / 8, (bit % 8) as u32)
    }

    fn refcount_width(&self) -> (usize, u64) {
        let bits = 1u32 << self.refcount_order;
        let bytes = (bits as usize).div_ceil(8);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        (bytes, mask)
    }

    #[cfg(test)]
    fn refcount(&mut self, idx: u64) -> io::Result<u64> {
        let (rti, byte, shift) = self.refcount_pos(idx);
        let Some(&block) = usize::try_from(rti).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        let (bytes, mask) = self.refcount_width();
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b[8 - bytes..], block + byte)?;
        Ok((u64::from_be_bytes(b) >> shift) & mask)
    }

    fn set_refcount(&mut self, idx: u64, value: u64) -> io::Result<()> {
        let (rti, byte, shift) = self.refcount_pos(idx);
        let block = self.ensure_refblock(rti)?;
        let (bytes, mask) = self.refcount_width();
        let at = usize::try_from(byte).map_err(|_| corrupt("refcount offset"))?;
        let cached = self.refblock(block)?;
        let slot = cached
            .get_mut(at..at + bytes)
            .ok_or_else(|| corrupt("refcount offset"))?;
        let mut b = [0u8; 8];
        b[8 - bytes..].copy_from_slice(slot);
        let old = u64::from_be_bytes(b);
        let new = (old & !(mask << shift)) | ((value & mask) << shift);
        let new = &new.to_be_bytes()[8 - bytes..];
        slot.copy_from_slice(new);
        self.file.write_all_at(new, block + byte)
    }

    /// The refcount block for reftable entry `rti`, created (and the table grown) if missing.
    fn ensure_refblock(&mut self, rti: u64) -> io::Result<u64> {
        let i = usize::try_from(rti).map_err(|_| corrupt("refcount table index"))?;
        if i >= self.reftable.len() {
            self.grow_reftable(i + 1)?;
        }
        if self.reftable[i] != 0 {
            return Ok(self.reftable[i]);
        }
        let cs = self.cluster_size;
        let block = self.end;
        self.end += cs;
        let block_idx = block >> self.cluster_bits;
        let (own_rti, byte, shift) = self.refcount_pos(block_idx);
        let mut data = vec![0u8; to_usize(cs, "cluster size")?];
        if own_rti == rti {
            // The new block describes itself.
            let (bytes, _) = self.refcount_width();
            let v = 1u64 << shift;
            let at = to_usize(byte, "refcount offset")?;
            data[at..at + bytes].copy_from_slice(&v.to_be_bytes()[8 - bytes..]);
        }
        self.file.write_all_at(&data, block)?;
        self.refblock_cache.insert(block, data);
        self.reftable[i] = block;
        self.file
            .write_all_at(&block.to_be_bytes(), self.reftable_offset + rti * 8)?;
        if own_rti != rti {
            self.set_refcount(block_idx, 1)?;
        }
        Ok(block)
    }

    /// Moves the refcount table to a larger one at the end of the file.
    fn grow_reftable(&mut self, min_entries: usize) -> io::Result<()> {
        let cs = self.cluster_size;
        let per_cluster = (cs / 8) as usize;
        let reach = self.refblock_entries() * cs; // bytes of file one entry covers
        let mut entries = min_entries
            .max(self.reftable.len() * 2)
            .next_multiple_of(per_cluster);
        loop {
            let clusters = (entries / per_cluster) as u64;
            // The table, plus a refcount block for each of its clusters, must be covered.
            let needed = self.end + (2 * clusters + 2) * cs;
            if (entries as u64).saturating_mul(reach) >= needed {
                break;
            }
            entries += per_cluster;
        }
        let bytes = entries as u64 * 8;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(io::Error::other("image too large for the refcount table"));
        }
        let clusters = bytes / cs;
        let old_offset = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8) / cs;
        let new_offset = self.end;
        self.end += clusters * cs;
        self.reftable.resize(entries, 0);
        self.reftable_offset = new_offset;
        // Write the table first (refcount block creation below updates single entries in it).
        self.write_reftable()?;
        for c in 0..clusters {
            self.set_refcount((new_offset >> self.cluster_bits) + c, 1)?;
        }
        self.write_reftable()?;
        self.file.sync_data()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        let clusters = u32::try_from(clusters).map_err(|_| corrupt("refcount table too large"))?;
        hdr[8..].copy_from_slice(&clusters.to_be_bytes());
        self.file.write_all_at(&hdr, HDR_REFTABLE)?;
        self.file.sync_data()?;
        for c in 0..old_clusters {
            self.set_refcount((old_offset >> self.cluster_bits) + c, 0)?;
        }
        Ok(())
    }

    fn write_reftable(&mut self) -> io::Result<()> {
        let buf: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&buf, self.reftable_offset)
    }

    /// A new cluster at the end of the file with refcount one. The caller writes all of it.
    fn alloc_cluster(&mut self) -> io::Result<u64> {
        let off = self.end;
        self.end += self.cluster_size;
        self.set_refcount(off >> self.cluster_bits, 1)?;
        Ok(off)
    }

    // ---- mapping updates ----

    /// The L2 table for guest offset `guest`, allocated (zeroed) if missing.
    fn ensure_l2(&mut self, guest: u64) -> io::Result<u64> {
        let (l1i, _) = self.indexes(guest)?;
        let e = *self.l1.get(l1i).ok_or_else(|| corrupt("L1 index"))?;
        let off = e & OFFSET_MASK;
        if off != 0 {
            if e & COPIED == 0 {
                return Err(corrupt("shared L2 table"));
            }
            return Ok(off);
        }
        let off = self.alloc_cluster()?;
        self.file.write_all_at(
            &vec![0u8; to_usize(self.cluster_size, "cluster size")?],
            off,
        )?;
        let entry = off | COPIED;
        self.file
            .write_all_at(&entry.to_be_bytes(), self.l1_offset + l1i as u64 * 8)?;
        self.l1[l1i] = entry;
        Ok(off)
    }

    fn set_l2_entry(&mut self, guest: u64, entry: u64) -> io::Result<()> {
        let l2off = self.ensure_l2(guest)?;
        let (_, l2i) = self.indexes(guest)?;
        self.file
            .write_all_at(&entry.to_be_bytes(), l2off + l2i as u64 * 8)?;
        let t = self.l2_table(l2off)?;
        if let Some(slot) = t.get_mut(l2i) {
            *slot = entry;
        }
        Ok(())
    }

    /// Writes `data` at `guest`, all within one cluster.
    fn write_piece(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.cluster_size;
        let start = guest & !(cs - 1);
        let in_off = to_usize(guest - start, "offset in cluster")?;
        let mapping = self.lookup(guest)?;
        if let Cluster::Data { host, copied: true } = mapping {
            return self.file.write_all_at(data, host + in_off as u64);
        }
        // Build the whole cluster: old content (backing, zeros, or a shared cluster) + data.
        let mut buf = vec![0u8; to_usize(cs, "cluster size")?];
        if data.len() as u64 != cs {
            match mapping {
                Cluster::Unallocated => self.read_backing(start, &mut buf)?,
                Cluster::Data { host, .. } => read_exact_or_eof(&self.file, &mut buf, host)?,
                Cluster::Zero { .. } => {}
            }
        }
        buf[in_off..in_off + data.len()].copy_from_slice(data);
        let host = match mapping {
            Cluster::Zero { host, copied: true } if host != 0 => host,
            _ => {
                // Make sure the L2 table exists before taking the data cluster, so the table
                // sits before its data in the file (not required, but tidy).
                self.ensure_l2(guest)?;
                self.alloc_cluster()?
            }
        };
        self.file.write_all_at(&buf, host)?;
        self.set_l2_entry(guest, host | COPIED)
    }

    /// Makes a whole cluster read as zeros (v3 only).
    fn zero_cluster(&mut self, guest: u64) -> io::Result<()> {
        let entry = match self.lookup(guest)? {
            Cluster::Zero { .. } => return Ok(()),
            Cluster::Unallocated if self.backing.is_none() => return Ok(()),
            Cluster::Unallocated => ZERO,
            // Keep the allocation: a later write reuses it in place.
            Cluster::Data { host, copied: true } => host | COPIED | ZERO,
            Cluster::Data { .. } => ZERO,
        };
        self.set_l2_entry(guest, entry)
    }
}

/// What must hold for every entry of an L2 table before any is used: no compressed cluster, no
/// reserved bit, no zero flag in a version 2 image.
fn check_l2(table: &[u64], version: u32) -> Result<(), Error> {
    for &l2e in table {
        if l2e & COMPRESSED != 0 {
            return Err(Error::Compressed);
        }
        if l2e & L2_RESERVED != 0 {
            return Err(Error::Corrupt("L2 entry has reserved bits".into()));
        }
        if version == 2 && l2e & ZERO != 0 {
            return Err(Error::Corrupt("zero flag in a version 2 image".into()));
        }
    }
    Ok(())
}

/// The format named by the backing format header extension, if present and known.
fn read_backing_format(
    file: &File,
    h: &Header,
    cluster_size: u64,
) -> Result<Option<Format>, Error> {
    let mut pos = u64::from(h.header_length);
    // Extensions live in the first cluster; stop at its end whatever the file says.
    while pos + 8 <= cluster_size {
        let mut hd = [0u8; 8];
        read_exact_or_eof(file, &mut hd, pos)?;
        let typ = be32(&hd, 0);
        let len = u64::from(be32(&hd, 4));
        if typ == EXT_END {
            break;
        }
        if typ == EXT_BACKING_FORMAT && len <= 16 {
            let mut name = vec![0u8; to_usize(len, "backing format length")?];
            read_exact_or_eof(file, &mut name, pos + 8)?;
            return Ok(match name.as_slice() {
                b"raw" => Some(Format::Raw),
                b"qcow2" => Some(Format::Qcow2),
                _ => None,
            });
        }
        pos = match align_up(len, 8).and_then(|l| pos.checked_add(8 + l)) {
            Some(p) => p,
            None => break,
        };
    }
    Ok(None)
}

impl DiskFile for Qcow2 {
    fn size(&self) -> u64 {
        self.virtual_size
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    /// Data clusters (for writing: only those with refcount one) map to the file; zero clusters
    /// and unallocated ones without a backing file read as zeros; the rest goes through
    /// `read_at` / `write_at`. One cluster at a time.
    fn map(&mut self, offset: u64, len: u64, write: bool) -> io::Result<Mapping<'_>> {
        if write {
            self.writable()?;
        }
        self.check_range(offset, len)?;
        let cs = self.cluster_size;
        let n = len.min(cs - (offset & (cs - 1)));
        if n == 0 {
            return Ok(Mapping::Other { len });
        }
        let in_off = offset & (cs - 1);
        Ok(match (self.lookup(offset)?, write) {
            (Cluster::Data { host, copied }, _) if copied || !write => {
                // A cluster cut short by the end of the file reads zeros past it: not direct.
                // (No fstat here: the device thread's seccomp filter does not allow it.)
                let at = host + in_off;
                if host >= self.open_len || at + n <= self.open_len {
                    Mapping::File {
                        file: &self.file,
                        offset: at,
                        len: n,
                    }
                } else {
                    Mapping::Other { len: n }
                }
            }
            (Cluster::Zero { .. }, false) => Mapping::Zero { len: n },
            (Cluster::Unallocated, false) if self.backing.is_none() => Mapping::Zero { len: n },
            _ => Mapping::Other { len: n },
        })
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn chain(&self) -> Vec<Link> {
        let (Some(link), Some(b)) = (&self.backing_link, &self.backing) else {
            return Vec::new();
        };
        let mut v = vec![link.clone()];
        v.extend(b.chain());
        v
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        for (pos, n) in self.pieces(offset, buf.len() as u64) {
            let n = to_usize(n, "piece length")?;
            let out = &mut buf[done..done + n];
            match self.lookup(pos)? {
                Cluster::Unallocated => self.read_backing(pos, out)?,
                Cluster::Zero { .. } => out.fill(0),
                Cluster::Data { host, .. } => {
                    let in_off = pos & (self.cluster_size - 1);
                    read_exact_or_eof(&self.file, out, host + in_off)?
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        for (pos, n) in self.pieces(offset, buf.len() as u64) {
            let n = to_usize(n, "piece length")?;
            self.write_piece(pos, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        if self.version < 3 {
            return Ok(());
        }
        let cs = self.cluster_size;
        for (pos, n) in self.pieces(offset, len) {
            if n == cs {
                self.zero_cluster(pos)?;
            }
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size;
        let zeros = vec![0u8; to_usize(cs, "cluster size")?];
        for (pos, n) in self.pieces(offset, len) {
            if n == cs && self.version >= 3 {
                self.zero_cluster(pos)?;
            } else {
                self.write_piece(pos, &zeros[..to_usize(n, "piece length")?])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
