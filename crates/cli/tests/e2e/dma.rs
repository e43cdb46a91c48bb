//! End-to-end: a virtio-blk read lands in guest RAM that the software CPU has executed (and
//! translated) before, and the guest runs the new bytes.
//!
//! The guest kit's shell (the default `/init` case, driven through `--serial stdio`) copies a
//! small static program from the disk to /tmp and runs it. The program maps one read-write-
//! execute page and, for k = 1..=ROUNDS, reads disk page k into it with `O_DIRECT` — the
//! virtio-blk device writes straight into that very page (its guest-physical frame does not
//! change) — then calls it CALLS times; page k holds `mov eax, k; ret`. Any call that returns
//! something else ran code from an earlier round: the program exits with 10 + k. CALLS is well
//! above the translator's threshold, so each round's code is translated (or, on the
//! interpreter, cached as a decoded block) before the next DMA overwrites it. Run on the
//! translator (the default engine) and on the interpreter (`ANYVISOR_EMU_ENGINE=interp`).
//!
//! Needs the built guest kit and an optimized build (cfg `boot_emu`, crates/cli/build.rs).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use persist_harness::{BIN, BOOT_LIMIT, kit, scratch, serial_guard, wait_timeout};

/// Rounds of "DMA new code into the page, run it".
const ROUNDS: u32 = 8;
/// Calls per round (the translator translates a block after 32 interpreted runs).
const CALLS: u32 = 200;
/// Where the program is loaded (one PT_LOAD segment from file offset 0).
const BASE: u64 = 0x40_0000;
/// Size of the ELF and program headers: the code follows them.
const HEADERS: u64 = 64 + 56;

