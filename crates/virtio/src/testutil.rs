//! Test helpers: guest memory, a counting interrupt line, a driver-side view of a split queue
//! (built on virtio-queue's `MockSplitQueue`), temporary files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::{DeviceError, GuestMemory, Interrupt, VirtioDevice};

/// Guest RAM used by tests: 16 MiB at 0.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where tests put data buffers.
pub const DATA: u64 = 0x10_0000;

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("test memory")
}

#[derive(Default)]
pub struct CountingIrq(pub AtomicUsize);

impl CountingIrq {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn irq() -> Arc<CountingIrq> {
    Arc::new(CountingIrq::default())
}

/// A buffer of a chain as the driver describes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn r(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn w(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// Driver side of one split queue in test memory.
pub struct Driver<'a> {
    pub mq: MockSplitQueue<'a, GuestMemory>,
    pub mem: &'a GuestMemory,
    /// The device side of the queue, kept across requests like a transport keeps it.
    pub queue: Queue,
    next_desc: u16,
    avail_idx: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemory, size: u16) -> Self {
        let mq = MockSplitQueue::new(mem, size);
        let queue = mq.create_queue::<Queue>().expect("queue");
        Driver {
            mq,
            queue,
            mem,
            next_desc: 0,
            avail_idx: 0,
            size,
        }
    }

    /// Lets `dev` process everything made available so far.
    pub fn process(&mut self, dev: &mut dyn VirtioDevice) -> Result<bool, DeviceError> {
        dev.process_queue(0, &mut self.queue, self.mem)
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

    /// Makes `head` available to the device.
    pub fn publish(&mut self, head: u16) {
        let ring = self.mq.avail_addr().0 + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem
            .write_obj(head, GuestAddress(ring))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.mq.avail_addr().0 + 2))
            .expect("avail idx");
    }

    /// Writes `bufs` as a linked chain in the descriptor table and publishes it.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let last = i + 1 == bufs.len();
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(idx, b.addr, b.len, flags, (idx + 1) % self.size);
            self.next_desc = (idx + 1) % self.size;
        }
        self.publish(head);
        head
    }

    /// Writes `bufs` as an indirect table at `table` and publishes a one-descriptor chain
    /// pointing at it.
    pub fn add_indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, (i + 1) as u16));
            self.mem
                .write_obj(d, GuestAddress(table + i as u64 * 16))
                .expect("indirect table");
        }
        let head = self.next_desc;
        self.write_desc(
            head,
            table,
            (bufs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.next_desc = (head + 1) % self.size;
        self.publish(head);
        head
    }

    /// With VIRTIO_RING_F_EVENT_IDX: interrupt me once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.mq.avail_addr().0 + 4 + u64::from(self.size) * 2;
        self.mem
            .write_obj(idx, GuestAddress(at))
            .expect("used event");
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

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "anyvisor-virtio-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// Whether qemu-img is available; prints why a test is skipped otherwise.
pub fn have_qemu_img(test: &str) -> bool {
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP {test}: qemu-img not installed (apt-get install qemu-utils)");
    }
    ok
}

/// Runs qemu-img or qemu-io with `args`, panicking with its output on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
