//! Snapshots: `PUT /vm/snapshot`, `anyvisor run --restore` and `anyvisor snapshot-info`.
//!
//! Not implemented yet: each entry point fails cleanly (exit 2 / HTTP 501). What they get:
//! [`VmParts`] holds the config, backend, CPU model, memory, VM, platform, virtio devices and
//! vCPUs; [`VmParts::pause`] parks every vCPU on an instruction boundary, after which locking a
//! vCPU gives its state; [`VmParts::hand_off`] ends the process with status 0. A restore builds a
//! `VmParts` (platform through [`crate::vm::new_platform`]) and starts it with
//! [`Vmm::launch`].

use std::path::Path;

use crate::api::{ApiError, SnapshotRequest};
use crate::config::RuntimeOptions;
use crate::error::{Error, Result};
use crate::vm::{VmParts, Vmm};

/// `PUT /vm/snapshot`.
pub fn take(_vm: &VmParts, _req: SnapshotRequest) -> std::result::Result<(), ApiError> {
    Err(ApiError::new(501, "snapshot is not supported yet"))
}

/// `anyvisor run --restore FILE`.
pub fn restore(_snapshot: &Path, _runtime: &RuntimeOptions) -> Result<Vmm> {
    Err(Error::NotSupported("--restore"))
}

/// `anyvisor snapshot-info FILE`: what a snapshot file holds, as JSON.
pub fn info(_path: &Path) -> Result<serde_json::Value> {
    Err(Error::NotSupported("snapshot-info"))
}
