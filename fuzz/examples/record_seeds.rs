//! Records the seeds of `platform_io`, `virtio_net`, `virtio_vsock` and `virtio_rng` from real
//! runs: two boots of the test kit's Linux (`guest/build-kit.sh` → `guest/out/`) on the emu
//! backend, with every device wrapped in a recorder that writes what happens as fuzz input.
//!
//! * Boot 1 (net, rng): the guest's shell is typed at over the serial port: it brings `eth0`
//!   up, pings 10.0.0.1 (a responder on the host end of the frame socket answers ARP and ICMP
//!   echo), reads `/dev/hwrng` and powers off.
//! * Boot 2 (vsock, `anyvisor.test=vsock` of guest/src/init.sh): the host connects to guest
//!   port 5000 with `CONNECT 5000` and gets its bytes echoed; the guest connects to host port
//!   6000 and sends 1 MiB, echoed back by a service on `<uds>_6000`.
//!
//! Recorded: port and MMIO accesses of the vCPU (outside the virtio slots), serial input and
//! interrupt edges, as `machine::fuzz` operations; for each device, the chains it took off each
//! queue (read from guest memory after each `process_queue`, in groups of at most
//! `virtio::fuzz::Q_SIZE`), frames from the tap, and the host's socket operations, as
//! `virtio::fuzz::op` operations. Each seed is cut below 90 KiB.
//!
//! Run: `cd fuzz && cargo run --release --example record_seeds` (about a minute per boot).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hv::{DeviceIo, GuestMemory, Hypervisor, VcpuExit};
use machine::fuzz::IoWriter;
use machine::{IrqLine, Platform, PlatformEvent, PlatformEvents};
use virtio::fuzz::{OpWriter, Q_SIZE, SegSpec};
use virtio::{DeviceError, DeviceState, Interrupt, MmioHandler, MmioTransport, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Seeds stop growing here.
const LIMIT: usize = 90 << 10;
/// Console output accesses kept in the platform seed (the rest are the same two accesses).
const CONSOLE_KEPT: usize = 400;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The platform recording: accesses in order, console output thinned out.
struct PlatformLog {
    w: IoWriter,
    console: usize,
}

impl PlatformLog {
    fn room(&self) -> bool {
        self.w.0.len() < LIMIT
    }
}

/// A device-side recording: whole, with where each operation ends, cut at the end.
#[derive(Default)]
struct Rec {
    w: OpWriter,
    ends: Vec<usize>,
}

impl Rec {
    fn new() -> Rec {
        Rec {
            w: OpWriter::new(0),
            ends: Vec::new(),
        }
    }
    /// Records operations written by `f`.
    fn with(&mut self, f: impl FnOnce(&mut OpWriter)) {
        f(&mut self.w);
        self.ends.push(self.w.0.len());
    }
    /// The recording up to the last operation that ends within [`LIMIT`].
    fn seed(&self) -> Vec<u8> {
        let end = self.ends.iter().rev().find(|&&e| e <= LIMIT).copied();
        self.w.0[..end.unwrap_or(1)].to_vec()
    }
}

type DevLog = Arc<Mutex<Rec>>;

/// The vCPU's view of the platform, recording.
struct RecIo {
    platform: Arc<Platform>,
    log: Arc<Mutex<PlatformLog>>,
}

fn in_virtio(addr: u64) -> bool {
    (machine::layout::VIRTIO_MMIO_BASE
        ..machine::layout::VIRTIO_MMIO_BASE + 16 * machine::layout::VIRTIO_MMIO_SIZE)
        .contains(&addr)
}

impl RecIo {
    /// Console traffic (THR writes and LSR polls) past the first [`CONSOLE_KEPT`] is skipped.
    fn keep_console(&self, port: u16) -> bool {
        if port != 0x3f8 && port != 0x3fd {
            return true;
        }
        let mut l = lock(&self.log);
        l.console += 1;
        l.console <= CONSOLE_KEPT
    }
}

impl DeviceIo for RecIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.platform.pio_read(port, data);
        if self.keep_console(port) {
            let mut l = lock(&self.log);
            if l.room() {
                l.w.pio_read(port, data.len());
            }
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if self.keep_console(port) || port == machine::layout::ACPI_SLEEP_CONTROL_PORT {
            let mut l = lock(&self.log);
            if l.room() || port == machine::layout::ACPI_SLEEP_CONTROL_PORT {
                l.w.pio_write(port, data);
            }
        }
        self.platform.pio_write(port, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.platform.mmio_read(addr, data);
        if !in_virtio(addr) {
            let mut l = lock(&self.log);
            if l.room() {
                l.w.mmio_read(addr, data.len());
            }
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !in_virtio(addr) {
            let mut l = lock(&self.log);
            if l.room() {
                l.w.mmio_write(addr, data);
            }
        }
        self.platform.mmio_write(addr, data);
    }
}

/// Serial output: kept for the markers the host side waits for, and in a log file.
#[derive(Clone)]
struct Console {
    text: Arc<Mutex<String>>,
    file: Arc<Mutex<std::fs::File>>,
}

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        lock(&self.text).push_str(&String::from_utf8_lossy(b));
        lock(&self.file).write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn wait_for(&self, marker: &str, stop: &AtomicBool, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit && !stop.load(Ordering::SeqCst) {
            if lock(&self.text).contains(marker) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// Power-off and reset requests stop the run.
struct Events {
    stop: Arc<AtomicBool>,
    kicker: Mutex<Option<Arc<dyn hv::VcpuKicker>>>,
}

impl PlatformEvents for Events {
    fn request(&self, _ev: PlatformEvent) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = lock(&self.kicker).as_ref() {
            k.kick();
        }
    }
}

/// A device's interrupt line, recorded as an `IRQ` operation of the platform seed.
struct Irq {
    line: IrqLine,
    log: Arc<Mutex<PlatformLog>>,
}

impl Interrupt for Irq {
    fn trigger(&self) {
        {
            let mut l = lock(&self.log);
            if l.room() {
                l.w.irq(self.line.pin() as u8);
            }
        }
        self.line.trigger();
    }
}

/// The buffers of the chain at `head`: through an indirect table (one level) or linked.
fn walk(mem: &GuestMemory, q: &Queue, head: u16) -> Option<(Vec<SegSpec>, bool)> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let read_desc = |table: u64, i: u16| -> Option<(u64, u32, u16, u16)> {
        let mut d = [0u8; 16];
        mem.read_slice(&mut d, GuestAddress(table + 16 * u64::from(i)))
            .ok()?;
        Some((
            u64::from_le_bytes(d[..8].try_into().ok()?),
            u32::from_le_bytes(d[8..12].try_into().ok()?),
            u16::from_le_bytes(d[12..14].try_into().ok()?),
            u16::from_le_bytes(d[14..].try_into().ok()?),
        ))
    };
    let (mut table, mut limit) = (q.desc_table(), q.size());
    let mut i = head;
    let mut indirect = false;
    let first = read_desc(table, i)?;
    if first.2 & INDIRECT != 0 {
        table = first.0;
        limit = (first.1 / 16) as u16;
        i = 0;
        indirect = true;
    }
    let mut segs = Vec::new();
    for _ in 0..limit {
        let (addr, len, flags, next) = read_desc(table, i)?;
        let write = flags & WRITE != 0;
        let data = if write {
            None
        } else {
            let mut d = vec![0u8; len.min(0x1_0000) as usize];
            mem.read_slice(&mut d, GuestAddress(addr)).ok()?;
            Some(d)
        };
        segs.push(SegSpec { write, len, data });
        if flags & NEXT == 0 {
            return Some((segs, indirect));
        }
        i = next;
    }
    None
}

/// A device whose queue processing is recorded: the chains it took, then the notification.
struct RecDevice {
    inner: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    log: DevLog,
    /// vsock: the host events the worker handled come first (`POLL`).
    poll_first: bool,
}

impl VirtioDevice for RecDevice {
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError> {
        self.inner.activate(acked_features)
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let before = queue.next_avail();
        let r = self.inner.process_queue(index, queue, mem);
        let after = queue.next_avail();
        let mut log = lock(&self.log);
        if log.w.0.len() > LIMIT {
            return r;
        }
        if self.poll_first {
            log.with(|w| w.poll());
        }
        let mut i = before;
        let mut group = 0;
        while i != after {
            let slot = queue.avail_ring() + 4 + 2 * u64::from(i % queue.size());
            if let Ok(head) = self.mem.read_obj::<u16>(GuestAddress(slot))
                && let Some((segs, indirect)) = walk(&self.mem, queue, head)
            {
                log.with(|w| w.add_chain(index as u8, &segs, indirect, false));
                group += 1;
                if group == Q_SIZE {
                    log.with(|w| w.notify(index as u8));
                    group = 0;
                }
            }
            i = i.wrapping_add(1);
        }
        log.with(|w| w.notify(index as u8));
        r
    }
    fn reset(&mut self) {
        lock(&self.log).with(|w| w.reset());
        self.inner.reset()
    }
    fn counters(&self) -> virtio::Counters {
        self.inner.counters()
    }
    fn save(&self) -> DeviceState {
        self.inner.save()
    }
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        self.inner.restore(state)
    }
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.host_fd()
    }
    fn host_event(&mut self) {
        self.inner.host_event()
    }
    fn take_kicks(&mut self) -> u64 {
        self.inner.take_kicks()
    }
}

