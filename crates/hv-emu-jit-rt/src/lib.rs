//! The unsafe half of emu's translator: executable memory and calling into it.
//!
//! `hv-emu` is `#![forbid(unsafe_code)]`. Its translator (`hv_emu::jit`) only produces machine
//! code bytes; this crate is the one place where those bytes become executable and run. It
//! exists so that every `unsafe` operation of the translator sits in one small file that can be
//! read in one sitting.
//!
//! * **W^X**: the cache is one anonymous shared mapping mapped twice (the second view made by
//!   `mremap` with an old size of 0, then made read-execute before anything is in it), a
//!   read-write view that code is copied into and a read-execute view that code runs from. No
//!   page is ever writable and executable at once, and no protection changes after creation, so
//!   a seccomp filter that forbids `PROT_EXEC` in `mmap`/`mprotect` (crates/sandbox) keeps
//!   working: both mappings are made in [`CodeCache::new`], which the VMM calls while creating
//!   vCPUs, before any filter exists. Anonymous (shown as `/dev/zero` in `/proc/<pid>/maps`,
//!   not as a file like a `memfd` would be) so that `perf` names samples in it from the
//!   JIT symbol map `/tmp/perf-<pid>.map`.
//! * **Bounded**: the capacity is fixed at creation; [`CodeCache::push`] returns `None` when
//!   full and the owner calls [`CodeCache::clear`] (QEMU's "flush everything" policy). A
//!   [`CodeRef`] remembers the clear generation it was made under, so a stale reference is
//!   refused instead of jumping into overwritten bytes.
//! * **Chaining**: a block may end in a `jmp rel32` that the owner later points at another
//!   block of the same cache ([`CodeCache::patch_jump`]) so that blocks run one after another
//!   without returning; the owner undoes such links (patching the jump back) before the target
//!   becomes invalid. Patching writes the RW view while no code of this cache runs (`&mut self`,
//!   and a cache belongs to one vCPU thread).
//! * **Entering**: [`CodeCache::enter`] runs a block through the cache's *trampoline*, code
//!   installed once at the start of the cache ([`CodeCache::install_trampoline`], kept across
//!   [`CodeCache::clear`]) and called as `extern "sysv64" fn(regs, ctx, block)`: it saves the
//!   callee-saved registers, sets up what blocks expect and `call`s the block; blocks (and the
//!   blocks they chain to) return to it with `ret`, so they need no prologue or epilogue of
//!   their own.
//! * **Calling**: [`CodeCache::call`] runs a block as `extern "sysv64" fn(regs, ctx)`, where
//!   `regs` is the guest's 16 general registers and `ctx` the translator's `#[repr(C)]` context.
//!   The code itself is trusted: it is produced by `hv_emu::jit`, whose invariants (only the
//!   two pointers, the host addresses of guest RAM that its soft TLB holds, the vCPU's vector
//!   registers and MXCSR whose addresses `ctx` holds, and its own stack frame are touched;
//!   callee-saved registers, the MXCSR control bits and DF are preserved) are documented there and
//!   in docs/emu.md ("Translator").
//! * **Time**: [`host_tsc`] reads the host TSC for the emulator's clock (the same counter
//!   translated `rdtsc` reads).

#![allow(unsafe_code)] // Executable memory and calls into generated code: the purpose of this crate.

use std::io;

/// A place in the cache, valid until the next [`CodeCache::clear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRef {
    off: u32,
    len: u32,
    generation: u32,
}

impl CodeRef {
    /// A reference that names no code: never valid in any cache (its end lies past the end of
    /// every cache), so [`CodeCache::call`] refuses it. For tables that keep a `CodeRef` in
    /// every entry.
    pub const NONE: CodeRef = CodeRef {
        off: u32::MAX,
        len: u32::MAX,
        generation: 0,
    };

    /// The block's offset in its cache.
    pub fn offset(&self) -> u32 {
        self.off
    }

    /// The same code entered `by` bytes after its start (a block whose entry is not its first
    /// byte); `None` if that is not inside it.
    pub fn advanced(self, by: u32) -> Option<CodeRef> {
        (by < self.len).then(|| CodeRef {
            off: self.off + by,
            len: self.len - by,
            generation: self.generation,
        })
    }
}

