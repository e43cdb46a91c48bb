//! Runs guest user mode (CPL 3) on KVM for a backend that executes everything else itself.
//!
//! On hosts whose KVM emulates all CPL-0 code (the PVM flavour, see `docs/kvm-platform.md`) a
//! guest kernel is far faster in the `emu` software CPU, while user code runs natively under KVM.
//! [`KvmUserAccelerator`] gives `emu` a KVM vCPU per guest vCPU to run user-mode stretches on.
//!
//! How a run leaves user mode without running guest kernel code in KVM ("trap redirection"):
//! * Each runner owns a few pages of host memory, mapped into the KVM VM as a private memory slot
//!   at [`PRIVATE_GPA`] + `vcpu_id` * [`PRIVATE_STRIDE`] (outside guest RAM and every platform
//!   MMIO window). They hold a shadow PML4, a PDPT/PD/PT chain, a shadow IDT and a trap page.
//! * The shadow PML4 is a copy of the guest's top-level page table with one empty kernel-half
//!   slot pointing at the private chain, which maps the shadow IDT and the trap page there.
//!   CR3 points at the shadow PML4 (same PCID bits), so user code sees exactly its own mappings.
//! * The shadow IDT is the guest's IDT with only the handler offsets replaced by
//!   `trap page + vector`; selector, type, DPL, IST and present bits are the guest's, so privilege
//!   checks, stack switching and the pushed frame are the CPU's own. LSTAR/CSTAR point at
//!   `trap page + 0x100/0x101`.
//! * The trap page is filled with `hlt`. Without an in-kernel local APIC, `hlt` ends `KVM_RUN`
//!   with `KVM_EXIT_HLT` and RIP after it, which names the vector. The frame the CPU pushed on the
//!   kernel stack gives the user-mode RIP/CS/RFLAGS/RSP/SS and the error code.
//! * PVM quirks (measured, `tests/integration/user_accel.rs`): `syscall` from user mode jumps to LSTAR but
//!   stays at CPL 3, so the fetch from the supervisor-only trap page raises #PF there (recognised
//!   by its RIP); `int n` arrives as #UD at the instruction (completed here: gate checks, then the
//!   event with RIP after it). User `rdtsc` reads the host TSC and user code sees the host's
//!   XCR0 whatever KVM is given.
//!
//! Shadow page tables ("the TLB invariant"). Guest page tables change in guest RAM behind KVM's
//! back (the caller's kernel writes them), so KVM never write-protects those writes and its
//! shadow page tables can go stale. They are kept from one run to the next only under the
//! contract of a TLB: KVM's shadow state is a cache of translations that were valid at some
//! point since it was last dropped, exactly what a TLB with paging-structure caches may hold,
//! and an x86 kernel must flush before it relies on a translation being gone or changed
//! (remap, unmap, write-protect, freeing a page table). So a run keeps them only when the
//! caller said the guest vCPU executed no TLB flush since the previous run
//! ([`hv::UserModeRunner::set_tlb_flushed`] with `false`, which emu derives from its own TLB's
//! flush epoch: MOV to CR3, INVLPG, CR0/CR4/EFER paging changes, state loads), and the private
//! chain sits in the same PML4 slot as before. Otherwise (including a caller that never says)
//! all shadow pages are dropped: the private slot is removed and re-added, which makes KVM zap
//! them (KVM_X86_QUIRK_SLOT_ZAP_ALL, on by default). Changes a TLB need not be told about stay
//! correct: KVM walks the guest's tables in guest RAM on every fault, so a not-present entry
//! made present, or a permission raised, is found at the first access that needs it. The
//! shadow PML4 is copied afresh each run for the same reason (only entries a flush covers can
//! differ in a way KVM would miss). Shadow state is VM-wide; a drop by one runner only costs
//! the others a refill.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Instant;

use hv::state::msr;
use hv::{CpuState, DeviceIo, FpuState, GuestMemory, UserExit, VcpuKicker};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::convert::{Kvm as K, XSAVE_HEADER};
use crate::vcpu::{RunPtr, install_kick_handler, kick_signal, serve_io};
use crate::{backend_err, walk};

/// Guest-physical base of the runners' private pages (inside the platform's MMIO hole, below the
/// virtio-mmio slots' neighbours at 0xfec0_0000 and unused by the platform).
pub const PRIVATE_GPA: u64 = 0xfe00_0000;
/// Private pages per runner: 32 KiB, so runners 0..[`MAX_RUNNERS`] use
/// `0xfe00_0000..0xfe10_0000`.
pub const PRIVATE_STRIDE: u64 = 0x8000;
/// Highest vCPU count the private window holds.
pub const MAX_RUNNERS: u32 = 32;

// Page offsets inside a runner's private area.
const PML4_OFF: usize = 0x0000;
const PDPT_OFF: usize = 0x1000;
const PD_OFF: usize = 0x2000;
const PT_OFF: usize = 0x3000;
const IDT_OFF: usize = 0x4000;
const TRAP_OFF: usize = 0x5000;
const PRIVATE_SIZE: usize = PRIVATE_STRIDE as usize;

/// Trap page offsets of the SYSCALL entry points (vectors use 0..=255).
const SYSCALL_ENTRY: u64 = 0x100;
const COMPAT_SYSCALL_ENTRY: u64 = 0x101;
const HLT: u8 = 0xf4;
const XSAVE_AREA: usize = 4096;

/// PML4 slots tried for the private mapping, in order: Linux's unused hole at
/// 0xfffffc0000000000 first (slots 504-507), then any other empty kernel-half slot.
const PREFERRED_SLOTS: [usize; 4] = [504, 505, 506, 507];

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_A: u64 = 0x20;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LMA: u64 = 1 << 10;

/// Vectors whose exceptions push an error code.
const ERROR_CODE_VECTORS: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

