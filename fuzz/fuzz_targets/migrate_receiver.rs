//! Feeds arbitrary bytes to a migration destination as the source's side of the stream
//! (unauthenticated `unix:` mode: with a key, the random nonce keeps a fuzzer from ever passing
//! the handshake). The receiver must refuse or finish, never panic, hang or allocate without
//! bound; what it writes back is discarded.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::OnceLock;

use hv::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

/// The stream: reads come from the input, writes vanish.
struct Tape(Cursor<Vec<u8>>);

impl Read for Tape {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Tape {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Dest(&'static GuestMemory);

impl migrate::DestinationVm for Dest {
    fn memory(&self) -> &GuestMemory {
        self.0
    }
}

/// 1 MiB at 0 and 1 MiB at 4 MiB (a hole between), reused across runs.
fn memory() -> Option<&'static GuestMemory> {
    static MEM: OnceLock<Option<GuestMemory>> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)])
            .ok()
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(mem) = memory() else { return };
    let arrived = migrate::receive_on(Tape(Cursor::new(data.to_vec())), None, |_desc| {
        Ok::<_, String>(Dest(mem))
    });
    if let Ok(a) = arrived {
        let _ = a.confirmation.resumed();
    }
});
