//! VMDK (VMware Virtual Disk Format 1.1 / 5.0): hosted sparse extents (monolithicSparse,
//! streamOptimized with deflate-compressed grains) and text descriptors naming FLAT, VMFS, ZERO
//! and SPARSE extents (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse, ...).
//!
//! Reads everything above; writes only images made of flat extents (disk bytes map to file
//! bytes). Sparse and stream-optimized images open read-only: a writable open fails with
//! "VMDK <createType> images are read-only; ...". Images with a parent (`parentCID` other
//! than ffffffff) are refused.
//!
//! Extent files named by a descriptor resolve relative to the descriptor's directory. By
//! default an extent must stay inside that directory: absolute names, `..` components and
//! symbolic links on the way (any component, the last one opened `O_NOFOLLOW`) are refused with
//! a line saying to allow them with `backing=on`, which lets the descriptor name any path.
//! Either way every extent is a regular file opened without blocking ([`crate::policy`]). A
//! sparse extent must start with the sparse magic: a descriptor never leads to another
//! descriptor, so there is no chain to follow.
//!
//! A sparse extent (little-endian header "KDMV") maps grains of `grainSize` sectors through a
//! grain directory of grain tables of 512 entries; entry 0 reads as zeros, entry 1 too when the
//! zeroed-grain flag is set. The grain directory is not read at open (its size follows the
//! header's capacity, up to 64 MiB per extent): each entry is read and checked when its grain
//! table is first needed. Stream-optimized grains start with a marker (LBA, compressed size)
//! followed by a zlib stream, inflated with `flate2`. Grain tables and the last few inflated
//! grains are kept in small LRU caches.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use crate::policy::{Link, Role, Walk, open_file_flags};
use crate::util::{
    ImageError, Lru, check_range, corrupt, field, in_file, le16, le32, le64, pieces, read_vec,
    to_usize,
};
use crate::{DiskFile, Format, read_only};

const NAME: &str = "VMDK";
/// "KDMV": a hosted sparse extent (monolithicSparse, streamOptimized).
pub(crate) const SPARSE_MAGIC: &[u8] = b"KDMV";
/// A text descriptor.
pub(crate) const DESCRIPTOR_MAGIC: &[u8] = b"# Disk DescriptorFile";
const SECTOR: u64 = 512;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const GD_AT_END: u64 = u64::MAX;
/// Largest virtual disk accepted: 64 TiB.
const MAX_SIZE: u64 = 64 << 40;
/// Largest descriptor read (embedded or a file of its own).
const MAX_DESCRIPTOR: u64 = 64 << 10;
/// Extents per descriptor.
const MAX_EXTENTS: usize = 1024;
/// Grain directory entries accepted (64 MiB of directory).
const MAX_GD_ENTRIES: u64 = 1 << 24;
const GT_CACHE: usize = 64;
const GRAIN_CACHE: usize = 4;

/// A hosted sparse extent.
struct Sparse {
    file: File,
    file_len: u64,
    capacity: u64,
    grain: u64,
    gtes: u64,
    /// File offset of the grain directory and its entry count.
    gd_offset: u64,
    gd_entries: u64,
    compressed: bool,
    markers: bool,
    zero_grain: bool,
    /// First sector after the metadata: grains must start at or after it.
    overhead: u64,
    tables: Lru<usize, Vec<u32>>,
    grains: Lru<u64, Vec<u8>>,
    /// What the embedded descriptor says (`createType`), or what the flags imply.
    create_type: String,
}

