//! Boot-from-disk's own parsers (`bootdisk`): the first byte picks one, the rest is its input.
//! 0: `grub.cfg` run as GRUB would (a host whose `search` finds the boot device and whose files
//! are all absent); 1: a Boot Loader Specification entry; 2: `extlinux.conf`; 3: the kernel
//! check; 4: `grubenv`; anything else: the whole search (partition table, filesystem probe,
//! boot files) over the rest as a disk image. Must never panic, allocate without bound, or hang.
#![no_main]

use std::io;
use std::sync::Arc;

use bootdisk::grub::{FileRef, Host, SearchKind};
use libfuzzer_sys::fuzz_target;

struct NoFiles;

impl Host for NoFiles {
    fn search(&self, _: SearchKind, _: &str) -> Option<String> {
        Some("hd0,gpt2".into())
    }
    fn read(&self, _: &FileRef) -> Option<Vec<u8>> {
        None
    }
}

/// The input as a read-only disk.
struct Bytes(Vec<u8>);

impl bootdisk::Image for Bytes {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which {
        0 => {
            let _ = bootdisk::grub::default_entry(&text, "hd0,gpt2", "/boot/grub", &NoFiles);
        }
        1 => {
            let _ = bootdisk::bls::parse_entry("fuzz", &text, &[]);
        }
        2 => {
            let _ = bootdisk::extlinux::default_label(&text);
        }
        3 => {
            let _ = bootdisk::kernel::check(rest);
        }
        4 => {
            let _ = bootdisk::grub::parse_grubenv(&text);
        }
        _ => {
            let _ = bootdisk::find_boot(Arc::new(Bytes(rest.to_vec())));
        }
    }
});
