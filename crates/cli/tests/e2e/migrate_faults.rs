//! Live-migration faults end to end, with real VMs and the memory workload in a 512 MiB guest.
//! A proxy the test controls sits between `anyvisor migrate` and the destination and, at a
//! chosen message, kills the destination (during the handshake, before, during and after the
//! memory rounds, and once it has everything but before its confirmation reaches the source),
//! cuts the connection, or feeds the destination garbage, a replayed or a
//! truncated message; a destination under an address-space limit has too little memory; a
//! destination cannot present the source's CPU model. After every attempt `migrate` exits
//! non-zero with one `error:` line and the source VM keeps running, its workload counting on
//! without corruption; at the end the same source migrates successfully to a destination that
//! saw four broken attempts and has a hundred idle and a few slow connections on its listener.
//! One Linux boot serves every step.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::migrate_support;
use crate::persist_harness;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use migrate_support::*;
use persist_harness::*;

/// The proxy is a harness helper too: it forwards untouched until the chosen message, which
/// it replays, garbles, cuts or truncates; it reports whether the message came by.
#[test]
fn harness_can_fail() {
    check_harness_can_fail();
    let frame = |kind: u16, payload: &[u8], mac: bool| {
        let mut f = kind.to_le_bytes().to_vec();
        f.extend([0, 0]);
        f.extend((payload.len() as u32).to_le_bytes());
        f.extend(payload);
        if mac {
            f.extend([0xaa; 32]);
        }
        f
    };
    let run = |fault: Fault, at: (u16, usize)| -> (bool, Vec<u8>) {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = format!("tcp:{}", server.local_addr().unwrap());
        let proxy = Proxy::start("tcp:127.0.0.1:0", &up, true, at, fault, || {});
        let mut c = std::net::TcpStream::connect(proxy.to.strip_prefix("tcp:").unwrap()).unwrap();
        let (mut s, _) = server.accept().unwrap();
        let mut sent = frame(CLIENT_HELLO, &[1; 48], false);
        sent.extend(frame(MEMORY_PAGES, b"abc", true));
        sent.extend(frame(MEMORY_PAGES, b"defg", true));
        sent.extend(frame(STATE_BLOB, b"", true));
        c.write_all(&sent).unwrap();
        // The proxy may already have cut the connection (the fault under test): then there is
        // nothing left to shut down.
        if let Err(e) = c.shutdown(std::net::Shutdown::Write) {
            assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
        }
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            eventually(Duration::from_secs(5), || proxy.hit() || at.0 == 0),
            "{fault:?}"
        );
        (proxy.hit(), got)
    };
    let m1 = frame(MEMORY_PAGES, b"defg", true);
    let hello = frame(CLIENT_HELLO, &[1; 48], false);
    let m0 = frame(MEMORY_PAGES, b"abc", true);
    let sb = frame(STATE_BLOB, b"", true);
    let whole = [hello.clone(), m0.clone(), m1.clone(), sb.clone()].concat();
    assert_eq!(run(Fault::Replay, (0, 0)), (false, whole.clone()));
    assert_eq!(
        run(Fault::Replay, (MEMORY_PAGES, 1)).1,
        [
            hello.clone(),
            m0.clone(),
            m1.clone(),
            m1.clone(),
            sb.clone()
        ]
        .concat()
    );
    let mut garbled = m1.clone();
    garbled[8..12].copy_from_slice(&[!b'd', !b'e', !b'f', !b'g']);
    assert_eq!(
        run(Fault::Garbage, (MEMORY_PAGES, 1)).1,
        [hello.clone(), m0.clone(), garbled, sb].concat()
    );
    assert_eq!(
        run(Fault::Cut, (MEMORY_PAGES, 1)),
        (true, [hello.clone(), m0.clone()].concat())
    );
    assert_eq!(
        run(Fault::Truncate, (MEMORY_PAGES, 1)).1,
        [hello, m0, m1[..m1.len() / 2].to_vec()].concat()
    );
}

