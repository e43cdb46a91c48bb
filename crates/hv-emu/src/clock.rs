//! Guest time: the TSC and kvm-clock, both derived from the host's monotonic clock.
//!
//! `host_ns` counts from the VM's creation. A vCPU's TSC is `host_ns` scaled to `tsc_khz` plus its
//! own offset (so `IA32_TSC` writes and restores work); kvm-clock is `host_ns` plus a VM-wide
//! offset (so a restored VM continues its clock). Both are linear in `host_ns`, so the pvclock
//! page written once stays exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

pub struct Clock {
    origin: Instant,
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
    for line in text.lines() {
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or("").trim();
        if key == "cpu MHz"
            && let Some(mhz) = parts.next().and_then(|v| v.trim().parse::<f64>().ok())
            && mhz > 100.0
            && mhz < 100_000.0
        {
            return (mhz * 1000.0).round() as u32;
        }
    }
    2_000_000
}

impl Clock {
    pub fn new(tsc_khz: u32) -> Clock {
        Clock {
            origin: Instant::now(),
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
        if accel.host_tsc().is_some() {
            self.host_tsc = Some(accel);
        }
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
    /// TSC is the host's).
    #[inline]
    pub fn raw_tsc(&self, ns: u64) -> u64 {
        match self.host_tsc.as_ref().filter(|_| self.fixed_tsc()) {
            Some(a) => a.host_tsc().unwrap_or_else(|| self.ns_to_tsc(ns)),
            None => self.ns_to_tsc(ns),
        }
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

    /// The TSC before any per-vCPU offset at state instant `ns`: with the host's TSC as the
    /// guest's, the host TSC now minus the ticks since `ns`.
    pub fn raw_tsc_at_state(&self, ns: u64) -> u64 {
        if self.fixed_tsc() {
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
