//! The on-disk layout: constants, limits, section encoding, and the parser shared by the file
//! reader and [`crate::fuzz_open`]. `docs/snapshot-format.md` is the specification; keep the two
//! in step.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::{Error, Header, Result, SnapshotContents};

/// The first eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"ANYVSNAP";
/// Readers refuse any other major version.
pub const VERSION_MAJOR: u32 = 1;
/// Minor versions only add skippable sections and optional header fields.
pub const VERSION_MINOR: u32 = 1;

pub(crate) const PREAMBLE_LEN: u64 = 24;
pub(crate) const SECTION_HEADER_LEN: u64 = 20;
pub(crate) const PAGE_SIZE: u64 = hv::PAGE_SIZE;
/// Fixed part of the memory section payload, before the page bitmap.
pub(crate) const MEMORY_FIXED_LEN: u64 = 32;
/// Unit in which the RAM image is read and written.
pub(crate) const CHUNK: usize = 1 << 20;
/// [`PAGE_SIZE`] as the format's u32 field.
const PAGE_SIZE_U32: u32 = 4096;
const _: () = assert!(PAGE_SIZE_U32 as u64 == PAGE_SIZE);

// anyvisor runs on x86-64 only; there usize is 64 bits, so a u64 size or offset always fits.
const _: () = assert!(usize::BITS == u64::BITS);

/// `v` as a `usize`: lossless, as usize is 64 bits (asserted above).
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits on every target anyvisor builds for (asserted above)"
)]
pub(crate) const fn to_usize(v: u64) -> usize {
    v as usize
}

/// What a reader accepts; a writer refuses to produce anything beyond these.
pub mod limits {
    /// Payload of a header, vm, vcpu, device or unknown section.
    pub const MAX_STATE_SECTION: u64 = 16 << 20;
    pub const MAX_VCPUS: u32 = 256;
    pub const MAX_REGIONS: usize = 64;
    /// Total guest RAM (1 TiB).
    pub const MAX_MEMORY: u64 = 1 << 40;
    pub const MAX_DEVICES: usize = 256;
    /// Device name length in bytes.
    pub const MAX_DEVICE_NAME: usize = 64;
    /// Sections, including the end marker.
    pub const MAX_SECTIONS: u32 = 1024;
    /// Preamble plus all sections (everything before the padding and the RAM image).
    pub const MAX_METADATA: u64 = 256 << 20;
    /// Memory section payload: fixed part plus the bitmap of `MAX_MEMORY`.
    pub const MAX_MEMORY_SECTION: u64 = 32 + MAX_MEMORY / 4096 / 8;
}

pub(crate) mod tag {
    pub const HEADER: u32 = 1;
    pub const VM: u32 = 2;
    pub const VCPU: u32 = 3;
    pub const DEVICE: u32 = 4;
    pub const MEMORY: u32 = 5;
    /// Per-chunk checksums of the RAM image (version 1.1; optional, so 1.0 readers skip it).
    pub const CHUNK_SUMS: u32 = 6;
    pub const END: u32 = 0xff;
}

/// Section flag: a reader that does not know the tag must refuse the file.
pub(crate) const FLAG_REQUIRED: u32 = 1;

/// The header section as stored: the caller's [`Header`] plus the device names.
#[derive(Deserialize)]
pub(crate) struct DiskHeader {
    #[serde(flatten)]
    pub header: Header,
    pub devices: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct DiskHeaderRef<'a> {
    #[serde(flatten)]
    pub header: &'a Header,
    pub devices: Vec<&'a str>,
}

#[derive(Deserialize)]
pub(crate) struct DeviceRecord {
    pub name: String,
    pub state: serde_json::Value,
}

#[derive(Serialize)]
pub(crate) struct DeviceRecordRef<'a> {
    pub name: &'a str,
    pub state: &'a serde_json::Value,
}

