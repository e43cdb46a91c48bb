//! A VMM process under measurement: console lines with arrival times, stderr, exit, and memory
//! samples.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::procmem;
use crate::serial::{Line, LineSplitter};

/// stderr text that means the VMM is dead in the water even if the process lives on
/// (QEMU pauses the VM after a KVM internal error instead of exiting).
const FATAL_STDERR: &[&str] = &["KVM internal error", "emulation failure"];

/// Memory seen while the process ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemSample {
    /// Highest `VmHWM` seen (KiB).
    pub hwm_kb: u64,
    /// Resident KiB of the guest RAM mapping at the latest smaps sample.
    pub guest_rss_kb: Option<u64>,
}

/// Why a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// Index of the matching line.
    Found(usize),
    /// The process exited first.
    Exited,
    /// stderr showed a fatal error.
    Fatal(String),
    Timeout,
}

pub struct VmProc {
    child: Child,
    pub start: Instant,
    rx: Receiver<Line>,
    pub lines: Vec<Line>,
    stderr: Arc<Mutex<String>>,
    /// The thread collecting stderr: after the exit, its last bytes are awaited (briefly).
    stderr_reader: Option<thread::JoinHandle<()>>,
    pub exit: Option<(Duration, ExitStatus)>,
    guest_bytes: u64,
    pub mem: MemSample,
    last_smaps: Option<Instant>,
    last_status: Option<Instant>,
    /// Print console lines as they arrive.
    echo: bool,
}

