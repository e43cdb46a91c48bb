//! SSE basics (movdqu, pxor, paddd, pshufd) and `lock cmpxchg16b`. On KVM at CPL 0 these go
//! through emu's instruction emulator behind KVM (KVM's own emulator refuses most of them).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn sse_basics(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA)?;
        a.movdqu(xmm0, xmmword_ptr(rsi))?;
        a.movdqu(xmm1, xmmword_ptr(rsi + 16))?;
        a.paddd(xmm0, xmm1)?;
        a.movdqu(xmmword_ptr(rsi + 32), xmm0)?;
        a.pshufd(xmm2, xmm0, 0x1b)?; // reverse the dwords
        a.movdqu(xmmword_ptr(rsi + 48), xmm2)?;
        a.pxor(xmm3, xmm3)?;
        a.pxor(xmm1, xmm1)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let x: Vec<u8> = [1u32, 2, 0xffff_ffff, 0x8000_0000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let y: Vec<u8> = [10u32, 20, 1, 0x8000_0000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    g.write(DATA, &x).unwrap();
    g.write(DATA + 16, &y).unwrap();
    let mut st = g.vcpu.state().unwrap();
    st.fpu.xmm[3] = [0xaa; 16];
    g.vcpu.set_state(&st).unwrap();
    let o = g.go();
    o.assert_clean();
    assert_eq!(u32s(&g.read(DATA + 32, 16).unwrap()), [11, 22, 0, 0]);
    assert_eq!(u32s(&g.read(DATA + 48, 16).unwrap()), [0, 0, 22, 11]);
    assert_eq!(u32s(&o.state.fpu.xmm[0]), [11, 22, 0, 0]);
    assert_eq!(u32s(&o.state.fpu.xmm[2]), [0, 0, 22, 11]);
    assert_eq!(o.state.fpu.xmm[3], [0; 16]);
    assert_eq!(o.state.fpu.xmm[1], [0; 16]);
}

fn cmpxchg16b(hv: &dyn Hypervisor) {
    let target = DATA + 0x100; // 16-byte aligned
    let code = asm(|a| {
        a.mov(rsi, target)?;
        // Equal: store RCX:RBX, ZF=1.
        a.mov(rax, 0x1111u64)?;
        a.mov(rdx, 0x2222u64)?;
        a.mov(rbx, 0x3333u64)?;
        a.mov(rcx, 0x4444u64)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.pushfq()?;
        a.pop(r8)?;
        // Not equal now: RDX:RAX loaded with memory, ZF=0.
        a.mov(rax, 0x1111u64)?;
        a.mov(rdx, 0x2222u64)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.pushfq()?;
        a.pop(r9)?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.write_u64(target, 0x1111).unwrap();
    g.write_u64(target + 8, 0x2222).unwrap();
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!(r.r8 & ZF, ZF);
    assert_eq!(r.r9 & ZF, 0);
    assert_eq!((r.r10, r.r11), (0x3333, 0x4444));
    assert_eq!(g.read_u64(target).unwrap(), 0x3333);
    assert_eq!(g.read_u64(target + 8).unwrap(), 0x4444);
}

fn cmpxchg16b_misaligned_raises_gp(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA + 8)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.go().assert_exception(13, 0);
}

conformance!(sse_basics, cmpxchg16b, cmpxchg16b_misaligned_raises_gp);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Random MMX/SSE blocks from random FP states: KVM (the host CPU) against emu, bit for bit.
/// `ANYVISOR_SSE_DIFF_BLOCKS` (default 400) and `ANYVISOR_SSE_DIFF_SEED` choose the run.
#[test]
fn sse_differential() {
    let count = env_u64("ANYVISOR_SSE_DIFF_BLOCKS", 400);
    let seed = env_u64("ANYVISOR_SSE_DIFF_SEED", 0x55e_5eed);
    let Some(report) = conformance::diff_sse::differential(seed, count, 10) else {
        return;
    };
    let report = report.expect("differential run");
    println!(
        "sse differential: seed {seed:#x}: {} blocks ({} ran to their end), {} instructions, {} divergences, {} known (misaligned #GP seen as #UD through PVM)",
        report.blocks,
        report.completed,
        report.instructions,
        report.divergences.len(),
        report.known.len()
    );
    if let Some(d) = report.known.first() {
        println!(
            "NOTE: known PVM difference (not emu), block {}: {}",
            d.block, d.what
        );
    }
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert_eq!(report.divergences.len(), 0);
}
