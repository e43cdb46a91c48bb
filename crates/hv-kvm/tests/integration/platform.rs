//! Measurements of what this host's KVM really does, kept as tests that print their finding
//! (recorded in docs/kvm-platform.md). Run with `--nocapture` to see the tables.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;

use common::{CODE, DATA, Guest, MMIO, asm, done, kvm};
use hv::{CpuModel, CpuState, DeviceIo, GuestMemory, InstructionEmulator, VcpuExit};
use hv_kvm::KvmHypervisor;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const LEAVES: [u32; 5] = [0, 1, 7, 0x8000_0001, 0x4000_0000];

/// Runs `cpuid` for [`LEAVES`] (sub-leaf 0) at the given CPL and returns what the guest saw.
fn guest_cpuid(h: &KvmHypervisor, model: &CpuModel, user: bool) -> Vec<[u32; 4]> {
    let mut g = Guest::new(h, model.clone());
    let code = asm(CODE, |a| {
        for (i, leaf) in LEAVES.iter().enumerate() {
            a.mov(eax, *leaf)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            let at = DATA + i as u64 * 16;
            a.mov(dword_ptr(at), eax)?;
            a.mov(dword_ptr(at + 4), ebx)?;
            a.mov(dword_ptr(at + 8), ecx)?;
            a.mov(dword_ptr(at + 12), edx)?;
        }
        done(a)
    });
    if user {
        g.load_user(&code);
    } else {
        g.load(&code);
    }
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    (0..LEAVES.len())
        .map(|i| {
            let mut r = [0u32; 4];
            for (j, v) in r.iter_mut().enumerate() {
                *v = g
                    .mem
                    .read_obj(GuestAddress(DATA + i as u64 * 16 + j as u64 * 4))
                    .unwrap();
            }
            r
        })
        .collect()
}

/// Which CPUID leaves `KVM_SET_CPUID2` controls: the guest's view at CPL 0 and CPL 3 against
/// the portable model that was set. Dynamic bits (leaf 1 EBX APIC ID/count, leaf 1 EDX APIC)
/// are KVM's to fill.
#[test]
fn cpuid_leaf_control() {
    let Some(h) = kvm() else { return };
    let model = CpuModel::portable();
    let cpl0 = guest_cpuid(&h, &model, false);
    let cpl3 = guest_cpuid(&h, &model, true);
    for (i, leaf) in LEAVES.iter().enumerate() {
        let want = model.cpuid_value(0, 1, *leaf, 0);
        for (cpl, got) in [(0, cpl0[i]), (3, cpl3[i])] {
            let verdict = if got == want { "honoured" } else { "differs" };
            println!("CPL {cpl} leaf {leaf:#010x}: {verdict}");
            for r in 0..4 {
                if got[r] != want[r] {
                    println!(
                        "    {}: set {:#010x} seen {:#010x} (extra {:#010x}, missing {:#010x})",
                        ["eax", "ebx", "ecx", "edx"][r],
                        want[r],
                        got[r],
                        got[r] & !want[r],
                        want[r] & !got[r]
                    );
                }
            }
        }
    }
    // The guest kernel reads CPUID at CPL 0. Measured there: leaves 0, 0x8000_0001 and
    // 0x4000_0000 exactly as set; leaf 1 as set plus host feature bits (never fewer); leaf 7
    // is the host's whatever was set.
    for (i, leaf) in LEAVES.iter().enumerate() {
        let want = model.cpuid_value(0, 1, *leaf, 0);
        match leaf {
            1 => {
                assert_eq!(cpl0[i][..2], want[..2], "leaf 1 EAX/EBX");
                assert_eq!(
                    cpl0[i][2] & want[2],
                    want[2],
                    "leaf 1 ECX keeps the model's bits"
                );
                assert_eq!(
                    cpl0[i][3] & want[3],
                    want[3],
                    "leaf 1 EDX keeps the model's bits"
                );
            }
            7 => {}
            _ => assert_eq!(cpl0[i], want, "leaf {leaf:#x} at CPL 0"),
        }
    }
}

/// What KVM's instruction emulator (which runs all CPL-0 code on this host) refuses. Each
/// instruction runs at CPL 0 without an `InstructionEmulator`; the outcome is printed.
#[test]
fn kvm_emulator_coverage() {
    let Some(h) = kvm() else { return };
    type Prog = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(&str, Prog); 14] = [
        ("fld1", |a| a.fld1()),
        ("xorps xmm0,xmm0", |a| a.xorps(xmm0, xmm0)),
        ("movdqu xmm0,[m]", |a| a.movdqu(xmm0, xmmword_ptr(DATA))),
        ("movq xmm0,rax", |a| a.movq(xmm0, rax)),
        ("fxsave [m]", |a| a.fxsave(ptr(DATA))),
        ("fxrstor [m]", |a| {
            a.fxsave(ptr(DATA))?;
            a.fxrstor(ptr(DATA))
        }),
        ("lock cmpxchg16b [m]", |a| {
            a.lock().cmpxchg16b(xmmword_ptr(DATA))
        }),
        ("lock cmpxchg8b [m]", |a| {
            a.lock().cmpxchg8b(qword_ptr(DATA))
        }),
        ("lock cmpxchg [m],rcx", |a| {
            a.lock().cmpxchg(qword_ptr(DATA), rcx)
        }),
        ("popcnt rax,rbx", |a| a.popcnt(rax, rbx)),
        ("rdtscp", |a| a.rdtscp()),
        ("rdrand rax", |a| a.rdrand(rax)),
        ("swapgs", |a| a.swapgs()),
        ("xsave [m] (CR4.OSXSAVE off)", |a| a.xsave(ptr(DATA))),
    ];
    let mut failed = Vec::new();
    for (name, prog) in cases {
        let mut g = Guest::new(&h, CpuModel::portable());
        g.load(&asm(CODE, |a| {
            a.mov(edx, 0)?;
            a.mov(eax, 0)?;
            prog(a)?;
            done(a)
        }));
        let outcome = match g.run() {
            Ok(VcpuExit::Interrupted) => {
                let s = g.vcpu.state().unwrap();
                match s.events.exception {
                    Some(e) => format!("exception {}", e.vector),
                    None => "ok".to_string(),
                }
            }
            Ok(other) => format!("{other:?}"),
            Err(e) => {
                failed.push(name);
                format!("refused: {e}")
            }
        };
        println!("{name:32} {outcome}");
    }
    println!("KVM's emulator refuses: {failed:?}");
    assert!(
        failed.contains(&"fld1"),
        "x87 at CPL 0 is expected to need help"
    );
}

