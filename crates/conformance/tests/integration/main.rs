//! The conformance suite: each test body runs on KVM (the CPU is the oracle) and on emu, and the
//! differential random-block tester compares them. One test binary (one link);
//! `cargo test -p conformance --release --test integration x87::` runs one area.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod alu;
mod avx;
mod cpuid;
mod differential;
mod edges;
mod ext;
mod harness;
mod interrupts;
mod mmx;
mod msr;
mod muldiv;
mod paging;
mod sse;
mod strings;
mod user;
mod x87;
