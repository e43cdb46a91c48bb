//! Find the Linux kernel a disk image boots, the way Xen's pygrub did: read the partition
//! table, the boot filesystem, and the boot loader's configuration, and return the kernel,
//! initrd and command line of the default entry, so the VMM can direct-boot them
//! (`anyvisor run --disk IMAGE` without `--kernel`; rules in docs/boot-from-disk.md).
//!
//! Order:
//! 1. the partition table ([`part`]): GPT (CRCs checked, backup header used when the primary
//!    is damaged), else MBR (with logical partitions), else a filesystem on the whole disk;
//! 2. the filesystems ([`fs`]): every partition except BIOS-boot, swap and extended ones is
//!    probed; ext2/3/4 is read, others are named when nothing bootable is found;
//! 3. the boot configuration, first found wins, each kind tried on every filesystem (a
//!    separate /boot — XBOOTLDR or MBR active — first) before the next kind:
//!    GRUB's `grub.cfg` ([`grub`]: `/boot/grub`, `/grub`, `/boot/grub2`, `/grub2`), Boot Loader
//!    Spec entries ([`bls`]: `/loader/entries`, `/boot/loader/entries`), `extlinux.conf` /
//!    `syslinux.cfg` ([`extlinux`]), else the `/vmlinuz` + `/initrd.img` links (also under
//!    `/boot`) with `root=UUID=<that filesystem's UUID> ro`;
//! 4. the kernel must be an x86-64 bzImage or ELF ([`kernel`]);
//! 5. `console=ttyS0` is appended when the entry's arguments have no `console=`.
//!
//! The ext4 reader is the `ext4-view` crate: pure Rust, read-only by construction (it has no
//! write path at all), `no_std`-capable, checks metadata checksums, and is maintained by a
//! Google-sponsored team with fuzzing in CI; it reads ext2 and ext3 too. The alternatives
//! (`ext4` 0.9, `ext4-rs`) are older, unmaintained or need a mutable block device. The image
//! itself is only read, through [`Image`].

// Integer casts say whether they can lose bits: `u64::from`, `try_from`, or an `#[allow]` with
// the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod bls;
pub mod extlinux;
pub mod fs;
pub mod grub;
pub mod kernel;
pub mod part;

use std::io;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use part::{Partition, TableKind};

/// A disk image read at byte offsets (read-only).
pub trait Image: Send + Sync {
    /// Fills `buf` from `offset`; reading past [`Image::size`] is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The virtual disk size in bytes.
    fn size(&self) -> u64;
}

/// A [`disk::DiskFile`] (any format the `disk` crate reads) as an [`Image`].
struct DiskImage(std::sync::Mutex<Box<dyn disk::DiskFile>>, u64);

impl Image for DiskImage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut d = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        d.read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        self.1
    }
}

/// Opens the image at `path` read-only (nothing of it is ever written), in `format` or the
/// format its content says, following its backing files only when `backing` (the disk's
/// `backing=on`).
pub fn open_image(
    path: &std::path::Path,
    format: Option<disk::Format>,
    backing: bool,
) -> Result<Arc<dyn Image>, disk::Error> {
    let d = disk::open(
        path,
        disk::OpenOptions::readonly(true)
            .format(format)
            .backing(backing),
    )?;
    let size = d.size();
    Ok(Arc::new(DiskImage(std::sync::Mutex::new(d), size)))
}

/// Largest kernel accepted.
pub const MAX_KERNEL: u64 = 256 << 20;
/// Largest initrd accepted (all initrds of an entry together).
pub const MAX_INITRD: u64 = 2 << 30;
/// Largest boot-configuration file read.
const MAX_CONFIG: u64 = 1 << 20;
/// Most BLS entry files read.
const MAX_BLS_ENTRIES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the disk image")]
    Io(#[from] io::Error),
    #[error("bad partition table: {0}")]
    BadTable(String),
    #[error("no filesystem found: {0}")]
    NoFilesystem(String),
    #[error("unsupported filesystem: {0} (anyvisor reads ext2/ext3/ext4 only)")]
    UnsupportedFs(String),
    #[error("no bootable entry: {0}")]
    NoEntry(String),
    #[error("{0}")]
    BadKernel(String),
    #[error("{0}")]
    MissingFile(String),
    #[error("{0}")]
    Filesystem(String),
    /// A file on a filesystem cannot be read (the filesystem is damaged); the ext4 reader's
    /// error is the source.
    #[error("cannot read {path} on {on}")]
    ReadFile {
        path: String,
        on: String,
        #[source]
        source: Ext4Error,
    },
}