/// The device end of the frame socket; frames the device reads are recorded.
struct RecTap {
    sock: UnixDatagram,
    log: DevLog,
}

impl virtio::net::TapIo for RecTap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.recv(buf)?;
        lock(&self.log).with(|w| w.net_rx_frame(&buf[..n]));
        Ok(n)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }
    fn poll_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The host at 10.0.0.1: answers ARP requests for it and ICMP echo requests to it.
fn responder(sock: UnixDatagram, stop: Arc<AtomicBool>) {
    const HOST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    const HOST_IP: [u8; 4] = [10, 0, 0, 1];
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        let f = &buf[..n];
        if n < 42 {
            continue;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let mut reply = f.to_vec();
        reply[0..6].copy_from_slice(&f[6..12]);
        reply[6..12].copy_from_slice(&HOST_MAC);
        if ethertype == 0x0806 && f[20..22] == [0, 1] && f[38..42] == HOST_IP {
            reply[20..22].copy_from_slice(&[0, 2]);
            reply[22..28].copy_from_slice(&HOST_MAC);
            reply[28..32].copy_from_slice(&HOST_IP);
            reply[32..42].copy_from_slice(&f[22..32]);
        } else if ethertype == 0x0800 && f[23] == 1 && f[30..34] == HOST_IP && f[34] == 8 {
            let ihl = usize::from(f[14] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]])).min(n - 14);
            reply[26..30].copy_from_slice(&f[30..34]);
            reply[30..34].copy_from_slice(&f[26..30]);
            let icmp = 14 + ihl;
            reply[icmp] = 0;
            reply[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
            let c = checksum(&reply[icmp..14 + total]);
            reply[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
        } else {
            continue;
        }
        let _ = sock.send(&reply);
    }
}

