//! Per-thread seccomp filters for the VMM's threads.
//!
//! Each thread of a running VM calls [`install`] with its [`ThreadRole`] once its setup is
//! done (files opened, sockets bound, memory mapped) and before it handles anything a guest or a
//! peer sends. From then on the thread may make only the system calls its role needs
//! ([`rules`] lists them, each with the reason); any other call kills the whole process with
//! `SIGSYS` in [`SeccompMode::On`] (the shell reports status 159 = 128 + 31), or is allowed and
//! logged by the kernel's audit log in [`SeccompMode::Log`].
//!
//! A filter applies to the calling thread and to threads it creates afterwards; filters only
//! add up, so a thread spawned by a filtered thread is bound by both its own filter and its
//! parent's. Roles that may spawn threads therefore allow what their children need.
//!
//! Two filters are installed per role: a first one makes `clone3` fail with `ENOSYS` (its flags
//! live in memory, out of a filter's reach), so that glibc falls back to `clone`, whose flags the
//! role filter checks: threads may be created by roles that need them, processes never.
//!
//! Where the VMM installs each role (everything a thread opens must be opened before):
//! * [`ThreadRole::Vcpu`]: first thing in each vCPU thread, before its run loop (the vCPU fd,
//!   its `kvm_run` mapping, the kick signal handler and the disk images already exist).
//! * [`ThreadRole::Device`]: first thing in the console-input thread (raw mode already set) and
//!   in each virtio device's worker (its disk image, tap, vsock listener and epoll set opened
//!   with the device, before).
//! * [`ThreadRole::Api`]: first thing in the API thread, before its accept loop. A `tcp:`
//!   migration started from here must get a numeric address: resolving a host name may load
//!   NSS modules (executable mappings), which the filter refuses.
//! * [`ThreadRole::Migration`]: first thing in the outgoing migration thread (`migrate-out`,
//!   spawned by the API connection that asked for it, so the Api filter applies too), after the
//!   address was parsed and the key file read.
//! * [`ThreadRole::IncomingMigration`]: first thing in the incoming migration thread
//!   (`migrate-in`, spawned by the main thread for each attempt), after the listening socket was
//!   bound and the key file read. The main thread builds the VM it asks for.
//! * [`ThreadRole::Main`]: on the main thread after the last thread was spawned, before it
//!   waits for the VM's end.

pub mod ioctl;
pub mod rules;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a thread does, which decides the system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// Runs one vCPU and the device emulation of its exits (MMIO/PIO, virtio registers). Device
    /// work (disk and socket I/O, activation) is the workers': a vCPU only signals them.
    Vcpu,
    /// A device's own worker (console input, virtio device workers): reads host input, processes
    /// virtio queues (disk I/O, tap reads and writes, vsock host connections: accepting,
    /// connecting, stream I/O) and raises guest interrupts.
    Device,
    /// Serves the control socket: pause, resume, info, snapshots (writes files), and spawns a
    /// migration thread.
    Api,
    /// Sends a live migration: the stream, the dirty log, pausing, throttling and resuming the
    /// VM, its final state.
    Migration,
    /// Receives a live migration: accepts one connection on the bound listener, authenticates
    /// it and writes the pages into guest memory. Everything else (the backend, the guest
    /// memory, starting the VM) the main thread does on its request: no KVM, no files, no
    /// threads here.
    IncomingMigration,
    /// The main thread once the VM runs: waits for the end, stops the vCPUs, cleans up, exits.
    Main,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 6] = [
        ThreadRole::Vcpu,
        ThreadRole::Device,
        ThreadRole::Api,
        ThreadRole::Migration,
        ThreadRole::IncomingMigration,
        ThreadRole::Main,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Device => "device",
            ThreadRole::Api => "api",
            ThreadRole::Migration => "migration",
            ThreadRole::IncomingMigration => "incoming-migration",
            ThreadRole::Main => "main",
        }
    }
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--seccomp off|log|on` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SeccompMode {
    /// No filter at all.
    Off,
    /// Calls outside the allowlist are allowed and logged by the kernel (audit type 1326,
    /// visible in `dmesg` or the audit log): for finding what a role is missing.
    Log,
    /// Calls outside the allowlist kill the process with `SIGSYS`.
    #[default]
    On,
}

impl SeccompMode {
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::On => "on",
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SeccompMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "on" => Ok(SeccompMode::On),
            other => Err(Error::BadMode(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown seccomp mode {0:?} (expected off, log or on)")]
    BadMode(String),
    #[error("cannot build the seccomp filter for {role} threads")]
    Build {
        role: ThreadRole,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter for {role} threads")]
    Install {
        role: ThreadRole,
        #[source]
        source: InstallError,
    },
}

/// A `seccompiler` install failure. Its message already contains its cause (`seccompiler::Error`
/// writes `"...: {cause}"` and also returns the cause as `source`), so this shows the message
/// alone and reports no source: an error chain then names the cause once.
#[derive(Debug)]
pub struct InstallError(pub seccompiler::Error);

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for InstallError {}

/// Restricts the calling thread (and threads it creates later) to `role`'s system calls.
/// [`SeccompMode::Off`] installs nothing. Installing twice only narrows: both filters apply.
pub fn install(role: ThreadRole, mode: SeccompMode) -> Result<(), Error> {
    for program in programs(role, mode)? {
        seccompiler::apply_filter(&program).map_err(|e| Error::Install {
            role,
            source: InstallError(e),
        })?;
    }
    Ok(())
}

/// The BPF programs [`install`] loads, in order (none for [`SeccompMode::Off`]).
pub fn programs(role: ThreadRole, mode: SeccompMode) -> Result<Vec<BpfProgram>, Error> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::KillProcess,
    };
    let build = |source| Error::Build { role, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;

    // clone3 → ENOSYS, everything else passes on to the role filter.
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(enosys),
        arch,
    )
    .map_err(build)?;
    let role_filter = SeccompFilter::new(
        rules::for_role(role).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    Ok(vec![
        BpfProgram::try_from(no_clone3).map_err(build)?,
        BpfProgram::try_from(role_filter).map_err(build)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_the_flag_values() {
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("on".parse::<SeccompMode>().unwrap(), SeccompMode::On);
        assert_eq!(SeccompMode::default(), SeccompMode::On);
        for bad in ["", "ON", "yes", "kill", "on "] {
            let e = bad.parse::<SeccompMode>().unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("unknown seccomp mode {bad:?} (expected off, log or on)")
            );
        }
        for m in [SeccompMode::Off, SeccompMode::Log, SeccompMode::On] {
            assert_eq!(m.to_string().parse::<SeccompMode>().unwrap(), m);
        }
    }

    #[test]
    fn every_role_compiles_and_off_compiles_to_nothing() {
        for role in ThreadRole::ALL {
            assert!(programs(role, SeccompMode::Off).unwrap().is_empty());
            for mode in [SeccompMode::Log, SeccompMode::On] {
                let p = programs(role, mode).unwrap();
                assert_eq!(p.len(), 2, "{role} {mode}");
                // The kernel refuses programs longer than BPF_MAXINSNS (4096).
                assert!(p.iter().all(|p| !p.is_empty() && p.len() <= 4096), "{role}");
            }
        }
    }
}
