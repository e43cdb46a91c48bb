//! Installs each role's filter in a child process (this test binary re-run for one test, with an
//! environment variable set) and checks what the child may and may not do: an allowed call
//! works, a forbidden one kills the child with SIGSYS. Needs Linux with seccomp; no root.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use sandbox::{SeccompMode, ThreadRole, install};

const CHILD_ENV: &str = "SANDBOX_TEST_CHILD";
/// The child's exit code when its body returned.
const SURVIVED: i32 = 42;

/// In the parent: re-runs this binary for `test` alone and returns the child's status. In the
/// child: runs `body` and exits with [`SURVIVED`] (never returns).
fn in_child(test: &str, body: impl FnOnce()) -> ExitStatus {
    if std::env::var_os(CHILD_ENV).is_some() {
        body();
        // Flushes stdout and exits through exit_group, which every role allows.
        std::process::exit(SURVIVED);
    }
    let exe = std::env::current_exe().unwrap();
    // No core file for the SIGSYS kills; `exec` keeps the status the child's own.
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -c 0; exec \"$0\" \"$@\"")
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("running 1 test"),
        "child did not run exactly one test: {stdout}"
    );
    out.status
}

fn assert_survived(status: ExitStatus) {
    assert_eq!(status.code(), Some(SURVIVED), "child: {status:?}");
}

fn assert_killed_by_sigsys(status: ExitStatus) {
    assert_eq!(status.signal(), Some(libc::SIGSYS), "child: {status:?}");
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sandbox-test-{}-{name}", std::process::id()))
}

/// The calling thread's seccomp mode from /proc: 0 none, 2 filter.
fn seccomp_status() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn harness_tells_survival_from_death() {
    assert_survived(in_child("harness_tells_survival_from_death", || {}));
    // A child that panics (exit 101) is neither survival nor a SIGSYS kill.
    let status = in_child("harness_child_panics", || {});
    assert_eq!(status.code(), Some(101));
    assert_eq!(status.signal(), None);
}

#[test]
fn harness_child_panics() {
    if std::env::var_os(CHILD_ENV).is_some() {
        panic!("on purpose");
    }
}

#[test]
fn vcpu_role_allows_its_work() {
    assert_survived(in_child("vcpu_role_allows_its_work", || {
        // An eventfd stand-in: a register write signals the worker with write(2).
        let (_rx, mut tx) = std::io::pipe().unwrap();
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        tx.write_all(b"x").unwrap();
        println!("serial output"); // write to stdout
        let big = vec![1u8; 64 << 20]; // mmap
        assert_eq!(big[big.len() - 1], 1);
        drop(big); // munmap
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(2)); // clock_nanosleep
        assert!(t.elapsed() >= Duration::from_millis(2));
        let mut seed = std::collections::HashMap::<u8, u8>::new(); // getrandom
        seed.insert(1, 1);
        // TCGETS is on the allowlist (returns ENOTTY on a pipe, no kill).
        let _ = std::io::stdin().is_terminal();
        drop(tx); // close
    }));
}

/// Device work is the workers': a vCPU thread reads nothing, not even a descriptor it has.
#[test]
fn vcpu_role_kills_on_read() {
    assert_killed_by_sigsys(in_child("vcpu_role_kills_on_read", || {
        let (mut rx, mut tx) = std::io::pipe().unwrap();
        tx.write_all(b"x").unwrap();
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let mut b = [0u8; 1];
        let _ = rx.read(&mut b);
    }));
}

#[test]
fn vcpu_role_kills_on_disk_io() {
    let path = scratch("vcpu-disk");
    let status = in_child("vcpu_role_kills_on_disk_io", || {
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(scratch("vcpu-disk"))
            .unwrap();
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let _ = disk.write_all_at(b"sector", 4096); // pwrite64
    });
    let _ = std::fs::remove_file(&path);
    assert_killed_by_sigsys(status);
}

#[test]
fn vcpu_role_kills_on_socket() {
    assert_killed_by_sigsys(in_child("vcpu_role_kills_on_socket", || {
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let _ = UnixStream::pair(); // socketpair
    }));
}

