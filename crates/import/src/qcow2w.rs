//! Writes a fresh qcow2 (version 3, 64 KiB clusters, 16-bit refcounts; docs/qcow2.md and
//! QEMU's docs/interop/qcow2.txt) from any readable disk, in one sequential pass: each
//! non-zero cluster of guest data is appended as it is read, each L2 table after the 512 MiB
//! of guest data it maps, then the L1 table, the refcount blocks and table (every cluster has
//! refcount 1), and finally the header in cluster 0. Zero clusters are left unallocated.
//!
//! Written by hand rather than through the `disk` crate's qcow2 (which allocates through its
//! L2/refcount caches for random guest writes): a converter knows the whole layout up front,
//! so the output is compact and written once, front to back.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

const CLUSTER_BITS: u32 = 16;
/// The cluster size as a buffer length, and as a file offset.
const CLUSTER_LEN: usize = 1 << CLUSTER_BITS;
const CLUSTER: u64 = CLUSTER_LEN as u64;
/// L2 entries per table (8-byte entries).
const L2_LEN: usize = CLUSTER_LEN / 8;
const L2_ENTRIES: u64 = L2_LEN as u64;
/// Refcounts per block (16-bit entries).
const RC_ENTRIES: u64 = CLUSTER / 2;
/// QCOW_OFLAG_COPIED: refcount is exactly one.
const COPIED: u64 = 1 << 63;

/// Where the guest data comes from.
pub trait Source {
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Writes `src` as qcow2 to `out` (an empty file). `progress(done)` is called with the bytes
/// of guest data read so far.
pub fn write(src: &mut dyn Source, out: File, progress: &mut dyn FnMut(u64)) -> io::Result<()> {
    let size = src.size();
    let clusters = size.div_ceil(CLUSTER);
    let l1_len = clusters.div_ceil(L2_ENTRIES);
    let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "disk too large for qcow2");
    let l1_entries = u32::try_from(l1_len).map_err(|_| too_large())?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    // Cluster 0: the header, written last.
    w.write_all(&[0u8; CLUSTER_LEN])?;
    let mut next = CLUSTER;
    let mut l1 = vec![0u64; usize::try_from(l1_len).map_err(|_| too_large())?];
    let mut buf = vec![0u8; CLUSTER_LEN];
    for (i, l1e) in l1.iter_mut().enumerate() {
        let mut l2 = vec![0u64; L2_LEN];
        let mut any = false;
        for (j, l2e) in l2.iter_mut().enumerate() {
            let guest = (i as u64 * L2_ENTRIES + j as u64) * CLUSTER;
            if guest >= size {
                break;
            }
            let n = (size - guest).min(CLUSTER) as usize;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            src.read_at(guest, chunk)?;
            progress(guest + n as u64);
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            // A short last cluster is padded with zeros.
            if let Some(tail) = buf.get_mut(n..) {
                tail.fill(0);
            }
            w.write_all(&buf)?;
            *l2e = next | COPIED;
            next += CLUSTER;
            any = true;
        }
        if any {
            for e in &l2 {
                w.write_all(&e.to_be_bytes())?;
            }
            *l1e = next | COPIED;
            next += CLUSTER;
        }
    }
    // L1 table.
    let l1_offset = next;
    let l1_bytes = l1_len * 8;
    for e in &l1 {
        w.write_all(&e.to_be_bytes())?;
    }
    pad(&mut w, l1_bytes)?;
    next += l1_bytes.div_ceil(CLUSTER).max(1) * CLUSTER;
    if l1_bytes == 0 {
        w.write_all(&[0u8; CLUSTER_LEN])?;
    }
    // Refcount blocks and table cover every cluster, themselves included.
    let used = next / CLUSTER;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = used + blocks + table;
        let nb = total.div_ceil(RC_ENTRIES);
        let nt = (nb * 8).div_ceil(CLUSTER).max(1);
        if nb == blocks && nt == table {
            break;
        }
        blocks = nb;
        table = nt;
    }
    let total = used + blocks + table;
    let blocks_offset = next;
    for b in 0..blocks {
        let mut block = vec![0u8; CLUSTER_LEN];
        for (k, c) in block.chunks_mut(2).enumerate() {
            if b * RC_ENTRIES + (k as u64) < total {
                c.copy_from_slice(&1u16.to_be_bytes());
            }
        }
        w.write_all(&block)?;
    }
    let table_offset = blocks_offset + blocks * CLUSTER;
    for b in 0..blocks {
        w.write_all(&(blocks_offset + b * CLUSTER).to_be_bytes())?;
    }
    pad(&mut w, blocks * 8)?;
    let mut f = w.into_inner().map_err(|e| e.into_error())?;
    // The header.
    let mut h = Vec::with_capacity(112);
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
    h.extend_from_slice(&0u32.to_be_bytes()); // backing file size
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt method
    h.extend_from_slice(&l1_entries.to_be_bytes());
    h.extend_from_slice(&l1_offset.to_be_bytes());
    h.extend_from_slice(&table_offset.to_be_bytes());
    h.extend_from_slice(&u32::try_from(table).map_err(|_| too_large())?.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16 bits
    h.extend_from_slice(&104u32.to_be_bytes()); // header length
    h.extend_from_slice(&[0u8; 8]); // end of header extensions
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&h)?;
    f.sync_all()
}

