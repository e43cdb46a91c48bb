//! Test helpers for multi-queue devices (net, vsock): a driver-side split queue placed anywhere
//! in test memory, and a Linux-like probe of a virtio-mmio transport with several queues.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::testutil::Buf;
use crate::{DeviceError, GuestMemory, MmioHandler, MmioTransport, VirtioDevice};

/// Driver side of one split queue whose rings start at `base`.
pub struct QDriver<'a> {
    pub mq: MockSplitQueue<'a, GuestMemory>,
    pub mem: &'a GuestMemory,
    /// The device side, for tests that call `process_queue` directly.
    pub queue: Queue,
    next_desc: u16,
    avail_idx: u16,
    size: u16,
}

impl<'a> QDriver<'a> {
    pub fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
        let mq = MockSplitQueue::create(mem, GuestAddress(base), size);
        let queue = mq.create_queue::<Queue>().expect("queue");
        QDriver {
            mq,
            mem,
            queue,
            next_desc: 0,
            avail_idx: 0,
            size,
        }
    }

    pub fn process(
        &mut self,
        dev: &mut dyn VirtioDevice,
        index: usize,
    ) -> Result<bool, DeviceError> {
        dev.process_queue(index, &mut self.queue, self.mem)
    }

    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mq
            .desc_table()
            .store(
                index,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .expect("descriptor store");
    }

    pub fn publish(&mut self, head: u16) {
        let ring = self.mq.avail_addr().0 + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem
            .write_obj(head, GuestAddress(ring))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.mq.avail_addr().0 + 2))
            .expect("avail idx");
    }

    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 != bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(idx, b.addr, b.len, flags, (idx + 1) % self.size);
            self.next_desc = (idx + 1) % self.size;
        }
        self.publish(head);
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.mq.used_addr().0 + 2))
            .expect("used idx")
    }

    /// Used ring element `i`: (descriptor head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let base = self.mq.used_addr().0 + 4 + u64::from(i % self.size) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(base)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(base + 4)).expect("used len");
        (id, len)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read guest");
        v
    }

    pub fn fill(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write guest");
    }
}

fn rd(t: &MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// What Linux's virtio_mmio does at probe: status handshake acking every offered feature
/// (except EVENT_IDX, to keep interrupts unconditional), one queue per driver, DRIVER_OK.
pub fn probe(t: &mut MmioTransport, queues: &[&QDriver]) {
    const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    wr(t, 0x70, 0);
    wr(t, 0x70, 1);
    wr(t, 0x70, 1 | 2);
    wr(t, 0x14, 1);
    let hi = rd(t, 0x10);
    wr(t, 0x14, 0);
    let f = (u64::from(hi) << 32 | u64::from(rd(t, 0x10))) & !EVENT_IDX;
    wr(t, 0x24, 1);
    wr(t, 0x20, (f >> 32) as u32);
    wr(t, 0x24, 0);
    wr(t, 0x20, f as u32);
    wr(t, 0x70, 1 | 2 | 8);
    assert_eq!(rd(t, 0x70), 1 | 2 | 8, "FEATURES_OK refused");
    for (i, d) in queues.iter().enumerate() {
        wr(t, 0x30, i as u32);
        wr(t, 0x38, u32::from(d.size));
        for (off, addr) in [
            (0x80, d.mq.desc_table_addr().0),
            (0x90, d.mq.avail_addr().0),
            (0xa0, d.mq.used_addr().0),
        ] {
            wr(t, off, addr as u32);
            wr(t, off + 4, (addr >> 32) as u32);
        }
        wr(t, 0x44, 1);
    }
    wr(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(rd(t, 0x70), 1 | 2 | 8 | 4, "DRIVER_OK refused");
}

/// The driver notifies queue `index`.
pub fn notify(t: &mut MmioTransport, index: u32) {
    wr(t, 0x50, index);
}