/// What to boot.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: Vec<u8>,
    /// The entry's initrds, concatenated (Linux accepts concatenated cpio archives).
    pub initrd: Option<Vec<u8>>,
    /// The entry's arguments, with `console=ttyS0` added when it names no console.
    pub cmdline: String,
    /// The entry's own arguments, unchanged.
    pub entry_args: String,
    /// Which entry, from where: `grub.cfg entry 'Debian GNU/Linux' (partition 2)`.
    pub chosen: String,
    /// The kernel's path on its filesystem.
    pub kernel_path: String,
}

pub(crate) fn read_vec(img: &dyn Image, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
    let end = offset.checked_add(len).filter(|&e| e <= img.size());
    if end.is_none() {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at {offset} is past the end of the disk"),
        )));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::other("read too large"))?;
    let mut buf = vec![0u8; len];
    img.read_at(offset, &mut buf)?;
    Ok(buf)
}

/// A partition as the byte stream `ext4-view` reads.
struct PartReader {
    img: Arc<dyn Image>,
    start: u64,
    size: u64,
}

impl Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte
            .checked_add(dst.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or("read past the end of the partition")?;
        let _ = end;
        self.img.read_at(self.start + start_byte, dst)?;
        Ok(())
    }
}

/// An ext filesystem found on the disk.
struct Volume {
    part: Partition,
    fs: Ext4,
    uuid: String,
    label: String,
}

impl Volume {
    fn where_(&self) -> String {
        self.part.describe()
    }

    /// A file's content (symlinks followed), `None` if it does not exist, an error if it is
    /// larger than `limit` or the filesystem is damaged.
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        let bad = |source: Ext4Error| Error::ReadFile {
            path: path.to_string(),
            on: self.where_(),
            source,
        };
        let meta = match self.fs.metadata(path) {
            Ok(m) => m,
            Err(
                Ext4Error::NotFound
                | Ext4Error::NotADirectory
                | Ext4Error::MalformedPath
                | Ext4Error::NotAbsolute,
            ) => return Ok(None),
            Err(e) => return Err(bad(e)),
        };
        if meta.is_dir() {
            return Ok(None);
        }
        if meta.len() > limit {
            return Err(Error::BadKernel(format!(
                "{path} on {} is {} bytes (at most {limit} are read)",
                self.where_(),
                meta.len()
            )));
        }
        self.fs.read(path).map(Some).map_err(bad)
    }

    fn text(&self, path: &str) -> Result<Option<String>, Error> {
        Ok(self
            .read(path, MAX_CONFIG)?
            .map(|d| String::from_utf8_lossy(&d).into_owned()))
    }

    fn exists(&self, path: &str) -> bool {
        self.fs.exists(path).unwrap_or(false)
    }
}

/// The GRUB device name's partition number: `hd0,gpt2` / `hd0,msdos2` / `hd0,2` → 2, `hd0` → 0.
fn device_number(dev: &str) -> Option<u32> {
    let dev = dev.trim_start_matches('(').trim_end_matches(')');
    let mut parts = dev.split(',');
    if parts.next()? != "hd0" {
        return None;
    }
    match parts.next() {
        None => Some(0),
        Some(p) => p
            .trim_start_matches("gpt")
            .trim_start_matches("msdos")
            .parse()
            .ok(),
    }
}

struct Disk {
    volumes: Vec<Volume>,
}

impl Disk {
    fn volume(&self, dev: &str) -> Option<&Volume> {
        let n = device_number(dev)?;
        self.volumes.iter().find(|v| match v.part.kind {
            part::PartKind::Whole => n == 0,
            _ => v.part.number == n,
        })
    }
}

struct GrubHost<'a> {
    disk: &'a Disk,
    fallback: &'a Volume,
}

