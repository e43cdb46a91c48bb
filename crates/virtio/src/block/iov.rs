//! Positional, vectored file I/O straight between an image file and guest memory: one
//! `preadv(2)` / `pwritev(2)` for all the guest buffers of a request that the image maps to one
//! stretch of its file, with no copy in between.
//!
//! Written by hand, with `unsafe`, because no crate in use does it: vm-memory's volatile I/O
//! (`ReadVolatile` for `File`) reads one `VolatileSlice` per system call at the file position,
//! virtio-queue's `Reader`/`Writer` move data through `std::io::Read`/`Write` byte slices (a
//! copy), and the safe vectored calls (`std`, `nix`, `rustix`) take `&mut [u8]` slices, which
//! guest memory shared with running vCPUs cannot soundly be. The two calls below do what
//! vm-memory's own `read_volatile_raw_fd` does, with an iovec array instead of one pointer, and
//! mark guest pages dirty the same way (every byte the kernel may have written: all of them
//! when the call fails), so migration's dirty tracking sees device writes.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Most iovecs one call takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Which way [`transfer`] moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Way {
    /// File to guest memory (`preadv`).
    FileToGuest,
    /// Guest memory to file (`pwritev`).
    GuestToFile,
}

/// Moves all of `slices` (in order, as one byte stream) from or to `file` at `offset`,
/// repeating the call after a short transfer. Reading past the end of the file is an error
/// (`UnexpectedEof`), as is a write that makes no progress.
pub(super) fn transfer<B: BitmapSlice>(
    way: Way,
    file: &File,
    mut offset: u64,
    slices: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // (index into `slices`, bytes of that slice already done)
    let (mut i, mut skip) = (0usize, 0usize);
    while i < slices.len() {
        let batch: Vec<VolatileSlice<'_, B>> = slices
            .iter()
            .skip(i)
            .take(IOV_MAX)
            .enumerate()
            .map(|(k, s)| {
                if k == 0 {
                    s.offset(skip)
                } else {
                    Ok(s.clone())
                }
            })
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        let guards: Vec<_> = batch.iter().map(|s| s.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&batch)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast::<libc::c_void>(),
                iov_len: s.len(),
            })
            .collect();
        let count = libc::c_int::try_from(iov.len()).map_err(io::Error::other)?;
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let r = match way {
            // SAFETY: `fd` is open for the duration of the call (borrowed from `file`). Each
            // iovec points into a `VolatileSlice` of guest memory, valid for reads and writes of
            // `iov_len` bytes while its pointer guard (`guards`) lives, which is past the call;
            // the kernel writes into that mapping like the guest's own DMA would, never into
            // memory Rust code holds a reference to.
            Way::FileToGuest => unsafe { libc::preadv(fd, iov.as_ptr(), count, off) },
            // SAFETY: as above; `pwritev` only reads the buffers.
            Way::GuestToFile => unsafe { libc::pwritev(fd, iov.as_ptr(), count, off) },
        };
        drop(guards);
        if r < 0 {
            let e = io::Error::last_os_error();
            if way == Way::FileToGuest {
                // A failed read may have written part of the buffers.
                batch.iter().for_each(|s| s.bitmap().mark_dirty(0, s.len()));
            }
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = usize::try_from(r).map_err(io::Error::other)?;
        if n == 0 {
            return Err(match way {
                Way::FileToGuest => io::Error::from(io::ErrorKind::UnexpectedEof),
                Way::GuestToFile => io::Error::from(io::ErrorKind::WriteZero),
            });
        }
        offset = offset
            .checked_add(n as u64)
            .ok_or_else(|| io::Error::other("file offset overflows"))?;
        // Advance over what was moved, marking what the kernel wrote into guest memory.
        for s in &batch {
            let k = n.min(s.len());
            if way == Way::FileToGuest {
                s.bitmap().mark_dirty(0, k);
            }
            n -= k;
            if k == s.len() {
                i += 1;
                skip = 0;
            } else {
                skip += k;
                break;
            }
        }
    }
    Ok(())
}
