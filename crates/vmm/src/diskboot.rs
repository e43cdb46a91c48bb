//! `anyvisor run --disk IMAGE` without `--kernel`: boot the kernel the first disk holds
//! ([`bootdisk::find_boot`]; the rules are in docs/boot-from-disk.md).
//!
//! The kernel and initrd found are written to unlinked temporary files that stay open for the
//! life of the process and are named `/proc/self/fd/N` for the loader, so nothing is left
//! behind however the process ends. The image itself is opened read-only.
//!
//! The command line: the entry's arguments plus `console=ttyS0` when they name no console.
//! A `--cmdline` given by the user replaces it; one starting with `+` is appended to it
//! instead (`--cmdline "+ single"`). `--kernel` switches all of this off; `--initrd` without
//! `--kernel` replaces the entry's initrd.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use crate::config::{DiskConfig, RunOptions};
use crate::error::{Error, Result};

/// Keeps the extracted kernel and initrd alive; drop it after the VM ended.
#[derive(Debug)]
pub struct Extracted {
    _files: Vec<File>,
    /// What was booted, one line (the VM's `boot_entry` in `GET /vm`: pass it to
    /// [`crate::run`]).
    pub chosen: String,
    pub kernel_path: String,
}

/// When `options` ask to boot a disk without a kernel, finds the disk's kernel and returns
/// the options with `kernel`, `initrd` and `cmdline` filled in; otherwise returns them as
/// they are.
pub fn prepare(mut options: RunOptions) -> Result<(RunOptions, Option<Extracted>)> {
    if options.kernel.is_some() || options.restore.is_some() || options.incoming.is_some() {
        return Ok((options, None));
    }
    let Some(first) = options.disk.first() else {
        return Ok((options, None));
    };
    let disk = DiskConfig::parse(first)?;
    // By name (the serde name of `DiskFormat` is the `disk` crate's format name), so every
    // format `--disk format=` accepts maps without a list to keep in step.
    let format = disk
        .format
        .map(|f| {
            let name = serde_json::to_value(f)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            disk::Format::from_name(&name).ok_or_else(|| {
                Error::Usage(format!("--disk format={name} cannot be read to boot from"))
            })
        })
        .transpose()?;
    let image = bootdisk::open_image(&disk.path, format, disk.backing)
        .map_err(|e| Error::bad_file(disk.path.clone(), e))?;
    let boot = bootdisk::find_boot(image).map_err(|e| {
        Error::bad_file(
            disk.path.clone(),
            Error::setup("cannot boot from this disk", e),
        )
    })?;
    let mut files = Vec::new();
    let kernel = unlinked_copy(&boot.kernel, "kernel")?;
    options.kernel = Some(fd_path(&kernel));
    files.push(kernel);
    if options.initrd.is_none()
        && let Some(initrd) = &boot.initrd
    {
        let f = unlinked_copy(initrd, "initrd")?;
        options.initrd = Some(fd_path(&f));
        files.push(f);
    }
    options.cmdline = Some(match options.cmdline.take() {
        Some(user) => match user.strip_prefix('+') {
            Some(extra) => format!("{} {}", boot.cmdline, extra.trim()),
            None => user,
        },
        None => boot.cmdline.clone(),
    });
    let chosen = format!("{} from {}", boot.chosen, disk.path.display());
    Ok((
        options,
        Some(Extracted {
            _files: files,
            chosen,
            kernel_path: boot.kernel_path,
        }),
    ))
}

fn fd_path(f: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// `data` in a file that has no name (created in the temp dir and unlinked at once).
fn unlinked_copy(data: &[u8], what: &str) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("anyvisor-{what}-{}-{n}", std::process::id()));
    let io = |source| Error::Io {
        op: "cannot write the kernel found on the disk to a temporary file",
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let unlinked = std::fs::remove_file(&path);
    f.write_all(data).map_err(io)?;
    unlinked.map_err(io)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_without_disk_or_with_kernel() {
        let o = RunOptions {
            kernel: Some("/k".into()),
            disk: vec!["/nonexistent".into()],
            ..Default::default()
        };
        let (out, x) = prepare(o.clone()).unwrap();
        assert_eq!(out, o);
        assert!(x.is_none());
        let (out, x) = prepare(RunOptions::default()).unwrap();
        assert_eq!(out, RunOptions::default());
        assert!(x.is_none());
    }

    #[test]
    fn missing_or_empty_disk_is_a_usage_error() {
        let o = RunOptions {
            disk: vec!["/nonexistent/disk.img".into()],
            ..Default::default()
        };
        let e = prepare(o).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        let dir = std::env::temp_dir().join(format!("anyvisor-diskboot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("zero.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let e = prepare(RunOptions {
            disk: vec![img.display().to_string()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        let text = crate::error::report(&e);
        assert!(
            text.contains("no partition table and no filesystem"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_disk_format_maps() {
        for f in [
            crate::config::DiskFormat::Raw,
            crate::config::DiskFormat::Qcow2,
        ] {
            let name = serde_json::to_value(f).unwrap();
            assert!(
                disk::Format::from_name(name.as_str().unwrap()).is_some(),
                "{f:?}"
            );
        }
    }

    #[test]
    fn unlinked_files_read_back() {
        let f = unlinked_copy(b"hello", "test").unwrap();
        assert_eq!(std::fs::read(fd_path(&f)).unwrap(), b"hello");
    }
}
