//! The VM's virtio devices: each one behind a virtio-mmio transport in one platform slot
//! (`machine::boot::VirtioSlot`), in a fixed order: disks, network devices, vsock, rng. The
//! order decides the slots, so the same config always gives the same guest-visible machine.
//!
//! Each device has a worker thread ([`virtio::Worker`], started by [`start_workers`] when the
//! VM is built, before any vCPU runs) that does all of the device's work: activation and reset,
//! its queues when notified, and its host descriptors (the tap, the vsock sockets). A vCPU only
//! reads and writes the transport's registers (a short lock never held across I/O) and signals
//! eventfds. On plain KVM the QueueNotify register is an ioeventfd per queue and the device's
//! IOAPIC pin an irqfd, so neither a notification nor an interrupt passes through a vCPU exit;
//! elsewhere (emu, the PVM hybrid) the MMIO dispatch signals the same eventfds and interrupts
//! go through `signal_msi`. The device code is the same.

use std::sync::{Arc, Mutex, PoisonError};

use machine::Platform;
use machine::boot::VirtioSlot;
use sandbox::{SeccompMode, ThreadRole};
use virtio::{MmioTransport, VirtioDevice};

use crate::builder::{BuildError, Persist};
use crate::config::VmConfig;
use crate::error::{Error, Result};

/// One virtio device in its slot.
pub struct VirtioSlotDevice {
    /// `virtio-blk`, `virtio-net`, `virtio-vsock` or `virtio-rng`.
    pub kind: &'static str,
    pub slot: VirtioSlot,
    pub transport: MmioTransport,
    /// What the user configured, for `GET /vm`.
    pub detail: serde_json::Value,
    /// The interrupt pin delivers through an irqfd when unmasked (plain KVM).
    pub irqfd: bool,
    /// Queue notifications reach the worker through KVM ioeventfds (plain KVM).
    ioeventfd: Mutex<bool>,
    worker: Mutex<Option<virtio::Worker>>,
}

impl VirtioSlotDevice {
    pub fn info(&self) -> serde_json::Value {
        let counters = self.transport.counters();
        let mut v = serde_json::json!({
            "type": self.kind,
            "mmio_base": format!("{:#x}", self.slot.base),
            "irq": self.slot.irq,
            "counters": serde_json::to_value(counters).unwrap_or(serde_json::Value::Null),
            "irqfd": self.irqfd,
            "ioeventfd": *self.ioeventfd.lock().unwrap_or_else(PoisonError::into_inner),
        });
        if let (Some(obj), Some(detail)) = (v.as_object_mut(), self.detail.as_object()) {
            obj.extend(detail.clone());
        }
        v
    }
}

