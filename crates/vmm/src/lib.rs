//! The VMM: turns a [`config::VmConfig`] into a running VM on a chosen backend, runs it to
//! completion, and serves the control API.

pub mod api;
pub mod config;
pub mod control;
pub mod error;
pub mod exit;
pub mod serial;

pub use config::{RunOptions, RunRequest, VmConfig};
pub use error::{Error, Result};
