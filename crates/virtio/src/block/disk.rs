//! Disk images behind a block device: the [`DiskImage`] trait, raw files, and format detection.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_sys_util::fallocate::{FallocateMode, fallocate};

use super::qcow2::{self, Qcow2};

/// Image formats. `None` where a format is asked for means "detect by content".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
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
}

/// A virtual disk of [`DiskImage::size`] bytes. Callers keep every access inside the disk.
pub trait DiskImage: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The range's content becomes unspecified; the backend may free its storage.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeros afterwards.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// Largest buffer a backend allocates for one step of a large operation.
pub(crate) const CHUNK: usize = 1 << 20;

/// "QFI\xfb": the first four bytes of a qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Opens `path` as `format`, or as what its content says when `format` is `None`.
pub fn open(
    path: &Path,
    readonly: bool,
    format: Option<Format>,
) -> Result<Box<dyn DiskImage>, Error> {
    open_depth(path, readonly, format, 0)
}

pub(crate) fn open_depth(
    path: &Path,
    readonly: bool,
    format: Option<Format>,
    depth: u32,
) -> Result<Box<dyn DiskImage>, Error> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let format = match format {
        Some(f) => f,
        None => detect(&mut file).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?,
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
            let q = Qcow2::open(file, path, readonly, depth).map_err(|source| Error::Qcow2 {
                path: path.to_owned(),
                source,
            })?;
            Ok(Box::new(q))
        }
    }
}

/// qcow2 if the file starts with the qcow2 magic, raw otherwise (including files shorter than it).
pub fn detect(file: &mut File) -> io::Result<Format> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < magic.len() {
        match file.read(&mut magic[n..])? {
            0 => return Ok(Format::Raw),
            k => n += k,
        }
    }
    Ok(if magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// A raw image: disk byte N is file byte N.
pub struct RawFile {
    file: File,
    size: u64,
    readonly: bool,
}

impl RawFile {
    pub fn new(mut file: File, readonly: bool) -> io::Result<Self> {
        // Seeking also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawFile {
            file,
            size,
            readonly,
        })
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "read-only image")
}

impl DiskImage for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        self.file.write_all_at(buf, offset)
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
        // Advisory: a file system without hole punching keeps the data, which is allowed.
        if let Err(e) = fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            hv::rate_limited!(tracing::debug!("raw discard not done: {e}"));
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(read_only());
        }
        if fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len).is_ok() {
            return Ok(());
        }
        write_zeroes_slowly(&self.file, offset, len)
    }
}

fn write_zeroes_slowly(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |r| r.min(CHUNK));
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