impl grub::Host for GrubHost<'_> {
    fn search(&self, kind: grub::SearchKind, key: &str) -> Option<String> {
        self.disk
            .volumes
            .iter()
            .find(|v| match kind {
                grub::SearchKind::FsUuid => v.uuid.eq_ignore_ascii_case(key),
                grub::SearchKind::Label => v.label == key,
                grub::SearchKind::File => v.exists(key),
            })
            .map(|v| v.part.grub_device())
    }

    fn read(&self, file: &grub::FileRef) -> Option<Vec<u8>> {
        let v = file
            .device
            .as_deref()
            .and_then(|d| self.disk.volume(d))
            .unwrap_or(self.fallback);
        v.read(&file.path, MAX_CONFIG).ok().flatten()
    }
}

/// A file an entry names: on `dev`'s volume (else the config's), also tried with `/boot`
/// added or removed (a separate /boot partition makes paths relative to it).
fn fetch(
    disk: &Disk,
    dev: Option<&str>,
    config_vol: &Volume,
    path: &str,
    limit: u64,
    what: &str,
) -> Result<(Vec<u8>, String), Error> {
    let vol = dev.and_then(|d| disk.volume(d)).unwrap_or(config_vol);
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut tries = vec![path.clone()];
    match path.strip_prefix("/boot/") {
        Some(rest) => tries.push(format!("/{rest}")),
        None => tries.push(format!("/boot{path}")),
    }
    for p in &tries {
        if let Some(data) = vol.read(p, limit)? {
            return Ok((data, p.clone()));
        }
    }
    Err(Error::MissingFile(format!(
        "the {what} {path} named by the boot entry is not on {}",
        vol.where_()
    )))
}

/// An entry found in some configuration, with its files still to read.
struct Found<'a> {
    vol: &'a Volume,
    chosen: String,
    kernel: (Option<String>, String),
    initrds: Vec<(Option<String>, String)>,
    args: String,
}

/// Reads the partition table, filesystems and boot configuration of `img` and returns what
/// its default entry boots.
pub fn find_boot(img: Arc<dyn Image>) -> Result<BootFiles, Error> {
    let (table, parts) = part::read_table(img.as_ref())?;
    let mut candidates: Vec<Partition> = if table == TableKind::None {
        vec![Partition {
            number: 0,
            start: 0,
            size: img.size(),
            kind: part::PartKind::Whole,
        }]
    } else {
        parts
            .into_iter()
            .filter(|p| !p.is_unlikely_boot())
            .collect()
    };
    candidates.sort_by_key(Partition::boot_rank);
    let mut volumes = Vec::new();
    let mut others = Vec::new();
    let mut damaged = Vec::new();
    for p in candidates {
        match fs::probe(img.as_ref(), p.start, p.size)? {
            fs::FsKind::Ext => {
                let reader = PartReader {
                    img: img.clone(),
                    start: p.start,
                    size: p.size,
                };
                let fs = match Ext4::load(Box::new(reader)) {
                    Ok(fs) => fs,
                    Err(e) => {
                        // Another partition may still boot; named if none does.
                        damaged.push(format!("the ext filesystem on {}: {e}", p.describe()));
                        continue;
                    }
                };
                let uuid = fs.uuid().to_string();
                let label = fs.label().to_str().unwrap_or("").to_string();
                volumes.push(Volume {
                    part: p,
                    fs,
                    uuid,
                    label,
                });
            }
            fs::FsKind::Other(name) => {
                if name != "swap" {
                    others.push(format!("{name} on {}", p.describe()));
                }
            }
            fs::FsKind::Unknown => {}
        }
    }
    if volumes.is_empty() {
        return Err(if !damaged.is_empty() {
            Error::Filesystem(damaged.join("; "))
        } else if !others.is_empty() {
            Error::UnsupportedFs(others.join(", "))
        } else if table == TableKind::None {
            Error::NoFilesystem("no partition table and no filesystem on the whole disk".into())
        } else {
            Error::NoFilesystem(format!(
                "the {} partition table has no partition with a known filesystem",
                if table == TableKind::Gpt {
                    "GPT"
                } else {
                    "MBR"
                }
            ))
        });
    }
    let disk = Disk { volumes };
    let found = find_entry(&disk)?;
    let (kernel, kernel_path) = fetch(
        &disk,
        found.kernel.0.as_deref(),
        found.vol,
        &found.kernel.1,
        MAX_KERNEL,
        "kernel",
    )?;
    kernel::check(&kernel).map_err(|what| {
        Error::BadKernel(format!(
            "the kernel {kernel_path} of {} is not an x86-64 Linux kernel: it is {what}",
            found.chosen
        ))
    })?;
    let mut initrd: Option<Vec<u8>> = None;
    for (dev, path) in &found.initrds {
        let (data, _) = fetch(&disk, dev.as_deref(), found.vol, path, MAX_INITRD, "initrd")?;
        let all = initrd.get_or_insert_with(Vec::new);
        if (all.len() + data.len()) as u64 > MAX_INITRD {
            return Err(Error::BadKernel(format!(
                "the initrds of {} are larger than {MAX_INITRD} bytes",
                found.chosen
            )));
        }
        // Each cpio archive starts 4-byte aligned.
        while !all.len().is_multiple_of(4) {
            all.push(0);
        }
        all.extend_from_slice(&data);
    }
    Ok(BootFiles {
        kernel,
        initrd,
        cmdline: with_console(&found.args),
        entry_args: found.args,
        chosen: found.chosen,
        kernel_path,
    })
}