/// The guest program: a static x86-64 Linux ELF executable. Exit status 0: every call ran the
/// code of its round; 10 + k: a call in round k ran stale code; 100/101/102: open, mmap or
/// pread failed.
fn program() -> Vec<u8> {
    let entry = BASE + HEADERS;
    let code = {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut path = a.create_label();
        let mut round = a.create_label();
        let mut call_loop = a.create_label();
        let mut stale = a.create_label();
        let mut fail = a.create_label();
        // fd = open("/dev/vda", O_RDONLY | O_DIRECT)
        a.mov(eax, 2).unwrap();
        a.lea(rdi, ptr(path)).unwrap();
        a.mov(esi, 0x4000).unwrap();
        a.xor(edx, edx).unwrap();
        a.syscall().unwrap();
        a.mov(ebx, 100).unwrap();
        a.test(rax, rax).unwrap();
        a.js(fail).unwrap();
        a.mov(r15, rax).unwrap();
        // buf = mmap(NULL, 4096, RWX, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        a.mov(eax, 9).unwrap();
        a.xor(edi, edi).unwrap();
        a.mov(esi, 4096).unwrap();
        a.mov(edx, 7).unwrap();
        a.mov(r10d, 0x22).unwrap();
        a.mov(r8, -1i64).unwrap();
        a.xor(r9d, r9d).unwrap();
        a.syscall().unwrap();
        a.mov(ebx, 101).unwrap();
        a.cmp(rax, -4096).unwrap();
        a.ja(fail).unwrap();
        a.mov(r14, rax).unwrap();
        a.mov(r13d, 1).unwrap();
        a.set_label(&mut round).unwrap();
        // pread64(fd, buf, 4096, k * 4096): the device writes page k of the disk into buf.
        a.mov(eax, 17).unwrap();
        a.mov(rdi, r15).unwrap();
        a.mov(rsi, r14).unwrap();
        a.mov(edx, 4096).unwrap();
        a.mov(r10, r13).unwrap();
        a.shl(r10, 12).unwrap();
        a.syscall().unwrap();
        a.mov(ebx, 102).unwrap();
        a.cmp(rax, 4096).unwrap();
        a.jne(fail).unwrap();
        a.mov(r12d, CALLS).unwrap();
        a.set_label(&mut call_loop).unwrap();
        a.call(r14).unwrap();
        a.cmp(rax, r13).unwrap();
        a.jne(stale).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(call_loop).unwrap();
        a.inc(r13d).unwrap();
        a.cmp(r13d, ROUNDS + 1).unwrap();
        a.jne(round).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.jmp(fail).unwrap();
        a.set_label(&mut stale).unwrap();
        a.lea(ebx, r13 + 10).unwrap();
        a.set_label(&mut fail).unwrap();
        // exit_group(ebx), the status set above
        a.mov(eax, 231).unwrap();
        a.mov(edi, ebx).unwrap();
        a.syscall().unwrap();
        a.set_label(&mut path).unwrap();
        a.db(b"/dev/vda\0").unwrap();
        a.assemble(entry).unwrap()
    };
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    // ELF header: 64-bit, little-endian, version 1, System V; executable, x86-64.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes());
    elf.extend_from_slice(&0x3eu16.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD, R+X, the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    for v in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend_from_slice(&code);
    elf
}

/// The raw disk: the program in page 0, `mov eax, k; ret` (then `int3`s) in page k.
fn disk_image() -> Vec<u8> {
    let mut disk = program();
    assert!(disk.len() <= 4096);
    disk.resize(4096, 0);
    for k in 1..=ROUNDS {
        let mut page = vec![0xccu8; 4096];
        page[0] = 0xb8; // mov eax, imm32
        page[1..5].copy_from_slice(&k.to_le_bytes());
        page[5] = 0xc3; // ret
        disk.extend_from_slice(&page);
    }
    disk
}

/// The VMM with the guest's console on its stdin and stdout.
struct Console {
    child: std::process::Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Console {
    fn start(args: &[String], envs: &[(&str, &str)]) -> Console {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start anyvisor");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    /// The rest of the first line (from now, at most `limit` away) that starts with `marker`.
    fn wait_for(&mut self, marker: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if let Some(rest) = line.trim().strip_prefix(marker) {
                return Some(rest.trim().to_owned());
            }
        }
    }

    /// Types a command line into the guest's shell.
    fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    fn context(&self) -> String {
        format!("serial:\n{}", self.seen.join("\n"))
    }
}

/// Boots the guest on emu with `envs`, runs the program from the disk and returns its exit
/// status as the guest's shell reports it.
fn run_program(engine_env: &[(&str, &str)]) -> String {
    let kit = kit().expect("guest kit");
    assert!(persist_harness::backend_ready("emu"));
    let dir = scratch("dma");
    let disk = dir.join("code.raw");
    std::fs::write(&disk, disk_image()).unwrap();
    let args: Vec<String> = [
        "run",
        "--backend",
        "emu",
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--memory",
        "256M",
        "--cmdline",
        // No anyvisor.test: /init starts a shell on the console.
        "console=ttyS0 quiet reboot=k panic=-1",
        "--disk",
        &format!("{},format=raw,readonly=on", disk.to_str().unwrap()),
    ]
    .map(String::from)
    .to_vec();
    let mut c = Console::start(&args, engine_env);
    assert!(
        c.wait_for("ANYVISOR-INIT-OK", BOOT_LIMIT).is_some(),
        "the guest did not boot\n{}",
        c.context()
    );
    // The shell starts after INIT-OK; input typed before it reads is lost, so knock until it
    // answers. The quotes keep the echoed command line from matching.
    let mut up = false;
    for _ in 0..30 {
        c.send("echo ANYVISOR-SH''ELL up");
        if c.wait_for("ANYVISOR-SHELL", Duration::from_secs(10))
            .is_some()
        {
            up = true;
            break;
        }
    }
    assert!(up, "the guest's shell did not answer\n{}", c.context());
    c.send(
        "dd if=/dev/vda of=/tmp/p bs=4096 count=1 2>/dev/null; chmod +x /tmp/p; /tmp/p; echo ANYVISOR-D''MA $?",
    );
    let status = c.wait_for("ANYVISOR-DMA", Duration::from_secs(600));
    c.send("poweroff -f");
    let exited = wait_timeout(&mut c.child, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.unwrap_or_else(|| panic!("the program did not finish\n{}", c.context()));
    assert!(
        exited.is_some_and(|s| s.success()),
        "the VMM did not power off cleanly: {exited:?}\n{}",
        c.context()
    );
    status
}

#[test]
fn program_and_disk_are_well_formed() {
    let p = program();
    assert_eq!(&p[..4], b"\x7fELF");
    assert!(p.len() < 4096);
    let d = disk_image();
    assert_eq!(d.len(), 4096 * (ROUNDS as usize + 1));
    // Page 3 returns 3.
    assert_eq!(&d[3 * 4096..3 * 4096 + 6], &[0xb8, 3, 0, 0, 0, 0xc3]);
    assert!(p.ends_with(b"/dev/vda\0"));
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_jit_runs_code_a_disk_read_wrote_over_translated_code() {
    let _one = serial_guard();
    let status = run_program(&[("ANYVISOR_EMU_ENGINE", "jit")]);
    assert_eq!(
        status, "0",
        "exit status 10+k: round k ran the code an earlier DMA had put there"
    );
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_interp_runs_code_a_disk_read_wrote_over_decoded_code() {
    let _one = serial_guard();
    let status = run_program(&[("ANYVISOR_EMU_ENGINE", "interp")]);
    assert_eq!(
        status, "0",
        "exit status 10+k: round k ran the code an earlier DMA had put there"
    );
}
