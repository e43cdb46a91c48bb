//! The host side of the guest's serial console: where its output goes and where its input comes
//! from.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::config::SerialConfig;
use crate::error::{Error, Result};

/// Ctrl-A: the escape key on a terminal; Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;

/// Writes every chunk through at once: a guest prompt has no newline to wait for. Host write
/// errors (a closed pipe, a full disk) never reach the guest's UART.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf).and_then(|()| self.0.flush());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// What Linux prints first when its kernel panics (`panic()` in kernel/panic.c).
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept for the panic check; a longer line is checked on its first part.
const LINE_MAX: usize = 512;

/// Passes guest serial output through and watches it for the kernel's panic line, which it
/// records with [`crate::control::Control::note_panic`]: a guest that panics and then resets
/// (`panic=-1`) or halts must not look like one that rebooted or powered off on purpose.
///
/// The console is the one panic signal every backend and every Linux guest gives without a
/// driver (a pvpanic device needs its module loaded in the guest); it needs the kernel console on
/// ttyS0 (`console=ttyS0`, the default command line). Only the guest kernel or root can write
/// the console, and either can end the VM anyway, so a forged line fools nobody that matters.
pub struct PanicWatch {
    inner: Box<dyn Write + Send>,
    control: Arc<crate::control::Control>,
    line: Vec<u8>,
}

impl PanicWatch {
    pub fn new(inner: Box<dyn Write + Send>, control: Arc<crate::control::Control>) -> Self {
        PanicWatch {
            inner,
            control,
            line: Vec::with_capacity(128),
        }
    }

    fn end_line(&mut self) {
        if let Some(at) = self
            .line
            .windows(PANIC_MARK.len())
            .position(|w| w == PANIC_MARK)
        {
            let rest = self.line.get(at + PANIC_MARK.len()..).unwrap_or_default();
            let what = String::from_utf8_lossy(rest);
            let what = what.trim_start_matches(':').trim();
            let what = if what.is_empty() {
                "no reason given"
            } else {
                what
            };
            self.control.note_panic(what.to_string());
        }
        self.line.clear();
    }
}

impl Write for PanicWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' | b'\r' => self.end_line(),
                _ if self.line.len() < LINE_MAX => self.line.push(b),
                _ => {}
            }
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The sink for guest serial output.
pub fn output(config: &SerialConfig) -> Result<Box<dyn Write + Send>> {
    Ok(match config {
        SerialConfig::Stdio => Box::new(Unbuffered(std::io::stdout())),
        SerialConfig::Null => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(Unbuffered(open_append(path)?)),
    })
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::OpenOutput {
            path: path.to_path_buf(),
            source,
        })
}

/// What the stdin reader does with what it reads.
pub trait InputSink: Send + Sync {
    /// Bytes for the guest.
    fn input(&self, bytes: &[u8]);
    /// The user typed the quit escape.
    fn quit(&self);
}

/// Starts forwarding host stdin to the guest, for `--serial stdio`. A terminal is put in raw
/// mode (restored by [`crate::exit::cleanup`]); on a terminal Ctrl-A x ends the VM. End of input
/// (or `/dev/null`) just stops the reader.
///
/// The reader thread installs the [`sandbox::ThreadRole::Device`] filter before its first read.
pub fn spawn_stdin_reader(sink: Arc<dyn InputSink>, seccomp: sandbox::SeccompMode) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    if tty && !in_foreground() {
        // A background job must not touch the terminal: changing its mode or reading from it
        // would stop the whole VMM (SIGTTOU/SIGTTIN). The guest then gets no console input.
        return Ok(());
    }
    if tty {
        crate::exit::set_terminal_raw().map_err(|source| Error::Io {
            op: "cannot put the terminal in raw mode",
            source,
        })?;
    }
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            if let Err(e) = sandbox::install(sandbox::ThreadRole::Device, seccomp) {
                tracing::warn!(
                    target: hv::NOTICE,
                    "anyvisor: console input disabled: {}",
                    crate::error::report(&e)
                );
                return;
            }
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            let mut escape = EscapeFilter::default();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                if !tty {
                    sink.input(&buf[..n]);
                    continue;
                }
                let (out, quit) = escape.filter(&buf[..n]);
                if !out.is_empty() {
                    sink.input(&out);
                }
                if quit {
                    sink.quit();
                    return;
                }
            }
        })
        .map_err(|source| Error::Io {
            op: "cannot start the serial input thread",
            source,
        })?;
    Ok(())
}