#[test]
fn vcpu_role_kills_on_accept() {
    let path = scratch("vcpu-accept.sock");
    let _ = std::fs::remove_file(&path);
    let status = in_child("vcpu_role_kills_on_accept", || {
        let l = UnixListener::bind(scratch("vcpu-accept.sock")).unwrap();
        l.set_nonblocking(true).unwrap();
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let _ = l.accept(); // accept4
    });
    let _ = std::fs::remove_file(&path);
    assert_killed_by_sigsys(status);
}

#[test]
fn vcpu_role_kills_on_thread_creation() {
    assert_killed_by_sigsys(in_child("vcpu_role_kills_on_thread_creation", || {
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        // clone with CLONE_THREAD (after clone3's ENOSYS): device workers exist before.
        let _ = std::thread::Builder::new().spawn(|| {});
    }));
}

/// What a virtio worker does: disk I/O, vsock host sockets (accepting, connecting), reading
/// the tap or an eventfd, waiting in epoll.
#[test]
fn device_role_allows_worker_io() {
    let path = scratch("device-disk");
    let sock = scratch("device-accept.sock");
    let _ = std::fs::remove_file(&sock);
    let status = in_child("device_role_allows_worker_io", || {
        let mut disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(scratch("device-disk"))
            .unwrap();
        let l = UnixListener::bind(scratch("device-accept.sock")).unwrap();
        l.set_nonblocking(true).unwrap();
        let (mut rx, mut tx) = std::io::pipe().unwrap();
        install(ThreadRole::Device, SeccompMode::On).unwrap();
        disk.write_all_at(b"sector", 4096).unwrap(); // pwrite64
        let mut buf = [0u8; 6];
        disk.read_exact_at(&mut buf, 4096).unwrap(); // pread64
        assert_eq!(&buf, b"sector");
        disk.seek(SeekFrom::Start(0)).unwrap(); // lseek
        disk.sync_all().unwrap(); // fsync
        disk.sync_data().unwrap(); // fdatasync
        assert!(l.accept().is_err()); // accept4: nobody waits
        let mut c = UnixStream::connect(scratch("device-accept.sock")).unwrap(); // socket, connect
        c.set_nonblocking(true).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap(); // ioctl(FIONBIO)
        c.write_all(b"CONNECT 1\n").unwrap();
        let mut line = [0u8; 10];
        s.read_exact(&mut line).unwrap();
        tx.write_all(b"x").unwrap();
        rx.read_exact(&mut buf[..1]).unwrap(); // read
        drop(disk);
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&sock);
    assert_survived(status);
}

#[test]
fn vcpu_role_kills_on_open() {
    assert_killed_by_sigsys(in_child("vcpu_role_kills_on_open", || {
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let _ = File::open("/dev/null"); // openat
    }));
}

#[test]
fn vcpu_role_kills_on_thread_spawn() {
    assert_killed_by_sigsys(in_child("vcpu_role_kills_on_thread_spawn", || {
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        // Nor a process (a clone without CLONE_THREAD).
        let _ = std::process::Command::new("/bin/true").status();
    }));
}

#[test]
fn vcpu_role_kills_on_an_ioctl_outside_its_list() {
    // A system ioctl (KVM_GET_API_VERSION on /dev/kvm) is not among the vCPU thread's requests.
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        println!("SKIP: no /dev/kvm");
        return;
    };
    drop(kvm);
    assert_killed_by_sigsys(in_child(
        "vcpu_role_kills_on_an_ioctl_outside_its_list",
        || {
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
            let _ = kvm.get_api_version();
        },
    ));
}

#[test]
fn device_role_kills_on_socket() {
    assert_killed_by_sigsys(in_child("device_role_kills_on_socket", || {
        install(ThreadRole::Device, SeccompMode::On).unwrap();
        let _ = UnixStream::pair(); // socketpair
    }));
}