/// The memory section: where the RAM image is and which of its pages are stored.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MemoryInfo {
    pub image_offset: u64,
    pub image_len: u64,
    /// crc32c of the present pages, concatenated in image order.
    pub image_crc: u32,
    pub present_pages: u64,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set: image page `i` is stored; clear: it is a hole
    /// that reads as zero.
    pub bitmap: Vec<u8>,
    /// The `memory-chunks` section: crc32c of the stored pages of each [`SUM_CHUNK`]-byte chunk
    /// of the image, in order. `None` in files written before version 1.1.
    pub chunk_sums: Option<Vec<u32>>,
}

/// Bytes of RAM image one `memory-chunks` checksum covers.
pub(crate) const SUM_CHUNK: u64 = SUM_CHUNK_U32 as u64;
/// [`SUM_CHUNK`] as the format's u32 field.
const SUM_CHUNK_U32: u32 = 2 << 20;

/// Number of checksum chunks of an image of `image_len` bytes.
pub(crate) fn sum_chunks(image_len: u64) -> u64 {
    image_len.div_ceil(SUM_CHUNK)
}

/// The `memory-chunks` payload: chunk size (u32), chunk count (u32), one crc32c (u32) each.
/// `None` when there are more sums than the u32 count holds (a RAM size no limit allows).
pub(crate) fn encode_chunk_sums(sums: &[u32]) -> Option<Vec<u8>> {
    let count = u32::try_from(sums.len()).ok()?;
    let mut out = Vec::with_capacity(8 + 4 * sums.len());
    out.extend_from_slice(&SUM_CHUNK_U32.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for c in sums {
        out.extend_from_slice(&c.to_le_bytes());
    }
    Some(out)
}

/// Parses a `memory-chunks` payload for an image of `image_len` bytes.
pub(crate) fn decode_chunk_sums(p: &[u8], image_len: u64) -> std::result::Result<Vec<u32>, String> {
    let Some((fixed, rest)) = p.split_first_chunk::<8>() else {
        return Err(format!("{} bytes, shorter than 8", p.len()));
    };
    let (size, count) = (le32(&fixed[0..4]), le32(&fixed[4..8]));
    if u64::from(size) != SUM_CHUNK {
        return Err(format!("chunk size {size} (expected {SUM_CHUNK})"));
    }
    let want = sum_chunks(image_len);
    if u64::from(count) != want {
        return Err(format!(
            "{count} chunks, the image of {image_len} bytes has {want}"
        ));
    }
    if rest.len() as u64 != 4 * want {
        return Err(format!(
            "{} bytes of checksums for {want} chunks",
            rest.len()
        ));
    }
    Ok(rest.chunks_exact(4).map(le32).collect())
}

impl std::fmt::Debug for MemoryInfo {
    // The bitmap can be megabytes: summarize it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryInfo")
            .field("image_offset", &self.image_offset)
            .field("image_len", &self.image_len)
            .field("image_crc", &self.image_crc)
            .field("present_pages", &self.present_pages)
            .finish_non_exhaustive()
    }
}

pub(crate) fn bitmap_len(image_len: u64) -> u64 {
    (image_len / PAGE_SIZE).div_ceil(8)
}