/// Whether this process is in the foreground process group of its controlling terminal,
/// from `/proc/self/stat` (`pgrp` and `tpgid`). Unknown counts as foreground.
fn in_foreground() -> bool {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| foreground_from_stat(&stat))
        .unwrap_or(true)
}

fn foreground_from_stat(stat: &str) -> Option<bool> {
    // The command name (field 2) is in parentheses and may contain anything, so count fields
    // from the last ')': state ppid pgrp session tty_nr tpgid ...
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let pgrp: i64 = fields.get(2)?.parse().ok()?;
    let tpgid: i64 = fields.get(5)?.parse().ok()?;
    Some(tpgid == pgrp)
}

/// Recognizes the Ctrl-A escapes in terminal input.
#[derive(Default)]
struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// The bytes to forward, and whether the quit escape was typed.
    fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => {
                        out.push(ESCAPE);
                        out.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(f.filter(b"a\x01\x01b"), (b"a\x01b".to_vec(), false));
        assert_eq!(f.filter(b"a\x01"), (b"a".to_vec(), false));
        assert_eq!(f.filter(b"x"), (vec![], true));
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"\x01c"), (b"\x01c".to_vec(), false));
    }

    #[test]
    fn foreground_detection() {
        let fg = "4242 (any visor) R 1 4242 4242 34816 4242 4194304 0";
        assert_eq!(foreground_from_stat(fg), Some(true));
        let bg = "4242 (a) b (c)) S 1 4242 4242 34816 5000 4194304 0";
        assert_eq!(foreground_from_stat(bg), Some(false));
        assert_eq!(foreground_from_stat("garbage"), None);
        assert_eq!(foreground_from_stat("1 (x) S 1"), None);
    }

    #[test]
    fn file_output_appends() {
        let path = std::env::temp_dir().join(format!("anyvisor-serial-{}", std::process::id()));
        std::fs::write(&path, b"old\n").unwrap();
        let mut out = output(&SerialConfig::File(path.clone())).unwrap();
        out.write_all(b"new").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew");
        let _ = std::fs::remove_file(&path);
        let e = output(&SerialConfig::File("/nonexistent/dir/x".into()))
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
    }

    #[test]
    fn panic_line_is_noticed_across_writes() {
        let ctl = Arc::new(crate::control::Control::new(1));
        let mut w = PanicWatch::new(Box::new(std::io::sink()), ctl.clone());
        w.write_all(b"[    1.0] Kernel panic - not sync").unwrap();
        assert!(ctl.panicked().is_none(), "only whole lines count");
        w.write_all(b"ing: VFS: Unable to mount root fs\r\n[ 1.1] more\n")
            .unwrap();
        assert_eq!(
            ctl.panicked().as_deref(),
            Some("VFS: Unable to mount root fs")
        );
        let ctl = Arc::new(crate::control::Control::new(1));
        let mut w = PanicWatch::new(Box::new(std::io::sink()), ctl.clone());
        w.write_all(b"the kernel did not panic\n").unwrap();
        w.write_all(&[b'x'; 2 * LINE_MAX]).unwrap();
        w.write_all(b"Kernel panic - not syncing: late\n").unwrap();
        assert!(
            ctl.panicked().is_none(),
            "past the kept part of a long line"
        );
        w.write_all(b"Kernel panic - not syncing\n").unwrap();
        assert_eq!(ctl.panicked().as_deref(), Some("no reason given"));
    }
}
