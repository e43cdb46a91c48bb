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
use crate::{Error, Result, SnapshotContents, memory_regions_of};

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

impl SnapshotWriter {
    /// Writes `contents` and `memory` to `path`: first to `.<name>.tmp-<pid>` in the same
    /// directory, then fsync, rename over `path`, fsync the directory. On any error the temporary
    /// file is removed and nothing is left under `path` (a file that was there before has been
    /// replaced only if the rename happened, in which case it is removed too).
    ///
    /// The VM must be paused: `memory` is read while the file is written.
    pub fn write(
        path: impl AsRef<Path>,
        contents: &SnapshotContents,
        memory: &hv::GuestMemory,
    ) -> Result<WriteSummary> {
        write_with_faults(path.as_ref(), contents, memory, &mut Faults::default())
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
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Error::InvalidContents(format!("cannot encode {section}: {e}")))?;
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
fn encode_states(contents: &SnapshotContents, memory: &hv::GuestMemory) -> Result<Vec<u8>> {
    let h = &contents.header;
    let names: Vec<&str> = contents.devices.iter().map(|(n, _)| n.as_str()).collect();
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
    for (name, state) in &contents.devices {
        let record = DeviceRecordRef { name, state };
        let section = format!("device '{name}'");
        format::push_section(&mut out, tag::DEVICE, &encode(&record, &section)?);
    }
    Ok(out)
}

pub(crate) fn write_with_faults(
    path: &Path,
    contents: &SnapshotContents,
    memory: &hv::GuestMemory,
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
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
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
        bitmap: vec![0; bitmap_len as usize],
        chunk_sums: Some(vec![0; format::sum_chunks(image_len) as usize]),
    };
    write_image(&file, &tmp, memory, contents, &mut mem, faults)?;

    format::push_section(&mut meta, tag::MEMORY, &mem.encode());
    let sums = mem.chunk_sums.as_deref().unwrap_or_default();
    format::push_optional_section(&mut meta, tag::CHUNK_SUMS, &format::encode_chunk_sums(sums));
    format::push_section(&mut meta, tag::END, &[]);
    debug_assert_eq!(meta.len() as u64, metadata_len);
    faults.step("write", &tmp)?;
    file.write_all_at(&meta, 0).map_err(io_err("write", &tmp))?;
    faults.step("sync", &tmp)?;
    file.sync_all().map_err(io_err("sync", &tmp))?;
    drop(file);

    faults.step("rename", &tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
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
    contents: &SnapshotContents,
    mem: &mut MemoryInfo,
    faults: &mut Faults,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    let mut buf = vec![0u8; CHUNK];
    let mut image_pos = 0u64;
    for r in &contents.header.memory_regions {
        let mut pos = 0u64;
        while pos < r.len {
            let n = (r.len - pos).min(CHUNK as u64) as usize;
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
        for i in 0..8u64 {
            mem.write_slice(&[i as u8 + 1; 64], GuestAddress(i * 0x8_1000))
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
            let r = write_with_faults(&path, &contents, &mem, &mut faults);
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

    #[test]
    fn a_path_without_file_name_is_refused() {
        let (contents, mem) = sample();
        let e = SnapshotWriter::write("/", &contents, &mem).unwrap_err();
        assert!(matches!(e, Error::InvalidContents(_)), "{e}");
    }
}
