//! The command line, exactly as the CLI spec names it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "anyvisor",
    version,
    about = "A VMM whose VMs are not tied to one hypervisor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    // The flags are `vmm::RunOptions`, the type a `--config` file is read into too.
    /// Start a VM (boot a kernel, restore a snapshot, or receive a migration).
    Run(Box<vmm::RunOptions>),
    /// Print a running VM's state as JSON.
    Info(ApiArgs),
    /// Pause a running VM.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Ask the guest to power off (ACPI power button), wait for it, then stop the VM.
    Shutdown(ShutdownArgs),
    /// Write a snapshot of a running VM.
    Snapshot(SnapshotArgs),
    /// Move a running VM to another anyvisor.
    Migrate(MigrateArgs),
    /// Print what a snapshot file holds as JSON.
    SnapshotInfo(SnapshotInfoArgs),
    /// Convert a VM of another hypervisor (OVA, OVF, .vmx, .vbox or a disk image) into qcow2
    /// disks and a config for `run --config`.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// OVA, OVF, VMware .vmx, VirtualBox .vbox, or a disk image.
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// Directory for the qcow2 disks and NAME.json (created if missing).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Overwrite files an earlier import wrote there.
    #[arg(long)]
    pub force: bool,
    /// The config gives NIC N the tap device PREFIXN [default: avtap].
    #[arg(long, value_name = "PREFIX")]
    pub tap_prefix: Option<String>,
    /// Read through the disks' backing files (qcow2) and VMDK extents outside the descriptor's
    /// directory, as `--disk ...,backing=on` does.
    #[arg(long)]
    pub backing: bool,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Seconds the guest has to power off after the power button; then the VM is stopped and
    /// `run` exits 1 [default: 30].
    #[arg(long, value_name = "SECONDS", conflicts_with = "force")]
    pub timeout: Option<u64>,
    /// Stop the VM at once, without asking the guest (`run` exits 0).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Snapshot file to write (atomically); a relative path is relative to this command's
    /// working directory.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// End the VM after the snapshot is written.
    #[arg(long)]
    pub stop: bool,
    /// Replace an existing regular file at --output (once the new snapshot is complete).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Destination: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// Shared secret file (required for tcp:).
    #[arg(long, value_name = "FILE")]
    pub migration_key: Option<PathBuf>,
    /// Longest acceptable pause of the guest.
    #[arg(long, value_name = "N")]
    pub max_downtime_ms: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SnapshotInfoArgs {
    /// Snapshot file.
    pub file: PathBuf,
    /// Also read the whole RAM image and check it against its checksums (per 2 MiB chunk).
    #[arg(long)]
    pub verify: bool,
}

/// The flag reference in `docs/cli.md`: `anyvisor --help` and every subcommand's `--help`, as
/// clap renders them from the definitions above (between the `BEGIN GENERATED` and
/// `END GENERATED` markers). The test `cli_reference_is_current` fails when the file is stale;
/// `ANYVISOR_UPDATE_DOCS=1 cargo test -p cli --release --bin anyvisor cli_reference` rewrites it.
#[cfg(test)]
pub fn reference_markdown() -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command().term_width(100);
    cmd.build();
    let mut out = String::new();
    let mut section = |title: &str, help: String| {
        out.push_str(&format!("### `{title}`\n\n```text\n"));
        for line in help.trim_end().lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push_str("```\n\n");
    };
    section("anyvisor --help", cmd.render_long_help().to_string());
    for sub in cmd.get_subcommands_mut() {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("anyvisor {} --help", sub.get_name());
        section(&name, sub.render_long_help().to_string());
    }
    out.trim_end().to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_reference_is_current() {
        const BEGIN: &str = "<!-- BEGIN GENERATED";
        const END: &str = "<!-- END GENERATED -->";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let begin = doc
            .find(BEGIN)
            .expect("no BEGIN GENERATED marker in docs/cli.md");
        let body = begin + doc[begin..].find("-->\n").unwrap() + 4;
        let end = doc
            .find(END)
            .expect("no END GENERATED marker in docs/cli.md");
        let current = &doc[body..end];
        let wanted = reference_markdown();
        if current != wanted {
            if std::env::var_os("ANYVISOR_UPDATE_DOCS").is_some() {
                let new = format!("{}{wanted}{}", &doc[..body], &doc[end..]);
                std::fs::write(&path, new).unwrap();
                return;
            }
            panic!(
                "docs/cli.md is stale: run ANYVISOR_UPDATE_DOCS=1 cargo test -p cli --release \
                 --bin anyvisor cli_reference"
            );
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("anyvisor").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "k",
            "--cpus",
            "2",
            "--memory",
            "4G",
            "--disk",
            "a",
            "--disk",
            "b,readonly=on",
            "--rng",
            "--cmdline",
            "-x console=ttyS0",
        ])
        .unwrap();
        let Command::Run(o) = cli.command else {
            panic!("not run")
        };
        assert_eq!(o.cpus, Some(2));
        assert_eq!(o.disk.len(), 2);
        assert_eq!(o.rng, Some(true));
        assert_eq!(o.cmdline.as_deref(), Some("-x console=ttyS0"));
        assert!(o.serial.is_none() && o.backend.is_none());
        assert!(parse(&["run", "--bogus"]).is_err());
        assert!(parse(&["run", "--backend", "xen"]).is_err());
        assert!(parse(&["run", "--cpus", "two"]).is_err());
        assert!(parse(&["info"]).is_err());
        assert!(parse(&["snapshot", "--api-socket", "s"]).is_err());
        assert!(parse(&["snapshot-info", "f"]).is_ok());
        let Command::Shutdown(a) = parse(&["shutdown", "--api-socket", "s", "--timeout", "5"])
            .unwrap()
            .command
        else {
            panic!("not shutdown")
        };
        assert_eq!((a.timeout, a.force), (Some(5), false));
        assert!(parse(&["shutdown", "--api-socket", "s", "--force"]).is_ok());
        assert!(parse(&["shutdown", "--api-socket", "s", "--force", "--timeout", "1"]).is_err());
        assert!(parse(&["shutdown", "--api-socket", "s", "--timeout", "-1"]).is_err());
        assert!(parse(&["import", "vm.ova", "--output", "d", "--force"]).is_ok());
        assert!(parse(&["import", "vm.ova"]).is_err());
        assert!(parse(&["migrate", "--api-socket", "s", "--to", "unix:/x"]).is_ok());
    }
}