struct Vm {
    platform: Arc<Platform>,
    memory: Arc<GuestMemory>,
    plog: Arc<Mutex<PlatformLog>>,
    console: Console,
    stop: Arc<AtomicBool>,
    events: Arc<Events>,
    slots: Vec<machine::VirtioSlot>,
    transports: Vec<MmioTransport>,
    /// One per transport: does the device's work, as in the VMM.
    workers: Vec<virtio::Worker>,
}

impl Vm {
    fn new(name: &str) -> Res<Vm> {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Events {
            stop: stop.clone(),
            kicker: Mutex::new(None),
        });
        let console = Console {
            text: Arc::default(),
            file: Arc::new(Mutex::new(std::fs::File::create(
                std::env::temp_dir().join(format!("anyvisor-record-{name}.log")),
            )?)),
        };
        let platform = Arc::new(Platform::new(Box::new(console.clone()), events.clone()));
        let memory = Arc::new(machine::create_guest_memory(256 << 20)?);
        Ok(Vm {
            platform,
            memory,
            plog: Arc::new(Mutex::new(PlatformLog {
                w: IoWriter::new(0),
                console: 0,
            })),
            console,
            stop,
            events,
            slots: Vec::new(),
            transports: Vec::new(),
            workers: Vec::new(),
        })
    }

    fn add(&mut self, dev: Box<dyn VirtioDevice>, log: DevLog, poll_first: bool) -> Res<()> {
        let slot = machine::VirtioSlot::for_index(self.slots.len() as u32).ok_or("slots")?;
        let rec = RecDevice {
            inner: dev,
            mem: self.memory.clone(),
            log,
            poll_first,
        };
        let irq = Arc::new(Irq {
            line: self.platform.irq_line(slot.irq),
            log: self.plog.clone(),
        });
        let t = MmioTransport::new(Box::new(rec), self.memory.clone(), irq)?;
        self.workers.push(virtio::Worker::spawn(
            &t,
            format!("virtio{}", self.slots.len()),
            || Ok(()),
        )?);
        self.platform.register_mmio(
            slot.base,
            machine::layout::VIRTIO_MMIO_SIZE,
            Arc::new(t.clone()),
        )?;
        self.slots.push(slot);
        self.transports.push(t);
        Ok(())
    }

    /// Boots the kit with `cmdline` on one emu vCPU until power-off (or 5 minutes), while
    /// `host` plays the host side. Returns the platform recording.
    fn run(self, kit: &Path, cmdline: &str, host: impl FnOnce(&Vm) + Send) -> Res<IoWriter> {
        let vm = hv_emu::EmuHypervisor::new().create_vm(hv::VmConfig {
            memory: self.memory.clone(),
            cpu_model: hv::CpuModel::portable(),
            vcpus: 1,
            tsc_khz: None,
        })?;
        self.platform.attach_vm(vm.clone());
        let kernel = kit.join("vmlinux");
        let initrd = kit.join("initramfs.cpio.gz");
        let states = machine::load_linux(
            &self.memory,
            &machine::BootConfig {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline,
                cpus: 1,
                virtio: &self.slots,
            },
        )?;
        let mut vcpu = vm.create_vcpu(0)?;
        vcpu.set_state(states.first().ok_or("no vCPU state")?)?;
        let kicker = vcpu.kicker();
        *lock(&self.events.kicker) = Some(kicker.clone());
        let io = RecIo {
            platform: self.platform.clone(),
            log: self.plog.clone(),
        };
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| host(&self));
            // Watchdog.
            s.spawn(|| {
                while !self.stop.load(Ordering::SeqCst) {
                    if start.elapsed() > Duration::from_secs(300) {
                        eprintln!("record_seeds: timeout");
                        self.stop.store(true, Ordering::SeqCst);
                        kicker.kick();
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            while !self.stop.load(Ordering::SeqCst) {
                match vcpu.run(&io) {
                    Ok(VcpuExit::Interrupted) => {}
                    Ok(other) => {
                        eprintln!("record_seeds: vCPU exit {other:?}");
                        self.stop.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("record_seeds: vCPU failed: {e}");
                        self.stop.store(true, Ordering::SeqCst);
                    }
                }
            }
        });
        println!("boot finished in {:.0?}", start.elapsed());
        // Reset the devices, then stop their workers.
        for t in &self.transports {
            t.write(0x70, &0u32.to_le_bytes());
        }
        drop(self.workers);
        let w = std::mem::take(&mut lock(&self.plog).w);
        Ok(w)
    }
}

