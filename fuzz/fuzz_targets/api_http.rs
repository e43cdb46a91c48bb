//! Parses arbitrary bytes as an API request, routes it to a VM that answers every call, and
//! writes the response. Must never panic or allocate without bound.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vmm::api::http::read_request;
use vmm::api::{ApiError, MigrateRequest, ShutdownRequest, SnapshotRequest, VmControl, route};

struct Vm;

impl VmControl for Vm {
    fn info(&self) -> serde_json::Value {
        serde_json::json!({"state": "running"})
    }
    fn pause(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        Err(ApiError::new(409, "not paused"))
    }
    fn shutdown(&self, _: ShutdownRequest) -> Result<(), ApiError> {
        Ok(())
    }
    fn snapshot(&self, _: SnapshotRequest) -> Result<(), ApiError> {
        Ok(())
    }
    fn migrate(&self, _: MigrateRequest) -> Result<serde_json::Value, ApiError> {
        Ok(serde_json::json!({}))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = Cursor::new(data);
    if let Ok(req) = read_request(&mut stream) {
        let resp = route(&Vm, &req);
        let mut out = Vec::new();
        let _ = resp.write_to(&mut out);
    }
});
