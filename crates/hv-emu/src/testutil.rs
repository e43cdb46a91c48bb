//! What the differential unit tests share (fast handlers, string instructions and the
//! translator, each against the interpreter): a seeded generator, a random 64-bit CPU state
//! and an engine without devices to run it on.

use vm_memory::{Bytes, GuestAddress};

use crate::cpu::{AF, CF, CR0_PE, CS, Cpu, EFER_LMA, EFER_LME, OF, PF, SF, ZF};
use crate::exec::Exec;
use crate::mmu::Ram;
use crate::vcpu::NoIo;
use crate::vm::VmShared;

/// xorshift64: a seed gives the same sequence on both sides of a comparison.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A flat long-mode CPU at RIP 0x1000 with random registers and arithmetic flags. The address
/// registers (rbx, rsp, rbp, rsi, rdi) point into `[base, base + span)`, aligned down to
/// `align` (a power of two); rcx is a small count.
pub(crate) fn cpu64(rng: &mut Rng, base: u64, span: u64, align: u64) -> Cpu {
    let mut c = Cpu::new(0);
    c.efer = EFER_LMA | EFER_LME;
    c.cr0 = CR0_PE;
    c.seg[CS] = crate::system::flat_code(8, 0, true);
    for (k, g) in c.gpr.iter_mut().enumerate() {
        *g = match k {
            3..=7 => (base + rng.next() % span) & !(align - 1),
            1 => rng.next() % 0x100,
            _ => rng.next(),
        };
    }
    c.rflags = 2 | (rng.next() & (CF | PF | AF | ZF | SF | OF));
    c.rip = 0x1000;
    c
}

/// Panics, naming `ctx` and the first byte that differs, unless the first `len` bytes of `x`
/// and `y` (the memories of two runs) are the same.
pub(crate) fn assert_same_memory(x: &hv::GuestMemory, y: &hv::GuestMemory, len: usize, ctx: &str) {
    let read = |m: &hv::GuestMemory| {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    let (a, b) = (read(x), read(y));
    if a != b {
        let k = (0..len).find(|&k| a[k] != b[k]).unwrap_or(len);
        panic!("{ctx}: memory at {k:#x}: {:?} vs {:?}", a.get(k), b.get(k));
    }
}

/// Runs `f` on an `Exec` of `cpu` over `mem` (no devices, no local APIC), as the tests run
/// either engine.
pub(crate) fn exec<T>(
    cpu: &mut Cpu,
    mem: &hv::GuestMemory,
    vm: &VmShared,
    f: impl FnOnce(&mut Exec<'_>) -> T,
) -> T {
    let ram = Ram::new(mem);
    let mut ex = Exec {
        cpu,
        mem,
        ram: &ram,
        io: &NoIo,
        vm,
        lapic_enabled: false,
    };
    f(&mut ex)
}
