//! State shared by the vCPUs of one VM: interrupt mailboxes, routing copies of APIC IDs, the
//! clock, and the record of which guest pages hold decoded code.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use hv::CpuModel;

use crate::clock::Clock;

/// Interrupts sent to a vCPU by other threads, merged into its local APIC at the next
/// instruction boundary.
#[derive(Default)]
pub struct Mailbox {
    pub irr: [u32; 8],
    pub tmr: [u32; 8],
    pub nmi: bool,
    pub init: bool,
    pub sipi: Option<u8>,
}

pub struct VcpuShared {
    pub id: u32,
    pub apic_id: AtomicU32,
    pub ldr: AtomicU32,
    pub dfr: AtomicU32,
    pub mailbox: Mutex<Mailbox>,
    /// The mailbox has something (checked without the lock on every instruction batch).
    pub pending: AtomicBool,
    pub kicked: AtomicBool,
    /// Nonzero: translated code leaves at its next block head (set with `pending` and
    /// `kicked`; the translator reads it from generated code and clears it per batch).
    pub exit_req: AtomicU32,
    /// The `VmShared::dirty_epoch` this vCPU's translated code runs under, 0 when it runs none
    /// (see `VmShared::quiesce_unlogged_writes`).
    pub jit_active: AtomicU64,
    pub cond: Condvar,
    /// The vCPU is (about to be) inside its user-mode runner: posting and kicking must also
    /// kick the runner.
    pub in_user: AtomicBool,
    /// The kicker of this vCPU's user-mode runner, if it has one.
    pub user_kicker: OnceLock<Arc<dyn hv::VcpuKicker>>,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuShared {
    pub fn new(id: u32) -> VcpuShared {
        VcpuShared {
            id,
            apic_id: AtomicU32::new(id),
            ldr: AtomicU32::new(0),
            dfr: AtomicU32::new(0xffff_ffff),
            mailbox: Mutex::new(Mailbox::default()),
            pending: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            exit_req: AtomicU32::new(0),
            jit_active: AtomicU64::new(0),
            cond: Condvar::new(),
            in_user: AtomicBool::new(false),
            user_kicker: OnceLock::new(),
        }
    }

    pub fn post(&self, f: impl FnOnce(&mut Mailbox)) {
        {
            let mut m = lock(&self.mailbox);
            f(&mut m);
            self.pending.store(true, Ordering::SeqCst);
            self.exit_req.store(1, Ordering::SeqCst);
            self.cond.notify_all();
        }
        self.kick_user();
    }

    pub fn kick(&self) {
        {
            let _m = lock(&self.mailbox);
            self.kicked.store(true, Ordering::SeqCst);
            self.exit_req.store(1, Ordering::SeqCst);
            self.cond.notify_all();
        }
        self.kick_user();
    }

    /// Interrupts the user-mode runner if the vCPU is in it. The vCPU sets `in_user` before
    /// checking `pending`/`kicked` and entering the runner (all sequentially consistent), so
    /// either it sees the flag set here or this sees `in_user` and kicks.
    fn kick_user(&self) {
        if self.in_user.load(Ordering::SeqCst)
            && let Some(k) = self.user_kicker.get()
        {
            k.kick();
        }
    }
}

/// Which guest-physical pages have instructions in some vCPU's block cache, and a write
/// generation per page. A write to a page marked as holding code clears the mark and bumps that
/// page's generation, which invalidates the blocks decoded from it (each block remembers the
/// generation it was decoded under).
pub struct CodeTracker {
    bits: Vec<AtomicU64>,
    gens: Vec<AtomicU32>,
    /// Pages newly marked, ever (the translator drops its direct-write TLB entries when this
    /// changes, so a page that starts holding code is written through the checked path).
    marks: AtomicU64,
}

impl CodeTracker {
    pub fn new(max_addr: u64) -> CodeTracker {
        let pages = ((max_addr >> 12) + 1).min(1 << 28);
        let words = pages.div_ceil(64) as usize;
        CodeTracker {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            gens: (0..pages as usize).map(|_| AtomicU32::new(0)).collect(),
            marks: AtomicU64::new(0),
        }
    }

    /// Records that `page` holds cached code and returns its current generation, or `None` if
    /// the page is not tracked (then its instructions must not be cached). Call before reading
    /// the code bytes, so a concurrent write invalidates what is read.
    #[inline]
    pub fn mark(&self, page: u64) -> Option<u32> {
        let w = self.bits.get((page >> 6) as usize)?;
        let g = self.gens.get(page as usize)?;
        let b = 1u64 << (page & 63);
        if w.load(Ordering::Relaxed) & b == 0 {
            w.fetch_or(b, Ordering::SeqCst);
            self.marks.fetch_add(1, Ordering::SeqCst);
        }
        Some(g.load(Ordering::Acquire))
    }