/// MSRs loaded from the state before each run; the trap entry points replace LSTAR/CSTAR.
/// IA32_TSC is not among them: under PVM user `rdtsc` reads the host TSC whatever KVM's guest
/// TSC is set to (measured by `tsc_continues_from_the_state`).
const LOADED_MSRS: [u32; 5] = [
    msr::IA32_STAR,
    msr::IA32_FMASK,
    msr::IA32_KERNEL_GS_BASE,
    msr::IA32_PAT,
    msr::IA32_TSC_AUX,
];

/// A run costs ~100-300 µs beyond the user code it runs on this PVM host (the event delivery
/// through the shadow IDT and the trap page's `hlt` are CPL-0 work KVM emulates, plus the
/// ioctls; docs/kvm-platform.md), about what emu's translator takes for this many user-mode
/// instructions: shorter stretches are cheaper left to the caller
/// ([`hv::UserModeRunner::emulate_below`]). Measured against 32 768 and 262 144 with
/// `cargo xtask bench cpu` (docs/kvm-platform.md, "When user mode goes to KVM").
const EMULATE_BELOW: u64 = 131_072;

/// User-mode runs of all runners of this process, and how many of them first dropped KVM's
/// shadow page tables (see the module documentation).
static RUNS: AtomicU64 = AtomicU64::new(0);
static SHADOW_DROPS: AtomicU64 = AtomicU64::new(0);

/// `(runs, runs that dropped KVM's shadow page tables)` of all runners of this process so far.
pub fn shadow_drop_stats() -> (u64, u64) {
    (
        RUNS.load(Ordering::Relaxed),
        SHADOW_DROPS.load(Ordering::Relaxed),
    )
}

/// Runs guest user mode on this host's KVM. See the module documentation.
pub struct KvmUserAccelerator {
    kvm: Kvm,
    tsc_khz: u32,
    cpuid: CpuId,
    /// User-mode `cpuid` raises #GP (CPUID faulting through the vCPU's
    /// MSR_MISC_FEATURES_ENABLES), so the caller answers it from the VM's CPU model.
    cpuid_faulting: bool,
    vm: Mutex<Option<Arc<AccelVm>>>,
}

/// MSR_MISC_FEATURES_ENABLES; bit 0 makes `cpuid` at CPL > 0 raise #GP(0).
const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;

/// Turns on CPUID faulting for `fd`'s user mode. KVM offers it to every guest (it advertises
/// it in MSR_PLATFORM_INFO), and under PVM it is the only control that keeps user code from
/// reading the host's CPUID (measured: `tests/integration/user_accel.rs`,
/// `user_cpuid_faults_and_host_xcr0_shows`). False when KVM refuses the MSR.
fn enable_cpuid_faulting(fd: &VcpuFd) -> bool {
    let entry = kvm_msr_entry {
        index: MSR_MISC_FEATURES_ENABLES,
        data: 1,
        ..Default::default()
    };
    crate::set_msrs(fd, &[entry]).is_ok()
}

impl KvmUserAccelerator {
    /// Opens `/dev/kvm`. Fails with [`hv::Error::Unavailable`] when KVM cannot be used.
    pub fn open() -> hv::Result<KvmUserAccelerator> {
        let kvm = crate::open_kvm(&[
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (kvm_ioctls::Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ])?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| crate::unavailable_os("KVM_GET_SUPPORTED_CPUID failed", &e))?;
        let probe = crate::ScratchVcpu::new(&kvm)?;
        let tsc_khz = probe.tsc_khz()?;
        let cpuid_faulting = enable_cpuid_faulting(&probe.vcpu);
        Ok(KvmUserAccelerator {
            kvm,
            tsc_khz,
            cpuid,
            cpuid_faulting,
            vm: Mutex::new(None),
        })
    }

    /// Whether this host's KVM is worth using only for user mode: true when the PVM flavour of
    /// KVM is loaded (module `kvm_pvm` in `/sys/module`), which runs guest CPL-0 code in its
    /// instruction emulator (~4000× slower than CPL 3, see `docs/kvm-platform.md`). On hosts
    /// with VMX/SVM plain KVM runs the whole guest at native speed and this is not needed.
    pub fn is_useful() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }

    fn vm_for(&self, memory: &Arc<GuestMemory>) -> hv::Result<Arc<AccelVm>> {
        let mut vm = self.vm.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vm.as_ref() {
            if !Arc::ptr_eq(&v.memory, memory) {
                return Err(hv::Error::InvalidState(
                    "all runners of an accelerator must share one guest memory".into(),
                ));
            }
            return Ok(v.clone());
        }
        let v = Arc::new(AccelVm::new(&self.kvm, memory.clone())?);
        *vm = Some(v.clone());
        Ok(v)
    }
}

impl hv::UserModeAccelerator for KvmUserAccelerator {
    fn create_runner(
        &self,
        vcpu_id: u32,
        memory: Arc<GuestMemory>,
    ) -> hv::Result<Box<dyn hv::UserModeRunner>> {
        if vcpu_id >= MAX_RUNNERS {
            return Err(hv::Error::InvalidState(format!(
                "vCPU {vcpu_id} out of range for the user-mode accelerator (at most {MAX_RUNNERS})"
            )));
        }
        let vm = self.vm_for(&memory)?;
        let mut runner = KvmUserRunner::new(vm, vcpu_id, &self.cpuid)?;
        // Without CPUID faulting user code sees the host's CPUID and may use features the
        // model (and so emu) lacks: then every user stretch must run here.
        runner.emulate_below = if self.cpuid_faulting {
            EMULATE_BELOW
        } else {
            0
        };
        if self.cpuid_faulting && !enable_cpuid_faulting(&runner.fd) {
            return Err(hv::Error::InvalidState(
                "KVM refused CPUID faulting on a user-mode runner after accepting it on the \
                 probe vCPU"
                    .into(),
            ));
        }
        Ok(Box::new(runner))
    }

    fn native_features(&self) -> hv::cpu_model::FeatureSet {
        crate::cpuid::host_user_features()
    }

    fn user_visible_extra(&self, model: &hv::CpuModel) -> hv::cpu_model::FeatureSet {
        if self.cpuid_faulting {
            return hv::cpu_model::FeatureSet::default();
        }
        let host = crate::cpuid::host_user_features();
        hv::cpu_model::FeatureSet(host.0 & !model.features().0)
    }

    fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    fn host_tsc(&self) -> Option<u64> {
        // SAFETY: `rdtsc` reads the time-stamp counter; it has no memory effects and this
        // crate only builds for x86-64, where the instruction always exists.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
}

struct RamSlot {
    slot: u32,
    gpa: u64,
    size: u64,
}

/// The KVM VM all runners of an accelerator share: guest RAM slots with dirty logging.
struct AccelVm {
    fd: VmFd,
    memory: Arc<GuestMemory>,
    ram: Vec<RamSlot>,
    /// Pages written since each live runner last collected them.
    written: Mutex<Vec<Weak<Mutex<Vec<u64>>>>>,
    /// Extended (AVX, AVX-512, ...) register state of user threads the guest kernel does not
    /// manage, keyed by [`thread_key`]. See `KvmUserRunner::set_fpu`.
    ext_state: Mutex<ExtStates>,
}

/// Saved XSAVE images of user threads, least recently used evicted beyond [`MAX_EXT_STATES`].
#[derive(Default)]
struct ExtStates {
    /// Image and last use.
    images: std::collections::HashMap<ThreadKey, (Box<[u8; XSAVE_AREA]>, u64)>,
    clock: u64,
}

const MAX_EXT_STATES: usize = 512;
/// Queued written pages of one runner beyond which duplicates are dropped.
const MAX_QUEUED_PAGES: usize = 1 << 16;

type ThreadKey = (u64, u64);

/// A user thread as seen from its state: address space (CR3 without PCID) and TLS base
/// (FS base), which Linux gives every thread its own of.
fn thread_key(state: &CpuState) -> ThreadKey {
    (state.sregs.cr3 & ADDR_MASK, state.sregs.fs.base)
}

impl ExtStates {
    fn get(&mut self, key: ThreadKey) -> Option<[u8; XSAVE_AREA]> {
        self.clock += 1;
        let now = self.clock;
        self.images.get_mut(&key).map(|(img, used)| {
            *used = now;
            **img
        })
    }

    fn put(&mut self, key: ThreadKey, image: [u8; XSAVE_AREA]) {
        self.clock += 1;
        if self.images.len() >= MAX_EXT_STATES
            && !self.images.contains_key(&key)
            && let Some(oldest) = self
                .images
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            self.images.remove(&oldest);
        }
        self.images.insert(key, (Box::new(image), self.clock));
    }
}

impl AccelVm {
    fn new(kvm: &Kvm, memory: Arc<GuestMemory>) -> hv::Result<AccelVm> {
        let fd = kvm.create_vm().map_err(backend_err("KVM_CREATE_VM"))?;
        let mut ram = Vec::new();
        for (i, region) in memory.iter().enumerate() {
            let slot = RamSlot {
                slot: u32::try_from(i)
                    .map_err(|_| hv::Error::InvalidState("too many memory regions".into()))?,
                gpa: region.start_addr().0,
                size: region.len(),
            };
            if slot.gpa < PRIVATE_GPA + PRIVATE_STRIDE * u64::from(MAX_RUNNERS)
                && slot.gpa + slot.size > PRIVATE_GPA
            {
                return Err(hv::Error::InvalidState(format!(
                    "guest RAM at {:#x} overlaps the user-mode accelerator's window at {PRIVATE_GPA:#x}",
                    slot.gpa
                )));
            }
            let region = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: slot.gpa,
                memory_size: slot.size,
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping of `size` bytes owned by `memory`, which
            // this struct keeps alive for as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(backend_err("KVM_SET_USER_MEMORY_REGION"))?;
            ram.push(slot);
        }
        Ok(AccelVm {
            fd,
            memory,
            ram,
            written: Mutex::new(Vec::new()),
            ext_state: Mutex::new(ExtStates::default()),
        })
    }

    fn first_private_slot(&self) -> u32 {
        self.ram.len() as u32
    }

    /// Collects KVM's dirty log (VM-wide), marks the pages in the guest memory's bitmap and
    /// hands them to every live runner's queue.
    fn collect_dirty(&self) -> hv::Result<()> {
        let mut lists = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let mut pages = Vec::new();
        for slot in &self.ram {
            crate::dirty_pages(&self.fd, slot.slot, slot.gpa, slot.size, &mut pages)?;
        }
        if pages.is_empty() {
            return Ok(());
        }
        for &pfn in &pages {
            let gpa = GuestAddress(pfn << 12);
            if let Some((region, offset)) = self.memory.to_region_addr(gpa) {
                region
                    .bitmap()
                    .mark_dirty(offset.0 as usize, hv::PAGE_SIZE as usize);
            }
        }
        lists.retain(|w| w.strong_count() > 0);
        for list in lists.iter().filter_map(Weak::upgrade) {
            let mut list = list.lock().unwrap_or_else(|p| p.into_inner());
            list.extend_from_slice(&pages);
            if list.len() > MAX_QUEUED_PAGES {
                // A runner that has not run for a while: keep each page once.
                list.sort_unstable();
                list.dedup();
            }
        }
        Ok(())
    }
}

/// Host memory of one runner, mapped into the KVM VM as its private slot.
struct PrivatePages {
    ptr: *mut u8,
}

// SAFETY: the mapping is owned by this struct and only accessed through `&mut self` or shared
// reads by KVM; moving it between threads is fine.
unsafe impl Send for PrivatePages {}

