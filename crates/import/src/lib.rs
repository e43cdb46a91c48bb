//! `anyvisor import SOURCE --output DIR`: turns a VM made by another hypervisor into qcow2
//! disks and an `anyvisor run --config` file (docs/import.md).
//!
//! Sources ([`detect`]): an OVA (a tar holding an OVF descriptor and its disks), an OVF
//! descriptor with its disks next to it, a VMware `.vmx`, a VirtualBox `.vbox`, or a bare disk
//! image in any format the `disk` crate reads. The descriptor says how many CPUs, how much
//! memory, which disks and NICs the VM has ([`VmSpec`]); each disk is converted to qcow2
//! ([`qcow2w`]) and the config names them with absolute paths, boot disk first. What anyvisor
//! cannot give (SCSI/IDE/SATA controllers, e1000/vmxnet3 NICs, USB, sound, floppy, CD-ROM, ...)
//! is mapped to the virtio equivalent or dropped, one line each in [`Report::lines`].
//!
//! Every source is hostile input: XML is parsed by `roxmltree` with DTDs refused (no entity
//! expansion, so no XML bombs) and a node limit; descriptors are at most 16 MiB; a tar member
//! or file reference that is absolute, has a `..` component or resolves (through symlinks)
//! outside the package's directory is refused; CPU, memory and disk sizes are checked against
//! what anyvisor runs before anything is written. Files in the output directory are never
//! overwritten unless `force` is set, and each disk is written under a temporary name and
//! renamed when complete.

// Integer casts say whether they can lose bits: `u64::from`, `try_from`, or an `#[allow]` with
// the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod ova;
pub mod ovf;
pub mod qcow2w;
pub mod vbox;
pub mod vmx;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// Largest descriptor (OVF, vmx, vbox) read.
pub const MAX_DESCRIPTOR: u64 = 16 << 20;
/// Largest virtual disk converted (64 TiB).
pub const MAX_DISK: u64 = 64 << 40;
/// Most vCPUs and memory anyvisor runs (vmm::config).
pub const MAX_CPUS: u32 = 254;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most disks and NICs accepted from a descriptor.
const MAX_DEVICES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source is malformed, hostile or unsupported (exit 2).
    #[error("{0}")]
    Input(String),
    /// A source file cannot be read (exit 2).
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A descriptor is not well-formed XML, or uses what is refused (DTDs); the parser's error
    /// is the source (exit 2).
    #[error("{what}: invalid or refused XML")]
    Xml {
        what: String,
        #[source]
        source: roxmltree::Error,
    },
    /// A source disk cannot be opened or read as its format; the disk layer's error is the
    /// source (exit 2).
    #[error("disk {slot}")]
    Disk {
        slot: String,
        #[source]
        source: disk::Error,
    },
    /// A source disk turned out corrupt while it was converted (exit 2).
    #[error("disk {slot}")]
    Corrupt {
        slot: String,
        #[source]
        source: io::Error,
    },
    /// An OVA package is not a readable tar archive, or a member of it cannot be read (exit 2).
    #[error("{what}")]
    Package {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The generated configuration cannot be encoded (exit 1).
    #[error("cannot encode the configuration")]
    Encode(#[source] serde_json::Error),
    /// An output file cannot be written (exit 1).
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn input<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Input(msg.into()))
}

/// A NIC as the source describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The source's model name (`e1000`, `vmxnet3`, `82540EM`, ...).
    pub model: String,
    pub mac: Option<[u8; 6]>,
}

/// Where a disk's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskLoc {
    /// A file (already checked to be inside the source's directory).
    File(PathBuf),
    /// A member of an OVA: `size` bytes at `offset` of the tar file.
    Member {
        name: String,
        offset: u64,
        size: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSrc {
    /// Where the source attached it (`scsi0:0`, `SATA port 0`, `ovf:/disk/vmdisk1`).
    pub slot: String,
    pub loc: DiskLoc,
}

/// What a source describes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Boot disk first.
    pub disks: Vec<DiskSrc>,
    pub nics: Vec<Nic>,
    /// `mapped: ...` and `dropped: ...` lines.
    pub notes: Vec<String>,
}

/// What was written.
#[derive(Debug)]
pub struct Report {
    pub config: PathBuf,
    pub disks: Vec<PathBuf>,
    /// One line per mapped or dropped item, then one per file written.
    pub lines: Vec<String>,
}

