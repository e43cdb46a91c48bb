//! Guest time: the TSC and kvm-clock.
//!
//! `host_ns` counts from the VM's creation (the host's monotonic clock). kvm-clock is `host_ns`
//! plus a VM-wide offset (so a restored VM continues its clock). A vCPU's TSC is the *raw TSC*
//! plus its own offset (so `IA32_TSC` writes and restores work), never below its floor
//! (`Cpu::tsc_at`). The raw TSC is, by mode:
//!
//! * **host** ([`Clock::fixed_tsc`], the hybrid with an accelerator whose user code reads the
//!   host TSC): the host TSC itself, as the accelerator reads it; TSC writes are not honoured.
//! * **paced**: the host TSC minus its value when the clock was made (so it starts near 0),
//!   read with `hv_emu_jit_rt::host_tsc`, when the host TSC can pace the guest's: constant and
//!   nonstop (`/proc/cpuinfo` flags) and running at the VM's `tsc_khz` ([`host_tsc_khz`]).
//!   Translated `rdtsc`/`rdtscp` then read the host counter themselves and give exactly what
//!   the interpreter gives (`jit/time.rs`). Also the raw TSC of a hybrid VM that left the host
//!   TSC ([`Clock::leave_host_tsc`]) on such a host.
//! * **scaled**: otherwise (another `tsc_khz`, no constant TSC), `host_ns` scaled to `tsc_khz`.
//!
//! Scaled, the TSC and kvm-clock are both linear in `host_ns`, so the pvclock page written once
//! stays exact. Host and paced, the TSC runs at the host's rate, which the monotonic clock
//! follows to the host's NTP correction (parts per million), as under KVM.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Clock {
    origin: Instant,
    /// The host TSC when the clock was made, if the host TSC paces the raw TSC (see the
    /// module doc): raw TSC = host TSC - this (wrapping).
    tsc_origin: Option<u64>,
    /// Whether `host_tsc`'s counter is this host's `rdtsc` (checked in [`Clock::use_host_tsc`]):
    /// then translated code can read it.
    host_tsc_is_rdtsc: bool,
    pub tsc_khz: u32,
    /// kvm-clock ns = host ns + this (wrapping).
    kvmclock_offset: AtomicU64,
    /// The host TSC, when guest user mode runs on hardware that reads it unoffset (see
    /// `hv::UserModeAccelerator::host_tsc`): then it is the guest TSC, and TSC writes are not
    /// honoured (user code would not see them).
    host_tsc: Option<Arc<dyn hv::UserModeAccelerator>>,
    /// Set when a restored state's TSC is not the host's: the guest keeps its own TSC (offset
    /// from the host clock) and its user mode no longer runs on the accelerator.
    left_host_tsc: AtomicBool,
    /// The host instant (ns + 1; 0 = none) every state read and write uses while no vCPU runs,
    /// so that the TSC of each vCPU and kvm-clock in a saved VM describe one instant and a
    /// restored VM starts them at one instant. Without it a snapshot taken on a loaded host
    /// could hold a TSC and a kvm-clock reading tens of milliseconds apart, which the guest's
    /// clocksource watchdog reports as TSC skew after the restore.
    state_instant: AtomicU64,
    /// vCPUs inside `Vcpu::run`. While any runs, state reads are live (no instant is fixed).
    running: AtomicU64,
}

/// How far (in ms of TSC ticks) a restored TSC may be from the host's and still be taken as
/// the host's: the pause of a move on one host, not a different timeline.
const HOST_TSC_TOLERANCE_MS: u64 = 100;

/// The guest TSC frequency when the VM config does not give one: the host's, from
/// `/proc/cpuinfo`, else 2 GHz.
pub fn default_tsc_khz() -> u32 {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo_khz(&text).unwrap_or(2_000_000)
}

/// The first `cpu MHz` of a `/proc/cpuinfo` text, in kHz.
fn cpuinfo_khz(text: &str) -> Option<u32> {
    for line in text.lines() {
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or("").trim();
        if key == "cpu MHz"
            && let Some(mhz) = parts.next().and_then(|v| v.trim().parse::<f64>().ok())
            && mhz > 100.0
            && mhz < 100_000.0
        {
            return Some((mhz * 1000.0).round() as u32);
        }
    }
    None
}

