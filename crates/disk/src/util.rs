//! Pieces shared by the format parsers: the open-time error, field readers that never panic,
//! range checks, and a small bounded cache of metadata tables.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;

/// Why an image (other than qcow2, which has its own error) cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("I/O error")]
    Io(#[from] io::Error),
    #[error("not a {0} image (bad magic)")]
    Magic(&'static str),
    #[error("file too short for a {0} header")]
    Short(&'static str),
    #[error("{format} {field} is {value:#x}: {why}")]
    Field {
        format: &'static str,
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("{format} {what} checksum {stored:#x} does not match the content ({computed:#x})")]
    Checksum {
        format: &'static str,
        what: &'static str,
        stored: u64,
        computed: u64,
    },
    #[error("{format}: {what} not supported")]
    Unsupported { format: &'static str, what: String },
    #[error("{0} images are read-only; attach with readonly=on or convert with anyvisor import")]
    ReadOnly(String),
    #[error("{format} descriptor: {why}")]
    Descriptor { format: &'static str, why: String },
    #[error("extent {name}")]
    Extent {
        name: String,
        #[source]
        source: Box<ImageError>,
    },
}

/// Shorthand for [`ImageError::Field`].
pub(crate) fn field(
    format: &'static str,
    field: &'static str,
    value: u64,
    why: &'static str,
) -> ImageError {
    ImageError::Field {
        format,
        field,
        value,
        why,
    }
}

/// Little- and big-endian fields of a header buffer; out-of-range reads give 0 (every caller
/// checked the buffer length first; 0 then fails the field's own check).
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A size, offset or count from an image that does not fit this host's `usize` (a buffer
/// length or an index): the image asks for more than the host can address.
#[derive(Debug, thiserror::Error)]
#[error("{what} {value:#x} does not fit this host's address space")]
pub struct TooLarge {
    pub what: &'static str,
    pub value: u64,
}

/// `value` as a `usize`, or an `InvalidData` error carrying [`TooLarge`].
pub(crate) fn to_usize(value: u64, what: &'static str) -> io::Result<usize> {
    usize::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, TooLarge { what, value }))
}

pub(crate) fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

pub(crate) fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(invalid_input("access beyond the end of the disk"));
    }
    Ok(())
}

/// `[off, off + len)` lies inside a file of `file_len` bytes.
pub(crate) fn in_file(off: u64, len: u64, file_len: u64) -> bool {
    off.checked_add(len).is_some_and(|e| e <= file_len)
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of the file.
pub(crate) fn read_exact_or_eof(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .ok_or_else(|| invalid_input("offset overflow"))?;
        let rest = buf.get_mut(done..).unwrap_or_default();
        match file.read_at(rest, at) {
            Ok(0) => {
                rest.fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads `len` bytes at `offset` into a new buffer; the caller checked `len` against the file
/// size and its caps.
pub(crate) fn read_vec(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| invalid_input("table too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Splits `[offset, offset + len)` into pieces that stay within one block of `block` bytes
/// (a power of two or not): yields (offset, length).
pub(crate) fn pieces(offset: u64, len: u64, block: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end || block == 0 {
            return None;
        }
        let n = (block - pos % block).min(end - pos);
        let p = (pos, n);
        pos += n;
        Some(p)
    })
}

/// A cache of at most `cap` values, dropping the least recently used. Hand-written rather than
/// a crate: the caches hold a few dozen metadata tables, so a map plus a use counter with a
/// linear scan on eviction is enough, and it needs no unsafe code.
pub(crate) struct Lru<K, V> {
    cap: usize,
    tick: u64,
    map: HashMap<K, (u64, V)>,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    pub(crate) fn new(cap: usize) -> Lru<K, V> {
        Lru {
            cap: cap.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|(used, v)| {
            *used = t;
            v
        })
    }

    /// Inserts (replacing) `k`, evicting the least recently used entry when full.
    pub(crate) fn insert(&mut self, k: K, v: V) -> &mut V {
        if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| *k);
            if let Some(o) = oldest {
                self.map.remove(&o);
            }
        }
        self.tick += 1;
        let e = self.map.entry(k).insert_entry((self.tick, v)).into_mut();
        &mut e.1
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_keeps_the_recently_used() {
        let mut c = Lru::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert!(c.get_mut(&1).is_some());
        c.insert(3, "c");
        assert_eq!(c.len(), 2);
        assert!(c.get_mut(&2).is_none(), "2 was least recently used");
        assert!(c.get_mut(&1).is_some());
        assert!(c.get_mut(&3).is_some());
    }

    #[test]
    fn pieces_split_at_block_boundaries() {
        let v: Vec<_> = pieces(500, 1100, 512).collect();
        assert_eq!(v, vec![(500, 12), (512, 512), (1024, 512), (1536, 64)]);
    }
}
