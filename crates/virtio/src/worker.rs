//! The thread that processes a device's queues when the driver notifies them.
//!
//! Each device gets one: it waits on the queue eventfds of its transport
//! ([`MmioTransport::queue_events`]) and processes a signalled queue under the transport's lock,
//! so it never runs concurrently with register accesses, kicks, pause or save. Who signals the
//! eventfds depends on the backend, not on the device: KVM's ioeventfd from inside the guest's
//! write, or the platform's MMIO dispatch (emu, PVM hybrid) through the transport. The device
//! code path is the same either way.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::MmioTransport;

/// Event data of the stop eventfd (queue eventfds carry their queue index).
const STOP: u64 = u64::MAX;

/// A running worker; dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Switches `transport` to eventfd notifications and starts the thread `name`. The thread
    /// first runs `setup` (e.g. installing its seccomp filter) and ends at once if it fails.
    /// The epoll set is created here, so `setup` may forbid creating one.
    pub fn spawn(
        transport: &Arc<Mutex<MmioTransport>>,
        name: String,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Worker> {
        let events = transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue_events()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (index, event) in (0u64..).zip(&events) {
            epoll.ctl(
                ControlOperation::Add,
                event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let weak = Arc::downgrade(transport);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = setup() {
                tracing::error!("virtio worker: {e}");
                return;
            }
            run(&epoll, &events, &weak);
        })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(epoll: &Epoll, events: &[Arc<EventFd>], transport: &Weak<Mutex<MmioTransport>>) {
    let mut ready = vec![EpollEvent::default(); events.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker: epoll: {e}");
                return;
            }
        };
        for ev in &ready[..n] {
            let data = ev.data();
            if data == STOP {
                return;
            }
            let Some(event) = usize::try_from(data).ok().and_then(|i| events.get(i)) else {
                continue;
            };
            // Consume the count first: a notification arriving during processing wakes us
            // again, so none is lost.
            let _ = event.read();
            let Some(t) = transport.upgrade() else { return };
            let Ok(index) = u32::try_from(data) else {
                continue;
            };
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify(index);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
