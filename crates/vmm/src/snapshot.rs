//! Snapshots: `PUT /vm/snapshot`, `anyvisor run --restore` and `anyvisor snapshot-info`.
//!
//! What a snapshot holds (see `docs/snapshot-format.md` for the file): the header (CPU model,
//! memory regions, vCPU count, backend, TSC frequency, and the [`VmConfig`] as JSON so a restore
//! rebuilds the same devices), every vCPU's [`hv::CpuState`], the VM's [`hv::VmState`]
//! (kvm-clock), and named device states:
//! * `vmm`: [`RunState`] (whether the VM was paused when the snapshot was taken);
//! * `platform`: [`machine::PlatformState`] (serial, IOAPIC, i8042);
//! * `virtio-N`: the [`virtio::MmioState`] of the device in slot `N`.
//!
//! The same data without RAM is a live migration's final state ([`SavedVm`]), and restoring
//! either goes through [`rebuild`]: compatibility checks first, then the VM is built around the
//! arrived memory and started with [`Vmm::launch`].

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use hv::{BackendKind, CpuState};
use serde::{Deserialize, Serialize};
use snapshot::{Header, SnapshotContents, SnapshotReader, SnapshotWriter, WriteOptions};

use crate::api::{ApiError, SnapshotRequest};
use crate::backend::Backend;
use crate::config::{CpuModelChoice, RuntimeOptions, VmConfig};
use crate::control::Control;
use crate::error::{Error, Result};
use crate::vm::{VmParts, Vmm};

/// Device-state name of the VMM's own run state.
const RUN_STATE: &str = "vmm";
/// Device-state name of the platform devices.
const PLATFORM: &str = "platform";
/// How long restoring a paused VM waits for its fresh vCPU threads to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The VMM's own state in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// The VM was paused through the API when the snapshot was taken: it restores paused.
    pub paused: bool,
}

/// Everything about a paused VM except its RAM: a snapshot's metadata, and the final state a
/// live migration sends (as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedVm {
    pub header: Header,
    pub vcpus: Vec<CpuState>,
    pub vm: hv::VmState,
    pub devices: Vec<(String, serde_json::Value)>,
}

impl From<SnapshotContents> for SavedVm {
    fn from(c: SnapshotContents) -> Self {
        SavedVm {
            header: c.header,
            vcpus: c.vcpus,
            vm: c.vm,
            devices: c.devices,
        }
    }
}

impl From<SavedVm> for SnapshotContents {
    fn from(s: SavedVm) -> Self {
        SnapshotContents {
            header: s.header,
            vcpus: s.vcpus,
            vm: s.vm,
            devices: s.devices,
        }
    }
}

/// One snapshot or migration at a time per VM.
static BUSY: Mutex<()> = Mutex::new(());

/// Takes the VM's snapshot/migration slot, or answers 409.
pub(crate) fn exclusive() -> std::result::Result<MutexGuard<'static, ()>, ApiError> {
    match BUSY.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(ApiError::new(
            409,
            "a snapshot or migration is already in progress",
        )),
    }
}

fn to_json<T: Serialize>(what: &str, v: &T) -> std::result::Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode {what}: {e}"))
}

/// The header describing `vm` (also a migration's description).
pub(crate) fn header_of(vm: &VmParts) -> std::result::Result<Header, String> {
    Ok(Header {
        cpu_model: vm.cpu_model.clone(),
        memory_regions: snapshot::memory_regions_of(&vm.memory),
        vcpus: vm.config.cpus,
        backend: vm.backend,
        tsc_khz: vm.vm.tsc_khz(),
        created_unix: snapshot::now_unix(),
        config: to_json("the config", &vm.config)?,
        user_extra: vm
            .vm
            .state()
            .map_err(|e| format!("cannot read the vm state: {}", crate::error::report(&e)))?
            .user_extra,
    })
}