impl Sparse {
    fn open(file: File) -> Result<Sparse, ImageError> {
        let file_len = file.metadata()?.len();
        if file_len < SECTOR {
            return Err(ImageError::Short(NAME));
        }
        let mut h = read_vec(&file, 0, SECTOR)?;
        if h.get(0..4) != Some(SPARSE_MAGIC) {
            return Err(ImageError::Magic(NAME));
        }
        let version = le32(&h, 4);
        if !(1..=3).contains(&version) {
            return Err(field(NAME, "version", version.into(), "not 1, 2 or 3"));
        }
        if le64(&h, 56) == GD_AT_END {
            // Stream-optimized images written in one pass keep the real header in a footer:
            // footer marker, footer (a header copy), end-of-stream marker.
            if file_len < 3 * SECTOR + SECTOR {
                return Err(ImageError::Short(NAME));
            }
            h = read_vec(&file, file_len - 2 * SECTOR, SECTOR)?;
            if h.get(0..4) != Some(SPARSE_MAGIC) {
                return Err(field(
                    NAME,
                    "grain directory offset",
                    GD_AT_END,
                    "no footer at the end",
                ));
            }
        }
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12);
        let grain = le64(&h, 20);
        let desc_offset = le64(&h, 28);
        let desc_size = le64(&h, 36);
        let gtes = u64::from(le32(&h, 44));
        let gd_offset = le64(&h, 56);
        let overhead = le64(&h, 64);
        let compress_algo = le16(&h, 77);
        let compressed = flags & FLAG_COMPRESSED != 0;
        if compressed && compress_algo != 1 {
            return Err(field(
                NAME,
                "compression algorithm",
                compress_algo.into(),
                "not deflate (1)",
            ));
        }
        if capacity.checked_mul(SECTOR).is_none_or(|b| b > MAX_SIZE) {
            return Err(field(NAME, "capacity", capacity, "above 64 TiB"));
        }
        if !grain.is_power_of_two() || !(8..=65536).contains(&grain) {
            return Err(field(
                NAME,
                "grain size",
                grain,
                "not a power of two from 8 to 65536 sectors",
            ));
        }
        if gtes != 512 {
            return Err(field(NAME, "grain table entries", gtes, "not 512"));
        }
        let gd_entries = capacity.div_ceil(grain * gtes);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(field(
                NAME,
                "capacity",
                capacity,
                "grain directory too large",
            ));
        }
        let gd_byte = gd_offset.saturating_mul(SECTOR);
        if !in_file(gd_byte, gd_entries * 4, file_len) {
            return Err(field(
                NAME,
                "grain directory offset",
                gd_offset,
                "outside the file",
            ));
        }
        // The embedded descriptor: its createType names the image, and a parent is refused.
        let mut create_type = if compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
        .to_string();
        if desc_offset != 0 && desc_size != 0 {
            let start = desc_offset.saturating_mul(SECTOR);
            let len = desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
            if !in_file(start, len, file_len) {
                return Err(field(
                    NAME,
                    "descriptor offset",
                    desc_offset,
                    "outside the file",
                ));
            }
            let text = read_vec(&file, start, len)?;
            let d = Descriptor::parse(&text)?;
            if let Some(t) = d.create_type {
                create_type = t;
            }
        }
        Ok(Sparse {
            file,
            file_len,
            capacity: capacity * SECTOR,
            grain: grain * SECTOR,
            gtes,
            gd_offset: gd_byte,
            gd_entries,
            compressed,
            markers: flags & FLAG_MARKERS != 0,
            zero_grain: flags & FLAG_ZERO_GRAIN != 0,
            overhead: overhead.saturating_mul(SECTOR),
            tables: Lru::new(GT_CACHE),
            grains: Lru::new(GRAIN_CACHE),
            create_type,
        })
    }

    /// The grain table entry for grain `g` (0: unallocated).
    fn entry(&mut self, g: u64) -> io::Result<u32> {
        let gdi = usize::try_from(g / self.gtes).map_err(|_| corrupt("VMDK grain index"))?;
        let gte = to_usize(g % self.gtes, "VMDK grain table index")?;
        if self.tables.get_mut(&gdi).is_none() {
            if gdi as u64 >= self.gd_entries {
                return Err(corrupt("VMDK grain directory index"));
            }
            let mut b = [0u8; 4];
            self.file
                .read_exact_at(&mut b, self.gd_offset + gdi as u64 * 4)?;
            let table = u32::from_le_bytes(b);
            if table == 0 {
                // No table: every grain reads as zeros (cached as an empty table).
                self.tables.insert(gdi, Vec::new());
                return Ok(0);
            }
            if !in_file(u64::from(table) * SECTOR, self.gtes * 4, self.file_len) {
                return Err(corrupt(format!(
                    "VMDK grain directory entry {gdi}: table outside the file"
                )));
            }
            let t: Vec<u32> = read_vec(&self.file, u64::from(table) * SECTOR, self.gtes * 4)?
                .chunks_exact(4)
                .map(|c| le32(c, 0))
                .collect();
            self.tables.insert(gdi, t);
        }
        match self.tables.get_mut(&gdi) {
            Some(t) if t.is_empty() => Ok(0),
            Some(t) => t
                .get(gte)
                .copied()
                .ok_or_else(|| corrupt("VMDK grain table")),
            None => Err(corrupt("VMDK grain table")),
        }
    }

    /// Inflates the compressed grain at sector `sector`.
    fn inflate(&mut self, g: u64, sector: u32) -> io::Result<&mut Vec<u8>> {
        if self.grains.get_mut(&g).is_some() {
            return self
                .grains
                .get_mut(&g)
                .ok_or_else(|| corrupt("VMDK grain cache"));
        }
        let at = u64::from(sector) * SECTOR;
        let limit = 2 * self.grain + 4096;
        let (start, len) = if self.markers {
            let mut m = [0u8; 12];
            self.file.read_exact_at(&mut m, at)?;
            let lba = le64(&m, 0);
            let size = u64::from(le32(&m, 8));
            if lba != g * (self.grain / SECTOR) {
                return Err(corrupt(format!("VMDK grain marker says LBA {lba}")));
            }
            if size == 0 || size > limit {
                return Err(corrupt(format!("VMDK compressed grain size {size}")));
            }
            (at + 12, size)
        } else {
            (at, limit.min(self.file_len.saturating_sub(at)))
        };
        if !in_file(start, len, self.file_len) {
            return Err(corrupt("VMDK compressed grain outside the file"));
        }
        let packed = read_vec(&self.file, start, len)?;
        let grain = to_usize(self.grain, "VMDK grain size")?;
        let mut out = Vec::with_capacity(grain);
        flate2::read::ZlibDecoder::new(packed.as_slice())
            .take(self.grain)
            .read_to_end(&mut out)?;
        // A short last grain reads as zeros after its data.
        out.resize(grain, 0);
        Ok(self.grains.insert(g, out))
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        let mut done = 0usize;
        for (pos, n) in pieces(offset, buf.len() as u64, self.grain) {
            let out = buf
                .get_mut(done..done + to_usize(n, "piece length")?)
                .ok_or_else(|| corrupt("VMDK read"))?;
            let g = pos / self.grain;
            let in_grain = pos % self.grain;
            match self.entry(g)? {
                0 => out.fill(0),
                1 if self.zero_grain => out.fill(0),
                e if self.compressed => {
                    let data = self.inflate(g, e)?;
                    let from = data
                        .get(to_usize(in_grain, "offset in grain")?..)
                        .and_then(|d| d.get(..out.len()))
                        .ok_or_else(|| corrupt("VMDK grain"))?;
                    out.copy_from_slice(from);
                }
                e => {
                    let at = u64::from(e) * SECTOR;
                    if at < self.overhead || !in_file(at, self.grain, self.file_len) {
                        return Err(corrupt(format!("VMDK grain {g} outside the file")));
                    }
                    self.file.read_exact_at(out, at + in_grain)?;
                }
            }
            done += to_usize(n, "piece length")?;
        }
        Ok(())
    }
}

