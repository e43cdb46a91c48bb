//! Integration tests of the KVM backend with tiny guests: one test binary (one link);
//! `cargo test -p hv-kvm --release --test integration kvm::` runs one area.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod fast_paths;
mod kvm;
mod platform;
mod user_accel;
