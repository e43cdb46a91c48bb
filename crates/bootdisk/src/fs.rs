//! Which filesystem a partition holds, by its superblock magic, so that an unsupported one can
//! be named in the error. Only ext2/3/4 is read (through `ext4-view`).

use crate::{Error, Image, read_vec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext,
    /// Recognised but not read: its name.
    Other(&'static str),
    Unknown,
}

/// Probes the filesystem at `start` (a partition of `size` bytes).
pub fn probe(img: &dyn Image, start: u64, size: u64) -> Result<FsKind, Error> {
    let want = 0x10100u64.min(size);
    let head = read_vec(img, start, want)?;
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    Ok(if at(1024 + 56, &[0x53, 0xef]) {
        FsKind::Ext
    } else if at(0, b"XFSB") {
        FsKind::Other("xfs")
    } else if at(0x10040, b"_BHRfS_M") {
        FsKind::Other("btrfs")
    } else if at(0, b"LUKS\xba\xbe") {
        FsKind::Other("LUKS (encrypted)")
    } else if at(512, b"LABELONE") {
        FsKind::Other("LVM2 physical volume")
    } else if at(3, b"NTFS    ") {
        FsKind::Other("ntfs")
    } else if at(3, b"EXFAT   ") {
        FsKind::Other("exfat")
    } else if at(0x36, b"FAT") || at(0x52, b"FAT32") {
        FsKind::Other("vfat")
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        FsKind::Other("swap")
    } else if at(0, b"hsqs") {
        FsKind::Other("squashfs")
    } else if at(1024, &0xf2f5_2010u32.to_le_bytes()) {
        FsKind::Other("f2fs")
    } else if at(0x8001, b"CD001") {
        FsKind::Other("iso9660")
    } else if at(0x10034, b"ReIsEr") {
        FsKind::Other("reiserfs")
    } else {
        FsKind::Unknown
    })
}