/// What a descriptor says.
#[derive(Debug, Default)]
struct Descriptor {
    create_type: Option<String>,
    extents: Vec<ExtentLine>,
}

#[derive(Debug)]
struct ExtentLine {
    access: String,
    sectors: u64,
    kind: String,
    name: String,
    offset: u64,
}

impl Descriptor {
    fn parse(text: &[u8]) -> Result<Descriptor, ImageError> {
        let bad = |why: String| ImageError::Descriptor { format: NAME, why };
        // Embedded descriptors are padded with NULs.
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let text = std::str::from_utf8(text.get(..end).unwrap_or_default())
            .map_err(|_| bad("not UTF-8 text".into()))?;
        let mut d = Descriptor::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let is_extent = ["RW", "RDONLY", "NOACCESS"].iter().any(|a| {
                line.strip_prefix(a)
                    .is_some_and(|r| r.starts_with(char::is_whitespace))
            });
            if let Some((k, v)) = line.split_once('=').filter(|_| !is_extent) {
                let v = v.trim().trim_matches('"');
                match k.trim() {
                    "createType" => d.create_type = Some(v.to_string()),
                    "parentCID" if !v.eq_ignore_ascii_case("ffffffff") => {
                        return Err(ImageError::Unsupported {
                            format: NAME,
                            what: "images with a parent (parentCID)".into(),
                        });
                    }
                    _ => {}
                }
                continue;
            }
            if d.extents.len() >= MAX_EXTENTS {
                return Err(bad(format!("more than {MAX_EXTENTS} extents")));
            }
            d.extents
                .push(ExtentLine::parse(line).ok_or_else(|| bad(format!("bad line '{line}'")))?);
        }
        Ok(d)
    }
}