#[test]
fn device_role_allows_input_forwarding() {
    assert_survived(in_child("device_role_allows_input_forwarding", || {
        let (mut rx, mut tx) = std::io::pipe().unwrap();
        install(ThreadRole::Device, SeccompMode::On).unwrap();
        tx.write_all(b"keys").unwrap();
        let mut buf = [0u8; 4];
        rx.read_exact(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }));
}

#[test]
fn api_role_allows_threads_sockets_and_snapshot_files() {
    let sock = scratch("api.sock");
    let file = scratch("api-snapshot");
    let status = in_child("api_role_allows_threads_sockets_and_snapshot_files", || {
        let listener = UnixListener::bind(scratch("api.sock")).unwrap();
        install(ThreadRole::Api, SeccompMode::On).unwrap();

        // A named thread (clone with CLONE_THREAD, prctl(PR_SET_NAME)) inherits the filter.
        let worker = std::thread::Builder::new()
            .name("migration".into())
            .spawn(|| 6 * 7)
            .unwrap();
        assert_eq!(worker.join().unwrap(), 42);

        let mut client = UnixStream::connect(scratch("api.sock")).unwrap(); // socket + connect
        let (mut server, _) = listener.accept().unwrap(); // accept4
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap(); // setsockopt
        client.write_all(b"GET /vm").unwrap();
        let mut buf = [0u8; 7];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"GET /vm");

        let tmp = scratch("api-snapshot.tmp");
        let f = File::create(&tmp).unwrap(); // openat
        f.set_len(1 << 20).unwrap(); // ftruncate
        f.write_all_at(b"AVSNAP", 0).unwrap();
        f.sync_all().unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20); // statx
        std::fs::rename(&tmp, scratch("api-snapshot")).unwrap();
        std::fs::remove_file(scratch("api.sock")).unwrap();
    });
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&file);
    assert_survived(status);
}

#[test]
fn api_role_kills_on_process_spawn() {
    assert_killed_by_sigsys(in_child("api_role_kills_on_process_spawn", || {
        install(ThreadRole::Api, SeccompMode::On).unwrap();
        // posix_spawn/fork: clone without CLONE_THREAD.
        let _ = Command::new("/bin/true").status();
    }));
}

#[test]
fn migration_role_allows_stream_io() {
    assert_survived(in_child("migration_role_allows_stream_io", || {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        install(ThreadRole::Migration, SeccompMode::On).unwrap();
        a.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        a.write_all(&[7u8; 16384]).unwrap();
        let mut buf = vec![0u8; 16384];
        b.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        a.shutdown(std::net::Shutdown::Both).unwrap();
    }));
}

#[test]
fn migration_role_kills_on_open() {
    assert_killed_by_sigsys(in_child("migration_role_kills_on_open", || {
        install(ThreadRole::Migration, SeccompMode::On).unwrap();
        let _ = File::open("/etc/hostname");
    }));
}

#[test]
fn migration_role_allows_the_throttle_thread() {
    assert_survived(in_child(
        "migration_role_allows_the_throttle_thread",
        || {
            install(ThreadRole::Migration, SeccompMode::On).unwrap();
            std::thread::Builder::new()
                .name("throttle".into())
                .spawn(|| std::thread::sleep(Duration::from_millis(1)))
                .unwrap()
                .join()
                .unwrap();
        },
    ));
}

#[test]
fn an_api_connection_thread_may_start_a_migration_thread_under_both_filters() {
    let status = in_child(
        "an_api_connection_thread_may_start_a_migration_thread_under_both_filters",
        || {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            install(ThreadRole::Api, SeccompMode::On).unwrap();
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("migrate-out".into())
                    .spawn_scoped(s, || {
                        install(ThreadRole::Migration, SeccompMode::On).unwrap();
                        a.write_all(&[5u8; 4096]).unwrap();
                        // The throttle thread.
                        std::thread::spawn(|| {}).join().unwrap();
                    })
                    .unwrap()
                    .join()
                    .unwrap();
            });
            let mut buf = [0u8; 4096];
            b.read_exact(&mut buf).unwrap();
            assert_eq!(buf, [5u8; 4096]);
        },
    );
    assert_survived(status);
}

#[test]
fn a_migration_thread_started_by_the_api_thread_cannot_open_files() {
    assert_killed_by_sigsys(in_child(
        "a_migration_thread_started_by_the_api_thread_cannot_open_files",
        || {
            install(ThreadRole::Api, SeccompMode::On).unwrap();
            std::thread::spawn(|| {
                install(ThreadRole::Migration, SeccompMode::On).unwrap();
                let _ = File::open("/dev/null"); // the API filter would allow it
            })
            .join()
            .unwrap();
        },
    ));
}