/// Whether the first `flags` line of a `/proc/cpuinfo` text has `constant_tsc` and
/// `nonstop_tsc` (a TSC that ticks at one rate in every P-, C- and T-state).
fn cpuinfo_constant_tsc(text: &str) -> bool {
    text.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == "flags"))
        .and_then(|l| l.split_once(':'))
        .is_some_and(|(_, f)| {
            let words: Vec<&str> = f.split_whitespace().collect();
            words.contains(&"constant_tsc") && words.contains(&"nonstop_tsc")
        })
}

/// How far (parts per million) the measured host TSC rate may be from `cpu MHz`: the host
/// kernel's NTP correction of its clock is at most 500 ppm, a `cpu MHz` that is the current
/// core frequency (not the TSC's) is off by percents.
const RATE_TOLERANCE_PPM: u64 = 1000;

/// The host TSC's rate in kHz when it can pace the guest TSC (read once per process):
/// `/proc/cpuinfo` shows a constant, nonstop TSC, and its `cpu MHz` agrees with the TSC ticks
/// counted across 10 ms of the monotonic clock ([`RATE_TOLERANCE_PPM`]; on hosts whose
/// `cpu MHz` is the current core frequency it does not).
pub fn host_tsc_khz() -> Option<u32> {
    static RATE: OnceLock<Option<u32>> = OnceLock::new();
    *RATE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        if !cpuinfo_constant_tsc(&text) {
            return None;
        }
        let khz = cpuinfo_khz(&text)?;
        let measured = measured_tsc_khz()?;
        let off = measured.abs_diff(u64::from(khz));
        (off.saturating_mul(1_000_000) <= u64::from(khz).saturating_mul(RATE_TOLERANCE_PPM))
            .then_some(khz)
    })
}

/// Host TSC ticks per ms across 10 ms of the monotonic clock. Each end is the tightest of five
/// TSC reads bracketing a clock read, so a preemption between them does not count.
fn measured_tsc_khz() -> Option<u64> {
    let pair = || {
        (0..5)
            .map(|_| {
                let a = hv_emu_jit_rt::host_tsc();
                let t = Instant::now();
                let b = hv_emu_jit_rt::host_tsc();
                (b.wrapping_sub(a), a.wrapping_add(b.wrapping_sub(a) / 2), t)
            })
            .min_by_key(|p| p.0)
    };
    let (_, ta, ia) = pair()?;
    std::thread::sleep(Duration::from_millis(10));
    let (_, tb, ib) = pair()?;
    let ns = u64::try_from(ib.duration_since(ia).as_nanos()).ok()?;
    let ticks = tb.checked_sub(ta)?;
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(ns.max(1))).ok()
}

impl Clock {
    /// A clock at `tsc_khz`, paced by the host TSC when that runs at `tsc_khz`
    /// ([`host_tsc_khz`]).
    pub fn new(tsc_khz: u32) -> Clock {
        let host = host_tsc_khz();
        let paced = host == Some(tsc_khz.max(1));
        tracing::debug!(
            "emu clock: TSC at {tsc_khz} kHz, {} (host TSC usable at {host:?} kHz)",
            if paced {
                "paced by the host TSC"
            } else {
                "scaled from the monotonic clock"
            }
        );
        Clock::with_pacing(tsc_khz, paced)
    }

    /// A clock at `tsc_khz` whose raw TSC is paced by the host TSC (`paced`) or scaled from the
    /// monotonic clock (tests choose the mode; [`Clock::new`] decides it from the host).
    pub fn with_pacing(tsc_khz: u32, paced: bool) -> Clock {
        Clock {
            origin: Instant::now(),
            tsc_origin: paced.then(hv_emu_jit_rt::host_tsc),
            host_tsc_is_rdtsc: false,
            tsc_khz: tsc_khz.max(1),
            kvmclock_offset: AtomicU64::new(0),
            host_tsc: None,
            left_host_tsc: AtomicBool::new(false),
            state_instant: AtomicU64::new(0),
            running: AtomicU64::new(0),
        }
    }

    /// Takes the guest TSC from `accel.host_tsc()` (when it gives one).
    pub fn use_host_tsc(&mut self, accel: Arc<dyn hv::UserModeAccelerator>) {
        // Its counter is this host's `rdtsc` when a reading of it falls between two of ours
        // (another counter, e.g. a test's, would have to land in a window of some hundred
        // ticks); only then does translated code read the TSC itself.
        let before = hv_emu_jit_rt::host_tsc();
        let Some(t) = accel.host_tsc() else {
            return;
        };
        let after = hv_emu_jit_rt::host_tsc();
        self.host_tsc_is_rdtsc = before <= t && t <= after;
        self.host_tsc = Some(accel);
    }