pub struct Options {
    pub source: PathBuf,
    pub output: PathBuf,
    /// Overwrite files of an earlier import.
    pub force: bool,
    /// NIC N gets `tap=<prefix>N` in the config.
    pub tap_prefix: String,
    /// Read through the source disks' backing files (qcow2) and extents outside their
    /// descriptor's directory (VMDK); off: such a disk is refused (`disk::policy`).
    pub backing: bool,
}

/// Progress of the disk conversions.
pub trait Progress {
    fn begin(&mut self, what: &str, total: u64);
    fn advance(&mut self, done: u64);
    fn end(&mut self);
}

/// What kind of source a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Ova,
    Ovf,
    Vmx,
    Vbox,
    Disk,
}

/// By content: a tar header (`ustar` at 257) is an OVA, XML with an `Envelope` root an OVF,
/// with a `VirtualBox` root a .vbox, `key = "value"` text with VMware keys a .vmx; anything
/// else is a disk image.
pub fn detect(path: &Path) -> Result<SourceKind> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if head.get(257..262) == Some(&b"ustar"[..]) {
        return Ok(SourceKind::Ova);
    }
    let text = String::from_utf8_lossy(&head);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if t.starts_with('<') {
        // The root element's local name, after any declaration and comments.
        let mut rest = t;
        while let Some(r) = rest
            .strip_prefix("<?")
            .or_else(|| rest.strip_prefix("<!--"))
        {
            let end = if rest.starts_with("<?") { "?>" } else { "-->" };
            rest = r.split_once(end).map(|(_, a)| a.trim_start()).unwrap_or("");
        }
        // A DOCTYPE names the root element too (and is refused when parsed).
        let rest = rest.strip_prefix("<!DOCTYPE").unwrap_or(rest).trim_start();
        let name: String = rest
            .trim_start_matches('<')
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '>' | '/' | '['))
            .collect();
        let local = name.rsplit(':').next().unwrap_or("");
        return match local {
            "Envelope" => Ok(SourceKind::Ovf),
            "VirtualBox" => Ok(SourceKind::Vbox),
            _ => input(format!(
                "{}: XML with root <{name}> is neither an OVF Envelope nor a VirtualBox machine",
                path.display()
            )),
        };
    }
    let lower = text.to_ascii_lowercase();
    if lower.lines().any(|l| {
        let k = l.split('=').next().unwrap_or("").trim();
        matches!(
            k,
            ".encoding" | "config.version" | "virtualhw.version" | "displayname"
        )
    }) {
        return Ok(SourceKind::Vmx);
    }
    Ok(SourceKind::Disk)
}

/// A relative reference (tar member name, OVF href, vmx fileName) that stays inside its
/// package: not absolute, no `..`, no URL scheme.
pub fn check_relative(name: &str, what: &str) -> Result<()> {
    let p = Path::new(name);
    let bad = name.is_empty()
        || name.contains('\0')
        || name.contains("://")
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if bad {
        return input(format!(
            "{what} '{}' points outside the package (absolute, '..' or a URL); refused",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// `name` next to the descriptor in `dir`, refused if it resolves outside `dir`.
pub fn inside(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    check_relative(name, what)?;
    let base = dir.canonicalize().map_err(|source| Error::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let full = base.join(name);
    let real = full.canonicalize().map_err(|source| Error::Read {
        path: full.clone(),
        source,
    })?;
    if !real.starts_with(&base) {
        return input(format!(
            "{what} '{name}' resolves outside {} (a symlink?); refused",
            base.display()
        ));
    }
    Ok(real)
}

pub(crate) fn read_descriptor(path: &Path) -> Result<String> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_DESCRIPTOR + 1).read_to_end(&mut data))
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if data.len() as u64 > MAX_DESCRIPTOR {
        return input(format!(
            "{}: descriptor larger than {} MiB; refused",
            path.display(),
            MAX_DESCRIPTOR >> 20
        ));
    }
    String::from_utf8(data)
        .map_err(|_| Error::Input(format!("{}: descriptor is not UTF-8 text", path.display())))
}

/// Parses XML with DTDs refused (no entities, no bombs) and at most 1M nodes.
pub(crate) fn parse_xml<'a>(text: &'a str, what: &str) -> Result<roxmltree::Document<'a>> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 1 << 20,
        ..roxmltree::ParsingOptions::default()
    };
    roxmltree::Document::parse_with_options(text, opts).map_err(|source| Error::Xml {
        what: what.to_string(),
        source,
    })
}

