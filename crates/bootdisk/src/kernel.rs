//! Is this file a kernel anyvisor can direct-boot? An x86-64 Linux bzImage (boot protocol
//! 2.12 or later with `XLF_KERNEL_64`: the 64-bit entry point `machine::boot` uses) or an
//! ELF64 for x86-64 (an uncompressed vmlinux).

use crate::part::{le16, le32};

/// `Ok` or what the file is instead.
pub fn check(data: &[u8]) -> Result<(), String> {
    if data.get(0x202..0x206) == Some(&b"HdrS"[..]) {
        let version = le16(data, 0x206).unwrap_or(0);
        if version < 0x020c {
            return Err(format!(
                "a bzImage with boot protocol {}.{:02} (2.12 or later with a 64-bit entry is needed)",
                version >> 8,
                version & 0xff
            ));
        }
        let xloadflags = le16(data, 0x236).unwrap_or(0);
        if xloadflags & 1 == 0 {
            return Err("a 32-bit bzImage (no 64-bit entry point)".into());
        }
        return Ok(());
    }
    if data.get(0..4) == Some(&b"\x7fELF"[..]) {
        let class = data.get(4).copied();
        let machine = le16(data, 18);
        return match (class, machine) {
            (Some(2), Some(0x3e)) => Ok(()),
            (Some(1), _) => Err("a 32-bit ELF file".into()),
            (_, m) => Err(format!("an ELF file for machine {}", m.unwrap_or(0))),
        };
    }
    if data.get(0..2) == Some(&[0x1f, 0x8b][..]) {
        return Err("gzip data (a compressed kernel of another architecture?)".into());
    }
    if data.get(0x38..0x3c) == Some(&b"ARMd"[..]) {
        return Err("an arm64 kernel Image".into());
    }
    if le32(data, 0x24) == Some(0x016f_2818) {
        return Err("an arm zImage".into());
    }
    if data.get(0..2) == Some(&b"MZ"[..]) {
        return Err("a PE/EFI executable that is not a bzImage".into());
    }
    Err("neither a bzImage nor an ELF vmlinux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bz(version: u16, xload: u16) -> Vec<u8> {
        let mut d = vec![0u8; 0x400];
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        d[0x236..0x238].copy_from_slice(&xload.to_le_bytes());
        d
    }

    #[test]
    fn kernels() {
        assert!(check(&bz(0x020f, 0x7f)).is_ok());
        assert!(check(&bz(0x020f, 0)).unwrap_err().contains("32-bit"));
        assert!(check(&bz(0x020a, 1)).unwrap_err().contains("2.10"));
        let mut elf = vec![0u8; 64];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[18] = 0x3e;
        assert!(check(&elf).is_ok());
        elf[18] = 0xb7;
        assert!(check(&elf).unwrap_err().contains("machine 183"));
        elf[4] = 1;
        assert!(check(&elf).unwrap_err().contains("32-bit"));
        assert!(check(b"MZ memtest").is_err());
        assert!(check(&[]).is_err());
        let mut arm = vec![0u8; 64];
        arm[0x38..0x3c].copy_from_slice(b"ARMd");
        assert!(check(&arm).unwrap_err().contains("arm64"));
    }
}
