//! The run configuration: what `anyvisor run` flags and `--config FILE.json` say, merged and
//! checked into one [`VmConfig`].

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MIB: u64 = 1 << 20;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY: u64 = 256 * MIB;
/// Most vCPUs a VM may have (xAPIC IDs are 8 bits; 255 is broadcast).
pub const MAX_CPUS: u32 = 254;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Parses a size: a number with an optional `K`, `M` or `G` suffix (powers of 1024, case
/// insensitive); a bare number is MiB. Only the suffixes the CLI spec names are accepted: `KB`,
/// `MiB` and the like are refused rather than guessed at.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |why: &str| Error::Usage(format!("invalid size '{text}': {why}"));
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let unit_part = lower.trim_start_matches(|c: char| c.is_ascii_digit());
    let digits = &lower[..lower.len() - unit_part.len()];
    if digits.is_empty() {
        return Err(bad("expected a number with an optional K, M or G suffix"));
    }
    let shift = match unit_part {
        "" | "m" => 20,
        "k" => 10,
        "g" => 30,
        _ => return Err(bad("unknown suffix (use K, M or G)")),
    };
    let n: u64 = digits.parse().map_err(|_| bad("number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| bad("number too large"))
}

/// A choice flag's values (`--backend`, `--cpu-model`, `--seccomp`): clap parses the flag with
/// them, and a config file's value goes through [`parse_choice`], so both accept the same names
/// and a config file's wrong name reads like a wrong flag value.
pub trait Choice: ValueEnum {
    /// What the value is, for the error message (`backend`, `cpu model`).
    const WHAT: &'static str;
}

/// `text` as one of `T`'s values, or a usage error listing them.
pub fn parse_choice<T: Choice>(text: &str) -> Result<T> {
    let names: Vec<String> = T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|p| p.get_name().to_string())
        .collect();
    T::from_str(text, false).map_err(|_| {
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        Error::Usage(format!(
            "invalid {} '{text}' (expected {expected})",
            T::WHAT
        ))
    })
}

/// Serde's side of [`parse_choice`], for an optional choice in the config file.
fn deserialize_choice<'de, D, T>(de: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Choice,
{
    let text = String::deserialize(de)?;
    parse_choice(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Which hypervisor backend to use; `auto` is KVM where `/dev/kvm` can be opened, else emu.
/// (The variants carry plain comments: clap would show doc comments in `--help`.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Kvm,
    Emu,
    #[default]
    Auto,
}

impl Choice for BackendChoice {
    const WHAT: &'static str = "backend";
}

/// Which CPU the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModelChoice {
    /// The same x86-64-v3 CPU on every backend and host (`portable-v3`).
    #[default]
    Portable,
    /// The x86-64-v2 portable CPU, for hosts that lack v3 (`portable-v2`).
    #[serde(rename = "portable-v2")]
    PortableV2,
    /// Everything the host offers (KVM only).
    Host,
}

impl CpuModelChoice {
    /// The model of a portable choice; `None` for `host`, which only an opened KVM knows.
    pub fn portable_model(self) -> Option<hv::CpuModel> {
        match self {
            Self::Portable => Some(hv::CpuModel::portable_v3()),
            Self::PortableV2 => Some(hv::CpuModel::portable()),
            Self::Host => None,
        }
    }
}

/// The names `--cpu-model` accepts: [`CpuModelChoice`] with `portable-v3` spelled out, as the
/// help lists it (`portable` is the same CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuModelName {
    Portable,
    PortableV3,
    PortableV2,
    Host,
}

impl Choice for CpuModelName {
    const WHAT: &'static str = "cpu model";
}

impl From<CpuModelName> for CpuModelChoice {
    fn from(name: CpuModelName) -> Self {
        match name {
            CpuModelName::Portable | CpuModelName::PortableV3 => Self::Portable,
            CpuModelName::PortableV2 => Self::PortableV2,
            CpuModelName::Host => Self::Host,
        }
    }
}

/// `--seccomp`'s values: [`sandbox::SeccompMode`] under the names it gives itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeccompChoice(pub sandbox::SeccompMode);

