//! Writing a snapshot file atomically, with guest RAM stored sparsely.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::format::{
    self, CHUNK, DeviceRecordRef, DiskHeaderRef, MemoryInfo, PAGE_SIZE, SECTION_HEADER_LEN, limits,
    tag,
};
use crate::{DeviceSet, Error, Result, SnapshotContents, memory_regions_of};

/// Writes snapshot files.
pub struct SnapshotWriter;

/// What [`SnapshotWriter::write`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// Apparent file size (metadata, padding and the full RAM image).
    pub file_len: u64,
    /// Bytes before the RAM image: preamble and sections.
    pub metadata_len: u64,
    /// Guest RAM size.
    pub image_len: u64,
    /// Non-zero pages written; every other page is a hole.
    pub stored_pages: u64,
}

/// How [`SnapshotWriter::write_with`] treats what is at the output path, and when it gives up.
#[derive(Clone, Copy, Default)]
pub struct WriteOptions<'a> {
    /// Replace a regular file already at the path. Without it an existing file is an error
    /// ([`Error::OutputExists`]), decided atomically at the end (a hard link that does not
    /// replace). Either way the path changes only once the new file is complete and synced.
    pub overwrite: bool,
    /// Asked between chunks of guest RAM and right before the new file takes the path:
    /// `Some(reason)` abandons the write ([`Error::Cancelled`]), removing the temporary file and
    /// leaving the path as it was. The VMM asks whether the API client is still connected.
    pub cancelled: Option<&'a dyn Fn() -> Option<String>>,
}

impl SnapshotWriter {
    /// [`SnapshotWriter::write_with`] replacing an existing regular file.
    pub fn write<D: DeviceSet>(
        path: impl AsRef<Path>,
        contents: &SnapshotContents<D>,
        memory: &hv::GuestMemory,
    ) -> Result<WriteSummary> {
        let options = WriteOptions {
            overwrite: true,
            cancelled: None,
        };
        Self::write_with(path, contents, memory, &options)
    }

    /// Writes `contents` and `memory` to `path`: first to `.<name>.tmp-<pid>` in the same
    /// directory, then fsync, move it to `path` (rename, or a hard link when `options` does not
    /// allow replacing a file), fsync the directory. On any error the temporary file is removed
    /// and nothing is left under `path`; a file that was there before stays as it was unless the
    /// move happened (then only the directory sync can still fail, and the new file is removed).
    ///
    /// A `path` naming anything but a regular file or nothing (a directory, device node, FIFO,
    /// socket or symbolic link) is refused before anything is written
    /// ([`Error::OutputNotRegular`]). Temporary files of writers that died (`.<name>.tmp-<pid>`
    /// whose process no longer exists) are removed first.
    ///
    /// The VM must be paused: `memory` is read while the file is written.
    pub fn write_with<D: DeviceSet>(
        path: impl AsRef<Path>,
        contents: &SnapshotContents<D>,
        memory: &hv::GuestMemory,
        options: &WriteOptions<'_>,
    ) -> Result<WriteSummary> {
        write_with_faults(
            path.as_ref(),
            contents,
            memory,
            options,
            &mut Faults::default(),
        )
    }
}