impl MemoryInfo {
    pub fn page_present(&self, page: u64) -> bool {
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.bitmap.get(i))
            .is_some_and(|b| b & (1 << (page % 8)) != 0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bitmap.len() + 32);
        out.extend_from_slice(&self.image_offset.to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&PAGE_SIZE_U32.to_le_bytes());
        out.extend_from_slice(&self.image_crc.to_le_bytes());
        out.extend_from_slice(&self.present_pages.to_le_bytes());
        out.extend_from_slice(&self.bitmap);
        out
    }

    pub fn decode(p: &[u8], header: &Header) -> std::result::Result<Self, String> {
        let Some((fixed, bitmap)) = p.split_first_chunk::<{ to_usize(MEMORY_FIXED_LEN) }>() else {
            return Err(format!("{} bytes, shorter than 32", p.len()));
        };
        let image_offset = le64(&fixed[0..8]);
        let image_len = le64(&fixed[8..16]);
        let page_size = le32(&fixed[16..20]);
        let image_crc = le32(&fixed[20..24]);
        let present_pages = le64(&fixed[24..32]);
        if u64::from(page_size) != PAGE_SIZE {
            return Err(format!("page size {page_size} (expected 4096)"));
        }
        if !image_offset.is_multiple_of(PAGE_SIZE) {
            return Err(format!("image offset {image_offset} is not 4 KiB-aligned"));
        }
        if image_len != header.memory_size() {
            return Err(format!(
                "image is {image_len} bytes but the header's memory size is {}",
                header.memory_size()
            ));
        }
        let expect = bitmap_len(image_len);
        if bitmap.len() as u64 != expect {
            return Err(format!(
                "bitmap is {} bytes, expected {expect}",
                bitmap.len()
            ));
        }
        let pages = image_len / PAGE_SIZE;
        if !pages.is_multiple_of(8) && bitmap.last().is_some_and(|b| b >> (pages % 8) != 0) {
            return Err("bitmap marks pages beyond the image".into());
        }
        let counted: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        if counted != present_pages {
            return Err(format!(
                "bitmap holds {counted} pages, section says {present_pages}"
            ));
        }
        Ok(MemoryInfo {
            image_offset,
            image_len,
            image_crc,
            present_pages,
            bitmap: bitmap.to_vec(),
            chunk_sums: None,
        })
    }
}

/// Random-access bytes the parser reads: a file or a slice. Callers check lengths first.
pub(crate) trait Source {
    fn len(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl Source for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|s| self.get(s..s.checked_add(buf.len())?));
        match src {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(Error::Truncated {
                offset,
                needs: buf.len() as u64,
            }),
        }
    }
}

/// A parsed and validated snapshot, RAM image excepted.
pub(crate) struct Parsed {
    pub version: (u32, u32),
    pub contents: SnapshotContents,
    pub memory: MemoryInfo,
}

/// The little-endian `u32` at the start of `b` (callers pass exactly 4 bytes; 0 if shorter).
pub(crate) fn le32(b: &[u8]) -> u32 {
    b.first_chunk().map_or(0, |c| u32::from_le_bytes(*c))
}

/// The little-endian `u64` at the start of `b` (callers pass exactly 8 bytes; 0 if shorter).
pub(crate) fn le64(b: &[u8]) -> u64 {
    b.first_chunk().map_or(0, |c| u64::from_le_bytes(*c))
}

pub(crate) fn align_up(v: u64) -> u64 {
    v.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

pub(crate) fn encode_preamble() -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
    p[12..16].copy_from_slice(&VERSION_MINOR.to_le_bytes());
    // 16..20: flags, zero.
    let crc = crc32c::crc32c(&p[..20]);
    p[20..24].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Appends one section (header and payload) to `out`.
pub(crate) fn push_section(out: &mut Vec<u8>, tag: u32, payload: &[u8]) {
    push_section_with(out, tag, FLAG_REQUIRED, payload);
}

/// Appends a section a reader that does not know `tag` skips (flags 0).
pub(crate) fn push_optional_section(out: &mut Vec<u8>, tag: u32, payload: &[u8]) {
    push_section_with(out, tag, 0, payload);
}

fn push_section_with(out: &mut Vec<u8>, tag: u32, flags: u32, payload: &[u8]) {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&tag.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..16]), payload);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
}