#[test]
fn incoming_migration_role_allows_accepting_and_stream_io() {
    let sock = scratch("incoming.sock");
    let status = in_child(
        "incoming_migration_role_allows_accepting_and_stream_io",
        || {
            // Bound by the main thread before the migration thread starts; the source connects.
            let listener = UnixListener::bind(scratch("incoming.sock")).unwrap();
            let mut source = UnixStream::connect(scratch("incoming.sock")).unwrap();
            install(ThreadRole::IncomingMigration, SeccompMode::On).unwrap();
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            source.write_all(&[9u8; 16384]).unwrap();
            let mut buf = vec![0u8; 16384];
            s.read_exact(&mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 9));
            s.write_all(b"resumed").unwrap();
            let mut ack = [0u8; 7];
            source.read_exact(&mut ack).unwrap();
            s.shutdown(std::net::Shutdown::Both).unwrap();
            eprintln!("anyvisor: incoming migration failed: a message");
        },
    );
    let _ = std::fs::remove_file(&sock);
    assert_survived(status);
}

#[test]
fn incoming_migration_role_kills_on_open() {
    assert_killed_by_sigsys(in_child("incoming_migration_role_kills_on_open", || {
        install(ThreadRole::IncomingMigration, SeccompMode::On).unwrap();
        let _ = File::open("/dev/null");
    }));
}

#[test]
fn incoming_migration_role_kills_on_thread_spawn() {
    assert_killed_by_sigsys(in_child(
        "incoming_migration_role_kills_on_thread_spawn",
        || {
            install(ThreadRole::IncomingMigration, SeccompMode::On).unwrap();
            let _ = std::thread::spawn(|| {}).join();
        },
    ));
}

#[test]
fn incoming_migration_role_kills_on_connect() {
    assert_killed_by_sigsys(in_child("incoming_migration_role_kills_on_connect", || {
        install(ThreadRole::IncomingMigration, SeccompMode::On).unwrap();
        let _ = UnixStream::connect("/nonexistent.sock"); // socket()
    }));
}

#[test]
fn incoming_migration_role_kills_on_any_kvm_ioctl() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        println!("SKIP: no /dev/kvm");
        return;
    };
    drop(kvm);
    assert_killed_by_sigsys(in_child(
        "incoming_migration_role_kills_on_any_kvm_ioctl",
        || {
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let vm = kvm.create_vm().unwrap();
            install(ThreadRole::IncomingMigration, SeccompMode::On).unwrap();
            let _ = vm.get_dirty_log(0, 4096);
        },
    ));
}

#[test]
fn main_role_allows_shutdown_work() {
    let sock = scratch("main.sock");
    let status = in_child("main_role_allows_shutdown_work", || {
        let _listener = UnixListener::bind(scratch("main.sock")).unwrap();
        install(ThreadRole::Main, SeccompMode::On).unwrap();
        // What ApiServer's drop does: wake the accept loop, remove the socket file.
        let _ = UnixStream::connect(scratch("main.sock")).unwrap();
        std::fs::remove_file(scratch("main.sock")).unwrap();
        eprintln!("error: a one-line message");
    });
    let _ = std::fs::remove_file(&sock);
    assert_survived(status);
}

#[test]
fn main_role_kills_on_open() {
    assert_killed_by_sigsys(in_child("main_role_kills_on_open", || {
        install(ThreadRole::Main, SeccompMode::On).unwrap();
        let _ = File::open("/dev/null");
    }));
}

#[test]
fn a_second_filter_only_narrows() {
    assert_killed_by_sigsys(in_child("a_second_filter_only_narrows", || {
        install(ThreadRole::Api, SeccompMode::On).unwrap();
        File::open("/dev/null").unwrap(); // allowed for the API role
        install(ThreadRole::Vcpu, SeccompMode::On).unwrap();
        let _ = File::open("/dev/null"); // no longer
    }));
}

#[test]
fn log_mode_does_not_kill() {
    assert_survived(in_child("log_mode_does_not_kill", || {
        install(ThreadRole::Vcpu, SeccompMode::Log).unwrap();
        File::open("/dev/null").unwrap(); // logged, allowed
        assert_eq!(seccomp_status(), "2");
        let _ = std::thread::spawn(|| {}).join(); // clone logged, allowed
    }));
}

#[test]
fn off_installs_nothing() {
    assert_survived(in_child("off_installs_nothing", || {
        assert_eq!(seccomp_status(), "0");
        install(ThreadRole::Vcpu, SeccompMode::Off).unwrap();
        assert_eq!(seccomp_status(), "0");
        File::open("/dev/null").unwrap();
    }));
}
