//! The VMM: turns a [`config::VmConfig`] into a running VM on a chosen backend, runs it to
//! completion, and serves the control API.
//!
//! Entry points: [`run`] (what `anyvisor run` does), [`vm::Vmm::start`] / [`vm::Vmm::wait`]
//! (boot and run a VM), [`api::client::call`] (the control commands). Every failure is an
//! [`Error`]; [`Error::exit_code`] is the one mapping to process exit codes.

pub mod api;
pub mod backend;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod diskboot;
pub mod error;
pub mod exit;
/// Fuzz entry points: only in fuzzing builds (`--features fuzzing`, as `fuzz/Cargo.toml` sets)
/// and this crate's own tests; production builds do not carry them.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod migration;
pub mod serial;
pub mod snapshot;
pub mod test_hooks;
pub mod vm;

pub use config::{RunOptions, RunRequest, VmConfig};
pub use error::{Error, Result};
pub use vm::{ExitReason, Vmm, run};
