//! virtio-vsock (virtio 1.x section 5.10), stream sockets only, with a Firecracker-compatible
//! host side on Unix sockets.
//!
//! Queues: receive (0), transmit (1), event (2), 256 entries each. Offered features: the common
//! ones only (no SEQPACKET). Config space: the guest CID (u64).
//!
//! * Guest connects to host port P: the device connects to the Unix socket `<uds_path>_<P>`;
//!   refused or missing → RST.
//! * Host connects to guest port P: the device listens on `uds_path`; a client connects and sends
//!   `CONNECT <P>\n`; the device sends REQUEST to the guest and, on the guest's RESPONSE, writes
//!   `OK <host port>\n` to the client (host ports are handed out from 2^30 up); an RST closes it.
//! * Then bytes flow both ways with per-connection credit (see [`muxer`]); SHUTDOWN from the
//!   guest half-closes or closes the client socket, EOF from the client becomes SHUTDOWN to the
//!   guest.
//!
//! Limits: [`muxer::MAX_CONNECTIONS`] connections, [`muxer::CONN_BUF`] bytes of guest data
//! buffered per connection, [`muxer::MAX_PKT_DATA`] bytes per packet.
//!
//! Saved state holds only the CID and counters: connections are not saved. A restored device
//! starts with no connection and sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue
//! once active, so the guest resets its sockets (as Firecracker does); host clients of the old
//! VMM saw their sockets close with it.

pub mod muxer;
pub mod packet;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::Epoll;

use self::muxer::Muxer;
use self::packet::{HEADER_LEN, Header};
use crate::chain::{self, Seg};
use crate::net::{read_segments, write_segments};
use crate::{
    COMMON_FEATURES, Counters, DeviceError, DeviceState, GuestMemory, VirtioDevice,
    read_config_bytes,
};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest CID {0} is reserved or out of range (3..=4294967294)")]
    Cid(u64),
    #[error("cannot create the vsock device's epoll set")]
    Epoll(#[source] io::Error),
    #[error("cannot listen on vsock socket {}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a vsock device is built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host-initiated connections: listening socket. Guest-initiated ones to port P connect to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Saved state of a vsock device: open connections are not part of it (they are reset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub counters: Counters,
}

pub struct Vsock {
    config: VsockConfig,
    listener: Arc<UnixListener>,
    /// The listener and every host connection of the active muxer: the worker's host
    /// descriptor. Created with the device, so the worker (whose seccomp role cannot create
    /// one) only adds and removes descriptors.
    epoll: Arc<Epoll>,
    counters: Counters,
    active: Option<Muxer>,
    /// A transport-reset event is owed to the guest (after restore).
    reset_event_pending: bool,
    /// Queues to process without a notification (bit i = queue i).
    kicks: u64,
    queue_sizes: [u16; 3],
}