impl ExtentLine {
    /// `ACCESS SECTORS TYPE "NAME" [OFFSET]`; ZERO extents have no name.
    fn parse(line: &str) -> Option<ExtentLine> {
        let (access, rest) = line.trim().split_once(char::is_whitespace)?;
        let (sectors, rest) = rest.trim_start().split_once(char::is_whitespace)?;
        let access = access.to_string();
        let sectors = sectors.parse().ok()?;
        let rest = rest.trim_start();
        let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let rest = rest.trim();
        let (name, offset) = if let Some(r) = rest.strip_prefix('"') {
            let (name, after) = r.split_once('"')?;
            let after = after.trim();
            let offset = if after.is_empty() {
                0
            } else {
                after.parse().ok()?
            };
            (name.to_string(), offset)
        } else if rest.is_empty() {
            (String::new(), 0)
        } else {
            return None;
        };
        Some(ExtentLine {
            access,
            sectors,
            kind: kind.to_string(),
            name,
            offset,
        })
    }
}

enum Extent {
    Flat { file: File, base: u64 },
    Zero,
    Sparse(Box<Sparse>),
}

/// An open VMDK image: extents laid end to end.
pub struct Vmdk {
    /// (first disk byte, length, extent), in order.
    extents: Vec<(u64, u64, Extent)>,
    /// The files the extents are in (none for a sparse image of one file).
    links: Vec<Link>,
    size: u64,
    readonly: bool,
}

/// Opens the file of extent `name` next to the descriptor at `dir`, as `walk` allows: without
/// `backing=on` only a name inside `dir` reached without a symbolic link.
fn open_extent_file(
    dir: &Path,
    name: &str,
    readonly: bool,
    walk: &Walk,
) -> Result<(File, PathBuf), ImageError> {
    let bad = |why: &str| ImageError::Descriptor {
        format: NAME,
        why: format!("extent \"{name}\": {why}"),
    };
    if name.is_empty() {
        return Err(bad("no file name"));
    }
    let rel = Path::new(name);
    let path = dir.join(rel);
    if !walk.backing() {
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad(
                "names a file outside the descriptor's directory, which is followed only with backing=on (import: --backing)",
            ));
        }
        // No symbolic link on the way (the last component: O_NOFOLLOW below).
        let mut at = dir.to_path_buf();
        let parts: Vec<_> = rel.components().collect();
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            at.push(c);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(bad(
                    "leads through a symbolic link, which is followed only with backing=on (import: --backing)",
                ));
            }
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(bad(
                "is a symbolic link, which is followed only with backing=on (import: --backing)",
            ));
        }
    }
    let nofollow = if walk.backing() { 0 } else { libc::O_NOFOLLOW };
    let (file, _) = open_file_flags(&path, !readonly, Role::Named, nofollow).map_err(|e| {
        ImageError::Extent {
            name: name.to_string(),
            source: Box::new(ImageError::Io(e)),
        }
    })?;
    Ok((file, path))
}

