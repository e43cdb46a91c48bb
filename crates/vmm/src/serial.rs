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
pub fn spawn_stdin_reader(sink: Arc<dyn InputSink>) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    if tty {
        crate::exit::set_terminal_raw().map_err(|source| Error::Io {
            op: "cannot put the terminal in raw mode",
            source,
        })?;
    }
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
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
}