    /// The guest TSC is the host's: it cannot be offset.
    pub fn fixed_tsc(&self) -> bool {
        self.host_tsc.is_some() && !self.left_host_tsc.load(Ordering::Acquire)
    }

    /// Whether a loaded state's guest TSC `tsc` lets the guest keep the host's TSC as its own:
    /// 0, the reset value of a fresh boot or reboot (`machine::boot`; no VM that ran has it,
    /// and a guest that just reset has no earlier reading to stay continuous with), or the
    /// host's TSC now within a move's pause ([`Clock::is_host_tsc`]).
    pub fn takes_host_tsc(&self, tsc: u64) -> bool {
        tsc == 0 || self.is_host_tsc(tsc)
    }

    /// Whether `tsc` (a restored guest TSC) is the host's TSC now, within a move's pause.
    pub fn is_host_tsc(&self, tsc: u64) -> bool {
        match self.host_tsc.as_ref().and_then(|a| a.host_tsc()) {
            Some(now) => {
                now.abs_diff(tsc) <= u64::from(self.tsc_khz).saturating_mul(HOST_TSC_TOLERANCE_MS)
            }
            None => false,
        }
    }

    /// From now on the guest TSC is the host clock scaled plus per-vCPU offsets, as without an
    /// accelerator, and user mode is no longer handed to the accelerator.
    pub fn leave_host_tsc(&self) {
        self.left_host_tsc.store(true, Ordering::Release);
    }

    /// Whether user mode may run on the accelerator: not once the guest TSC left the host's,
    /// since accelerated user code reads the host TSC unoffset.
    pub fn accel_allowed(&self) -> bool {
        !(self.host_tsc.is_some() && self.left_host_tsc.load(Ordering::Acquire))
    }

    /// The TSC before any per-vCPU offset, at VM-clock time `ns` (which must be now when the
    /// host TSC is the guest's or paces it: [`Clock::follows_host_tsc`]).
    #[inline]
    pub fn raw_tsc(&self, ns: u64) -> u64 {
        if let Some(a) = self.host_tsc.as_ref().filter(|_| self.fixed_tsc()) {
            return a.host_tsc().unwrap_or_else(|| self.ns_to_tsc(ns));
        }
        match self.tsc_origin {
            Some(o) => hv_emu_jit_rt::host_tsc().wrapping_sub(o),
            None => self.ns_to_tsc(ns),
        }
    }

    /// Whether the raw TSC is read from the host TSC (host or paced mode, see the module doc)
    /// rather than scaled from VM-clock time.
    pub fn follows_host_tsc(&self) -> bool {
        self.fixed_tsc() || self.tsc_origin.is_some()
    }

    /// What translated code adds to this host's `rdtsc` to get the raw TSC now (minus the
    /// origin, wrapping), when that is exactly [`Clock::raw_tsc`]: host mode with an
    /// accelerator whose counter is `rdtsc`, or paced mode. `None`: translated code leaves TSC
    /// reads to the interpreter.
    pub fn rdtsc_base(&self) -> Option<u64> {
        if self.fixed_tsc() {
            return self.host_tsc_is_rdtsc.then_some(0);
        }
        self.tsc_origin.map(u64::wrapping_neg)
    }

    /// The host instant that state reads and writes use while no vCPU runs (see
    /// `state_instant`): fixed by the first one after a vCPU ran. While a vCPU runs (a state
    /// read of a running VM, e.g. a migration's description), it is simply now.
    pub fn state_ns(&self) -> u64 {
        let now = self.host_ns();
        if self.running.load(Ordering::Acquire) != 0 {
            return now;
        }
        match self.state_instant.compare_exchange(
            0,
            now.saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => now,
            Err(fixed) => fixed - 1,
        }
    }

    /// A vCPU enters `run`: the next state access after every vCPU left takes a new instant.
    pub fn enter_run(&self) {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.state_instant.store(0, Ordering::Release);
    }