impl Vmdk {
    /// Opens `file` (at `path`): a sparse extent or a descriptor whose extents are opened as
    /// `walk` allows.
    pub fn open(file: File, path: &Path, readonly: bool, walk: &Walk) -> Result<Vmdk, ImageError> {
        let mut head = [0u8; 4];
        let n = file.read_at(&mut head, 0)?;
        if n == 4 && head.as_slice() == SPARSE_MAGIC {
            let s = Sparse::open(file)?;
            if !readonly {
                return Err(ImageError::ReadOnly(format!("VMDK {}", s.create_type)));
            }
            let size = s.capacity;
            return Ok(Vmdk {
                extents: vec![(0, size, Extent::Sparse(Box::new(s)))],
                links: Vec::new(),
                size,
                readonly,
            });
        }
        let mut magic = [0u8; DESCRIPTOR_MAGIC.len()];
        if file.read_exact_at(&mut magic, 0).is_err() || magic.as_slice() != DESCRIPTOR_MAGIC {
            return Err(ImageError::Magic(NAME));
        }
        let len = file.metadata()?.len();
        if len > MAX_DESCRIPTOR {
            return Err(field(NAME, "descriptor size", len, "above 64 KiB"));
        }
        let text = read_vec(&file, 0, len)?;
        let d = Descriptor::parse(&text)?;
        let create_type = d.create_type.clone().unwrap_or_else(|| "unknown".into());
        if d.extents.is_empty() {
            return Err(ImageError::Descriptor {
                format: NAME,
                why: "no extents".into(),
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut links = Vec::new();
        let mut link = |path: PathBuf, format: Format| {
            links.push(Link {
                path,
                format,
                role: "extent",
            })
        };
        let mut size = 0u64;
        for e in &d.extents {
            let bytes = e.sectors.saturating_mul(SECTOR);
            if size.checked_add(bytes).is_none_or(|s| s > MAX_SIZE) {
                return Err(field(NAME, "extent size", e.sectors, "disk above 64 TiB"));
            }
            let bad = |why: &str| ImageError::Descriptor {
                format: NAME,
                why: format!("extent \"{}\": {why}", e.name),
            };
            match e.access.as_str() {
                "RW" | "RDONLY" => {}
                _ => return Err(bad("access is not RW or RDONLY")),
            }
            let extent = match e.kind.as_str() {
                "FLAT" | "VMFS" => {
                    let (file, p) = open_extent_file(dir, &e.name, readonly, walk)?;
                    link(p, Format::Raw);
                    let base = e.offset.saturating_mul(SECTOR);
                    if !in_file(base, bytes, file.metadata()?.len()) {
                        return Err(bad("extends past the end of its file"));
                    }
                    Extent::Flat { file, base }
                }
                "ZERO" => {
                    if !readonly {
                        return Err(ImageError::ReadOnly(format!(
                            "VMDK {create_type} (ZERO extent)"
                        )));
                    }
                    Extent::Zero
                }
                "SPARSE" | "VMFSSPARSE" => {
                    if !readonly {
                        return Err(ImageError::ReadOnly(format!("VMDK {create_type}")));
                    }
                    let (file, p) = open_extent_file(dir, &e.name, true, walk)?;
                    link(p, Format::Vmdk);
                    let s = Sparse::open(file).map_err(|err| ImageError::Extent {
                        name: e.name.clone(),
                        source: Box::new(err),
                    })?;
                    if s.capacity < bytes {
                        return Err(bad("smaller than the descriptor says"));
                    }
                    Extent::Sparse(Box::new(s))
                }
                other => return Err(bad(&format!("type {other} not supported"))),
            };
            extents.push((size, bytes, extent));
            size += bytes;
        }
        Ok(Vmdk {
            extents,
            links,
            size,
            readonly,
        })
    }

    /// The extent holding disk byte `pos`: (index, offset in it, bytes left in it).
    fn find(&self, pos: u64) -> io::Result<(usize, u64, u64)> {
        let i = self
            .extents
            .partition_point(|(start, _, _)| *start <= pos)
            .checked_sub(1)
            .ok_or_else(|| corrupt("VMDK extent"))?;
        let (start, len, _) = self.extents.get(i).ok_or_else(|| corrupt("VMDK extent"))?;
        Ok((i, pos - start, len - (pos - start)))
    }

    /// Calls `f(extent, offset in it, range of the buffer)` for each extent piece.
    fn each(
        &mut self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&mut Extent, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        check_range(offset, len as u64, self.size)?;
        let mut done = 0usize;
        while done < len {
            let (i, inner, left) = self.find(offset + done as u64)?;
            let n = usize::try_from(left).map_or(len - done, |l| l.min(len - done));
            if n == 0 {
                return Err(corrupt("VMDK empty extent"));
            }
            let (_, _, e) = self
                .extents
                .get_mut(i)
                .ok_or_else(|| corrupt("VMDK extent"))?;
            f(e, inner, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

impl DiskFile for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.each(offset, buf.len(), |e, inner, r| {
            let out = buf.get_mut(r).ok_or_else(|| corrupt("VMDK read"))?;
            match e {
                Extent::Flat { file, base } => file.read_exact_at(out, *base + inner),
                Extent::Zero => {
                    out.fill(0);
                    Ok(())
                }
                Extent::Sparse(s) => s.read(inner, out),
            }
        })
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        self.each(offset, buf.len(), |e, inner, r| {
            let data = buf.get(r).ok_or_else(|| corrupt("VMDK write"))?;
            match e {
                Extent::Flat { file, base } => file.write_all_at(data, *base + inner),
                // Writable opens only have flat extents.
                Extent::Zero | Extent::Sparse(_) => Err(read_only()),
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        for (_, _, e) in &self.extents {
            if let Extent::Flat { file, .. } = e {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn chain(&self) -> Vec<Link> {
        self.links.clone()
    }
}

#[cfg(test)]
mod tests;
