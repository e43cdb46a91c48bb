//! Environment hooks that only tests use. They exist only in builds with the `test-hooks`
//! feature, which the cli crate's tests turn on through a dev-dependency; in every other build
//! (`cargo build --release -p cli`) these functions do nothing and the variables' names are not
//! even in the binary (`scripts/check-release-hooks.sh` checks both).
//!
//! | variable | effect |
//! |---|---|
//! | `ANYVISOR_TEST_PANIC` | the process panics on a worker thread at start (the panic hook's one-line report) |
//! | `ANYVISOR_TEST_FORBIDDEN_SYSCALL` | the API thread calls `getcwd`, outside its seccomp allowlist, right after installing its filter |
//! | `ANYVISOR_TEST_SLOW_START` | `run` waits up to 20 s (or until a termination signal) at its last checkpoint before the VM launches, as a long restore or disk read would |
//! | `ANYVISOR_KVM_DEVICE` | the KVM device node probed instead of `/dev/kvm` (a host without usable KVM) |

use std::path::PathBuf;

/// Makes the process panic on a worker thread, so tests can check that a panic ends as one
/// `error: internal error: ...` line and status 1.
#[cfg(feature = "test-hooks")]
pub const PANIC_ENV: &str = "ANYVISOR_TEST_PANIC";
/// Makes the API thread make a system call outside its seccomp allowlist (`getcwd`) right
/// after installing its filter: a test of what `--seccomp on` does to a violation.
#[cfg(feature = "test-hooks")]
pub const FORBIDDEN_SYSCALL_ENV: &str = "ANYVISOR_TEST_FORBIDDEN_SYSCALL";
/// Makes `run` wait at its last checkpoint before launching the VM, standing in for a slow
/// restore or disk read so tests can signal a `run` that has not launched yet.
#[cfg(feature = "test-hooks")]
pub const SLOW_START_ENV: &str = "ANYVISOR_TEST_SLOW_START";
/// Overrides the KVM device node probed before opening KVM.
#[cfg(feature = "test-hooks")]
pub const KVM_DEVICE_ENV: &str = "ANYVISOR_KVM_DEVICE";

/// Whether this build has the hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// Called first thing in `main`: the forced panic.
pub fn at_start() {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(PANIC_ENV).is_some() {
        // The deliberate panic of the test hook; no input reaches it.
        #[allow(clippy::panic)]
        let _ = std::thread::spawn(|| panic!("test panic\nsecond line")).join();
    }
}

/// Called by the API thread right after its seccomp filter is installed.
pub fn after_api_filter() {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(FORBIDDEN_SYSCALL_ENV).is_some() {
        let _ = std::env::current_dir();
    }
}

/// Called at `run`'s checkpoint before the VM launches, with a probe for a pending signal:
/// waits (up to 20 s) while none is pending. Says on stderr that it is waiting, so a test
/// knows when to send its signal.
pub fn before_launch(pending: impl Fn() -> bool) {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(SLOW_START_ENV).is_some() {
        eprintln!("test hook: waiting before the VM launches");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !pending() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = pending;
}

/// The KVM device node to probe instead of `/dev/kvm`, if a test set one.
pub fn kvm_device() -> Option<PathBuf> {
    #[cfg(feature = "test-hooks")]
    if let Some(v) = std::env::var_os(KVM_DEVICE_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    None
}
