//! Disk images: one [`DiskFile`] trait and one module per image format (the shape of crosvm's
//! `disk/` and Cloud Hypervisor's `block/`). Support table and limits in `docs/disk-formats.md`.
//!
//! [`open`] detects the format by content ([`detect_format`], never by file name) unless the
//! caller names it, and opens the image read-only or writable. Formats this crate cannot write
//! safely open read-only only: a writable open of them fails with
//! [`ImageError::ReadOnly`] ("... images are read-only; attach with readonly=on or convert with
//! anyvisor import").
//!
//! Every image file is hostile input: each header field, offset and table length is checked
//! against the file size and fixed caps before anything is allocated or read, tables are read
//! once and bounded, and nothing follows chains without a bound. Errors at open are typed and
//! name the field; errors during I/O are `io::Error`s of kind `InvalidData` for corrupt
//! metadata found late (carrying the typed error when there is one, such as [`TooLarge`] for a
//! size or index this host cannot address). The crate depends on nothing else of the workspace.

// Integer casts say whether they can lose bits: `u64::from`, `try_from`, or an `#[allow]` with
// the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod fuzz;
pub mod policy;
pub mod qcow2;
pub mod raw;
#[cfg(test)]
mod testutil;
mod util;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use policy::{Link, MAX_CHAIN, PolicyError, Role, Walk, open_regular};
pub use raw::RawFile;
pub use util::{ImageError, TooLarge};

/// Image formats. `None` where a format is asked for means "detect by content".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    /// VMware: monolithicSparse, streamOptimized, and descriptors with flat/sparse extents.
    Vmdk,
    /// Virtual PC / Hyper-V VHD, fixed and dynamic (qemu calls it "vpc").
    Vhd,
    /// Hyper-V VHDX, fixed and dynamic.
    Vhdx,
    /// VirtualBox VDI, dynamic and static.
    Vdi,
}

impl Format {
    /// Every format, in detection order after raw.
    pub const ALL: &'static [Format] = &[
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vhdx,
        Format::Vdi,
    ];

    /// The name used in `--disk ...,format=NAME` (also what serde writes).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }

    /// The format called `name` (also qemu's name for it, `vpc` for VHD).
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .or((name == "vpc").then_some(Format::Vhd))
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only (guest writes fail); required for formats this crate cannot write.
    pub readonly: bool,
    /// `None`: detect by content ([`detect_format`]).
    pub format: Option<Format>,
    /// Follow the files an image names outside itself: qcow2 backing files, VMDK extents
    /// outside the descriptor's directory (`--disk ...,backing=on`). Off: such an image is
    /// refused, naming the file.
    pub backing: bool,
}

impl OpenOptions {
    pub fn readonly(readonly: bool) -> OpenOptions {
        OpenOptions {
            readonly,
            format: None,
            backing: false,
        }
    }

    pub fn backing(mut self, backing: bool) -> OpenOptions {
        self.backing = backing;
        self
    }

