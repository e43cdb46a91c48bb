//! Snapshots: `PUT /vm/snapshot`, `anyvisor run --restore` and `anyvisor snapshot-info`.
//!
//! What a snapshot holds (see `docs/snapshot-format.md` for the file): the header (CPU model,
//! memory regions, vCPU count, backend, TSC frequency, and the [`VmConfig`] as JSON so a restore
//! rebuilds the same devices), every vCPU's [`hv::CpuState`], the VM's [`hv::VmState`]
//! (kvm-clock), and the device states ([`VmDevices`]), stored as named records:
//! * `vmm`: [`RunState`] (whether the VM was paused when the snapshot was taken, its seccomp
//!   mode);
//! * `platform`: [`machine::PlatformState`] (serial, IOAPIC, i8042);
//! * `virtio-N`: the [`virtio::MmioState`] of the device in slot `N`.
//!
//! The same data without RAM is a live migration's final state: both are a [`SavedVm`], and
//! restoring either goes through the one VM builder ([`crate::builder::assemble`]):
//! compatibility checks first, then the VM is built around the arrived memory and started with
//! [`Vmm::launch`].

use std::path::Path;
use std::sync::{Arc, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use hv::{BackendKind, CpuState};
use serde::{Deserialize, Serialize};
use snapshot::{DeviceRecords, Header, SnapshotReader, SnapshotWriter, WriteOptions};

use crate::api::{ApiError, SnapshotRequest};
use crate::backend::Backend;
use crate::builder::{BuildError, Persist};
use crate::config::{CpuModelChoice, RuntimeOptions, VmConfig};
use crate::error::{Error, Result};
use crate::vm::{VmParts, Vmm};

/// Device-state name of the VMM's own run state.
const RUN_STATE: &str = "vmm";
/// Device-state name of the platform devices.
const PLATFORM: &str = "platform";
/// Device-state names of the virtio devices: this, then the slot number.
const VIRTIO_PREFIX: &str = "virtio-";
/// How long restoring a paused VM waits for its fresh vCPU threads to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The VMM's own state in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// The VM was paused through the API when the snapshot was taken: it restores paused.
    pub paused: bool,
    /// The `--seccomp` mode the VM ran with: a restored or arriving VM keeps it unless its
    /// command line sets one. Absent in snapshots from before it was recorded (the default
    /// mode applies).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "seccomp_name"
    )]
    pub seccomp: Option<sandbox::SeccompMode>,
}

/// [`sandbox::SeccompMode`] as its `--seccomp` name (`"on"`, `"log"`, `"off"`).
mod seccomp_name {
    use sandbox::SeccompMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &Option<SeccompMode>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_some(m.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SeccompMode>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|name| name.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Every device state of a VM, typed: what [`Persist::save`] gave for each component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDevices {
    pub run: RunState,
    pub platform: machine::PlatformState,
    /// In slot order: `virtio[n]` is the device in slot `n`.
    pub virtio: Vec<virtio::MmioState>,
}

/// Why device records do not make a [`VmDevices`].
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("cannot encode the state of device '{name}'")]
    Encode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("device '{name}'")]
    Decode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected device '{0}'")]
    Unexpected(String),
    #[error("no platform state")]
    NoPlatform,
}

/// The records are named `vmm`, `platform`, `virtio-0`, `virtio-1`, ... and written in that
/// order. A reader takes `vmm` and `platform` anywhere (`vmm` may be absent: not paused), the
/// virtio devices in slot order, and refuses any other name.
impl snapshot::DeviceSet for VmDevices {
    type Error = DeviceStateError;

    fn to_records(&self) -> std::result::Result<DeviceRecords, DeviceStateError> {
        fn record<T: Serialize>(
            name: String,
            state: &T,
        ) -> std::result::Result<(String, serde_json::Value), DeviceStateError> {
            match serde_json::to_value(state) {
                Ok(v) => Ok((name, v)),
                Err(source) => Err(DeviceStateError::Encode { name, source }),
            }
        }
        let mut records = Vec::with_capacity(2 + self.virtio.len());
        records.push(record(RUN_STATE.into(), &self.run)?);
        records.push(record(PLATFORM.into(), &self.platform)?);
        for (slot, state) in self.virtio.iter().enumerate() {
            records.push(record(format!("{VIRTIO_PREFIX}{slot}"), state)?);
        }
        Ok(records)
    }

