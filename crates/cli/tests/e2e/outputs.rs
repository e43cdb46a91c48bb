//! Writing a snapshot never destroys what was at the output path (issue 15): device nodes,
//! FIFOs, sockets and directories are refused with one line and status 2; an existing file is
//! replaced only with `--force`; a client interrupted by SIGINT says truly whether the VMM
//! abandoned the snapshot (the old file as it was) or had completed it; relative paths are the
//! client's; temporaries of dead VMMs are removed.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use persist_harness::*;

fn snapshot(vm: &Vm, output: &str, extra: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(["snapshot", "--api-socket", vm.socket.to_str().unwrap()])
        .args(["--output", output])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn refused(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
    let errors = error_lines(out);
    assert_eq!(errors.len(), 1, "{what}: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{what}: {out:?}"
    );
}

fn valid(path: &Path) {
    snapshot::SnapshotReader::open(path)
        .unwrap()
        .verify_memory()
        .unwrap();
}

#[test]
fn snapshot_outputs_are_never_destroyed() {
    // The guest need not get far: only the VMM's side of snapshots is tested.
    let backend = "emu";
    if !fast_enough(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("outputs");
    // 2 GiB: scanning it takes long enough for a signal to arrive mid-snapshot.
    let mut args = boot_args(&kit, backend);
    let mem = args.iter().position(|a| a == "256M").unwrap();
    args[mem] = "2G".into();
    // Whatever the guest does (even a kernel panic: no panic=-1, so it waits), the VM stays.
    let cmdline = args.iter().position(|a| a == CMDLINE).unwrap();
    args[cmdline] = "console=ttyS0 quiet".into();
    let mut vm = Vm::spawn(&args, &dir.join("vm.serial"), &dir.join("vm.sock"));
    assert!(
        eventually(Duration::from_secs(60), || vm.socket.exists()),
        "{}",
        vm.diagnostics()
    );

    // Special files: refused, left as they were, nothing left beside them.
    let fifo = dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    for force in [&[][..], &["--force"][..]] {
        for target in ["/dev/null", fifo.to_str().unwrap(), sub.to_str().unwrap()] {
            let out = snapshot(&vm, target, force, &dir);
            refused(&out, target);
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
                "{out:?}"
            );
        }
    }
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);

    // A relative path is the client's, and the file did not exist: written. A dead VMM's
    // temporary of the same name is removed on the way.
    let stale = dir.join(".rel.snap.tmp-4194399");
    std::fs::write(&stale, b"left by a killed VMM").unwrap();
    let out = snapshot(&vm, "rel.snap", &[], &dir);
    assert!(out.status.success(), "{out:?} {}", vm.diagnostics());
    let rel = dir.join("rel.snap");
    valid(&rel);
    assert!(!stale.exists(), "a dead VMM's temporary file was kept");
    assert!(vm.is_running(), "{}", vm.diagnostics());

    // Existing file: refused without --force (unchanged), replaced with it.
    let before = std::fs::read(&rel).unwrap();
    let out = snapshot(&vm, "rel.snap", &[], &dir);
    refused(&out, "existing file");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&rel).unwrap(), before);
    let out = snapshot(&vm, "rel.snap", &["--force"], &dir);
    assert!(out.status.success(), "{out:?}");
    valid(&rel);

    // SIGINT at various moments of `snapshot --force` over an old file: one error line, and it
    // tells the truth about the old file.
    let old = dir.join("old.snap");
    let mut abandoned = 0;
    for delay_ms in [10u64, 30, 60, 100, 200, 400] {
        std::fs::write(&old, b"old contents").unwrap();
        let child = Command::new(BIN)
            .args(["snapshot", "--api-socket", vm.socket.to_str().unwrap()])
            .args(["--output", old.to_str().unwrap(), "--force"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // Finished before the signal arrived.
            valid(&old);
            continue;
        }
        assert!(out.status.code().is_some(), "killed by the signal: {out:?}");
        assert_eq!(error_lines(&out).len(), 1, "{out:?}");
        if stderr.contains("hung up") {
            abandoned += 1;
            assert_eq!(std::fs::read(&old).unwrap(), b"old contents", "{stderr}");
        } else {
            assert!(
                stderr.contains("after the request had completed"),
                "{stderr}"
            );
            valid(&old);
        }
        // The VM goes on, and no temporary file is left.
        assert!(vm.is_running(), "{}", vm.diagnostics());
        let t = Instant::now();
        let out = vm.control("info", &[]);
        assert!(out.status.success(), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(30));
        let tmps: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .map(|e| e.file_name())
            .collect();
        assert!(tmps.is_empty(), "{tmps:?}");
    }
    println!("{abandoned} of 6 interrupted snapshots were abandoned");
    assert!(
        abandoned > 0,
        "no SIGINT arrived while a snapshot was in progress"
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The API socket cannot be starved (issue 15): with a hundred idle clients connected, clients
/// dripping a request a byte at a time, clients announcing bodies they never send and a flood
/// of snapshot requests, `anyvisor info`, `pause` and `resume` still answer, each within a
/// generous bound. (Before, eight idle clients made every other request a 503 for 5 s.)
#[test]
fn api_answers_control_requests_under_idle_clients_and_a_flood() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let backend = "emu";
    if !fast_enough(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("api-flood");
    let mut vm = Vm::spawn(
        &boot_args(&kit, backend),
        &dir.join("vm.serial"),
        &dir.join("vm.sock"),
    );
    assert!(
        eventually(Duration::from_secs(60), || vm.socket.exists()
            && vm.control("info", &[]).status.success()),
        "{}",
        vm.diagnostics()
    );
    let answered = |cmd: &str, what: &str| {
        let start = Instant::now();
        let out = vm.control(cmd, &[]);
        let took = start.elapsed();
        assert!(out.status.success(), "{cmd} {what}: {out:?}");
        assert!(took < Duration::from_secs(3), "{cmd} {what} took {took:?}");
    };

    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&vm.socket).unwrap())
        .collect();
    answered("info", "under 100 idle clients");

    let socket = vm.socket.clone();
    let drips: Vec<_> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            std::thread::spawn(move || {
                for b in b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n" {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();
    let bodies: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.write_all(b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{")
                .unwrap();
            s
        })
        .collect();
    let flood: Vec<_> = (0..30)
        .map(|i| {
            let socket = socket.clone();
            let out = dir.join(format!("flood{i}.snap"));
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                let body = format!(r#"{{"output":"{}"}}"#, out.display());
                let _ = write!(
                    s,
                    "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let mut answer = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut answer);
                answer
            })
        })
        .collect();
    for _ in 0..3 {
        answered("info", "under a flood");
    }
    answered("pause", "under a flood");
    answered("resume", "under a flood");
    let answers: Vec<String> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        answers.iter().any(|a| a.starts_with("HTTP/1.1 204")),
        "no snapshot of the flood was taken: {answers:?}"
    );
    drop((idle, bodies));
    for t in drips {
        t.join().unwrap();
    }
    answered("info", "after the flood");
    assert!(vm.is_running(), "{}", vm.diagnostics());
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}
