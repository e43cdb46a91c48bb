//! Run control shared by the vCPU threads, the platform, the API and the main thread: pause on
//! an instruction boundary, resume, and stop for one recorded reason.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hv::VcpuKicker;

/// Why the VM stops. The first reason recorded wins.
#[derive(Debug)]
pub enum Stop {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (`reboot=k`, or a kernel panic with `panic=-1`).
    Reset,
    /// Every vCPU halted with interrupts off: the guest can never run again.
    AllHalted,
    /// `PUT /vm/shutdown`.
    Shutdown,
    /// The user typed the quit escape on the console.
    Quit,
    /// The VM was handed off (snapshot `--stop`, successful migration).
    HandedOff,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u32 },
    /// A vCPU failed.
    VcpuFailed { vcpu: u32, error: hv::Error },
    /// The VMM process got a termination signal.
    Signal(i32),
    /// A VMM thread failed.
    Internal(String),
    /// The power button was pressed (by `PUT /vm/shutdown` or SIGTERM) and the guest did not
    /// power off within `secs` seconds.
    ShutdownTimeout { secs: u64, by: ShutdownBy },
}

/// Who pressed the power button.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownBy {
    /// `PUT /vm/shutdown` (`anyvisor shutdown`).
    Api,
    /// A termination signal to the VMM process.
    Signal(i32),
}

/// An orderly shutdown in progress: the button is pressed, the VM is stopped at `deadline`.
#[derive(Clone, Copy, Debug)]
struct PendingShutdown {
    deadline: Instant,
    secs: u64,
    by: ShutdownBy,
}

#[derive(Default)]
struct State {
    stopping: bool,
    reason: Option<Stop>,
    pause: bool,
    /// vCPU threads parked by a pause.
    parked: u32,
    /// vCPU threads halted for good.
    halted: u32,
    /// vCPU threads that returned.
    exited: u32,
    /// A power-button press not yet delivered (vCPU 0's thread raises it).
    button: bool,
    shutdown: Option<PendingShutdown>,
    /// What the guest said when its kernel panicked (seen on its console).
    panicked: Option<String>,
}

pub struct Control {
    vcpus: u32,
    state: Mutex<State>,
    changed: Condvar,
    kickers: OnceLock<Vec<Arc<dyn VcpuKicker>>>,
}

/// What a pause, resume or shutdown request found.
#[derive(Debug, PartialEq, Eq)]
pub enum PauseError {
    Stopping,
    Timeout,
    /// An orderly shutdown needs the guest to run.
    Paused,
}

