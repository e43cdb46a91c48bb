//! Entry points for the fuzz targets in `fuzz/fuzz_targets/virtio_*.rs`, also run by unit tests
//! on mutated inputs. Each must never panic, hang, or allocate without bound.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::block::Format;
use crate::{Block, GuestMemory, VirtioDevice};

/// A file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(data: &[u8]) -> Option<TempFile> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "anyvisor-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut f = std::fs::File::create(&p).ok()?;
        f.write_all(data).ok()?;
        Some(TempFile(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a virtio-blk queue over guest memory whose first 64 KiB are `data`: descriptor table at
/// 0, available ring at 0x100, used ring at 0x200, queue size 16, over an 8 KiB raw disk.
pub fn blk_queue(data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else {
        return;
    };
    let n = data.len().min(0x1_0000);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Some(file) = TempFile::with(&[0u8; 8192]) else {
        return;
    };
    let Ok(mut dev) = Block::new(crate::BlockConfig {
        path: file.0.clone(),
        readonly: data.first().is_some_and(|b| b & 1 == 1),
        format: Some(Format::Raw),
    }) else {
        return;
    };
    let Ok(mut q) = Queue::new(16) else { return };
    let _ = q.try_set_desc_table_address(GuestAddress(0));
    let _ = q.try_set_avail_ring_address(GuestAddress(0x100));
    let _ = q.try_set_used_ring_address(GuestAddress(0x200));
    q.set_event_idx(data.get(1).is_some_and(|b| b & 1 == 1));
    q.set_ready(true);
    let _ = dev.process_queue(0, &mut q, &mem);
}

/// Guest memory of the queue fuzzers (`net_queues`, `vsock_queues`, `rng_queues`): 256 KiB at 0.
/// Queue `q` has its descriptor table at `q * 0x1000`, its available ring 0x400 and its used ring
/// 0x800 above that, [`Q_SIZE`] entries; buffers and indirect tables are placed from 0x8000 up
/// (wrapping around).
pub const Q_MEM: u64 = 0x4_0000;
pub const Q_SIZE: u16 = 16;
const Q_STRIDE: u64 = 0x1000;
const BUF_START: u64 = 0x8000;
/// The guest CID of the vsock fuzzer.
pub const FUZZ_GUEST_CID: u64 = 3;
/// Host ports the vsock fuzzer serves (`<uds>_<port>` listeners); seeds connect to them.
pub const FUZZ_HOST_PORTS: [u32; 2] = [1234, 6000];
/// Host-side sockets the vsock fuzzer keeps open at once, and host connects per input.
const MAX_STREAMS: usize = 8;
const MAX_CONNECTS: usize = 32;

/// The operations of a queue-fuzzer input, one byte each (taken modulo the number the device
/// knows), followed by their arguments. Byte 0 of the input is a flag byte ([`flags`]); reading
/// past the end yields zeros, and the input ends with the last complete operation.
pub mod op {
    /// `addr: u16, len: u8, bytes`: raw write into guest memory (rings included).
    pub const MEM_WRITE: u8 = 0;
    /// `q|flags: u8, n-1: u8, n x (seg flags: u8, len: u16, [bytes])`: a chain on queue `q`
    /// (`q` = bits 0-1; bit 7: through an indirect table; bit 6: notify afterwards). See `seg`.
    pub const ADD_CHAIN: u8 = 1;
    /// `q: u8`: the driver notifies queue `q`.
    pub const NOTIFY: u8 = 2;
    /// `q: u8, count-1: u8, len: u16`: that many one-buffer device-writable chains, then notify.
    pub const FILL: u8 = 3;
    /// The driver resets the device (the queues start over).
    pub const RESET: u8 = 4;
    /// The device saves its state and restores it (must accept its own state).
    pub const SAVE_RESTORE: u8 = 5;
    /// Operations below this are common to every device.
    pub const COMMON: u8 = 6;
    /// net: `len: u16, big: u8, bytes`: a frame arrives from the tap (`len + 65536` when `big`
    /// is odd; bytes past the input are zero).
    pub const NET_RX_FRAME: u8 = 6;
    /// net: the tap starts (or stops) refusing frames.
    pub const NET_TAP_FAIL: u8 = 7;
    pub const NET_OPS: u8 = 8;
    /// vsock: `mode: u8, header: 44 bytes, len: u16, payload`: a packet on the transmit queue,
    /// then notify. Mode bit 0 clear: CIDs and type set right; bit 1 clear: `len` set to the
    /// payload's; bit 2: header and payload in one buffer; bit 3: indirect table.
    pub const VSOCK_TX: u8 = 6;
    /// vsock: a host client connects to the device's listening socket.
    pub const HOST_CONNECT: u8 = 7;
    /// vsock: `stream: u8, len: u8, bytes`: a host socket sends bytes (e.g. `CONNECT 1234\n`).
    pub const HOST_WRITE: u8 = 8;
    /// vsock: `stream: u8`: a host socket reads what is waiting.
    pub const HOST_READ: u8 = 9;
    /// vsock: `stream: u8, how: u8`: shutdown (how % 3: read, write, both) or close (how % 4 = 3).
    pub const HOST_SHUTDOWN: u8 = 10;
    /// vsock: the device handles its pending host socket events (the worker's work when the
    /// device's host descriptor is readable), and host listeners accept.
    pub const POLL: u8 = 11;
    pub const VSOCK_OPS: u8 = 12;
    /// rng knows only the common operations.
    pub const RNG_OPS: u8 = 6;
}

/// Bits of an input's first byte.
pub mod flags {
    /// Every queue negotiates `VIRTIO_RING_F_EVENT_IDX`.
    pub const EVENT_IDX: u8 = 1;
    /// net: no MAC address configured. vsock: the device is restored from its saved state
    /// before activation (it owes the guest a transport-reset event).
    pub const VARIANT: u8 = 2;
}

/// Bits of an `ADD_CHAIN` segment's flag byte.
pub mod seg {
    /// Device-writable.
    pub const WRITE: u8 = 1;
    /// Outside guest RAM (bit 3 chooses: straddling its end, or wholly past it).
    pub const OUTSIDE: u8 = 2;
    /// `len` gets bit 16 (up to 128 KiB).
    pub const BIG: u8 = 4;
    pub const STRADDLE: u8 = 8;
    /// The buffer's contents follow (`len` bytes, fewer if the input ends).
    pub const DATA: u8 = 0x10;
}

/// Writes queue-fuzzer inputs (the seeds, and tests). Mirrors what [`QueueDriver`] reads.
#[derive(Default)]
pub struct OpWriter(pub Vec<u8>);

/// A buffer of a chain to write: device-writable or not, length, and for a readable buffer its
/// contents (`None`: leave memory as it is).
#[derive(Clone, Debug)]
pub struct SegSpec {
    pub write: bool,
    pub len: u32,
    pub data: Option<Vec<u8>>,
}

impl OpWriter {
    pub fn new(flag_byte: u8) -> OpWriter {
        OpWriter(vec![flag_byte])
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A chain of `segs` (at most 8; longer lists are cut) on queue `q`.
    pub fn add_chain(&mut self, q: u8, segs: &[SegSpec], indirect: bool, notify: bool) {
        let segs = &segs[..segs.len().clamp(1, 8)];
        let mut b = q & 3;
        if indirect {
            b |= 0x80;
        }
        if notify {
            b |= 0x40;
        }
        self.0
            .extend_from_slice(&[op::ADD_CHAIN, b, (segs.len() - 1) as u8]);
        for s in segs {
            let mut f = if s.write { seg::WRITE } else { 0 };
            if s.len > 0xffff {
                f |= seg::BIG;
            }
            if s.data.is_some() {
                f |= seg::DATA;
            }
            self.0.push(f);
            self.u16(s.len as u16);
            if let Some(d) = &s.data {
                let mut d = d.clone();
                d.resize(s.len.min(0x1_ffff) as usize, 0);
                self.0.extend_from_slice(&d);
            }
        }
    }
    pub fn notify(&mut self, q: u8) {
        self.0.extend_from_slice(&[op::NOTIFY, q]);
    }
    pub fn fill(&mut self, q: u8, count: u8, len: u16) {
        self.0
            .extend_from_slice(&[op::FILL, q, count.saturating_sub(1)]);
        self.u16(len);
    }
    pub fn reset(&mut self) {
        self.0.push(op::RESET);
    }
    pub fn save_restore(&mut self) {
        self.0.push(op::SAVE_RESTORE);
    }
    pub fn net_rx_frame(&mut self, frame: &[u8]) {
        let len = frame.len().min(0x1_ffff);
        self.0.push(op::NET_RX_FRAME);
        self.u16(len as u16);
        self.0.push(u8::from(len > 0xffff));
        self.0.extend_from_slice(&frame[..len]);
    }
    pub fn net_tap_fail(&mut self) {
        self.0.push(op::NET_TAP_FAIL);
    }
    /// A packet with `header` as is (mode bits 0 and 1 set) and `payload`.
    pub fn vsock_tx(&mut self, header: &[u8; 44], payload: &[u8], one_buffer: bool) {
        let mode = 3 | if one_buffer { 4 } else { 0 };
        self.0.extend_from_slice(&[op::VSOCK_TX, mode]);
        self.0.extend_from_slice(header);
        let len = payload.len().min(0xffff);
        self.u16(len as u16);
        self.0.extend_from_slice(&payload[..len]);
    }
    pub fn host_connect(&mut self) {
        self.0.push(op::HOST_CONNECT);
    }
    /// `bytes` from host socket `stream` (in pieces of at most 255 bytes).
    pub fn host_write(&mut self, stream: u8, bytes: &[u8]) {
        for piece in bytes.chunks(255) {
            self.0
                .extend_from_slice(&[op::HOST_WRITE, stream, piece.len() as u8]);
            self.0.extend_from_slice(piece);
        }
    }
    pub fn host_read(&mut self, stream: u8) {
        self.0.extend_from_slice(&[op::HOST_READ, stream]);
    }
    /// `how`: 0 read, 1 write, 2 both, 3 close.
    pub fn host_shutdown(&mut self, stream: u8, how: u8) {
        self.0.extend_from_slice(&[op::HOST_SHUTDOWN, stream, how]);
    }
    pub fn poll(&mut self) {
        self.0.push(op::POLL);
    }
}

/// Reads an input front to back; past its end every number is zero and every slice empty.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// What a common operation did.
enum Done {
    Handled,
    /// The device was reset: it may need re-activating.
    Reset,
    /// Not a common operation.
    Other,
}

/// The driver side of a device's queues in [`Q_MEM`] of guest memory.
struct QueueDriver {
    mem: GuestMemory,
    queues: Vec<Queue>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    next_buf: u64,
    event_idx: bool,
    /// A queue failed (the transport would have set DEVICE_NEEDS_RESET): notifications are
    /// ignored until a reset.
    broken: bool,
}

const VIRTQ_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const VIRTQ_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const VIRTQ_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

impl QueueDriver {
    fn new(count: usize, event_idx: bool) -> Option<QueueDriver> {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), Q_MEM as usize)]).ok()?;
        let mut d = QueueDriver {
            mem,
            queues: Vec::new(),
            next_desc: vec![0; count],
            avail_idx: vec![0; count],
            next_buf: BUF_START,
            event_idx,
            broken: false,
        };
        d.reset_queues()?;
        Some(d)
    }

    /// Fresh queues over zeroed rings, as a driver sets them up after a reset.
    fn reset_queues(&mut self) -> Option<()> {
        let count = self.next_desc.len();
        self.mem
            .write_slice(&vec![0u8; count * Q_STRIDE as usize], GuestAddress(0))
            .ok()?;
        self.queues.clear();
        for q in 0..count as u64 {
            let mut queue = Queue::new(Q_SIZE).ok()?;
            let base = q * Q_STRIDE;
            queue.try_set_desc_table_address(GuestAddress(base)).ok()?;
            queue
                .try_set_avail_ring_address(GuestAddress(base + 0x400))
                .ok()?;
            queue
                .try_set_used_ring_address(GuestAddress(base + 0x800))
                .ok()?;
            queue.set_event_idx(self.event_idx);
            queue.set_ready(true);
            self.queues.push(queue);
        }
        self.next_desc.fill(0);
        self.avail_idx.fill(0);
        self.next_buf = BUF_START;
        self.broken = false;
        Some(())
    }

    fn queue_index(&self, b: u8) -> usize {
        usize::from(b) % self.queues.len().max(1)
    }

    /// Room for `len` bytes in the buffer area (wrapping around; a length larger than the area
    /// gets its start, and will not fit guest RAM).
    fn alloc(&mut self, len: u64) -> u64 {
        let len = (len + 15) & !15;
        if self.next_buf + len > Q_MEM {
            self.next_buf = BUF_START;
        }
        let at = self.next_buf;
        self.next_buf = (self.next_buf + len).min(Q_MEM);
        at
    }

    fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&d, GuestAddress(table + 16 * u64::from(index)));
    }

    /// Writes a chain of `(addr, len, writable)` buffers and makes it available on queue `q`.
    fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)], indirect: bool) {
        let table = q as u64 * Q_STRIDE;
        let head = self.next_desc[q];
        let flags_of = |write: bool, last: bool| {
            (if write { VIRTQ_WRITE } else { 0 }) | if last { 0 } else { VIRTQ_NEXT }
        };
        if indirect {
            let n = bufs.len() as u16;
            let itable = self.alloc(16 * u64::from(n));
            for (i, &(addr, len, write)) in (0u16..).zip(bufs) {
                self.write_desc(itable, i, addr, len, flags_of(write, i + 1 == n), i + 1);
            }
            self.write_desc(table, head, itable, 16 * u32::from(n), VIRTQ_INDIRECT, 0);
            self.next_desc[q] = (head + 1) % Q_SIZE;
        } else {
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = self.next_desc[q];
                let next = (idx + 1) % Q_SIZE;
                self.write_desc(
                    table,
                    idx,
                    addr,
                    len,
                    flags_of(write, i + 1 == bufs.len()),
                    next,
                );
                self.next_desc[q] = next;
            }
        }
        let avail = table + 0x400;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx[q] % Q_SIZE);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2));
    }

    /// Places one buffer: in the buffer area, or (per `seg::OUTSIDE`) not in guest RAM.
    fn place(&mut self, flags: u8, len: u32) -> u64 {
        if flags & seg::OUTSIDE == 0 {
            self.alloc(u64::from(len))
        } else if flags & seg::STRADDLE != 0 {
            Q_MEM - 8
        } else {
            Q_MEM + 0x1000
        }
    }

    fn notify(&mut self, dev: &mut dyn VirtioDevice, q: usize) {
        if self.broken {
            return;
        }
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        if dev.process_queue(q, queue, &self.mem).is_err() {
            self.broken = true;
        }
    }

    /// Runs `op` if it is one of the common operations.
    fn common(&mut self, op: u8, inp: &mut Input, dev: &mut dyn VirtioDevice) -> Done {
        match op {
            op::MEM_WRITE => {
                let addr = u64::from(inp.u16());
                let len = usize::from(inp.u8());
                let bytes = inp.bytes(len);
                let _ = self.mem.write_slice(bytes, GuestAddress(addr));
            }
            op::ADD_CHAIN => {
                let b = inp.u8();
                let q = self.queue_index(b & 3);
                let n = 1 + usize::from(inp.u8() % 8);
                let mut bufs = Vec::with_capacity(n);
                for _ in 0..n {
                    let f = inp.u8();
                    let len = u32::from(inp.u16()) | if f & seg::BIG != 0 { 1 << 16 } else { 0 };
                    let addr = self.place(f, len);
                    if f & seg::DATA != 0 {
                        let data = inp.bytes(len as usize);
                        let _ = self.mem.write_slice(data, GuestAddress(addr));
                    }
                    bufs.push((addr, len, f & seg::WRITE != 0));
                }
                self.add_chain(q, &bufs, b & 0x80 != 0);
                if b & 0x40 != 0 {
                    self.notify(dev, q);
                }
            }
            op::NOTIFY => {
                let q = self.queue_index(inp.u8());
                self.notify(dev, q);
            }
            op::FILL => {
                let q = self.queue_index(inp.u8());
                let count = 1 + inp.u8() % Q_SIZE as u8;
                let len = u32::from(inp.u16());
                for _ in 0..count {
                    let addr = self.alloc(u64::from(len));
                    self.add_chain(q, &[(addr, len, true)], false);
                }
                self.notify(dev, q);
            }
            op::RESET => {
                dev.reset();
                // Only fails if guest memory cannot be written, which it always can.
                let _ = self.reset_queues();
                return Done::Reset;
            }
            op::SAVE_RESTORE => {
                let state = dev.save();
                assert!(
                    dev.restore(&state).is_ok(),
                    "the device refused its own saved state {state:?}"
                );
            }
            _ => return Done::Other,
        }
        Done::Handled
    }
}