    fn from_records(records: DeviceRecords) -> std::result::Result<Self, DeviceStateError> {
        fn parse<T: serde::de::DeserializeOwned>(
            name: String,
            value: serde_json::Value,
        ) -> std::result::Result<T, DeviceStateError> {
            T::deserialize(value).map_err(|source| DeviceStateError::Decode { name, source })
        }
        let mut run = None;
        let mut platform = None;
        let mut virtio = Vec::new();
        for (name, value) in records {
            if name == RUN_STATE && run.is_none() {
                run = Some(parse(name, value)?);
            } else if name == PLATFORM && platform.is_none() {
                platform = Some(parse(name, value)?);
            } else if name.strip_prefix(VIRTIO_PREFIX) == Some(&virtio.len().to_string()) {
                virtio.push(parse(name, value)?);
            } else {
                return Err(DeviceStateError::Unexpected(name));
            }
        }
        Ok(VmDevices {
            run: run.unwrap_or_default(),
            platform: platform.ok_or(DeviceStateError::NoPlatform)?,
            virtio,
        })
    }
}

/// Everything about a paused VM except its RAM: a snapshot's contents, and the final state a
/// live migration sends (as JSON).
pub type SavedVm = snapshot::SnapshotContents<VmDevices>;

/// Takes the VM's snapshot/migration slot (one at a time per VM), or answers 409.
pub(crate) fn exclusive(vm: &VmParts) -> std::result::Result<MutexGuard<'_, ()>, ApiError> {
    match vm.busy.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(ApiError::new(
            409,
            "a snapshot or migration is already in progress",
        )),
    }
}

/// Why the state of a running VM cannot be collected (for a snapshot or a migration's
/// description and final state).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the vm state")]
    VmState(#[source] hv::Error),
    #[error("cannot read the state of vcpu {id}")]
    VcpuState {
        id: usize,
        #[source]
        source: hv::Error,
    },
}

