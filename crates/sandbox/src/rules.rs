//! The allowlist of each [`ThreadRole`]: one line per system call, saying why the role needs it.
//! Anything not listed is killed ([`crate::SeccompMode::On`]) or logged ([`crate::SeccompMode::Log`]).
//!
//! The lists were written from what the code does and checked by tracing the VMM booting the
//! test guest on both backends (`strace -f`, see `docs/threat-model.md`).

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::ThreadRole;
use crate::ioctl;

/// A syscall allowed unconditionally (`None`) or when one of the rules matches.
struct Allow(BTreeMap<i64, Option<Vec<SeccompRule>>>);

type Result<T> = std::result::Result<T, BackendError>;

impl Allow {
    fn new() -> Self {
        Allow(BTreeMap::new())
    }

    fn any(&mut self, nr: i64) {
        self.0.insert(nr, None);
    }

    /// Allows `nr` when `rule` matches, in addition to the rules already there; an
    /// unconditional allow stays unconditional.
    fn when(&mut self, nr: i64, rule: SeccompRule) {
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
    }

    /// `ioctl` with one of `requests` as its request number.
    fn ioctls(&mut self, requests: &[u64]) -> Result<()> {
        for &req in requests {
            // The kernel takes the request as an `unsigned int`: compare the low 32 bits.
            self.when(libc::SYS_ioctl, rule(1, SeccompCmpOp::Eq, req)?);
        }
        Ok(())
    }

    fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect()
    }
}

/// One condition on a 32-bit argument.
fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?])
}