fn put(target: &str, name: &str, bytes: &[u8]) -> Res<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    assert!(
        bytes.len() < 100 << 10,
        "{target}/{name}: {} bytes",
        bytes.len()
    );
    std::fs::write(dir.join(name), bytes)?;
    println!("{target}/{name}: {} bytes", bytes.len());
    Ok(())
}

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";

/// Boot 1: net and rng, driven from the shell.
fn net_rng_boot(kit: &Path) -> Res<()> {
    let mut vm = Vm::new("net")?;
    let net_log: DevLog = Arc::new(Mutex::new(Rec::new()));
    let rng_log: DevLog = Arc::new(Mutex::new(Rec::new()));
    let (dev_end, host_end) = UnixDatagram::pair()?;
    dev_end.set_nonblocking(true)?;
    let tap = RecTap {
        sock: dev_end,
        log: net_log.clone(),
    };
    let net = virtio::Net::with_backend(Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]), Arc::new(tap));
    vm.add(Box::new(net), net_log.clone(), false)?;
    vm.add(Box::new(virtio::Rng::new()?), rng_log.clone(), false)?;
    let stop = vm.stop.clone();
    let resp = std::thread::spawn(move || responder(host_end, stop));
    let platform = vm.run(kit, CMDLINE, |vm| {
        if !vm
            .console
            .wait_for("ANYVISOR-INIT-OK", &vm.stop, Duration::from_secs(240))
        {
            return;
        }
        std::thread::sleep(Duration::from_secs(2));
        let line = b"ip link set eth0 up; ip addr add 10.0.0.2/24 dev eth0; \
ping -c 3 -W 5 10.0.0.1; dd if=/dev/hwrng of=/dev/null bs=512 count=4; poweroff -f\n";
        for chunk in line.chunks(8) {
            vm.platform.serial_input(chunk);
            let mut l = lock(&vm.plog);
            if l.room() {
                l.w.serial_input(chunk);
            }
            drop(l);
            std::thread::sleep(Duration::from_millis(20));
        }
    })?;
    let _ = resp.join();
    put("platform_io", "linux-net-rng-boot", &platform.0)?;
    println!("  replayed: {:?}", machine::fuzz::platform_io(&platform.0));
    let net = lock(&net_log).seed();
    put("virtio_net", "linux-ping", &net)?;
    println!("  replayed: {:?}", virtio::fuzz::net_queues(&net));
    let rng = lock(&rng_log).seed();
    put("virtio_rng", "linux-boot-hwrng", &rng)?;
    println!("  replayed: {:?}", virtio::fuzz::rng_queues(&rng));
    Ok(())
}

