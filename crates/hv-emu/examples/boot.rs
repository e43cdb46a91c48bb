//! Boots the test guest's vmlinux on the emu backend with a minimal platform of its own
//! (16550 UART on 0x3f8 via vm-superio, an IOAPIC, an MP table), printing the serial console.
//!
//! Usage: `cargo run --release -p hv-emu --example boot -- [--cpus N] [--mem MiB]
//!         [--kernel PATH] [--initrd PATH] [--until TEXT] [--timeout SECS] [-- extra cmdline]`
//!
//! Exits 0 when the console prints `--until` (default `ANYVISOR-INIT-OK`), 1 otherwise. It
//! reports the time taken and the emulated instruction rate.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hv::{CpuState, DeviceIo, Hypervisor, Segment, Vm, VmConfig};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::Elf;
use vm_memory::{Bytes, GuestAddress};

const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;
const PML4: u64 = 0x9000;
const GDT: u64 = 0x500;
const ACPI: u64 = 0xe0000;
const IOAPIC: u64 = 0xfec0_0000;

struct Ioapic {
    sel: u32,
    redir: [u64; 24],
}

struct Platform {
    serial: Mutex<vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, Console>>,
    ioapic: Arc<Mutex<Ioapic>>,
}

/// Raises IOAPIC pin 4 as an MSI to the emu local APICs.
struct IrqLine {
    ioapic: Arc<Mutex<Ioapic>>,
    vm: Arc<OnceLock<Arc<dyn Vm>>>,
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        let e = self.ioapic.lock().map(|a| a.redir[4]).unwrap_or(1 << 16);
        if e & (1 << 16) != 0 {
            return Ok(());
        }
        if let Some(vm) = self.vm.get() {
            let dest = (e >> 56) & 0xff;
            let logical = (e >> 11) & 1;
            let addr = 0xfee0_0000 | (dest << 12) | (logical << 2);
            let data = (e & 0x7ff) as u32;
            let _ = vm.signal_msi(addr, data);
        }
        Ok(())
    }
}

