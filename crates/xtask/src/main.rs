//! `cargo xtask bench ...`: anyvisor measured side by side with QEMU 7.2 in one run, printed as
//! Markdown tables. See docs/benchmarks.md.

mod blk;
mod boot;
mod control;
mod cpu;
mod hotloop;
mod migrate;
mod mips;
mod procmem;
mod serial;
mod snapshot;
mod soak;
mod table;
mod vmproc;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "anyvisor project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Benchmarks against QEMU; each prints a Markdown table.
    #[command(subcommand)]
    Bench(Bench),
    /// One VM with memory and disk workloads moved kvm <-> emu many times (docs/benchmarks.md, "Soak").
    Soak(soak::SoakArgs),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Time to ANYVISOR-INIT-OK and to exit after poweroff, and VMM memory overhead.
    Boot(Common),
    /// Guest instruction rate of the emu backend.
    EmuMips(Common),
    /// Snapshot time, file size and restore-to-running time (256 MiB and 2 GiB guests).
    Snapshot(Common),
    /// Live migration of a 512 MiB guest running memwork.
    Migrate(Common),
    /// virtio-blk sequential MB/s and 4 KiB random-read IOPS inside the guest.
    Blk(Common),
    /// An AVX2/SHA user-mode workload in the Debian guest: emu, kvm (hybrid), QEMU TCG -cpu max.
    Cpu(Common),
    /// Guest instructions per second in two bignum-style hot loops (add_n, addmul_1).
    Hotloop(Common),
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// anyvisor binary [default: build `cli` in release mode and use it].
    #[arg(long, value_name = "PATH")]
    anyvisor: Option<PathBuf>,
    /// QEMU system emulator.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest kit directory (bzImage, vmlinux, initramfs.cpio.gz) [default: guest/out].
    #[arg(long, value_name = "DIR")]
    kit: Option<PathBuf>,
    /// Give up on one guest run after this many seconds and report "timeout".
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Runs per configuration (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 1)]
    runs: u32,
    /// anyvisor backends, comma-separated; `none` for QEMU only [default: emu,kvm for boot,
    /// emu for emu-mips, kvm otherwise].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    backends: Vec<String>,
    /// Skip QEMU runs.
    #[arg(long)]
    no_qemu: bool,
    /// Do not add `tsc_early_khz=<host kHz>` to QEMU TCG guests' command line.
    #[arg(long)]
    no_tsc_hint: bool,
    /// hv-emu's `boot` example binary for emu-mips [default: build it].
    #[arg(long, value_name = "PATH")]
    emu_example: Option<PathBuf>,
    /// Scratch directory for sockets, snapshots and disk images [default: TARGET/xtask-bench].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
}

/// Everything a benchmark needs, resolved.
pub struct Setup {
    pub anyvisor: PathBuf,
    pub qemu: PathBuf,
    pub kit: PathBuf,
    pub timeout_secs: u64,
    pub runs: u32,
    pub backends: Vec<String>,
    pub qemu_enabled: bool,
    /// Host TSC kHz handed to QEMU TCG guests (`tsc_early_khz=`).
    pub qemu_tsc_khz: Option<u64>,
    pub work: PathBuf,
    pub emu_example: Option<PathBuf>,
}

impl Setup {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout()
    }

    pub fn kernel(&self, name: &str) -> PathBuf {
        self.kit.join(name)
    }

    pub fn initrd(&self) -> PathBuf {
        self.kit.join("initramfs.cpio.gz")
    }

    /// A fresh path in the scratch directory (old file removed).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.work.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }
}

/// Kernel command line of every benchmark guest.
pub fn cmdline(test: &str) -> String {
    let mut c = "console=ttyS0 quiet reboot=k panic=-1".to_string();
    if !test.is_empty() {
        c.push_str(" anyvisor.test=");
        c.push_str(test);
    }
    c
}

/// `anyvisor run` arguments for a kernel boot.
pub fn anyvisor_args(
    setup: &Setup,
    backend: &str,
    kernel: &str,
    mem_mib: u64,
    append: &str,
) -> Vec<String> {
    vec![
        "run".into(),
        "--backend".into(),
        backend.into(),
        "--kernel".into(),
        setup.kernel(kernel).display().to_string(),
        "--initrd".into(),
        setup.initrd().display().to_string(),
        "--cmdline".into(),
        append.into(),
        "--memory".into(),
        format!("{mem_mib}M"),
        "--serial".into(),
        "stdio".into(),
    ]
}