/// True when every byte of `b` is zero. Works on 64-byte blocks OR-folded so it vectorizes.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Checks a header's own consistency and limits.
pub(crate) fn validate_header(h: &Header, devices: &[&str]) -> std::result::Result<(), String> {
    if h.vcpus == 0 || h.vcpus > limits::MAX_VCPUS {
        return Err(format!(
            "{} vCPUs (allowed 1..={})",
            h.vcpus,
            limits::MAX_VCPUS
        ));
    }
    if h.memory_regions.is_empty() {
        return Err("no memory regions".into());
    }
    if h.memory_regions.len() > limits::MAX_REGIONS {
        return Err(format!(
            "{} memory regions (limit {})",
            h.memory_regions.len(),
            limits::MAX_REGIONS
        ));
    }
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for (i, r) in h.memory_regions.iter().enumerate() {
        if r.len == 0 {
            return Err(format!("memory region {i} is empty"));
        }
        if !r.len.is_multiple_of(PAGE_SIZE) || !r.guest_addr.is_multiple_of(PAGE_SIZE) {
            return Err(format!("memory region {i} is not 4 KiB-aligned"));
        }
        let end = r
            .guest_addr
            .checked_add(r.len)
            .ok_or_else(|| format!("memory region {i} wraps around the address space"))?;
        if i > 0 && r.guest_addr < prev_end {
            return Err(format!(
                "memory region {i} overlaps its predecessor or is out of order"
            ));
        }
        prev_end = end;
        total = total
            .checked_add(r.len)
            .filter(|t| *t <= limits::MAX_MEMORY)
            .ok_or_else(|| format!("memory size exceeds {} bytes", limits::MAX_MEMORY))?;
    }
    if devices.len() > limits::MAX_DEVICES {
        return Err(format!(
            "{} devices (limit {})",
            devices.len(),
            limits::MAX_DEVICES
        ));
    }
    let mut seen = HashSet::new();
    for d in devices {
        if d.is_empty() || d.len() > limits::MAX_DEVICE_NAME {
            return Err(format!(
                "device name '{d}' must be 1..={} bytes",
                limits::MAX_DEVICE_NAME
            ));
        }
        if !seen.insert(*d) {
            return Err(format!("device '{d}' appears twice"));
        }
    }
    Ok(())
}

fn section_name(tag: u32, vcpus: usize, devices: usize, offset: u64) -> String {
    match tag {
        tag::HEADER => "header".into(),
        tag::VM => "vm".into(),
        tag::VCPU => format!("vcpu {vcpus}"),
        tag::DEVICE => format!("device {devices}"),
        tag::MEMORY => "memory".into(),
        tag::CHUNK_SUMS => "memory-chunks".into(),
        tag::END => "end".into(),
        _ => format!("tag {tag:#x} at offset {offset}"),
    }
}

fn json<'a, T: Deserialize<'a>>(payload: &'a [u8], section: &str) -> Result<T> {
    serde_json::from_slice(payload).map_err(|source| Error::Malformed {
        section: section.to_string(),
        source,
    })
}