impl Drop for VirtioSlotDevice {
    /// The worker first: the device must not be dropped (its files closed, the vsock socket
    /// file removed) on the worker's thread, whose filter forbids part of that.
    fn drop(&mut self) {
        drop(
            self.worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// A device the config asks for, built on its host resources (disk image, tap, vsock socket)
/// but not yet in a slot.
pub struct DeviceSpec {
    /// `virtio-blk`, `virtio-net`, `virtio-vsock` or `virtio-rng`.
    pub kind: &'static str,
    pub device: Box<dyn VirtioDevice>,
    /// What the user configured, for `GET /vm`.
    pub detail: serde_json::Value,
}

/// The devices `config` asks for, in slot order (disks, network devices, vsock, rng).
pub fn specs(config: &VmConfig) -> Result<Vec<DeviceSpec>> {
    let mut wanted = Vec::new();
    for d in &config.disks {
        // Opened with the user's backing choice (`disk::policy`); `info` shows the chain.
        let (image, chain) = d.open()?;
        let block = virtio::Block::with_disk(image, d.readonly, &d.path);
        wanted.push(DeviceSpec {
            kind: "virtio-blk",
            device: Box::new(block),
            detail: serde_json::json!({"path": d.path, "readonly": d.readonly,
                "backing": d.backing, "chain": chain}),
        });
    }
    for n in &config.nets {
        let net = virtio::Net::new(virtio::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac,
        })
        .map_err(|source| BuildError::Tap {
            tap: n.tap.clone(),
            source,
        })?;
        wanted.push(DeviceSpec {
            kind: "virtio-net",
            device: Box::new(net),
            detail: serde_json::json!({"tap": n.tap}),
        });
    }
    if let Some(v) = &config.vsock {
        let vsock = virtio::Vsock::new(virtio::VsockConfig {
            guest_cid: u64::from(v.cid),
            uds_path: v.uds.clone(),
        })
        .map_err(BuildError::Vsock)?;
        wanted.push(DeviceSpec {
            kind: "virtio-vsock",
            device: Box::new(vsock),
            detail: serde_json::json!({"cid": v.cid, "uds": v.uds}),
        });
    }
    if config.rng {
        let rng = virtio::Rng::new().map_err(BuildError::Rng)?;
        wanted.push(DeviceSpec {
            kind: "virtio-rng",
            device: Box::new(rng),
            detail: serde_json::json!({}),
        });
    }
    Ok(wanted)
}

/// Creates the devices `config` asks for, reset, and maps them on `platform`.
pub fn create(
    config: &VmConfig,
    memory: &Arc<hv::GuestMemory>,
    platform: &Platform,
) -> Result<Vec<VirtioSlotDevice>> {
    attach(config, memory, platform, None)
}

/// The builder's step for the virtio devices ([`crate::builder`]): the devices `config` asks
/// for, each in its slot on `platform`; with `saved` (one transport state per device, in slot
/// order: a restore or an incoming migration) each is [`Persist::restore`]d from its state
/// instead of starting reset.
pub fn attach(
    config: &VmConfig,
    memory: &Arc<hv::GuestMemory>,
    platform: &Platform,
    saved: Option<&[virtio::MmioState]>,
) -> Result<Vec<VirtioSlotDevice>> {
    let wanted = specs(config)?;
    if let Some(saved) = saved
        && saved.len() != wanted.len()
    {
        return Err(BuildError::VirtioCount {
            saved: saved.len(),
            config: wanted.len(),
        }
        .into());
    }
    let mut devices = Vec::with_capacity(wanted.len());
    for (index, spec) in (0u32..).zip(wanted) {
        let args = SlotArgs {
            spec,
            index,
            memory,
            platform,
        };
        let saved_state = saved.and_then(|s| s.get(usize::try_from(index).ok()?));
        devices.push(match saved_state {
            Some(state) => VirtioSlotDevice::restore(args, state)?,
            None => VirtioSlotDevice::new(args)?,
        });
    }
    Ok(devices)
}

/// What a device in a slot is built from besides its saved state.
pub struct SlotArgs<'a> {
    /// The device model, built from the configuration.
    pub spec: DeviceSpec,
    /// Its slot: decides its MMIO window and interrupt pin.
    pub index: u32,
    pub memory: &'a Arc<hv::GuestMemory>,
    /// Where its window is mapped and its interrupt pin is.
    pub platform: &'a Platform,
}

impl VirtioSlotDevice {
    /// The device of `args` behind a transport in its reset state.
    pub fn new(args: SlotArgs<'_>) -> Result<Self> {
        Self::plug(args, |device, memory, irq, kind| {
            MmioTransport::new(device, memory, irq)
                .map_err(|source| BuildError::Transport { kind, source })
        })
    }

    /// Puts the device of `args` in its slot behind the transport `transport` makes for it.
    fn plug(
        args: SlotArgs<'_>,
        transport: impl FnOnce(
            Box<dyn VirtioDevice>,
            Arc<hv::GuestMemory>,
            Arc<machine::IrqLine>,
            &'static str,
        ) -> std::result::Result<MmioTransport, BuildError>,
    ) -> Result<Self> {
        let SlotArgs {
            spec,
            index,
            memory,
            platform,
        } = args;
        let slot = VirtioSlot::for_index(index).ok_or_else(|| {
            Error::Usage(format!(
                "too many virtio devices (at most {})",
                machine::layout::MAX_VIRTIO_SLOTS
            ))
        })?;
        let line = platform.irq_line(slot.irq);
        let irqfd = line.enable_irqfd();
        let irq = Arc::new(line);
        let transport = transport(spec.device, memory.clone(), irq, spec.kind)?;
        platform
            .register_mmio(
                slot.base,
                machine::layout::VIRTIO_MMIO_SIZE,
                // The bus calls into the transport's registers (never waiting for device I/O).
                Arc::new(transport.clone()),
            )
            .map_err(|e| Error::internal("cannot map a virtio device's registers", e))?;
        Ok(VirtioSlotDevice {
            kind: spec.kind,
            slot,
            transport,
            detail: spec.detail,
            irqfd,
            ioeventfd: Mutex::new(false),
            worker: Mutex::new(None),
        })
    }
}

impl Persist for VirtioSlotDevice {
    /// The transport's registers and queues with the device model's own state inside
    /// ([`virtio::DeviceState`], tagged by device kind).
    type State = virtio::MmioState;
    type ConstructorArgs<'a> = SlotArgs<'a>;
    type Error = Error;

    fn save(&self) -> virtio::MmioState {
        self.transport.save()
    }

