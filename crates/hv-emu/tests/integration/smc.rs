//! Self-modifying code: a write into code that has been (or is being) decoded must take effect
//! at the next execution of the written instruction, whichever path wrote it (plain store,
//! store into the running block, REP MOVS).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use std::sync::{Arc, Mutex};

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

/// Offset of the first occurrence of `pat` in `code`.
fn find(code: &[u8], pat: &[u8]) -> u64 {
    code.windows(pat.len())
        .position(|w| w == pat)
        .expect("pattern in code") as u64
}

/// A store into an instruction later in the same straight-line run.
fn store_into_the_running_block(hv: &dyn Hypervisor) {
    let build = |imm_at: u64| {
        asm(|a| {
            a.mov(rdi, imm_at)?;
            a.mov(dword_ptr(rdi), 2)?;
            a.mov(eax, 0x1111_1111u32)?;
            a.mov(rsi, DATA)?;
            a.mov(qword_ptr(rsi), rax)?;
            a.hlt()
        })
    };
    let probe = build(0);
    let imm_at = CODE + find(&probe, &[0xb8, 0x11, 0x11, 0x11, 0x11]) + 1;
    let mut g = long_mode_guest(hv, &build(imm_at));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 2);
}

/// A loop whose body patches its own immediate: the second iteration runs the new value. The
/// loop starts the code, so its body is one cached block that the back edge reruns.
fn loop_patches_itself(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, 0x5555_5555u32)?;
        a.add(rcx, rax)?;
        a.mov(dword_ptr(rdi), 7)?;
        a.cmp(rcx, 0x5555_5555 + 7)?;
        a.jb(top)?;
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), rcx)?;
        a.hlt()
    });
    assert_eq!(&code[..5], &[0xb8, 0x55, 0x55, 0x55, 0x55]);
    let mut g = long_mode_guest(hv, &code);
    let mut st = g.state();
    st.regs.rcx = 0;
    st.regs.rdi = CODE + 1;
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 0x5555_5555 + 7, "stale loop body");
}

/// A function that ran once is overwritten with REP MOVSB (the bulk copy path), then called
/// again.
fn rep_movs_over_called_code(hv: &dyn Hypervisor) {
    let func = CODE + 0x2000;
    let new_body = DATA + 0x100;
    let code = asm(|a| {
        a.mov(rbx, func)?;
        a.call(rbx)?;
        a.mov(r12, rax)?;
        a.mov(rsi, new_body)?;
        a.mov(rdi, func)?;
        a.mov(ecx, 6)?;
        a.rep().movsb()?;
        a.call(rbx)?;
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), r12)?;
        a.mov(qword_ptr(rsi + 8), rax)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(
        func,
        &asm_at(64, func, |a| {
            a.mov(eax, 3)?;
            a.ret()
        }),
    );
    g.write_code(
        new_body,
        &asm_at(64, func, |a| {
            a.mov(eax, 9)?;
            a.ret()
        }),
    );
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 3);
    assert_eq!(
        g.read_u64(DATA + 8),
        9,
        "the overwritten function ran stale code"
    );
}

#[test]
fn emu_store_into_the_running_block() {
    store_into_the_running_block(&emu());
}

#[test]
fn emu_loop_patches_itself() {
    loop_patches_itself(&emu());
}

#[test]
fn emu_rep_movs_over_called_code() {
    rep_movs_over_called_code(&emu());
}

// ---- Writes by devices (DMA) and the VMM: they do not go through emu's stores ----

/// Where the DMA tests put the function the guest calls: the second page a device write covers.
const FUNC: u64 = CODE + 0x3000;
/// The device write starts half a page before `FUNC` and ends half a page after it.
const DMA_AT: u64 = FUNC - 0x800;
/// A completion word the device thread sets after writing (as a used ring's index).
const DONE: u64 = DATA + 0x800;
/// Calls of the function before and after the device write: enough for the translator to
/// translate it (its default threshold is 32 runs) and the interpreter to cache it.
const CALLS: i32 = 200;