impl PrivatePages {
    fn new() -> hv::Result<PrivatePages> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PRIVATE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(hv::Error::Backend {
                op: "mmap",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(PrivatePages { ptr: ptr.cast() })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live read-write mapping of PRIVATE_SIZE bytes owned by `self`;
        // the exclusive borrow of `self` is the only Rust reference to it (KVM's accesses go
        // through the guest and are not Rust references).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, PRIVATE_SIZE) }
    }

    fn put_u64(&mut self, off: usize, v: u64) {
        self.bytes()[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

impl Drop for PrivatePages {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `new`; nothing refers to it any more (the KVM
        // slot is removed by the runner before this is dropped).
        unsafe {
            libc::munmap(self.ptr.cast(), PRIVATE_SIZE);
        }
    }
}

// ---- kicks and deadlines --------------------------------------------------------------------

struct CtlInner {
    /// `None` once the runner is gone.
    run: Option<RunPtr>,
    /// The thread inside `run`, if any.
    thread: Option<libc::pthread_t>,
    /// A kick not consumed yet.
    pending: bool,
    deadline: Option<Instant>,
    /// The deadline of the current run passed.
    fired: bool,
    quit: bool,
}

struct Ctl {
    inner: Mutex<CtlInner>,
    cv: Condvar,
}

impl Ctl {
    fn lock(&self) -> MutexGuard<'_, CtlInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn interrupt(k: &CtlInner) {
    let Some(run) = k.run else {
        return;
    };
    run.set_immediate_exit(1);
    if let Some(thread) = k.thread {
        // SAFETY: `thread` is set only while that thread is inside `run`, which clears it under
        // the same lock before returning, so the thread is alive. The handler does nothing; the
        // signal only makes KVM_RUN return EINTR.
        unsafe {
            libc::pthread_kill(thread, kick_signal());
        }
    }
}

struct Kicker(Arc<Ctl>);

impl VcpuKicker for Kicker {
    fn kick(&self) {
        let mut k = self.0.lock();
        if k.run.is_none() {
            return;
        }
        k.pending = true;
        interrupt(&k);
    }
}

/// The deadline timer of one runner: waits on the condvar until the current run's deadline,
/// then interrupts the run.
fn timer_thread(ctl: Arc<Ctl>) {
    let mut k = ctl.lock();
    loop {
        if k.quit {
            return;
        }
        match k.deadline {
            None => k = ctl.cv.wait(k).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    k.deadline = None;
                    k.fired = true;
                    interrupt(&k);
                } else {
                    k = ctl
                        .cv
                        .wait_timeout(k, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// Ends a run's kick/deadline bookkeeping however `run` returns.
struct RunningGuard<'a>(&'a Ctl);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut k = self.0.lock();
        k.thread = None;
        k.deadline = None;
        k.fired = false;
        if !k.pending
            && let Some(run) = k.run
        {
            run.set_immediate_exit(0);
        }
    }
}

// ---- the runner ---------------------------------------------------------------------------

/// What the current run loaded that the exit handling needs.
struct Loaded {
    /// Linear address of the trap page.
    trap_la: u64,
    cs: hv::Segment,
    ss: hv::Segment,
}

/// A KVM vCPU running one guest vCPU's user mode. Created by [`KvmUserAccelerator`].
pub struct KvmUserRunner {
    vm: Arc<AccelVm>,
    fd: VcpuFd,
    run: RunPtr,
    ctl: Arc<Ctl>,
    timer: Option<std::thread::JoinHandle<()>>,
    pages: PrivatePages,
    slot: u32,
    /// Guest-physical address of the private pages.
    gpa: u64,
    written: Arc<Mutex<Vec<u64>>>,
    /// What KVM holds, to skip loading it again: XCR0, MSRs, and the FPU state of the thread
    /// that ran last.
    kvm_xcr0: Option<u64>,
    kvm_msrs: Vec<kvm_msr_entry>,
    kvm_fpu: Option<(ThreadKey, FpuState, Vec<u8>)>,
    /// The last run was interrupted (kick or deadline) inside KVM, which may have left an event
    /// queued there; see `clear_events`.
    events_stale: bool,
    /// What the caller said about guest TLB flushes before the next run (`set_tlb_flushed`);
    /// taken by each run, `None` counts as a flush.
    tlb_flushed: Option<bool>,
    /// PML4 slot of the private chain in the shadow PML4 KVM last ran with.
    chain_slot: Option<usize>,
    /// What `emulate_below` answers (see [`EMULATE_BELOW`]).
    emulate_below: u64,
}

enum Step {
    Continue,
    /// Stopped on the trap page's `hlt` for entry `index`; `regs` as KVM left them.
    Trap {
        index: u64,
        regs: kvm_regs,
    },
    Interrupted,
}

impl KvmUserRunner {
    fn new(vm: Arc<AccelVm>, vcpu_id: u32, cpuid: &CpuId) -> hv::Result<KvmUserRunner> {
        install_kick_handler()?;
        let mut fd = vm
            .fd
            .create_vcpu(u64::from(vcpu_id))
            .map_err(backend_err("KVM_CREATE_VCPU"))?;
        // The host's CPUID table: KVM then accepts every CR4/XCR0 value a guest kernel may have
        // set. User code executes `cpuid` natively on this host anyway (docs/kvm-platform.md).
        fd.set_cpuid2(cpuid)
            .map_err(backend_err("KVM_SET_CPUID2"))?;
        let run = RunPtr(fd.get_kvm_run() as *mut kvm_run);
        let mut pages = PrivatePages::new()?;
        let gpa = PRIVATE_GPA + PRIVATE_STRIDE * u64::from(vcpu_id);
        pages.bytes()[TRAP_OFF..TRAP_OFF + 0x1000].fill(HLT);
        let ctl = Arc::new(Ctl {
            inner: Mutex::new(CtlInner {
                run: Some(run),
                thread: None,
                pending: false,
                deadline: None,
                fired: false,
                quit: false,
            }),
            cv: Condvar::new(),
        });
        let timer = {
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name(format!("kvm-user-timer-{vcpu_id}"))
                .spawn(move || timer_thread(ctl))
                .map_err(|e| hv::Error::Backend {
                    op: "spawn timer thread",
                    source: e,
                })?
        };
        let written = Arc::new(Mutex::new(Vec::new()));
        vm.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&written));
        let runner = KvmUserRunner {
            slot: vm.first_private_slot() + vcpu_id,
            vm,
            fd,
            run,
            ctl,
            timer: Some(timer),
            pages,
            gpa,
            written,
            kvm_xcr0: None,
            kvm_msrs: Vec::new(),
            kvm_fpu: None,
            events_stale: false,
            tlb_flushed: None,
            chain_slot: None,
            emulate_below: 0,
        };
        runner.map_private(true)?;
        Ok(runner)
    }

    /// Adds or removes the private slot. Removing a slot makes KVM zap all its shadow page
    /// tables (KVM_X86_QUIRK_SLOT_ZAP_ALL, on by default), which is how stale translations are
    /// dropped before a run after a guest TLB flush. (Moving the slot instead, one ioctl rather
    /// than two, measured 10-20x slower per run here.)
    fn map_private(&self, present: bool) -> hv::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.gpa,
            memory_size: if present { PRIVATE_SIZE as u64 } else { 0 },
            userspace_addr: self.pages.ptr as u64,
        };
        // SAFETY: the host range is the live mapping of PRIVATE_SIZE bytes owned by
        // `self.pages`; the slot is removed in `Drop` before the mapping goes away.
        unsafe { self.vm.fd.set_user_memory_region(region) }
            .map_err(backend_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Builds the shadow PML4 and IDT for `state`; returns the trap page's linear address and
    /// the PML4 slot of the private chain.
    fn prepare(&mut self, state: &CpuState) -> hv::Result<(u64, usize)> {
        let mem = &*self.vm.memory;
        let mut pml4 = [0u8; 4096];
        mem.read_slice(&mut pml4, GuestAddress(state.sregs.cr3 & ADDR_MASK))
            .map_err(|_| {
                hv::Error::InvalidState(format!("CR3 {:#x} is not in guest RAM", state.sregs.cr3))
            })?;
        let entry = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&pml4[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let slot = PREFERRED_SLOTS
            .into_iter()
            .chain((256..512).rev())
            .find(|&i| entry(i) & PTE_P == 0)
            .ok_or_else(|| {
                hv::Error::Unhandled(
                    "no free kernel-half PML4 slot for the user-mode accelerator".into(),
                )
            })?;
        let gpa = self.gpa;
        let chain = (gpa + PDPT_OFF as u64) | PTE_P | PTE_RW | PTE_A;
        pml4[slot * 8..slot * 8 + 8].copy_from_slice(&chain.to_le_bytes());
        let base = 0xffff_0000_0000_0000 | ((slot as u64) << 39);
        let trap_la = base + 0x1000;

        let mut idt = [0u8; 4096];
        let len = (usize::from(state.sregs.idt.limit) + 1).min(4096);
        // The IDT is addressed linearly: read it through the guest's page tables.
        read_linear(&state.sregs, mem, state.sregs.idt.base, &mut idt[..len]).ok_or_else(|| {
            hv::Error::InvalidState(format!("IDT at {:#x} is not mapped", state.sregs.idt.base))
        })?;
        for (v, gate) in idt[..len].chunks_exact_mut(16).enumerate() {
            let target = trap_la + v as u64;
            gate[0..2].copy_from_slice(&(target as u16).to_le_bytes());
            gate[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        }
        // The private chain: PDPT[0] -> PD[0] -> PT[0] = shadow IDT, PT[1] = trap page.
        self.pages
            .put_u64(PDPT_OFF, (gpa + PD_OFF as u64) | PTE_P | PTE_RW | PTE_A);
        self.pages
            .put_u64(PD_OFF, (gpa + PT_OFF as u64) | PTE_P | PTE_RW | PTE_A);
        self.pages
            .put_u64(PT_OFF, (gpa + IDT_OFF as u64) | PTE_P | PTE_A);
        self.pages
            .put_u64(PT_OFF + 8, (gpa + TRAP_OFF as u64) | PTE_P | PTE_A);
        let bytes = self.pages.bytes();
        bytes[PML4_OFF..PML4_OFF + 4096].copy_from_slice(&pml4);
        bytes[IDT_OFF..IDT_OFF + 4096].copy_from_slice(&idt);
        Ok((trap_la, slot))
    }

    fn load(&mut self, state: &CpuState) -> hv::Result<Loaded> {
        let s = &state.sregs;
        if s.cr0 & CR0_PG == 0 || s.efer & EFER_LMA == 0 {
            return Err(hv::Error::InvalidState(
                "user-mode run needs long mode with paging".into(),
            ));
        }
        if s.cs.dpl != 3 || s.cs.selector & 3 != 3 {
            return Err(hv::Error::InvalidState(format!(
                "user-mode run at CPL {} (CS {:#x})",
                s.cs.dpl, s.cs.selector
            )));
        }
        if s.cr4 & CR4_LA57 != 0 {
            return Err(hv::Error::Incompatible(
                "5-level paging is not supported by the user-mode accelerator".into(),
            ));
        }
        let no_flush = self.tlb_flushed.take() == Some(false);
        let (trap_la, slot) = self.prepare(state)?;
        // Keep KVM's shadow page tables only as a TLB would keep its entries (module
        // documentation): no guest flush since the last run, and the chain where it was.
        let keep = no_flush && self.chain_slot == Some(slot);
        RUNS.fetch_add(1, Ordering::Relaxed);
        if !keep {
            SHADOW_DROPS.fetch_add(1, Ordering::Relaxed);
            self.chain_slot = None;
            self.map_private(false)?;
            self.map_private(true)?;
            self.chain_slot = Some(slot);
        }

        let mut sregs = *s;
        // Make KVM load an XCR0 into the CPU for user code (see `set_xcr0`).
        sregs.cr4 |= CR4_OSXSAVE;
        sregs.cr3 = (self.gpa + PML4_OFF as u64) | (s.cr3 & 0xfff);
        sregs.idt = hv::DescriptorTable {
            base: trap_la - 0x1000,
            limit: s.idt.limit.min(4095),
        };
        self.fd
            .set_regs(&K::<kvm_regs>::from(&state.regs).0)
            .map_err(backend_err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&K::<kvm_sregs>::from(&sregs).0)
            .map_err(backend_err("KVM_SET_SREGS"))?;
        self.set_xcr0(state)?;
        self.set_fpu(state)?;
        self.clear_events()?;
        let mut entries: Vec<kvm_msr_entry> = LOADED_MSRS
            .iter()
            .filter_map(|&index| {
                state.msr(index).map(|data| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
            })
            .collect();
        for (index, data) in [
            (msr::IA32_LSTAR, trap_la + SYSCALL_ENTRY),
            (msr::IA32_CSTAR, trap_la + COMPAT_SYSCALL_ENTRY),
        ] {
            entries.push(kvm_msr_entry {
                index,
                data,
                ..Default::default()
            });
        }
        if entries != self.kvm_msrs {
            self.kvm_msrs.clear();
            crate::set_msrs(&self.fd, &entries)?;
            self.kvm_msrs = entries;
        }
        Ok(Loaded {
            trap_la,
            cs: s.cs,
            ss: s.ss,
        })
    }

    /// Drops an event KVM still holds from an interrupted run. KVM_RUN returns EINTR between
    /// queueing an exception and delivering it: under PVM `syscall` jumps to LSTAR at CPL 3 and
    /// the fetch there queues #PF (error 0x15, present|user|fetch); a kick in that window ends
    /// the run as a syscall (RIP on the entry point) with the #PF still queued, and the next run
    /// would deliver it at the user's new RIP with the guest's CR2, so the guest kernel saw an
    /// instruction-fetch protection fault on a data address and killed the program.
    fn clear_events(&mut self) -> hv::Result<()> {
        if !self.events_stale {
            return Ok(());
        }
        // Flags 0: exception, interrupt and NMI injection are reset; NMI-pending, SIPI and SMM
        // state are left alone (none is used here).
        self.fd
            .set_vcpu_events(&kvm_vcpu_events::default())
            .map_err(backend_err("KVM_SET_VCPU_EVENTS"))?;
        self.events_stale = false;
        Ok(())
    }

    /// XCR0 for user code. Under PVM the CPU keeps the host's XCR0 (AVX, AVX-512, ...) unless
    /// the vCPU has CR4.OSXSAVE, and user code executes `xgetbv` and AVX natively; so OSXSAVE is
    /// always set here and XCR0 is the guest's, or x87|SSE when the guest has not enabled XSAVE.
    fn set_xcr0(&mut self, state: &CpuState) -> hv::Result<()> {
        let xcr0 = if state.sregs.cr4 & CR4_OSXSAVE != 0 {
            state.xcr0 | 3
        } else {
            3
        };
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        if self.kvm_xcr0 == Some(xcr0) {
            return Ok(());
        }
        self.kvm_xcr0 = None;
        self.fd
            .set_xcrs(&xcrs)
            .map_err(backend_err("KVM_SET_XCRS"))?;
        self.kvm_xcr0 = Some(xcr0);
        Ok(())
    }

    /// Loads the FPU state with KVM_SET_XSAVE (KVM_SET_FPU leaves XSTATE_BV alone, so the CPU
    /// would load the init state instead).
    ///
    /// x87/SSE come from `state`, and so do the components the guest enabled in XCR0. Under PVM
    /// user code also sees the host's XCR0 (AVX, AVX-512) whatever the guest enabled, and uses
    /// those registers natively; the guest kernel does not save them on its context switches.
    /// So the other components are kept here per user thread ([`thread_key`]) from one run to the
    /// next, and a thread seen for the first time starts with them in their init state.
    fn set_fpu(&mut self, state: &CpuState) -> hv::Result<()> {
        let key = thread_key(state);
        if self
            .kvm_fpu
            .as_ref()
            .is_some_and(|(k, f, e)| *k == key && *f == state.fpu && *e == state.xsave_ext)
        {
            return Ok(()); // KVM holds exactly this (the same thread ran last)
        }
        self.kvm_fpu = None;
        let ext = &state.xsave_ext;
        if XSAVE_HEADER + ext.len() > XSAVE_AREA {
            return Err(hv::Error::InvalidState(format!(
                "extended XSAVE state of {} bytes does not fit the {XSAVE_AREA}-byte area",
                ext.len()
            )));
        }
        let saved = self
            .vm
            .ext_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key);
        let mut bytes = saved.unwrap_or([0u8; XSAVE_AREA]);
        let saved_bv = u64_at(&bytes, XSAVE_HEADER);
        bytes[..512].copy_from_slice(&state.fpu.to_fxsave());
        let guest_mask = if state.sregs.cr4 & CR4_OSXSAVE != 0 {
            state.xcr0 | 3
        } else {
            3
        };
        let mut bv = (saved_bv & !guest_mask) | 3;
        if ext.len() >= 64 {
            bv |= u64_at(ext, 0) & guest_mask;
            // The guest's components overwrite the saved ones; the header is rebuilt below.
            bytes[XSAVE_HEADER + 64..XSAVE_HEADER + ext.len()]
                .copy_from_slice(&ext[64.min(ext.len())..]);
        }
        bytes[XSAVE_HEADER..XSAVE_HEADER + 64].fill(0); // standard format, XCOMP_BV 0
        bytes[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&bv.to_le_bytes());
        let mut x = kvm_xsave::default();
        for (w, c) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        // SAFETY: `x` is a complete 4 KiB kvm_xsave; KVM reads no more than that without
        // KVM_CAP_XSAVE2, which this module does not enable.
        unsafe { self.fd.set_xsave(&x) }.map_err(backend_err("KVM_SET_XSAVE"))
    }

    /// x87/SSE and the guest's extended components back into `state`; the whole image is kept
    /// for the thread (see `set_fpu`).
    fn get_fpu(&mut self, state: &mut CpuState) -> hv::Result<()> {
        let x = self.fd.get_xsave().map_err(backend_err("KVM_GET_XSAVE"))?;
        let mut bytes = [0u8; XSAVE_AREA];
        for (c, w) in bytes.chunks_exact_mut(4).zip(x.region.iter()) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        let mut legacy = [0u8; 512];
        legacy.copy_from_slice(&bytes[..512]);
        state.fpu = FpuState::from_fxsave(&legacy);
        let n = state.xsave_ext.len();
        if n > 0 {
            let guest_mask = state.xcr0 | 3;
            state
                .xsave_ext
                .copy_from_slice(&bytes[XSAVE_HEADER..XSAVE_HEADER + n]);
            let bv = u64_at(&bytes, XSAVE_HEADER) & guest_mask & !3;
            state.xsave_ext[..8].copy_from_slice(&bv.to_le_bytes());
        }
        self.vm
            .ext_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(thread_key(state), bytes);
        self.kvm_fpu = Some((thread_key(state), state.fpu, state.xsave_ext.clone()));
        Ok(())
    }

    /// Takes a kick or a passed deadline after KVM_RUN returned EINTR (or was not entered).
    fn take_interrupt(&self, deadline: Option<Instant>) -> bool {
        let mut k = self.ctl.lock();
        let hit = if k.pending {
            k.pending = false;
            true
        } else if k.fired || deadline.is_some_and(|d| Instant::now() >= d) {
            k.fired = false;
            true
        } else {
            false
        };
        if hit {
            self.run.set_immediate_exit(0);
        }
        hit
    }

    fn step(&mut self, io: &dyn DeviceIo, loaded: &Loaded) -> hv::Result<Step> {
        let run_ptr = self.run;
        let exit = self.fd.run().map(|exit| serve_io(exit, io, run_ptr));
        Ok(match exit {
            Ok(None) => Step::Continue,
            Ok(Some(KvmExit::Hlt)) => {
                let regs = self.fd.get_regs().map_err(backend_err("KVM_GET_REGS"))?;
                let rip = regs.rip;
                let index = rip.wrapping_sub(loaded.trap_la).wrapping_sub(1);
                if index > COMPAT_SYSCALL_ENTRY {
                    return Err(hv::Error::Unhandled(format!(
                        "hlt outside the trap page at rip {rip:#x}"
                    )));
                }
                Step::Trap { index, regs }
            }
            Ok(Some(KvmExit::Shutdown)) => {
                return Err(hv::Error::Unhandled(
                    "triple fault while leaving user mode".into(),
                ));
            }
            Ok(Some(KvmExit::Intr)) => Step::Interrupted,
            Ok(Some(KvmExit::InternalError)) => {
                let regs = self.fd.get_regs().map_err(backend_err("KVM_GET_REGS"))?;
                let sregs = self.fd.get_sregs().map_err(backend_err("KVM_GET_SREGS"))?;
                return Err(hv::Error::Unhandled(format!(
                    "KVM could not complete an instruction at rip {:#x} (CPL {})",
                    regs.rip, sregs.cs.dpl
                )));
            }
            Ok(Some(KvmExit::FailEntry(reason, _))) => {
                return Err(hv::Error::Unhandled(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x})"
                )));
            }
            Ok(Some(other)) => {
                return Err(hv::Error::Unhandled(format!(
                    "unexpected KVM exit {other:?} in user mode"
                )));
            }
            Err(e) if e.errno() == libc::EINTR => Step::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => return Err(backend_err("KVM_RUN")(e)),
        })
    }

    /// Copies the vCPU's user-visible state back into `state`: `regs` (as read at the exit),
    /// FS/GS bases from `sregs`, the FPU, and the TSC.
    fn save(&mut self, state: &mut CpuState, regs: kvm_regs, sregs: &kvm_sregs) -> hv::Result<()> {
        state.regs = K(regs).into();
        state.sregs.fs.base = sregs.fs.base;
        state.sregs.gs.base = sregs.gs.base;
        self.get_fpu(state)?;
        // Under PVM user `rdtsc` reads the host TSC unoffset (module documentation), so the
        // TSC user code ran with is the host's; reading it here saves a KVM_GET_MSRS.
        // SAFETY: `rdtsc` reads the time-stamp counter and has no memory effects; this crate
        // only builds for x86-64.
        state.set_msr(msr::IA32_TSC, unsafe { core::arch::x86_64::_rdtsc() });
        Ok(())
    }

    fn get_sregs(&self) -> hv::Result<kvm_sregs> {
        self.fd.get_sregs().map_err(backend_err("KVM_GET_SREGS"))
    }

    /// The vCPU sits on the trap page after leaving user mode through entry `index`: rebuild the
    /// user-mode state from what the CPU saved.
    fn finish_trap(
        &mut self,
        state: &mut CpuState,
        loaded: &Loaded,
        index: u64,
        regs: kvm_regs,
    ) -> hv::Result<UserExit> {
        let kernel_rsp = regs.rsp;
        let sregs = self.get_sregs()?;
        let cr2 = sregs.cr2;
        self.save(state, regs, &sregs)?;
        state.sregs.cs = loaded.cs;
        state.sregs.ss = loaded.ss;
        if index == SYSCALL_ENTRY || index == COMPAT_SYSCALL_ENTRY {
            // SYSCALL saved the next RIP in RCX and RFLAGS in R11; the stack is the user's.
            state.regs.rip = state.regs.rcx;
            state.regs.rflags = state.regs.r11;
            return Ok(UserExit::Syscall);
        }
        let vector = index as u8;
        // 64-bit delivery aligns the new stack to 16 bytes and pushes 5 or 6 quadwords, so the
        // frame carries an error code exactly when it starts on a 16-byte boundary.
        let has_error = kernel_rsp.is_multiple_of(16);
        let mut frame = [0u8; 48];
        let n = if has_error { 48 } else { 40 };
        read_linear(&state.sregs, &self.vm.memory, kernel_rsp, &mut frame[..n]).ok_or_else(
            || hv::Error::Unhandled(format!("interrupt frame at {kernel_rsp:#x} is not mapped")),
        )?;
        let q = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (error_code, f) = if has_error {
            (Some(q(0) as u32), 1)
        } else {
            (None, 0)
        };
        let (rip, cs, rflags, rsp, ss) = (q(f), q(f + 1), q(f + 2), q(f + 3), q(f + 4));
        if cs & 3 != 3 {
            return Err(hv::Error::Unhandled(format!(
                "vector {vector} was raised while leaving user mode (frame CS {cs:#x}, RIP {rip:#x})"
            )));
        }
        let _ = ss;
        if vector == 14
            && (rip == loaded.trap_la + SYSCALL_ENTRY
                || rip == loaded.trap_la + COMPAT_SYSCALL_ENTRY)
        {
            // PVM runs `syscall` from user mode without leaving CPL 3: RIP = LSTAR, RCX and
            // R11 set, and the fetch from the supervisor-only trap page faults.
            state.regs.rip = state.regs.rcx;
            state.regs.rflags = state.regs.r11;
            state.regs.rsp = rsp;
            return Ok(UserExit::Syscall);
        }
        state.regs.rip = rip;
        state.regs.rflags = rflags;
        state.regs.rsp = rsp;
        if vector == 6
            && let Some(exit) = self.software_interrupt(state)
        {
            return Ok(exit);
        }
        if vector == 14 {
            state.sregs.cr2 = cr2;
        }
        let error_code = if ERROR_CODE_VECTORS.contains(&vector) {
            error_code
        } else {
            // A software interrupt (`int n`) to an exception vector pushes no error code.
            None
        };
        Ok(UserExit::Event { vector, error_code })
    }

    /// PVM reports `int n` (CD nn) from user mode as #UD at the instruction. Completes what the
    /// CPU would have done up to the gate: the gate's checks (#GP/#NP with the IDT error code)
    /// or the event with RIP after the instruction. `None` when the #UD was a real one.
    fn software_interrupt(&self, state: &mut CpuState) -> Option<UserExit> {
        let mut insn = [0u8; 2];
        read_linear(&state.sregs, &self.vm.memory, state.regs.rip, &mut insn)?;
        if insn[0] != 0xcd {
            return None;
        }
        let vector = insn[1];
        let idt_error = Some((u32::from(vector) << 3) | 2);
        let gp = UserExit::Event {
            vector: 13,
            error_code: idt_error,
        };
        let off = u64::from(vector) * 16;
        if off + 15 > u64::from(state.sregs.idt.limit) {
            return Some(gp);
        }
        let mut gate = [0u8; 16];
        if read_linear(
            &state.sregs,
            &self.vm.memory,
            state.sregs.idt.base.wrapping_add(off),
            &mut gate,
        )
        .is_none()
        {
            return Some(gp);
        }
        let (kind, dpl, present) = (gate[5] & 0xf, (gate[5] >> 5) & 3, gate[5] & 0x80 != 0);
        if (kind != 0xe && kind != 0xf) || dpl < 3 {
            return Some(gp);
        }
        if !present {
            return Some(UserExit::Event {
                vector: 11,
                error_code: idt_error,
            });
        }
        state.regs.rip = state.regs.rip.wrapping_add(2);
        Some(UserExit::Event {
            vector,
            error_code: None,
        })
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Reads `buf.len()` bytes at linear address `la` through the page tables of `sregs`.
fn read_linear(
    sregs: &hv::SpecialRegisters,
    mem: &GuestMemory,
    la: u64,
    buf: &mut [u8],
) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let addr = la.wrapping_add(done as u64);
        let chunk = (0x1000 - (addr & 0xfff) as usize).min(buf.len() - done);
        let gpa = walk::translate(sregs, mem, addr)?;
        mem.read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
            .ok()?;
        done += chunk;
    }
    Some(())
}

impl hv::UserModeRunner for KvmUserRunner {
    fn run(
        &mut self,
        state: &mut CpuState,
        deadline: Option<Instant>,
        io: &dyn DeviceIo,
        written: &mut Vec<u64>,
    ) -> hv::Result<UserExit> {
        let loaded = self.load(state)?;
        let ctl = self.ctl.clone();
        {
            let mut k = ctl.lock();
            // SAFETY: pthread_self has no preconditions.
            k.thread = Some(unsafe { libc::pthread_self() });
            k.deadline = deadline;
            k.fired = false;
            if k.pending {
                self.run.set_immediate_exit(1);
            }
            ctl.cv.notify_one();
        }
        let guard = RunningGuard(&ctl);
        let result = loop {
            match self.step(io, &loaded) {
                Ok(Step::Continue) => {}
                Ok(Step::Trap { index, regs }) => {
                    break self.finish_trap(state, &loaded, index, regs);
                }
                Ok(Step::Interrupted) => {
                    if !self.take_interrupt(deadline) {
                        continue;
                    }
                    self.events_stale = true;
                    let regs = self.fd.get_regs().map_err(backend_err("KVM_GET_REGS"))?;
                    let index = regs.rip.wrapping_sub(loaded.trap_la);
                    if index <= COMPAT_SYSCALL_ENTRY {
                        // Stopped after leaving user mode, before the trap's `hlt`.
                        break self.finish_trap(state, &loaded, index, regs);
                    }
                    let events = self
                        .fd
                        .get_vcpu_events()
                        .map_err(backend_err("KVM_GET_VCPU_EVENTS"))?;
                    if events.exception.injected != 0
                        || events.exception.pending != 0
                        || events.interrupt.injected != 0
                    {
                        // An event is being delivered: let it reach the trap page.
                        continue;
                    }
                    let sregs = self.get_sregs()?;
                    break self
                        .save(state, regs, &sregs)
                        .map(|()| UserExit::Interrupted);
                }
                Err(e) => break Err(e),
            }
        };
        drop(guard);
        self.vm.collect_dirty()?;
        let mut mine = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.append(&mut mine);
        result
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(Kicker(self.ctl.clone()))
    }

    fn set_tlb_flushed(&mut self, flushed: bool) {
        self.tlb_flushed = Some(flushed);
    }

    fn emulate_below(&self) -> u64 {
        self.emulate_below
    }
}

impl Drop for KvmUserRunner {
    fn drop(&mut self) {
        let (runs, drops) = shadow_drop_stats();
        tracing::debug!(
            "kvm user-mode runners: {runs} runs, {drops} of them dropped the shadow page tables"
        );
        {
            let mut k = self.ctl.lock();
            k.run = None;
            k.thread = None;
            k.quit = true;
            self.ctl.cv.notify_all();
        }
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        let _ = self.map_private(false);
    }
}