impl ValueEnum for SeccompChoice {
    fn value_variants<'a>() -> &'a [Self] {
        use sandbox::SeccompMode::{Log, Off, On};
        &[Self(Off), Self(Log), Self(On)]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.name()))
    }
}

impl Choice for SeccompChoice {
    const WHAT: &'static str = "seccomp mode";
}

/// Where the guest's ttyS0 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// Guest output on stdout, host stdin to the guest.
    #[default]
    Stdio,
    /// Output dropped, no input.
    Null,
    /// Output appended to a file, no input.
    File(PathBuf),
}

impl SerialConfig {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "null" => Ok(Self::Null),
            "" => Err(Error::Usage("--serial needs stdio, null or a path".into())),
            p => Ok(Self::File(PathBuf::from(p))),
        }
    }
}

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
    Vdi,
}

/// One `--disk PATH[,readonly=on][,format=raw|qcow2|vmdk|vhd|vhdx|vdi][,backing=on]` (`vpc`
/// names VHD too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// `None`: detected from the content.
    pub format: Option<DiskFormat>,
    /// Follow the files the image names (qcow2 backing files, VMDK extents outside the
    /// descriptor's directory); off: such an image is refused (`docs/disk-formats.md`).
    #[serde(default)]
    pub backing: bool,
}

impl DiskConfig {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Usage(format!("invalid --disk '{s}': {why}"));
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("missing path".into()));
        }
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            readonly: false,
            format: None,
            backing: false,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("readonly", v)) => {
                    disk.readonly =
                        parse_on_off(v).ok_or_else(|| bad(format!("bad value '{v}'")))?
                }
                Some(("backing", v)) => {
                    disk.backing = parse_on_off(v).ok_or_else(|| bad(format!("bad value '{v}'")))?
                }
                Some(("format", "raw")) => disk.format = Some(DiskFormat::Raw),
                Some(("format", "qcow2")) => disk.format = Some(DiskFormat::Qcow2),
                Some(("format", "vmdk")) => disk.format = Some(DiskFormat::Vmdk),
                Some(("format", "vhd" | "vpc")) => disk.format = Some(DiskFormat::Vhd),
                Some(("format", "vhdx")) => disk.format = Some(DiskFormat::Vhdx),
                Some(("format", "vdi")) => disk.format = Some(DiskFormat::Vdi),
                Some(("format", v)) => return Err(bad(format!("unknown format '{v}'"))),
                _ => return Err(bad(format!("unknown option '{opt}'"))),
            }
        }
        Ok(disk)
    }
}

impl DiskConfig {
    /// Opens the image as configured, following what it names only with `backing=on`
    /// (`disk::policy`); also returns the other files it reads, for `info`.
    pub fn open(&self) -> Result<(Box<dyn disk::DiskFile>, Vec<disk::Link>)> {
        let format = self.format.map(|f| match f {
            DiskFormat::Raw => disk::Format::Raw,
            DiskFormat::Qcow2 => disk::Format::Qcow2,
            DiskFormat::Vmdk => disk::Format::Vmdk,
            DiskFormat::Vhd => disk::Format::Vhd,
            DiskFormat::Vhdx => disk::Format::Vhdx,
            DiskFormat::Vdi => disk::Format::Vdi,
        });
        let opts = disk::OpenOptions {
            readonly: self.readonly,
            format,
            backing: self.backing,
        };
        // The error names the disk and what failed with it.
        let image = disk::open(&self.path, opts)?;
        let chain = image.chain();
        Ok((image, chain))
    }
}