/// The bytes a device writes at `DMA_AT`: a page of `int3` with `mov eax, v; ret` at `FUNC`.
fn dma_image(v: i32) -> Vec<u8> {
    let mut img = vec![0xccu8; 0x1000];
    let body = asm_at(64, FUNC, |a| {
        a.mov(eax, v)?;
        a.ret()
    });
    img[0x800..0x800 + body.len()].copy_from_slice(&body);
    img
}

/// A device behind port 0x80: a write to it makes the device overwrite `FUNC`'s page with
/// `dma_image(9)` through `GuestMemory` (the path of virtio devices' DMA) — at once in the
/// vCPU's thread, or from a thread of its own that then sets `DONE`, as a device worker
/// publishes a completion.
struct Dma {
    mem: Arc<hv::GuestMemory>,
    threaded: bool,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl hv::DeviceIo for Dma {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, _data: &[u8]) {
        if port != 0x80 {
            return;
        }
        let mem = self.mem.clone();
        let dma = move || {
            mem.write_slice(&dma_image(9), GuestAddress(DMA_AT))
                .unwrap();
            mem.write_obj(1u64, GuestAddress(DONE)).unwrap();
        };
        if self.threaded {
            *self.worker.lock().unwrap() = Some(std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                dma();
            }));
        } else {
            dma();
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// The guest calls `FUNC` (`mov eax, 3; ret`) `CALLS` times, asks the device to rewrite it
/// (`out 0x80`), waits for `DONE`, calls it `CALLS` times again, and stores both sums. The
/// second sum must be that of the new code.
fn device_rewrites_executed_code(engine: hv_emu::Engine, threaded: bool) {
    let code = asm(|a| {
        let mut first = a.create_label();
        let mut wait = a.create_label();
        let mut second = a.create_label();
        a.mov(rbx, FUNC)?;
        a.xor(r12, r12)?;
        a.xor(r13, r13)?;
        a.mov(ecx, CALLS)?;
        a.set_label(&mut first)?;
        a.call(rbx)?;
        a.add(r12, rax)?;
        a.dec(ecx)?;
        a.jnz(first)?;
        a.out(0x80, al)?;
        a.mov(rsi, DONE)?;
        a.set_label(&mut wait)?;
        a.pause()?;
        a.cmp(qword_ptr(rsi), 0)?;
        a.je(wait)?;
        a.mov(ecx, CALLS)?;
        a.set_label(&mut second)?;
        a.call(rbx)?;
        a.add(r13, rax)?;
        a.dec(ecx)?;
        a.jnz(second)?;
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), r12)?;
        a.mov(qword_ptr(rsi + 8), r13)?;
        a.hlt()
    });
    let hv = hv_emu::EmuHypervisor::new().with_engine(engine);
    let mut g = long_mode_guest(&hv, &code);
    g.write_code(DMA_AT, &dma_image(3));
    let io = Dma {
        mem: g.mem.clone(),
        threaded,
        worker: Mutex::new(None),
    };
    let translated = hv_emu::instructions_translated();
    assert_eq!(g.vcpu.run(&io).unwrap(), VcpuExit::Halted);
    if let Some(w) = io.worker.lock().unwrap().take() {
        w.join().unwrap();
    }
    if engine == hv_emu::Engine::Jit {
        assert!(
            hv_emu::instructions_translated() > translated + u64::from(CALLS as u32),
            "the calls did not run as translated code"
        );
    }
    assert_eq!(g.exception(), None);
    assert_eq!(g.read_u64(DATA), 3 * CALLS as u64);
    assert_eq!(
        g.read_u64(DATA + 8),
        9 * CALLS as u64,
        "the function a device rewrote ran stale code"
    );
}

#[test]
fn emu_device_write_over_executed_code_interp() {
    device_rewrites_executed_code(hv_emu::Engine::Interp, false);
}

#[test]
fn emu_device_write_over_executed_code_jit() {
    device_rewrites_executed_code(hv_emu::Engine::Jit, false);
}

#[test]
fn emu_device_thread_write_then_completion_interp() {
    device_rewrites_executed_code(hv_emu::Engine::Interp, true);
}

#[test]
fn emu_device_thread_write_then_completion_jit() {
    device_rewrites_executed_code(hv_emu::Engine::Jit, true);
}