/// A snapshot file could not be written (the API's 4xx/5xx message).
#[derive(Debug, thiserror::Error)]
#[error("snapshot failed")]
struct SnapshotFailed(#[source] snapshot::Error);

fn to_json<T: Serialize>(
    what: &'static str,
    v: &T,
) -> std::result::Result<serde_json::Value, CaptureError> {
    serde_json::to_value(v).map_err(|source| CaptureError::Encode { what, source })
}

/// The header describing `vm` (also a migration's description).
pub(crate) fn header_of(vm: &VmParts) -> std::result::Result<Header, CaptureError> {
    Ok(Header {
        cpu_model: vm.cpu_model.clone(),
        memory_regions: snapshot::memory_regions_of(&vm.memory),
        vcpus: vm.config.cpus,
        backend: vm.backend,
        tsc_khz: vm.vm.tsc_khz(),
        created_unix: snapshot::now_unix(),
        config: to_json("the config", &vm.config)?,
        user_extra: vm.vm.state().map_err(CaptureError::VmState)?.user_extra,
    })
}

/// Collects every state of a paused VM; `paused`: whether it restores paused.
pub(crate) fn capture(vm: &VmParts, paused: bool) -> std::result::Result<SavedVm, CaptureError> {
    let mut vcpus = Vec::with_capacity(vm.vcpus.len());
    for (id, vcpu) in vm.vcpus.iter().enumerate() {
        let state = vcpu
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state()
            .map_err(|source| CaptureError::VcpuState { id, source })?;
        vcpus.push(state);
    }
    let run = RunState {
        paused,
        seccomp: Some(vm.config.seccomp),
    };
    let vm_state = vm.vm.state().map_err(CaptureError::VmState)?;
    let devices = VmDevices {
        run,
        platform: vm.platform.save(),
        virtio: vm.virtio.iter().map(Persist::save).collect(),
    };
    Ok(SavedVm {
        header: header_of(vm)?,
        vcpus,
        vm: vm_state,
        devices,
    })
}

/// `PUT /vm/snapshot`.
///
/// An output naming a directory, device node, FIFO, socket or symbolic link, or an existing
/// file without `overwrite`, is a 400; `cancelled` (the client hung up) abandons the snapshot
/// before the file is in place, and the VM goes on as if it had not been asked.
pub fn take(
    vm: &VmParts,
    req: SnapshotRequest,
    cancelled: crate::api::Cancelled<'_>,
) -> std::result::Result<(), ApiError> {
    let _busy = exclusive(vm)?;
    let was_paused = vm.is_paused();
    vm.pause()?;
    let written = capture(vm, was_paused)
        .map_err(|e| ApiError::new(500, crate::error::report(&e)))
        .and_then(|saved| {
            let options = WriteOptions {
                overwrite: req.overwrite,
                cancelled: Some(cancelled),
            };
            SnapshotWriter::write_with(&req.output, &saved, &vm.memory, &options).map_err(|e| {
                let status = match e {
                    snapshot::Error::OutputNotRegular { .. }
                    | snapshot::Error::OutputExists { .. } => 400,
                    snapshot::Error::Cancelled(_) => 409,
                    _ => 500,
                };
                ApiError::new(status, crate::error::report(&SnapshotFailed(e)))
            })
        });
    match written {
        Ok(_) if req.stop => {
            vm.hand_off();
            Ok(())
        }
        Ok(_) => {
            if !was_paused {
                vm.resume()?;
            }
            Ok(())
        }
        Err(e) => {
            if !was_paused {
                let _ = vm.resume();
            }
            Err(e)
        }
    }
}

/// A snapshot file error as the VMM reports it (exit status 2).
fn file_error(path: &Path, e: snapshot::Error) -> Error {
    match e {
        snapshot::Error::Io { source, .. } => Error::ReadFile {
            path: path.to_path_buf(),
            source,
        },
        other => Error::bad_file(path, other),
    }
}

/// `anyvisor run --restore FILE`.
pub fn restore(path: &Path, runtime: &RuntimeOptions, verify: bool) -> Result<Vmm> {
    let start = Instant::now();
    let reader = SnapshotReader::open(path).map_err(|e| file_error(path, e))?;
    if verify {
        reader.verify_memory().map_err(|e| file_error(path, e))?;
    }
    let backend = open_backend(reader.header(), runtime)?;
    check_states(backend.hypervisor.kind(), &reader.contents().vcpus)?;
    let memory = reader.map_memory().map_err(|e| file_error(path, e))?;
    let saved: SavedVm = reader
        .into_contents()
        .decode_devices()
        .map_err(BuildError::DeviceStates)?;
    crate::exit::stop_if_signalled()?;
    let vmm = start_saved(saved, memory, backend, runtime)?;
    // From opening the file to the vCPU threads started (the part a VMM controls; process
    // start-up comes before it), for `GET /vm`.
    let _ = vmm.parts().restore_time.set(start.elapsed());
    Ok(vmm)
}

/// Builds the VM `saved` describes (a snapshot's or a migration's) around `memory` (already
/// holding its RAM) on `backend` with the one VM builder, launches it, and, when it was saved
/// paused, waits until its vCPUs are parked, so the API reports `paused` and a snapshot of it
/// equals the one it came from.
pub(crate) fn start_saved(
    saved: SavedVm,
    memory: hv::GuestMemory,
    backend: Backend,
    runtime: &RuntimeOptions,
) -> Result<Vmm> {
    let config = config_of(&saved.header, runtime, saved.devices.run.seccomp)?;
    let serial_out = crate::serial::output(&config.serial)?;
    let blueprint = crate::builder::Blueprint {
        config,
        backend,
        cpu_model: saved.header.cpu_model.clone(),
        memory: Arc::new(memory),
        serial_out,
    };
    let parts = crate::builder::assemble(blueprint, crate::builder::Start::Saved(Box::new(saved)))?;
    let vmm = Vmm::launch(Arc::new(parts))?;
    settle(&vmm);
    Ok(vmm)
}

/// `anyvisor snapshot-info FILE`: what a snapshot file holds, as JSON.
/// `anyvisor snapshot-info [--verify]`: what the file holds; with `verify`, after reading the
/// whole RAM image against its checksums (`"memory_verified": true`).
pub fn info(path: &Path, verify: bool) -> Result<serde_json::Value> {
    let r = SnapshotReader::open(path).map_err(|e| file_error(path, e))?;
    let mut info = r.info();
    if verify {
        r.verify_memory().map_err(|e| file_error(path, e))?;
        info["memory_verified"] = serde_json::Value::Bool(true);
    }
    Ok(info)
}

/// The config recorded in `header`, with this process's serial, API socket and backend choice,
/// and the seccomp mode: this process's `--seccomp` if given, else `saved` (the mode the VM
/// ran with), else the default.
pub(crate) fn config_of(
    header: &Header,
    runtime: &RuntimeOptions,
    saved: Option<sandbox::SeccompMode>,
) -> Result<VmConfig> {
    let mut config: VmConfig =
        serde_json::from_value(header.config.clone()).map_err(BuildError::Config)?;
    if config.cpus != header.vcpus {
        return Err(BuildError::ConfigVcpus {
            config: config.cpus,
            header: header.vcpus,
        }
        .into());
    }
    if config.memory != header.memory_size() {
        return Err(BuildError::ConfigMemory {
            config: config.memory,
            header: header.memory_size(),
        }
        .into());
    }
    config.serial = runtime.serial.clone();
    config.api_socket = runtime.api_socket.clone();
    config.backend = runtime.backend;
    config.seccomp = seccomp_of(runtime, saved);
    Ok(config)
}

/// The `--seccomp` mode of a restored or arriving VM.
fn seccomp_of(
    runtime: &RuntimeOptions,
    saved: Option<sandbox::SeccompMode>,
) -> sandbox::SeccompMode {
    runtime.seccomp.or(saved).unwrap_or_default()
}

/// Names of host CPU models start with this (`host:<backend>:<digest>`).
const HOST_MODEL_PREFIX: &str = "host:";

/// Opens the backend `runtime` asks for and checks it can present the saved CPU model, before
/// anything runs. A host model (`--cpu-model host`) restores only where the backend builds the
/// very same model (same name, which carries the digest of the host's CPUID table), so never on
/// emu and never on a different host.
pub(crate) fn open_backend(header: &Header, runtime: &RuntimeOptions) -> Result<Backend> {
    let config = config_of(header, runtime, None)?;
    let saved = &header.cpu_model;
    let host_model = saved.name.starts_with(HOST_MODEL_PREFIX);
    if host_model != (config.cpu_model == CpuModelChoice::Host) {
        return Err(BuildError::ConfigCpuModel {
            model: saved.name.clone(),
        }
        .into());
    }
    let cannot = |reason: String| {
        Error::Unsupported(format!(
            "cannot run this VM (CPU model {}) here: {reason}",
            saved.name
        ))
    };
    let backend = crate::backend::open(runtime.backend, config.cpu_model).map_err(|e| match e {
        Error::Unsupported(reason) => cannot(reason),
        e => e,
    })?;
    // The feature check first: its reason names what is missing.
    let cannot_here = |source| Error::CannotRunHere {
        model: saved.name.clone(),
        backend: backend.kind(),
        source,
    };
    backend
        .hypervisor
        .check_cpu_model(saved)
        .map_err(cannot_here)?;
    // What the guest's user code may use beyond the model (docs/cpu-model.md, "User mode").
    backend
        .hypervisor
        .check_user_extra(header.user_extra)
        .map_err(cannot_here)?;
    if host_model && !same_host_cpu(&backend.cpu_model, saved) {
        return Err(cannot(format!(
            "this host's KVM offers CPU model {}; a host model restores only on an identical host",
            backend.cpu_model.name
        )));
    }
    Ok(backend)
}

/// Whether two host CPU models describe the same CPU: equal MSR lists and CPUID tables apart
/// from the fields `KVM_GET_SUPPORTED_CPUID` fills from the host CPU the VMM happened to run on
/// (initial APIC ID in CPUID.1:EBX\[31:24\], x2APIC ID in CPUID.0xB/0x1F:EDX). Their names carry
/// a digest that includes those fields, so two models of one host may differ in name only.
fn same_host_cpu(a: &hv::CpuModel, b: &hv::CpuModel) -> bool {
    fn per_cpu_masked(e: &hv::CpuidEntry) -> hv::CpuidEntry {
        let mut e = *e;
        match e.function {
            1 => e.ebx &= 0x00ff_ffff,
            0xb | 0x1f => e.edx = 0,
            _ => {}
        }
        e
    }
    a.msrs == b.msrs
        && a.cpuid.len() == b.cpuid.len()
        && a.cpuid
            .iter()
            .zip(&b.cpuid)
            .all(|(x, y)| per_cpu_masked(x) == per_cpu_masked(y))
}

/// CR4 bits the emu CPU does not implement (UMIP, LA57, PCIDE, SMEP, SMAP, PKE).
const EMU_ABSENT_CR4: u64 = (1 << 11) | (1 << 12) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 22);

