//! What must be undone however the process ends (normal exit, error, panic): the terminal's raw
//! mode and the API socket file. The CLI's panic hook calls [`cleanup`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::terminal::Terminal;

struct Pending {
    terminal_raw: bool,
    files: Vec<PathBuf>,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending {
    terminal_raw: false,
    files: Vec::new(),
});

fn with_pending(f: impl FnOnce(&mut Pending)) {
    // Never block or panic here: this also runs from the panic hook.
    match PENDING.try_lock() {
        Ok(mut p) => f(&mut p),
        Err(std::sync::TryLockError::Poisoned(e)) => f(&mut e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {}
    }
}

/// Puts the terminal on stdin in raw mode (no line editing, echo or signal keys) until
/// [`cleanup`] or [`restore_terminal`].
pub fn set_terminal_raw() -> std::io::Result<()> {
    std::io::stdin()
        .lock()
        .set_raw_mode()
        .map_err(std::io::Error::from)?;
    with_pending(|p| p.terminal_raw = true);
    Ok(())
}

/// Gives the terminal back its line mode if [`set_terminal_raw`] took it.
pub fn restore_terminal() {
    let mut was_raw = false;
    with_pending(|p| was_raw = std::mem::take(&mut p.terminal_raw));
    if was_raw {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Removes `path` at [`cleanup`] unless [`forget_file`] is called first.
pub fn remove_on_exit(path: &Path) {
    with_pending(|p| p.files.push(path.to_path_buf()));
}

pub fn forget_file(path: &Path) {
    with_pending(|p| p.files.retain(|f| f != path));
}

/// Restores the terminal and removes registered files. Safe to call more than once.
pub fn cleanup() {
    restore_terminal();
    let mut files = Vec::new();
    with_pending(|p| files = std::mem::take(&mut p.files));
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

/// The last termination signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one atomic store; the main thread polls it.
    SIGNAL.store(num, Ordering::Relaxed);
}

/// SIGTERM, SIGINT and SIGHUP end the VM in an orderly way (vCPUs stopped, terminal restored,
/// API socket removed) instead of killing the process where it stands.
pub fn install_signal_handlers() -> std::io::Result<()> {
    for num in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(num, on_signal)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// The termination signal received since the last call, if any.
pub fn take_signal() -> Option<i32> {
    match SIGNAL.swap(0, Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// A checkpoint before the VM runs: a termination signal received since the handlers were
/// installed (the `run` command installs them first thing) ends the command here, with its
/// one `error:` line, instead of launching a VM that would only be stopped again.
pub fn stop_if_signalled() -> crate::Result<()> {
    crate::test_hooks::before_launch(|| SIGNAL.load(Ordering::Relaxed) != 0);
    match take_signal() {
        Some(num) => Err(crate::Error::Signal(format!(
            "{} before the VM started",
            signal_name(num)
        ))),
        None => Ok(()),
    }
}

/// Puts back a signal taken by [`take_signal`] for the next taker (a receiver that took it
/// while its VM was being started leaves it to the running VM's main loop).
pub fn requeue_signal(num: i32) {
    let _ = SIGNAL.compare_exchange(0, num, Ordering::Relaxed, Ordering::Relaxed);
}

/// A signal's name for messages.
pub fn signal_name(num: i32) -> String {
    match num {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}