/// `aa:bb:cc:dd:ee:ff`, `aa-bb-...` or `aabbccddeeff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.len() != 12 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(mac)
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A file name made of `[A-Za-z0-9._-]`.
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() { "vm".into() } else { s }
}

/// Reads what `opts.source` describes, without writing anything.
pub fn describe(opts: &Options) -> Result<VmSpec> {
    let src = &opts.source;
    let mut spec = match detect(src)? {
        SourceKind::Ova => ova::describe(src)?,
        SourceKind::Ovf => {
            let text = read_descriptor(src)?;
            let dir = src.parent().unwrap_or(Path::new("."));
            ovf::describe(&text, &mut |href| {
                Ok(DiskLoc::File(inside(dir, href, "OVF file reference")?))
            })?
        }
        SourceKind::Vmx => vmx::describe(src)?,
        SourceKind::Vbox => vbox::describe(src)?,
        SourceKind::Disk => VmSpec {
            name: src
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            disks: vec![DiskSrc {
                slot: "the disk image".into(),
                loc: DiskLoc::File(src.clone()),
            }],
            ..VmSpec::default()
        },
    };
    if spec.name.trim().is_empty() {
        spec.name = "vm".into();
    }
    if let Some(c) = spec.cpus
        && (c == 0 || c > MAX_CPUS)
    {
        return input(format!(
            "the source asks for {c} CPUs (anyvisor runs 1 to {MAX_CPUS})"
        ));
    }
    if let Some(m) = spec.memory_mib
        && (m == 0 || m > MAX_MEMORY_MIB)
    {
        return input(format!(
            "the source asks for {m} MiB of memory (anyvisor runs up to {MAX_MEMORY_MIB})"
        ));
    }
    if spec.disks.is_empty() {
        return input("the source has no hard disk to import");
    }
    if spec.disks.len() > MAX_DEVICES || spec.nics.len() > MAX_DEVICES {
        return input(format!(
            "the source has more than {MAX_DEVICES} disks or NICs"
        ));
    }
    Ok(spec)
}

/// Reads the source, converts its disks and writes the config.
pub fn import(opts: &Options, progress: &mut dyn Progress) -> Result<Report> {
    let spec = describe(opts)?;
    let name = safe_name(&spec.name);
    let out = &opts.output;
    let config = out.join(format!("{name}.json"));
    let disk_paths: Vec<PathBuf> = (0..spec.disks.len())
        .map(|i| out.join(format!("{name}-disk{i}.qcow2")))
        .collect();
    if !opts.force {
        for p in std::iter::once(&config).chain(&disk_paths) {
            if p.exists() {
                return input(format!(
                    "{} already exists (use --force to overwrite it)",
                    p.display()
                ));
            }
        }
    }
    let taps: Vec<String> = (0..spec.nics.len())
        .map(|i| format!("{}{i}", opts.tap_prefix))
        .collect();
    if let Some(t) = taps.iter().find(|t| t.is_empty() || t.len() > 15) {
        return input(format!(
            "tap name '{t}' must be 1 to 15 bytes (shorten --tap-prefix)"
        ));
    }
    // Open every disk before writing anything, so a bad one fails early.
    let mut sources = Vec::new();
    for d in &spec.disks {
        sources.push(open_disk(&opts.source, d, opts.backing)?);
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Write {
        path: out.clone(),
        source,
    })?;
    let out_abs = out.canonicalize().map_err(|source| Error::Write {
        path: out.clone(),
        source,
    })?;
    let mut lines = spec.notes.clone();
    let mut disk_args = Vec::new();
    for (i, (mut src, d)) in sources.into_iter().zip(&spec.disks).enumerate() {
        let file = format!("{name}-disk{i}.qcow2");
        let dest = out_abs.join(&file);
        let tmp = out_abs.join(format!(".{file}.part"));
        let werr = |source| Error::Write {
            path: tmp.clone(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(werr)?;
        progress.begin(&format!("{} -> {file}", d.slot), src.size());
        let r = qcow2w::write(src.as_mut(), f, &mut |done| progress.advance(done));
        progress.end();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(if e.kind() == io::ErrorKind::InvalidData {
                Error::Corrupt {
                    slot: d.slot.clone(),
                    source: e,
                }
            } else {
                werr(e)
            });
        }
        std::fs::rename(&tmp, &dest).map_err(|source| Error::Write {
            path: dest.clone(),
            source,
        })?;
        lines.push(format!("disk: {} -> {}", d.slot, dest.display()));
        disk_args.push(dest.display().to_string());
    }
    let mut cfg = serde_json::Map::new();
    if let Some(c) = spec.cpus {
        cfg.insert("cpus".into(), c.into());
    }
    if let Some(m) = spec.memory_mib {
        cfg.insert("memory".into(), format!("{m}M").into());
    }
    cfg.insert("disk".into(), disk_args.clone().into());
    let nets: Vec<String> = spec
        .nics
        .iter()
        .zip(&taps)
        .map(|(n, tap)| match &n.mac {
            Some(m) => format!("tap={tap},mac={}", mac_text(m)),
            None => format!("tap={tap}"),
        })
        .collect();
    if !nets.is_empty() {
        cfg.insert("net".into(), nets.into());
    }
    let text =
        serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).map_err(Error::Encode)?;
    let cfg_path = out_abs.join(format!("{name}.json"));
    std::fs::write(&cfg_path, text + "\n").map_err(|source| Error::Write {
        path: cfg_path.clone(),
        source,
    })?;
    lines.push(format!("config: {}", cfg_path.display()));
    Ok(Report {
        config: cfg_path,
        disks: disk_args.into_iter().map(PathBuf::from).collect(),
        lines,
    })
}

