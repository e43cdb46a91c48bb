//! `KvmUserAccelerator`: user-mode stretches of a tiny 64-bit guest run on KVM and come back as
//! `UserExit`s with the user-mode state rebuilt. The guest: identity-mapped first GiB with 2 MiB
//! user pages, a GDT with kernel and user segments, a TSS whose RSP0 is [`KSTACK_TOP`], and an
//! IDT of DPL-0 interrupt gates (DPL 3 for vectors 3 and 0x80). No kernel code exists: every exit
//! from user mode must be caught by the accelerator.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hv::state::msr;
use hv::{CpuState, DeviceIo, GuestMemory, UserExit, UserModeAccelerator, UserModeRunner};
use hv_kvm::KvmUserAccelerator;
use iced_x86::code_asm::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

const RAM_SIZE: usize = 4 << 20;
const GDT: u64 = 0x500;
const TSS: u64 = 0x600;
const IDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const KSTACK_TOP: u64 = 0x9000;
const CODE: u64 = 0x10000;
const DATA: u64 = 0x20_0000;
const USER_STACK: u64 = 0x8_0000;
/// Not mapped: PDPT[1] is empty.
const UNMAPPED: u64 = 0x4000_0000;
const STAR: u64 = (0x23 << 48) | (0x08 << 32);

fn accel() -> Option<KvmUserAccelerator> {
    match KvmUserAccelerator::open() {
        Ok(a) => Some(a),
        Err(hv::Error::Unavailable { .. }) => {
            println!("SKIP: no /dev/kvm");
            None
        }
        Err(e) => panic!("opening KVM: {e}"),
    }
}

#[derive(Default)]
struct Io {
    out: std::sync::Mutex<Vec<(u16, Vec<u8>)>>,
}