/// Completes an instruction by decoding its length and setting RBX: enough to prove the
/// backend reads the state, calls the emulator, and writes the result back.
struct SkipAndMark;

impl InstructionEmulator for SkipAndMark {
    fn emulate_one(
        &self,
        state: &mut CpuState,
        memory: &GuestMemory,
        _io: &dyn DeviceIo,
    ) -> hv::Result<()> {
        let mut bytes = [0u8; 15];
        memory
            .read_slice(&mut bytes, GuestAddress(state.regs.rip))
            .map_err(|e| hv::Error::Unhandled(e.to_string()))?;
        let mut d = iced_x86::Decoder::with_ip(64, &bytes, state.regs.rip, 0);
        let insn = d.decode();
        state.regs.rip = insn.next_ip();
        state.regs.rbx = 0xfeed;
        Ok(())
    }
}

/// Does nothing: the backend must fail instead of retrying forever.
struct NoProgress;

impl InstructionEmulator for NoProgress {
    fn emulate_one(&self, _: &mut CpuState, _: &GuestMemory, _: &dyn DeviceIo) -> hv::Result<()> {
        Ok(())
    }
}

#[test]
fn refused_instructions_go_to_the_instruction_emulator() {
    if kvm().is_none() {
        return;
    }
    let program = asm(CODE, |a| {
        a.fld1()?;
        a.mov(qword_ptr(MMIO), rbx)?;
        done(a)
    });
    let h = KvmHypervisor::open(Some(Arc::new(SkipAndMark))).unwrap();
    let mut g = Guest::new(&h, CpuModel::portable());
    g.load(&program);
    assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
    assert_eq!(
        g.io.take(),
        vec![common::Access::MmioWrite(
            MMIO,
            0xfeedu64.to_le_bytes().to_vec()
        )]
    );

    let h = KvmHypervisor::open(Some(Arc::new(NoProgress))).unwrap();
    let mut g = Guest::new(&h, CpuModel::portable());
    g.load(&program);
    let err = g.run().unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "cannot complete instruction [d9, e8, 48, 89, 1c, 25, 00, 00, 00, 10, e6, f4, eb, fe, 00] at rip {CODE:#x}"
        )
    );
}

/// CPL 3 runs natively, CPL 0 in KVM's emulator: the speed of a two-instruction loop.
#[test]
fn cpl0_is_emulated_cpl3_is_native() {
    let Some(h) = kvm() else { return };
    let spin = asm(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.jmp(top)
    });
    let mut rates = Vec::new();
    for user in [false, true] {
        let mut g = Guest::new(&h, CpuModel::portable());
        if user {
            g.load_user(&spin);
        } else {
            g.load(&spin);
        }
        let k = g.vcpu.kicker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            k.kick();
        });
        assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
        t.join().unwrap();
        let n = g.vcpu.state().unwrap().regs.rax;
        println!(
            "CPL {}: {n} loop iterations in 50 ms",
            if user { 3 } else { 0 }
        );
        rates.push(n);
    }
    assert!(
        rates[1] > rates[0] * 10,
        "CPL 3 should be much faster: {rates:?}"
    );
}

/// KVM here does not check CR4 writes against the CPUID table: a portable-model guest (no
/// XSAVE, no SMEP in its table) can still set CR4.OSXSAVE and CR4.SMEP, and (see
/// `cpuid_leaf_control`) it is shown those features in leaves 1 and 7.
#[test]
fn cr4_bits_beyond_the_model_are_accepted() {
    let Some(h) = kvm() else { return };
    for bit in [18u32, 20] {
        let mut g = Guest::new(&h, CpuModel::portable());
        g.load(&asm(CODE, |a| {
            a.mov(rax, cr4)?;
            a.bts(rax, bit)?;
            a.mov(cr4, rax)?;
            done(a)
        }));
        assert_eq!(g.run().unwrap(), VcpuExit::Interrupted);
        let s = g.vcpu.state().unwrap();
        println!(
            "CR4 bit {bit} set by the guest: {}",
            s.sregs.cr4 & (1 << bit) != 0
        );
        assert!(s.events.exception.is_none());
    }
}