/// A source disk opened read-only through the `disk` crate.
struct Opened(Box<dyn disk::DiskFile>);

impl qcow2w::Source for Opened {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }
}

/// An OVA member copied out to a temporary file, alone in a private directory (so that a VMDK
/// descriptor's relative extent names find nothing of the host), removed when dropped (the
/// `disk` crate opens files, not byte ranges of a tar).
struct Extracted {
    inner: Opened,
    dir: PathBuf,
}

impl Drop for Extracted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl qcow2w::Source for Extracted {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
}

fn open_path(path: &Path, slot: &str, backing: bool) -> Result<Opened> {
    let opts = disk::OpenOptions::readonly(true).backing(backing);
    let d = disk::open(path, opts).map_err(|source| Error::Disk {
        slot: slot.to_string(),
        source,
    })?;
    if d.size() > MAX_DISK {
        return input(format!(
            "disk {slot}: virtual size {} bytes is larger than {} TiB; refused",
            d.size(),
            MAX_DISK >> 40
        ));
    }
    Ok(Opened(d))
}

fn open_disk(source: &Path, d: &DiskSrc, backing: bool) -> Result<Box<dyn qcow2w::Source>> {
    match &d.loc {
        DiskLoc::File(p) => Ok(Box::new(open_path(p, &d.slot, backing)?)),
        DiskLoc::Member { name, offset, size } => {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("anyvisor-import-{}-{n}", std::process::id()));
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(&dir)
                .map_err(|source| Error::Write {
                    path: dir.clone(),
                    source,
                })?;
            let tmp = dir.join(safe_name(name));
            // A disk inside an archive names no other file of the host: alone in its
            // directory, and no backing file.
            let opened = ova::copy_member(source, *offset, *size, &tmp)
                .and_then(|()| open_path(&tmp, &d.slot, false));
            match opened {
                Ok(inner) => Ok(Box::new(Extracted { inner, dir })),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(e)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_references() {
        assert!(check_relative("disk1.vmdk", "x").is_ok());
        assert!(check_relative("./sub/disk1.vmdk", "x").is_ok());
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "http://h/d.vmdk",
            "",
            "a\0b",
        ] {
            let e = check_relative(bad, "OVF file reference")
                .unwrap_err()
                .to_string();
            assert!(e.contains("refused"), "{bad}: {e}");
        }
    }

    #[test]
    fn symlink_escape_is_refused() {
        let dir = std::env::temp_dir().join(format!("anyvisor-import-in-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("d.vmdk")).unwrap();
        std::fs::write(dir.join("ok.vmdk"), b"x").unwrap();
        assert!(inside(&dir, "ok.vmdk", "f").is_ok());
        let e = inside(&dir, "d.vmdk", "f").unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn macs_and_names() {
        assert_eq!(
            parse_mac("00:50:56:aB:cd:ef"),
            Some([0, 0x50, 0x56, 0xab, 0xcd, 0xef])
        );
        assert_eq!(
            parse_mac("080027123456"),
            Some([8, 0, 0x27, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("08002712345"), None);
        assert_eq!(parse_mac("zz0027123456"), None);
        assert_eq!(safe_name("My VM/../x"), "My_VM_.._x");
        assert_eq!(safe_name("..."), "vm");
    }
}