/// Executable memory for translated blocks: one shared memory object, an RW view and an RX view.
pub struct CodeCache {
    rw: *mut u8,
    rx: *const u8,
    size: usize,
    used: usize,
    generation: u32,
    /// Offset of the trampoline, and the end of the part that [`CodeCache::clear`] keeps.
    trampoline: Option<u32>,
    floor: usize,
}

// SAFETY: the views are plain memory owned by this struct; `&mut self` methods write the RW view
// and `&self` methods only read/execute code already written. Moving the cache to another
// thread (a vCPU thread) moves that ownership.
unsafe impl Send for CodeCache {}

/// The host's time-stamp counter now (`rdtsc`). emu paces its guest TSC by it where the host
/// TSC is constant and nonstop, and translated code reads it with the same instruction, so the
/// interpreter and generated code see one counter (`hv_emu::clock`).
#[inline]
pub fn host_tsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter into registers; it has no memory
    // effects, and this crate only builds for x86-64, where the instruction always exists
    // (user-mode `rdtsc` faults only under CR4.TSD, which Linux does not set for processes
    // that have not asked for it with `prctl(PR_SET_TSC)`).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    /// The reference predates a [`CodeCache::clear`] or lies outside the used part.
    Stale,
    /// [`CodeCache::enter`] without a trampoline installed.
    NoTrampoline,
}

