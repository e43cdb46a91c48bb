//! OVA: a tar (POSIX ustar, as OVF 2.0 section 5.3 requires) whose first member is the OVF
//! descriptor, followed by an optional manifest and the files it references. Read with the
//! `tar` crate; member names are checked like OVF references (relative, no `..`), links and
//! sparse members are refused, and members are located by offset rather than extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::{DiskLoc, Error, MAX_DESCRIPTOR, Result, VmSpec, check_relative, input};

/// Most members read.
const MAX_MEMBERS: usize = 10_000;

pub fn describe(path: &Path) -> Result<VmSpec> {
    let rerr = |source: io::Error| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(rerr)?;
    let file_len = file.metadata().map_err(rerr)?.len();
    let mut archive = tar::Archive::new(file);
    let mut members: HashMap<String, (u64, u64)> = HashMap::new();
    let mut descriptor: Option<(String, String)> = None;
    for (i, entry) in archive.entries().map_err(rerr)?.enumerate() {
        if i >= MAX_MEMBERS {
            return input(format!(
                "{}: more than {MAX_MEMBERS} members",
                path.display()
            ));
        }
        let mut entry = entry.map_err(|source| Error::Package {
            what: format!("{}: not a valid OVA (tar)", path.display()),
            source,
        })?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| Error::Input(format!("{}: a member name is not UTF-8", path.display())))?;
        check_relative(&name, "OVA member")?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return input(format!(
                "OVA member '{}' is a {kind:?} entry (only plain files are accepted); refused",
                name.escape_debug()
            ));
        }
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return input(format!(
                "OVA member '{name}' claims {size} bytes past the end of the file; refused"
            ));
        }
        let key = name.trim_start_matches("./").to_string();
        if members.insert(key.clone(), (offset, size)).is_some() {
            return input(format!("OVA member '{name}' appears twice; refused"));
        }
        if descriptor.is_none() && key.to_ascii_lowercase().ends_with(".ovf") {
            if size > MAX_DESCRIPTOR {
                return input(format!(
                    "OVA descriptor '{name}' is larger than 16 MiB; refused"
                ));
            }
            let mut text = String::new();
            entry
                .by_ref()
                .take(MAX_DESCRIPTOR)
                .read_to_string(&mut text)
                .map_err(|source| Error::Package {
                    what: format!("OVA descriptor '{name}'"),
                    source,
                })?;
            descriptor = Some((key, text));
        }
    }
    let Some((dname, text)) = descriptor else {
        return input(format!(
            "{}: the OVA holds no .ovf descriptor",
            path.display()
        ));
    };
    let mut spec = crate::ovf::describe(&text, &mut |href| {
        check_relative(href, "OVF file reference")?;
        let key = href.trim_start_matches("./");
        match members.get(key) {
            Some(&(offset, size)) => Ok(DiskLoc::Member {
                name: key.to_string(),
                offset,
                size,
            }),
            None => input(format!(
                "the OVF descriptor '{dname}' references '{href}', which the OVA does not hold"
            )),
        }
    })?;
    if spec.name.is_empty() {
        spec.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    Ok(spec)
}

/// Copies `size` bytes at `offset` of `ova` to a new file `dest`.
pub fn copy_member(ova: &Path, offset: u64, size: u64, dest: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let rerr = |source: io::Error| Error::Read {
        path: ova.to_path_buf(),
        source,
    };
    let mut f = File::open(ova).map_err(rerr)?;
    f.seek(SeekFrom::Start(offset)).map_err(rerr)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|source| Error::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    let n = io::copy(&mut f.take(size), &mut out).map_err(rerr)?;
    if n != size {
        let _ = std::fs::remove_file(dest);
        return input(format!("{}: a member is truncated", ova.display()));
    }
    Ok(())
}