/// `arg & mask == 0`.
fn without_bits(arg: u8, mask: u64) -> Result<SeccompRule> {
    rule(arg, SeccompCmpOp::MaskedEq(mask), 0)
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// What every thread does: memory allocation, locks, sleeping, thread exit, writing to
/// descriptors it already has, kicks. Reading is not here: vCPU threads read nothing.
fn base(a: &mut Allow) -> Result<()> {
    a.any(libc::SYS_write); // messages on stderr, serial output, signalling eventfds
    a.any(libc::SYS_close); // dropping descriptors (fds of a finished request, a closed disk)
    a.any(libc::SYS_futex); // Mutex, Condvar, thread park/unpark and join
    a.any(libc::SYS_clock_gettime); // Instant/SystemTime when the vDSO falls back to the kernel
    a.any(libc::SYS_clock_nanosleep); // thread::sleep (paced migration, timer waits)
    a.any(libc::SYS_nanosleep); // thread::sleep on older libcs
    a.any(libc::SYS_sched_yield); // spin-then-yield loops (pause handshake)
    a.any(libc::SYS_restart_syscall); // resuming a sleep interrupted by the kick signal
    a.when(libc::SYS_mmap, without_bits(2, PROT_EXEC)?); // allocator; never executable memory
    a.when(libc::SYS_mprotect, without_bits(2, PROT_EXEC)?); // allocator arenas; never executable
    a.any(libc::SYS_munmap); // allocator, thread stack teardown
    a.any(libc::SYS_mremap); // realloc of large blocks
    a.any(libc::SYS_madvise); // allocator returning memory, glibc freeing an exited thread's stack
    a.any(libc::SYS_brk); // allocator main arena
    a.any(libc::SYS_rt_sigreturn); // returning from the vCPU kick signal's handler
    a.any(libc::SYS_rt_sigprocmask); // glibc masks signals around thread exit and pthread_kill
    a.any(libc::SYS_sigaltstack); // Rust's thread exit disables its stack-overflow signal stack
    a.any(libc::SYS_exit); // thread exit
    a.any(libc::SYS_exit_group); // process exit
    a.any(libc::SYS_getrandom); // HashMap seeds, virtio-rng, migration nonces
    a.any(libc::SYS_gettid); // glibc pthread_kill/raise
    a.any(libc::SYS_getpid); // glibc pthread_kill passes its pid to tgkill
    a.any(libc::SYS_tgkill); // kicking a vCPU thread out of KVM_RUN (pthread_kill), abort()
    a.when(
        libc::SYS_fcntl,
        rule(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)?,
    ); // std's closing of an fd checks it first in debug builds
    a.ioctls(ioctl::TERMINAL)?; // the panic hook's cleanup restores the terminal's mode
    Ok(())
}

/// Guest disk I/O (virtio-blk requests, on the device's worker) and writing and flushing files.
fn disk_io(a: &mut Allow) {
    a.any(libc::SYS_pread64); // disk image reads
    a.any(libc::SYS_pwrite64); // disk image writes
    a.any(libc::SYS_preadv); // scatter-gather disk reads
    a.any(libc::SYS_pwritev); // scatter-gather disk writes
    a.any(libc::SYS_preadv2); // glibc's preadv may use preadv2
    a.any(libc::SYS_pwritev2); // glibc's pwritev may use pwritev2
    a.any(libc::SYS_lseek); // Seek on a disk image or snapshot file
    a.any(libc::SYS_fsync); // virtio-blk FLUSH
    a.any(libc::SYS_fdatasync); // virtio-blk FLUSH on raw images
    a.any(libc::SYS_fallocate); // virtio-blk DISCARD / WRITE_ZEROES punch holes
}

/// Spawning threads (never processes): `clone` only with `CLONE_THREAD`, plus what glibc and
/// Rust do in a new thread before its closure runs.
fn threads(a: &mut Allow) -> Result<()> {
    a.when(
        libc::SYS_clone,
        rule(0, SeccompCmpOp::MaskedEq(CLONE_THREAD), CLONE_THREAD)?,
    ); // threads only: no fork, no vfork
    a.any(libc::SYS_clone3); // glibc tries it first; the first filter answers ENOSYS
    a.any(libc::SYS_set_robust_list); // glibc, in every new thread
    a.any(libc::SYS_rseq); // glibc registers restartable sequences in every new thread
    a.when(
        libc::SYS_prctl,
        rule(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?,
    ); // naming the new thread
    a.any(libc::SYS_sched_getaffinity); // glibc thread creation reads the inherited CPU mask
    Ok(())
}

/// A spawned thread installing its own, narrower filter (seccompiler sets no_new_privs, then
/// adds the filter): filters only ever add up, so this cannot widen what the thread may do.
fn own_filter(a: &mut Allow) -> Result<()> {
    a.when(
        libc::SYS_prctl,
        rule(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)?,
    ); // required before adding a filter (already set: inherited)
    a.when(
        libc::SYS_seccomp,
        rule(
            0,
            SeccompCmpOp::Eq,
            u64::from(libc::SECCOMP_SET_MODE_FILTER),
        )?,
    ); // adding a filter, never removing one (the kernel has no way to)
    Ok(())
}

/// Talking over a socket that already exists, and connecting new ones.
fn sockets(a: &mut Allow) -> Result<()> {
    a.any(libc::SYS_recvfrom); // socket reads
    a.any(libc::SYS_sendto); // socket writes (Rust sends with MSG_NOSIGNAL)
    a.any(libc::SYS_recvmsg); // socket reads
    a.any(libc::SYS_sendmsg); // socket writes
    a.any(libc::SYS_shutdown); // ending a connection
    a.any(libc::SYS_setsockopt); // read/write timeouts, TCP_NODELAY
    a.any(libc::SYS_getsockopt); // SO_ERROR after a connect
    a.any(libc::SYS_getsockname); // logging the local address
    a.any(libc::SYS_getpeername); // logging the peer
    a.any(libc::SYS_poll); // waiting with a timeout
    a.any(libc::SYS_ppoll); // waiting with a timeout
    a.any(libc::SYS_fcntl); // non-blocking mode, close-on-exec
    for domain in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        a.when(libc::SYS_socket, rule(0, SeccompCmpOp::Eq, domain as u64)?); // unix and tcp only
    }
    a.any(libc::SYS_connect); // migration destination, waking the API accept loop
    // set_nonblocking: TcpStream::connect_timeout (tcp migration), vsock host connections.
    a.ioctls(&[libc::FIONBIO])?;
    Ok(())
}

/// The allowlist of `role`, as seccompiler rules.
pub fn for_role(role: ThreadRole) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut a = Allow::new();
    base(&mut a)?;
    match role {
        ThreadRole::Vcpu => {
            // No read, no files, no sockets, no threads, no epoll: device work is the workers'
            // (a register write only records state and signals an eventfd, with `write`).
            a.ioctls(ioctl::VCPU_RUN)?; // KVM_RUN
            a.ioctls(ioctl::VCPU_STATE)?; // register access on exits, state after a pause
            a.ioctls(ioctl::INTERRUPTS)?; // devices raising guest interrupts
            a.ioctls(ioctl::IRQ_ROUTING)?; // IOAPIC entry writes move a pin's irqfd route
            // The kvm backend's user-mode accelerator re-adds a memory slot on each run and reads
            // its dirty log (seen under strace on every exit).
            a.ioctls(ioctl::VM_STATE)?;
        }
        ThreadRole::Device => {
            a.any(libc::SYS_read); // console input, the tap, /dev/urandom, eventfd counts
            disk_io(&mut a);
            sockets(&mut a)?; // a virtio worker's vsock requests: host connections and their I/O
            a.any(libc::SYS_accept4); // a vsock worker: host clients on the listening socket
            a.any(libc::SYS_poll); // waiting on input
            a.any(libc::SYS_ppoll); // waiting on input
            a.any(libc::SYS_epoll_wait); // device event loops
            a.any(libc::SYS_epoll_pwait); // device event loops
            a.any(libc::SYS_epoll_ctl); // device event loops
            a.ioctls(ioctl::INTERRUPTS)?; // raising the device's guest interrupt
        }
        ThreadRole::Api => {
            a.any(libc::SYS_read); // requests, files
            threads(&mut a)?; // the outgoing migration thread
            own_filter(&mut a)?; // which installs the Migration filter on top of this one
            sockets(&mut a)?; // (the migration thread's connect and stream are this filter's too)
            disk_io(&mut a); // writing snapshot files, flushing disks
            a.any(libc::SYS_accept4); // control-socket connections
            a.any(libc::SYS_openat); // creating snapshot files and their directory handle
            a.any(libc::SYS_fstat); // snapshot writer: file size
            a.any(libc::SYS_newfstatat); // std::fs::metadata
            a.any(libc::SYS_statx); // std::fs::metadata
            a.any(libc::SYS_ftruncate); // snapshot writer: sparse file length
            a.any(libc::SYS_rename); // snapshot writer: atomic replace
            a.any(libc::SYS_renameat); // snapshot writer: atomic replace
            a.any(libc::SYS_renameat2); // snapshot writer: atomic replace
            a.any(libc::SYS_unlink); // snapshot writer: removing a failed temporary file
            a.any(libc::SYS_unlinkat); // snapshot writer: removing a failed temporary file
            a.any(libc::SYS_link); // snapshot writer: committing without replacing a file
            a.any(libc::SYS_linkat); // snapshot writer: committing without replacing a file
            a.any(libc::SYS_getdents64); // snapshot writer: finding dead writers' temporaries
            a.ioctls(ioctl::VCPU_STATE)?; // vCPU state of a paused VM
            a.ioctls(ioctl::VM_STATE)?; // dirty log and clock for snapshots
            a.ioctls(ioctl::INTERRUPTS)?; // a resumed device may raise an interrupt
        }
        ThreadRole::Migration => {
            a.any(libc::SYS_read); // the stream's acknowledgements
            sockets(&mut a)?; // connecting to the destination, the migration stream
            threads(&mut a)?; // the throttle thread (pauses the VM for a share of each 100 ms)
            a.any(libc::SYS_fsync); // flushing disks before the hand-off
            a.any(libc::SYS_fdatasync); // flushing disks before the hand-off
            a.ioctls(ioctl::VCPU_STATE)?; // vCPU state of the paused VM
            a.ioctls(ioctl::VM_STATE)?; // dirty log (and its slot flags), clock
            a.ioctls(ioctl::INTERRUPTS)?; // a resumed device may raise an interrupt
        }
        ThreadRole::IncomingMigration => {
            a.any(libc::SYS_read); // the stream
            a.any(libc::SYS_accept4); // the source's connection on the bound listener
            a.any(libc::SYS_setsockopt); // TCP_NODELAY, read and write timeouts
            a.any(libc::SYS_recvfrom); // the stream (reads)
            a.any(libc::SYS_sendto); // the handshake, acknowledgements, the confirmation
            a.any(libc::SYS_recvmsg); // the stream (reads)
            a.any(libc::SYS_sendmsg); // the stream (writes)
            a.any(libc::SYS_shutdown); // ending the connection
            a.any(libc::SYS_poll); // waiting with a timeout
            a.any(libc::SYS_ppoll); // waiting with a timeout
        }
        ThreadRole::Main => {
            a.any(libc::SYS_read); // the signal pipe, files read at exit
            a.when(
                libc::SYS_socket,
                rule(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
            ); // waking the API accept loop
            a.any(libc::SYS_connect); // waking the API accept loop at shutdown
            // Cutting the API connections still being read when the server stops
            // (`ApiServer`'s drop: a client such as `shutdown --force` may still be connected).
            a.any(libc::SYS_shutdown);
            a.any(libc::SYS_unlink); // removing the API socket file at exit
            a.any(libc::SYS_unlinkat); // removing the API socket file at exit
            a.any(libc::SYS_statx); // ... only if it is still ours (device and inode)
            a.any(libc::SYS_newfstatat); // ... (the same, where std uses fstatat)
            a.ioctls(ioctl::VM_STATE)?; // dropping the kvm VM removes its memory slots
            // Dropping a vsock device at exit (or after a restore replaced its state)
            // deregisters its sockets from its event thread's epoll set.
            a.any(libc::SYS_epoll_ctl);
        }
    }
    Ok(a.into_map())
}