fn parse_on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// One `--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    /// `None`: a generated locally administered address.
    pub mac: Option<[u8; 6]>,
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Usage(format!("invalid --net '{s}': {why}"));
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                    tap = Some(name.to_string())
                }
                Some(("tap", _)) => return Err(bad("tap name must be 1 to 15 bytes".into())),
                Some(("mac", m)) => {
                    let addr = parse_mac(m).ok_or_else(|| bad(format!("bad mac '{m}'")))?;
                    // The I/G bit: a group (multicast or broadcast) address is no NIC's own.
                    if addr[0] & 1 != 0 {
                        return Err(bad(format!(
                            "mac '{m}' is a multicast or broadcast address, not a unicast one"
                        )));
                    }
                    mac = Some(addr)
                }
                _ => return Err(bad(format!("unknown option '{opt}'"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("missing tap=NAME".into()))?;
        Ok(NetConfig { tap, mac })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `--vsock CID,uds=PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub uds: PathBuf,
}

impl VsockConfig {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Usage(format!("invalid --vsock '{s}': {why}"));
        let (cid, rest) = s
            .split_once(',')
            .ok_or_else(|| bad("expected CID,uds=PATH"))?;
        let cid: u32 = cid.parse().map_err(|_| bad("bad CID"))?;
        // 0, 1 and 2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if cid < 3 || cid == u32::MAX {
            return Err(bad("CID must be at least 3"));
        }
        let uds = rest
            .strip_prefix("uds=")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("expected CID,uds=PATH"))?;
        Ok(VsockConfig {
            cid,
            uds: PathBuf::from(uds),
        })
    }
}

/// Everything that defines a VM booted from a kernel. Recorded in snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub backend: BackendChoice,
    pub cpu_model: CpuModelChoice,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
    /// Per-thread seccomp filters. Not part of the config JSON: snapshots and migrations carry
    /// it in the VMM's run state (`vmm::snapshot::RunState`).
    #[serde(skip)]
    pub seccomp: sandbox::SeccompMode,
}

/// A size in a config file: a number of MiB or a string like `"4G"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Mib(u64),
    Text(String),
}

impl SizeValue {
    /// A `--memory` flag's value, checked later with the rest.
    fn flag(text: &str) -> std::result::Result<Self, std::convert::Infallible> {
        Ok(SizeValue::Text(text.to_string()))
    }

    fn bytes(&self) -> Result<u64> {
        match self {
            SizeValue::Mib(n) => n
                .checked_mul(MIB)
                .ok_or_else(|| Error::Usage(format!("invalid size '{n}': number too large"))),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

/// The `run` settings as given: every field optional, named like the long flags. This one type
/// is both the `run` subcommand's flags (clap, with their help) and the shape of
/// `--config FILE.json` (serde, kebab-case keys); [`RunOptions::override_with`] lays the flags
/// the user gave over a config file's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunOptions {
    /// Linux kernel: bzImage or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line [default: console=ttyS0 reboot=k panic=-1].
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest RAM; K, M, G suffixes, a bare number is MiB [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = SizeValue::flag)]
    pub memory: Option<SizeValue>,
    /// Hypervisor backend [default: auto].
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "deserialize_choice")]
    pub backend: Option<BackendChoice>,
    /// CPU the guest sees: portable (= portable-v3, x86-64-v3), portable-v2 (x86-64-v2, for hosts
    /// without v3), host (KVM only) [default: portable].
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "deserialize_choice")]
    pub cpu_model: Option<CpuModelName>,
    /// virtio-blk disk: PATH[,readonly=on][,format=raw|qcow2|vmdk|vhd|vhdx|vdi][,backing=on];
    /// backing=on follows the image's backing files; repeat for more.
    #[arg(long, value_name = "SPEC")]
    #[serde(default)]
    pub disk: Vec<String>,
    /// virtio-net device: tap=NAME[,mac=XX:XX:XX:XX:XX:XX]; repeat for more.
    #[arg(long, value_name = "SPEC")]
    #[serde(default)]
    pub net: Vec<String>,
    /// virtio-vsock device: CID,uds=PATH.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// virtio-rng device.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub rng: Option<bool>,
    /// Guest serial console: stdio, null or a file to append to [default: stdio].
    #[arg(long, value_name = "stdio|null|PATH")]
    pub serial: Option<String>,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Settings as JSON (field names = long flag names); flags override it.
    #[arg(long, value_name = "FILE.json")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Resume a VM from a snapshot file instead of booting.
    #[arg(long, value_name = "SNAPSHOT")]
    pub restore: Option<PathBuf>,
    /// With --restore: read the whole RAM image and check its checksums before the VM runs.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub verify: Option<bool>,
    /// Wait for one live migration (tcp:HOST:PORT or unix:PATH), then run the VM.
    #[arg(long, value_name = "ADDR")]
    pub incoming: Option<String>,
    /// Shared secret file for tcp: migration.
    #[arg(long, value_name = "FILE")]
    pub migration_key: Option<PathBuf>,
    /// Per-thread system call filters: on kills the VMM on a call outside its allowlist
    /// (SIGSYS), log only logs it [default: on].
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "deserialize_choice")]
    pub seccomp: Option<SeccompChoice>,
}