    /// The device of `args` in its slot, its transport rebuilt from `state` by
    /// [`MmioTransport::restore`], which checks the state against the device (kind, queues,
    /// features, the device's own configuration) before adopting it.
    fn restore(args: SlotArgs<'_>, state: &virtio::MmioState) -> Result<Self> {
        Self::plug(args, |device, memory, irq, kind| {
            MmioTransport::restore(device, memory, irq, state)
                .map_err(|source| BuildError::RestoreTransport { kind, source })
        })
    }
}

/// Starts each device's worker thread (under the [`ThreadRole::Device`] filter) and registers
/// its queue eventfds as ioeventfds of QueueNotify where `vm` supports them. Without, the MMIO
/// dispatch signals the same eventfds. Call once, before any vCPU runs and before any other
/// thread installs its filter (the vCPUs' forbids creating threads).
pub fn start_workers(
    devices: &[VirtioSlotDevice],
    vm: &dyn hv::Vm,
    seccomp: SeccompMode,
) -> Result<()> {
    for (index, d) in devices.iter().enumerate() {
        let mut worker = d.worker.lock().unwrap_or_else(PoisonError::into_inner);
        if worker.is_some() {
            continue;
        }
        let spawned = virtio::Worker::spawn(&d.transport, format!("virtio{index}"), move || {
            sandbox::install(ThreadRole::Device, seccomp).map_err(|e| crate::error::report(&e))
        })
        .map_err(|source| Error::Io {
            op: "cannot start a virtio worker",
            source,
        })?;
        *worker = Some(spawned);
        let events = d.transport.queue_events().map_err(|source| Error::Io {
            op: "cannot create virtio queue events",
            source,
        })?;
        let notify = d.slot.base + virtio::mmio::QUEUE_NOTIFY_OFFSET;
        let mut all = true;
        for (queue, event) in (0u64..).zip(&events) {
            match vm.register_ioevent(notify, 4, Some(queue), event) {
                Ok(()) => {}
                Err(hv::Error::Unsupported(_)) => all = false,
                Err(e) => {
                    // The write then exits to the MMIO dispatch, which signals the same fd.
                    tracing::warn!(target: hv::NOTICE,
                        "anyvisor: {}: no ioeventfd for queue {queue}: {}",
                        d.kind,
                        hv::Chain(&e)
                    );
                    all = false;
                }
            }
        }
        *d.ioeventfd.lock().unwrap_or_else(PoisonError::into_inner) = all && !events.is_empty();
    }
    Ok(())
}

/// Stops all queue processing (device workers and device threads' kicks): once this returns,
/// no device touches guest memory or its own state until [`resume`].
pub fn pause(devices: &[VirtioSlotDevice]) {
    for d in devices {
        d.transport.pause();
    }
}

/// Lets the devices work again: their workers first process what was notified while paused
/// (and, after a restore, every ready queue once).
pub fn resume(devices: &[VirtioSlotDevice]) {
    for d in devices {
        d.transport.resume();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use hv::{DeviceIo, Hypervisor};
    use machine::layout::IOAPIC_BASE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::{BackendChoice, CpuModelChoice, SerialConfig};

    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const BUF: u64 = 0x10_3000;
    const VECTOR: u32 = 0x31;

    struct NoEvents;
    impl machine::PlatformEvents for NoEvents {
        fn request(&self, _ev: machine::PlatformEvent) {}
    }

    fn rng_config() -> VmConfig {
        VmConfig {
            kernel: Default::default(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 64 << 20,
            backend: BackendChoice::Emu,
            cpu_model: CpuModelChoice::Portable,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: true,
            serial: SerialConfig::Null,
            api_socket: None,
            seccomp: SeccompMode::Off,
        }
    }

    struct Rig {
        memory: Arc<hv::GuestMemory>,
        platform: Platform,
        devices: Vec<VirtioSlotDevice>,
        _vm: Arc<dyn hv::Vm>,
    }

    fn rig(hypervisor: &dyn hv::Hypervisor) -> Rig {
        let memory = Arc::new(machine::memory::create_guest_memory(64 << 20).unwrap());
        let vm = hypervisor
            .create_vm(hv::VmConfig {
                memory: memory.clone(),
                cpu_model: hv::CpuModel::portable(),
                vcpus: 1,
                tsc_khz: None,
            })
            .unwrap();
        let platform = Platform::new(Box::new(std::io::sink()), Arc::new(NoEvents));
        platform.attach_vm(vm.clone());
        let devices = create(&rng_config(), &memory, &platform).unwrap();
        start_workers(&devices, vm.as_ref(), SeccompMode::Off).unwrap();
        Rig {
            memory,
            platform,
            devices,
            _vm: vm,
        }
    }

    impl Rig {
        fn reg(&self, offset: u64, v: u32) {
            let base = self.devices[0].slot.base;
            self.platform.mmio_write(base + offset, &v.to_le_bytes());
        }

        /// Unmasks the device's IOAPIC pin, then what Linux does to bring up virtio-rng.
        fn probe(&self) {
            let pin = self.devices[0].slot.irq;
            let ioapic = |reg: u32, v: u32| {
                self.platform.mmio_write(IOAPIC_BASE, &reg.to_le_bytes());
                self.platform
                    .mmio_write(IOAPIC_BASE + 0x10, &v.to_le_bytes());
            };
            ioapic(0x11 + 2 * pin, 0);
            ioapic(0x10 + 2 * pin, VECTOR);
            for status in [1, 3] {
                self.reg(0x70, status);
            }
            self.reg(0x24, 1);
            self.reg(0x20, 1); // VERSION_1
            self.reg(0x24, 0);
            self.reg(0x20, 0);
            self.reg(0x70, 0xb);
            self.reg(0x30, 0);
            self.reg(0x38, 16);
            for (low, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
                self.reg(low, addr as u32);
                self.reg(low + 4, 0);
            }
            self.reg(0x44, 1);
            self.reg(0x70, 0xf);
        }

        /// Makes descriptor `n` (16 writable bytes) available and returns the new avail index.
        fn add_buffer(&self, n: u16) -> u16 {
            let m = &self.memory;
            let d = DESC + u64::from(n) * 16;
            m.write_obj(BUF + u64::from(n) * 16, GuestAddress(d))
                .unwrap();
            m.write_obj(16u32, GuestAddress(d + 8)).unwrap();
            m.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
            m.write_obj(n, GuestAddress(AVAIL + 4 + u64::from(n) * 2))
                .unwrap();
            m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
            n + 1
        }

        fn used_idx(&self) -> u16 {
            self.memory.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn wait_used(&self, idx: u16) {
            let t = Instant::now();
            while self.used_idx() != idx {
                assert!(t.elapsed() < Duration::from_secs(5), "worker did not run");
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        fn msi_sent(&self) -> u64 {
            self.platform.counter_values().msi_sent
        }

        /// The worker interrupts after it put the buffer in the used ring.
        fn wait_msi(&self, n: u64) {
            let t = Instant::now();
            while self.msi_sent() < n {
                assert!(t.elapsed() < Duration::from_secs(5), "no interrupt");
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(self.msi_sent(), n);
        }
    }

    /// A QueueNotify through the platform's MMIO dispatch (the path of emu and the PVM hybrid)
    /// is processed by the worker, which interrupts through the IOAPIC; a paused device only
    /// records it.
    #[test]
    fn notify_reaches_the_worker_and_pause_holds_it() {
        let hypervisor = hv_emu::EmuHypervisor::new();
        let r = rig(&hypervisor);
        assert!(!r.devices[0].irqfd);
        r.probe();
        r.add_buffer(0);
        r.reg(0x50, 0);
        r.wait_used(1);
        r.wait_msi(1);
        // Pausing waits for the worker to finish what it is doing (publishing the counters).
        pause(&r.devices);
        let info = r.devices[0].info();
        assert_eq!(info["ioeventfd"], false);
        assert_eq!(info["counters"]["requests"], 1);

        r.reg(0x64, 1); // InterruptACK
        r.add_buffer(1);
        r.reg(0x50, 0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r.used_idx(), 1, "processed while paused");
        resume(&r.devices);
        r.wait_used(2);
    }

    /// Plain KVM: QueueNotify is an ioeventfd per queue and the pin an irqfd; the device path
    /// is the same.
    #[test]
    fn plain_kvm_uses_ioeventfd_and_irqfd() {
        let Ok(hypervisor) = hv_kvm::KvmHypervisor::open(None) else {
            println!("SKIP: no /dev/kvm");
            return;
        };
        let r = rig(&hypervisor);
        assert!(r.devices[0].irqfd);
        assert_eq!(r.devices[0].info()["ioeventfd"], true);
        r.probe();
        r.add_buffer(0);
        // The MMIO dispatch still works for the write KVM would have taken itself.
        r.reg(0x50, 0);
        r.wait_used(1);
        r.wait_msi(1);
    }

    /// One device of each kind in a slot of its own platform.
    struct Slot {
        memory: Arc<hv::GuestMemory>,
        platform: Platform,
        _vm: Arc<dyn hv::Vm>,
    }

    impl Slot {
        fn new() -> Slot {
            let memory = Arc::new(machine::memory::create_guest_memory(64 << 20).unwrap());
            let vm = hv_emu::EmuHypervisor::new()
                .create_vm(hv::VmConfig {
                    memory: memory.clone(),
                    cpu_model: hv::CpuModel::portable(),
                    vcpus: 1,
                    tsc_khz: None,
                })
                .unwrap();
            let platform = Platform::new(Box::new(std::io::sink()), Arc::new(NoEvents));
            platform.attach_vm(vm.clone());
            Slot {
                memory,
                platform,
                _vm: vm,
            }
        }

        fn args(&self, spec: DeviceSpec) -> SlotArgs<'_> {
            SlotArgs {
                spec,
                index: 0,
                memory: &self.memory,
                platform: &self.platform,
            }
        }

        /// What a driver does up to DRIVER_OK: features negotiated, queue 0 set up and ready.
        fn drive(&self, d: &VirtioSlotDevice) {
            let reg = |offset: u64, v: u32| {
                self.platform
                    .mmio_write(d.slot.base + offset, &v.to_le_bytes());
            };
            reg(0x70, 1);
            reg(0x70, 3);
            reg(0x24, 1);
            reg(0x20, 1); // VERSION_1
            reg(0x70, 0xb);
            reg(0x30, 0);
            reg(0x38, 16);
            for (low, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
                reg(low, addr as u32);
                reg(low + 4, 0);
            }
            reg(0x44, 1);
            reg(0x70, 0xf);
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("anyvisor-persist-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A fresh device model of `kind`, as the config would build it (the net device on a
    /// socket pair instead of a tap, which needs privileges).
    fn spec(kind: &'static str, dir: &std::path::Path) -> DeviceSpec {
        let device: Box<dyn VirtioDevice> = match kind {
            "virtio-blk" => {
                let path = dir.join("disk.raw");
                if !path.exists() {
                    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
                }
                let image = disk::open(&path, disk::OpenOptions::readonly(false)).unwrap();
                Box::new(virtio::Block::with_disk(image, false, &path))
            }
            "virtio-net" => {
                let (end, _host) = std::os::unix::net::UnixDatagram::pair().unwrap();
                end.set_nonblocking(true).unwrap();
                Box::new(virtio::Net::with_backend(
                    Some([0x52, 0x54, 0, 1, 2, 3]),
                    Arc::new(end),
                ))
            }
            "virtio-vsock" => {
                let uds = dir.join(format!("vsock-{}", std::process::id()));
                let _ = std::fs::remove_file(&uds);
                Box::new(
                    virtio::Vsock::new(virtio::VsockConfig {
                        guest_cid: 3,
                        uds_path: uds,
                    })
                    .unwrap(),
                )
            }
            "virtio-rng" => Box::new(virtio::Rng::new().unwrap()),
            other => panic!("no device kind {other}"),
        };
        DeviceSpec {
            kind,
            device,
            detail: serde_json::json!({}),
        }
    }

    /// For each device kind: a driven device's state survives save, JSON and restore into a
    /// device built afresh from the same configuration on another platform; a state restored
    /// into a device of another kind is refused.
    #[test]
    fn virtio_persist_round_trip_for_each_kind() {
        const KINDS: [&str; 4] = ["virtio-blk", "virtio-net", "virtio-vsock", "virtio-rng"];
        for kind in KINDS {
            let dir = scratch(kind.trim_start_matches("virtio-"));
            let first = Slot::new();
            let device = VirtioSlotDevice::new(first.args(spec(kind, &dir))).unwrap();
            first.drive(&device);
            let saved = Persist::save(&device);
            assert_ne!(saved.status, 0, "{kind}: driven");
            drop(device);
            let json = serde_json::to_string(&saved).unwrap();
            let back: virtio::MmioState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, saved, "{kind}");

            let second = Slot::new();
            let restored = VirtioSlotDevice::restore(second.args(spec(kind, &dir)), &back)
                .unwrap_or_else(|e| panic!("{kind}: {}", crate::error::report(&e)));
            assert_eq!(restored.kind, kind);
            assert_eq!(Persist::save(&restored), saved, "{kind}");
            drop(restored);

            let other = KINDS.iter().find(|k| **k != kind).unwrap();
            let third = Slot::new();
            let e = VirtioSlotDevice::restore(third.args(spec(other, &dir)), &back)
                .err()
                .unwrap_or_else(|| panic!("{kind} state restored into {other}"));
            assert!(
                matches!(e, Error::Build(BuildError::RestoreTransport { .. })),
                "{kind} into {other}: {e}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