    /// Whether `page` is marked as holding cached code (untracked pages count as marked).
    #[inline]
    pub fn is_marked(&self, page: u64) -> bool {
        self.bits
            .get((page >> 6) as usize)
            .is_none_or(|w| w.load(Ordering::SeqCst) & (1u64 << (page & 63)) != 0)
    }

    /// How many times a page became marked (see `marks`).
    #[inline]
    pub fn marks(&self) -> u64 {
        self.marks.load(Ordering::SeqCst)
    }

    /// The write generation of `page` (`None` if untracked).
    #[inline]
    pub fn generation(&self, page: u64) -> Option<u32> {
        self.gens
            .get(page as usize)
            .map(|g| g.load(Ordering::Acquire))
    }

    /// Pages `first..=last` were written by someone other than this VM's vCPUs (a device's
    /// DMA, the VMM, a restore; also emu's own writes through `GuestMemory`'s accessors): every
    /// marked page among them gets a new generation, so every vCPU drops the blocks and
    /// translations it made from it at its next lookup. Called by the writing thread after the
    /// data is in memory and before the writer publishes it (see `hv::WriteWatch`).
    ///
    /// The mark stays (the page may well still be executed; a later vCPU store clears it as
    /// usual): a vCPU's own write that also comes through here must still find the mark in
    /// [`Self::on_write`], which is what makes that vCPU leave the block it is running.
    pub fn on_external_write(&self, first: u64, last: u64) {
        // Store-load fence: the written data is globally visible before the marks are read.
        // `mark` sets a page's bit (a SeqCst read-modify-write) before reading its code, so
        // either this sees the bit or that decoder reads the new bytes.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut page = first;
        while page <= last {
            let Some(w) = self.bits.get((page >> 6) as usize) else {
                return;
            };
            let word = w.load(Ordering::SeqCst);
            if word == 0 {
                // 64 pages without code: the common case for DMA.
                page = (page | 63).saturating_add(1);
                continue;
            }
            if word & (1u64 << (page & 63)) != 0
                && let Some(g) = self.gens.get(page as usize)
            {
                g.fetch_add(1, Ordering::AcqRel);
            }
            page = match page.checked_add(1) {
                Some(p) => p,
                None => return,
            };
        }
    }

    /// The address of `page`'s write generation word, which translated code compares at its
    /// chained entry (the word lives as long as this tracker; `None` if untracked).
    pub fn generation_addr(&self, page: u64) -> Option<u64> {
        self.gens.get(page as usize).map(|g| g.as_ptr() as u64)
    }

    /// A write hit `page`. Returns true if that invalidated cached code.
    #[inline]
    pub fn on_write(&self, page: u64) -> bool {
        if let Some(w) = self.bits.get((page >> 6) as usize) {
            let b = 1u64 << (page & 63);
            if w.load(Ordering::Relaxed) & b != 0 {
                w.fetch_and(!b, Ordering::SeqCst);
                if let Some(g) = self.gens.get(page as usize) {
                    g.fetch_add(1, Ordering::AcqRel);
                }
                return true;
            }
        }
        false
    }
}

pub struct VmShared {
    pub model: CpuModel,
    /// The model's ISA features, computed once: instruction families are gated on it.
    pub features: hv::cpu_model::FeatureSet,
    pub vcpu_count: u32,
    pub vcpus: Vec<VcpuShared>,
    pub clock: Clock,
    pub code: CodeTracker,
    /// Interpreter or translator for this VM's vCPUs.
    pub engine: crate::jit::Engine,
    /// Serializes locked read-modify-writes that cannot use a host atomic (misaligned, 16 bytes).
    pub atomic_lock: Mutex<()>,
    /// Bumped when the VM clock is restored; vCPUs then rewrite their pvclock pages.
    pub clock_epoch: AtomicU64,
    /// Bumped after each harvest of the dirty bitmap: translated stores skip marking pages
    /// that were dirty under an older value (see `quiesce_unlogged_writes`). Starts at 1.
    pub dirty_epoch: AtomicU64,
    /// `hv::VmState::user_extra`: features beyond the model the guest's user code has seen.
    pub user_extra: Mutex<hv::cpu_model::FeatureSet>,
}

/// Writes into guest RAM that do not come from this VM's vCPUs (device DMA, the VMM) invalidate
/// the code cached from the pages written.
impl hv::WriteWatch for VmShared {
    fn written(&self, first: u64, last: u64) {
        self.code.on_external_write(first, last);
    }
}

/// Delivery modes of the MSI data / ICR.
pub const DM_FIXED: u32 = 0;
pub const DM_LOWEST: u32 = 1;
pub const DM_NMI: u32 = 4;
pub const DM_INIT: u32 = 5;
pub const DM_SIPI: u32 = 6;

impl VmShared {
    /// Called after the dirty bitmap was reset (harvested): from now on no vCPU may store
    /// through a soft-TLB write entry that skips the bitmap because its page *was* dirty.
    /// Bumps `dirty_epoch` (each vCPU drops such entries when it next enters translated code)
    /// and waits until no vCPU runs translated code under an older epoch (at most one chain,
    /// a batch budget; the exit-request word shortens it). Stores made before this returns
    /// happened before the caller copies the pages, so the copy has them.
    pub fn quiesce_unlogged_writes(&self) {
        let e = self.dirty_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        for v in &self.vcpus {
            v.exit_req.store(1, Ordering::SeqCst);
        }
        for v in &self.vcpus {
            loop {
                let a = v.jit_active.load(Ordering::SeqCst);
                if a == 0 || a >= e {
                    break;
                }
                std::thread::yield_now();
            }
        }
    }