impl Control {
    pub fn new(vcpus: u32) -> Self {
        Control {
            vcpus,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            kickers: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `done` holds or `timeout` passes; returns whether it holds.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !done(&st) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Sets the vCPU kickers once all vCPUs exist.
    pub fn set_kickers(&self, kickers: Vec<Arc<dyn VcpuKicker>>) {
        let _ = self.kickers.set(kickers);
    }

    fn kick_all(&self) {
        for k in self.kickers.get().map(Vec::as_slice).unwrap_or_default() {
            k.kick();
        }
    }

    /// Records why the VM stops (unless a reason is already recorded) and stops every vCPU.
    pub fn request_stop(&self, reason: Stop) {
        {
            let mut st = self.lock();
            if !st.stopping {
                st.stopping = true;
                st.reason = Some(reason);
            }
        }
        self.changed.notify_all();
        self.kick_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }

    /// Starts an orderly shutdown: presses the power button (vCPU 0's thread delivers it, see
    /// [`Control::take_button_press`]) and stops the VM with [`Stop::ShutdownTimeout`] if the
    /// guest has not powered off after `timeout` ([`Control::shutdown_overdue`]). A second
    /// request presses the button again and keeps the earlier deadline. A paused VM is refused:
    /// its guest could not react.
    pub fn press_power_button(&self, timeout: Duration, by: ShutdownBy) -> Result<(), PauseError> {
        {
            let mut st = self.lock();
            if st.stopping {
                return Err(PauseError::Stopping);
            }
            if st.pause {
                return Err(PauseError::Paused);
            }
            st.button = true;
            let pending = PendingShutdown {
                deadline: Instant::now() + timeout,
                secs: timeout.as_secs(),
                by,
            };
            if st.shutdown.is_none_or(|p| pending.deadline < p.deadline) {
                st.shutdown = Some(pending);
            }
        }
        self.changed.notify_all();
        // vCPU 0 may sit in a halted guest: the kick brings its thread round to deliver it.
        if let Some(k) = self.kickers.get().and_then(|k| k.first()) {
            k.kick();
        }
        Ok(())
    }

    /// Whether the power button was pressed since the last call (vCPU 0's thread raises the
    /// interrupt: it may make the interrupt calls the API thread's filter refuses).
    pub fn take_button_press(&self) -> bool {
        std::mem::take(&mut self.lock().button)
    }

    /// Whether an orderly shutdown is in progress.
    pub fn shutdown_pending(&self) -> bool {
        self.lock().shutdown.is_some()
    }

    /// The stop reason once a pending orderly shutdown has run out of time.
    pub fn shutdown_overdue(&self) -> Option<Stop> {
        let st = self.lock();
        let p = st.shutdown?;
        (Instant::now() >= p.deadline).then_some(Stop::ShutdownTimeout {
            secs: p.secs,
            by: p.by,
        })
    }

    /// Records that the guest kernel panicked (`what`: its panic message). The VM runs on: the
    /// guest resets or halts next, and that ending is then reported as the panic.
    pub fn note_panic(&self, what: String) {
        let mut st = self.lock();
        if st.panicked.is_none() {
            st.panicked = Some(what);
        }
    }

    /// The guest kernel's panic message, if it panicked.
    pub fn panicked(&self) -> Option<String> {
        self.lock().panicked.clone()
    }

    /// A vCPU thread calls this before each run: it parks while the VM is paused, and returns
    /// false when the thread must end.
    pub fn before_run(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.stopping {
                return false;
            }
            if !st.pause {
                return true;
            }
            st.parked += 1;
            self.changed.notify_all();
            st = self.wait(st);
            st.parked -= 1;
        }
    }

    /// A vCPU halted for good: wait for the stop. The last one to halt stops the VM.
    pub fn halted(&self) {
        let mut st = self.lock();
        st.halted += 1;
        if st.halted == self.vcpus && !st.stopping {
            st.stopping = true;
            st.reason = Some(Stop::AllHalted);
        }
        self.changed.notify_all();
        while !st.stopping {
            st = self.wait(st);
        }
    }

    /// A vCPU thread ends.
    pub fn exited(&self) {
        self.lock().exited += 1;
        self.changed.notify_all();
    }

    /// Parks every vCPU on an instruction boundary. Idempotent.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        {
            let mut st = self.lock();
            if st.stopping {
                return Err(PauseError::Stopping);
            }
            st.pause = true;
        }
        self.kick_all();
        let vcpus = self.vcpus;
        let parked = self.wait_until(timeout, |st| {
            st.stopping || st.parked + st.halted + st.exited >= vcpus
        });
        if !parked {
            return Err(PauseError::Timeout);
        }
        if self.lock().stopping {
            return Err(PauseError::Stopping);
        }
        Ok(())
    }

    /// Lets paused vCPUs run again. Idempotent.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut st = self.lock();
        if st.stopping {
            return Err(PauseError::Stopping);
        }
        st.pause = false;
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// Blocks until the VM stops and takes the reason.
    pub fn wait_stop(&self) -> Stop {
        let mut st = self.lock();
        while !st.stopping {
            st = self.wait(st);
        }
        st.reason
            .take()
            .unwrap_or_else(|| Stop::Internal("stopped twice".into()))
    }

    /// Like [`Control::wait_stop`], but gives up after `timeout`.
    pub fn wait_stop_timeout(&self, timeout: Duration) -> Option<Stop> {
        if !self.wait_until(timeout, |st| st.stopping) {
            return None;
        }
        Some(
            self.lock()
                .reason
                .take()
                .unwrap_or_else(|| Stop::Internal("stopped twice".into())),
        )
    }

    /// Waits (at most `timeout`) for every vCPU thread to end; returns whether they did.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let vcpus = self.vcpus;
        self.wait_until(timeout, |st| st.exited >= vcpus)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fake vCPU: "runs" until kicked.
    struct FakeKick {
        kicked: Mutex<bool>,
        cv: Condvar,
        kicks: AtomicU32,
    }
    impl VcpuKicker for FakeKick {
        fn kick(&self) {
            self.kicks.fetch_add(1, Ordering::SeqCst);
            *self.kicked.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }
    impl FakeKick {
        fn run(&self) {
            let mut k = self.kicked.lock().unwrap();
            while !*k {
                k = self.cv.wait(k).unwrap();
            }
            *k = false;
        }
    }

    fn start(n: u32) -> (Arc<Control>, Vec<std::thread::JoinHandle<u32>>) {
        let ctl = Arc::new(Control::new(n));
        let kicks: Vec<Arc<FakeKick>> = (0..n)
            .map(|_| {
                Arc::new(FakeKick {
                    kicked: Mutex::new(false),
                    cv: Condvar::new(),
                    kicks: AtomicU32::new(0),
                })
            })
            .collect();
        ctl.set_kickers(
            kicks
                .iter()
                .map(|k| k.clone() as Arc<dyn VcpuKicker>)
                .collect(),
        );
        let threads = kicks
            .into_iter()
            .map(|k| {
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    let mut runs = 0;
                    while ctl.before_run() {
                        k.run();
                        runs += 1;
                    }
                    ctl.exited();
                    runs
                })
            })
            .collect();
        (ctl, threads)
    }

    #[test]
    fn pause_resume_stop() {
        let (ctl, threads) = start(3);
        let t = Duration::from_secs(5);
        assert_eq!(ctl.pause(t), Ok(()));
        assert!(ctl.is_paused());
        assert_eq!(ctl.pause(t), Ok(()));
        assert_eq!(ctl.resume(), Ok(()));
        assert!(!ctl.is_paused());
        assert_eq!(ctl.pause(t), Ok(()));
        ctl.request_stop(Stop::PowerOff);
        ctl.request_stop(Stop::Reset);
        assert!(matches!(ctl.wait_stop(), Stop::PowerOff));
        assert!(ctl.wait_exited(t));
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(ctl.pause(t), Err(PauseError::Stopping));
    }

    #[test]
    fn power_button_and_deadline() {
        let (ctl, threads) = start(2);
        assert!(!ctl.take_button_press());
        assert!(ctl.shutdown_overdue().is_none());
        ctl.press_power_button(Duration::from_secs(60), ShutdownBy::Api)
            .unwrap();
        assert!(ctl.take_button_press());
        assert!(!ctl.take_button_press(), "one press, one delivery");
        assert!(ctl.shutdown_pending());
        assert!(ctl.shutdown_overdue().is_none());
        // A second request with a shorter time wins; it is overdue at once.
        ctl.press_power_button(Duration::ZERO, ShutdownBy::Signal(15))
            .unwrap();
        assert!(matches!(
            ctl.shutdown_overdue(),
            Some(Stop::ShutdownTimeout {
                secs: 0,
                by: ShutdownBy::Signal(15)
            })
        ));
        // A paused guest cannot react: refused.
        ctl.pause(Duration::from_secs(5)).unwrap();
        assert_eq!(
            ctl.press_power_button(Duration::ZERO, ShutdownBy::Api),
            Err(PauseError::Paused)
        );
        ctl.resume().unwrap();
        ctl.note_panic("first".into());
        ctl.note_panic("second".into());
        assert_eq!(ctl.panicked().as_deref(), Some("first"));
        ctl.request_stop(Stop::PowerOff);
        assert_eq!(
            ctl.press_power_button(Duration::ZERO, ShutdownBy::Api),
            Err(PauseError::Stopping)
        );
        for th in threads {
            th.join().unwrap();
        }
    }

    #[test]
    fn all_halted_stops() {
        let ctl = Arc::new(Control::new(2));
        let c2 = ctl.clone();
        let th = std::thread::spawn(move || c2.halted());
        assert_eq!(
            ctl.pause(Duration::from_millis(100)),
            Err(PauseError::Timeout)
        );
        ctl.halted();
        th.join().unwrap();
        assert!(matches!(ctl.wait_stop(), Stop::AllHalted));
    }
}