/// Pads `written` bytes up to the next cluster boundary.
fn pad(w: &mut impl Write, written: u64) -> io::Result<()> {
    let rem = written % CLUSTER;
    if rem != 0 {
        let fill = CLUSTER_LEN - usize::try_from(rem).unwrap_or(0);
        w.write_all(&vec![0u8; fill])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl Source for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
    }

    fn roundtrip(data: Vec<u8>) {
        let dir = std::env::temp_dir().join(format!(
            "anyvisor-qcow2w-{}-{}",
            std::process::id(),
            data.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.qcow2");
        let f = std::fs::File::create(&p).unwrap();
        let mut last = 0;
        write(&mut Mem(data.clone()), f, &mut |d| last = d).unwrap();
        assert_eq!(last, data.len() as u64);
        // Read it back through the disk crate's qcow2 reader.
        let mut d = disk::open(&p, disk::OpenOptions::readonly(true)).unwrap();
        assert_eq!(d.format(), disk::Format::Qcow2);
        assert_eq!(d.size(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        d.read_at(0, &mut back).unwrap();
        assert!(back == data);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sparse_and_partial_clusters() {
        let mut d = vec![0u8; (3 << 20) + 1000];
        d[0] = 1;
        d[70_000] = 2;
        let n = d.len();
        d[n - 1] = 3;
        roundtrip(d);
        roundtrip(vec![0u8; 1 << 20]);
    }

    /// 1.25 GiB with data in the first, second and third L2 table's range.
    struct Sparse;
    const MARKS: [u64; 3] = [5, (512 << 20) + 7, (1 << 30) + (200 << 20)];
    impl Source for Sparse {
        fn size(&self) -> u64 {
            (1 << 30) + (256 << 20)
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            for m in MARKS {
                if (offset..offset + buf.len() as u64).contains(&m) {
                    buf[usize::try_from(m - offset).unwrap()] = 0xa5;
                }
            }
            Ok(())
        }
    }

    #[test]
    fn several_l2_tables() {
        let dir = std::env::temp_dir().join(format!("anyvisor-qcow2w-{}-big", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.qcow2");
        write(&mut Sparse, std::fs::File::create(&p).unwrap(), &mut |_| {}).unwrap();
        // Three data clusters, three L2 tables, L1, refcount block and table, header.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 10 * CLUSTER);
        let mut d = disk::open(&p, disk::OpenOptions::readonly(true)).unwrap();
        for m in MARKS {
            let mut b = [0u8; 2];
            d.read_at(m, &mut b).unwrap();
            assert_eq!(b, [0xa5, 0], "at {m}");
        }
        let mut b = [1u8; 4];
        d.read_at(900 << 20, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
