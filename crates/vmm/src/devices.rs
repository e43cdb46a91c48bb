//! The VM's virtio devices: each one behind a virtio-mmio transport in one platform slot
//! (`machine::boot::VirtioSlot`), in a fixed order: disks, network devices, vsock, rng. The
//! order decides the slots, so the same config always gives the same guest-visible machine.
//!
//! Each device has a worker thread ([`virtio::Worker`], started by [`start_workers`]) that
//! processes its queues when notified. On plain KVM the QueueNotify register is an ioeventfd
//! per queue and the device's IOAPIC pin an irqfd, so neither a notification nor an interrupt
//! passes through a vCPU exit; elsewhere (emu, the PVM hybrid) the MMIO dispatch signals the
//! same eventfds and interrupts go through `signal_msi`. The device code is the same.

use std::sync::{Arc, Mutex, PoisonError};

use machine::boot::VirtioSlot;
use machine::{IrqLine, MmioHandler, Platform};
use sandbox::{SeccompMode, ThreadRole};
use virtio::{MmioTransport, VirtioDevice};

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// One virtio device in its slot.
pub struct VirtioSlotDevice {
    /// `virtio-blk`, `virtio-net`, `virtio-vsock` or `virtio-rng`.
    pub kind: &'static str,
    pub slot: VirtioSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What the user configured, for `GET /vm`.
    pub detail: serde_json::Value,
    /// The interrupt pin delivers through an irqfd when unmasked (plain KVM).
    pub irqfd: bool,
    /// Queue notifications reach the worker through KVM ioeventfds (plain KVM).
    ioeventfd: Mutex<bool>,
    worker: Mutex<Option<virtio::Worker>>,
}

impl VirtioSlotDevice {
    fn transport(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn info(&self) -> serde_json::Value {
        let counters = self.transport().counters();
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

/// The platform bus calls into the transport under its lock.
struct Window(Arc<Mutex<MmioTransport>>);

impl MmioHandler for Window {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, data);
    }
}

/// A device's interrupt: one edge on its IOAPIC pin.
struct Irq(IrqLine);

impl virtio::Interrupt for Irq {
    fn trigger(&self) {
        self.0.trigger();
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
        let block = virtio::Block::new(virtio::BlockConfig {
            path: d.path.clone(),
            readonly: d.readonly,
            format: d.format.map(|f| match f {
                crate::config::DiskFormat::Raw => virtio::Format::Raw,
                crate::config::DiskFormat::Qcow2 => virtio::Format::Qcow2,
            }),
        })
        .map_err(|e| device_error(format!("cannot open disk {}", d.path.display()), e))?;
        wanted.push((
            "virtio-blk",
            Box::new(block),
            serde_json::json!({"path": d.path, "readonly": d.readonly}),
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
        let irq = Arc::new(Irq(line));
        let saved_state = saved.and_then(|s| s.get(usize::try_from(index).ok()?));
        let transport = match saved_state {
            Some(state) => MmioTransport::restore(device, memory.clone(), irq, state)
                .map_err(|e| device_error(format!("cannot restore {kind}"), e))?,
            None => MmioTransport::new(device, memory.clone(), irq)
                .map_err(|e| device_error(format!("cannot create {kind}"), e))?,
        }
        .into_shared();
        platform
            .register_mmio(
                slot.base,
                machine::layout::VIRTIO_MMIO_SIZE,
                Arc::new(Window(transport.clone())),
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
/// dispatch signals the same eventfds. Call once, before any vCPU runs.
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
        let events = d.transport().queue_events().map_err(|source| Error::Io {
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
                    eprintln!("anyvisor: {}: no ioeventfd for queue {queue}: {e}", d.kind);
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
        d.transport().pause();
    }
}

/// Lets the devices work again, first processing what was notified while paused (and, after a
/// restore, every ready queue once).
pub fn resume(devices: &[VirtioSlotDevice]) {
    for d in devices {
        d.transport().resume();
    }
}