/// A tap stand-in for the net fuzzer: takes every frame (or refuses them all), never has one.
#[derive(Default)]
struct FuzzTap {
    refuse: std::sync::atomic::AtomicBool,
}

impl crate::net::TapIo for FuzzTap {
    fn recv(&self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        if self.refuse.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("tap refuses"));
        }
        Ok(frame.len())
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        // Never polled: the fuzzer never calls `host_event` (the tap is never read).
        -1
    }
}

/// virtio-net's receive and transmit queues driven by the guest operations in `data` (see
/// [`op`]), with frames arriving from a fake tap. The tap is never read: `NET_RX_FRAME` queues a
/// frame as a tap read would. Returns the device's counters.
pub fn net_queues(data: &[u8]) -> crate::Counters {
    let mut inp = Input(data);
    let fl = inp.u8();
    let mac = (fl & flags::VARIANT == 0).then_some([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let tap = Arc::new(FuzzTap::default());
    let mut dev = crate::Net::with_backend(mac, tap.clone());
    let Some(mut drv) = QueueDriver::new(2, fl & flags::EVENT_IDX != 0) else {
        return dev.counters();
    };
    while !inp.is_empty() {
        let op = inp.u8() % op::NET_OPS;
        if !matches!(drv.common(op, &mut inp, &mut dev), Done::Other) {
            continue;
        }
        match op {
            op::NET_RX_FRAME => {
                let len = usize::from(inp.u16()) | usize::from(inp.u8() & 1) << 16;
                let mut frame = inp.bytes(len).to_vec();
                frame.resize(len, 0);
                dev.offer_frame(&frame);
            }
            op::NET_TAP_FAIL => {
                tap.refuse.fetch_xor(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    dev.counters()
}

/// virtio-rng's queue driven by the guest operations in `data` (see [`op`]).
pub fn rng_queues(data: &[u8]) -> crate::Counters {
    let mut inp = Input(data);
    let fl = inp.u8();
    let Ok(mut dev) = crate::Rng::new() else {
        return crate::Counters::default();
    };
    let Some(mut drv) = QueueDriver::new(1, fl & flags::EVENT_IDX != 0) else {
        return dev.counters();
    };
    let _ = dev.activate(crate::COMMON_FEATURES);
    while !inp.is_empty() {
        let op = inp.u8() % op::RNG_OPS;
        if let Done::Reset = drv.common(op, &mut inp, &mut dev) {
            let _ = dev.activate(crate::COMMON_FEATURES);
        }
    }
    dev.counters()
}

/// A directory removed (with what is in it) on drop. In `/dev/shm` where there is one: binding
/// and removing three sockets per input is four times faster there than on a disk.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Option<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let root = ROOT.get_or_init(|| {
            let shm = std::path::Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
        let p = root.join(format!(
            "anyvisor-fuzz-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).ok()?;
        Some(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host side of the vsock fuzzer: services listening at `<uds>_<port>` and the sockets it
/// holds (host clients it connected, connections it accepted).
struct Host {
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    connects: usize,
}

impl Host {
    fn accept(&mut self) {
        for l in &self.listeners {
            while let Ok((s, _)) = l.accept() {
                // Beyond the limit the connection is closed at once (the guest sees a reset).
                if self.streams.len() < MAX_STREAMS && s.set_nonblocking(true).is_ok() {
                    self.streams.push(s);
                }
            }
        }
    }

    fn stream(&mut self, b: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        if n == 0 {
            return None;
        }
        self.streams.get_mut(usize::from(b) % n)
    }
}

/// virtio-vsock's receive, transmit and event queues driven by the guest operations in `data`,
/// and the host side by its host operations (see [`op`]): host clients connect to the device's
/// socket and send `CONNECT <port>` lines, guest connections reach host services listening on
/// [`FUZZ_HOST_PORTS`]. No worker: `POLL` does its host-side work. Returns the device's counters.
pub fn vsock_queues(data: &[u8]) -> crate::Counters {
    use crate::vsock::packet::{HEADER_LEN, Header, TYPE_STREAM};

    let mut inp = Input(data);
    let fl = inp.u8();
    let Some(dir) = TempDir::new() else {
        return crate::Counters::default();
    };
    let uds = dir.0.join("v.sock");
    let Ok(mut dev) = crate::Vsock::new(crate::VsockConfig {
        guest_cid: FUZZ_GUEST_CID,
        uds_path: uds.clone(),
    }) else {
        return crate::Counters::default();
    };
    let mut host = Host {
        listeners: Vec::new(),
        streams: Vec::new(),
        connects: 0,
    };
    for port in FUZZ_HOST_PORTS {
        let mut p = uds.clone().into_os_string();
        p.push(format!("_{port}"));
        if let Ok(l) = UnixListener::bind(&p)
            && l.set_nonblocking(true).is_ok()
        {
            host.listeners.push(l);
        }
    }
    let Some(mut drv) = QueueDriver::new(3, fl & flags::EVENT_IDX != 0) else {
        return dev.counters();
    };
    if fl & flags::VARIANT != 0 {
        let state = dev.save();
        assert!(dev.restore(&state).is_ok(), "vsock refused its own state");
    }
    if dev.activate(0).is_err() {
        return dev.counters();
    }
    let mut buf = vec![0u8; 0x1_0000];
    while !inp.is_empty() {
        let op = inp.u8() % op::VSOCK_OPS;
        match drv.common(op, &mut inp, &mut dev) {
            Done::Handled => {
                host.accept();
                continue;
            }
            Done::Reset => {
                let _ = dev.activate(0);
                continue;
            }
            Done::Other => {}
        }
        match op {
            op::VSOCK_TX => {
                let mode = inp.u8();
                let mut raw = [0u8; HEADER_LEN];
                let given = inp.bytes(HEADER_LEN);
                raw[..given.len()].copy_from_slice(given);
                let len = usize::from(inp.u16());
                let payload = inp.bytes(len);
                let Some(mut h) = Header::parse(&raw) else {
                    continue;
                };
                if mode & 1 == 0 {
                    h.src_cid = FUZZ_GUEST_CID;
                    h.dst_cid = crate::vsock::muxer::HOST_CID;
                    h.type_ = TYPE_STREAM;
                }
                if mode & 2 == 0 {
                    h.len = payload.len() as u32;
                }
                let mut bufs = Vec::new();
                if mode & 4 != 0 {
                    let mut all = h.to_bytes().to_vec();
                    all.extend_from_slice(payload);
                    let at = drv.alloc(all.len() as u64);
                    let _ = drv.mem.write_slice(&all, GuestAddress(at));
                    bufs.push((at, all.len() as u32, false));
                } else {
                    let at = drv.alloc(HEADER_LEN as u64);
                    let _ = drv.mem.write_slice(&h.to_bytes(), GuestAddress(at));
                    bufs.push((at, HEADER_LEN as u32, false));
                    if !payload.is_empty() {
                        let at = drv.alloc(payload.len() as u64);
                        let _ = drv.mem.write_slice(payload, GuestAddress(at));
                        bufs.push((at, payload.len() as u32, false));
                    }
                }
                let q = crate::vsock::TX_QUEUE;
                drv.add_chain(q, &bufs, mode & 8 != 0);
                drv.notify(&mut dev, q);
                host.accept();
            }
            // A blocking connect: bounded so that the listen backlog never fills.
            op::HOST_CONNECT
                if host.streams.len() < MAX_STREAMS && host.connects < MAX_CONNECTS =>
            {
                host.connects += 1;
                if let Ok(s) = UnixStream::connect(&uds)
                    && s.set_nonblocking(true).is_ok()
                {
                    host.streams.push(s);
                }
            }
            op::HOST_WRITE => {
                let i = inp.u8();
                let len = usize::from(inp.u8());
                let bytes = inp.bytes(len);
                if let Some(s) = host.stream(i) {
                    let _ = s.write(bytes);
                }
            }
            op::HOST_READ => {
                let i = inp.u8();
                if let Some(s) = host.stream(i) {
                    for _ in 0..8 {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
            }
            op::HOST_SHUTDOWN => {
                let i = inp.u8();
                let how = inp.u8() % 4;
                let n = host.streams.len();
                if n > 0 {
                    let i = usize::from(i) % n;
                    let how = match how {
                        0 => std::net::Shutdown::Read,
                        1 => std::net::Shutdown::Write,
                        2 => std::net::Shutdown::Both,
                        _ => {
                            host.streams.swap_remove(i);
                            continue;
                        }
                    };
                    let _ = host.streams[i].shutdown(how);
                }
            }
            op::POLL => {
                dev.host_event();
                // The kicks would have the worker process queues: the fuzzer notifies them.
                dev.take_kicks();
                host.accept();
            }
            _ => {}
        }
    }
    let counters = dev.counters();
    drop(dev);
    drop(host);
    drop(dir);
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_queue_survives_patterns() {
        let mut data = vec![0u8; 0x1_0000];
        for seed in 0..200u32 {
            let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
            for b in data.iter_mut().take(0x400) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            // Keep the available index small enough some of the time so chains get walked.
            data[0x102] = (seed % 20) as u8;
            data[0x103] = 0;
            blk_queue(&data);
        }
    }

    /// Deterministic variations of `input`: every byte set to 0x00, 0xff and flipped (every
    /// `step`-th byte for long inputs), and every prefix cut at those positions.
    fn mutations(input: &[u8], step: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
        (0..input.len()).step_by(step).flat_map(move |i| {
            [|_: u8| 0u8, |_: u8| 0xffu8, |b: u8| b ^ 0x80]
                .into_iter()
                .map(move |f| {
                    let mut m = input.to_vec();
                    m[i] = f(m[i]);
                    m
                })
                .chain(std::iter::once(input[..i].to_vec()))
        })
    }

    fn w(len: u32) -> SegSpec {
        SegSpec {
            write: true,
            len,
            data: None,
        }
    }

    fn rd(data: &[u8]) -> SegSpec {
        SegSpec {
            write: false,
            len: data.len() as u32,
            data: Some(data.to_vec()),
        }
    }

    /// A Linux-like exchange: one frame sent (header and frame in separate buffers), receive
    /// buffers posted, two frames received.
    fn net_exchange() -> OpWriter {
        let mut o = OpWriter::new(0);
        o.fill(0, 4, 1526);
        o.add_chain(1, &[rd(&[0; 12]), rd(&[0xab; 60])], false, true);
        o.net_rx_frame(&[0x11; 42]);
        o.net_rx_frame(&[0x22; 98]);
        o.notify(0);
        o
    }

    #[test]
    fn net_queues_reach_tap_and_guest() {
        let c = net_queues(&net_exchange().0);
        assert_eq!(c.bytes_written, 60, "{c:?}");
        assert_eq!(c.bytes_read, 42 + 98, "{c:?}");
        assert_eq!((c.errors, c.invalid_descriptors), (0, 0), "{c:?}");
        // Through an indirect table, and with the tap refusing.
        let mut o = OpWriter::new(flags::EVENT_IDX);
        o.add_chain(1, &[rd(&[0; 12]), rd(&[1; 20])], true, true);
        o.net_tap_fail();
        o.add_chain(1, &[rd(&[0; 12]), rd(&[1; 20])], false, true);
        let c = net_queues(&o.0);
        assert_eq!((c.bytes_written, c.errors), (20, 1), "{c:?}");
    }

    #[test]
    fn net_queues_survive_mutations() {
        let mut n = 0;
        for m in mutations(&net_exchange().0, 3) {
            net_queues(&m);
            n += 1;
        }
        assert!(n > 100);
    }

    #[test]
    fn rng_queues_fill_buffers() {
        let mut o = OpWriter::new(0);
        o.fill(0, 2, 64);
        o.add_chain(0, &[w(16), w(16)], true, true);
        let c = rng_queues(&o.0);
        assert_eq!((c.requests, c.bytes_read), (3, 160), "{c:?}");
        for m in mutations(&o.0, 1) {
            rng_queues(&m);
        }
    }

    fn vsock_header(op: u16, src_port: u32, dst_port: u32, len: u32) -> [u8; 44] {
        crate::vsock::packet::Header {
            src_cid: FUZZ_GUEST_CID,
            dst_cid: 2,
            src_port,
            dst_port,
            len,
            type_: 1,
            op,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 0,
        }
        .to_bytes()
    }

    /// The guest connects to host port 1234, sends "ping" and gets "pong"; a host client
    /// connects to guest port 5000 and the guest accepts.
    fn vsock_exchange() -> OpWriter {
        use crate::vsock::packet::{OP_REQUEST, OP_RESPONSE, OP_RW};
        let mut o = OpWriter::new(0);
        o.fill(0, 4, 4096);
        o.vsock_tx(&vsock_header(OP_REQUEST, 49152, 1234, 0), &[], false);
        o.vsock_tx(&vsock_header(OP_RW, 49152, 1234, 4), b"ping", false);
        o.host_read(0);
        o.host_write(0, b"pong");
        o.poll();
        o.notify(0);
        o.host_connect();
        o.host_write(1, b"CONNECT 5000\n");
        o.poll();
        o.notify(0);
        let mut resp = vsock_header(OP_RESPONSE, 5000, 0, 0);
        // The device's first host port.
        resp[20..24].copy_from_slice(&(1u32 << 30).to_le_bytes());
        o.vsock_tx(&resp, &[], true);
        o.host_read(1);
        o
    }

    #[test]
    fn vsock_queues_connect_both_ways() {
        let c = vsock_queues(&vsock_exchange().0);
        // "ping" reached the host service, "pong" the guest.
        assert_eq!((c.bytes_written, c.bytes_read), (4, 4), "{c:?}");
        assert_eq!((c.errors, c.invalid_descriptors), (0, 0), "{c:?}");
        // Sent: REQUEST, "ping", RESPONSE; received: RESPONSE, "pong", the host's REQUEST.
        assert_eq!(c.requests, 3 + 3, "{c:?}");
        // Restored, the device owes a transport-reset event: a 2-byte event buffer is too small.
        for (fl, errors) in [(flags::VARIANT, 1), (0, 0)] {
            let mut o = OpWriter::new(fl);
            o.fill(2, 1, 2);
            assert_eq!(vsock_queues(&o.0).errors, errors, "flags {fl}");
        }
    }

    #[test]
    fn vsock_queues_survive_mutations() {
        let mut n = 0;
        for m in mutations(&vsock_exchange().0, 5) {
            vsock_queues(&m);
            n += 1;
        }
        assert!(n > 50);
    }
}
