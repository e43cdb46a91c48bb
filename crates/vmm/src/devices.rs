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

fn device_error(what: String, e: impl std::error::Error + 'static) -> Error {
    Error::Setup(format!("{what}: {}", crate::error::report(&e)))
}

/// Creates the devices `config` asks for and maps them on `platform`.
pub fn create(
    config: &VmConfig,
    memory: &Arc<hv::GuestMemory>,
    platform: &Platform,
) -> Result<Vec<VirtioSlotDevice>> {
    create_restoring(config, memory, platform, None)
}

/// Like [`create`], but with `saved` (one state per device, in slot order) each transport is
/// rebuilt from its saved state (`MmioTransport::restore`) instead of starting reset. Used by
/// snapshot restore and incoming migration.
pub fn create_restoring(
    config: &VmConfig,
    memory: &Arc<hv::GuestMemory>,
    platform: &Platform,
    saved: Option<&[virtio::MmioState]>,
) -> Result<Vec<VirtioSlotDevice>> {
    let mut wanted: Vec<(&'static str, Box<dyn VirtioDevice>, serde_json::Value)> = Vec::new();
    for d in &config.disks {
        // Opened with the user's backing choice (`disk::policy`); `info` shows the chain.
        let (image, chain) = d.open()?;
        let block = virtio::Block::with_disk(image, d.readonly, &d.path);
        wanted.push((
            "virtio-blk",
            Box::new(block),
            serde_json::json!({"path": d.path, "readonly": d.readonly, "backing": d.backing,
                "chain": chain}),
        ));
    }
    for n in &config.nets {
        let net = virtio::Net::new(virtio::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac,
        })
        .map_err(|e| device_error(format!("cannot open tap {}", n.tap), e))?;
        wanted.push((
            "virtio-net",
            Box::new(net),
            serde_json::json!({"tap": n.tap}),
        ));
    }
    if let Some(v) = &config.vsock {
        let vsock = virtio::Vsock::new(virtio::VsockConfig {
            guest_cid: u64::from(v.cid),
            uds_path: v.uds.clone(),
        })
        .map_err(|e| device_error("cannot create the vsock device".into(), e))?;
        wanted.push((
            "virtio-vsock",
            Box::new(vsock),
            serde_json::json!({"cid": v.cid, "uds": v.uds}),
        ));
    }
    if config.rng {
        let rng = virtio::Rng::new()
            .map_err(|e| device_error("cannot create the rng device".into(), e))?;
        wanted.push(("virtio-rng", Box::new(rng), serde_json::json!({})));
    }

    if let Some(saved) = saved
        && saved.len() != wanted.len()
    {
        return Err(Error::Setup(format!(
            "saved state has {} virtio devices, the config {}",
            saved.len(),
            wanted.len()
        )));
    }
    let mut devices = Vec::with_capacity(wanted.len());
    for (index, (kind, device, detail)) in (0u32..).zip(wanted) {
        let slot = VirtioSlot::for_index(index).ok_or_else(|| {
            Error::Usage(format!(
                "too many virtio devices (at most {})",
                machine::layout::MAX_VIRTIO_SLOTS
            ))
        })?;
        let line = platform.irq_line(slot.irq);
        let irqfd = line.enable_irqfd();
        // A device's interrupt is one edge on its IOAPIC pin.
        let irq = Arc::new(line);
        let saved_state = saved.and_then(|s| s.get(usize::try_from(index).ok()?));
        let transport = match saved_state {
            Some(state) => MmioTransport::restore(device, memory.clone(), irq, state)
                .map_err(|e| device_error(format!("cannot restore {kind}"), e))?,
            None => MmioTransport::new(device, memory.clone(), irq)
                .map_err(|e| device_error(format!("cannot create {kind}"), e))?,
        };
        platform
            .register_mmio(
                slot.base,
                machine::layout::VIRTIO_MMIO_SIZE,
                // The bus calls into the transport's registers (never waiting for device I/O).
                Arc::new(transport.clone()),
            )
            .map_err(|e| Error::Internal(crate::error::report(&e)))?;
        devices.push(VirtioSlotDevice {
            kind,
            slot,
            transport,
            detail,
            irqfd,
            ioeventfd: Mutex::new(false),
            worker: Mutex::new(None),
        });
    }
    Ok(devices)
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
                    eprintln!(
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

    use hv::DeviceIo;
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
}
