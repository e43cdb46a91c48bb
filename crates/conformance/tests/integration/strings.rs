//! String instructions with `rep`: memory to memory, backwards, to a port and to MMIO.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

const SRC: u64 = DATA;
const DST: u64 = DATA + 0x1000;

fn rep_movs_and_stos(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.cld()?;
        a.mov(rsi, SRC)?;
        a.mov(rdi, DST)?;
        a.mov(ecx, 37)?;
        a.rep().movsb()?;
        a.mov(r8, rsi)?;
        a.mov(r9, rdi)?;
        a.mov(r10, rcx)?;
        // stosq: 4 qwords of a pattern after the copy.
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(ecx, 4)?;
        a.rep().stosq()?;
        // Backwards: copy 8 bytes ending at SRC+7 to DST+0x107 with DF=1.
        a.std()?;
        a.mov(rsi, SRC + 7)?;
        a.mov(rdi, DST + 0x107)?;
        a.mov(ecx, 8)?;
        a.rep().movsb()?;
        a.cld()?;
        a.mov(r11, rsi)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let src: Vec<u8> = (0..64u8)
        .map(|b| b.wrapping_mul(7).wrapping_add(1))
        .collect();
    g.write(SRC, &src).unwrap();
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!((r.r8, r.r9, r.r10), (SRC + 37, DST + 37, 0));
    assert_eq!(g.read(DST, 37).unwrap(), src[..37]);
    for k in 0..4 {
        assert_eq!(g.read_u64(DST + 37 + 8 * k).unwrap(), 0x1122_3344_5566_7788);
    }
    assert_eq!(g.read(DST + 0x100, 8).unwrap(), src[..8]);
    assert_eq!(r.r11, SRC - 1);
}

fn rep_cmps_and_scas(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.cld()?;
        a.mov(rsi, SRC)?;
        a.mov(rdi, DST)?;
        a.mov(ecx, 16)?;
        a.repe().cmpsb()?; // stops after the first difference (index 5)
        a.pushfq()?;
        a.pop(r8)?;
        a.mov(r9, rcx)?;
        a.mov(rdi, SRC)?;
        a.mov(al, 0x33)?;
        a.mov(ecx, 16)?;
        a.repne().scasb()?; // finds 0x33 at index 9
        a.pushfq()?;
        a.pop(r10)?;
        a.mov(r11, rdi)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let src: Vec<u8> = (0x2au8..0x3a).collect();
    let mut dst = src.clone();
    dst[5] = 0xff;
    g.write(SRC, &src).unwrap();
    g.write(DST, &dst).unwrap();
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!(r.r9, 10, "6 compared");
    assert_eq!(r.r8 & (ZF | CF), CF, "0x2f < 0xff: not equal, borrow");
    assert_eq!(r.r10 & ZF, ZF);
    assert_eq!(r.r11, SRC + 10);
}

fn rep_outsb_to_a_port(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.cld()?;
        a.mov(rsi, SRC)?;
        a.mov(edx, 0x3f8)?;
        a.mov(ecx, 11)?;
        a.rep().outsb()?;
        a.mov(r8, rsi)?;
        a.mov(r9, rcx)?;
        a.mov(rdi, DST)?;
        a.mov(ecx, 3)?;
        a.rep().insb()?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.write(SRC, b"hello, port").unwrap();
    let o = g.go();
    o.assert_clean();
    assert_eq!(g.io.port_bytes(0x3f8), b"hello, port");
    assert_eq!((o.regs().r8, o.regs().r9), (SRC + 11, 0));
    assert_eq!(g.read(DST, 4).unwrap(), [IN_VALUE, IN_VALUE, IN_VALUE, 0]);
}

fn rep_movsb_to_mmio(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.cld()?;
        a.mov(rsi, SRC)?;
        a.mov(rdi, MMIO + 0x10)?;
        a.mov(ecx, 24)?;
        a.rep().movsb()?;
        a.mov(r8, rdi)?;
        // And a read back from MMIO into RAM.
        a.mov(rsi, MMIO + 0x100)?;
        a.mov(rdi, DST)?;
        a.mov(ecx, 2)?;
        a.rep().movsd()?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let src: Vec<u8> = (100..124).collect();
    g.write(SRC, &src).unwrap();
    let o = g.go();
    o.assert_clean();
    assert_eq!(o.regs().r8, MMIO + 0x10 + 24);
    // However a backend splits the copy, the bytes land at consecutive addresses.
    let mut seen = vec![None; 24];
    for (addr, bytes) in g.io.mmio_writes() {
        for (k, b) in bytes.iter().enumerate() {
            let at = (addr + k as u64).wrapping_sub(MMIO + 0x10) as usize;
            assert!(at < 24, "write outside the target: {addr:#x}");
            seen[at] = Some(*b);
        }
    }
    let seen: Vec<u8> = seen
        .into_iter()
        .map(|b| b.expect("every byte written"))
        .collect();
    assert_eq!(seen, src);
    // MMIO reads return 0x10 + i for byte i of each access.
    assert_eq!(
        g.read(DST, 8).unwrap(),
        [0x10, 0x11, 0x12, 0x13, 0x10, 0x11, 0x12, 0x13]
    );
}

conformance!(
    rep_movs_and_stos,
    rep_cmps_and_scas,
    rep_outsb_to_a_port,
    rep_movsb_to_mmio
);
