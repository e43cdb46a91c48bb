//! Portable VM snapshot files.
//!
//! A snapshot holds everything needed to resume a VM on any backend and host: the header (CPU
//! model, memory layout, vCPU count, the backend that made it, TSC frequency, the VMM's opaque
//! config and the device list), one [`hv::CpuState`] per vCPU, the [`hv::VmState`], opaque named
//! device states, and the guest RAM image. [`SnapshotContents`] is all of it but the RAM; its
//! device states are the file's named records ([`DeviceRecords`]) or a VMM's own typed form
//! ([`DeviceSet`]).
//!
//! The format is specified in `docs/snapshot-format.md`. In short (all integers little-endian):
//!
//! ```text
//! 0      preamble (24 B): "ANYVSNAP", major u32, minor u32, flags u32, crc32c u32
//! 24     sections: tag u32, flags u32, length u64, crc32c u32, payload[length]
//!          header (JSON), vm (JSON), vcpu x N (JSON), device x M (JSON), memory (binary), end
//! ...    zero padding to a 4 KiB boundary
//! P      RAM image: the regions back to back, page-aligned; zero pages are holes
//! ```
//!
//! [`SnapshotWriter::write`] writes a file atomically; [`SnapshotReader::open`] validates every
//! length and checksum of the metadata before parsing it, and [`SnapshotReader::map_memory`]
//! maps the RAM image privately so pages load on first touch: restore time does not depend on the
//! size of the guest. Nothing a file says is trusted: every failure is an [`Error`], never a
//! panic.

// Snapshot files are untrusted: besides the workspace lints, no index may panic here either.
#![deny(clippy::indexing_slicing)]
// Integer casts say whether they can lose bits: `u64::from`, `try_from`, `format::to_usize`,
// or an `#[allow]` with the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod format;
mod reader;
mod writer;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use format::{MAGIC, VERSION_MAJOR, VERSION_MINOR, limits};
pub use reader::SnapshotReader;
pub use writer::{SnapshotWriter, WriteOptions, WriteSummary};

/// One range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start, a multiple of 4 KiB.
    pub guest_addr: u64,
    /// Length in bytes, a non-zero multiple of 4 KiB.
    pub len: u64,
}

/// What the VM is, as recorded in the header section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The full CPU model the guest sees; a restoring backend must present exactly this.
    pub cpu_model: hv::CpuModel,
    /// Guest RAM, sorted by address, not overlapping. The RAM image holds them in this order.
    pub memory_regions: Vec<MemoryRegion>,
    /// Number of vCPUs (1..=256).
    pub vcpus: u32,
    /// The backend the snapshot was taken on (informational: any backend may restore it).
    pub backend: hv::BackendKind,
    /// Guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
    /// The VM configuration as the VMM describes it (kernel cmdline, disks, ...). Opaque here.
    pub config: serde_json::Value,
    /// ISA features beyond `cpu_model` the guest's user code has seen (`hv::VmState::user_extra`):
    /// a restoring backend must run them too. Absent when empty.
    #[serde(default, skip_serializing_if = "hv::cpu_model::FeatureSet::is_empty")]
    pub user_extra: hv::cpu_model::FeatureSet,
}

impl Header {
    /// Total guest RAM in bytes (saturating; a validated header never saturates).
    pub fn memory_size(&self) -> u64 {
        self.memory_regions
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.len))
    }

    /// The checks a snapshot file's header gets (vCPU count, memory regions and size within the
    /// format's limits), for a header that arrived some other way (a migration's description).
    pub fn validate(&self) -> std::result::Result<(), String> {
        format::validate_header(self, &[])
    }
}

/// Device states as a snapshot file stores them: each under a unique name (1..=64 bytes), as
/// JSON, in the order the VMM gave them.
pub type DeviceRecords = Vec<(String, serde_json::Value)>;

/// The device states of a VM, in whatever typed form its VMM keeps them, and how they become
/// the file's named records ([`DeviceRecords`]) and back. The format carries the records
/// opaquely; the VMM decides their names and contents.
pub trait DeviceSet: Sized {
    type Error: std::error::Error + Send + Sync + 'static;
    /// The states as named records, in the order they are to be stored.
    fn to_records(&self) -> std::result::Result<DeviceRecords, Self::Error>;
    /// The states back from the records a file (or a migration stream) held.
    fn from_records(records: DeviceRecords) -> std::result::Result<Self, Self::Error>;
}

/// The records themselves: what a reader that does not know the VMM's types returns.
impl DeviceSet for DeviceRecords {
    type Error = std::convert::Infallible;
    fn to_records(&self) -> std::result::Result<DeviceRecords, Self::Error> {
        Ok(self.clone())
    }
    fn from_records(records: DeviceRecords) -> std::result::Result<Self, Self::Error> {
        Ok(records)
    }
}

/// Everything a snapshot holds besides guest RAM; also the final state a live migration sends
/// (as JSON: `{"header", "vcpus", "vm", "devices": [[name, state], ...]}`).
///
/// `D` is the device states: the opaque [`DeviceRecords`] for a reader that does not know them
/// (what [`SnapshotReader`] returns), or a VMM's typed [`DeviceSet`]
/// ([`SnapshotContents::decode_devices`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotContents<D = DeviceRecords> {
    pub header: Header,
    /// vCPU states in vCPU id order: `vcpus[i]` is vCPU `i`.
    pub vcpus: Vec<hv::CpuState>,
    pub vm: hv::VmState,
    pub devices: D,
}

impl SnapshotContents<DeviceRecords> {
    /// The same contents with the device records decoded into `D`.
    pub fn decode_devices<D: DeviceSet>(
        self,
    ) -> std::result::Result<SnapshotContents<D>, D::Error> {
        Ok(SnapshotContents {
            header: self.header,
            vcpus: self.vcpus,
            vm: self.vm,
            devices: D::from_records(self.devices)?,
        })
    }
}

