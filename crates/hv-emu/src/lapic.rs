//! The xAPIC local APIC of one vCPU: registers, interrupt acceptance and the timer.
//!
//! The timer counts at 1 GHz divided by the divide configuration, as KVM's does. Host time is
//! passed in as nanoseconds of the VM clock (see `clock.rs`).

use hv::LapicState;

pub const APIC_BASE_DEFAULT: u64 = 0xfee0_0000;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
pub const APIC_BASE_BSP: u64 = 1 << 8;

const PPR: usize = 0xa0;
const LVT_MASKED: u32 = 1 << 16;

/// What a register write asks the vCPU to do.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// Send the IPI now in ICR (low, high).
    SendIpi(u32, u32),
    /// Re-check pending interrupts (EOI, TPR, SVR changes).
    Recheck,
    /// The timer was (re)programmed.
    Timer,
    /// LDR/DFR/ID changed: update the VM-wide routing copy.
    Routing,
}

pub struct Lapic {
    regs: [u32; 64],
    /// Host-clock ns when the current one-shot/periodic count started.
    timer_start: u64,
    /// Next expiry in VM-clock ns, if the timer is armed.
    pub deadline_ns: Option<u64>,
    /// IA32_TSC_DEADLINE as the guest wrote it (0 = disarmed).
    pub tsc_deadline: u64,
}

fn idx(offset: usize) -> usize {
    (offset >> 4) & 63
}

impl Lapic {
    pub fn new(id: u32) -> Lapic {
        let mut l = Lapic {
            regs: [0; 64],
            timer_start: 0,
            deadline_ns: None,
            tsc_deadline: 0,
        };
        l.reset(id);
        l
    }

    pub fn reset(&mut self, id: u32) {
        self.regs = [0; 64];
        self.regs[idx(LapicState::ID)] = id << 24;
        self.regs[idx(LapicState::VERSION)] = 0x0005_0014;
        self.regs[idx(LapicState::DFR)] = 0xffff_ffff;
        self.regs[idx(LapicState::SVR)] = 0xff;
        for o in [
            LapicState::LVT_TIMER,
            LapicState::LVT_THERMAL,
            LapicState::LVT_PERF,
            LapicState::LVT_LINT0,
            LapicState::LVT_LINT1,
            LapicState::LVT_ERROR,
        ] {
            self.regs[idx(o)] = LVT_MASKED;
        }
        self.deadline_ns = None;
        self.tsc_deadline = 0;
    }

    pub fn id(&self) -> u32 {
        self.regs[idx(LapicState::ID)] >> 24
    }

    pub fn ldr(&self) -> u32 {
        self.regs[idx(LapicState::LDR)]
    }

    pub fn dfr(&self) -> u32 {
        self.regs[idx(LapicState::DFR)]
    }

    pub fn tpr(&self) -> u32 {
        self.regs[idx(LapicState::TPR)] & 0xff
    }

    pub fn set_tpr(&mut self, v: u32) {
        self.regs[idx(LapicState::TPR)] = v & 0xff;
    }

    pub fn sw_enabled(&self) -> bool {
        self.regs[idx(LapicState::SVR)] & 0x100 != 0
    }

    fn set_bit(&mut self, base: usize, vector: u8, on: bool) {
        let v = usize::from(vector);
        let r = &mut self.regs[idx(base) + v / 32];
        if on {
            *r |= 1 << (v % 32);
        } else {
            *r &= !(1 << (v % 32));
        }
    }

    fn highest(&self, base: usize) -> Option<u8> {
        for i in (0..8).rev() {
            let r = self.regs[idx(base) + i];
            if r != 0 {
                return Some((i * 32 + 31 - r.leading_zeros() as usize) as u8);
            }
        }
        None
    }