/// Makes the description's CPU model claim AVX-512F (as a newer anyvisor's model might): one
/// the emu backend cannot present.
fn claim_avx512(description: &mut serde_json::Value) {
    let model = &mut description["cpu_model"];
    for leaf in model["cpuid"].as_array_mut().unwrap() {
        if leaf["function"] == 7 && leaf["index"] == 0 {
            let ebx = leaf["ebx"].as_u64().unwrap() | (1 << 16); // AVX-512F
            leaf["ebx"] = ebx.into();
        }
    }
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn migration_faults_leave_the_source_running() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("migrate-faults");
    let key = dir.join("key");
    std::fs::write(&key, "0123456789abcdef-the-right-key\n").unwrap();
    let boot = Instant::now();
    let mut src = Vm::spawn(
        &with_memory(boot_args(&kit, "emu")),
        &dir.join("src.serial"),
        &dir.join("src.sock"),
    );
    src.wait_serial(BOOT_LIMIT, at_least_ok(3)).unwrap();
    println!("source: 3 OK lines after {:?}", boot.elapsed());
    let mut n = 0;
    let mut destination = |dir: &Path, key: Option<&Path>| {
        n += 1;
        let to = match key {
            Some(_) => format!("tcp:127.0.0.1:{}", free_port()),
            None => format!("unix:{}", dir.join(format!("dst{n}.mig")).display()),
        };
        let mut dst = Vm::spawn(
            &incoming_args(&to, key, "emu"),
            &dir.join(format!("dst{n}.serial")),
            &dir.join(format!("dst{n}.sock")),
        );
        wait_listening(&mut dst);
        (dst, to)
    };

    // The destination killed at each stage: the proxy kills it instead of forwarding the
    // source's message, or (last) forwards the end of the final state, keeps the destination's
    // answer from the source and kills it while it restores or has just resumed the VM.
    for (what, at, fault) in [
        ("killed during the handshake", (PROOF, 0), Fault::Kill),
        ("killed before the memory rounds", (HELLO, 0), Fault::Kill),
        (
            "killed during the memory rounds",
            (MEMORY_PAGES, 8),
            Fault::Kill,
        ),
        (
            "killed after the memory rounds (source paused)",
            (STATE_BLOB, 0),
            Fault::Kill,
        ),
        (
            "killed with the whole state, before its confirmation reached the source",
            (COMPLETE, 0),
            Fault::KillAfterForwarding,
        ),
    ] {
        let (dst, to) = destination(&dir, Some(&key));
        let proxy = Proxy::start("tcp:127.0.0.1:0", &to, true, at, fault, move || {
            drop(dst);
        });
        let out = migrate(&src, &proxy.to, Some(&key));
        assert!(proxy.hit(), "{what}: the migration never got there");
        let e = assert_source_survived(&mut src, &out, what);
        assert!(e.contains("peer gone"), "{what}: {e}");
        println!("destination {what}: {e}");
    }

    // A destination that stays up sees the stream broken in four ways; each attempt fails on
    // both sides and it waits for the next.
    let (mut dst, to) = destination(&dir, Some(&key));
    for (failures, (what, at, fault, expect)) in [
        (
            "connection cut during the memory rounds",
            (MEMORY_PAGES, 12),
            Fault::Cut,
            &["peer gone"][..],
        ),
        (
            "garbage during the memory rounds",
            (MEMORY_PAGES, 4),
            Fault::Garbage,
            &["MAC mismatch", "peer gone"][..],
        ),
        (
            "a replayed message",
            (MEMORY_PAGES, 4),
            Fault::Replay,
            &["MAC mismatch", "peer gone"][..],
        ),
        (
            "the final state truncated (source paused)",
            (STATE_BLOB, 0),
            Fault::Truncate,
            &["peer gone"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let proxy = Proxy::start("tcp:127.0.0.1:0", &to, true, at, fault, || {});
        let out = migrate(&src, &proxy.to, Some(&key));
        assert!(proxy.hit(), "{what}: the migration never got there");
        let e = assert_source_survived(&mut src, &out, what);
        assert!(expect.iter().any(|x| e.contains(x)), "{what}: {e}");
        println!("{what}: {e}");
        assert!(
            eventually(Duration::from_secs(10), || dst
                .stderr()
                .matches("incoming migration failed")
                .count()
                == failures + 1),
            "{what}: {}",
            dst.diagnostics()
        );
        assert!(dst.is_running(), "{what}: {}", dst.diagnostics());
    }

    // Too little memory: the destination's address space is limited below the guest's size;
    // it refuses before the source pauses.
    let small = dir.join("small.mig");
    let small_to = format!("unix:{}", small.display());
    let mut tight = Vm::spawn_under(
        &["prlimit", "--as=402653184", "--"].map(String::from),
        &[],
        &incoming_args(&small_to, None, "emu"),
        &dir.join("small.serial"),
        &dir.join("small.sock"),
    );
    wait_listening(&mut tight);
    let out = migrate(&src, &small_to, None);
    let e = assert_source_survived(&mut src, &out, "too little memory");
    assert!(
        e.contains("refused: cannot create guest memory"),
        "too little memory: {e}"
    );
    println!("destination with too little memory: {e}");
    assert!(tight.is_running(), "{}", tight.diagnostics());
    drop(tight);

    // A CPU model the destination cannot present (the proxy makes the description claim AVX-512;
    // a real `--cpu-model host` source is `incompatible_cpu_model_is_refused`).
    let (cpu_dst, cpu_to) = destination(&dir, None);
    let proxy = Proxy::start(
        &format!("unix:{}", dir.join("cpu-proxy.mig").display()),
        &cpu_to,
        false,
        (HELLO, 0),
        Fault::Rewrite(claim_avx512),
        || {},
    );
    let out = migrate(&src, &proxy.to, None);
    assert!(proxy.hit());
    let e = assert_source_survived(&mut src, &out, "incompatible CPU model");
    assert!(
        e.contains("refused: cannot run this VM (CPU model portable-v3)"),
        "{e}"
    );
    println!("incompatible CPU model: {e}");
    drop(cpu_dst);

    // After all that, the source migrates to the destination that saw the broken streams, while
    // a hundred idle connections and a few that drip a ClientHello a byte at a time sit on its
    // listener (they used to hold it one after another, each for the 30-second read timeout, so
    // the source timed out in its handshake).
    let addr = to.strip_prefix("tcp:").unwrap().to_string();
    let idle: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let dripping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let drips: Vec<_> = (0..3)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let go = dripping.clone();
            std::thread::spawn(move || {
                let mut hello = vec![1u8, 0, 0, 0, 48, 0, 0, 0];
                hello.extend(b"AVMIGRAT");
                hello.extend([1, 0, 0, 0, 1, 0, 0, 0]);
                hello.extend([7u8; 32]);
                for b in hello {
                    if !go.load(std::sync::atomic::Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let out = migrate(&src, &to, Some(&key));
    dripping.store(false, std::sync::atomic::Ordering::SeqCst);
    for t in drips {
        t.join().unwrap();
    }
    drop(idle);
    let line = assert_migrated(&mut src, &mut dst, &out, "after the faults", "emu");
    assert!(
        dst.stderr().contains("migration listener: tcp:127.0.0.1:"),
        "the strangers were not turned away\n{}",
        dst.diagnostics()
    );
    println!("after the faults, emu -> emu over tcp: {line}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A source on `--cpu-model host` (KVM, everything the host offers) cannot move to emu: the
/// destination refuses before the source pauses and the source keeps running. The guest
/// need not boot for this (plain KVM runs guest kernel code very slowly on a KVM PVM host).
#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn incompatible_cpu_model_is_refused() {
    if !kvm_usable() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("migrate-cpu");
    let mut args = with_memory(boot_args(&kit, "kvm"));
    args.extend(["--cpu-model".into(), "host".into()]);
    // On a KVM PVM host the host model needs plain KVM, which the VMM uses only when asked.
    let mut src = Vm::spawn_under(
        &["env", "ANYVISOR_PLAIN_KVM=1"].map(String::from),
        &[],
        &args,
        &dir.join("src.serial"),
        &dir.join("src.sock"),
    );
    assert!(
        eventually(Duration::from_secs(30), || !src.is_running()
            || src.control("info", &[]).status.success()),
        "{}",
        src.diagnostics()
    );
    assert!(src.is_running(), "{}", src.diagnostics());
    let before = info(&src);
    assert!(
        before["cpu_model"]
            .as_str()
            .unwrap_or("")
            .starts_with("host"),
        "{before}"
    );
    let path = dir.join("mig.sock");
    let to = format!("unix:{}", path.display());
    let mut dst = Vm::spawn(
        &incoming_args(&to, None, "emu"),
        &dir.join("dst.serial"),
        &dir.join("dst.sock"),
    );
    wait_listening(&mut dst);
    let out = migrate(&src, &to, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("refused: cannot run this VM (CPU model host"),
        "{stderr}"
    );
    println!("--cpu-model host -> emu: {}", errors[0]);
    assert!(src.is_running(), "{}", src.diagnostics());
    assert_eq!(info(&src)["state"], "running");
    assert!(dst.is_running(), "{}", dst.diagnostics());
    let _ = std::fs::remove_dir_all(dir);
}
