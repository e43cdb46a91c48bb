//! Linux direct boot: kernel, initrd, command line, `boot_params`, e820, ACPI tables, page
//! tables and GDT, and the initial state of every vCPU.
//!
//! Both kernel formats enter in 64-bit mode (the Linux x86-64 boot protocol):
//! * bzImage: loaded at 1 MiB (its `code32_start`); entry at load address + 0x200, the
//!   decompressor's `startup_64`.
//! * ELF vmlinux: segments loaded at their physical addresses; entry at `e_entry`. Linux links
//!   vmlinux with `ENTRY(phys_startup_64)`, so `e_entry` is the physical address of the
//!   uncompressed kernel's 64-bit `startup_64` (0x100_0000 for the Debian kernel); the PVH note
//!   (32-bit entry) is ignored.
//!
//! In both cases RSI points at `boot_params` and paging maps the first GiB 1:1.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hv::{CpuState, LapicState, MpState, Segment};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::acpi;
use crate::layout::{self, *};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)", .0.display())]
    NotAKernel(PathBuf),
    #[error("kernel {} does not fit in guest memory", .0.display())]
    KernelTooBig(PathBuf),
    #[error("cannot load kernel {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("initrd {} does not fit in guest memory between the kernel and {limit:#x}", path.display())]
    InitrdTooBig { path: PathBuf, limit: u64 },
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("invalid vCPU count {0}: must be 1 to 254")]
    BadCpuCount(u32),
    #[error("virtio slot {base:#x} irq {irq} is not a platform virtio slot")]
    BadVirtioSlot { base: u64, irq: u32 },
    #[error("guest memory is not laid out as machine::layout describes")]
    BadMemory,
    #[error("cannot write {0} to guest memory")]
    Write(&'static str),
}

/// A virtio-mmio device window and its IOAPIC pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
}

impl VirtioSlot {
    /// Slot `i` of the platform: `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`, pin
    /// `VIRTIO_IRQ_BASE + i`. `None` beyond [`MAX_VIRTIO_SLOTS`].
    pub fn for_index(i: u32) -> Option<VirtioSlot> {
        (i < MAX_VIRTIO_SLOTS).then(|| VirtioSlot {
            base: VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE + i,
        })
    }

    fn check(&self) -> Result<(), Error> {
        let ok = self.base.is_multiple_of(VIRTIO_MMIO_SIZE)
            && self.base >= MMIO_HOLE_START
            && self.base + VIRTIO_MMIO_SIZE <= IOAPIC_BASE
            && (self.irq as usize) < crate::devices::ioapic::NUM_PINS
            && self.irq != SERIAL_IRQ;
        if ok {
            Ok(())
        } else {
            Err(Error::BadVirtioSlot {
                base: self.base,
                irq: self.irq,
            })
        }
    }
}

pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub cpus: u32,
    pub virtio: &'a [VirtioSlot],
}

/// Kernel formats recognised by content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Checks a bzImage's setup header against the file before anything is loaded: the boot
/// protocol version (2.06 or later, as the 64-bit entry needs), the protected-mode code
/// (`syssize` 16-byte units) within the file after the setup sectors, and the compressed
/// payload (`payload_offset`, `payload_length`, protocol 2.08+) within that code. A truncated or
/// patched kernel is refused here rather than failing as guest code.
fn check_bzimage_header(head: &[u8], setup_sects: u64, file_len: u64) -> Result<(), String> {
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let version = u16_at(0x206).ok_or("truncated setup header")?;
    if version < 0x0206 {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.06",
            version >> 8,
            version & 0xff
        ));
    }
    let setup_end = (setup_sects + 1) * 512;
    if setup_end > file_len {
        return Err(format!(
            "{setup_sects} setup sectors but the file is {file_len} bytes"
        ));
    }
    let code = file_len - setup_end;
    let syssize = u64::from(u32_at(0x1f4).ok_or("truncated setup header")?) * 16;
    if syssize == 0 || syssize > code {
        return Err(format!(
            "the header's kernel size ({syssize} bytes) does not match the {code} bytes after the setup code (truncated?)"
        ));
    }
    if version >= 0x0208 {
        let offset = u64::from(u32_at(0x248).ok_or("truncated setup header")?);
        let length = u64::from(u32_at(0x24c).ok_or("truncated setup header")?);
        if length == 0 || offset.saturating_add(length) > syssize {
            return Err(format!(
                "payload at {offset} of {length} bytes lies outside the {syssize}-byte kernel"
            ));
        }
    }
    Ok(())
}

/// Most program headers accepted (a vmlinux has about five).
const MAX_ELF_PHDRS: u64 = 64;