    pub fn ppr(&self) -> u32 {
        let tpr = self.tpr();
        let isrv = self.highest(LapicState::ISR).map_or(0, u32::from);
        if (tpr & 0xf0) >= (isrv & 0xf0) {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Sets a vector pending (fixed delivery).
    pub fn set_irr(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            // Illegal vector: send accept error.
            self.regs[idx(LapicState::ESR)] |= 1 << 6;
            return;
        }
        self.set_bit(LapicState::IRR, vector, true);
        self.set_bit(LapicState::TMR, vector, level);
    }

    /// The vector the CPU would take now (priority above PPR), if any.
    pub fn deliverable(&self) -> Option<u8> {
        let v = self.highest(LapicState::IRR)?;
        if u32::from(v) & 0xf0 > self.ppr() & 0xf0 {
            Some(v)
        } else {
            None
        }
    }

    /// The CPU accepts `vector`: IRR -> ISR.
    pub fn ack(&mut self, vector: u8) {
        self.set_bit(LapicState::IRR, vector, false);
        self.set_bit(LapicState::ISR, vector, true);
    }

    pub fn eoi(&mut self) {
        if let Some(v) = self.highest(LapicState::ISR) {
            self.set_bit(LapicState::ISR, v, false);
            self.set_bit(LapicState::TMR, v, false);
        }
    }

    fn divide(&self) -> u64 {
        let v = self.regs[idx(LapicState::TIMER_DIVIDE)];
        let n = (v & 3) | ((v & 8) >> 1);
        if n == 7 { 1 } else { 2u64 << n }
    }

    pub fn timer_mode(&self) -> u32 {
        (self.regs[idx(LapicState::LVT_TIMER)] >> 17) & 3
    }

    fn current_count(&self, now: u64) -> u32 {
        let init = u64::from(self.regs[idx(LapicState::TIMER_INITIAL)]);
        if init == 0 || self.timer_mode() == 2 {
            return 0;
        }
        let elapsed = now.saturating_sub(self.timer_start) / self.divide();
        match self.timer_mode() {
            1 => (init - (elapsed % init)) as u32,
            _ => {
                if self.deadline_ns.is_none() {
                    0
                } else {
                    init.saturating_sub(elapsed) as u32
                }
            }
        }
    }

    pub fn read(&self, offset: usize, now: u64) -> u32 {
        match offset {
            PPR => self.ppr(),
            LapicState::TIMER_CURRENT => self.current_count(now),
            LapicState::ICR_LOW => self.regs[idx(offset)] & !(1 << 12),
            0x0..=0x3f0 if offset & 0xf == 0 => self.regs[idx(offset)],
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: usize, v: u32, now: u64) -> WriteEffect {
        match offset {
            LapicState::ID => {
                self.regs[idx(offset)] = v & 0xff00_0000;
                WriteEffect::Routing
            }
            LapicState::TPR => {
                self.set_tpr(v);
                WriteEffect::Recheck
            }
            LapicState::EOI => {
                self.eoi();
                WriteEffect::Recheck
            }
            LapicState::LDR => {
                self.regs[idx(offset)] = v & 0xff00_0000;
                WriteEffect::Routing
            }
            LapicState::DFR => {
                self.regs[idx(offset)] = v | 0x0fff_ffff;
                WriteEffect::Routing
            }
            LapicState::SVR => {
                self.regs[idx(offset)] = v & 0x13ff;
                if v & 0x100 == 0 {
                    for o in [
                        LapicState::LVT_TIMER,
                        LapicState::LVT_THERMAL,
                        LapicState::LVT_PERF,
                        LapicState::LVT_LINT0,
                        LapicState::LVT_LINT1,
                        LapicState::LVT_ERROR,
                    ] {
                        self.regs[idx(o)] |= LVT_MASKED;
                    }
                }
                WriteEffect::Recheck
            }
            LapicState::ESR => {
                self.regs[idx(offset)] = 0;
                WriteEffect::None
            }
            LapicState::ICR_LOW => {
                self.regs[idx(offset)] = v & !(1 << 12);
                WriteEffect::SendIpi(v, self.regs[idx(LapicState::ICR_HIGH)])
            }
            LapicState::ICR_HIGH => {
                self.regs[idx(offset)] = v & 0xff00_0000;
                WriteEffect::None
            }
            LapicState::LVT_TIMER => {
                let old_mode = self.timer_mode();
                let mut val = v & 0x0007_10ff;
                if !self.sw_enabled() {
                    val |= LVT_MASKED;
                }
                self.regs[idx(offset)] = val;
                if self.timer_mode() != old_mode {
                    self.deadline_ns = None;
                    self.tsc_deadline = 0;
                    if self.timer_mode() != 2 {
                        self.regs[idx(LapicState::TIMER_INITIAL)] = 0;
                    }
                }
                WriteEffect::Timer
            }
            LapicState::LVT_THERMAL
            | LapicState::LVT_PERF
            | LapicState::LVT_LINT0
            | LapicState::LVT_LINT1
            | LapicState::LVT_ERROR => {
                let mut val = v & 0x0001_f7ff;
                if !self.sw_enabled() {
                    val |= LVT_MASKED;
                }
                self.regs[idx(offset)] = val;
                WriteEffect::None
            }
            LapicState::TIMER_INITIAL => {
                if self.timer_mode() == 2 {
                    return WriteEffect::None;
                }
                self.regs[idx(offset)] = v;
                self.timer_start = now;
                self.deadline_ns = if v == 0 {
                    None
                } else {
                    Some(now.saturating_add(u64::from(v).saturating_mul(self.divide())))
                };
                WriteEffect::Timer
            }
            LapicState::TIMER_DIVIDE => {
                self.regs[idx(offset)] = v & 0xb;
                WriteEffect::None
            }
            _ => WriteEffect::None,
        }
    }

    /// Fires the timer if its deadline passed. Returns true if an interrupt became pending.
    pub fn poll_timer(&mut self, now: u64) -> bool {
        let Some(d) = self.deadline_ns else {
            return false;
        };
        if now < d {
            return false;
        }
        let lvt = self.regs[idx(LapicState::LVT_TIMER)];
        match self.timer_mode() {
            1 => {
                let period = u64::from(self.regs[idx(LapicState::TIMER_INITIAL)])
                    .saturating_mul(self.divide());
                match (now - d).checked_div(period) {
                    None => self.deadline_ns = None,
                    Some(missed) => {
                        // Skip missed periods rather than firing a burst.
                        self.timer_start = d + missed * period;
                        self.deadline_ns = Some(self.timer_start + period);
                    }
                }
            }
            2 => {
                self.deadline_ns = None;
                self.tsc_deadline = 0;
            }
            _ => self.deadline_ns = None,
        }
        if lvt & LVT_MASKED == 0 {
            self.set_irr((lvt & 0xff) as u8, false);
            return true;
        }
        false
    }

    pub fn to_state(&self, now: u64) -> LapicState {
        let mut s = LapicState::default();
        for (i, r) in self.regs.iter().enumerate() {
            s.set(i * 16, *r);
        }
        s.set(PPR, self.ppr());
        s.set(LapicState::TIMER_CURRENT, self.current_count(now));
        s
    }

    /// Loads registers from a saved page; the timer restarts with the saved remaining count.
    pub fn load_state(&mut self, s: &LapicState, now: u64) {
        for (i, r) in self.regs.iter_mut().enumerate() {
            *r = s.get(i * 16);
        }
        self.regs[idx(PPR)] = 0;
        let remaining = s.get(LapicState::TIMER_CURRENT);
        self.regs[idx(LapicState::TIMER_CURRENT)] = 0;
        self.deadline_ns = None;
        let init = u64::from(self.regs[idx(LapicState::TIMER_INITIAL)]);
        if self.timer_mode() != 2 && init != 0 && remaining != 0 {
            let rem = u64::from(remaining).min(init);
            let div = self.divide();
            // Pretend the count started so that `remaining` is left now.
            self.timer_start = now.saturating_sub((init - rem) * div);
            self.deadline_ns = Some(now + rem * div);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_and_eoi() {
        let mut l = Lapic::new(0);
        l.set_irr(0x31, false);
        l.set_irr(0x52, false);
        assert_eq!(l.deliverable(), Some(0x52));
        l.ack(0x52);
        assert_eq!(l.deliverable(), None, "0x31 is below the in-service class");
        l.eoi();
        assert_eq!(l.deliverable(), Some(0x31));
        l.set_tpr(0x40);
        assert_eq!(l.deliverable(), None);
    }

    #[test]
    fn one_shot_timer_fires_once() {
        let mut l = Lapic::new(0);
        l.write(LapicState::SVR, 0x1ff, 0);
        l.write(LapicState::TIMER_DIVIDE, 0xb, 0);
        l.write(LapicState::LVT_TIMER, 0xec, 0);
        l.write(LapicState::TIMER_INITIAL, 1000, 0);
        assert_eq!(l.read(LapicState::TIMER_CURRENT, 400), 600);
        assert!(!l.poll_timer(999));
        assert!(l.poll_timer(1000));
        assert_eq!(l.deliverable(), Some(0xec));
        assert!(!l.poll_timer(5000));
    }
}
