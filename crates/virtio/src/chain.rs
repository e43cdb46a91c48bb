//! Taking descriptor chains off a queue, shared by the device models.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::{DeviceError, GuestMemory};

/// One buffer of a chain, as the driver described it. Nothing about it is checked yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// Reads the whole chain. Refuses empty chains, chains longer than `max` descriptors and chains
/// that were cut short (a loop, a `next` index outside the table, an unreadable or nested
/// indirect table): virtio-queue's iterator ends those silently, leaving a last descriptor that
/// still has the NEXT flag.
pub(crate) fn collect(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
) -> Result<Vec<Seg>, DeviceError> {
    let mut segs = Vec::new();
    let mut truncated = false;
    for desc in chain {
        if segs.len() >= max {
            return Err(DeviceError::InvalidChain);
        }
        truncated = desc.has_next();
        segs.push(Seg {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
    }
    if segs.is_empty() || truncated {
        return Err(DeviceError::InvalidChain);
    }
    Ok(segs)
}

/// Hands every available chain of `queue` to `handle`, which returns the number of bytes it
/// wrote into the chain; puts each chain in the used ring. Re-checks the ring after enabling
/// notifications so no chain is left behind. Returns whether the driver wants an interrupt.
pub(crate) fn drain<F>(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, DeviceError>,
{
    let mut used_any = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(DeviceError::Queue)?;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => return Err(DeviceError::Queue(e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = handle(chain)?;
            queue.add_used(mem, head, len).map_err(DeviceError::Queue)?;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(DeviceError::Queue)? {
            break;
        }
    }
    if !used_any {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(DeviceError::Queue)
}