/// Checks an ELF vmlinux against the file before anything is loaded: a 64-bit little-endian
/// x86-64 executable whose program header table, every `PT_LOAD` and `PT_NOTE` segment (file
/// range, no size overflow, `p_filesz <= p_memsz`, loaded at or above 1 MiB), section header
/// table and sections with file content lie inside the file, with at least one loaded segment
/// and the entry point inside one. A truncated vmlinux (the section headers and sections come
/// after the segments) or a patched header is refused here, rather than loaded partly or left
/// to fail as guest code. The tables read are bounded (64 program headers, 65535 section
/// headers: 4 MiB). `read_at(buf, offset)` fills `buf` from the file.
fn check_elf(
    head: &[u8],
    file_len: u64,
    read_at: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
) -> Result<(), String> {
    let u16_at = |b: &[u8], o: usize| {
        b.get(o..o + 2)
            .map_or(0, |x| u16::from_le_bytes([x[0], x[1]]))
    };
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .and_then(|x| x.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .and_then(|x| x.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    if head.len() < 64 || file_len < 64 {
        return Err(format!(
            "the ELF header needs 64 bytes, the file has {file_len} (truncated?)"
        ));
    }
    if head.get(4) != Some(&2) || head.get(5) != Some(&1) || u16_at(head, 18) != 62 {
        return Err("not a 64-bit little-endian x86-64 ELF file".into());
    }
    if u16_at(head, 16) != 2 {
        return Err(format!(
            "ELF type {} is not an executable (2)",
            u16_at(head, 16)
        ));
    }
    let entry = u64_at(head, 24);
    let phoff = u64_at(head, 32);
    let shoff = u64_at(head, 40);
    let phentsize = u64::from(u16_at(head, 54));
    let phnum = u64::from(u16_at(head, 56));
    let shentsize = u64::from(u16_at(head, 58));
    let shnum = u64::from(u16_at(head, 60));
    let inside = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
    if phentsize != 56 || phnum == 0 || phnum > MAX_ELF_PHDRS {
        return Err(format!(
            "{phnum} program headers of {phentsize} bytes (want 1 to {MAX_ELF_PHDRS} of 56)"
        ));
    }
    if !inside(phoff, phnum * 56) {
        return Err(format!(
            "the program headers at {phoff:#x} lie outside the {file_len}-byte file (truncated?)"
        ));
    }
    if shnum != 0 && (shentsize != 64 || !inside(shoff, shnum * 64)) {
        return Err(format!(
            "the section headers at {shoff:#x} lie outside the {file_len}-byte file (truncated?)"
        ));
    }
    let mut table = vec![0u8; (phnum * 56) as usize];
    read_at(&mut table, phoff).map_err(|e| format!("cannot read the program headers: {e}"))?;
    let mut loads = 0;
    let mut entry_found = false;
    for (i, ph) in table.chunks_exact(56).enumerate() {
        const PT_LOAD: u32 = 1;
        const PT_NOTE: u32 = 4;
        let kind = u32_at(ph, 0);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if kind != PT_LOAD && kind != PT_NOTE {
            continue;
        }
        if !inside(offset, filesz) {
            return Err(format!(
                "program header {i}: {filesz} bytes at {offset:#x} lie outside the {file_len}-byte file (truncated?)"
            ));
        }
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        if filesz > memsz || paddr.checked_add(memsz).is_none() || paddr < HIGH_MEMORY_START {
            return Err(format!(
                "program header {i}: {filesz} file bytes, {memsz} in memory at {paddr:#x} are inconsistent"
            ));
        }
        loads += 1;
        entry_found |= (paddr..paddr + filesz).contains(&entry);
    }
    if loads == 0 {
        return Err("no loadable segment".into());
    }
    // The sections (symbols, strings, ...) come after the loaded segments: a file cut short
    // loses them first.
    let mut sections = vec![0u8; (shnum * 64) as usize];
    read_at(&mut sections, shoff).map_err(|e| format!("cannot read the section headers: {e}"))?;
    for (i, sh) in sections.chunks_exact(64).enumerate() {
        const SHT_NULL: u32 = 0;
        const SHT_NOBITS: u32 = 8;
        let kind = u32_at(sh, 4);
        let (offset, size) = (u64_at(sh, 24), u64_at(sh, 32));
        if kind != SHT_NULL && kind != SHT_NOBITS && !inside(offset, size) {
            return Err(format!(
                "section {i}: {size} bytes at {offset:#x} lie outside the {file_len}-byte file (truncated?)"
            ));
        }
    }
    if !entry_found {
        return Err(format!(
            "the entry point {entry:#x} is outside every loaded segment"
        ));
    }
    Ok(())
}

/// bzImage: "HdrS" at 0x202. ELF: "\x7fELF" at 0.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else if head.get(0..4) == Some(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else {
        None
    }
}