    pub fn format(mut self, format: Option<Format>) -> OpenOptions {
        self.format = format;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read disk {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open disk {path}")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: qcow2::Error,
    },
    #[error("cannot open disk {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("cannot open disk {path}")]
    Policy {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
}

/// A virtual disk of [`DiskFile::size`] bytes. Callers keep every access inside the disk
/// (implementations check and fail with `InvalidInput` otherwise).
pub trait DiskFile: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from virtual offset `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at virtual offset `offset`; fails with `PermissionDenied` when read-only.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The range's content becomes unspecified; the backend may free its storage.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        if self.readonly() {
            return Err(read_only());
        }
        Ok(())
    }
    /// The range reads as zeros afterwards.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK))];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(zeros.len(), |r| r.min(zeros.len()));
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            self.write_at(at, zeros.get(..n).unwrap_or_default())?;
            done += n as u64;
        }
        Ok(())
    }
    /// Where the first bytes of `[offset, offset + len)` are, so that a caller can move them
    /// between the file and its own memory without an intermediate copy (virtio-blk reads and
    /// writes guest memory this way). `write`: the caller wants to write the range. The answer
    /// covers at least one byte and at most `len`; the caller asks again for the rest. The
    /// default sends everything through [`DiskFile::read_at`] / [`DiskFile::write_at`].
    fn map(&mut self, offset: u64, len: u64, write: bool) -> io::Result<Mapping<'_>> {
        let _ = (offset, write);
        Ok(Mapping::Other { len })
    }
    /// The image's format.
    fn format(&self) -> Format;
    /// Whether the image was opened read-only.
    fn readonly(&self) -> bool;
    /// The other files the image reads, in chain order (a qcow2 image's backing files, a VMDK
    /// descriptor's extents); empty for an image of one file.
    fn chain(&self) -> Vec<Link> {
        Vec::new()
    }
}

/// An answer of [`DiskFile::map`].
#[derive(Debug)]
pub enum Mapping<'a> {
    /// `len` bytes at `offset` in `file`: read (or, when asked for writing, written) there
    /// directly. The file position is not used by the image: callers may seek it.
    File {
        file: &'a File,
        offset: u64,
        len: u64,
    },
    /// `len` bytes that read as zeros (only answered for reads).
    Zero { len: u64 },
    /// `len` bytes that must go through `read_at` / `write_at`.
    Other { len: u64 },
}

/// Largest buffer a backend allocates for one step of a large operation.
pub const CHUNK: usize = 1 << 20;

/// "QFI\xfb": the first four bytes of a qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

pub(crate) fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "read-only image")
}

/// Opens `path` as `opts.format`, or as what its content says when that is `None`, following
/// the files it names only as [`OpenOptions::backing`] allows ([`policy`]).
pub fn open(path: &Path, opts: OpenOptions) -> Result<Box<dyn DiskFile>, Error> {
    let mut walk = Walk::new(opts.backing);
    open_in(path, opts.readonly, opts.format, &mut walk, Role::Top)
}

/// Opens one image of a chain: the named one ([`Role::Top`]) or a backing file.
pub(crate) fn open_in(
    path: &Path,
    readonly: bool,
    format: Option<Format>,
    walk: &mut Walk,
    role: Role,
) -> Result<Box<dyn DiskFile>, Error> {
    let (mut file, block) =
        policy::open_file(path, !readonly, role).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let policy = |source: PolicyError| Error::Policy {
        path: path.to_owned(),
        source,
    };
    walk.enter(&file, path).map_err(policy)?;
    let format = match format {
        // A block device is a raw disk: its content (which a guest writes) never decides.
        None | Some(Format::Raw) if block => Format::Raw,
        Some(_) if block => return Err(policy(PolicyError::BlockNotRaw)),
        Some(f) => f,
        None => detect_format(&mut file).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?,
    };
    let image = |source: ImageError| Error::Image {
        path: path.to_owned(),
        source,
    };
    match format {
        Format::Raw => {
            let raw = RawFile::new(file, readonly).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
            Ok(Box::new(raw))
        }
        Format::Qcow2 => {
            let q =
                qcow2::Qcow2::open(file, path, readonly, walk).map_err(|source| Error::Qcow2 {
                    path: path.to_owned(),
                    source,
                })?;
            Ok(Box::new(q))
        }
        Format::Vhd => vhd::open(file, readonly).map_err(image),
        Format::Vdi => Ok(Box::new(vdi::Vdi::open(file, readonly).map_err(image)?)),
        Format::Vmdk => Ok(Box::new(
            vmdk::Vmdk::open(file, path, readonly, walk).map_err(image)?,
        )),
        Format::Vhdx => Ok(Box::new(vhdx::Vhdx::open(file, readonly).map_err(image)?)),
    }
}

/// The format `file`'s content says, by magic numbers, never by file name; raw when none
/// matches (including files shorter than any magic). Reads the first 512 bytes and the last 512
/// (a fixed VHD has only its footer there). A raw image a guest can write may come to look like
/// another format: attach those with an explicit `format=raw`.
pub fn detect_format(file: &mut File) -> io::Result<Format> {
    let mut head = [0u8; 512];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = head.get(..n).unwrap_or_default();
    if head.starts_with(&QCOW2_MAGIC) {
        return Ok(Format::Qcow2);
    }
    if head.starts_with(vmdk::SPARSE_MAGIC) || head.starts_with(vmdk::DESCRIPTOR_MAGIC) {
        return Ok(Format::Vmdk);
    }
    if head.starts_with(vhdx::FILE_MAGIC) {
        return Ok(Format::Vhdx);
    }
    if head.get(64..68) == Some(vdi::SIGNATURE.as_slice()) {
        return Ok(Format::Vdi);
    }
    if head.starts_with(vhd::COOKIE) {
        return Ok(Format::Vhd);
    }
    let len = file.seek(SeekFrom::End(0))?;
    if len >= 1024 {
        let mut tail = [0u8; 512];
        file.seek(SeekFrom::Start(len - 512))?;
        file.read_exact(&mut tail)?;
        if vhd::is_footer(&tail) {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn formats_are_detected_by_content_not_name() {
        need_qemu_img();
        let dir = TempDir::new("detect");
        let cases = [
            ("qcow2", "", Format::Qcow2),
            ("vmdk", "", Format::Vmdk),
            ("vmdk", "subformat=streamOptimized", Format::Vmdk),
            ("vmdk", "subformat=monolithicFlat", Format::Vmdk),
            ("vpc", "force_size=on", Format::Vhd),
            ("vpc", "subformat=fixed,force_size=on", Format::Vhd),
            ("vhdx", "", Format::Vhdx),
            ("vdi", "", Format::Vdi),
            ("raw", "", Format::Raw),
        ];
        for (i, (fmt, opts, want)) in cases.into_iter().enumerate() {
            // A misleading name: the content decides.
            let p = dir.path(&format!("image{i}.qcow2"));
            create(fmt, opts, &p, "2M");
            let mut f = File::open(&p).unwrap();
            assert_eq!(detect_format(&mut f).unwrap(), want, "{fmt} {opts}");
            let img = open(&p, OpenOptions::readonly(true)).unwrap();
            assert_eq!(img.format(), want);
            assert_eq!(img.size(), 2 << 20, "{fmt} {opts}");
        }
        // The explicit format wins: a qcow2 opened as raw is its file.
        let p = dir.path("image0.qcow2");
        let img = open(&p, OpenOptions::readonly(true).format(Some(Format::Raw))).unwrap();
        assert_eq!(img.size(), std::fs::metadata(&p).unwrap().len());
        // A file shorter than every magic is raw.
        let p = dir.path("tiny");
        std::fs::write(&p, b"QF").unwrap();
        assert_eq!(
            detect_format(&mut File::open(&p).unwrap()).unwrap(),
            Format::Raw
        );
    }

    #[test]
    fn format_names() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(*f));
            let json = serde_json::to_string(f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        assert_eq!(Format::from_name("vpc"), Some(Format::Vhd));
        assert_eq!(Format::from_name("VHD"), None);
    }
}
