//! Opening a snapshot file: eager validation of the metadata, lazy mapping of guest RAM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::format::{self, MemoryInfo, Parsed, Source};
use crate::{Error, Header, Result, SnapshotContents};

struct FileSource<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
}

impl Source for FileSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io {
                op: "read",
                path: self.path.to_path_buf(),
                source,
            })
    }
}

/// An opened, validated snapshot file.
///
/// The file must not be modified or truncated while memory returned by [`Self::map_memory`] is
/// in use: pages the guest has not touched yet are read from it on first access.
#[derive(Debug)]
pub struct SnapshotReader {
    path: PathBuf,
    file: Arc<File>,
    file_len: u64,
    version: (u32, u32),
    contents: SnapshotContents,
    memory: MemoryInfo,
}

impl SnapshotReader {
    /// Opens `path` and validates the preamble, every section's length and checksum, the
    /// sections' structure and contents, and the RAM image's placement and size. The RAM image's
    /// bytes are not read: see [`Self::verify_memory`].
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotReader> {
        let path = path.as_ref();
        let io = |op| {
            move |source| Error::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        let file_len = file.metadata().map_err(io("stat"))?.len();
        let Parsed {
            version,
            contents,
            memory,
        } = format::parse(&FileSource {
            file: &file,
            path,
            len: file_len,
        })?;
        Ok(SnapshotReader {
            path: path.to_path_buf(),
            file: Arc::new(file),
            file_len,
            version,
            contents,
            memory,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's format version (major, minor).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    pub fn header(&self) -> &Header {
        &self.contents.header
    }

    pub fn contents(&self) -> &SnapshotContents {
        &self.contents
    }

    /// The states, for a caller done with the file (memory mapped earlier stays valid: each
    /// mapping keeps the file open).
    pub fn into_contents(self) -> SnapshotContents {
        self.contents
    }

    /// Pages of the RAM image stored in the file (the rest are zero).
    pub fn stored_pages(&self) -> u64 {
        self.memory.present_pages
    }

    /// Guest RAM as private (copy-on-write) mappings of the file's RAM image, one per region,
    /// with a fresh dirty bitmap. Nothing is read here: each page is loaded when first touched,
    /// and guest writes never reach the file.
    pub fn map_memory(&self) -> Result<hv::GuestMemory> {
        let mut regions = Vec::with_capacity(self.contents.header.memory_regions.len());
        let mut offset = self.memory.image_offset;
        for r in &self.contents.header.memory_regions {
            let map_err = |source| Error::Map {
                guest_addr: r.guest_addr,
                source,
            };
            let size = usize::try_from(r.len).map_err(|_| {
                map_err(vm_memory::mmap::MmapRegionError::Mmap(
                    std::io::Error::from(std::io::ErrorKind::OutOfMemory),
                ))
            })?;
            let mapping = MmapRegionBuilder::new_with_bitmap(size, hv::DirtyBitmap::with_len(size))
                .with_file_offset(FileOffset::from_arc(self.file.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(map_err)?;
            let region =
                GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                    Error::InvalidHeader(format!(
                        "memory region at {:#x} wraps around the address space",
                        r.guest_addr
                    ))
                })?;
            regions.push(region);
            offset += r.len;
        }
        GuestMemoryMmap::from_regions(regions).map_err(Error::GuestMemory)
    }

    /// Reads the whole RAM image and checks it against the stored checksum and page bitmap.
    /// Costs one pass over the guest's size; [`Self::open`] does not do it so that restore time
    /// stays independent of the guest's size.
    pub fn verify_memory(&self) -> Result<()> {
        format::verify_image(
            &FileSource {
                file: &self.file,
                path: &self.path,
                len: self.file_len,
            },
            &self.memory,
            &self.contents.header.memory_regions,
        )
    }

    /// Whether the file carries per-chunk checksums of its RAM image (format 1.1 and later).
    pub fn has_chunk_sums(&self) -> bool {
        self.memory.chunk_sums.is_some()
    }

    /// A summary for `anyvisor snapshot-info`.
    pub fn info(&self) -> serde_json::Value {
        let h = &self.contents.header;
        serde_json::json!({
            "format_version": format!("{}.{}", self.version.0, self.version.1),
            "cpu_model": h.cpu_model.name,
            "memory_bytes": h.memory_size(),
            "memory_regions": h.memory_regions,
            "vcpus": h.vcpus,
            "devices": self.contents.devices.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "backend": h.backend,
            "tsc_khz": h.tsc_khz,
            "created_unix": h.created_unix,
            "file_bytes": self.file_len,
            "stored_pages": self.memory.present_pages,
            "memory_checksums": if self.memory.chunk_sums.is_some() { "per 2 MiB chunk" } else { "whole image" },
            "config": h.config,
        })
    }
}