/// `args` plus `console=ttyS0` when it names no console.
pub fn with_console(args: &str) -> String {
    let has_console = args.split_whitespace().any(|w| w.starts_with("console="));
    if has_console {
        args.to_string()
    } else if args.trim().is_empty() {
        "console=ttyS0".into()
    } else {
        format!("{} console=ttyS0", args.trim())
    }
}

const GRUB_DIRS: [&str; 4] = ["/boot/grub", "/grub", "/boot/grub2", "/grub2"];

fn find_entry(disk: &Disk) -> Result<Found<'_>, Error> {
    let mut notes = Vec::new();
    // 1. grub.cfg
    for vol in &disk.volumes {
        for dir in GRUB_DIRS {
            let path = format!("{dir}/grub.cfg");
            let Some(cfg) = vol.text(&path)? else {
                continue;
            };
            let host = GrubHost {
                disk,
                fallback: vol,
            };
            match grub::default_entry(&cfg, &vol.part.grub_device(), dir, &host) {
                Ok(e) => {
                    return Ok(Found {
                        vol,
                        chosen: format!(
                            "grub.cfg entry '{}' ({path} on {})",
                            e.title,
                            vol.where_()
                        ),
                        kernel: (e.kernel.device, e.kernel.path),
                        initrds: e.initrds.into_iter().map(|f| (f.device, f.path)).collect(),
                        args: e.args,
                    });
                }
                Err(why) => notes.push(format!("{path} on {}: {why}", vol.where_())),
            }
        }
    }
    // 2. Boot Loader Spec entries
    for vol in &disk.volumes {
        for dir in ["/loader/entries", "/boot/loader/entries"] {
            let Ok(list) = vol.fs.read_dir(dir) else {
                continue;
            };
            let vars = GRUB_DIRS
                .iter()
                .find_map(|d| vol.text(&format!("{d}/grubenv")).ok().flatten())
                .map(|t| grub::parse_grubenv(&t))
                .unwrap_or_default();
            let saved = vars
                .iter()
                .find(|(n, _)| n == "saved_entry")
                .map(|(_, v)| v.clone());
            let mut entries = Vec::new();
            for ent in list.take(MAX_BLS_ENTRIES).flatten() {
                let name = ent.file_name();
                let Ok(name) = name.as_str() else { continue };
                let Some(id) = name.strip_suffix(".conf") else {
                    continue;
                };
                if let Some(text) = vol.text(&format!("{dir}/{name}"))? {
                    entries.push(bls::parse_entry(id, &text, &vars));
                }
            }
            let count = entries.len();
            match bls::choose(entries, saved.as_deref()) {
                Some(e) => {
                    let base = if dir.starts_with("/boot") {
                        "/boot"
                    } else {
                        ""
                    };
                    let rel = |p: &str| {
                        let p = p.trim_start_matches('/');
                        (None, format!("{base}/{p}"))
                    };
                    return Ok(Found {
                        vol,
                        chosen: format!(
                            "Boot Loader Spec entry '{}' ({dir} on {})",
                            e.display(),
                            vol.where_()
                        ),
                        kernel: rel(e.linux.as_deref().unwrap_or("")),
                        initrds: e.initrds.iter().map(|p| rel(p)).collect(),
                        args: e.options,
                    });
                }
                None => notes.push(format!(
                    "{dir} on {}: {count} entries, none with a linux line",
                    vol.where_()
                )),
            }
        }
    }
    // 3. extlinux / syslinux
    for vol in &disk.volumes {
        for path in [
            "/boot/extlinux/extlinux.conf",
            "/extlinux/extlinux.conf",
            "/boot/extlinux.conf",
            "/extlinux.conf",
            "/boot/syslinux/syslinux.cfg",
            "/syslinux/syslinux.cfg",
            "/boot/syslinux.cfg",
            "/syslinux.cfg",
        ] {
            let Some(text) = vol.text(path)? else {
                continue;
            };
            let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let rel = |p: &str| {
                if p.starts_with('/') {
                    (None, p.to_string())
                } else {
                    (None, format!("{dir}/{p}"))
                }
            };
            match extlinux::default_label(&text) {
                Some(l) => {
                    return Ok(Found {
                        vol,
                        chosen: format!(
                            "{} label '{}' ({path} on {})",
                            if path.ends_with(".conf") {
                                "extlinux"
                            } else {
                                "syslinux"
                            },
                            l.title.as_deref().unwrap_or(&l.name),
                            vol.where_()
                        ),
                        kernel: rel(l.kernel.as_deref().unwrap_or("")),
                        initrds: l.initrds.iter().map(|p| rel(p)).collect(),
                        args: l.append.unwrap_or_default(),
                    });
                }
                None => notes.push(format!(
                    "{path} on {}: no label with a kernel",
                    vol.where_()
                )),
            }
        }
    }
    // 4. /vmlinuz + /initrd.img
    for vol in &disk.volumes {
        for dir in ["", "/boot"] {
            let k = format!("{dir}/vmlinuz");
            if !vol.exists(&k) {
                continue;
            }
            let i = format!("{dir}/initrd.img");
            let initrds = if vol.exists(&i) {
                vec![(None, i)]
            } else {
                Vec::new()
            };
            return Ok(Found {
                vol,
                chosen: format!("the {k} link on {}", vol.where_()),
                kernel: (None, k),
                initrds,
                args: format!("root=UUID={} ro", vol.uuid),
            });
        }
    }
    let mut why = format!(
        "no grub.cfg, /loader/entries, extlinux.conf/syslinux.cfg or /vmlinuz on the ext filesystem{} of {}",
        if disk.volumes.len() > 1 { "s" } else { "" },
        disk.volumes
            .iter()
            .map(Volume::where_)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !notes.is_empty() {
        why = format!("{} ({why})", notes.join("; "));
    }
    Err(Error::NoEntry(why))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub struct MemImage(pub Vec<u8>);

    impl Image for MemImage {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = self
                .0
                .get(start..start + buf.len())
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
    }

    #[test]
    fn console_is_added_only_when_missing() {
        assert_eq!(
            with_console("root=/dev/vda ro"),
            "root=/dev/vda ro console=ttyS0"
        );
        assert_eq!(with_console(""), "console=ttyS0");
        assert_eq!(with_console("console=tty1 quiet"), "console=tty1 quiet");
    }

    #[test]
    fn devices() {
        assert_eq!(device_number("hd0,gpt2"), Some(2));
        assert_eq!(device_number("(hd0,msdos5)"), Some(5));
        assert_eq!(device_number("hd0,3"), Some(3));
        assert_eq!(device_number("hd0"), Some(0));
        assert_eq!(device_number("hd1,gpt1"), None);
    }

    #[test]
    fn damaged_ext_is_named() {
        let mut d = vec![0u8; 1 << 20];
        d[1024 + 56] = 0x53;
        d[1024 + 57] = 0xef;
        let e = find_boot(Arc::new(MemImage(d))).unwrap_err();
        assert!(matches!(e, Error::Filesystem(_)), "{e}");
        assert!(
            e.to_string()
                .contains("the ext filesystem on the whole disk"),
            "{e}"
        );
    }

    #[test]
    fn empty_and_foreign_disks() {
        let e = find_boot(Arc::new(MemImage(vec![0; 1 << 20]))).unwrap_err();
        assert!(matches!(e, Error::NoFilesystem(_)), "{e}");
        let mut xfs = vec![0u8; 1 << 20];
        xfs[0..4].copy_from_slice(b"XFSB");
        let e = find_boot(Arc::new(MemImage(xfs))).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported filesystem: xfs on the whole disk (no partition table) (anyvisor reads ext2/ext3/ext4 only)"
        );
    }
}