/// The host side's sockets, as the fuzzer numbers them (pushed in order, closed by swap-remove).
#[derive(Default)]
struct Streams(Vec<&'static str>);

impl Streams {
    fn index(&self, name: &str) -> u8 {
        self.0.iter().position(|n| *n == name).unwrap_or(0) as u8
    }
}

/// Boot 2: vsock both ways (guest/src/init.sh, case vsock).
fn vsock_boot(kit: &Path) -> Res<()> {
    let mut vm = Vm::new("vsock")?;
    let dir = std::env::temp_dir().join(format!("anyvisor-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds: PathBuf = dir.join("v.sock");
    let log: DevLog = Arc::new(Mutex::new(Rec::new()));
    let dev = virtio::Vsock::new(virtio::VsockConfig {
        guest_cid: virtio::fuzz::FUZZ_GUEST_CID,
        uds_path: uds.clone(),
    })?;
    vm.add(Box::new(dev), log.clone(), true)?;
    let streams = Arc::new(Mutex::new(Streams::default()));
    let service = UnixListener::bind(format!("{}_6000", uds.display()))?;
    let (svc_log, svc_streams) = (log.clone(), streams.clone());
    // Guest -> host: echo everything back.
    let svc = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = service.accept()?;
        lock(&svc_streams).0.push("service");
        let mut buf = vec![0u8; 4096];
        loop {
            let n = c.read(&mut buf)?;
            let i = lock(&svc_streams).index("service");
            lock(&svc_log).with(|w| {
                w.host_read(i);
                w.host_write(i, &buf[..n]);
            });
            if n == 0 {
                break;
            }
            c.write_all(&buf[..n])?;
        }
        c.shutdown(Shutdown::Both)
    });
    let platform = vm.run(kit, &format!("{CMDLINE} anyvisor.test=vsock"), |vm| {
        if !vm.console.wait_for(
            "ANYVISOR-VSOCK-LISTENING 5000",
            &vm.stop,
            Duration::from_secs(240),
        ) {
            return;
        }
        let r = (|| -> std::io::Result<()> {
            let mut s = UnixStream::connect(&uds)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            lock(&streams).0.push("client");
            lock(&log).with(|w| w.host_connect());
            let i = lock(&streams).index("client");
            let hello = b"CONNECT 5000\n";
            s.write_all(hello)?;
            lock(&log).with(|w| w.host_write(i, hello));
            let mut line = [0u8; 1];
            while s.read_exact(&mut line).is_ok() && line[0] != b'\n' {}
            lock(&log).with(|w| w.host_read(i));
            let data: Vec<u8> = (0..8192u32).map(|x| (x * 7 % 251) as u8).collect();
            for chunk in data.chunks(1024) {
                s.write_all(chunk)?;
                lock(&log).with(|w| w.host_write(i, chunk));
            }
            s.shutdown(Shutdown::Write)?;
            lock(&log).with(|w| w.host_shutdown(i, 1));
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            lock(&log).with(|w| w.host_read(i));
            lock(&log).with(|w| w.host_shutdown(i, 3));
            let mut st = lock(&streams);
            if let Some(p) = st.0.iter().position(|n| *n == "client") {
                st.0.swap_remove(p);
            }
            println!("vsock echo: {} of {} bytes back", back.len(), data.len());
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("record_seeds: vsock host side: {e}");
        }
    })?;
    let _ = svc.join();
    let _ = std::fs::remove_dir_all(&dir);
    put("platform_io", "linux-vsock-boot", &platform.0)?;
    println!("  replayed: {:?}", machine::fuzz::platform_io(&platform.0));
    let vsock = lock(&log).seed();
    put("virtio_vsock", "linux-echo-both-ways", &vsock)?;
    println!("  replayed: {:?}", virtio::fuzz::vsock_queues(&vsock));
    Ok(())
}

fn main() -> Res<()> {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/out");
    if !kit.join("vmlinux").exists() {
        return Err("no guest kit: run guest/build-kit.sh first".into());
    }
    net_rng_boot(&kit)?;
    vsock_boot(&kit)?;
    Ok(())
}
