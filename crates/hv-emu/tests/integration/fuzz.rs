//! Random instruction bytes (seeded) must never panic the emulator: every run ends in an exit
//! or an `Unhandled` error.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_bytes_do_not_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..300 {
        let mut code = vec![0u8; 256];
        for c in code.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        let mut g = long_mode_guest(&emu(), &code);
        // Random registers, IF on half of the runs.
        let mut st = g.state();
        for r in 0..16 {
            st.regs.set_gpr(r, rng.next() % (MEM as u64 * 2));
        }
        st.regs.rsp = STACK;
        if rng.next() & 1 == 1 {
            st.regs.rflags |= 0x200;
        }
        g.set_state(&st);
        let stop = Arc::new(AtomicBool::new(false));
        let kicker = g.vcpu.kicker();
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            while !s2.load(Ordering::Acquire) {
                kicker.kick();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        let r = g.try_run();
        stop.store(true, Ordering::Release);
        t.join().unwrap();
        let key = match r {
            Ok(x) => format!("{x:?}"),
            Err(hv::Error::Unhandled(_)) => "unhandled".into(),
            Err(e) => panic!("unexpected error kind: {e}"),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    // The suite must exercise something: several different outcomes.
    assert!(outcomes.len() >= 2, "{outcomes:?}");
}