impl VmProc {
    /// Starts `program args` with console (stdout) and stderr captured. Stdin is a pipe held open
    /// and never written: an idle guest's shell on the serial console would take end-of-file as
    /// `exit`, and the kit's init then powers off.
    /// `guest_bytes` is the guest RAM size used to find its mapping.
    pub fn spawn(program: &Path, args: &[String], guest_bytes: u64) -> std::io::Result<VmProc> {
        let start = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, rx) = mpsc::channel();
        if let Some(mut out) = child.stdout.take() {
            thread::spawn(move || {
                let mut split = LineSplitter::default();
                let mut buf = [0u8; 8192];
                loop {
                    match out.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let at = start.elapsed();
                            for text in split.feed(&buf[..n]) {
                                if tx.send(Line { at, text }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                if let Some(text) = split.finish() {
                    let _ = tx.send(Line {
                        at: start.elapsed(),
                        text,
                    });
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut stderr_reader = None;
        if let Some(mut err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            stderr_reader = Some(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock()
                        && s.len() < (1 << 20)
                    {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }));
        }
        Ok(VmProc {
            child,
            start,
            rx,
            lines: Vec::new(),
            stderr,
            stderr_reader,
            exit: None,
            guest_bytes,
            mem: MemSample::default(),
            last_smaps: None,
            last_status: None,
            echo: std::env::var_os("XTASK_ECHO").is_some(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `text` to the process's stdin: the guest's serial console input.
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin is not a pipe"))?;
        stdin.write_all(text.as_bytes())?;
        stdin.flush()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A one-line reason for a failure: the fatal stderr pattern, the `error:` line, the last
    /// stderr line, or the exit status.
    pub fn failure_reason(&self) -> String {
        let err = self.stderr_text();
        if let Some(l) = err
            .lines()
            .find(|l| FATAL_STDERR.iter().any(|p| l.contains(p)))
        {
            return l.trim().to_string();
        }
        if let Some(l) = err.lines().find(|l| l.contains("error")) {
            return l.trim().to_string();
        }
        if let Some(l) = err.lines().rev().find(|l| !l.trim().is_empty()) {
            return l.trim().to_string();
        }
        match self.exit {
            Some((_, st)) => format!("exited ({st})"),
            None => "no output".to_string(),
        }
    }

    /// Takes in console lines for up to `max`, notes an exit, and samples memory.
    fn pump(&mut self, max: Duration) {
        match self.rx.recv_timeout(max) {
            Ok(l) => self.push(l),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => thread::sleep(max),
        }
        while let Ok(l) = self.rx.try_recv() {
            self.push(l);
        }
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some((self.start.elapsed(), st));
                // Lines still in the pipe were written before the exit.
                while let Ok(l) = self.rx.recv_timeout(Duration::from_millis(50)) {
                    self.push(l);
                }
                self.settle_stderr();
            } else {
                self.sample(false);
            }
        }
    }

    /// After the exit: lets the stderr reader take the last bytes the process wrote (a loaded
    /// host may not have scheduled it yet), waiting at most 2 s in case a descendant still holds
    /// the pipe open.
    fn settle_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !reader.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }

    fn push(&mut self, l: Line) {
        if self.echo {
            eprintln!("[{:>8.3}] {}", l.at.as_secs_f64(), l.text);
        }
        self.lines.push(l);
    }

    /// Samples `VmHWM` every 100 ms and the guest RAM mapping every 500 ms (or now if `force`).
    pub fn sample(&mut self, force: bool) {
        let now = Instant::now();
        let due = |last: Option<Instant>, every: u64| {
            force || last.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(every))
        };
        let pid = self.pid();
        if due(self.last_status, 100) {
            self.last_status = Some(now);
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(s) = procmem::parse_status(&text)
            {
                self.mem.hwm_kb = self.mem.hwm_kb.max(s.hwm_kb);
            }
        }
        if self.guest_bytes > 0 && due(self.last_smaps, 500) {
            self.last_smaps = Some(now);
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
                let maps = procmem::parse_smaps(&text);
                if let Some(kb) = procmem::guest_ram_rss_kb(&maps, self.guest_bytes) {
                    self.mem.guest_rss_kb = Some(kb);
                }
            }
        }
    }

    fn fatal(&self) -> Option<String> {
        let err = self.stderr_text();
        err.lines()
            .find(|l| FATAL_STDERR.iter().any(|p| l.contains(p)))
            .map(|l| l.trim().to_string())
    }

    /// Waits for a console line at or after index `from` containing `marker`.
    pub fn wait_line(&mut self, from: usize, marker: &str, deadline: Instant) -> Wait {
        self.wait_any(from, &[marker], deadline)
    }

    /// Waits for a console line at or after index `from` containing any of `markers`.
    pub fn wait_any(&mut self, from: usize, markers: &[&str], deadline: Instant) -> Wait {
        let mut checked = from;
        loop {
            if let Some(i) = markers
                .iter()
                .filter_map(|m| crate::serial::find_marker(&self.lines, checked, m))
                .min()
            {
                self.sample(true);
                return Wait::Found(i);
            }
            checked = checked.max(self.lines.len());
            if self.exit.is_some() {
                return Wait::Exited;
            }
            if let Some(f) = self.fatal() {
                return Wait::Fatal(f);
            }
            if Instant::now() >= deadline {
                return Wait::Timeout;
            }
            self.pump(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit; returns when it did (relative to start).
    pub fn wait_exit(&mut self, deadline: Instant) -> Option<(Duration, ExitStatus)> {
        while self.exit.is_none() && Instant::now() < deadline {
            self.pump(Duration::from_millis(5));
        }
        self.exit
    }

    /// Keeps reading console output and sampling memory for `d`.
    pub fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while self.exit.is_none() && Instant::now() < end {
            self.pump(Duration::from_millis(20));
        }
    }

    /// Kills the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exit = Some((self.start.elapsed(), st));
                self.settle_stderr();
            }
        }
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a short control command; returns (wall time, exit success, stdout, stderr).
pub fn run_command(
    program: &Path,
    args: &[String],
    timeout: Duration,
) -> std::io::Result<(Duration, Option<ExitStatus>, String, String)> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok((elapsed, status, stdout, stderr))
}

/// Shell-quoted command line for the report.
pub fn command_line(program: &Path, args: &[String]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| {
            if a.is_empty()
                || a.chars()
                    .any(|c| c.is_whitespace() || "\"'$*;&|<>()".contains(c))
            {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let cl = command_line(
            Path::new("/bin/q"),
            &[
                "-append".into(),
                "console=ttyS0 quiet".into(),
                "it's".into(),
            ],
        );
        assert_eq!(cl, "/bin/q -append 'console=ttyS0 quiet' 'it'\\''s'");
    }

    #[test]
    fn waits_for_marker_and_exit_of_a_real_process() {
        let sh = Path::new("/bin/sh");
        let args = vec![
            "-c".to_string(),
            "echo one; sleep 0.1; printf 'ANYVISOR-INIT-OK\\r\\n'; echo oops >&2; exit 3".into(),
        ];
        let Ok(mut p) = VmProc::spawn(sh, &args, 0) else {
            panic!("cannot run /bin/sh");
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(p.wait_line(0, "ANYVISOR-INIT-OK", deadline), Wait::Found(1));
        let exit = p.wait_exit(deadline);
        assert_eq!(exit.map(|(_, s)| s.code()), Some(Some(3)));
        assert_eq!(p.wait_line(2, "ANYVISOR-INIT-OK", deadline), Wait::Exited);
        assert_eq!(p.failure_reason(), "oops");
    }

    #[test]
    fn timeout_and_fatal_stderr() {
        let sh = Path::new("/bin/sh");
        let Ok(mut p) = VmProc::spawn(sh, &["-c".into(), "sleep 5".into()], 0) else {
            panic!("cannot run /bin/sh");
        };
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(p.wait_line(0, "X", soon), Wait::Timeout);
        p.kill();
        let args = vec![
            "-c".to_string(),
            "echo 'KVM internal error. Suberror: 1' >&2; sleep 5".into(),
        ];
        let Ok(mut p) = VmProc::spawn(sh, &args, 0) else {
            panic!("cannot run /bin/sh");
        };
        let deadline = Instant::now() + Duration::from_secs(4);
        assert_eq!(
            p.wait_line(0, "X", deadline),
            Wait::Fatal("KVM internal error. Suberror: 1".into())
        );
    }
}
