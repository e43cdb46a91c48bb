//! What opening an image may touch (`docs/threat-model.md`, "Images"). Every file this crate
//! opens goes through [`open_file`]: opened `O_NONBLOCK | O_NOCTTY` (a FIFO or a terminal where
//! an image should be cannot block the open or become the controlling terminal), checked with
//! `fstat` to be a regular file (or, for the image the user named and nothing else, a block
//! device), and only then made blocking again. Files an image names itself (qcow2 backing files,
//! VMDK extents) are opened only as [`Walk`] allows: a backing file only with `backing=on`, each
//! file of a chain once (no loops), at most [`MAX_CHAIN`] deep.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use serde::Serialize;

use crate::Format;

/// Longest chain of images followed (the named one and its backing files).
pub const MAX_CHAIN: usize = 16;

/// Why a file is not opened as (part of) an image.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("is a {0}, not a regular file")]
    NotAFile(&'static str),
    #[error("is a block device: only a raw disk may be one (format=raw)")]
    BlockNotRaw,
    #[error("names backing file '{0}', which is followed only with backing=on (import: --backing)")]
    BackingOff(String),
    #[error("backing chain longer than {MAX_CHAIN} images")]
    TooDeep,
    #[error("backing chain loops back to {0}")]
    Loop(PathBuf),
    #[error("I/O error")]
    Io(#[from] io::Error),
}

impl From<PolicyError> for io::Error {
    fn from(e: PolicyError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// What a file is to the image being opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The image the user named: may be a block device (then raw only).
    Top,
    /// A file the image names (backing file, extent): a regular file only.
    Named,
}

/// The kind of a file that is not a regular file, in words.
fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Opens `path` for reading (and writing when `write`) without blocking, refusing anything but
/// a regular file, or a block device when `role` is [`Role::Top`]. The returned file is
/// blocking. Also used for kernels and initrds (`Role::Named`).
pub fn open_file(path: &Path, write: bool, role: Role) -> io::Result<(File, bool)> {
    open_file_flags(path, write, role, 0)
}

/// [`open_file`] with more `open(2)` flags (`O_NOFOLLOW`).
pub(crate) fn open_file_flags(
    path: &Path,
    write: bool,
    role: Role,
    flags: i32,
) -> io::Result<(File, bool)> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
    {
        Ok(f) => f,
        // A FIFO without a reader refuses a non-blocking writer (ENXIO): say what it is.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => PolicyError::NotAFile(kind(m.file_type())).into(),
                _ => e,
            });
        }
        Err(e) => return Err(e),
    };
    let ft = file.metadata()?.file_type();
    let block = ft.is_block_device() && role == Role::Top;
    if !ft.is_file() && !block {
        return Err(PolicyError::NotAFile(kind(ft)).into());
    }
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok((file, block))
}

/// Opens a file that must be a regular file (a kernel, an initrd), read-only, without blocking
/// on a FIFO; the error says what the path is instead.
pub fn open_regular(path: &Path) -> io::Result<File> {
    open_file(path, false, Role::Named).map(|(f, _)| f)
}

/// One file an open image reads besides the one named: shown by `anyvisor info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Link {
    pub path: PathBuf,
    pub format: Format,
    /// `backing` (a qcow2 backing file) or `extent` (a file a VMDK descriptor names).
    pub role: &'static str,
}

/// The state of one [`crate::open`]: whether backing files may be followed, and the files of
/// the chain so far (device and inode), to refuse loops and bound the depth.
#[derive(Debug, Default)]
pub struct Walk {
    pub(crate) backing: bool,
    seen: Vec<(u64, u64)>,
}

impl Walk {
    pub fn new(backing: bool) -> Walk {
        Walk {
            backing,
            seen: Vec::new(),
        }
    }

    /// Whether `backing=on`: files an image names outside its own directory may be followed.
    pub fn backing(&self) -> bool {
        self.backing
    }

    /// Records `file` (at `path`) as the next image of the chain.
    pub(crate) fn enter(&mut self, file: &File, path: &Path) -> Result<(), PolicyError> {
        let m = file.metadata()?;
        let id = (m.dev(), m.ino());
        if self.seen.contains(&id) {
            return Err(PolicyError::Loop(path.to_owned()));
        }
        if self.seen.len() >= MAX_CHAIN {
            return Err(PolicyError::TooDeep);
        }
        self.seen.push(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::time::{Duration, Instant};

    #[test]
    fn non_files_are_refused_without_blocking() {
        let dir = TempDir::new("policy");
        let fifo = dir.path("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = Instant::now();
        for (p, want) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
            (Path::new("/dev/null"), "character device"),
            (dir.0.as_path(), "directory"),
        ] {
            for role in [Role::Top, Role::Named] {
                for write in [false, true] {
                    let e = open_file(p, write, role).unwrap_err();
                    assert!(e.to_string().contains(want), "{p:?}: {e}");
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        let f = dir.path("file");
        std::fs::write(&f, b"x").unwrap();
        let (file, block) = open_file(&f, true, Role::Named).unwrap();
        assert!(!block);
        let fl = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL).unwrap());
        assert!(!fl.contains(OFlag::O_NONBLOCK), "left non-blocking");
    }

    /// A block device is a disk only where the user named it, and then only as raw. The node
    /// is made here (root: the tests run as root on the development host and in CI) for loop
    /// device 7:0, which need not be attached (its size is then 0).
    #[test]
    fn block_devices_only_as_the_named_raw_disk() {
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        let dir = TempDir::new("policyblk");
        let blk = dir.path("blk");
        mknod(
            &blk,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(7, 0),
        )
        .expect("mknod of a block device node (needs root)");
        let (_, block) = open_file(&blk, false, Role::Top).unwrap();
        assert!(block);
        let e = open_file(&blk, false, Role::Named).unwrap_err();
        assert!(
            e.to_string()
                .contains("is a block device, not a regular file"),
            "{e}"
        );
        let img = crate::open(&blk, crate::OpenOptions::readonly(true)).unwrap();
        assert_eq!(img.format(), Format::Raw);
        for f in [Format::Qcow2, Format::Vmdk] {
            let opts = crate::OpenOptions::readonly(true).format(Some(f));
            let e = crate::open(&blk, opts)
                .err()
                .expect("block device as non-raw");
            assert!(
                matches!(
                    e,
                    crate::Error::Policy {
                        source: PolicyError::BlockNotRaw,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }
}