/// Refuses an output path that names something a snapshot must not replace.
fn check_target(path: &Path, overwrite: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    let t = meta.file_type();
    let kind = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("a special file")
    };
    if let Some(kind) = kind {
        return Err(Error::OutputNotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if !overwrite {
        return Err(Error::OutputExists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Removes `.<name>.tmp-<pid>` files in `dir` whose writer process is gone (a VMM that was
/// killed mid-write). Only where `/proc` shows processes; failures are ignored.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn cancelled(options: &WriteOptions<'_>) -> Result<()> {
    match options.cancelled.and_then(|f| f()) {
        Some(reason) => Err(Error::Cancelled(reason)),
        None => Ok(()),
    }
}

/// Failure injection for tests: the I/O step numbered `fail_at` fails with "no space".
#[derive(Default)]
pub(crate) struct Faults {
    pub fail_at: Option<u32>,
    pub steps: u32,
}

impl Faults {
    fn step(&mut self, op: &'static str, path: &Path) -> Result<()> {
        let n = self.steps;
        self.steps += 1;
        if self.fail_at == Some(n) {
            return Err(io_err(op, path)(io::Error::from(
                io::ErrorKind::StorageFull,
            )));
        }
        Ok(())
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes the file at `path` when dropped while armed.
struct Cleanup {
    path: PathBuf,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn encode<T: serde::Serialize>(value: &T, section: &str) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(value).map_err(|source| Error::Encode {
        section: section.to_string(),
        source,
    })?;
    if bytes.len() as u64 > limits::MAX_STATE_SECTION {
        return Err(Error::SectionTooLarge {
            section: section.to_string(),
            len: bytes.len() as u64,
            limit: limits::MAX_STATE_SECTION,
        });
    }
    Ok(bytes)
}

/// Validates `contents` against the reader's rules and encodes every section before the memory
/// section (preamble included).
fn encode_states<D: DeviceSet>(
    contents: &SnapshotContents<D>,
    memory: &hv::GuestMemory,
) -> Result<Vec<u8>> {
    let h = &contents.header;
    let devices = contents
        .devices
        .to_records()
        .map_err(|e| Error::EncodeDevices(Box::new(e)))?;
    let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
    format::validate_header(h, &names).map_err(Error::InvalidContents)?;
    if contents.vcpus.len() != h.vcpus as usize {
        return Err(Error::InvalidContents(format!(
            "{} vCPU states for {} vCPUs",
            contents.vcpus.len(),
            h.vcpus
        )));
    }
    for (index, s) in contents.vcpus.iter().enumerate() {
        s.validate()
            .map_err(|reason| Error::InvalidVcpu { index, reason })?;
    }
    if memory_regions_of(memory) != h.memory_regions {
        return Err(Error::InvalidContents(
            "the header's memory regions differ from guest memory".into(),
        ));
    }

    let mut out = format::encode_preamble().to_vec();
    let disk_header = DiskHeaderRef {
        header: h,
        devices: names,
    };
    format::push_section(&mut out, tag::HEADER, &encode(&disk_header, "header")?);
    format::push_section(&mut out, tag::VM, &encode(&contents.vm, "vm")?);
    for (i, s) in contents.vcpus.iter().enumerate() {
        format::push_section(&mut out, tag::VCPU, &encode(s, &format!("vcpu {i}"))?);
    }
    for (name, state) in &devices {
        let record = DeviceRecordRef { name, state };
        let section = format!("device '{name}'");
        format::push_section(&mut out, tag::DEVICE, &encode(&record, &section)?);
    }
    Ok(out)
}

pub(crate) fn write_with_faults<D: DeviceSet>(
    path: &Path,
    contents: &SnapshotContents<D>,
    memory: &hv::GuestMemory,
    options: &WriteOptions<'_>,
    faults: &mut Faults,
) -> Result<WriteSummary> {
    let mut meta = encode_states(contents, memory)?;
    let image_len = contents.header.memory_size();
    let bitmap_len = format::bitmap_len(image_len);
    let metadata_len = meta.len() as u64
        + SECTION_HEADER_LEN
        + format::MEMORY_FIXED_LEN
        + bitmap_len
        + SECTION_HEADER_LEN
        + 8
        + 4 * format::sum_chunks(image_len)
        + SECTION_HEADER_LEN;
    if metadata_len > limits::MAX_METADATA {
        return Err(Error::MetadataTooLarge);
    }
    let image_offset = format::align_up(metadata_len);
    let file_len = image_offset + image_len;

    let Some(name) = path.file_name() else {
        return Err(Error::InvalidContents(format!(
            "output path {} names no file",
            path.display()
        )));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_target(path, options.overwrite)?;
    let name = name.to_string_lossy();
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut cleanup = Cleanup {
        path: tmp.clone(),
        armed: true,
    };

    faults.step("create", &tmp)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    // The image's zero pages stay holes: only non-zero runs are written below.
    faults.step("resize", &tmp)?;
    file.set_len(file_len).map_err(io_err("resize", &tmp))?;

    let mut mem = MemoryInfo {
        image_offset,
        image_len,
        image_crc: 0,
        present_pages: 0,
        bitmap: vec![0; format::to_usize(bitmap_len)],
        chunk_sums: Some(vec![0; format::to_usize(format::sum_chunks(image_len))]),
    };
    write_image(
        &file,
        &tmp,
        memory,
        &contents.header,
        &mut mem,
        options,
        faults,
    )?;

    format::push_section(&mut meta, tag::MEMORY, &mem.encode());
    let sums = mem.chunk_sums.as_deref().unwrap_or_default();
    format::push_optional_section(
        &mut meta,
        tag::CHUNK_SUMS,
        &format::encode_chunk_sums(sums).ok_or_else(|| {
            Error::InvalidContents("more memory checksums than the format counts".into())
        })?,
    );
    format::push_section(&mut meta, tag::END, &[]);
    debug_assert_eq!(meta.len() as u64, metadata_len);
    faults.step("write", &tmp)?;
    file.write_all_at(&meta, 0).map_err(io_err("write", &tmp))?;
    faults.step("sync", &tmp)?;
    file.sync_all().map_err(io_err("sync", &tmp))?;
    drop(file);

    cancelled(options)?;
    // Checked again: the path may have changed while the file was written.
    check_target(path, options.overwrite)?;
    faults.step("rename", &tmp)?;
    if options.overwrite {
        std::fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    } else {
        // A link never replaces: a file created meanwhile makes it fail with EEXIST.
        std::fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::OutputExists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err("link", &tmp)(e)
            }
        })?;
        let _ = std::fs::remove_file(&tmp);
    }
    cleanup.path = path.to_path_buf();
    faults.step("sync directory", dir)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))?;
    cleanup.armed = false;

    Ok(WriteSummary {
        file_len,
        metadata_len,
        image_len,
        stored_pages: mem.present_pages,
    })
}

/// Copies guest RAM into the image, chunk by chunk, writing only runs of non-zero pages and
/// recording them in the bitmap and checksum.
fn write_image(
    file: &File,
    tmp: &Path,
    memory: &hv::GuestMemory,
    header: &crate::Header,
    mem: &mut MemoryInfo,
    options: &WriteOptions<'_>,
    faults: &mut Faults,
) -> Result<()> {
    let page = format::to_usize(PAGE_SIZE);
    let mut buf = vec![0u8; CHUNK];
    let mut image_pos = 0u64;
    for r in &header.memory_regions {
        let mut pos = 0u64;
        while pos < r.len {
            cancelled(options)?;
            let n = format::to_usize((r.len - pos).min(CHUNK as u64));
            buf.resize(n, 0);
            let addr = r.guest_addr + pos;
            memory
                .read_slice(&mut buf, GuestAddress(addr))
                .map_err(|source| Error::ReadGuestMemory { addr, source })?;
            let first_page = (image_pos + pos) / PAGE_SIZE;
            let mut run_start: Option<usize> = None;
            // Each page, then a `None` that ends the last run.
            let pages = buf.chunks_exact(page).map(Some).chain([None]);
            for (i, data) in pages.enumerate() {
                if data.is_some_and(|d| !format::is_zero(d)) {
                    let p = first_page + i as u64;
                    let bits = mem.bitmap.get_mut((p / 8) as usize).ok_or_else(|| {
                        Error::InvalidContents(format!("page {p} is beyond the bitmap"))
                    })?;
                    *bits |= 1 << (p % 8);
                    mem.present_pages += 1;
                    if let (Some(sums), Some(d)) = (mem.chunk_sums.as_mut(), data) {
                        let c = (p * PAGE_SIZE / format::SUM_CHUNK) as usize;
                        if let Some(sum) = sums.get_mut(c) {
                            *sum = crc32c::crc32c_append(*sum, d);
                        }
                    }
                    run_start.get_or_insert(i);
                } else if let Some(s) = run_start.take() {
                    // s < i <= the page count: always in range.
                    let run = buf.get(s * page..i * page).unwrap_or_default();
                    mem.image_crc = crc32c::crc32c_append(mem.image_crc, run);
                    let at = mem.image_offset + image_pos + pos + (s * page) as u64;
                    faults.step("write", tmp)?;
                    file.write_all_at(run, at).map_err(io_err("write", tmp))?;
                }
            }
            pos += n as u64;
        }
        image_pos += r.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::{Header, MemoryRegion};

    fn sample() -> (SnapshotContents, hv::GuestMemory) {
        let mem: hv::GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        for i in 0..8u8 {
            mem.write_slice(&[i + 1; 64], GuestAddress(u64::from(i) * 0x8_1000))
                .unwrap();
        }
        let contents = SnapshotContents {
            header: Header {
                cpu_model: hv::CpuModel::portable(),
                memory_regions: vec![MemoryRegion {
                    guest_addr: 0,
                    len: 4 << 20,
                }],
                vcpus: 1,
                backend: hv::BackendKind::Emu,
                tsc_khz: 1_000_000,
                created_unix: 0,
                config: serde_json::Value::Null,
                user_extra: Default::default(),
            },
            vcpus: vec![hv::CpuState::default()],
            vm: hv::VmState::default(),
            devices: vec![],
        };
        (contents, mem)
    }

    fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    /// Fails each I/O step in turn: every failure leaves the directory empty; once no step
    /// fails, the file is complete and valid.
    #[test]
    fn every_failing_step_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("snapshot-faults-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let (contents, mem) = sample();
        let mut failures = 0;
        for n in 0.. {
            let mut faults = Faults {
                fail_at: Some(n),
                steps: 0,
            };
            let r = write_with_faults(
                &path,
                &contents,
                &mem,
                &WriteOptions::default(),
                &mut faults,
            );
            if n >= faults.steps {
                let summary = r.unwrap();
                assert_eq!(summary.stored_pages, 8);
                break;
            }
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Io { .. }), "{e}");
            assert!(entries(&dir).is_empty(), "step {n}: {:?}", entries(&dir));
            failures += 1;
        }
        // create, resize, 8 page runs, metadata, sync, rename, sync directory.
        assert_eq!(failures, 14);
        let r = crate::SnapshotReader::open(&path).unwrap();
        assert_eq!(r.contents(), &contents);
        r.verify_memory().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn no_overwrite() -> WriteOptions<'static> {
        WriteOptions::default()
    }

    /// Device nodes, FIFOs, sockets, directories and symbolic links are never replaced, not
    /// even with overwrite; nothing is left in their directory.
    #[test]
    fn special_outputs_are_refused_and_left_alone() {
        use std::os::unix::fs::FileTypeExt;
        let (contents, mem) = sample();
        let dir = scratch("special");
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        for overwrite in [false, true] {
            let options = WriteOptions {
                overwrite,
                cancelled: None,
            };
            for (p, kind) in [
                (Path::new("/dev/null"), "a character device"),
                (fifo.as_path(), "a FIFO"),
                (sock.as_path(), "a socket"),
                (sub.as_path(), "a directory"),
                (link.as_path(), "a symbolic link"),
            ] {
                let e = SnapshotWriter::write_with(p, &contents, &mem, &options).unwrap_err();
                assert!(
                    matches!(&e, Error::OutputNotRegular { kind: k, .. } if *k == kind),
                    "{}: {e}",
                    p.display()
                );
                assert!(!e.to_string().contains('\n'));
            }
        }
        assert!(
            std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(
            std::fs::symlink_metadata(&sock)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(entries(&sub).is_empty());
        let mut names = entries(&dir);
        names.sort();
        assert_eq!(names, ["fifo", "link", "sock", "sub"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An existing file is replaced only with overwrite, and only by a complete file.
    #[test]
    fn an_existing_file_is_replaced_only_when_asked() {
        let (contents, mem) = sample();
        let dir = scratch("exists");
        let path = dir.join("vm.snap");
        std::fs::write(&path, b"old").unwrap();
        let e = SnapshotWriter::write_with(&path, &contents, &mem, &no_overwrite()).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir).len(), 1);
        let options = WriteOptions {
            overwrite: true,
            cancelled: None,
        };
        SnapshotWriter::write_with(&path, &contents, &mem, &options).unwrap();
        crate::SnapshotReader::open(&path)
            .unwrap()
            .verify_memory()
            .unwrap();
        assert_eq!(entries(&dir).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A write abandoned at any point (between chunks, or just before the rename) leaves the
    /// old file as it was and no temporary file.
    #[test]
    fn a_cancelled_write_leaves_the_old_file() {
        let (contents, mem) = sample();
        let dir = scratch("cancel");
        let path = dir.join("vm.snap");
        // 4 MiB in 2 MiB chunks: asked twice between chunks, once before the rename.
        for at in 0..3 {
            std::fs::write(&path, b"old").unwrap();
            let asked = std::cell::Cell::new(0);
            let cancel = || {
                asked.set(asked.get() + 1);
                (asked.get() > at).then(|| "the client hung up".to_string())
            };
            let options = WriteOptions {
                overwrite: true,
                cancelled: Some(&cancel),
            };
            let e = SnapshotWriter::write_with(&path, &contents, &mem, &options).unwrap_err();
            assert!(matches!(e, Error::Cancelled(_)), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), b"old", "cancelled at {at}");
            assert_eq!(entries(&dir).len(), 1, "{:?}", entries(&dir));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Temporary files of a writer that died are removed by the next write of the same name;
    /// those of a live process are not.
    #[test]
    fn dead_writers_temporaries_are_removed() {
        let (contents, mem) = sample();
        let dir = scratch("stale");
        // Above the kernel's largest pid_max: no such process.
        let dead = dir.join(".vm.snap.tmp-4194399");
        let live = dir.join(".vm.snap.tmp-1");
        let other = dir.join(".other.snap.tmp-4194399");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        SnapshotWriter::write_with(dir.join("vm.snap"), &contents, &mem, &no_overwrite()).unwrap();
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_without_file_name_is_refused() {
        let (contents, mem) = sample();
        let e = SnapshotWriter::write("/", &contents, &mem).unwrap_err();
        assert!(matches!(e, Error::InvalidContents(_)), "{e}");
    }
}