impl RunOptions {
    /// Reads `--config FILE.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|source| Error::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|source| Error::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                reason: "config file larger than 1 MiB".into(),
            });
        }
        let options = Self::from_json(&text).map_err(|e| Error::bad_file(path, e))?;
        options
            .check_values()
            .map_err(|e| Error::bad_file(path, e))?;
        Ok(options)
    }

    /// Checks every value present on its own, as a boot request would (the mode-selecting
    /// settings aside): a config file's invalid value is an error even where a flag overrides
    /// it, not something a later edit of the command line uncovers.
    pub fn check_values(&self) -> Result<()> {
        let probe = RunOptions {
            kernel: Some(
                self.kernel
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/kernel")),
            ),
            restore: None,
            verify: None,
            incoming: None,
            migration_key: None,
            ..self.clone()
        };
        probe.into_request().map(|_| ())
    }

    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// `self` (a config file's settings) overridden by every flag present in `flags`, the
    /// `run` subcommand's matches; a list given on the command line replaces the file's list.
    /// clap knows which flags were given, so no field is named here.
    pub fn override_with(&mut self, flags: &clap::ArgMatches) -> Result<()> {
        use clap::FromArgMatches;
        self.update_from_arg_matches(flags)
            .map_err(|e| Error::Usage(e.to_string()))
    }

    /// Parses `run`'s flags alone, without the program and subcommand names (tests, fuzzing).
    pub fn parse_flags<I, T>(args: I) -> std::result::Result<clap::ArgMatches, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::augment_args(clap::Command::new("run").no_binary_name(true))
            .try_get_matches_from(args)
    }

    /// What to do: boot, restore or receive a migration. Checks every setting.
    pub fn into_request(self) -> Result<RunRequest> {
        let backend = self.backend.unwrap_or_default();
        let serial = match &self.serial {
            Some(s) => SerialConfig::parse(s)?,
            None => SerialConfig::Stdio,
        };
        // `None`: not given (a restored or arriving VM keeps the mode it had).
        let seccomp = self.seccomp.map(|c| c.0);
        let runtime = RuntimeOptions {
            backend,
            serial,
            api_socket: self.api_socket.clone(),
            seccomp,
        };
        let verify = self.verify.unwrap_or(false);
        if verify && self.restore.is_none() {
            return Err(Error::Usage("--verify is only used with --restore".into()));
        }
        if self.restore.is_some() && self.incoming.is_some() {
            return Err(Error::Usage(
                "--restore and --incoming cannot be used together".into(),
            ));
        }
        if self.restore.is_some() || self.incoming.is_some() {
            let boot_only = [
                ("--kernel", self.kernel.is_some()),
                ("--initrd", self.initrd.is_some()),
                ("--cmdline", self.cmdline.is_some()),
                ("--cpus", self.cpus.is_some()),
                ("--memory", self.memory.is_some()),
                ("--cpu-model", self.cpu_model.is_some()),
                ("--disk", !self.disk.is_empty()),
                ("--net", !self.net.is_empty()),
                ("--vsock", self.vsock.is_some()),
                ("--rng", self.rng.is_some()),
            ];
            let mode = if self.restore.is_some() {
                "--restore"
            } else {
                "--incoming"
            };
            if let Some((flag, _)) = boot_only.iter().find(|(_, set)| *set) {
                return Err(Error::Usage(format!(
                    "{flag} cannot be used with {mode} (the VM brings its own config)"
                )));
            }
            if let Some(snapshot) = self.restore {
                if self.migration_key.is_some() {
                    return Err(Error::Usage(
                        "--migration-key is only used with --incoming".into(),
                    ));
                }
                return Ok(RunRequest::Restore {
                    snapshot,
                    runtime,
                    verify,
                });
            }
            let from = self.incoming.unwrap_or_default();
            return Ok(RunRequest::Incoming {
                from,
                migration_key: self.migration_key,
                runtime,
            });
        }
        if self.migration_key.is_some() {
            return Err(Error::Usage(
                "--migration-key is only used with --incoming".into(),
            ));
        }
        let kernel = self
            .kernel
            .ok_or_else(|| Error::Usage("--kernel is required".into()))?;
        let cpus = self.cpus.unwrap_or(DEFAULT_CPUS);
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(Error::Usage(format!(
                "invalid --cpus {cpus}: must be 1 to {MAX_CPUS}"
            )));
        }
        let memory = match &self.memory {
            Some(m) => m.bytes()?,
            None => DEFAULT_MEMORY,
        };
        if memory == 0 {
            return Err(Error::Usage("invalid --memory: must not be 0".into()));
        }
        if memory % hv::PAGE_SIZE != 0 {
            return Err(Error::Usage(
                "invalid --memory: must be a multiple of 4K".into(),
            ));
        }
        if memory > MAX_MEMORY {
            return Err(Error::Usage(
                "invalid --memory: at most 1024G is supported".into(),
            ));
        }
        let cpu_model = self.cpu_model.map(CpuModelChoice::from).unwrap_or_default();
        let cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.contains('\0') {
            return Err(Error::Usage("--cmdline must not contain NUL".into()));
        }
        if let Some(c) = cmdline.chars().find(|c| c.is_control()) {
            return Err(Error::Usage(format!(
                "--cmdline must not contain control characters (found {:?})",
                c
            )));
        }
        Ok(RunRequest::Boot(VmConfig {
            kernel,
            initrd: self.initrd,
            cmdline,
            cpus,
            memory,
            backend,
            cpu_model,
            disks: self
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_>>()?,
            nets: self
                .net
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_>>()?,
            vsock: self.vsock.as_deref().map(VsockConfig::parse).transpose()?,
            rng: self.rng.unwrap_or(false),
            serial: runtime.serial,
            api_socket: runtime.api_socket,
            seccomp: runtime.seccomp.unwrap_or_default(),
        }))
    }
}

