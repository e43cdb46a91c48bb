//! The thread that does a device's work: one per device, created when the VM is built.
//!
//! It waits (epoll) on the eventfds of its transport ([`MmioTransport::queue_events`]: one per
//! queue, plus a wake-up for activation, reset and resume) and, while the device is active and
//! the VM runs, on the device's own host descriptor ([`crate::VirtioDevice::host_fd`]: a tap, a
//! vsock device's epoll of host sockets). Everything the device does happens here, under the
//! transport's device-side lock ([`MmioTransport::serve`]); the vCPUs only write registers
//! and signal eventfds. Who signals a queue's eventfd depends on the backend, not on the
//! device: KVM's ioeventfd from inside the guest's write, or the platform's MMIO dispatch (emu,
//! PVM hybrid) through the transport. The device code path is the same either way.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Weak;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::MmioTransport;
use crate::mmio::MAX_QUEUES;

/// Event data of the stop eventfd (queue eventfds carry their queue index).
const STOP: u64 = u64::MAX;
/// Event data of the transport's wake-up eventfd.
const WAKE: u64 = u64::MAX - 1;
/// Event data of the device's host descriptor.
const HOST: u64 = u64::MAX - 2;

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
        transport: &MmioTransport,
        name: String,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Worker> {
        let events = transport.events()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (index, event) in (0u64..).zip(&events.queues) {
            epoll.ctl(
                ControlOperation::Add,
                event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index),
            )?;
        }
        for (fd, data) in [(events.wake.as_raw_fd(), WAKE), (stop.as_raw_fd(), STOP)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )?;
        }
        let host_fd = transport.host_fd();
        let weak = transport.downgrade();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = setup() {
                tracing::error!("virtio worker: {e}");
                return;
            }
            run(&epoll, host_fd, &weak);
        })?;
        // Whatever the registers already ask for (a restored device resumed before the thread
        // started, a driver that got ahead) is done on the first wake-up.
        let _ = events.wake.write(1);
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(epoll: &Epoll, host_fd: Option<RawFd>, transport: &Weak<crate::mmio::SharedTransport>) {
    let mut ready = vec![EpollEvent::default(); MAX_QUEUES + 3];
    let mut polling_host = false;
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker: epoll: {e}");
                return;
            }
        };
        let Some(t) = MmioTransport::upgrade(transport) else {
            return;
        };
        let Ok(events) = t.events() else { return };
        let mut notified = 0u64;
        let mut host = false;
        for ev in ready.iter().take(n) {
            match ev.data() {
                STOP => return,
                WAKE => {
                    let _ = events.wake.read();
                }
                HOST => host = true,
                // Consume the count first: a notification arriving during processing wakes
                // us again, so none is lost.
                index => {
                    if let Some(event) = usize::try_from(index)
                        .ok()
                        .and_then(|i| events.queues.get(i))
                    {
                        let _ = event.read();
                        notified |= 1u64.checked_shl(index as u32).unwrap_or(0);
                    }
                }
            }
        }
        let want_host = t.serve(notified, host) && host_fd.is_some();
        if want_host != polling_host
            && let Some(fd) = host_fd
        {
            // Level-triggered: a paused or inactive device must not be polled, or the worker
            // would spin on data it may not take.
            let r = if want_host {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, HOST),
                )
            } else {
                epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
            };
            match r {
                Ok(()) => polling_host = want_host,
                Err(e) => tracing::warn!("virtio worker: host descriptor: {e}"),
            }
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
