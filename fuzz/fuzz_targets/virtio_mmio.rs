//! Drives a virtio-mmio transport (virtio-blk over an 8 KiB raw disk, or virtio-rng) with an
//! arbitrary sequence of guest register reads and writes, queue notifications and guest memory
//! writes, optionally starting from an arbitrary saved transport state (JSON). Must never
//! panic, hang or allocate without bound; a device may only end in NEEDS_RESET.
//!
//! Input: byte 0 bit 0 = blk (else rng), bit 1 = read-only disk; then operations, each an op
//! byte followed by its arguments (little-endian):
//!   0 read   off:u16 len:u8          3 notify  queue:u8
//!   1 write  off:u16 value:u32       4 poke    guest address:u16 bytes:[u8; 8]
//!   2 write  off:u16 len:u8 bytes    5 restore the rest of the input as a JSON MmioState
#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use hv::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio::{
    Block, BlockConfig, Format, MmioHandler, MmioState, MmioTransport, Rng, VirtioDevice,
};
use vm_memory::{Bytes, GuestAddress};

struct NoIrq;

impl virtio::Interrupt for NoIrq {
    fn trigger(&self) {}
}

/// A file removed on drop.
struct Disk(PathBuf);

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn device(blk: bool, readonly: bool, disk: &Disk) -> Option<Box<dyn VirtioDevice>> {
    if blk {
        let cfg = BlockConfig {
            path: disk.0.clone(),
            readonly,
            format: Some(Format::Raw),
        };
        Some(Box::new(Block::new(cfg).ok()?))
    } else {
        Some(Box::new(Rng::new().ok()?))
    }
}

/// Takes `n` bytes from the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, tail) = input.split_at(n);
    *input = tail;
    Some(head)
}

fn u16_at(input: &mut &[u8]) -> Option<u64> {
    let b = take(input, 2)?;
    Some(u64::from(u16::from_le_bytes([b[0], b[1]])) % 0x200)
}

fn run(data: &[u8]) -> Option<()> {
    let mut input = data;
    let flags = take(&mut input, 1)?[0];
    let (blk, readonly) = (flags & 1 == 1, flags & 2 == 2);
    let disk =
        Disk(std::env::temp_dir().join(format!("anyvisor-fuzz-mmio-{}", std::process::id())));
    std::fs::write(&disk.0, [0u8; 8192]).ok()?;
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).ok()?);
    let irq = Arc::new(NoIrq);
    let t = MmioTransport::new(device(blk, readonly, &disk)?, mem.clone(), irq.clone()).ok()?;
    let mut steps = 0;
    while steps < 4096 {
        steps += 1;
        match take(&mut input, 1)?[0] % 6 {
            0 => {
                let off = u16_at(&mut input)?;
                let len = [1, 2, 4, 8][usize::from(take(&mut input, 1)?[0] % 4)];
                let mut buf = [0u8; 8];
                t.read(off, &mut buf[..len]);
            }
            1 => {
                let off = u16_at(&mut input)?;
                let v = take(&mut input, 4)?;
                t.write(off, v);
            }
            2 => {
                let off = u16_at(&mut input)?;
                let len = usize::from(take(&mut input, 1)?[0] % 9);
                let v = take(&mut input, len)?;
                t.write(off, v);
            }
            3 => {
                let q = take(&mut input, 1)?[0];
                t.notify(u32::from(q));
            }
            4 => {
                let a = take(&mut input, 2)?;
                let addr = u64::from(u16::from_le_bytes([a[0], a[1]]));
                let v = take(&mut input, 8)?;
                let _ = mem.write_slice(v, GuestAddress(addr));
            }
            _ => {
                let state: MmioState = serde_json::from_slice(input).ok()?;
                let fresh = device(blk, readonly, &disk)?;
                let restored =
                    MmioTransport::restore(fresh, mem.clone(), irq.clone(), &state).ok()?;
                // A restored transport must save back to what it was restored from.
                assert_eq!(
                    restored.save(),
                    state,
                    "restore then save changed the state"
                );
                // Queue addresses and indices came from the state: walk them (a restored
                // transport is paused with every queue pending; resume processes them).
                let t = restored;
                t.resume();
                return Some(());
            }
        }
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
