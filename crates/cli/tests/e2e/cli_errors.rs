//! Bad usage and bad input: exit status 2 and exactly one `error:` line on stderr, nothing on
//! stdout. Needs neither KVM nor the guest kit.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn anyvisor(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anyvisor"));
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run anyvisor")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anyvisor-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Checks the process exited `code` with exactly one stderr line, an `error:` line containing
/// `needle`, and no panic text.
fn assert_error(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(
        errors.len(),
        1,
        "want exactly one error line, stderr: {stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "{:?} lacks {needle:?}",
        errors[0]
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr must be the error line alone: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A file that looks like a bzImage to the pre-check (for tests that must get past it).
fn fake_bzimage(dir: &std::path::Path) -> PathBuf {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let p = dir.join("fake-bzImage");
    std::fs::write(&p, bz).unwrap();
    p
}

#[test]
fn helper_detects_wrong_outcomes() {
    // The assertion helper itself must be able to fail.
    let ok = anyvisor(&["--help"], &[]);
    assert!(std::panic::catch_unwind(|| assert_error(&ok, 2, "")).is_err());
}

#[test]
fn help_and_version_exit_0() {
    let out = anyvisor(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));
    let out = anyvisor(&["run", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--api-socket"));
    assert_eq!(anyvisor(&["--version"], &[]).status.code(), Some(0));
}

#[test]
fn usage_errors() {
    assert_error(&anyvisor(&[], &[]), 2, "subcommand");
    assert_error(&anyvisor(&["run", "--bogus"], &[]), 2, "--bogus");
    assert_error(&anyvisor(&["frobnicate"], &[]), 2, "frobnicate");
    assert_error(&anyvisor(&["run", "--backend", "xen"], &[]), 2, "xen");
    assert_error(&anyvisor(&["run", "--cpus", "two"], &[]), 2, "two");
    assert_error(&anyvisor(&["run"], &[]), 2, "--kernel");
    assert_error(&anyvisor(&["info"], &[]), 2, "--api-socket");
}

#[test]
fn missing_kernel() {
    let out = anyvisor(&["run", "--kernel", "/nonexistent/bzImage"], &[]);
    assert_error(&out, 2, "cannot read /nonexistent/bzImage: No such file");
}

#[test]
fn not_a_kernel() {
    let dir = scratch("notkernel");
    let k = dir.join("notes.txt");
    std::fs::write(&k, "just text\n").unwrap();
    let out = anyvisor(&["run", "--kernel", k.to_str().unwrap()], &[]);
    assert_error(&out, 2, "not a Linux kernel");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_initrd() {
    let dir = scratch("initrd");
    let k = fake_bzimage(&dir);
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        &[],
    );
    assert_error(&out, 2, "cannot read /nonexistent/initrd");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_sizes_and_counts() {
    let dir = scratch("sizes");
    let k = fake_bzimage(&dir);
    let k = k.to_str().unwrap();
    assert_error(
        &anyvisor(&["run", "--kernel", k, "--cpus", "0"], &[]),
        2,
        "--cpus",
    );
    assert_error(
        &anyvisor(&["run", "--kernel", k, "--memory", "0"], &[]),
        2,
        "--memory",
    );
    assert_error(
        &anyvisor(&["run", "--kernel", k, "--memory", "0G"], &[]),
        2,
        "--memory",
    );
    assert_error(
        &anyvisor(&["run", "--kernel", k, "--memory", "12X"], &[]),
        2,
        "12X",
    );
    assert_error(
        &anyvisor(&["run", "--kernel", k, "--memory", "lots"], &[]),
        2,
        "lots",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A migration key file others can read gets one warning line (and the run goes on to its next
/// check); an owner-only one gets none.
#[test]
fn readable_migration_key_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("keymode");
    let key = dir.join("key");
    std::fs::write(&key, "abcdefghijklmnopqrstuvwxyz012345\n").unwrap();
    let sock = format!("unix:{}", dir.join("no-such-dir").join("s").display());
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = anyvisor(
            &[
                "run",
                "--incoming",
                &sock,
                "--migration-key",
                key.to_str().unwrap(),
            ],
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("cannot listen"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1 + usize::from(warned), "{stderr}");
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .collect();
        assert_eq!(warnings.len(), usize::from(warned), "{mode:o}: {stderr}");
        if warned {
            assert!(warnings[0].contains("readable by others"), "{stderr}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Strict where the CLI spec is strict: only the K, M, G suffixes; a unicast MAC; no control
/// character in the kernel command line.
#[test]
fn strict_values() {
    let dir = scratch("strict");
    let k = fake_bzimage(&dir);
    let k = k.to_str().unwrap();
    for size in ["256MB", "1GiB", "512KiB"] {
        assert_error(
            &anyvisor(&["run", "--kernel", k, "--memory", size], &[]),
            2,
            size,
        );
    }
    for mac in ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"] {
        assert_error(
            &anyvisor(
                &["run", "--kernel", k, "--net", &format!("tap=t0,mac={mac}")],
                &[],
            ),
            2,
            "multicast or broadcast",
        );
    }
    for cmdline in ["console=ttyS0\ninit=/bin/sh", "quiet\x07"] {
        assert_error(
            &anyvisor(&["run", "--kernel", k, "--cmdline", cmdline], &[]),
            2,
            "control characters",
        );
    }
    // A config file's invalid value is refused even though a flag overrides it.
    let config = dir.join("bad.json");
    std::fs::write(&config, r#"{"memory":"256MB"}"#).unwrap();
    assert_error(
        &anyvisor(
            &[
                "run",
                "--kernel",
                k,
                "--config",
                config.to_str().unwrap(),
                "--memory",
                "256M",
            ],
            &[],
        ),
        2,
        "256MB",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn config_file() {
    let dir = scratch("config");
    let k = fake_bzimage(&dir);
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, format!(r#"{{"kernel":"{}","cpus":0}}"#, k.display())).unwrap();
    let c = cfg.to_str().unwrap();
    assert_error(&anyvisor(&["run", "--config", c], &[]), 2, "--cpus");
    std::fs::write(&cfg, r#"{"kernal":"/x"}"#).unwrap();
    assert_error(&anyvisor(&["run", "--config", c], &[]), 2, "kernal");
    assert_error(
        &anyvisor(&["run", "--config", "/nonexistent/vm.json"], &[]),
        2,
        "cannot read /nonexistent/vm.json",
    );
    // A flag overriding the file's bad cpu count does not hide it (issue 15: a config file's
    // invalid value is an error even when overridden).
    std::fs::write(&cfg, r#"{"kernel":"/nonexistent/k","cpus":0}"#).unwrap();
    assert_error(
        &anyvisor(&["run", "--config", c, "--cpus", "1"], &[]),
        2,
        "--cpus 0",
    );
    // Choice values (backend, cpu model, seccomp) too: the file's wrong name is refused with
    // the names it could have been, even under a flag that overrides it.
    for (file, flag, needle) in [
        (
            r#"{"backend":"xen"}"#,
            ["--backend", "emu"],
            "invalid backend 'xen' (expected kvm, emu or auto)",
        ),
        (
            r#"{"cpu-model":"fast"}"#,
            ["--cpu-model", "portable"],
            "invalid cpu model 'fast'",
        ),
        (
            r#"{"seccomp":"yes"}"#,
            ["--seccomp", "on"],
            "invalid seccomp mode 'yes' (expected off, log or on)",
        ),
    ] {
        std::fs::write(&cfg, file).unwrap();
        assert_error(
            &anyvisor(&["run", "--config", c, flag[0], flag[1]], &[]),
            2,
            needle,
        );
    }
    // `config` names the file on the command line; it is no setting of the file.
    std::fs::write(&cfg, r#"{"config":"/other.json"}"#).unwrap();
    assert_error(&anyvisor(&["run", "--config", c], &[]), 2, "config");
    // The file's kernel with valid values gets to the next check (the missing kernel file).
    std::fs::write(&cfg, r#"{"kernel":"/nonexistent/k","cpus":2}"#).unwrap();
    assert_error(
        &anyvisor(&["run", "--config", c, "--cpus", "1"], &[]),
        2,
        "cannot read /nonexistent/k",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kvm_unusable() {
    let dir = scratch("kvm");
    let k = fake_bzimage(&dir);
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--backend",
            "kvm",
            "--serial",
            "null",
        ],
        &[("ANYVISOR_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_error(
        &out,
        2,
        "error: kvm is not usable: cannot open /nonexistent/kvm",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn host_model_needs_kvm() {
    let dir = scratch("host");
    let k = fake_bzimage(&dir);
    let k = k.to_str().unwrap();
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k,
            "--backend",
            "emu",
            "--cpu-model",
            "host",
            "--serial",
            "null",
        ],
        &[],
    );
    assert_error(&out, 2, "--cpu-model host");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_snapshot_and_keyless_tcp_incoming() {
    assert_error(
        &anyvisor(&["run", "--restore", "/nonexistent/x.snap"], &[]),
        2,
        "cannot read /nonexistent/x.snap",
    );
    assert_error(
        &anyvisor(&["run", "--incoming", "tcp:127.0.0.1:1"], &[]),
        2,
        "requires --migration-key",
    );
    assert_error(
        &anyvisor(&["snapshot-info", "/nonexistent/x.snap"], &[]),
        2,
        "cannot read /nonexistent/x.snap",
    );
}

#[test]
fn api_socket_not_there() {
    for cmd in ["info", "pause", "resume", "shutdown"] {
        let out = anyvisor(&[cmd, "--api-socket", "/nonexistent/api.sock"], &[]);
        assert_error(
            &out,
            2,
            "cannot connect to api socket /nonexistent/api.sock",
        );
    }
    let out = anyvisor(
        &[
            "snapshot",
            "--api-socket",
            "/nonexistent/api.sock",
            "--output",
            "/tmp/s",
        ],
        &[],
    );
    assert_error(&out, 2, "cannot connect to api socket");
}

#[test]
fn missing_disk_image() {
    let dir = scratch("disk");
    let k = fake_bzimage(&dir);
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--backend",
            "emu",
            "--serial",
            "null",
            "--disk",
            "/nonexistent/disk.img",
        ],
        &[],
    );
    assert_error(&out, 2, "cannot open disk /nonexistent/disk.img");
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--disk",
            "/d.img,format=qed",
        ],
        &[],
    );
    assert_error(&out, 2, "unknown format 'qed'");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn serial_file_unwritable() {
    let dir = scratch("serialfile");
    let k = fake_bzimage(&dir);
    let out = anyvisor(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            "/nonexistent/dir/log",
        ],
        &[],
    );
    assert_error(&out, 2, "cannot open /nonexistent/dir/log");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn panic_is_one_error_line() {
    let out = anyvisor(
        &["info", "--api-socket", "/x"],
        &[("ANYVISOR_TEST_PANIC", "1")],
    );
    assert_error(&out, 1, "error: internal error: test panic second line at ");
}

/// Before the VM runs, a termination signal ends the process at once (here: while waiting for
/// a migration that never comes).
#[test]
fn sigterm_before_the_vm_runs() {
    use std::time::{Duration, Instant};
    let dir = scratch("incoming");
    let sock = dir.join("m.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_anyvisor"))
        .args(["run", "--incoming", &format!("unix:{}", sock.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let ended = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ended, "SIGTERM did not end a waiting --incoming");
    let _ = std::fs::remove_dir_all(dir);
}

/// A kernel that is not whole is bad input: a truncated copy of the kit's bzImage is refused
/// with one line and status 2 before anything runs.
#[test]
fn truncated_bzimage() {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out/bzImage");
    let Ok(whole) = std::fs::read(&kit) else {
        println!("SKIP: guest kit not built (run guest/build-kit.sh)");
        return;
    };
    let dir = scratch("truncated-kernel");
    let k = dir.join("bzImage");
    std::fs::write(&k, &whole[..whole.len() - 4096]).unwrap();
    assert_error(
        &anyvisor(
            &["run", "--kernel", k.to_str().unwrap(), "--backend", "emu"],
            &[],
        ),
        2,
        "truncated",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A vmlinux that is not whole is bad input too: cut at half, cut inside its section headers,
/// and with a program header pointing past the end of the file, each is refused with one line
/// and status 2 before anything runs.
#[test]
fn truncated_vmlinux() {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out/vmlinux");
    let Ok(whole) = std::fs::read(&kit) else {
        println!("SKIP: guest kit not built (run guest/build-kit.sh)");
        return;
    };
    let dir = scratch("truncated-vmlinux");
    let k = dir.join("vmlinux");
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let shoff = u64_at(&whole, 40) as usize;
    let phoff = u64_at(&whole, 32) as usize;
    // The first program header's p_offset, far past the end.
    let mut outside = whole.clone();
    outside[phoff + 8..phoff + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (whole[..whole.len() / 2].to_vec(), "truncated?"),
        (whole[..shoff + 100].to_vec(), "section headers"),
        (outside, "program header 0"),
    ];
    for (bytes, needle) in cases {
        std::fs::write(&k, &bytes).unwrap();
        assert_error(
            &anyvisor(
                &["run", "--kernel", k.to_str().unwrap(), "--backend", "emu"],
                &[],
            ),
            2,
            needle,
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