/// Host TSC rate in kHz from `/proc/cpuinfo` (`cpu MHz`).
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// QEMU microvm arguments for a kernel boot. Under TCG the guest gets `tsc_early_khz=` when
/// known: without it the kernel calibrates its TSC against the PIT, which fails on a loaded
/// host and then hangs the boot.
pub fn qemu_args(
    setup: &Setup,
    accel: &str,
    kernel: &str,
    mem_mib: u64,
    append: &str,
) -> Vec<String> {
    let append = match setup.qemu_tsc_khz {
        Some(khz) if accel == "tcg" => format!("{append} tsc_early_khz={khz}"),
        _ => append.to_string(),
    };
    [
        "-M",
        "microvm,pit=on,pic=on,rtc=on",
        "-accel",
        accel,
        "-m",
        &mem_mib.to_string(),
        "-nographic",
        "-no-reboot",
        "-kernel",
        &setup.kernel(kernel).display().to_string(),
        "-initrd",
        &setup.initrd().display().to_string(),
        "-append",
        &append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// `cargo build --release -p PKG [extra]`; returns whether it succeeded.
pub fn cargo_build(pkg: &str, extra: &[&str]) -> Result<(), String> {
    eprintln!("[xtask] cargo build --release -p {pkg} {}", extra.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "-p", pkg])
        .args(extra)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo build -p {pkg} failed ({st})"))
    }
}

fn setup(c: &Common, default_backends: &[&str]) -> Result<Setup, String> {
    let root = workspace_root();
    let target = target_dir(&root);
    let anyvisor = match &c.anyvisor {
        Some(p) => p.clone(),
        None => {
            cargo_build("cli", &[])?;
            target.join("release/anyvisor")
        }
    };
    if !anyvisor.is_file() {
        return Err(format!("{}: no such anyvisor binary", anyvisor.display()));
    }
    let kit = c.kit.clone().unwrap_or_else(|| root.join("guest/out"));
    for f in ["bzImage", "vmlinux", "initramfs.cpio.gz"] {
        if !kit.join(f).is_file() {
            return Err(format!(
                "{}: missing (run guest/build-kit.sh)",
                kit.join(f).display()
            ));
        }
    }
    let work = c
        .workdir
        .clone()
        .unwrap_or_else(|| target.join("xtask-bench"));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let backends = if c.backends.is_empty() {
        default_backends.iter().map(|s| s.to_string()).collect()
    } else {
        c.backends
            .iter()
            .filter(|b| *b != "none")
            .cloned()
            .collect()
    };
    Ok(Setup {
        anyvisor,
        qemu: c.qemu.clone(),
        kit,
        timeout_secs: c.timeout,
        runs: c.runs.max(1),
        backends,
        qemu_enabled: !c.no_qemu,
        qemu_tsc_khz: if c.no_tsc_hint {
            None
        } else {
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| host_tsc_khz(&t))
        },
        work,
        emu_example: c.emu_example.clone(),
    })
}

/// Prints the report header common to every benchmark.
pub fn print_header(title: &str, setup: &Setup) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("## {title}\n");
    println!(
        "{date}; host {}; {cpu}, {cores} cores; load {}; runs per configuration: {}; timeout {} s\n",
        host.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        setup.runs,
        setup.timeout_secs
    );
}

/// Prints the command lines used, as a list.
pub fn print_commands(cmds: &[(String, String)]) {
    println!("\nCommand lines:\n");
    for (label, cl) in cmds {
        println!("- {label}: `{cl}`");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bench = match cli.command {
        Top::Bench(b) => b,
        Top::Soak(a) => return soak::main(&a),
    };
    let result = match &bench {
        Bench::Boot(c) => setup(c, &["emu", "kvm"]).map(|s| boot::run(&s)),
        Bench::EmuMips(c) => setup(c, &["emu"]).map(|s| mips::run(&s)),
        Bench::Snapshot(c) => setup(c, &["kvm"]).map(|s| snapshot::run(&s)),
        Bench::Migrate(c) => setup(c, &["kvm"]).map(|s| migrate::run(&s)),
        Bench::Blk(c) => setup(c, &["kvm"]).map(|s| blk::run(&s)),
        Bench::Cpu(c) => setup(c, &["emu", "kvm"]).map(|s| cpu::run(&s)),
        Bench::Hotloop(c) => setup(c, &["emu", "kvm"]).map(|s| hotloop::run(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_khz_from_cpuinfo() {
        let t = "processor\t: 0\ncpu MHz\t\t: 2596.128\nflags\t: fpu\n";
        assert_eq!(host_tsc_khz(t), Some(2_596_128));
        assert_eq!(host_tsc_khz("processor\t: 0\n"), None);
        assert_eq!(host_tsc_khz("cpu MHz\t: 0\n"), None);
    }
}
