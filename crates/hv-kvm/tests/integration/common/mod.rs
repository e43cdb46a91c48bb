//! A tiny 64-bit guest for tests: the shared tiny-guest kit (`testkit`) on KVM, with
//! identity-mapped long mode set up through `set_state`, a GDT (null, code 0x08, data 0x10, TSS
//! 0x18, user code 0x28, user data 0x30), an IDT without handlers (tests install theirs with
//! [`Guest::set_idt_gate`]), and the kit's `Recorder` as the `DeviceIo`: it records accesses and
//! stops the vCPU when the guest writes to [`DONE_PORT`].

#![allow(dead_code)]

use hv::CpuModel;
use hv_kvm::KvmHypervisor;
use iced_x86::code_asm::{CodeAssembler, IcedError, al};
use testkit::{LongMode, VmSpec};

pub use testkit::{Access, CODE, DATA, IN_VALUE, MMIO, PML4, Recorder};

pub const RAM_SIZE: u64 = 2 << 20;
pub const STACK_TOP: u64 = 0x9000;
pub const DONE_PORT: u16 = 0xf4;

/// Assembles 64-bit code placed at `ip`.
pub fn asm(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    testkit::asm(64, ip, f)
}

/// `out DONE_PORT, al` then spin: the test's DeviceIo kicks the vCPU on the write.
pub fn done(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.out(u32::from(DONE_PORT), al)?;
    testkit::spin(a)
}

/// The backend, or `None` (after printing the SKIP line) when /dev/kvm cannot be opened.
pub fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::open(None) {
        Ok(h) => Some(h),
        Err(hv::Error::Unavailable { .. }) => {
            println!("SKIP: no /dev/kvm");
            None
        }
        Err(e) => panic!("opening KVM: {e}"),
    }
}

const GDT_ENTRIES: [u64; 7] = [
    0,
    testkit::CODE64,
    testkit::DATA32,
    testkit::tss_entry(0),
    0,
    testkit::USER_CODE64,
    testkit::USER_DATA,
];

const LAYOUT: testkit::Layout = testkit::Layout {
    mem_bytes: RAM_SIZE as usize,
    mode: LongMode::new(7, (0x18, 0), STACK_TOP),
    user_pages: false,
    pd_4g: None,
    gdt: &GDT_ENTRIES,
    rsp0: None,
    stubs: None,
};

testkit::guest_type!(
    /// The kit's guest on KVM (fields `vm`, `vcpu`, `mem`, `io` through `Deref`).
    Guest
);

impl Guest {
    pub fn new(h: &KvmHypervisor, model: CpuModel) -> Guest {
        let spec = VmSpec {
            cpu_model: model,
            ..VmSpec::default()
        };
        let io = Recorder::stopping_at(DONE_PORT);
        Guest(testkit::Guest::create(h, LAYOUT, spec, io).unwrap())
    }

    /// Maps 3..4 GiB with 2 MiB pages (uncached) so the local APIC page at 0xfee0_0000 is
    /// reachable.
    pub fn map_apic_window(&self) {
        testkit::map_4th_gib(&self.mem, PML4, testkit::PD_4G, false).unwrap();
    }

    /// Loads `code` at [`CODE`] and puts the vCPU in 64-bit mode at its start.
    pub fn load(&mut self, code: &[u8]) {
        self.0.load(code).unwrap();
    }

    /// Runs until the guest writes to [`DONE_PORT`] (or another exit).
    pub fn run(&mut self) -> hv::Result<hv::VcpuExit> {
        self.0.run_once()
    }

    /// Like [`Guest::load`], but the program runs at CPL 3 (user pages, IOPL 3 for port I/O).
    pub fn load_user(&mut self, code: &[u8]) {
        testkit::identity_map(&self.mem, PML4, true).unwrap();
        self.0.load_user(code, 0x2b, 0x33).unwrap();
    }

    pub fn set_idt_gate(&self, vector: u64, handler: u64) {
        self.0
            .set_gate(u8::try_from(vector).unwrap(), handler)
            .unwrap();
    }
}