/// Reads and validates everything but the RAM image's contents.
pub(crate) fn parse<S: Source>(src: &S) -> Result<Parsed> {
    let file_len = src.len();
    if file_len < PREAMBLE_LEN {
        return Err(Error::TooShort { len: file_len });
    }
    let mut pre = [0u8; to_usize(PREAMBLE_LEN)];
    src.read_at(0, &mut pre)?;
    if pre[0..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let (major, minor) = (le32(&pre[8..12]), le32(&pre[12..16]));
    if major != VERSION_MAJOR {
        return Err(Error::UnsupportedVersion { major, minor });
    }
    if crc32c::crc32c(&pre[..20]) != le32(&pre[20..24]) {
        return Err(Error::PreambleChecksum);
    }
    let flags = le32(&pre[16..20]);
    if flags != 0 {
        return Err(Error::PreambleFlags(flags));
    }

    let mut off = PREAMBLE_LEN;
    let mut count = 0u32;
    let mut header: Option<DiskHeader> = None;
    let mut vm: Option<hv::VmState> = None;
    let mut vcpus: Vec<hv::CpuState> = Vec::new();
    let mut devices: Vec<(String, serde_json::Value)> = Vec::new();
    let mut memory: Option<MemoryInfo> = None;
    let mut chunk_sums: Option<Vec<u8>> = None;
    loop {
        count += 1;
        if count > limits::MAX_SECTIONS {
            return Err(Error::TooManySections);
        }
        if file_len - off < SECTION_HEADER_LEN {
            return Err(Error::Truncated {
                offset: off,
                needs: SECTION_HEADER_LEN,
            });
        }
        let mut sh = [0u8; to_usize(SECTION_HEADER_LEN)];
        src.read_at(off, &mut sh)?;
        let (tag, flags, len, crc) = (
            le32(&sh[0..4]),
            le32(&sh[4..8]),
            le64(&sh[8..16]),
            le32(&sh[16..20]),
        );
        let name = section_name(tag, vcpus.len(), devices.len(), off);
        let known = matches!(
            tag,
            tag::HEADER | tag::VM | tag::VCPU | tag::DEVICE | tag::MEMORY | tag::END
        );
        if !known && flags & FLAG_REQUIRED != 0 {
            return Err(Error::UnknownRequiredSection { tag, offset: off });
        }
        if (known && flags != FLAG_REQUIRED) || (!known && flags != 0) {
            return Err(Error::SectionFlags {
                section: name,
                flags,
            });
        }
        let limit = match tag {
            tag::MEMORY => limits::MAX_MEMORY_SECTION,
            tag::END => 0,
            _ => limits::MAX_STATE_SECTION,
        };
        if len > limit {
            return Err(Error::SectionTooLarge {
                section: name,
                len,
                limit,
            });
        }
        let needs = SECTION_HEADER_LEN + len;
        if file_len - off < needs {
            return Err(Error::Truncated { offset: off, needs });
        }
        if off + needs > limits::MAX_METADATA {
            return Err(Error::MetadataTooLarge);
        }
        // `len` is capped above, so this allocation is bounded.
        let mut payload = vec![0u8; to_usize(len)];
        src.read_at(off + SECTION_HEADER_LEN, &mut payload)?;
        if crc32c::crc32c_append(crc32c::crc32c(&sh[..16]), &payload) != crc {
            return Err(Error::ChecksumMismatch { section: name });
        }
        off += needs;

        let Some(h) = &header else {
            if tag != tag::HEADER {
                return Err(Error::HeaderNotFirst(name));
            }
            let h: DiskHeader = json(&payload, &name)?;
            let names: Vec<&str> = h.devices.iter().map(String::as_str).collect();
            validate_header(&h.header, &names).map_err(Error::InvalidHeader)?;
            header = Some(h);
            continue;
        };
        match tag {
            tag::HEADER => return Err(Error::DuplicateSection(name)),
            tag::VM => {
                if vm.is_some() {
                    return Err(Error::DuplicateSection(name));
                }
                vm = Some(json(&payload, &name)?);
            }
            tag::VCPU => {
                if vcpus.len() >= h.header.vcpus as usize {
                    return Err(Error::UnexpectedSection {
                        section: name,
                        reason: format!("the header declares {} vCPUs", h.header.vcpus),
                    });
                }
                let state: hv::CpuState = json(&payload, &name)?;
                state.validate().map_err(|reason| Error::InvalidVcpu {
                    index: vcpus.len(),
                    reason,
                })?;
                vcpus.push(state);
            }
            tag::DEVICE => {
                let Some(expected) = h.devices.get(devices.len()) else {
                    return Err(Error::UnexpectedSection {
                        section: name,
                        reason: format!("the header lists {} devices", h.devices.len()),
                    });
                };
                let d: DeviceRecord = json(&payload, &name)?;
                if d.name != *expected {
                    return Err(Error::UnexpectedSection {
                        section: name,
                        reason: format!(
                            "it holds device '{}' where the header lists '{expected}'",
                            d.name
                        ),
                    });
                }
                devices.push((d.name, d.state));
            }
            tag::MEMORY => {
                if memory.is_some() {
                    return Err(Error::DuplicateSection(name));
                }
                memory = Some(
                    MemoryInfo::decode(&payload, &h.header).map_err(Error::InvalidMemorySection)?,
                );
            }
            tag::CHUNK_SUMS => {
                if chunk_sums.is_some() {
                    return Err(Error::DuplicateSection(name));
                }
                chunk_sums = Some(payload);
            }
            tag::END => break,
            _ => {} // An optional section from a later minor version: skipped.
        }
    }

    let Some(DiskHeader {
        header,
        devices: names,
    }) = header
    else {
        return Err(Error::MissingSection("header section".into()));
    };
    let vm = vm.ok_or_else(|| Error::MissingSection("vm section".into()))?;
    if vcpus.len() != header.vcpus as usize {
        return Err(Error::MissingSection(format!(
            "section 'vcpu {}' (the header declares {} vCPUs)",
            vcpus.len(),
            header.vcpus
        )));
    }
    if let Some(missing) = names.get(devices.len()) {
        return Err(Error::MissingSection(format!(
            "section for device '{missing}'"
        )));
    }
    let mut memory = memory.ok_or_else(|| Error::MissingSection("memory section".into()))?;
    if let Some(p) = chunk_sums {
        memory.chunk_sums =
            Some(decode_chunk_sums(&p, memory.image_len).map_err(Error::InvalidChunkSums)?);
    }

    let image_offset = align_up(off);
    if memory.image_offset != image_offset {
        return Err(Error::InvalidMemorySection(format!(
            "image offset {} should be {image_offset}",
            memory.image_offset
        )));
    }
    // Both terms are capped (metadata 256 MiB, memory 1 TiB): no overflow.
    let needed = image_offset + memory.image_len;
    if file_len < needed {
        return Err(Error::MemoryImageShort { file_len, needed });
    }
    if file_len > needed {
        return Err(Error::TrailingData(file_len - needed));
    }
    let mut padding = vec![0u8; to_usize(image_offset - off)];
    src.read_at(off, &mut padding)?;
    if !is_zero(&padding) {
        return Err(Error::NonZeroPadding);
    }

    Ok(Parsed {
        version: (major, minor),
        contents: SnapshotContents {
            header,
            vcpus,
            vm,
            devices,
        },
        memory,
    })
}

/// Reads the whole RAM image: stored pages must match the checksums (each chunk's, when the
/// file has them, and the whole image's), holes must read as zero. `regions` (the header's)
/// name the guest address of a bad chunk.
pub(crate) fn verify_image<S: Source>(
    src: &S,
    mem: &MemoryInfo,
    regions: &[crate::MemoryRegion],
) -> Result<()> {
    let mut crc = 0u32;
    let mut chunk_crc = 0u32;
    let chunk = usize::try_from(mem.image_len).map_or(CHUNK, |l| l.min(CHUNK));
    let mut buf = vec![0u8; chunk];
    let mut pos = 0u64;
    let pages_per_sum = SUM_CHUNK / PAGE_SIZE;
    while pos < mem.image_len {
        let n = to_usize((mem.image_len - pos).min(CHUNK as u64));
        buf.truncate(n); // n only shrinks, on the last round
        src.read_at(mem.image_offset + pos, &mut buf)?;
        for (i, page) in buf.chunks(to_usize(PAGE_SIZE)).enumerate() {
            let p = pos / PAGE_SIZE + i as u64;
            if mem.page_present(p) {
                crc = crc32c::crc32c_append(crc, page);
                chunk_crc = crc32c::crc32c_append(chunk_crc, page);
            } else if !is_zero(page) {
                return Err(Error::AbsentPageNotZero(p));
            }
            let last_of_chunk =
                (p + 1).is_multiple_of(pages_per_sum) || (p + 1) * PAGE_SIZE >= mem.image_len;
            if last_of_chunk {
                let index = p / pages_per_sum;
                if let Some(sums) = &mem.chunk_sums
                    && sums.get(to_usize(index)) != Some(&chunk_crc)
                {
                    return Err(Error::ChunkChecksum {
                        chunk: index,
                        guest_addr: guest_addr_of(regions, index * SUM_CHUNK),
                    });
                }
                chunk_crc = 0;
            }
        }
        pos += n as u64;
    }
    if crc != mem.image_crc {
        return Err(Error::MemoryChecksum);
    }
    Ok(())
}

/// The guest-physical address at RAM-image offset `offset` (regions are stored back to back).
pub(crate) fn guest_addr_of(regions: &[crate::MemoryRegion], offset: u64) -> u64 {
    let mut start = 0u64;
    for r in regions {
        if offset < start + r.len {
            return r.guest_addr + (offset - start);
        }
        start += r.len;
    }
    offset
}