impl DeviceIo for Io {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.out.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Guest memory with page tables, GDT, TSS and IDT; and a user-mode state at [`CODE`].
fn guest() -> (Arc<GuestMemory>, CpuState) {
    let mem = testkit::memory(RAM_SIZE).unwrap();
    testkit::identity_map(&mem, PML4, true).unwrap();
    let gdt = [
        0,
        testkit::CODE64,                // 0x08 kernel code
        testkit::DATA32,                // 0x10 kernel data
        testkit::tss_entry(TSS as u32), // 0x18 busy TSS
        0,
        testkit::USER_CODE32, // 0x28 user code 32 (unused)
        testkit::USER_DATA,   // 0x30 user data
        testkit::USER_CODE64, // 0x38 user code 64
    ];
    testkit::write_u64s(&mem, GDT, &gdt).unwrap();
    testkit::write_u64(&mem, TSS + 4, KSTACK_TOP).unwrap(); // RSP0
    for v in 0..256u64 {
        let handler = 0xdead_0000u64 + v; // never executed
        let dpl = if v == 3 || v == 0x80 { 3 } else { 0 };
        testkit::write_u64s(&mem, IDT + v * 16, &testkit::idt_gate(handler, dpl)).unwrap();
    }

    let mut s = CpuState::default();
    let mode = testkit::LongMode {
        pml4: PML4,
        idt: IDT,
        ..testkit::LongMode::new(8, (0x18, TSS), USER_STACK)
    };
    mode.user(&mut s, 0x3b, 0x33);
    s.regs.rflags = 0x202;
    s.set_msr(msr::IA32_STAR, STAR);
    s.set_msr(msr::IA32_FMASK, 0x4_0700);
    s.set_msr(msr::IA32_PAT, 0x0007_0406_0007_0406);
    s.set_msr(msr::IA32_TSC, 1_000_000);
    (mem, s)
}

struct Setup {
    mem: Arc<GuestMemory>,
    state: CpuState,
    runner: Box<dyn UserModeRunner>,
    io: Io,
    _accel: KvmUserAccelerator,
}

fn setup(code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Option<Setup> {
    let accel = accel()?;
    let (mem, state) = guest();
    mem.write_slice(&testkit::asm(64, CODE, code), GuestAddress(CODE))
        .unwrap();
    let runner = accel.create_runner(0, mem.clone()).unwrap();
    Some(Setup {
        mem,
        state,
        runner,
        io: Io::default(),
        _accel: accel,
    })
}

impl Setup {
    fn run(&mut self, deadline: Option<Instant>) -> (UserExit, Vec<u64>) {
        let mut written = Vec::new();
        let exit = self
            .runner
            .run(&mut self.state, deadline, &self.io, &mut written)
            .unwrap();
        (exit, written)
    }
}

/// The exit of a run that ended in exception `vector`.
fn event(vector: u8, error_code: Option<u32>) -> UserExit {
    UserExit::Event { vector, error_code }
}

fn spin(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.inc(rax)?;
    a.jmp(top)
}

#[test]
fn syscall_returns_with_rip_after_it() {
    let Some(mut t) = setup(|a| {
        a.mov(rax, 60u64)?;
        a.mov(rbx, 0x1234u64)?;
        a.syscall()?;
        a.nop()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    println!(
        "exit {exit:?} rip {:#x} cr2 {:#x} cs {:#x} rcx {:#x}",
        t.state.regs.rip, t.state.sregs.cr2, t.state.sregs.cs.selector, t.state.regs.rcx
    );
    assert_eq!(exit, UserExit::Syscall);
    assert_eq!(t.state.regs.rip, CODE + 10 + 10 + 2);
    assert_eq!(t.state.regs.rcx, CODE + 22);
    assert_eq!(t.state.regs.rflags, 0x202);
    assert_eq!(t.state.regs.rax, 60);
    assert_eq!(t.state.regs.rbx, 0x1234);
    assert_eq!(t.state.regs.rsp, USER_STACK);
    assert_eq!(t.state.regs.rflags & 0x200, 0x200);
    assert_eq!(t.state.sregs.cs.selector, 0x3b);
}

#[test]
fn ud2_is_invalid_opcode_at_the_instruction() {
    let Some(mut t) = setup(|a| {
        a.nop()?;
        a.ud2()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(6, None));
    assert_eq!(t.state.regs.rip, CODE + 1);
    assert_eq!(t.state.regs.rsp, USER_STACK);
    assert_eq!(t.state.sregs.cs.selector, 0x3b);
}

#[test]
fn deadline_interrupts_a_user_loop_and_state_advances() {
    let Some(mut t) = setup(spin) else { return };
    let mut total = 0;
    for _ in 0..3 {
        let (exit, _) = t.run(Some(Instant::now() + Duration::from_millis(20)));
        assert_eq!(exit, UserExit::Interrupted);
        assert!(t.state.regs.rax > total, "loop made no progress");
        total = t.state.regs.rax;
        assert!(t.state.regs.rip == CODE || t.state.regs.rip == CODE + 3);
    }
    // Speed: iterations per second of `inc rax; jmp` through the runner, including the
    // per-run overhead of three 20 ms runs.
    let start = Instant::now();
    let before = t.state.regs.rax;
    let (exit, _) = t.run(Some(Instant::now() + Duration::from_millis(200)));
    assert_eq!(exit, UserExit::Interrupted);
    let rate = (t.state.regs.rax - before) as f64 / start.elapsed().as_secs_f64();
    println!(
        "user loop via the runner: {:.0} M iterations/s (CPL 0 under KVM here: ~0.3 M/s, docs/kvm-platform.md)",
        rate / 1e6
    );
}

#[test]
fn kick_before_run_returns_at_once() {
    let Some(mut t) = setup(spin) else { return };
    t.runner.kicker().kick();
    let (exit, _) = t.run(None);
    assert_eq!(exit, UserExit::Interrupted);
    assert_eq!(t.state.regs.rip, CODE);
    assert_eq!(t.state.regs.rax, 0);
    // The kick was consumed: a deadline ends the next run.
    let (exit, _) = t.run(Some(Instant::now() + Duration::from_millis(50)));
    assert_eq!(exit, UserExit::Interrupted);
    assert!(t.state.regs.rax > 0);
}

#[test]
fn kick_from_another_thread_interrupts() {
    let Some(mut t) = setup(spin) else { return };
    let k = t.runner.kicker();
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        k.kick();
    });
    let (exit, _) = t.run(None);
    th.join().unwrap();
    assert_eq!(exit, UserExit::Interrupted);
    assert!(t.state.regs.rax > 0);
}

#[test]
fn page_fault_on_unmapped_address_reports_cr2_and_error_code() {
    let Some(mut t) = setup(|a| {
        a.mov(rbx, UNMAPPED + 0x123)?;
        a.mov(qword_ptr(rbx), rax)
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    // Write (bit 1) from user mode (bit 2) to a not-present page (bit 0 clear).
    assert_eq!(exit, event(14, Some(6)));
    assert_eq!(t.state.sregs.cr2, UNMAPPED + 0x123);
    assert_eq!(t.state.regs.rip, CODE + 10);
    assert_eq!(t.state.regs.rsp, USER_STACK);
}

#[test]
fn int3_reports_breakpoint_after_the_instruction() {
    let Some(mut t) = setup(|a| {
        a.nop()?;
        a.int3()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(3, None));
    assert_eq!(t.state.regs.rip, CODE + 2);
}

#[test]
fn int_0x80_through_a_dpl3_gate() {
    let Some(mut t) = setup(|a| {
        a.mov(eax, 1)?;
        a.int(0x80)
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(0x80, None));
    assert_eq!(t.state.regs.rip, CODE + 7);
    assert_eq!(t.state.regs.rax, 1);
}

#[test]
fn int_to_a_dpl0_gate_is_general_protection() {
    let Some(mut t) = setup(|a| a.int(0x40)) else {
        return;
    };
    let (exit, _) = t.run(None);
    // Error code: IDT (bit 1) entry 0x40.
    assert_eq!(exit, event(13, Some((0x40 << 3) | 2)));
    assert_eq!(t.state.regs.rip, CODE);
}

#[test]
fn division_by_zero_is_vector_0() {
    let Some(mut t) = setup(|a| {
        a.xor(ecx, ecx)?;
        a.mov(eax, 5)?;
        a.div(ecx)
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(0, None));
    assert_eq!(t.state.regs.rip, CODE + 7);
}

#[test]
fn user_writes_are_listed_and_dirty_in_the_bitmap() {
    let Some(mut t) = setup(|a| {
        a.mov(rbx, DATA + 0x3008)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.ud2()
    }) else {
        return;
    };
    let (exit, written) = t.run(None);
    assert!(matches!(exit, UserExit::Event { vector: 6, .. }));
    let pfn = (DATA + 0x3000) >> 12;
    println!("pages written: {written:#x?}");
    assert!(written.contains(&pfn), "{written:#x?}");
    let v: u64 = t.mem.read_obj(GuestAddress(DATA + 0x3008)).unwrap();
    assert_eq!(v, 0x1122_3344_5566_7788);
    let region = t.mem.find_region(GuestAddress(0)).unwrap();
    assert!(region.bitmap().dirty_at((DATA + 0x3000) as usize));
    // The next run reports only new writes.
    t.state.regs.rip = CODE + 23; // the ud2 again
    let (_, written) = t.run(None);
    assert!(!written.contains(&pfn), "{written:#x?}");
}

/// Page tables the caller changes between runs are seen by the next run (KVM's shadow pages
/// are dropped), like a TLB flush by the guest kernel.
#[test]
fn page_table_changes_between_runs_are_seen() {
    let Some(mut t) = setup(|a| {
        a.mov(rbx, 0x3000_0000u64)?; // PD entry 0x180
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.ud2()
    }) else {
        return;
    };
    let pde = GuestAddress(0x4000 + 0x180 * 8);
    t.mem.write_obj(0x20_0000u64 | 0x87, pde).unwrap();
    t.mem.write_obj(0x1111u64, GuestAddress(0x20_0000)).unwrap();
    t.mem.write_obj(0x3333u64, GuestAddress(0)).unwrap();
    t.run(None);
    assert_eq!(t.state.regs.rax, 0x1111);
    // Remap the same linear page to another frame, as a kernel would (then flush its TLB).
    t.mem.write_obj(0x87u64, pde).unwrap();
    t.state.regs.rip = CODE;
    t.run(None);
    assert_eq!(t.state.regs.rax, 0x3333);
    let v: u64 = t.mem.read_obj(GuestAddress(8)).unwrap();
    assert_eq!(v, 0x3333);
    // Write-protect it: the store now faults.
    t.mem.write_obj(0x85u64, pde).unwrap();
    t.state.regs.rip = CODE;
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(14, Some(7)));
}

/// Linear page the shadow-page-table tests map through 4 KiB page tables of their own.
const REMAPPED: u64 = 0x3000_0000; // PD entry 0x180
const PDE_REMAPPED: u64 = 0x4000 + 0x180 * 8;
const PT_A: u64 = 0xa000;
const PT_B: u64 = 0xb000;
/// Frames the tests map at `REMAPPED`, each holding its own value.
const FRAMES: [(u64, u64); 3] = [
    (0x30_0000, 0x1111),
    (0x30_1000, 0x2222),
    (0x30_2000, 0x4444),
];

/// [`setup`] with each of `FRAMES` holding its value and `REMAPPED`'s PDE pointing at `PT_A`
/// (still empty: nothing mapped).
fn remap_setup_with(
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Option<Setup> {
    let t = setup(code)?;
    for (frame, v) in FRAMES {
        t.mem.write_obj(v, GuestAddress(frame)).unwrap();
    }
    t.mem
        .write_obj(PT_A | 7, GuestAddress(PDE_REMAPPED))
        .unwrap();
    Some(t)
}

/// `mov rax, [REMAPPED]; ud2`, with `REMAPPED` mapped through `PT_A` to the first frame.
fn remap_setup() -> Option<Setup> {
    let t = remap_setup_with(|a| {
        a.mov(rbx, REMAPPED)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.ud2()
    })?;
    t.mem
        .write_obj(FRAMES[0].0 | 7, GuestAddress(PT_A))
        .unwrap();
    Some(t)
}

impl Setup {
    /// Runs from `CODE` after telling the runner whether the guest flushed its TLB.
    fn rerun(&mut self, flushed: bool) -> UserExit {
        self.runner.set_tlb_flushed(flushed);
        self.state.regs.rip = CODE;
        self.run(None).0
    }
}

/// Without a guest TLB flush the runner keeps KVM's shadow page tables (the point: no rebuild
/// per run), so a remap the guest has not flushed yet may still show the old frame, as a TLB
/// would; after the flush the new frame shows.
#[test]
fn shadow_page_tables_are_kept_until_the_guest_flushes() {
    let Some(mut t) = remap_setup() else {
        return;
    };
    assert_eq!(t.rerun(true), event(6, None));
    assert_eq!(t.state.regs.rax, 0x1111);
    let (runs0, drops0) = hv_kvm::shadow_drop_stats();
    t.mem
        .write_obj(FRAMES[1].0 | 7, GuestAddress(PT_A))
        .unwrap();
    t.rerun(false);
    let (runs1, drops1) = hv_kvm::shadow_drop_stats();
    println!(
        "unflushed remap: user code read {:#x}; this test's run {} dropped the shadow pages",
        t.state.regs.rax,
        if drops1 > drops0 && runs1 == runs0 + 1 {
            ""
        } else {
            "not"
        }
    );
    assert_eq!(
        t.state.regs.rax, 0x1111,
        "the shadow page tables were rebuilt although the guest did not flush"
    );
    t.rerun(true);
    assert_eq!(t.state.regs.rax, 0x2222, "stale translation after a flush");
}

/// The guest kernel frees a page table and reuses its page as data (here filled with entries
/// that still point at the old frame), after pointing the PDE at a new table and flushing:
/// user code sees the new table's frame.
#[test]
fn a_freed_and_reused_page_table_is_not_used_after_a_flush() {
    let Some(mut t) = remap_setup() else {
        return;
    };
    t.rerun(true);
    assert_eq!(t.state.regs.rax, 0x1111);
    t.rerun(false);
    assert_eq!(t.state.regs.rax, 0x1111);
    t.mem
        .write_obj(FRAMES[2].0 | 7, GuestAddress(PT_B))
        .unwrap();
    t.mem
        .write_obj(PT_B | 7, GuestAddress(PDE_REMAPPED))
        .unwrap();
    for i in 0..512 {
        t.mem
            .write_obj(FRAMES[0].0 | 7, GuestAddress(PT_A + i * 8))
            .unwrap();
    }
    t.rerun(true);
    assert_eq!(
        t.state.regs.rax, 0x4444,
        "the freed page table was still used"
    );
}

/// Changes x86 needs no flush for are seen without one: a not-present entry made present (the
/// page fault a kernel answers by mapping the page) and a permission raised (write access
/// granted), since KVM walks the guest's tables again on each fault.
#[test]
fn mappings_added_or_made_writable_need_no_flush() {
    let Some(mut t) = remap_setup_with(|a| {
        a.mov(rbx, REMAPPED)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.ud2()
    }) else {
        return;
    };
    // Not present: user read fault.
    assert_eq!(t.rerun(true), event(14, Some(4)));
    assert_eq!(t.state.sregs.cr2, REMAPPED);
    // Mapped read-only without a flush: the read succeeds, the write faults (protection).
    t.mem
        .write_obj(FRAMES[0].0 | 5, GuestAddress(PT_A))
        .unwrap();
    assert_eq!(t.rerun(false), event(14, Some(7)));
    assert_eq!(t.state.regs.rax, 0x1111);
    // Made writable without a flush: the store goes through.
    t.mem
        .write_obj(FRAMES[0].0 | 7, GuestAddress(PT_A))
        .unwrap();
    assert_eq!(t.rerun(false), event(6, None));
    let v: u64 = t.mem.read_obj(GuestAddress(FRAMES[0].0 + 8)).unwrap();
    assert_eq!(v, 0x1111);
}

/// Per-run cost: a user program that does nothing but `syscall`, re-entered after each exit.
#[test]
fn round_trips_per_second() {
    let Some(mut t) = setup(|a| a.syscall()) else {
        return;
    };
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        t.state.regs.rip = CODE;
        assert_eq!(t.run(None).0, UserExit::Syscall);
    }
    let per = start.elapsed() / n;
    println!("one syscall round trip through the runner, shadow pages dropped: {per:?}");
    let start = Instant::now();
    for _ in 0..n {
        t.runner.set_tlb_flushed(false);
        t.state.regs.rip = CODE;
        assert_eq!(t.run(None).0, UserExit::Syscall);
    }
    let kept = start.elapsed() / n;
    println!("one syscall round trip through the runner, shadow pages kept: {kept:?}");
}

#[test]
fn tsc_continues_from_the_state() {
    let Some(mut t) = setup(|a| {
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.ud2()
    }) else {
        return;
    };
    t.state.set_msr(msr::IA32_TSC, 5_000_000_000);
    let (_, _) = t.run(None);
    let seen = t.state.regs.rax;
    let after = t.state.msr(msr::IA32_TSC).unwrap();
    println!("state TSC 5000000000, user rdtsc {seen}, TSC after the run {after}");
    // PVM: user rdtsc reads the host TSC (no offset), and so does the TSC the run returns.
    assert!(after >= seen);
    assert!(seen >= 5_000_000_000);
}

#[test]
fn sse_state_round_trips_and_xcr0_seen_by_user_code() {
    let Some(mut t) = setup(|a| {
        a.movq(rax, xmm3)?;
        a.add(rax, 1)?;
        a.movq(xmm4, rax)?;
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.mov(rbx, rax)?;
        a.ud2()
    }) else {
        return;
    };
    t.state.fpu.xmm[3][..8].copy_from_slice(&41u64.to_le_bytes());
    let (exit, _) = t.run(None);
    println!(
        "exit {exit:?}, XCR0 seen by user code {:#x}",
        t.state.regs.rbx
    );
    assert_eq!(t.state.fpu.xmm[4][..8], 42u64.to_le_bytes());
}

/// User code uses AVX natively (it sees the host's XCR0 under PVM); the upper halves survive
/// from one run to the next of the same thread.
#[test]
fn avx_state_survives_between_runs() {
    let Some(mut t) = setup(|a| {
        a.vpcmpeqd(ymm5, ymm5, ymm5)?;
        a.ud2()?;
        a.mov(rbx, DATA)?;
        a.vmovdqu(ymmword_ptr(rbx), ymm5)?;
        a.ud2()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(6, None));
    t.state.regs.rip += 2;
    let (exit, _) = t.run(None);
    assert!(
        matches!(exit, UserExit::Event { vector: 6, .. }),
        "{exit:?}"
    );
    let mut b = [0u8; 32];
    t.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, [0xff; 32]);
    assert_eq!(t.state.fpu.xmm[5], [0xff; 16]);
}

#[test]
fn usefulness_probe_and_tsc_frequency() {
    let Some(a) = accel() else { return };
    println!(
        "is_useful (kvm_pvm loaded): {}, tsc_khz {}",
        KvmUserAccelerator::is_useful(),
        a.tsc_khz()
    );
    assert!(a.tsc_khz() > 0);
}

/// Two runners over one memory: each lists the pages the other's user code wrote too.
#[test]
fn two_runners_share_memory_and_the_written_list() {
    let Some(mut t) = setup(|a| {
        a.mov(rbx, DATA + 0x5000)?;
        a.mov(qword_ptr(rbx), rbx)?;
        a.ud2()
    }) else {
        return;
    };
    let mut other = t._accel.create_runner(1, t.mem.clone()).unwrap();
    let (_, written) = t.run(None);
    assert!(written.contains(&((DATA + 0x5000) >> 12)));
    let mut s = t.state.clone();
    s.regs.rip = CODE + 13; // the ud2
    let mut w = Vec::new();
    let exit = other.run(&mut s, None, &t.io, &mut w).unwrap();
    assert!(matches!(exit, UserExit::Event { vector: 6, .. }));
    assert!(w.contains(&((DATA + 0x5000) >> 12)), "{w:#x?}");
    let (accel2_mem, _) = guest();
    assert!(t._accel.create_runner(2, accel2_mem).is_err());
}

/// A kick landing while KVM has queued the #PF of PVM's `syscall` (the fetch at LSTAR, see the
/// module docs of `user_accel`) ends the run as a syscall; the queued #PF must not be delivered
/// by the next run at the user's new RIP (the guest saw "segfault ... error 15" on a data
/// address right after a `syscall`).
#[test]
fn kicks_during_syscalls_leave_no_stale_fault() {
    let Some(mut t) = setup(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.syscall()?;
        a.jmp(top)
    }) else {
        return;
    };
    let k = t.runner.kicker();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let th = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut delay = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k.kick();
                // Vary the moment of the kick across a run (about 1 ms here).
                delay = (delay + 37) % 2000;
                let until = Instant::now() + Duration::from_micros(delay);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let end = Instant::now() + Duration::from_secs(4);
    let (mut syscalls, mut interrupted) = (0u32, 0u32);
    let mut bad = None;
    while Instant::now() < end {
        let (exit, _) = t.run(None);
        match exit {
            UserExit::Syscall => syscalls += 1,
            UserExit::Interrupted => interrupted += 1,
            other => {
                bad = Some((other, t.state.regs.rip, t.state.sregs.cr2));
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    th.join().unwrap();
    println!("{syscalls} syscalls, {interrupted} interrupted runs");
    assert_eq!(bad, None, "stale event after {syscalls} syscalls");
    assert!(syscalls > 0);
}

/// User-mode `cpuid` raises #GP(0) at the instruction (CPUID faulting, which the accelerator
/// turns on), so the caller answers it from the VM's model; the host's XCR0 still shows through
/// `xgetbv` (measured here, documented in docs/cpu-model.md).
#[test]
fn user_cpuid_faults_and_host_xcr0_shows() {
    let Some(mut t) = setup(|a| {
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.mov(r9, rax)?;
        a.mov(eax, 7u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.ud2()
    }) else {
        return;
    };
    let accel = KvmUserAccelerator::open().unwrap();
    assert!(
        hv::UserModeAccelerator::user_visible_extra(&accel, &hv::CpuModel::portable_v3())
            .is_empty(),
        "CPUID faulting is unavailable: user code would see the host's features"
    );
    let (exit, _) = t.run(None);
    assert_eq!(exit, event(13, Some(0)));
    assert_eq!(
        t.state.regs.rip,
        CODE + 2 + 3 + 3 + 5 + 2,
        "#GP at the cpuid"
    );
    println!("XCR0 seen by user code: {:#x}", t.state.regs.r9);
}

/// What `xsavec` writes at CPL 3 under PVM: the guest asked for XCR0 = x87|SSE|AVX (7), but the
/// host's XCR0 is in force, so glibc's lazy-binding trampoline (`_dl_runtime_resolve_xsavec`,
/// mask `0xee` = SSE, AVX, BNDREGS, opmask, ZMM_Hi256, Hi16_ZMM) also saves the AVX-512
/// components whenever the host has them. glibc sizes that save area from CPUID leaf 0xD's
/// sub-leaves, so the model must report their sizes (docs/kvm-platform.md, "XSAVE at CPL 3").
#[test]
fn user_xsavec_saves_the_hosts_xcr0_components() {
    let Some(mut t) = setup(|a| {
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.mov(r9, rax)?;
        a.mov(rbx, DATA)?;
        a.mov(eax, 0xeeu32)?;
        a.xor(edx, edx)?;
        a.xsavec(ptr(rbx))?;
        a.ud2()
    }) else {
        return;
    };
    t.state.sregs.cr4 |= 1 << 18;
    t.state.xcr0 = 7;
    t.mem
        .write_slice(&[0xaa; 4096], GuestAddress(DATA))
        .unwrap();
    let (exit, _) = t.run(None);
    assert!(
        matches!(exit, UserExit::Event { vector: 6, .. }),
        "{exit:?}"
    );
    let host_xcr0 = t.state.regs.r9;
    let mut hdr = [0u8; 16];
    t.mem
        .read_slice(&mut hdr, GuestAddress(DATA + 512))
        .unwrap();
    let xcomp_bv = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    println!(
        "host XCR0 seen by user code {host_xcr0:#x}, XCOMP_BV written by xsavec {xcomp_bv:#x}"
    );
    // The requested-feature bitmap is EDX:EAX & XCR0: the host's XCR0, not the guest's 7.
    assert_eq!(xcomp_bv, (1 << 63) | (0xee & host_xcr0));
}