impl Vsock {
    /// Binds the listening socket `uds_path` (a stale socket file there is replaced).
    pub fn new(config: VsockConfig) -> Result<Vsock, Error> {
        if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(Error::Cid(config.guest_cid));
        }
        let listen_err = |source| Error::Listen {
            path: config.uds_path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&config.uds_path)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(&config.uds_path).map_err(listen_err)?;
        }
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let listener = UnixListener::bind(&config.uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Vsock {
            config,
            listener: Arc::new(listener),
            epoll: Arc::new(epoll),
            counters: Counters::default(),
            active: None,
            reset_event_pending: false,
            kicks: 0,
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Open connections, host clients still handshaking included.
    pub fn connection_count(&self) -> usize {
        self.active.as_ref().map_or(0, Muxer::connection_count)
    }

    fn start(&mut self) -> Result<(), DeviceError> {
        if self.active.is_some() {
            return Ok(());
        }
        let mux = Muxer::new(
            self.config.guest_cid,
            &self.config.uds_path,
            self.listener.clone(),
            self.epoll.clone(),
        )
        .map_err(DeviceError::Backend)?;
        if self.reset_event_pending {
            self.kicks |= 1 << EVENT_QUEUE;
        }
        self.active = Some(mux);
        Ok(())
    }

    /// Closes every connection and stops listening.
    fn stop(&mut self) {
        if let Some(mut mux) = self.active.take() {
            mux.shut_down();
        }
        self.kicks = 0;
    }

    fn transmit(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        mux: &mut Muxer,
    ) -> Result<u32, DeviceError> {
        self.counters.requests += 1;
        let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
            self.counters.invalid_descriptors += 1;
        })?;
        let Some(bytes) = read_segments(mem, &segs, HEADER_LEN + muxer::MAX_PKT_DATA) else {
            self.counters.errors += 1;
            return Ok(0);
        };
        let Some(h) = Header::parse(&bytes) else {
            self.counters.errors += 1;
            return Ok(0);
        };
        let Some(data) = bytes.get(HEADER_LEN..HEADER_LEN + h.len as usize) else {
            hv::rate_limited!(tracing::debug!(
                len = h.len,
                "virtio-vsock: packet shorter than its header says"
            ));
            self.counters.errors += 1;
            return Ok(0);
        };
        mux.guest_packet(&h, data, &mut self.counters);
        Ok(0)
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        mux: &mut Muxer,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        loop {
            queue
                .disable_notification(mem)
                .map_err(DeviceError::Queue)?;
            while mux.has_rx_work() {
                let Some(chain) = queue.iter(mem).map_err(DeviceError::Queue)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
                    self.counters.invalid_descriptors += 1;
                })?;
                let Some(room) = writable_room(mem, &segs) else {
                    // Unusable buffer: give it back empty, keep the packet for the next one.
                    self.counters.requests += 1;
                    self.counters.errors += 1;
                    queue.add_used(mem, head, 0).map_err(DeviceError::Queue)?;
                    used_any = true;
                    continue;
                };
                let Some((h, data)) = mux.next_rx_packet(room - HEADER_LEN, &mut self.counters)
                else {
                    queue.go_to_previous_position();
                    break;
                };
                self.counters.requests += 1;
                let len = write_segments(mem, &segs, &[&h.to_bytes(), &data]).unwrap_or(0);
                queue.add_used(mem, head, len).map_err(DeviceError::Queue)?;
                used_any = true;
            }
            let more_buffers = queue.enable_notification(mem).map_err(DeviceError::Queue)?;
            if !more_buffers || !mux.has_rx_work() {
                break;
            }
        }
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(DeviceError::Queue)
    }

    fn event(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        if !self.reset_event_pending {
            return Ok(false);
        }
        let Some(chain) = queue.iter(mem).map_err(DeviceError::Queue)?.next() else {
            return Ok(false);
        };
        let head = chain.head_index();
        let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
            self.counters.invalid_descriptors += 1;
        })?;
        let len = write_segments(mem, &segs, &[&EVENT_TRANSPORT_RESET.to_le_bytes()]);
        if len.is_none() {
            self.counters.errors += 1;
        } else {
            self.reset_event_pending = false;
        }
        queue
            .add_used(mem, head, len.unwrap_or(0))
            .map_err(DeviceError::Queue)?;
        queue.needs_notification(mem).map_err(DeviceError::Queue)
    }
}

/// Room in a receive chain: all buffers device-writable and in guest RAM, at least a header.
fn writable_room(mem: &GuestMemory, segs: &[Seg]) -> Option<usize> {
    use vm_memory::{GuestMemory as _, Permissions};
    let mut room = 0usize;
    for s in segs {
        if !s.writable || !mem.check_range(s.addr, s.len as usize, Permissions::Write) {
            return None;
        }
        room = room.saturating_add(s.len as usize);
    }
    (room >= HEADER_LEN).then_some(room)
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.config.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        self.start()
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index == EVENT_QUEUE {
            return self.event(queue, mem);
        }
        let Some(mut mux) = self.active.take() else {
            return Ok(false);
        };
        let r = match index {
            RX_QUEUE => self.receive(queue, mem, &mut mux),
            TX_QUEUE => {
                let r = chain::drain(queue, mem, |c| self.transmit(c, mem, &mut mux));
                if mux.has_rx_work() {
                    self.kicks |= 1 << RX_QUEUE;
                }
                r
            }
            _ => Ok(false),
        };
        self.active = Some(mux);
        r
    }

    fn reset(&mut self) {
        self.stop();
        self.reset_event_pending = false;
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(VsockState {
            guest_cid: self.config.guest_cid,
            counters: self.counters,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Vsock(s) = state else {
            return Err(DeviceError::State("not a vsock device".into()));
        };
        if s.guest_cid != self.config.guest_cid {
            return Err(DeviceError::State("guest CID differs".into()));
        }
        self.counters = s.counters;
        self.reset_event_pending = true;
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn host_event(&mut self) {
        if let Some(mux) = &mut self.active {
            mux.poll();
            if mux.has_rx_work() {
                self.kicks |= 1 << RX_QUEUE;
            }
        }
    }

    fn take_kicks(&mut self) -> u64 {
        std::mem::take(&mut self.kicks)
    }
}

#[cfg(test)]
mod tests;