/// The command line handed to the kernel: the user's, unchanged, then one
/// `virtio_mmio.device=4K@0x<base>:<irq>` per slot (before a `--`, after which everything goes
/// to init). At most `CMDLINE_MAX - 1` bytes.
pub fn build_cmdline(user: &str, virtio: &[VirtioSlot]) -> Result<String, Error> {
    if user.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    // Kernel options go before a `--` token: what follows it is init's.
    let split = user
        .match_indices("--")
        .map(|(i, _)| i)
        .find(|&i| {
            let before = user
                .get(..i)
                .is_none_or(|b| b.is_empty() || b.ends_with(char::is_whitespace));
            let after = user
                .get(i + 2..)
                .is_none_or(|a| a.is_empty() || a.starts_with(char::is_whitespace));
            before && after
        })
        .unwrap_or(user.len());
    let (kernel_part, init_part) = user.split_at(split);
    let mut s = kernel_part.to_string();
    let devices = virtio
        .iter()
        .map(|v| format!("virtio_mmio.device=4K@{:#x}:{}", v.base, v.irq));
    for option in devices {
        if !s.is_empty() && !s.ends_with(char::is_whitespace) {
            s.push(' ');
        }
        s.push_str(&option);
    }
    if !init_part.is_empty() {
        if !s.ends_with(char::is_whitespace) {
            s.push(' ');
        }
        s.push_str(init_part);
    }
    if s.len() + 1 > CMDLINE_MAX {
        return Err(Error::CmdlineTooLong {
            len: s.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    Ok(s)
}

/// 64-bit code, data and TSS descriptors of the boot GDT, as `flags(16 bits) / base / limit`.
const GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b | 0x0f00, 0, 0xfffff), // 0x08: code64 (0xAF9B)
    (0xc093 | 0x0f00, 0, 0xfffff), // 0x10: data (0xCF93)
    (0x008b, 0, 0x67),             // 0x18: 64-bit TSS, busy
];
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment_of(sel: u16, (flags, base, limit): (u16, u32, u32)) -> Segment {
    let g = flags & 0x8000 != 0;
    Segment {
        base: u64::from(base),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector: sel,
        type_: (flags & 0xf) as u8,
        present: flags & 0x80 != 0,
        dpl: ((flags >> 5) & 3) as u8,
        db: flags & 0x4000 != 0,
        s: flags & 0x10 != 0,
        l: flags & 0x2000 != 0,
        g,
        avl: flags & 0x1000 != 0,
        unusable: false,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_PAT at reset.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// IA32_MISC_ENABLE: fast strings.
pub const MISC_ENABLE_RESET: u64 = 1;
/// Local APIC version register: version 0x14, max LVT 5.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

fn lapic_reset(id: u32) -> LapicState {
    let mut l = LapicState::default();
    l.set(LapicState::ID, id << 24);
    l.set(LapicState::VERSION, LAPIC_VERSION);
    l.set(LapicState::DFR, 0xffff_ffff);
    l.set(LapicState::SVR, 0xff);
    for lvt in [
        LapicState::LVT_TIMER,
        LapicState::LVT_THERMAL,
        LapicState::LVT_PERF,
        LapicState::LVT_LINT0,
        LapicState::LVT_LINT1,
        LapicState::LVT_ERROR,
    ] {
        l.set(lvt, 1 << 16);
    }
    l
}

/// The architectural reset state of vCPU `id` (what an application processor holds until
/// INIT/SIPI): real mode at F000:FFF0, `MpState::Uninitialized`, APIC enabled at
/// [`LAPIC_BASE`], BSP flag only for vCPU 0.
pub fn reset_state(id: u32) -> CpuState {
    let seg = |type_: u8| Segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_,
        present: true,
        s: true,
        ..Segment::default()
    };
    let mut s = CpuState::default();
    s.regs.rip = 0xfff0;
    s.regs.rflags = 2;
    s.sregs.cs = Segment {
        base: 0xffff_0000,
        selector: 0xf000,
        ..seg(0xb)
    };
    for r in [
        &mut s.sregs.ds,
        &mut s.sregs.es,
        &mut s.sregs.fs,
        &mut s.sregs.gs,
        &mut s.sregs.ss,
    ] {
        *r = seg(3);
    }
    s.sregs.ldt = Segment { s: false, ..seg(2) };
    s.sregs.tr = Segment {
        s: false,
        ..seg(0xb)
    };
    s.sregs.gdt.limit = 0xffff;
    s.sregs.idt.limit = 0xffff;
    s.sregs.cr0 = 0x6000_0010;
    s.sregs.apic_base = LAPIC_BASE | APIC_BASE_ENABLE | if id == 0 { APIC_BASE_BSP } else { 0 };
    s.debug.dr6 = 0xffff_0ff0;
    s.debug.dr7 = 0x400;
    s.xcr0 = 1;
    for m in hv::CpuModel::portable_msrs() {
        s.set_msr(m, 0);
    }
    s.set_msr(hv::msr::IA32_APIC_BASE, s.sregs.apic_base);
    s.set_msr(hv::msr::IA32_PAT, PAT_RESET);
    s.set_msr(hv::msr::IA32_MISC_ENABLE, MISC_ENABLE_RESET);
    s.lapic = lapic_reset(id);
    s.mp_state = MpState::Uninitialized;
    s
}

/// vCPU 0 at the 64-bit Linux entry point `entry`.
pub fn bsp_boot_state(entry: u64) -> CpuState {
    let mut s = reset_state(0);
    s.mp_state = MpState::Runnable;
    s.regs.rip = entry;
    s.regs.rsi = BOOT_PARAMS_ADDR;
    s.regs.rsp = BOOT_STACK_POINTER;
    s.regs.rbp = BOOT_STACK_POINTER;
    s.regs.rflags = 2;
    s.sregs.cs = segment_of(CODE_SEL, GDT[1]);
    let data = segment_of(DATA_SEL, GDT[2]);
    s.sregs.ds = data;
    s.sregs.es = data;
    s.sregs.fs = data;
    s.sregs.gs = data;
    s.sregs.ss = data;
    s.sregs.tr = segment_of(TSS_SEL, GDT[3]);
    s.sregs.ldt = Segment {
        unusable: true,
        ..Segment::default()
    };
    s.sregs.gdt = hv::DescriptorTable {
        base: BOOT_GDT_ADDR,
        limit: (GDT.len() * 8 + 8 - 1) as u16,
    };
    s.sregs.idt = hv::DescriptorTable {
        base: BOOT_IDT_ADDR,
        limit: 0,
    };
    s.sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    s.sregs.cr3 = PML4_ADDR;
    s.sregs.cr4 = CR4_PAE;
    s.sregs.efer = EFER_LME | EFER_LMA;
    s.set_msr(hv::msr::IA32_EFER, s.sregs.efer);
    s
}

fn write_boot_structures(mem: &hv::GuestMemory) -> Result<(), Error> {
    // GDT (the 64-bit TSS descriptor takes two slots; the upper half is zero).
    let mut gdt = Vec::new();
    for &(f, b, l) in &GDT {
        gdt.extend_from_slice(&gdt_entry(f, b, l).to_le_bytes());
    }
    gdt.extend_from_slice(&[0; 8]);
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_ADDR))
        .map_err(|_| Error::Write("GDT"))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(|_| Error::Write("IDT"))?;
    // Identity map of the first GiB with 2 MiB pages.
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(|_| Error::Write("page tables"))?;
    mem.write_obj(PD_ADDR | 3, GuestAddress(PDPT_ADDR))
        .map_err(|_| Error::Write("page tables"))?;
    let mut pd = Vec::with_capacity(4096);
    for i in 0..512u64 {
        pd.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(|_| Error::Write("page tables"))?;
    Ok(())
}

/// Total RAM of `mem`, checked against [`layout::ram_regions`].
fn memory_size(mem: &hv::GuestMemory) -> Result<u64, Error> {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let total = regions.iter().map(|r| r.1).sum();
    if regions != layout::ram_regions(total) || total < MIN_MEMORY {
        return Err(Error::BadMemory);
    }
    Ok(total)
}

fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Where the kernel went.
struct Loaded {
    entry: u64,
    /// End of everything the kernel occupies before it relocates itself.
    end: u64,
    header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn load_kernel(mem: &hv::GuestMemory, path: &Path, low_end: u64) -> Result<Loaded, Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = open(path)?;
    let mut head = Vec::new();
    (&mut f)
        .take(0x1000)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let file_len = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    f.rewind().map_err(read_err)?;
    let too_big = || Error::KernelTooBig(path.to_path_buf());
    let load_err = |e: loader::Error| match e {
        loader::Error::Elf(loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)
        | loader::Error::MemoryOverflow => too_big(),
        loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)
        | loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber) => {
            Error::NotAKernel(path.to_path_buf())
        }
        e => Error::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    };
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    match detect_format(&head) {
        Some(KernelFormat::BzImage) => {
            let setup_sects = match head.get(0x1f1) {
                Some(0) | None => 4,
                Some(&n) => u64::from(n),
            };
            let payload = file_len.saturating_sub((setup_sects + 1) * 512);
            check_bzimage_header(&head, setup_sects, file_len).map_err(|reason| Error::Load {
                path: path.to_path_buf(),
                reason,
            })?;
            if HIGH_MEMORY_START + payload > low_end {
                return Err(too_big());
            }
            let r = loader::BzImage::load(mem, None, &mut f, high).map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| Error::NotAKernel(path.to_path_buf()))?;
            // The decompressed kernel runs at its preferred address (or higher) and needs
            // init_size bytes there.
            let pref = { hdr.pref_address }.max(r.kernel_load.0);
            let end = pref
                .saturating_add(u64::from(hdr.init_size))
                .max(r.kernel_end);
            if end > low_end {
                return Err(too_big());
            }
            Ok(Loaded {
                entry: r.kernel_load.0 + 0x200,
                end,
                header: Some(hdr),
            })
        }
        Some(KernelFormat::Elf) => {
            check_elf(&head, file_len, |buf, at| {
                std::os::unix::fs::FileExt::read_exact_at(&f, buf, at)
            })
            .map_err(|reason| Error::Load {
                path: path.to_path_buf(),
                reason,
            })?;
            let r = loader::Elf::load(mem, None, &mut f, high).map_err(load_err)?;
            if r.kernel_end > low_end {
                return Err(too_big());
            }
            Ok(Loaded {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                header: None,
            })
        }
        None => Err(Error::NotAKernel(path.to_path_buf())),
    }
}