impl CodeCache {
    /// Creates a cache of `size` bytes (rounded up to whole pages). The memory is committed
    /// lazily by the kernel, so an unused cache costs address space only.
    pub fn new(size: usize) -> io::Result<CodeCache> {
        let size = size.max(4096).div_ceil(4096) * 4096;
        if size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cache too large",
            ));
        }
        // SAFETY: a new anonymous shared mapping at an address the kernel picks; it aliases no
        // Rust object. The result is checked.
        let rw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if rw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let unmap = |p: *mut libc::c_void| {
            // SAFETY: `p` is a mapping of `size` bytes made here and not used afterwards.
            unsafe { libc::munmap(p, size) };
        };
        // SAFETY: `rw` is a shared mapping of `size` bytes; mremap with an old size of 0 makes
        // a second mapping of the same pages at an address the kernel picks (mremap(2)),
        // aliasing no Rust object. The result is checked.
        let rx = unsafe { libc::mremap(rw, 0, size, libc::MREMAP_MAYMOVE) };
        if rx == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            unmap(rw);
            return Err(e);
        }
        // SAFETY: `rx` is the alias made just above, of `size` bytes; no code is in it yet and
        // from here on it is never writable.
        if unsafe { libc::mprotect(rx, size, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            let e = io::Error::last_os_error();
            unmap(rx);
            unmap(rw);
            return Err(e);
        }
        let (rw, rx) = (rw.cast::<u8>(), rx.cast::<u8>().cast_const());
        Ok(CodeCache {
            rw,
            rx,
            size,
            used: 0,
            generation: 0,
            trampoline: None,
            floor: 0,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.size
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Copies `code` into the cache (16-byte aligned). `None`: the cache is full.
    pub fn push(&mut self, code: &[u8]) -> Option<CodeRef> {
        let off = self.used.div_ceil(16) * 16;
        let end = off.checked_add(code.len())?;
        if end > self.size || code.is_empty() {
            return None;
        }
        // SAFETY: `off..end` lies inside the RW view (checked above); `code` is a separate Rust
        // slice, so the ranges do not overlap. Nothing executes this range yet: the RX alias of
        // bytes past `used` is never called (see `call`).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(off), code.len()) };
        self.used = end;
        Some(CodeRef {
            off: off as u32,
            len: code.len() as u32,
            generation: self.generation,
        })
    }

    /// Installs the trampoline [`CodeCache::enter`] calls: code that is an `extern "sysv64"
    /// fn(regs: *mut u64, ctx: *mut C, block: *const u8)` (saving what the ABI requires,
    /// calling `block`, returning). Only into an empty cache, once; it stays across
    /// [`CodeCache::clear`]. False if refused or it does not fit.
    pub fn install_trampoline(&mut self, code: &[u8]) -> bool {
        if self.used != 0 || self.trampoline.is_some() {
            return false;
        }
        let Some(r) = self.push(code) else {
            return false;
        };
        self.trampoline = Some(r.off);
        self.floor = self.used;
        true
    }

    /// The executable address and length of the trampoline, if installed (for profilers'
    /// symbol maps).
    pub fn trampoline(&self) -> Option<(u64, usize)> {
        self.trampoline
            .map(|off| (self.rx as u64 + u64::from(off), self.floor - off as usize))
    }

    /// Forgets every block (not the trampoline): references made before are refused from now
    /// on.
    pub fn clear(&mut self) {
        self.used = self.floor;
        self.generation = self.generation.wrapping_add(1);
    }

    /// Whether `r` still names code in this cache.
    pub fn is_valid(&self, r: CodeRef) -> bool {
        r.generation == self.generation && (r.off as usize + r.len as usize) <= self.used
    }

    /// The offset in the cache of the executable address `addr` (as generated code computes
    /// it), if it lies in the used part.
    pub fn offset_of(&self, addr: u64) -> Option<u32> {
        let off = addr.checked_sub(self.rx as u64)?;
        (off < self.used as u64).then_some(off as u32)
    }

    /// The executable address of cache offset `off` (for generated code that jumps through a
    /// table), if it lies in the used part.
    pub fn address_of(&self, off: u32) -> Option<u64> {
        ((off as usize) < self.used).then(|| self.rx as u64 + u64::from(off))
    }

    /// The cache offset a `jmp rel32` whose displacement field is at `site` goes to.
    pub fn jump_target(&self, site: u32) -> Option<u32> {
        let end = (site as usize).checked_add(4)?;
        if end > self.used {
            return None;
        }
        let mut b = [0u8; 4];
        // SAFETY: `site..end` lies inside the used part of the RW view (checked above); the
        // bytes are plain memory this cache owns and no code runs while `&self` is borrowed
        // here by the (only) owning thread.
        unsafe { std::ptr::copy_nonoverlapping(self.rw.add(site as usize), b.as_mut_ptr(), 4) };
        let rel = i64::from(i32::from_le_bytes(b));
        u32::try_from(end as i64 + rel).ok()
    }

    /// Points the `jmp rel32` whose displacement field is at `site` to cache offset `target`.
    /// False (nothing written) if either lies outside the used part. The caller guarantees
    /// that `site` is such a field of a block it emitted and `target` the start of code that
    /// expects the state that jump leaves (see the crate docs, "Chaining").
    pub fn patch_jump(&mut self, site: u32, target: u32) -> bool {
        let end = site as usize + 4;
        if end > self.used || target as usize >= self.used {
            return false;
        }
        let rel = (i64::from(target) - end as i64) as i32;
        // SAFETY: `site..end` lies inside the used part of the RW view (checked above). No
        // code of this cache runs while `&mut self` is held; the RX alias sees the new bytes
        // at the next call (x86 keeps instruction fetch coherent with stores, also through
        // another mapping of the same page).
        unsafe {
            std::ptr::copy_nonoverlapping(rel.to_le_bytes().as_ptr(), self.rw.add(site as usize), 4)
        };
        true
    }

    /// Runs the block at `r` through the trampoline, with the guest registers and the
    /// translator's context.
    pub fn enter<C>(&self, r: CodeRef, regs: &mut [u64; 16], ctx: &mut C) -> Result<(), CallError> {
        let Some(t) = self.trampoline else {
            return Err(CallError::NoTrampoline);
        };
        if !self.is_valid(r) {
            return Err(CallError::Stale);
        }
        // SAFETY: `t` is the offset of the trampoline, written by `install_trampoline` into
        // the part of the RX view that `clear` never releases; its contract (documented
        // there) is a whole `extern "sysv64" fn(*mut u64, *mut C, *const u8)` that preserves
        // what the ABI requires.
        let f: extern "sysv64" fn(*mut u64, *mut C, *const u8) =
            unsafe { std::mem::transmute(self.rx.add(t as usize)) };
        // SAFETY: `r` names bytes inside the used part of the RX view (checked above), code
        // emitted under the current generation that expects the trampoline's register setup
        // and leaves through `ret` to it. The pointers come from exclusive references that
        // outlive the call, and what the block may touch is what `call` describes below.
        let block = unsafe { self.rx.add(r.off as usize) };
        f(regs.as_mut_ptr(), ctx, block);
        Ok(())
    }

    /// Runs the block at `r` with the guest registers and the translator's context.
    pub fn call<C>(&self, r: CodeRef, regs: &mut [u64; 16], ctx: &mut C) -> Result<(), CallError> {
        if !self.is_valid(r) {
            return Err(CallError::Stale);
        }
        // SAFETY: `r` names bytes inside the used part of the RX view (checked above), written
        // by `push` from a complete block the translator emitted under the current generation.
        // The block is a whole `extern "sysv64" fn(*mut u64, *mut C)` (prologue saving the
        // callee-saved registers it uses, epilogue restoring them, `ret`).
        let f: extern "sysv64" fn(*mut u64, *mut C) =
            unsafe { std::mem::transmute(self.rx.add(r.off as usize)) };
        // SAFETY: both pointers come from exclusive references that outlive the call. The
        // block reads and writes only `regs`, `ctx` (at the offsets of the layout it was
        // emitted for), guest RAM through the host addresses `ctx`'s soft TLB holds (filled by
        // the translator only for RAM of the `GuestMemory` the vCPU owns, which outlives it),
        // the vCPU's vector registers and MXCSR through the addresses the translator puts in
        // `ctx` right before each call (fields of the same `Cpu` as `regs`, which the caller
        // holds exclusively and does not touch during the call),
        // and its own stack frame; it only reads two kinds of shared words whose addresses
        // the translator put in `ctx` or the code (the vCPU's exit-request word and the code
        // tracker's page generations, atomics of the VM's shared state, which outlives the
        // vCPU); it jumps only to other blocks of this cache (links and jump-cache entries
        // the owner keeps valid, see "Chaining"); it leaves DF clear and restores what the
        // ABI requires.
        f(regs.as_mut_ptr(), ctx);
        Ok(())
    }
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: both views were mapped in `new` with `size` bytes and are unmapped once; no
        // reference into them outlives `self` (CodeRef is only an offset).
        unsafe {
            libc::munmap(self.rw.cast(), self.size);
            libc::munmap(self.rx.cast_mut().cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_code_and_refuses_stale_references() {
        let mut c = CodeCache::new(1 << 16).unwrap();
        // mov rax, [rdi]; add rax, [rsi]; mov [rdi+8], rax; ret
        let code = [
            0x48, 0x8b, 0x07, 0x48, 0x03, 0x06, 0x48, 0x89, 0x47, 0x08, 0xc3,
        ];
        let r = c.push(&code).unwrap();
        let mut regs = [0u64; 16];
        regs[0] = 40;
        let mut ctx = 2u64;
        c.call(r, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[1], 42);
        c.clear();
        assert_eq!(c.call(r, &mut regs, &mut ctx), Err(CallError::Stale));
        assert!(!c.is_valid(CodeRef::NONE));
        assert_eq!(
            c.call(CodeRef::NONE, &mut regs, &mut ctx),
            Err(CallError::Stale)
        );
    }

    #[test]
    fn patched_jumps_go_to_the_new_target() {
        let mut c = CodeCache::new(1 << 16).unwrap();
        // mov qword [rdi], 1; ret
        let one = c.push(&[0x48, 0xc7, 0x07, 1, 0, 0, 0, 0xc3]).unwrap();
        // mov qword [rdi], 2; ret
        let two = c.push(&[0x48, 0xc7, 0x07, 2, 0, 0, 0, 0xc3]).unwrap();
        // jmp rel32 (to the next byte until patched); ret
        let j = c.push(&[0xe9, 0, 0, 0, 0, 0xc3]).unwrap();
        let site = j.offset() + 1;
        let mut regs = [0u64; 16];
        let mut ctx = 0u64;
        c.call(j, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[0], 0);
        assert_eq!(c.jump_target(site), Some(site + 4));
        assert!(c.patch_jump(site, one.offset()));
        assert_eq!(c.jump_target(site), Some(one.offset()));
        c.call(j, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[0], 1);
        assert!(c.patch_jump(site, two.offset()));
        c.call(j, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[0], 2);
        assert!(!c.patch_jump(site + 100, two.offset()));
        assert_eq!(
            c.offset_of(c.address_of(two.offset()).unwrap()),
            Some(two.offset())
        );
        assert_eq!(c.offset_of(0), None);
    }

    #[test]
    fn trampoline_enters_blocks_and_survives_clear() {
        let mut c = CodeCache::new(1 << 16).unwrap();
        // No trampoline yet.
        let early = c.push(&[0xc3]).unwrap();
        let mut regs = [0u64; 16];
        let mut ctx = 5u64;
        assert_eq!(
            c.enter(early, &mut regs, &mut ctx),
            Err(CallError::NoTrampoline)
        );
        assert!(!c.install_trampoline(&[0xc3]), "only into an empty cache");
        c.clear();
        // push rbx; mov rbx, rdi; mov rax, [rsi]; call rdx; mov [rbx+8], rax; pop rbx; ret
        let tramp = [
            0x53, 0x48, 0x89, 0xfb, 0x48, 0x8b, 0x06, 0xff, 0xd2, 0x48, 0x89, 0x43, 0x08, 0x5b,
            0xc3,
        ];
        assert!(c.install_trampoline(&tramp));
        assert!(!c.install_trampoline(&tramp), "once");
        let (addr, len) = c.trampoline().unwrap();
        assert_eq!((c.offset_of(addr), len), (Some(0), tramp.len()));
        // mov qword [rbx], 7; add rax, 1; ret (the block sees the trampoline's registers)
        let block = [0x48, 0xc7, 0x03, 7, 0, 0, 0, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let r = c.push(&block).unwrap();
        assert!(r.offset() as usize >= tramp.len());
        c.enter(r, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[..2], [7, 6]);
        // Entering after the first instruction skips it.
        regs = [0; 16];
        c.enter(r.advanced(7).unwrap(), &mut regs, &mut ctx)
            .unwrap();
        assert_eq!(regs[..2], [0, 6]);
        assert!(r.advanced(block.len() as u32).is_none());
        c.clear();
        assert_eq!(c.enter(r, &mut regs, &mut ctx), Err(CallError::Stale));
        assert_eq!(c.used(), c.trampoline().unwrap().1);
        // mov qword [rbx], 9; ret
        let r = c.push(&[0x48, 0xc7, 0x03, 9, 0, 0, 0, 0xc3]).unwrap();
        c.enter(r, &mut regs, &mut ctx).unwrap();
        assert_eq!(regs[..2], [9, 5]);
    }

    #[test]
    fn the_executable_view_is_anonymous_read_execute_memory() {
        // perf reads /tmp/perf-<pid>.map only for anonymous executable mappings ("//anon",
        // "/dev/zero..."), not for file-backed ones such as a memfd.
        let mut c = CodeCache::new(1 << 16).unwrap();
        assert!(c.install_trampoline(&[0xc3]));
        let (addr, _) = c.trampoline().unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                let (a, b) = l.split_once(' ').unwrap().0.split_once('-').unwrap();
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                );
                (a..b).contains(&addr)
            })
            .unwrap();
        let f: Vec<_> = line.split_whitespace().collect();
        assert_eq!(f[1], "r-xs", "{line}");
        assert!(
            f.get(5).is_none_or(|p| p.starts_with("/dev/zero")),
            "{line}"
        );
        let rw = c.rw as u64;
        let rw_line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{rw:x}-")))
            .unwrap();
        assert!(rw_line.contains(" rw-s "), "{rw_line}");
    }

    #[test]
    fn is_bounded() {
        let mut c = CodeCache::new(4096).unwrap();
        assert!(c.push(&[0xc3; 4000]).is_some());
        assert!(c.push(&[0xc3; 200]).is_none());
        c.clear();
        assert!(c.push(&[0xc3; 200]).is_some());
    }
}