    /// A vCPU left `run`.
    pub fn leave_run(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// The TSC before any per-vCPU offset at state instant `ns`: when the host TSC is the
    /// guest's or paces it, the raw TSC now minus the ticks since `ns`.
    pub fn raw_tsc_at_state(&self, ns: u64) -> u64 {
        if self.follows_host_tsc() {
            let since = self.host_ns().saturating_sub(ns);
            self.raw_tsc(ns).wrapping_sub(self.ns_to_tsc(since))
        } else {
            self.ns_to_tsc(ns)
        }
    }

    pub fn host_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The host instant of VM-clock time `ns`.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.origin + std::time::Duration::from_nanos(ns)
    }

    pub fn ns_to_tsc(&self, ns: u64) -> u64 {
        (u128::from(ns) * u128::from(self.tsc_khz) / 1_000_000) as u64
    }

    pub fn tsc_to_ns(&self, tsc: u64) -> u64 {
        (u128::from(tsc) * 1_000_000 / u128::from(self.tsc_khz)).min(u128::from(u64::MAX)) as u64
    }

    pub fn kvmclock_ns(&self, host_ns: u64) -> u64 {
        host_ns.wrapping_add(self.kvmclock_offset.load(Ordering::Relaxed))
    }

    /// Sets kvm-clock to `clock_ns` at the state instant (see [`Clock::state_ns`]).
    pub fn set_kvmclock_ns(&self, clock_ns: u64) {
        let now = self.state_ns();
        self.kvmclock_offset
            .store(clock_ns.wrapping_sub(now), Ordering::Relaxed);
    }
}

/// KVM's `kvm_get_time_scale`: multiplier and shift turning TSC ticks into nanoseconds.
pub fn pvclock_scale(tsc_khz: u32) -> (u32, i8) {
    let scaled_hz: u64 = 1_000_000_000;
    let base_hz = u64::from(tsc_khz.max(1)) * 1000;
    let mut shift: i32 = 0;
    let mut tps64 = base_hz;
    let mut scaled64 = scaled_hz;
    while tps64 > scaled64 * 2 || tps64 & 0xffff_ffff_0000_0000 != 0 {
        tps64 >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps64 as u32;
    while tps32 as u64 <= scaled64 || scaled64 & 0xffff_ffff_0000_0000 != 0 {
        if scaled64 & 0xffff_ffff_0000_0000 != 0 || tps32 & 0x8000_0000 != 0 {
            scaled64 >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    let mul = ((scaled64 << 32) / u64::from(tps32.max(1))) as u32;
    (mul, shift as i8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_rate_and_tsc_flags() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu tsc constant_tsc rdtscp nonstop_tsc\n";
        assert_eq!(cpuinfo_khz(text), Some(2_600_000));
        assert!(cpuinfo_constant_tsc(text));
        assert!(!cpuinfo_constant_tsc(
            "flags\t\t: fpu tsc constant_tsc rdtscp\n"
        ));
        assert!(!cpuinfo_constant_tsc("flags\t\t: nonstop_tsc\n"));
        assert_eq!(cpuinfo_khz("cpu MHz : x\n"), None);
    }

    #[test]
    fn a_paced_raw_tsc_is_the_host_tsc_from_the_clock_origin() {
        let c = Clock::with_pacing(1_000_000, true);
        assert!(c.follows_host_tsc());
        let before = hv_emu_jit_rt::host_tsc();
        let raw = c.raw_tsc(0);
        let after = hv_emu_jit_rt::host_tsc();
        let base = c.rdtsc_base().unwrap();
        assert!(before.wrapping_add(base) <= raw && raw <= after.wrapping_add(base));
        // It starts near 0 (well below a second of ticks at any plausible host rate).
        assert!(raw < 10_000_000_000, "{raw}");
        let s = Clock::with_pacing(1_000_000, false);
        assert!(!s.follows_host_tsc());
        assert_eq!(s.rdtsc_base(), None);
        assert_eq!(s.raw_tsc(5_000_000), 5_000_000);
    }

    #[test]
    fn pvclock_scale_converts_one_second() {
        for khz in [1_000_000u32, 2_000_000, 2_995_123, 3_700_000] {
            let (mul, shift) = pvclock_scale(khz);
            let ticks = u64::from(khz) * 1000;
            let d = if shift < 0 {
                ticks >> (-shift)
            } else {
                ticks << shift
            };
            let ns = ((u128::from(d) * u128::from(mul)) >> 32) as u64;
            assert!(ns.abs_diff(1_000_000_000) < 1000, "{khz}: {ns}");
        }
    }
}
