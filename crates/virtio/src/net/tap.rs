//! The host end of a virtio-net device: a tap interface, or anything else that moves whole
//! Ethernet frames (tests use a datagram socket pair).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use tun_rs::{DeviceBuilder, Layer, SyncDevice};

/// A frame-oriented, non-blocking backend. One call moves one whole Ethernet frame (no
/// virtio-net header): `recv` fails with `WouldBlock` when no frame is waiting.
pub trait TapIo: Send + Sync {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn send(&self, frame: &[u8]) -> io::Result<usize>;
    /// A descriptor that polls readable when `recv` has a frame.
    fn poll_fd(&self) -> RawFd;
}

/// Opens (attaching to an existing one, or creating a non-persistent one) the tap interface
/// `name` with `IFF_TAP | IFF_NO_PI` (no virtio-net header on the tap side, no offloads). The
/// interface's address, MTU and up/down state are left alone. Needs CAP_NET_ADMIN, or a
/// persistent tap owned by the caller.
pub fn open_tap(name: &str) -> io::Result<SyncDevice> {
    let dev = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .packet_information(false)
        .build_sync()?;
    dev.set_nonblocking(true)?;
    Ok(dev)
}

impl TapIo for SyncDevice {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        SyncDevice::recv(self, buf)
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        SyncDevice::send(self, frame)
    }

    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// One end of a `SOCK_DGRAM` pair set non-blocking: a tap stand-in for tests and tools.
impl TapIo for UnixDatagram {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        UnixDatagram::recv(self, buf)
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        UnixDatagram::send(self, frame)
    }

    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}