/// Loads the initrd as high as allowed; returns (address, size).
fn load_initrd(
    mem: &hv::GuestMemory,
    path: &Path,
    lowest: u64,
    limit: u64,
) -> Result<(u64, u64), Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = open(path)?;
    let size = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    f.rewind().map_err(read_err)?;
    let too_big = || Error::InitrdTooBig {
        path: path.to_path_buf(),
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(hv::PAGE_SIZE - 1);
    if addr < lowest.next_multiple_of(hv::PAGE_SIZE) {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            _ => too_big(),
        })?;
    Ok((addr, size))
}

/// Loads the kernel (and initrd), writes the command line, `boot_params`, e820 map, ACPI
/// tables, GDT/IDT and page tables into `mem`, and returns one state per vCPU: vCPU 0 at the
/// 64-bit entry point, the others in reset state waiting for INIT/SIPI.
pub fn load_linux(mem: &hv::GuestMemory, cfg: &BootConfig) -> Result<Vec<CpuState>, Error> {
    if !(1..=254).contains(&cfg.cpus) {
        return Err(Error::BadCpuCount(cfg.cpus));
    }
    for v in cfg.virtio {
        v.check()?;
    }
    let cmdline = build_cmdline(cfg.cmdline, cfg.virtio)?;
    let mem_bytes = memory_size(mem)?;
    let low_end = low_ram_end(mem_bytes);

    let kernel = load_kernel(mem, cfg.kernel, low_end)?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.header {
        params.hdr = hdr;
        if (hdr.cmdline_size as usize) != 0 && cmdline.len() > hdr.cmdline_size as usize {
            return Err(Error::CmdlineTooLong {
                len: cmdline.len(),
                max: hdr.cmdline_size as usize,
            });
        }
    } else {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (CMDLINE_MAX - 1) as u32;
    params.acpi_rsdp_addr = acpi::RSDP_ADDR;

    if let Some(initrd) = cfg.initrd {
        let max = match kernel.header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
            _ => INITRD_ADDR_MAX_DEFAULT,
        };
        let (addr, size) = load_initrd(mem, initrd, kernel.end, low_end.min(max))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }

    let e820 = layout::e820_map(mem_bytes);
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len() as u8;

    let mut cl = cmdline.into_bytes();
    cl.push(0);
    mem.write_slice(&cl, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| Error::Write("command line"))?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(BOOT_PARAMS_ADDR)),
        mem,
    )
    .map_err(|_| Error::Write("boot parameters"))?;
    for (addr, table) in acpi::build(cfg.cpus, cfg.virtio).tables {
        mem.write_slice(&table, GuestAddress(addr))
            .map_err(|_| Error::Write("ACPI tables"))?;
    }
    write_boot_structures(mem)?;

    let mut cpus = vec![bsp_boot_state(kernel.entry)];
    cpus.extend((1..cfg.cpus).map(reset_state));
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::acpi::tests::{Mem, walk};
    use crate::memory::create_guest_memory;

    const MIB: u64 = 1 << 20;

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("machine-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A bzImage with one setup sector, boot protocol 2.15 and a 64 KiB payload.
    fn fake_bzimage() -> Vec<u8> {
        let mut b = vec![0u8; 2 * 512 + 0x10000];
        b[0x1f1] = 1; // setup_sects
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x1f4..0x1f8].copy_from_slice(&(0x10000u32 / 16).to_le_bytes()); // syssize
        b[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes()); // payload_offset
        b[0x24c..0x250].copy_from_slice(&0x100u32.to_le_bytes()); // payload_length
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        b[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes()); // init_size
        b[1024] = 0xe9; // first payload byte
        b
    }

    fn cfg<'a>(
        kernel: &'a Path,
        initrd: Option<&'a Path>,
        cpus: u32,
        virtio: &'a [VirtioSlot],
    ) -> BootConfig<'a> {
        BootConfig {
            kernel,
            initrd,
            cmdline: "console=ttyS0 quiet",
            cpus,
            virtio,
        }
    }

    fn params_of(mem: &hv::GuestMemory) -> boot_params {
        mem.read_obj(GuestAddress(BOOT_PARAMS_ADDR)).unwrap()
    }

    fn acpi_of(mem: &hv::GuestMemory) -> Mem {
        let mut area = vec![0u8; (ACPI_END - ACPI_START) as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_START)).unwrap();
        Mem([(ACPI_START, area)].into_iter().collect())
    }

    fn check_bsp(s: &CpuState, entry: u64) {
        assert_eq!(s.mp_state, MpState::Runnable);
        assert_eq!(s.regs.rip, entry);
        assert_eq!(s.regs.rsi, 0x7000);
        assert_eq!(s.regs.rsp, 0x8ff0);
        assert_eq!(s.regs.rflags, 2);
        assert_eq!(s.sregs.cs.selector, 8);
        assert!(s.sregs.cs.l && !s.sregs.cs.db && s.sregs.cs.present && s.sregs.cs.s);
        assert_eq!(s.sregs.cs.type_, 0xb);
        assert_eq!(s.sregs.ds.type_, 3);
        assert_eq!(s.sregs.ss.limit, 0xffff_ffff);
        assert_eq!(s.sregs.tr.type_, 0xb);
        assert!(!s.sregs.tr.s);
        assert_eq!(s.sregs.cr3, 0x9000);
        assert_eq!(s.sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.sregs.cr4, 0x20);
        assert_eq!(s.sregs.efer, 0x500);
        assert_eq!(s.sregs.apic_base, 0xfee0_0900);
        assert_eq!(s.msr(hv::msr::IA32_APIC_BASE), Some(0xfee0_0900));
        assert_eq!(s.msr(hv::msr::IA32_EFER), Some(0x500));
        assert_eq!(s.msr(hv::msr::IA32_PAT), Some(PAT_RESET));
        assert_eq!(s.msr(hv::msr::IA32_MISC_ENABLE), Some(1));
        assert_eq!(s.fpu.mxcsr, 0x1f80);
        assert_eq!(s.lapic.get(LapicState::ID), 0);
        assert!(s.validate().is_ok());
        let msrs: Vec<u32> = s.msrs.iter().map(|m| m.index).collect();
        assert_eq!(msrs, hv::CpuModel::portable_msrs());
    }

    fn check_common_memory(mem: &hv::GuestMemory, cpus: u32, cmdline_prefix: &str) {
        let p = params_of(mem);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let n = p.e820_entries as usize;
        let e820: Vec<(u64, u64, u32)> = p.e820_table[..n]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(e820, layout::e820_map(256 * MIB));
        let mut cl = vec![0u8; 2048];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        let end = cl.iter().position(|&b| b == 0).unwrap();
        assert!(
            std::str::from_utf8(&cl[..end])
                .unwrap()
                .starts_with(cmdline_prefix)
        );
        // Page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[1] maps 2 MiB.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(),
            0xa003
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDPT_ADDR)).unwrap(),
            0xb003
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PD_ADDR + 8)).unwrap(),
            0x20_0083
        );
        // GDT code descriptor.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BOOT_GDT_ADDR + 8))
                .unwrap(),
            0x00af_9b00_0000_ffff
        );
        let tables = walk(&acpi_of(mem), acpi::RSDP_ADDR);
        assert_eq!(tables["APIC"].len(), 44 + 8 * cpus as usize + 12);
    }

    #[test]
    fn fake_bzimage_boot() {
        let k = tmpfile("bz", &fake_bzimage());
        let initrd = tmpfile("initrd", &[0x42; 5000]);
        let mem = create_guest_memory(256 * MIB).unwrap();
        let slots = [
            VirtioSlot::for_index(0).unwrap(),
            VirtioSlot::for_index(1).unwrap(),
        ];
        let cpus = load_linux(&mem, &cfg(&k, Some(&initrd), 4, &slots)).unwrap();
        assert_eq!(cpus.len(), 4);
        check_bsp(&cpus[0], 0x10_0200);
        for (i, ap) in cpus.iter().enumerate().skip(1) {
            assert_eq!(ap.mp_state, MpState::Uninitialized);
            assert_eq!(ap.regs.rip, 0xfff0);
            assert_eq!(ap.sregs.cs.base, 0xffff_0000);
            assert_eq!(ap.sregs.cs.selector, 0xf000);
            assert_eq!(ap.sregs.apic_base, 0xfee0_0800);
            assert_eq!(ap.lapic.get(LapicState::ID), (i as u32) << 24);
            assert_eq!(ap.lapic.get(LapicState::VERSION), 0x50014);
            assert_eq!(ap.lapic.get(LapicState::SVR), 0xff);
            assert_eq!(ap.lapic.get(LapicState::LVT_LINT0), 0x10000);
            assert!(ap.validate().is_ok());
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xe9);
        check_common_memory(
            &mem,
            4,
            "console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6",
        );
        let p = params_of(&mem);
        let (addr, size) = ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size });
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(u64::from(addr) + 5000 <= 256 * MIB && u64::from(addr) + 5000 > 256 * MIB - 8192);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(addr) + 4999))
                .unwrap(),
            0x42
        );
        assert_eq!({ p.hdr.version }, 0x020f);
    }

    #[test]
    fn errors() {
        let mem = create_guest_memory(256 * MIB).unwrap();
        let bz = tmpfile("bz2", &fake_bzimage());
        let missing = Path::new("/nonexistent/kernel");
        let e = load_linux(&mem, &cfg(missing, None, 1, &[])).unwrap_err();
        assert!(matches!(e, Error::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/kernel"));
        let junk = tmpfile("junk", &[0u8; 4096]);
        assert!(matches!(
            load_linux(&mem, &cfg(&junk, None, 1, &[])),
            Err(Error::NotAKernel(_))
        ));
        assert!(matches!(
            load_linux(&mem, &cfg(&bz, Some(missing), 1, &[])),
            Err(Error::Read { .. })
        ));
        assert!(matches!(
            load_linux(&mem, &cfg(&bz, None, 0, &[])),
            Err(Error::BadCpuCount(0))
        ));
        let bad = [VirtioSlot {
            base: 0x1000,
            irq: 5,
        }];
        assert!(matches!(
            load_linux(&mem, &cfg(&bz, None, 1, &bad)),
            Err(Error::BadVirtioSlot { .. })
        ));
        let long = "x".repeat(2048);
        let c = BootConfig {
            cmdline: &long,
            ..cfg(&bz, None, 1, &[])
        };
        assert!(matches!(
            load_linux(&mem, &c),
            Err(Error::CmdlineTooLong { .. })
        ));
        // Kernel too big: init_size does not fit in 16 MiB.
        let small = create_guest_memory(16 * MIB).unwrap();
        assert!(matches!(
            load_linux(&small, &cfg(&bz, None, 1, &[])),
            Err(Error::KernelTooBig(_))
        ));
        // Initrd bigger than the room below the limit.
        let mem48 = create_guest_memory(48 * MIB).unwrap();
        let big = tmpfile("bigrd", &vec![0u8; 20 << 20]);
        assert!(matches!(
            load_linux(&mem48, &cfg(&bz, Some(&big), 1, &[])),
            Err(Error::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn cmdline_limits() {
        let slots: Vec<VirtioSlot> = (0..16).map(|i| VirtioSlot::for_index(i).unwrap()).collect();
        let s = build_cmdline("a", &slots).unwrap();
        assert_eq!(s.matches("virtio_mmio.device=4K@0xd000f000:20").count(), 1);
        assert!(s.starts_with("a virtio_mmio.device="), "{s}");
        assert_eq!(
            build_cmdline("", &slots[..1]).unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(build_cmdline(&"y".repeat(2047), &[]).unwrap().len(), 2047);
        assert!(build_cmdline(&"y".repeat(2048), &[]).is_err());
        let one = " virtio_mmio.device=4K@0xd0000000:5".len();
        assert_eq!(
            build_cmdline(&"y".repeat(2047 - one), &slots[..1])
                .unwrap()
                .len(),
            2047
        );
        assert!(build_cmdline(&"y".repeat(2048 - one), &slots[..1]).is_err());
        assert!(build_cmdline("a\0b", &[]).is_err());
        assert_eq!(
            build_cmdline("x  ", &slots[..1]).unwrap(),
            "x  virtio_mmio.device=4K@0xd0000000:5"
        );
        // The platform adds no pci= option (it has a configuration mechanism, docs/platform.md
        // section 6); the user's own passes unchanged.
        assert_eq!(build_cmdline(" keep ", &[]).unwrap(), " keep ");
        assert_eq!(build_cmdline("pci=noacpi q", &[]).unwrap(), "pci=noacpi q");
        assert_eq!(build_cmdline("q -- pci=x", &[]).unwrap(), "q -- pci=x");
        assert_eq!(
            build_cmdline("q --x -- a", &slots[..1]).unwrap(),
            "q --x virtio_mmio.device=4K@0xd0000000:5 -- a"
        );
        assert!(VirtioSlot::for_index(16).is_none());
    }

    fn kit(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../guest/out")
            .join(name);
        if p.exists() {
            Some(p)
        } else {
            eprintln!(
                "skipping: {} not built (run guest/build-kit.sh)",
                p.display()
            );
            None
        }
    }

    #[test]
    fn real_bzimage() {
        let Some(k) = kit("bzImage") else { return };
        let initrd = kit("initramfs.cpio.gz");
        let mem = create_guest_memory(256 * MIB).unwrap();
        let cpus = load_linux(&mem, &cfg(&k, initrd.as_deref(), 2, &[])).unwrap();
        check_bsp(&cpus[0], 0x10_0200);
        check_common_memory(&mem, 2, "console=ttyS0 quiet");
        let p = params_of(&mem);
        assert!({ p.hdr.version } >= 0x020c);
        assert_ne!({ p.hdr.loadflags } & 1, 0);
    }

    /// A truncated or patched bzImage is refused before anything runs.
    #[test]
    fn inconsistent_bzimage_is_refused() {
        let Some(k) = kit("bzImage") else { return };
        let whole = std::fs::read(&k).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", whole[..whole.len() / 2].to_vec()),
            ("truncated by a page", whole[..whole.len() - 4096].to_vec()),
        ];
        let mut old = whole.clone();
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        cases.push(("old protocol", old));
        let mut payload = whole.clone();
        payload[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(("payload length", payload));
        let mut sys = whole.clone();
        sys[0x1f4..0x1f8].copy_from_slice(&0u32.to_le_bytes());
        cases.push(("syssize 0", sys));
        for (what, bytes) in cases {
            let p = tmpfile(&format!("bad-bz-{}", what.replace(' ', "-")), &bytes);
            let mem = create_guest_memory(256 * MIB).unwrap();
            let e = load_linux(&mem, &cfg(&p, None, 1, &[])).unwrap_err();
            assert!(matches!(e, Error::Load { .. }), "{what}: {e}");
        }
    }

    /// A minimal ELF64 x86-64 executable: one PT_LOAD of 0x100 bytes at file offset 0x1000,
    /// loaded at 16 MiB, entry at its start; no section headers.
    fn tiny_elf() -> Vec<u8> {
        let mut b = vec![0u8; 0x1100];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&0x100u64.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&0x200u64.to_le_bytes());
        b[0x1000] = 0xf4;
        b
    }

    fn elf_check(b: &[u8]) -> Result<(), String> {
        check_elf(b, b.len() as u64, |buf, at| {
            let src = b
                .get(at as usize..at as usize + buf.len())
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    #[test]
    fn inconsistent_elf_is_refused() {
        elf_check(&tiny_elf()).unwrap();
        let patched = |at: usize, bytes: &[u8]| {
            let mut b = tiny_elf();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        let ph = 64;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tiny_elf()[..0x1080].to_vec(),
                "program header 0: 256 bytes at 0x1000 lie outside",
            ),
            (tiny_elf()[..40].to_vec(), "the ELF header needs 64 bytes"),
            (
                patched(32, &0x2000u64.to_le_bytes()),
                "the program headers at 0x2000 lie outside",
            ),
            (patched(32, &u64::MAX.to_le_bytes()), "lie outside"),
            (patched(56, &0u16.to_le_bytes()), "0 program headers"),
            (patched(56, &1000u16.to_le_bytes()), "1000 program headers"),
            (patched(54, &32u16.to_le_bytes()), "of 32 bytes"),
            (patched(ph + 8, &u64::MAX.to_le_bytes()), "lie outside"),
            (patched(ph + 40, &0x80u64.to_le_bytes()), "are inconsistent"),
            (
                patched(ph + 24, &0x1000u64.to_le_bytes()),
                "are inconsistent",
            ),
            (
                patched(ph + 24, &(u64::MAX - 0x100).to_le_bytes()),
                "are inconsistent",
            ),
            (patched(ph, &6u32.to_le_bytes()), "no loadable segment"),
            (
                patched(24, &0x200_0000u64.to_le_bytes()),
                "entry point 0x2000000 is outside",
            ),
            (
                patched(40, &0x1080u64.to_le_bytes()),
                "section headers at 0x1080",
            ),
            (
                tiny_elf(),
                "section 1: 512 bytes at 0x1f00 lie outside the 4544-byte file",
            ),
            (patched(4, &[1]), "not a 64-bit"),
            (patched(18, &3u16.to_le_bytes()), "not a 64-bit"),
            (patched(16, &3u16.to_le_bytes()), "not an executable"),
        ];
        for (i, (b, want)) in cases.iter().enumerate() {
            // Section header count for the section-header case.
            let mut b = b.clone();
            if want.starts_with("section") {
                b[60..62].copy_from_slice(&3u16.to_le_bytes());
                b[58..60].copy_from_slice(&64u16.to_le_bytes());
            }
            if want.starts_with("section 1") {
                // Three section headers at 0x1100 (the file grows to hold them): the second
                // (PROGBITS) says it has 0x200 bytes at 0x1f00.
                b.resize(0x1100 + 3 * 64, 0);
                b[40..48].copy_from_slice(&0x1100u64.to_le_bytes());
                let sh = 0x1100 + 64;
                b[sh + 4..sh + 8].copy_from_slice(&1u32.to_le_bytes());
                b[sh + 24..sh + 32].copy_from_slice(&0x1f00u64.to_le_bytes());
                b[sh + 32..sh + 40].copy_from_slice(&0x200u64.to_le_bytes());
            }
            let e = elf_check(&b).unwrap_err();
            assert!(e.contains(want), "case {i}: {e}");
        }
    }

    #[test]
    fn truncated_vmlinux_is_refused() {
        let Some(k) = kit("vmlinux") else { return };
        let whole = std::fs::read(&k).unwrap();
        let dir = std::env::temp_dir().join(format!("anyvisor-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = create_guest_memory(256 * MIB).unwrap();
        // Cut into the section headers, and at half of the file. (Debian's vmlinux ends with
        // relocations no header describes: a cut into those is not seen.)
        let shoff = u64::from_le_bytes(whole[40..48].try_into().unwrap()) as usize;
        for cut in [shoff + 100, whole.len() / 2] {
            let p = dir.join("vmlinux");
            std::fs::write(&p, &whole[..cut]).unwrap();
            let e = load_linux(&mem, &cfg(&p, None, 1, &[])).unwrap_err();
            assert!(e.to_string().contains("truncated?"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn real_vmlinux() {
        let Some(k) = kit("vmlinux") else { return };
        let mem = create_guest_memory(256 * MIB).unwrap();
        let cpus = load_linux(&mem, &cfg(&k, kit("initramfs.cpio.gz").as_deref(), 1, &[])).unwrap();
        // Debian's vmlinux: e_entry = phys_startup_64 = 16 MiB.
        check_bsp(&cpus[0], 0x100_0000);
        check_common_memory(&mem, 1, "console=ttyS0 quiet");
        // The first instructions of startup_64 are there (not zeros).
        let mut code = [0u8; 16];
        mem.read_slice(&mut code, GuestAddress(0x100_0000)).unwrap();
        assert_ne!(code, [0; 16]);
    }
}