struct Console {
    seen: Arc<Mutex<String>>,
}

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write_all(b)?;
        std::io::stdout().flush()?;
        if let Ok(mut s) = self.seen.lock() {
            s.push_str(&String::from_utf8_lossy(b));
            if s.len() > 1 << 20 {
                let cut = s.len() - 4096;
                s.drain(..cut);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DeviceIo for Platform {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if (0x3f8..0x400).contains(&port)
            && let Ok(mut s) = self.serial.lock()
        {
            data[0] = s.read((port - 0x3f8) as u8);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if (0x3f8..0x400).contains(&port)
            && let Ok(mut s) = self.serial.lock()
        {
            let _ = s.write((port - 0x3f8) as u8, data[0]);
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        if (IOAPIC..IOAPIC + 0x20).contains(&addr) {
            let Ok(a) = self.ioapic.lock() else { return };
            let v: u32 = if addr == IOAPIC {
                a.sel
            } else {
                match a.sel {
                    0 => 0,
                    1 => 0x0017_0011,
                    2 => 0,
                    r @ 0x10..=0x3f => {
                        let e = a.redir[((r - 0x10) / 2) as usize];
                        if r & 1 == 0 {
                            e as u32
                        } else {
                            (e >> 32) as u32
                        }
                    }
                    _ => 0,
                }
            };
            let b = v.to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&b[..n]);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if (IOAPIC..IOAPIC + 0x20).contains(&addr) {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            let v = u32::from_le_bytes(b);
            let Ok(mut a) = self.ioapic.lock() else {
                return;
            };
            if addr == IOAPIC {
                a.sel = v;
            } else if let r @ 0x10..=0x3f = a.sel {
                let e = &mut a.redir[((r - 0x10) / 2) as usize];
                if r & 1 == 0 {
                    *e = (*e & !0xffff_ffff) | u64::from(v);
                } else {
                    *e = (*e & 0xffff_ffff) | (u64::from(v) << 32);
                }
            }
        }
    }
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

fn sdt(sig: &[u8; 4], rev: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 36];
    t[0..4].copy_from_slice(sig);
    t[4..8].copy_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t[8] = rev;
    t[10..16].copy_from_slice(b"ANYVSR");
    t[16..24].copy_from_slice(b"EMUBOOT ");
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(b"ANYV");
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// RSDP at `ACPI`, then XSDT and MADT (local APICs, IOAPIC, IRQ0 -> GSI 2 override).
fn acpi_tables(cpus: u32) -> Vec<u8> {
    let mut madt = Vec::new();
    madt.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
    madt.extend_from_slice(&0u32.to_le_bytes());
    for id in 0..cpus {
        madt.extend_from_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    let mut io = vec![1, 12, cpus as u8, 0];
    io.extend_from_slice(&(IOAPIC as u32).to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    madt.extend_from_slice(&io);
    madt.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    madt.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    let madt = sdt(b"APIC", 3, &madt);
    let xsdt_addr = ACPI + 64;
    let madt_addr = ACPI + 128;
    let xsdt = sdt(b"XSDT", 1, &madt_addr.to_le_bytes());
    let mut rsdp = vec![0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(b"ANYVSR");
    rsdp[15] = 2;
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    let mut out = vec![0u8; 128 + madt.len()];
    out[..36].copy_from_slice(&rsdp);
    out[64..64 + xsdt.len()].copy_from_slice(&xsdt);
    out[128..].copy_from_slice(&madt);
    out
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut cpus = 1u32;
    let mut mem_mib = 256u64;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest/out");
    let mut kernel = format!("{root}/vmlinux");
    let mut initrd = format!("{root}/initramfs.cpio.gz");
    let mut until = "ANYVISOR-INIT-OK".to_string();
    let mut timeout = 600u64;
    let mut extra = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--cpus" => cpus = val()?.parse().map_err(|_| "bad --cpus")?,
            "--mem" => mem_mib = val()?.parse().map_err(|_| "bad --mem")?,
            "--kernel" => kernel = val()?,
            "--initrd" => initrd = val()?,
            "--until" => until = val()?,
            "--timeout" => timeout = val()?.parse().map_err(|_| "bad --timeout")?,
            "--" => extra.extend(args.by_ref()),
            _ => extra.push(a),
        }
    }
    let mem_size = mem_mib << 20;
    let mem = Arc::new(
        hv::GuestMemory::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .map_err(|e| format!("memory: {e}"))?,
    );
    let mut f = std::fs::File::open(&kernel).map_err(|e| format!("{kernel}: {e}"))?;
    let loaded = Elf::load(mem.as_ref(), None, &mut f, Some(GuestAddress(0x100000)))
        .map_err(|e| format!("loading {kernel}: {e:?}"))?;
    let entry = loaded.kernel_load.0;
    let rd = std::fs::read(&initrd).map_err(|e| format!("{initrd}: {e}"))?;
    let rd_addr = (mem_size - rd.len() as u64 - 0x10_0000) & !0xfff;
    mem.write_slice(&rd, GuestAddress(rd_addr))
        .map_err(|e| format!("initrd: {e}"))?;

    let mut cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 no_timer_check panic=-1 \
                       reboot=t tsc=reliable"
        .to_string();
    for e in &extra {
        cmdline.push(' ');
        cmdline.push_str(e);
    }
    let mut cb = cmdline.clone().into_bytes();
    cb.push(0);
    mem.write_slice(&cb, GuestAddress(CMDLINE))
        .map_err(|e| e.to_string())?;

    // Zero page.
    let mut zp = vec![0u8; 4096];
    let put = |zp: &mut Vec<u8>, off: usize, v: &[u8]| zp[off..off + v.len()].copy_from_slice(v);
    put(&mut zp, 0x70, &ACPI.to_le_bytes());
    put(&mut zp, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut zp, 0x202, &0x5372_6448u32.to_le_bytes());
    put(&mut zp, 0x206, &0x020fu16.to_le_bytes());
    zp[0x210] = 0xff;
    zp[0x211] = 1;
    put(&mut zp, 0x218, &(rd_addr as u32).to_le_bytes());
    put(&mut zp, 0x21c, &(rd.len() as u32).to_le_bytes());
    put(&mut zp, 0x228, &(CMDLINE as u32).to_le_bytes());
    put(&mut zp, 0x230, &0x0100_0000u32.to_le_bytes());
    put(&mut zp, 0x238, &(cb.len() as u32).to_le_bytes());
    let e820: [(u64, u64, u32); 3] = [
        (0, 0x9fc00, 1),
        (0xe0000, 0x20000, 2),
        (0x10_0000, mem_size - 0x10_0000, 1),
    ];
    zp[0x1e8] = e820.len() as u8;
    for (k, (a, s, t)) in e820.iter().enumerate() {
        let o = 0x2d0 + k * 20;
        put(&mut zp, o, &a.to_le_bytes());
        put(&mut zp, o + 8, &s.to_le_bytes());
        put(&mut zp, o + 16, &t.to_le_bytes());
    }
    mem.write_slice(&zp, GuestAddress(ZERO_PAGE))
        .map_err(|e| e.to_string())?;
    mem.write_slice(&acpi_tables(cpus), GuestAddress(ACPI))
        .map_err(|e| e.to_string())?;

    // Identity map of the first 4 GiB with 2 MiB pages.
    mem.write_obj(0xa000u64 | 3, GuestAddress(PML4))
        .map_err(|e| e.to_string())?;
    for g in 0..4u64 {
        let pd = 0xb000 + g * 0x1000;
        mem.write_obj(pd | 3, GuestAddress(0xa000 + g * 8))
            .map_err(|e| e.to_string())?;
        for k in 0..512u64 {
            let pa = (g << 30) | (k << 21);
            mem.write_obj(pa | 0x83, GuestAddress(pd + k * 8))
                .map_err(|e| e.to_string())?;
        }
    }
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + k as u64 * 8))
            .map_err(|e| e.to_string())?;
    }

    let hv = hv_emu::EmuHypervisor::new();
    let model = hv::CpuModel::portable();
    let vm = hv
        .create_vm(VmConfig {
            memory: mem.clone(),
            cpu_model: model,
            vcpus: cpus,
            tsc_khz: None,
        })
        .map_err(|e| e.to_string())?;
    let vm_cell: Arc<OnceLock<Arc<dyn Vm>>> = Arc::new(OnceLock::new());
    let _ = vm_cell.set(vm.clone());
    let ioapic = Arc::new(Mutex::new(Ioapic {
        sel: 0,
        redir: [1 << 16; 24],
    }));
    let seen = Arc::new(Mutex::new(String::new()));
    let platform = Arc::new(Platform {
        serial: Mutex::new(vm_superio::Serial::new(
            IrqLine {
                ioapic: ioapic.clone(),
                vm: vm_cell.clone(),
            },
            Console { seen: seen.clone() },
        )),
        ioapic,
    });

    let mut bsp = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let mut st: CpuState = bsp.state().map_err(|e| e.to_string())?;
    st.regs.rip = entry;
    st.regs.rsi = ZERO_PAGE;
    st.regs.rflags = 2;
    let code = Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    };
    let data = Segment {
        selector: 0x18,
        type_: 0x3,
        db: true,
        l: false,
        ..code
    };
    st.sregs.cs = code;
    st.sregs.ds = data;
    st.sregs.es = data;
    st.sregs.ss = data;
    st.sregs.fs = data;
    st.sregs.gs = data;
    st.sregs.tr = Segment {
        selector: 0,
        type_: 0xb,
        s: false,
        l: false,
        g: false,
        limit: 0xffff,
        ..code
    };
    st.sregs.gdt = hv::DescriptorTable {
        base: GDT,
        limit: 31,
    };
    st.sregs.cr0 = 0x8000_0011;
    st.sregs.cr3 = PML4;
    st.sregs.cr4 = 0x20;
    st.sregs.efer = 0x500;
    bsp.set_state(&st).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let mut handles = Vec::new();
    let mut vcpus = vec![bsp];
    for id in 1..cpus {
        vcpus.push(vm.create_vcpu(id).map_err(|e| e.to_string())?);
    }
    let done = Arc::new(Mutex::new(None::<String>));
    for mut v in vcpus {
        let p = platform.clone();
        let done = done.clone();
        handles.push(std::thread::spawn(move || {
            let id = v.id();
            let r = loop {
                match v.run(p.as_ref()) {
                    Ok(hv::VcpuExit::Interrupted) => continue,
                    Ok(x) => break format!("vCPU {id}: {x:?}"),
                    Err(e) => break format!("vCPU {id}: error: {e}"),
                }
            };
            if let Ok(mut d) = done.lock() {
                d.get_or_insert(r);
            }
        }));
    }
    let deadline = start + Duration::from_secs(timeout);
    let mut last = (Instant::now(), 0u64);
    let mut ok = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if seen.lock().map(|s| s.contains(&until)).unwrap_or(false) {
            ok = true;
            break;
        }
        if let Ok(d) = done.lock()
            && let Some(d) = d.as_ref()
        {
            eprintln!("\n[boot] {d}");
            break;
        }
        if Instant::now() > deadline {
            eprintln!("\n[boot] timeout");
            break;
        }
        if last.0.elapsed() > Duration::from_secs(10) {
            let n = hv_emu::instructions_retired();
            let mips = (n - last.1) as f64 / last.0.elapsed().as_secs_f64() / 1e6;
            eprintln!(
                "\n[boot] {:.1}s {:.1} MIPS, {} decoded",
                start.elapsed().as_secs_f64(),
                mips,
                hv_emu::instructions_decoded()
            );
            last = (Instant::now(), n);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = hv_emu::instructions_retired();
    eprintln!(
        "\n[boot] {} after {secs:.1}s, {n} instructions ({} translated), {:.1} MIPS, {} user-mode runs",
        if ok { "reached the marker" } else { "stopped" },
        hv_emu::instructions_translated(),
        n as f64 / secs / 1e6,
        hv_emu::user_mode_runs()
    );
    std::process::exit(if ok { 0 } else { 1 });
}