    pub fn new(model: CpuModel, vcpu_count: u32, tsc_khz: u32, max_addr: u64) -> VmShared {
        VmShared {
            features: model.features(),
            model,
            vcpu_count,
            vcpus: (0..vcpu_count).map(VcpuShared::new).collect(),
            clock: Clock::new(tsc_khz),
            code: CodeTracker::new(max_addr),
            dirty_epoch: AtomicU64::new(1),
            engine: crate::jit::Engine::Interp,
            atomic_lock: Mutex::new(()),
            clock_epoch: AtomicU64::new(0),
            user_extra: Mutex::new(hv::cpu_model::FeatureSet::default()),
        }
    }

    fn matches(&self, v: &VcpuShared, dest: u32, logical: bool) -> bool {
        if !logical {
            return dest == 0xff || v.apic_id.load(Ordering::Relaxed) == dest;
        }
        let ldr = v.ldr.load(Ordering::Relaxed) >> 24;
        let flat = v.dfr.load(Ordering::Relaxed) >> 28 == 0xf;
        if flat {
            ldr & dest != 0
        } else {
            // Cluster model: high nibble cluster, low nibble member bits.
            (ldr >> 4) == (dest >> 4) && (ldr & dest & 0xf) != 0
        }
    }

    /// Sends one message (vector, delivery mode, level) to every vCPU `target` accepts.
    pub fn send(&self, targets: impl Iterator<Item = usize>, vector: u8, mode: u32, level: bool) {
        for i in targets {
            let Some(v) = self.vcpus.get(i) else { continue };
            match mode {
                DM_FIXED | DM_LOWEST => v.post(|m| {
                    let w = usize::from(vector / 32);
                    m.irr[w] |= 1 << (vector % 32);
                    if level {
                        m.tmr[w] |= 1 << (vector % 32);
                    }
                }),
                DM_NMI => v.post(|m| m.nmi = true),
                DM_INIT => v.post(|m| m.init = true),
                DM_SIPI => v.post(|m| m.sipi = Some(vector)),
                _ => {}
            }
            if mode == DM_LOWEST {
                break;
            }
        }
    }

    pub fn signal_msi(&self, addr: u64, data: u32) {
        let dest = ((addr >> 12) & 0xff) as u32;
        let logical = addr & (1 << 2) != 0;
        let vector = (data & 0xff) as u8;
        let mode = (data >> 8) & 7;
        let level = data & (1 << 15) != 0;
        let targets: Vec<usize> = (0..self.vcpus.len())
            .filter(|&i| self.matches(&self.vcpus[i], dest, logical))
            .collect();
        self.send(targets.into_iter(), vector, mode, level);
    }

    /// An IPI written to the ICR of vCPU `from`.
    pub fn send_ipi(&self, from: usize, low: u32, high: u32) {
        let vector = (low & 0xff) as u8;
        let mode = (low >> 8) & 7;
        let logical = low & (1 << 11) != 0;
        let level_assert = low & (1 << 14) != 0;
        let trigger_level = low & (1 << 15) != 0;
        if mode == DM_INIT && trigger_level && !level_assert {
            return; // INIT level de-assert: no effect on modern CPUs.
        }
        let dest = high >> 24;
        let n = self.vcpus.len();
        let mut targets = [false; 256];
        match (low >> 18) & 3 {
            0 => {
                for (i, t) in targets.iter_mut().enumerate().take(n) {
                    *t = self.matches(&self.vcpus[i], dest, logical);
                }
            }
            1 => {
                if from < 256 {
                    targets[from] = true;
                }
            }
            2 => targets.iter_mut().take(n).for_each(|t| *t = true),
            _ => {
                for (i, t) in targets.iter_mut().enumerate().take(n) {
                    *t = i != from;
                }
            }
        }
        self.send((0..n.min(256)).filter(|&i| targets[i]), vector, mode, false);
    }
}