/// The JSON form of [`SnapshotContents`], device states as records.
#[derive(Serialize)]
struct ContentsRef<'a> {
    header: &'a Header,
    vcpus: &'a [hv::CpuState],
    vm: &'a hv::VmState,
    devices: DeviceRecords,
}

#[derive(Deserialize)]
struct ContentsOwned {
    header: Header,
    vcpus: Vec<hv::CpuState>,
    vm: hv::VmState,
    devices: DeviceRecords,
}

impl<D: DeviceSet> Serialize for SnapshotContents<D> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let devices = self
            .devices
            .to_records()
            .map_err(|e| serde::ser::Error::custom(hv::Chain(&e)))?;
        ContentsRef {
            header: &self.header,
            vcpus: &self.vcpus,
            vm: &self.vm,
            devices,
        }
        .serialize(s)
    }
}

impl<'de, D: DeviceSet> Deserialize<'de> for SnapshotContents<D> {
    fn deserialize<De: serde::Deserializer<'de>>(d: De) -> std::result::Result<Self, De::Error> {
        let c = ContentsOwned::deserialize(d)?;
        SnapshotContents {
            header: c.header,
            vcpus: c.vcpus,
            vm: c.vm,
            devices: c.devices,
        }
        .decode_devices()
        .map_err(|e| serde::de::Error::custom(hv::Chain(&e)))
    }
}

/// The regions of `memory` in the form a [`Header`] records them.
pub fn memory_regions_of(memory: &hv::GuestMemory) -> Vec<MemoryRegion> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .map(|r| MemoryRegion {
            guest_addr: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

/// Seconds since the Unix epoch, for [`Header::created_unix`].
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a whole snapshot held in memory, verifying the RAM image too. This is the entry point
/// of the `snapshot_reader` fuzz target; it must return an error, never panic, on any input.
pub fn fuzz_open(bytes: &[u8]) -> Result<SnapshotContents> {
    let parsed = format::parse(&bytes)?;
    format::verify_image(
        &bytes,
        &parsed.memory,
        &parsed.contents.header.memory_regions,
    )?;
    Ok(parsed.contents)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file is {len} bytes, shorter than the 24-byte preamble")]
    TooShort { len: u64 },
    #[error("bad magic")]
    BadMagic,
    #[error(
        "unsupported format version {major}.{minor} (this build reads {}.x)",
        format::VERSION_MAJOR
    )]
    UnsupportedVersion { major: u32, minor: u32 },
    #[error("preamble checksum mismatch")]
    PreambleChecksum,
    #[error("unsupported preamble flags {0:#x}")]
    PreambleFlags(u32),
    #[error("truncated file: section at offset {offset} needs {needs} bytes")]
    Truncated { offset: u64, needs: u64 },
    #[error("section '{section}' is {len} bytes (limit {limit})")]
    SectionTooLarge {
        section: String,
        len: u64,
        limit: u64,
    },
    #[error("more than {} sections", limits::MAX_SECTIONS)]
    TooManySections,
    #[error("metadata exceeds {} bytes", limits::MAX_METADATA)]
    MetadataTooLarge,
    #[error("section '{section}' checksum mismatch")]
    ChecksumMismatch { section: String },
    #[error("section '{section}' has unsupported flags {flags:#x}")]
    SectionFlags { section: String, flags: u32 },
    #[error("unknown required section tag {tag:#x} at offset {offset}")]
    UnknownRequiredSection { tag: u32, offset: u64 },
    #[error("section '{section}' is malformed")]
    Malformed {
        section: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the first section is '{0}', not the header")]
    HeaderNotFirst(String),
    #[error("duplicate section '{0}'")]
    DuplicateSection(String),
    #[error("unexpected section '{section}': {reason}")]
    UnexpectedSection { section: String, reason: String },
    #[error("missing {0}")]
    MissingSection(String),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("invalid memory section: {0}")]
    InvalidMemorySection(String),
    #[error("invalid state of vcpu {index}: {reason}")]
    InvalidVcpu { index: usize, reason: String },
    #[error("non-zero padding before the memory image")]
    NonZeroPadding,
    #[error("refusing to write a snapshot to {path}: it is {kind}, not a regular file")]
    OutputNotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} exists; replacing it needs overwrite (anyvisor snapshot --force)")]
    OutputExists { path: PathBuf },
    #[error("the snapshot was abandoned before it replaced anything: {0}")]
    Cancelled(String),
    #[error(
        "memory image is smaller than the header's memory size: file is {file_len} bytes, needs {needed}"
    )]
    MemoryImageShort { file_len: u64, needed: u64 },
    #[error("{0} bytes of trailing data after the memory image")]
    TrailingData(u64),
    #[error("memory image checksum mismatch")]
    MemoryChecksum,
    #[error(
        "memory image chunk {chunk} (guest memory from {guest_addr:#x}, 2 MiB) checksum mismatch"
    )]
    ChunkChecksum { chunk: u64, guest_addr: u64 },
    #[error("invalid memory-chunks section: {0}")]
    InvalidChunkSums(String),
    #[error("memory image page {0} is marked absent but is not zero")]
    AbsentPageNotZero(u64),
    #[error("cannot map memory region at {guest_addr:#x}")]
    Map {
        guest_addr: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot build guest memory")]
    GuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot read guest memory at {addr:#x}")]
    ReadGuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot snapshot: {0}")]
    InvalidContents(String),
    #[error("cannot snapshot: cannot encode the device states")]
    EncodeDevices(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot snapshot: cannot encode {section}")]
    Encode {
        section: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