/// XSAVE state components emu implements: x87, SSE, AVX.
const EMU_XCR0: u64 = 0x7;

/// Refuses vCPU states that use what the backend running guest kernel code lacks.
pub(crate) fn check_states(kind: BackendKind, vcpus: &[CpuState]) -> Result<()> {
    if kind != BackendKind::Emu {
        return Ok(());
    }
    for (id, s) in vcpus.iter().enumerate() {
        let refuse = |what: String| {
            Err(Error::Unsupported(format!(
                "vcpu {id} uses {what}, which backend emu does not have"
            )))
        };
        let cr4 = s.sregs.cr4 & EMU_ABSENT_CR4;
        if cr4 != 0 {
            return refuse(format!("CR4 bits {cr4:#x}"));
        }
        if s.xcr0 & !EMU_XCR0 != 0 {
            return refuse(format!("XCR0 {:#x}", s.xcr0));
        }
    }
    Ok(())
}

/// After [`Vmm::launch`] of a VM restored paused: waits until its vCPUs are parked, so the API
/// reports `paused` and a snapshot of it equals the one it came from.
fn settle(vmm: &Vmm) {
    let parts = vmm.parts();
    if parts.is_paused() && parts.control.pause(PARK_TIMEOUT).is_err() {
        tracing::warn!(target: hv::NOTICE, "anyvisor: the restored vcpus did not park in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emu_refuses_states_it_cannot_run() {
        let ok = CpuState::default();
        check_states(BackendKind::Emu, std::slice::from_ref(&ok)).unwrap();
        let mut smep = ok.clone();
        smep.sregs.cr4 |= 1 << 20;
        let mut avx = ok.clone();
        avx.xcr0 = 0x7;
        check_states(BackendKind::Emu, std::slice::from_ref(&avx)).unwrap();
        let mut avx512 = ok.clone();
        avx512.xcr0 = 0xe7;
        for s in [smep, avx512] {
            let e = check_states(BackendKind::Emu, &[ok.clone(), s.clone()]).unwrap_err();
            assert!(e.to_string().starts_with("vcpu 1 uses"), "{e}");
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
            check_states(BackendKind::Kvm, &[s]).unwrap();
        }
    }

    fn header_with(model: hv::CpuModel, choice: &str) -> Header {
        Header {
            cpu_model: model,
            memory_regions: vec![snapshot::MemoryRegion {
                guest_addr: 0,
                len: 1 << 20,
            }],
            vcpus: 1,
            backend: BackendKind::Kvm,
            tsc_khz: 1_000_000,
            created_unix: 1,
            config: serde_json::json!({
                "kernel": "/k", "initrd": null, "cmdline": "", "cpus": 1, "memory": 1 << 20,
                "backend": "kvm", "cpu_model": choice, "disks": [], "nets": [], "vsock": null,
                "rng": false, "serial": "null", "api_socket": null
            }),
            user_extra: Default::default(),
        }
    }

    fn runtime(backend: crate::config::BackendChoice) -> RuntimeOptions {
        RuntimeOptions {
            backend,
            serial: crate::config::SerialConfig::Null,
            api_socket: None,
            seccomp: Some(sandbox::SeccompMode::Off),
        }
    }

    fn open_error(header: &Header, backend: crate::config::BackendChoice) -> Error {
        match open_backend(header, &runtime(backend)) {
            Ok(_) => panic!("opened a backend for {}", header.cpu_model.name),
            Err(e) => e,
        }
    }

    #[test]
    fn host_model_never_restores_on_emu() {
        let mut host = hv::CpuModel::portable();
        host.name = "host:kvm:0123456789abcdef".into();
        let e = open_error(
            &header_with(host, "host"),
            crate::config::BackendChoice::Emu,
        );
        assert_eq!(
            e.to_string(),
            "cannot run this VM (CPU model host:kvm:0123456789abcdef) here: --cpu-model host \
             needs the kvm backend"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
    }

    #[test]
    fn host_models_differing_in_apic_ids_are_the_same_cpu() {
        let mut a = hv::CpuModel::portable();
        a.name = "host:kvm:1".into();
        a.cpuid.push(hv::CpuidEntry {
            function: 0xb,
            index: 0,
            indexed: true,
            eax: 1,
            ebx: 1,
            ecx: 0x100,
            edx: 0,
        });
        let mut b = a.clone();
        b.name = "host:kvm:2".into();
        for e in &mut b.cpuid {
            match e.function {
                1 => e.ebx |= 1 << 24,
                0xb => e.edx = 1,
                _ => {}
            }
        }
        assert!(same_host_cpu(&a, &b));
        let mut other = b.clone();
        if let Some(e) = other.cpuid.iter_mut().find(|e| e.function == 1) {
            e.ecx ^= 1;
        }
        assert!(!same_host_cpu(&a, &other));
        let mut fewer = b.clone();
        fewer.msrs.pop();
        assert!(!same_host_cpu(&a, &fewer));
        fewer = b;
        fewer.cpuid.pop();
        assert!(!same_host_cpu(&a, &fewer));
    }

    #[test]
    fn model_and_config_must_agree() {
        let mut host = hv::CpuModel::portable();
        host.name = "host:kvm:0123456789abcdef".into();
        for header in [
            header_with(host, "portable"),
            header_with(hv::CpuModel::portable(), "host"),
        ] {
            let e = open_error(&header, crate::config::BackendChoice::Emu);
            assert!(
                e.to_string().starts_with("the saved config's CPU model"),
                "{e}"
            );
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        }
    }

    #[test]
    fn emu_refuses_a_model_it_cannot_present() {
        let mut model = hv::CpuModel::portable();
        for e in &mut model.cpuid {
            if e.function == 7 {
                e.ebx |= 1 << 16; // AVX-512F
            }
        }
        let e = open_error(
            &header_with(model, "portable"),
            crate::config::BackendChoice::Emu,
        );
        // The `error:` line: the message and its cause.
        assert_eq!(
            crate::error::report(&e),
            "cannot run this VM (CPU model portable-v2) here: backend emu: emu does not \
             implement CPU features: avx512f"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
    }

    #[test]
    fn emu_refuses_a_vm_whose_user_code_saw_more_than_it_runs() {
        let mut header = header_with(hv::CpuModel::portable(), "portable");
        header.user_extra = [
            hv::cpu_model::Feature::Avx512f,
            hv::cpu_model::Feature::Avx512bw,
        ]
        .into_iter()
        .collect();
        let e = open_error(&header, crate::config::BackendChoice::Emu);
        // The `error:` line: the message and its cause.
        assert_eq!(
            crate::error::report(&e),
            "cannot run this VM (CPU model portable-v2) here: backend emu: guest user code has \
             seen CPU features emu does not implement: avx512f avx512bw"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        header.user_extra = [hv::cpu_model::Feature::Avx2].into_iter().collect();
        open_backend(&header, &runtime(crate::config::BackendChoice::Emu)).unwrap();
    }

    struct NoIrq;
    impl virtio::Interrupt for NoIrq {
        fn trigger(&self) {}
    }

    /// A transport state as a running rng device saves it.
    fn rng_state() -> virtio::MmioState {
        let memory = Arc::new(machine::memory::create_guest_memory(1 << 20).unwrap());
        let t = virtio::MmioTransport::new(
            Box::new(virtio::Rng::new().unwrap()),
            memory,
            Arc::new(NoIrq),
        )
        .unwrap();
        hv::MmioHandler::write(&t, 0x70, &1u32.to_le_bytes());
        t.save()
    }

    fn saved_vm(memory_len: u64) -> SavedVm {
        let mut platform = machine::PlatformState::default();
        platform.ioapic.redirection = vec![0x1_0000; 24];
        SavedVm {
            header: Header {
                cpu_model: hv::CpuModel::portable(),
                memory_regions: vec![snapshot::MemoryRegion {
                    guest_addr: 0,
                    len: memory_len,
                }],
                vcpus: 1,
                backend: BackendKind::Emu,
                tsc_khz: 1_000_000,
                created_unix: 1,
                config: serde_json::json!({"cpus": 1}),
                user_extra: Default::default(),
            },
            vcpus: vec![CpuState::default()],
            vm: hv::VmState::default(),
            devices: VmDevices {
                run: RunState {
                    paused: true,
                    seccomp: Some(sandbox::SeccompMode::Log),
                },
                platform,
                virtio: vec![rng_state(), rng_state()],
            },
        }
    }

    /// `--seccomp` wins; without it the VM keeps the mode it ran with; without either, the
    /// default.
    #[test]
    fn seccomp_mode_of_a_restored_vm() {
        use sandbox::SeccompMode::{Log, Off, On};
        let header = header_with(hv::CpuModel::portable(), "portable");
        let mut rt = runtime(crate::config::BackendChoice::Emu);
        for (given, saved, expected) in [
            (None, Some(Off), Off),
            (None, Some(Log), Log),
            (None, None, On),
            (Some(On), Some(Off), On),
            (Some(Off), None, Off),
        ] {
            rt.seccomp = given;
            let config = config_of(&header, &rt, saved).unwrap();
            assert_eq!(config.seccomp, expected, "{given:?} {saved:?}");
        }
    }

    #[test]
    fn saved_vm_round_trips_through_json() {
        let saved = saved_vm(1 << 20);
        let bytes = serde_json::to_vec(&saved).unwrap();
        let back: SavedVm = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, saved);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let names: Vec<&str> = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[0].as_str().unwrap())
            .collect();
        assert_eq!(names, ["vmm", "platform", "virtio-0", "virtio-1"]);
        assert_eq!(
            v["devices"][0][1],
            serde_json::json!({"paused": true, "seccomp": "log"})
        );
    }

    /// A final state (or snapshot contents) as the VMM wrote it before device state was typed,
    /// written out by hand in that shape: named records, the run state without a seccomp mode.
    /// It decodes (the mode absent: the default applies) and encodes back to the same JSON.
    #[test]
    fn untyped_records_from_before_decode_and_encode_identically() {
        let typed = saved_vm(1 << 20);
        let platform = serde_json::to_value(&typed.devices.platform).unwrap();
        let virtio0 = serde_json::to_value(&typed.devices.virtio[0]).unwrap();
        let old = serde_json::json!({
            "header": serde_json::to_value(&typed.header).unwrap(),
            "vcpus": serde_json::to_value(&typed.vcpus).unwrap(),
            "vm": serde_json::to_value(typed.vm).unwrap(),
            "devices": [["vmm", {"paused": false}], ["platform", platform], ["virtio-0", virtio0]],
        });
        let saved: SavedVm = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(saved.devices.run, RunState::default());
        assert_eq!(saved.devices.virtio, typed.devices.virtio[..1]);
        assert_eq!(serde_json::to_value(&saved).unwrap(), old);
    }

    #[test]
    fn device_records_are_checked() {
        use snapshot::DeviceSet;
        let good = saved_vm(1 << 20).devices.to_records().unwrap();
        let without = |name: &str| -> DeviceRecords {
            good.iter().filter(|(n, _)| n != name).cloned().collect()
        };
        // No run state: running, default seccomp mode.
        let d = VmDevices::from_records(without("vmm")).unwrap();
        assert_eq!(d.run, RunState::default());
        let e = VmDevices::from_records(without("platform")).unwrap_err();
        assert!(matches!(e, DeviceStateError::NoPlatform), "{e}");
        // A gap in the slots, a name nobody writes, a second platform: refused by name.
        for (records, name) in [
            (without("virtio-0"), "virtio-1"),
            (
                [good.clone(), vec![("gpu".into(), serde_json::json!({}))]].concat(),
                "gpu",
            ),
            (
                [good.clone(), without("vmm")[..1].to_vec()].concat(),
                "platform",
            ),
        ] {
            match VmDevices::from_records(records) {
                Err(DeviceStateError::Unexpected(n)) => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut bad = good.clone();
        bad[1].1 = serde_json::json!({"serial": 1});
        let e = VmDevices::from_records(bad).unwrap_err();
        assert_eq!(
            crate::error::report(&e).split(':').next(),
            Some("device 'platform'")
        );
        let mut bad = good;
        bad[0].1 = serde_json::json!({"paused": false, "seccomp": "sometimes"});
        assert!(VmDevices::from_records(bad).is_err());
    }

    /// The typed states go through a snapshot file as the format's named device sections and
    /// come back equal.
    #[test]
    fn typed_states_through_a_snapshot_file() {
        let memory = machine::memory::create_guest_memory(2 << 20).unwrap();
        let mut saved = saved_vm(2 << 20);
        saved.header.memory_regions = snapshot::memory_regions_of(&memory);
        let dir = std::env::temp_dir().join(format!("anyvisor-vmm-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        SnapshotWriter::write(&path, &saved, &memory).unwrap();
        let reader = SnapshotReader::open(&path).unwrap();
        assert_eq!(
            reader.info()["devices"],
            serde_json::json!(["vmm", "platform", "virtio-0", "virtio-1"])
        );
        let back: SavedVm = reader.into_contents().decode_devices().unwrap();
        assert_eq!(back, saved);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