/// Settings that belong to this VMM process, not to the VM, so a restored or arriving VM takes
/// them from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub backend: BackendChoice,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
    /// `--seccomp`; `None`: a booted VM gets the default mode, a restored or arriving one keeps
    /// the mode it ran with.
    pub seccomp: Option<sandbox::SeccompMode>,
}

/// What `anyvisor run` was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunRequest {
    Boot(VmConfig),
    Restore {
        snapshot: PathBuf,
        runtime: RuntimeOptions,
        /// Check the snapshot's RAM image against its checksums before running.
        verify: bool,
    },
    Incoming {
        from: String,
        migration_key: Option<PathBuf>,
        runtime: RuntimeOptions,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256").unwrap(), 256 * MIB);
        assert_eq!(parse_size("256M").unwrap(), 256 * MIB);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in [
            "1GiB",
            "1GB",
            "256MB",
            "256mib",
            "512KB",
            "512kib",
            "",
            "G",
            "-1",
            "1.5G",
            "12X",
            "1T",
            "4 G G",
            "99999999999999999999",
            "17179869184G",
            "0x10",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{bad}");
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        }
    }

    fn boot(opts: RunOptions) -> Result<VmConfig> {
        match opts.into_request()? {
            RunRequest::Boot(c) => Ok(c),
            other => panic!("not a boot: {other:?}"),
        }
    }

    fn kernel_only() -> RunOptions {
        RunOptions {
            kernel: Some("/k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = boot(kernel_only()).unwrap();
        assert_eq!(c.cpus, 1);
        assert_eq!(c.memory, 256 * MIB);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.cpu_model, CpuModelChoice::Portable);
        assert_eq!(c.serial, SerialConfig::Stdio);
        assert!(!c.rng);
    }

    #[test]
    fn invalid_values() {
        let cases = [
            RunOptions::default(),
            RunOptions {
                cpus: Some(0),
                ..kernel_only()
            },
            RunOptions {
                memory: Some(SizeValue::Text("0".into())),
                ..kernel_only()
            },
            RunOptions {
                memory: Some(SizeValue::Mib(0)),
                ..kernel_only()
            },
            RunOptions {
                memory: Some(SizeValue::Text("1001K".into())),
                ..kernel_only()
            },
            RunOptions {
                disk: vec!["/d,readonly=maybe".into()],
                ..kernel_only()
            },
            RunOptions {
                net: vec!["tap=t0,mac=zz:00:00:00:00:00".into()],
                ..kernel_only()
            },
            RunOptions {
                net: vec!["tap=t0,mac=ff:ff:ff:ff:ff:ff".into()],
                ..kernel_only()
            },
            RunOptions {
                cmdline: Some("console=ttyS0\ninit=/bin/sh".into()),
                ..kernel_only()
            },
            RunOptions {
                cmdline: Some("console=ttyS0\x1b[2J".into()),
                ..kernel_only()
            },
            RunOptions {
                memory: Some(SizeValue::Text("256MB".into())),
                ..kernel_only()
            },
            RunOptions {
                vsock: Some("2,uds=/v".into()),
                ..kernel_only()
            },
            RunOptions {
                restore: Some("/s".into()),
                ..kernel_only()
            },
        ];
        for c in cases {
            let e = c.clone().into_request().unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE, "{c:?}");
        }
    }

    #[test]
    fn config_values_are_checked_even_when_overridden() {
        for bad in [
            r#"{"memory":"256MB"}"#,
            r#"{"cpus":0}"#,
            r#"{"net":["tap=t0,mac=ff:ff:ff:ff:ff:ff"]}"#,
            r#"{"cmdline":"a\u0007b"}"#,
        ] {
            let file = RunOptions::from_json(bad).unwrap();
            let e = file.check_values().unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE, "{bad}: {e}");
        }
        // A wrong choice name is refused as the file is read, as a wrong flag value would be.
        for (bad, message) in [
            (
                r#"{"backend":"xen"}"#,
                "invalid backend 'xen' (expected kvm, emu or auto)",
            ),
            (
                r#"{"cpu-model":"fast"}"#,
                "invalid cpu model 'fast' (expected portable, portable-v3, portable-v2 or host)",
            ),
            (
                r#"{"seccomp":"yes"}"#,
                "invalid seccomp mode 'yes' (expected off, log or on)",
            ),
        ] {
            let e = RunOptions::from_json(bad).unwrap_err().to_string();
            assert!(e.starts_with(message), "{bad}: {e}");
        }
        // `config` is a flag, not a setting of the file.
        assert!(RunOptions::from_json(r#"{"config":"/other.json"}"#).is_err());
        let good = RunOptions::from_json(
            r#"{"memory":"1G","cpus":2,"restore":"/s","backend":"emu","cpu-model":"portable-v3",
                "seccomp":"log"}"#,
        )
        .unwrap();
        assert_eq!(good.backend, Some(BackendChoice::Emu));
        assert_eq!(good.cpu_model, Some(CpuModelName::PortableV3));
        assert_eq!(good.seccomp, Some(SeccompChoice(sandbox::SeccompMode::Log)));
        good.check_values().unwrap();
    }

    #[test]
    fn config_file_and_merge() {
        let file = RunOptions::from_json(
            r#"{"kernel":"/file-k","cpus":4,"memory":"1G","cpu-model":"portable",
                "disk":["/a.img"],"serial":"null","api-socket":"/tmp/s","rng":true}"#,
        )
        .unwrap();
        let merged = |flags: &[&str]| {
            let mut options = file.clone();
            options
                .override_with(&RunOptions::parse_flags(flags).unwrap())
                .unwrap();
            options
        };
        // No flag: the file as it is.
        assert_eq!(merged(&[]), file);
        let c = boot(merged(&["--cpus", "2", "--memory", "512"])).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/file-k"));
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 512 * MIB);
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.serial, SerialConfig::Null);
        assert_eq!(c.api_socket, Some(PathBuf::from("/tmp/s")));
        assert!(c.rng);
        // Flags that take no value, and choices.
        let o = merged(&["--backend", "kvm", "--cpu-model", "host", "--verify"]);
        assert_eq!(o.backend, Some(BackendChoice::Kvm));
        assert_eq!(o.cpu_model, Some(CpuModelName::Host));
        assert_eq!((o.rng, o.verify), (Some(true), Some(true)));
        assert_eq!(
            RunOptions::parse_flags(["--rng"])
                .map(|m| m.contains_id("rng"))
                .ok(),
            Some(true)
        );
        assert!(RunOptions::parse_flags(["--rng=false"]).is_err());
        assert!(RunOptions::parse_flags(["--backend", "xen"]).is_err());
        // Lists on the command line replace the file's.
        let c = boot(merged(&[
            "--disk",
            "/b.img,readonly=on,format=qcow2",
            "--disk",
            "/c.img",
        ]))
        .unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/b.img"));
        assert!(c.disks[0].readonly);
        assert_eq!(c.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(c.disks.len(), 2);
        // A number in the file is MiB.
        let c = boot(RunOptions::from_json(r#"{"kernel":"/k","memory":64}"#).unwrap()).unwrap();
        assert_eq!(c.memory, 64 * MIB);
        // Unknown fields and wrong types are rejected.
        assert!(RunOptions::from_json(r#"{"kernal":"/k"}"#).is_err());
        assert!(RunOptions::from_json(r#"{"cpus":"two"}"#).is_err());
        assert!(RunOptions::from_json(r#"{"cpus":-1}"#).is_err());
        assert!(RunOptions::from_json("[").is_err());
    }

    #[test]
    fn device_options() {
        let n = NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(NetConfig::parse("mac=52:54:00:12:34:56").is_err());
        assert!(NetConfig::parse("tap=t,mac=52:54:00:12:34").is_err());
        assert!(NetConfig::parse("tap=t,mac=52:54:00:12:34:56:78").is_err());
        for group in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
        ] {
            let e = NetConfig::parse(&format!("tap=t,mac={group}")).unwrap_err();
            assert!(e.to_string().contains("multicast or broadcast"), "{e}");
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        }
        // Locally administered unicast is fine.
        assert!(NetConfig::parse("tap=t,mac=02:00:00:00:00:01").is_ok());
        let v = VsockConfig::parse("3,uds=/tmp/v").unwrap();
        assert_eq!(v.cid, 3);
        assert!(VsockConfig::parse("3").is_err());
        assert!(VsockConfig::parse("x,uds=/v").is_err());
        assert!(DiskConfig::parse(",readonly=on").is_err());
        assert!(!DiskConfig::parse("/d").unwrap().backing);
        assert!(DiskConfig::parse("/d,backing=on").unwrap().backing);
        assert!(!DiskConfig::parse("/d,backing=off").unwrap().backing);
        assert!(DiskConfig::parse("/d,backing=maybe").is_err());
        assert!(DiskConfig::parse("/d,format=vmdk2").is_err());
        for (name, f) in [
            ("vmdk", DiskFormat::Vmdk),
            ("vhd", DiskFormat::Vhd),
            ("vpc", DiskFormat::Vhd),
            ("vhdx", DiskFormat::Vhdx),
            ("vdi", DiskFormat::Vdi),
        ] {
            let d = DiskConfig::parse(&format!("/d,readonly=on,format={name}")).unwrap();
            assert_eq!(d.format, Some(f));
        }
    }

    #[test]
    fn restore_and_incoming() {
        let r = RunOptions {
            restore: Some("/snap".into()),
            serial: Some("null".into()),
            ..Default::default()
        }
        .into_request()
        .unwrap();
        assert!(matches!(r, RunRequest::Restore { verify: false, .. }));
        let r = RunOptions {
            restore: Some("/snap".into()),
            verify: Some(true),
            ..Default::default()
        }
        .into_request()
        .unwrap();
        assert!(matches!(r, RunRequest::Restore { verify: true, .. }));
        let e = RunOptions {
            verify: Some(true),
            ..kernel_only()
        }
        .into_request()
        .unwrap_err();
        assert_eq!(e.to_string(), "--verify is only used with --restore");
        let r = RunOptions {
            incoming: Some("unix:/tmp/m".into()),
            migration_key: Some("/key".into()),
            ..Default::default()
        }
        .into_request()
        .unwrap();
        assert!(matches!(r, RunRequest::Incoming { .. }));
        assert!(
            RunOptions {
                migration_key: Some("/key".into()),
                ..kernel_only()
            }
            .into_request()
            .is_err()
        );
    }
}
