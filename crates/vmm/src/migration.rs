//! Live migration: `PUT /vm/migrate` (source) and `anyvisor run --incoming` (destination).
//!
//! Not implemented yet: each entry point fails cleanly (exit 2 / HTTP 501). See
//! [`crate::snapshot`] for what a running VM offers ([`VmParts`]) and how a received VM is
//! started ([`Vmm::launch`]).

use std::path::Path;

use crate::api::{ApiError, MigrateRequest};
use crate::config::RuntimeOptions;
use crate::error::{Error, Result};
use crate::vm::{VmParts, Vmm};

/// `PUT /vm/migrate`: returns `{"total_ms":..,"downtime_ms":..,"bytes":..}`.
pub fn send(
    _vm: &VmParts,
    _req: MigrateRequest,
) -> std::result::Result<serde_json::Value, ApiError> {
    Err(ApiError::new(501, "migrate is not supported yet"))
}

/// `anyvisor run --incoming ADDR`: waits for one migration and returns the arrived VM.
pub fn receive(_from: &str, _key: Option<&Path>, _runtime: &RuntimeOptions) -> Result<Vmm> {
    Err(Error::NotSupported("--incoming"))
}