/// Collects every state of a paused VM.
pub(crate) fn capture(vm: &VmParts, run: RunState) -> std::result::Result<SavedVm, String> {
    let mut vcpus = Vec::with_capacity(vm.vcpus.len());
    for (id, vcpu) in vm.vcpus.iter().enumerate() {
        let state = vcpu
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state()
            .map_err(|e| {
                format!(
                    "cannot read the state of vcpu {id}: {}",
                    crate::error::report(&e)
                )
            })?;
        vcpus.push(state);
    }
    let vm_state = vm
        .vm
        .state()
        .map_err(|e| format!("cannot read the vm state: {}", crate::error::report(&e)))?;
    let mut devices = vec![
        (RUN_STATE.to_string(), to_json("the run state", &run)?),
        (
            PLATFORM.to_string(),
            to_json("the platform state", &vm.platform.state())?,
        ),
    ];
    for (slot, d) in vm.virtio.iter().enumerate() {
        let saved = d.transport.save();
        devices.push((format!("virtio-{slot}"), to_json(d.kind, &saved)?));
    }
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
    let _busy = exclusive()?;
    let was_paused = vm.is_paused();
    vm.pause()?;
    let written = capture(vm, RunState { paused: was_paused })
        .map_err(|e| ApiError::new(500, e))
        .and_then(|saved| {
            let options = WriteOptions {
                overwrite: req.overwrite,
                cancelled: Some(cancelled),
            };
            SnapshotWriter::write_with(&req.output, &saved.into(), &vm.memory, &options).map_err(
                |e| {
                    let status = match e {
                        snapshot::Error::OutputNotRegular { .. }
                        | snapshot::Error::OutputExists { .. } => 400,
                        snapshot::Error::Cancelled(_) => 409,
                        _ => 500,
                    };
                    ApiError::new(
                        status,
                        format!("snapshot failed: {}", crate::error::report(&e)),
                    )
                },
            )
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
        other => Error::BadFile {
            path: path.to_path_buf(),
            reason: crate::error::report(&other),
        },
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
    let parts = rebuild(reader.into_contents().into(), memory, backend, runtime)?;
    crate::exit::stop_if_signalled()?;
    let vmm = Vmm::launch(parts)?;
    settle(&vmm);
    let _ = RESTORE_TIME.set(start.elapsed());
    Ok(vmm)
}

/// How long this process's `--restore` took, from opening the file to the vCPU threads
/// started (the part a VMM controls; process start-up comes before it), for `GET /vm`.
static RESTORE_TIME: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// [`RESTORE_TIME`] in milliseconds, if this process restored a snapshot.
pub(crate) fn restore_ms() -> Option<f64> {
    RESTORE_TIME.get().map(|d| d.as_secs_f64() * 1000.0)
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

/// The config recorded in `header`, with this process's serial, API socket and backend choice.
pub(crate) fn config_of(header: &Header, runtime: &RuntimeOptions) -> Result<VmConfig> {
    let mut config: VmConfig = serde_json::from_value(header.config.clone())
        .map_err(|e| Error::Setup(format!("the saved VM config is malformed: {e}")))?;
    if config.cpus != header.vcpus {
        return Err(Error::Setup(format!(
            "the saved config has {} vcpus, the header {}",
            config.cpus, header.vcpus
        )));
    }
    if config.memory != header.memory_size() {
        return Err(Error::Setup(format!(
            "the saved config has {} bytes of memory, the header {}",
            config.memory,
            header.memory_size()
        )));
    }
    config.serial = runtime.serial.clone();
    config.api_socket = runtime.api_socket.clone();
    config.backend = runtime.backend;
    Ok(config)
}

/// Names of host CPU models start with this (`host:<backend>:<digest>`).
const HOST_MODEL_PREFIX: &str = "host:";

/// Opens the backend `runtime` asks for and checks it can present the saved CPU model, before
/// anything runs. A host model (`--cpu-model host`) restores only where the backend builds the
/// very same model (same name, which carries the digest of the host's CPUID table), so never on
/// emu and never on a different host.
pub(crate) fn open_backend(header: &Header, runtime: &RuntimeOptions) -> Result<Backend> {
    let config = config_of(header, runtime)?;
    let saved = &header.cpu_model;
    let host_model = saved.name.starts_with(HOST_MODEL_PREFIX);
    if host_model != (config.cpu_model == CpuModelChoice::Host) {
        return Err(Error::Setup(format!(
            "the saved config's CPU model choice does not match the header's model {}",
            saved.name
        )));
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
    backend.hypervisor.check_cpu_model(saved).map_err(|e| {
        cannot(format!(
            "backend {}: {}",
            backend.kind(),
            crate::error::report(&e)
        ))
    })?;
    // What the guest's user code may use beyond the model (docs/cpu-model.md, "User mode").
    backend
        .hypervisor
        .check_user_extra(header.user_extra)
        .map_err(|e| {
            cannot(format!(
                "backend {}: {}",
                backend.kind(),
                crate::error::report(&e)
            ))
        })?;
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

/// Builds a VM from saved state around `memory` (already holding the guest's RAM) on `backend`
/// and returns its parts, ready for [`Vmm::launch`]. vCPUs do not run before launch; a VM saved
/// while paused stays paused.
pub(crate) fn rebuild(
    saved: SavedVm,
    memory: hv::GuestMemory,
    backend: Backend,
    runtime: &RuntimeOptions,
) -> Result<Arc<VmParts>> {
    let bad = |what: String| Error::Setup(format!("the saved VM state is malformed: {what}"));
    let config = config_of(&saved.header, runtime)?;
    let regions = snapshot::memory_regions_of(&memory);
    if regions != saved.header.memory_regions {
        return Err(bad("memory layout differs from the header".into()));
    }
    if saved.vcpus.len() != config.cpus as usize {
        return Err(bad(format!(
            "{} vcpu states for {} vcpus",
            saved.vcpus.len(),
            config.cpus
        )));
    }
    let mut run = None;
    let mut platform_state = None;
    let mut virtio_states = Vec::new();
    for (name, value) in &saved.devices {
        let parse_err = |e: serde_json::Error| bad(format!("device '{name}': {e}"));
        if name == RUN_STATE {
            run = Some(RunState::deserialize(value).map_err(parse_err)?);
        } else if name == PLATFORM {
            platform_state = Some(machine::PlatformState::deserialize(value).map_err(parse_err)?);
        } else if name.strip_prefix("virtio-") == Some(&virtio_states.len().to_string()) {
            virtio_states.push(virtio::MmioState::deserialize(value).map_err(parse_err)?);
        } else {
            return Err(bad(format!("unexpected device '{name}'")));
        }
    }
    let platform_state = platform_state.ok_or_else(|| bad("no platform state".into()))?;
    let run = run.unwrap_or_default();

    let control = Arc::new(Control::new(config.cpus));
    let platform = crate::vm::new_platform(&config.serial, &control)?;
    let memory = Arc::new(memory);
    let vm = backend.hypervisor.create_vm(hv::VmConfig {
        memory: memory.clone(),
        cpu_model: saved.header.cpu_model.clone(),
        vcpus: config.cpus,
        tsc_khz: Some(saved.header.tsc_khz),
    })?;
    vm.set_state(&saved.vm)?;
    let mut vcpus = Vec::with_capacity(saved.vcpus.len());
    let mut kickers = Vec::with_capacity(saved.vcpus.len());
    for (id, state) in (0..config.cpus).zip(&saved.vcpus) {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_state(state)?;
        kickers.push(vcpu.kicker());
        vcpus.push(Arc::new(Mutex::new(vcpu)));
    }
    control.set_kickers(kickers);
    platform.attach_vm(vm.clone());
    platform
        .restore(&platform_state)
        .map_err(|e| bad(format!("platform: {}", crate::error::report(&e))))?;
    let virtio =
        crate::devices::create_restoring(&config, &memory, &platform, Some(&virtio_states))?;
    if run.paused {
        // Only records the pause: no vCPU thread runs yet, so none can park before the
        // timeout. The threads park on their first `before_run`; the caller waits for that.
        let _ = control.pause(Duration::ZERO);
    }
    Ok(Arc::new(VmParts {
        backend: backend.kind(),
        cpu_model: saved.header.cpu_model,
        memory,
        vm,
        platform: Arc::new(platform),
        virtio,
        vcpus,
        control,
        config,
    }))
}

/// After [`Vmm::launch`] of a VM restored paused: waits until its vCPUs are parked, so the API
/// reports `paused` and a snapshot of it equals the one it came from.
pub(crate) fn settle(vmm: &Vmm) {
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
            seccomp: sandbox::SeccompMode::Off,
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
        assert_eq!(
            e.to_string(),
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
        assert_eq!(
            e.to_string(),
            "cannot run this VM (CPU model portable-v2) here: backend emu: guest user code has \
             seen CPU features emu does not implement: avx512f avx512bw"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        header.user_extra = [hv::cpu_model::Feature::Avx2].into_iter().collect();
        open_backend(&header, &runtime(crate::config::BackendChoice::Emu)).unwrap();
    }

    #[test]
    fn saved_vm_round_trips_through_json() {
        let saved = SavedVm {
            header: Header {
                cpu_model: hv::CpuModel::portable(),
                memory_regions: vec![snapshot::MemoryRegion {
                    guest_addr: 0,
                    len: 1 << 20,
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
            devices: vec![("vmm".into(), serde_json::json!({"paused": true}))],
        };
        let bytes = serde_json::to_vec(&saved).unwrap();
        let back: SavedVm = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, saved);
    }
}
