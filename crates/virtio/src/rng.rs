//! virtio-rng (virtio 1.x section 5.4): one queue whose device-writable buffers are filled with
//! bytes from the host's `/dev/urandom`, at most [`MAX_BYTES_PER_REQUEST`] per chain.

use std::fs::File;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory as _, Permissions};

use crate::chain;
use crate::{COMMON_FEATURES, Counters, DeviceError, DeviceState, GuestMemory, VirtioDevice};

pub const QUEUE_SIZE: u16 = 256;
/// Cap on the entropy handed out per request.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// Longest chain accepted.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/urandom")]
    Open(#[source] io::Error),
}

/// Saved state of the entropy device: only its statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub counters: Counters,
}

pub struct Rng {
    source: File,
    counters: Counters,
    queue_sizes: [u16; 1],
}

impl Rng {
    pub fn new() -> Result<Rng, Error> {
        let source = File::open("/dev/urandom").map_err(Error::Open)?;
        Ok(Rng {
            source,
            counters: Counters::default(),
            queue_sizes: [QUEUE_SIZE],
        })
    }

    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, DeviceError> {
        self.counters.requests += 1;
        let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
            self.counters.invalid_descriptors += 1;
        })?;
        let mut written = 0u32;
        let mut buf = Vec::new();
        for s in segs.iter().filter(|s| s.writable) {
            let n = s.len.min(MAX_BYTES_PER_REQUEST - written);
            if n == 0 {
                break;
            }
            if !mem.check_range(s.addr, n as usize, Permissions::Write) {
                // Report what was filled so far; the driver sees a short buffer.
                self.counters.errors += 1;
                break;
            }
            buf.resize(n as usize, 0);
            if let Err(e) = self.source.read_exact(&mut buf) {
                hv::rate_limited!(tracing::warn!("virtio-rng: entropy source failed: {e}"));
                self.counters.errors += 1;
                break;
            }
            if mem.write_slice(&buf, s.addr).is_err() {
                self.counters.errors += 1;
                break;
            }
            written += n;
        }
        self.counters.bytes_read += u64::from(written);
        Ok(written)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Ok(false);
        }
        chain::drain(queue, mem, |c| self.handle(c, mem))
    }

    fn reset(&mut self) {}

    fn counters(&self) -> Counters {
        self.counters
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rng(RngState {
            counters: self.counters,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Rng(s) = state else {
            return Err(DeviceError::State("not an entropy device".into()));
        };
        self.counters = s.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
