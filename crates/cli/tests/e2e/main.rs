//! End-to-end tests of the `anyvisor` binary with the real guest kit, one test binary (one link)
//! for all of them; each module is one area (boot, devices, snapshot, migration, ...). Run one area
//! with `cargo test -p cli --release --test e2e boot::`. What a host cannot run is reported as
//! ignored, with the reason (`build.rs`).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod disk_image;
mod migrate_support;
mod persist_harness;

mod boot;
mod bootdisk;
mod cli_errors;
mod devices;
mod distro;
mod dma;
mod engines;
mod import;
mod migrate;
mod migrate_faults;
mod outputs;
mod seccomp;
mod shutdown;
mod snapshot;
