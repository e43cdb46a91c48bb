//! Integration tests of emu, the software x86-64 CPU: one test binary (one link) for every area;
//! `cargo test -p hv-emu --release --test integration sse::` runs one.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod alu;
mod avx;
mod cpl_split;
mod cpuid;
mod emulator;
mod ext;
mod fuzz;
mod interrupts;
mod mmx;
mod modes;
mod paging;
mod smc;
mod sse;
mod strings;
mod user_accel;
mod x87;
